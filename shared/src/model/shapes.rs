//! A checkpoint's tensor names and shapes from its config alone, and random weights in them
//! (benchmarks of shapes whose checkpoints are not on disk).

use crate::config::ModelConfig;
use candle_core::{DType, Device, Tensor};

/// Every tensor of a checkpoint for `cfg`, in Hugging Face's names and shapes.
pub fn checkpoint_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qh, kvh, v) = (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![qh * d, h]);
        push("self_attn.k_proj.weight", vec![kvh * d, h]);
        push("self_attn.v_proj.weight", vec![kvh * d, h]);
        push("self_attn.o_proj.weight", vec![h, qh * d]);
        if cfg.qkv_bias {
            push("self_attn.q_proj.bias", vec![qh * d]);
            push("self_attn.k_proj.bias", vec![kvh * d]);
            push("self_attn.v_proj.bias", vec![kvh * d]);
        }
        if cfg.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        if cfg.qk_norm {
            push("self_attn.q_norm.weight", vec![d]);
            push("self_attn.k_norm.weight", vec![d]);
        }
        push("mlp.gate_proj.weight", vec![i, h]);
        push("mlp.up_proj.weight", vec![i, h]);
        push("mlp.down_proj.weight", vec![h, i]);
        if cfg.mlp_bias {
            push("mlp.gate_proj.bias", vec![i]);
            push("mlp.up_proj.bias", vec![i]);
            push("mlp.down_proj.bias", vec![h]);
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Random tensors for `shapes` on `device`: norm weights are ones, the rest normal with std
/// 0.02. A GPU makes them itself (no host copy).
pub fn random_tensors(
    shapes: &[(String, Vec<usize>)],
    dtype: DType,
    device: &Device,
    seed: u64,
) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
    use rand::SeedableRng;
    let mut out = std::collections::HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        // Each tensor's values depend on the seed and its name only, so a stage draws the same
        // values as a whole model does.
        let own_seed = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), dtype, device)?
        } else if device.is_cpu() {
            let n = shape.iter().product();
            let values = crate::tiny::Normal(rand::rngs::StdRng::seed_from_u64(own_seed)).sample(n, 0.0, 0.02);
            Tensor::from_vec(values, shape.as_slice(), device)?.to_dtype(dtype)?
        } else {
            device.set_seed(own_seed)?;
            Tensor::randn(0f32, 0.02, shape.as_slice(), device)?.to_dtype(dtype)?
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}
