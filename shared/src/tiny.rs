//! Tiny random-weight checkpoints in the exact Hugging Face layout (config.json,
//! generation_config.json, safetensors — one file or a sharded index —, tokenizer.json with a
//! byte-level BPE trained on text shipped here), for tests, demos and benchmarks.

use crate::config::Architecture;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// Text the tiny tokenizers are trained on.
pub const CORPUS: &str = include_str!("../data/corpus.txt");

/// What to generate.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Target vocabulary size of the trained BPE (its actual size may be smaller).
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// dtype on disk.
    pub dtype: DType,
    /// Number of safetensors files (1 = `model.safetensors`, more = an index).
    pub shards: usize,
    pub seed: u64,
    /// Standard deviation of the random weights.
    pub init_std: f32,
    /// Write the safetensors files (false: only config and tokenizer files, for workers that
    /// make random weights themselves).
    pub weights: bool,
    /// config.json's vocab_size when larger than the trained tokenizer's (the shape of a real
    /// model's embedding; ids past the tokenizer decode to nothing).
    pub config_vocab: Option<usize>,
    /// Write the projections in FP8 (E4M3) with one scale per block of this many (rows,
    /// columns), as Qwen's FP8 checkpoints ship them (`weight_block_size`).
    pub fp8_block: Option<[usize; 2]>,
}

impl TinySpec {
    /// The defaults for an architecture: 4 layers, hidden 64, GQA 4:2, vocab 512; Qwen3's
    /// head_dim 32 is decoupled from hidden / heads as in Qwen3-0.6B, Llama's is hidden / heads.
    pub fn new(arch: Architecture) -> Self {
        TinySpec {
            arch,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: if arch == Architecture::Qwen3 { 32 } else { 16 },
            vocab_size: 512,
            max_position_embeddings: 1024,
            tie_word_embeddings: arch == Architecture::Qwen3,
            dtype: DType::F32,
            shards: 1,
            seed: 0,
            init_std: 0.1,
            weights: true,
            config_vocab: None,
            fp8_block: None,
        }
    }
}

fn special_tokens(arch: Architecture) -> (&'static [&'static str], Option<&'static str>, &'static str) {
    match arch {
        Architecture::Llama | Architecture::Mistral => {
            (&["<|begin_of_text|>", "<|end_of_text|>"], Some("<|begin_of_text|>"), "<|end_of_text|>")
        }
        Architecture::Qwen3 | Architecture::Qwen2 => (&["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>"),
    }
}

/// Trains the byte-level BPE tokenizer for `arch` on [`CORPUS`].
pub fn train_tokenizer(arch: Architecture, vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, TokenizerBuilder};
    let err = |e: &dyn std::fmt::Display| Error::WriteModel(format!("training the tokenizer: {e}"));
    let (specials, bos, _) = special_tokens(arch);
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tk: tokenizers::TokenizerImpl<
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(|e| err(&e))?;
    tk.train(&mut trainer, CORPUS.lines().map(|l| format!("{l}\n"))).map_err(|e| err(&e))?;
    if let Some(bos) = bos {
        let id = tk.token_to_id(bos).ok_or_else(|| err(&"bos token missing after training"))?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .map_err(|e| err(&e))?
            .try_pair(format!("{bos} $A {bos} $B"))
            .map_err(|e| err(&e))?
            .special_tokens(vec![(bos.to_string(), id)])
            .build()
            .map_err(|e| err(&e))?;
        tk.with_post_processor(Some(tokenizers::PostProcessorWrapper::from(post)));
    }
    Ok(tokenizers::Tokenizer::from(tk))
}

/// Seeded normal samples (Box–Muller over `StdRng`).
pub(crate) struct Normal(pub(crate) rand::rngs::StdRng);

impl Normal {
    pub(crate) fn sample(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box–Muller: deterministic for a seed, needs no extra crate.
                let u1: f32 = self.0.random::<f32>().max(f32::MIN_POSITIVE);
                let u2: f32 = self.0.random();
                mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    }
}

/// The checkpoint's tensors, in Hugging Face's order, as (name, shape).
pub fn tensor_shapes(spec: &TinySpec, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (spec.hidden_size, spec.intermediate_size, spec.head_dim);
    let (qh, kvh) = (spec.num_heads, spec.num_kv_heads);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![qh * d, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kvh * d, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kvh * d, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, qh * d]));
        if spec.arch == Architecture::Qwen3 {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        if spec.arch == Architecture::Qwen2 {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![qh * d]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kvh * d]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kvh * d]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![vocab, h]));
    }
    out
}

fn dtype_str(d: DType) -> Result<&'static str> {
    crate::dtype::Dtype::hf_name(d).ok_or_else(|| Error::WriteModel(format!("dtype {d:?} is not supported on disk")))
}

/// Writes a complete checkpoint for `spec` into `dir` (created if missing).
pub fn write(dir: &Path, spec: &TinySpec) -> Result<()> {
    if spec.num_kv_heads == 0 || !spec.num_heads.is_multiple_of(spec.num_kv_heads) {
        return Err(Error::WriteModel(format!("heads ({}) must be a multiple of kv heads ({})", spec.num_heads, spec.num_kv_heads)));
    }
    if spec.shards == 0 || spec.num_layers == 0 || !spec.head_dim.is_multiple_of(2) {
        return Err(Error::WriteModel("shards and layers must be at least 1 and head_dim even".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tokenizer = train_tokenizer(spec.arch, spec.vocab_size)?;
    let vocab = tokenizer.get_vocab_size(true).max(spec.config_vocab.unwrap_or(0));
    let tok_path = dir.join("tokenizer.json");
    tokenizer.save(&tok_path, true).map_err(|e| Error::WriteModel(format!("{}: {e}", tok_path.display())))?;
    let (_, bos, eos) = special_tokens(spec.arch);
    let id = |t: &str| tokenizer.token_to_id(t).expect("special tokens are in the vocabulary");
    let eos_id = id(eos);
    let bos_id = bos.map(id).unwrap_or(eos_id);
    let dtype = dtype_str(spec.dtype)?;
    let (archs, model_type) = match spec.arch {
        Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
    };
    let config = serde_json::json!({
        "architectures": [archs],
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    });
    let mut config = config;
    if matches!(spec.arch, Architecture::Qwen3 | Architecture::Qwen2) {
        // Qwen configs always carry their sliding-window fields (off).
        config["use_sliding_window"] = serde_json::json!(false);
        config["sliding_window"] = serde_json::Value::Null;
        config["max_window_layers"] = serde_json::json!(spec.num_layers);
    }
    if let Some(block) = spec.fp8_block {
        if block.contains(&0) {
            return Err(Error::WriteModel("FP8 blocks must be at least 1x1".into()));
        }
        config["quantization_config"] =
            serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block});
    }
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": false}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            "bos_token": bos,
            "model_max_length": spec.max_position_embeddings,
        }),
    )?;

    if !spec.weights {
        return Ok(());
    }
    let mut rng = Normal(rand::rngs::StdRng::seed_from_u64(spec.seed));
    let shapes = tensor_shapes(spec, vocab);
    let mut tensors = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        // Norm weights near 1 as trained models have them; everything else centred on 0.
        let values = if name.ends_with("norm.weight") { rng.sample(n, 1.0, 0.1) } else { rng.sample(n, 0.0, spec.init_std) };
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(spec.dtype))
            .map_err(|e| Error::WriteModel(e.to_string()))?;
        match spec.fp8_block.filter(|_| crate::quant::is_linear_weight(name)) {
            Some(block) => {
                let (weight, scale_inv) = to_fp8(&t, block).map_err(|e| Error::WriteModel(format!("{name}: {e}")))?;
                tensors.push((name.clone(), weight));
                tensors.push((format!("{name}_scale_inv"), scale_inv));
            }
            None => tensors.push((name.clone(), t)),
        }
    }
    let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
    if spec.shards == 1 {
        save(&dir.join("model.safetensors"), tensors)?;
        return Ok(());
    }
    // Split in checkpoint order into files of about equal size, as save_pretrained does.
    let per_file = total.div_ceil(spec.shards);
    let mut files: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); spec.shards];
    let mut acc = 0usize;
    for (name, t) in tensors {
        let idx = (acc / per_file.max(1)).min(spec.shards - 1);
        acc += t.elem_count() * t.dtype().size_in_bytes();
        files[idx].push((name, t));
    }
    let mut weight_map = serde_json::Map::new();
    for (i, group) in files.into_iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, spec.shards);
        for (name, _) in &group {
            weight_map.insert(name.clone(), serde_json::Value::String(fname.clone()));
        }
        save(&dir.join(&fname), group)?;
    }
    write_json(&dir.join("model.safetensors.index.json"), &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}))
}

/// A weight in FP8 E4M3 with one f32 scale per block of `block` (rows, columns): each block
/// divided by its largest magnitude over 448 (E4M3's largest), as the FP8 checkpoints are made;
/// the scales are what the weight is multiplied by to read it (`weight_scale_inv`).
fn to_fp8(t: &Tensor, [bo, bi]: [usize; 2]) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, cols) = t.dims2()?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (br, bc) = (rows.div_ceil(bo), cols.div_ceil(bi));
    let mut scales = vec![0f32; br * bc];
    for (i, x) in v.iter().enumerate() {
        let s = &mut scales[(i / cols / bo) * bc + (i % cols) / bi];
        *s = s.max(x.abs() / 448.0);
    }
    for s in &mut scales {
        if *s == 0.0 {
            *s = 1.0;
        }
    }
    let scaled: Vec<f32> = v.iter().enumerate().map(|(i, x)| x / scales[(i / cols / bo) * bc + (i % cols) / bi]).collect();
    let weight = Tensor::from_vec(scaled, (rows, cols), &Device::Cpu)?.to_dtype(DType::F8E4M3)?;
    Ok((weight, Tensor::from_vec(scales, (br, bc), &Device::Cpu)?))
}

fn save(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, path).map_err(|e| Error::WriteModel(format!("{}: {e}", path.display())))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
