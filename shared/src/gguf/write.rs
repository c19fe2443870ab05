//! Writes a safetensors checkpoint as a GGUF file, as llama.cpp's `convert_hf_to_gguf.py` lays
//! one out (the metadata keys, tensor names and Llama's q/k row order it uses), with the linear
//! weights in a chosen block type: for test models and for serving a checkpoint as GGUF.

use super::{LAYER_TENSORS, MODEL_TENSORS};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The type a written file's linear weights take (everything else is f32): every type llama.cpp
/// stores weights in that candle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    #[value(name = "f32")]
    F32,
    #[value(name = "f16")]
    F16,
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    Q5_1,
    #[value(name = "q2_k")]
    Q2K,
    #[value(name = "q3_k")]
    Q3K,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
}

impl GgufType {
    /// Every type.
    pub const ALL: [GgufType; 13] = [
        GgufType::F32,
        GgufType::F16,
        GgufType::Bf16,
        GgufType::Q8_0,
        GgufType::Q4_0,
        GgufType::Q4_1,
        GgufType::Q5_0,
        GgufType::Q5_1,
        GgufType::Q2K,
        GgufType::Q3K,
        GgufType::Q4K,
        GgufType::Q5K,
        GgufType::Q6K,
    ];

    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Bf16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
            GgufType::Q5_0 => GgmlDType::Q5_0,
            GgufType::Q5_1 => GgmlDType::Q5_1,
            GgufType::Q2K => GgmlDType::Q2K,
            GgufType::Q3K => GgmlDType::Q3K,
            GgufType::Q4K => GgmlDType::Q4K,
            GgufType::Q5K => GgmlDType::Q5K,
            GgufType::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama.cpp's name: `q4_k`.
    pub fn name(self) -> String {
        super::type_name(self.ggml())
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::WriteModel(format!("GGUF: {e}"))
}

/// The GGUF name of a Hugging Face tensor.
fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = MODEL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let g = LAYER_TENSORS.iter().find(|(_, h)| *h == base)?.0;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// llama.cpp's permutation of a Llama q or k weight (the inverse of `unpermute_rows`).
fn permute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    t.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// The tokenizer's metadata, as `convert_hf_to_gguf.py` writes a byte-level BPE's.
fn tokenizer_metadata(tokenizer_json: &Path, arch: Architecture, out: &mut Vec<(String, Value)>) -> Result<()> {
    let text = std::fs::read_to_string(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(err)?;
    let tok: tokenizers::Tokenizer = text.parse().map_err(err)?;
    let vocab = tok.get_vocab(true);
    let mut tokens = vec![String::new(); vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0)];
    for (t, &i) in &vocab {
        tokens[i as usize] = t.clone();
    }
    let added = tok.get_added_tokens_decoder();
    let types: Vec<Value> =
        (0..tokens.len() as u32).map(|i| Value::I32(added.get(&i).map_or(1, |a| if a.special { 3 } else { 4 }))).collect();
    let merges: Vec<Value> = match json.pointer("/model/merges").and_then(|m| m.as_array()) {
        Some(list) => list
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(Value::String(s.clone())),
                serde_json::Value::Array(pair) if pair.len() == 2 => {
                    Ok(Value::String(format!("{} {}", pair[0].as_str().unwrap_or_default(), pair[1].as_str().unwrap_or_default())))
                }
                other => Err(err(format!("unexpected merge {other}"))),
            })
            .collect::<Result<_>>()?,
        None => return Err(err("tokenizer.json is not a BPE with merges")),
    };
    let pre = if arch == Architecture::Llama { "llama-bpe" } else { "qwen2" };
    out.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    out.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    out.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())));
    out.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
    out.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    Ok(())
}

/// Checkpoint order: the embedding, the layers in turn, then the final norm and the head.
fn order(name: &str) -> (usize, usize, String) {
    match name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()) {
        Some(layer) => (1, layer, name.to_string()),
        None if name.starts_with("model.embed_tokens") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

/// Writes the safetensors checkpoint in `src` as the GGUF file `out`, its linear weights as
/// `ty` (their rows must split into `ty`'s blocks), everything else as f32.
pub fn write_checkpoint(src: &Path, out: &Path, ty: GgufType) -> Result<()> {
    let cfg = ModelConfig::from_file(&src.join("config.json"))?;
    let arch = match cfg.architecture {
        Architecture::Mistral => Architecture::Llama,
        a => a,
    };
    let a = arch.model_type();
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())),
        (format!("{a}.block_count"), Value::U32(cfg.num_layers as u32)),
        (format!("{a}.context_length"), Value::U32(cfg.max_position_embeddings as u32)),
        (format!("{a}.embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(cfg.intermediate_size as u32)),
        (format!("{a}.attention.head_count"), Value::U32(cfg.num_heads as u32)),
        (format!("{a}.attention.head_count_kv"), Value::U32(cfg.num_kv_heads as u32)),
        (format!("{a}.attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (format!("{a}.attention.value_length"), Value::U32(cfg.head_dim as u32)),
        (format!("{a}.rope.dimension_count"), Value::U32(cfg.head_dim as u32)),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
    ];
    tokenizer_metadata(&src.join("tokenizer.json"), arch, &mut meta)?;
    if let Some(bos) = cfg.bos_token_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = cfg.eos_token_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    let chat = crate::chat::ChatTemplates::load(src, "").ok();
    if let Some(template) = chat.as_ref().and_then(|c| c.source(false)) {
        meta.push(("tokenizer.chat_template".into(), Value::String(template.to_string())));
    }
    let loaded = crate::weights::load(src, &|_| true, &|_, _| None, Some(DType::F32), &Device::Cpu)?;
    let mut names: Vec<&String> = loaded.tensors.keys().collect();
    names.sort_by_key(|n| order(n));
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let Some(g) = gguf_name(name) else { return Err(err(format!("no GGUF name for tensor {name}"))) };
        let mut t = loaded.tensors[name].clone();
        let heads = match name.rsplit('.').nth(1) {
            Some("q_proj") if arch == Architecture::Llama && name.ends_with(".weight") => Some(cfg.num_heads),
            Some("k_proj") if arch == Architecture::Llama && name.ends_with(".weight") => Some(cfg.num_kv_heads),
            _ => None,
        };
        if let Some(h) = heads {
            t = permute(&t, h).map_err(err)?;
        }
        let target = if crate::quant::is_linear_weight(name) { ty.ggml() } else { GgmlDType::F32 };
        if t.dims().last().is_some_and(|&row| row % target.block_size() != 0) {
            return Err(err(format!(
                "{name}: rows of {} do not split into {target:?}'s blocks of {}",
                t.dims()[t.rank() - 1],
                target.block_size()
            )));
        }
        tensors.push((g, QTensor::quantize(&t, target).map_err(err)?));
    }
    let mut file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    candle_core::quantized::gguf_file::write(&mut file, &meta_refs, &tensor_refs).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_between_hf_and_gguf() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.11.self_attn.q_proj.bias",
            "model.layers.0.self_attn.k_norm.weight",
            "model.layers.3.mlp.down_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(super::super::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_name("model.layers.0.mlp.up_proj.weight").unwrap(), "blk.0.ffn_up.weight");
        assert_eq!(super::super::hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn the_llama_permutation_is_undone_on_load() {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu).unwrap().reshape((8, 3)).unwrap();
        let p = permute(&t, 2).unwrap();
        let bytes: Vec<u8> = p.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|f| f.to_le_bytes()).collect();
        let back = super::super::unpermute_rows(&bytes, 8, 2).unwrap();
        let back: Vec<f32> = back.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(back, t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // Rows within a head are interleaved: head 0's GGUF row 1 is HF row 2 (the second half).
        assert_eq!(p.get(1).unwrap().to_vec1::<f32>().unwrap(), [6.0, 7.0, 8.0]);
    }
}
