//! `config.json` and `generation_config.json` as Hugging Face writes them, and the runtime
//! model configuration derived from them.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The architectures shardserve runs, by their `architectures` names.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"];

/// One token id or a list of them, as `eos_token_id` may be either.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json`, with Hugging Face's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 moves `rope_theta` and `rope_scaling` here.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// How the checkpoint's weights are quantized (`quant_method` `fp8` with
    /// `weight_block_size`, as Qwen's and DeepSeek's FP8 checkpoints ship).
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

fn default_max_position_embeddings() -> usize {
    2048
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

/// Why a config's architecture cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchitectureError {
    #[error("architecture {0:?} is not supported; supported: {list}", list = SUPPORTED_ARCHITECTURES.join(", "))]
    Unsupported(String),
    #[error("model_type {model_type:?} and architectures {class:?} name different models")]
    Disagree { model_type: String, class: String },
    #[error("the config names no model_type and no architectures; supported: {list}", list = SUPPORTED_ARCHITECTURES.join(", "))]
    Missing,
}

/// The decoder families shardserve implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen3,
    Qwen2,
    Llama,
    Mistral,
}

impl Architecture {
    const ALL: [Architecture; 4] = [Architecture::Qwen3, Architecture::Qwen2, Architecture::Llama, Architecture::Mistral];

    /// The architecture of a config's `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.model_type() == model_type)
    }

    /// The architecture of a model class's name (a config's `architectures` entry).
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }

    /// The architecture a config describes, by its `model_type` and the first of its
    /// `architectures`: each names a supported family, and they name the same one (transformers'
    /// Auto classes go by `model_type`; a config whose class says otherwise is refused rather
    /// than read as either). One of them alone decides. The model and its placement both read
    /// a config through this.
    pub fn detect(model_type: Option<&str>, class: Option<&str>) -> std::result::Result<Self, ArchitectureError> {
        let by_type =
            model_type.map(|t| Self::from_model_type(t).ok_or_else(|| ArchitectureError::Unsupported(t.to_string()))).transpose()?;
        let by_class = class.map(|c| Self::from_class_name(c).ok_or_else(|| ArchitectureError::Unsupported(c.to_string()))).transpose()?;
        match (by_type, by_class) {
            (Some(t), Some(c)) if t != c => {
                Err(ArchitectureError::Disagree { model_type: t.model_type().to_string(), class: c.hf_name().to_string() })
            }
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Err(ArchitectureError::Missing),
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
        }
    }

    /// The `architectures` name transformers uses.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
        }
    }

    /// The decoder layer class, accelerate's `no_split_module_classes`.
    pub fn decoder_layer_class(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "Qwen3DecoderLayer",
            Architecture::Qwen2 => "Qwen2DecoderLayer",
            Architecture::Llama => "LlamaDecoderLayer",
            Architecture::Mistral => "MistralDecoderLayer",
        }
    }
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// What the model code needs, with every Hugging Face default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always, others per `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias`, never for Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm on queries and keys.
    pub qk_norm: bool,
    /// The checkpoint's dtype as config.json states it (`torch_dtype` or `dtype`).
    pub checkpoint_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Tokens a request may span (prompt + generated); Mistral's sliding window caps it, since
    /// attention here is always full.
    pub max_total_tokens: usize,
    /// An FP8 checkpoint's `weight_block_size` (rows, columns): each `F8_E4M3` weight is scaled
    /// per block by its `weight_scale_inv`. None: not an FP8 checkpoint.
    pub fp8_block: Option<[usize; 2]>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config { message, .. } => Error::config(path.display().to_string(), message),
            other => other,
        })
    }

    /// Parses and validates the text of `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| Error::config("config.json", format!("malformed: {e}")))?;
        Self::from_hf(&raw)
    }

    /// Parses and validates `config.json` already read as JSON.
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let raw = HfConfig::deserialize(value).map_err(|e| Error::config("config.json", format!("malformed: {e}")))?;
        Self::from_hf(&raw)
    }

    /// Resolves Hugging Face's defaults and rejects what is not supported.
    pub fn from_hf(raw: &HfConfig) -> Result<Self> {
        let bad = |m: String| Error::config("config.json", m);
        let architecture = architecture_of(raw).map_err(bad)?;
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(bad("hidden_size, num_attention_heads and num_hidden_layers must be positive".into()));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(bad(format!(
                        "hidden_size ({}) is not divisible by num_attention_heads ({}) and head_dim is not set",
                        raw.hidden_size, raw.num_attention_heads
                    )));
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!("head_dim ({head_dim}) must be even for rotary embeddings")));
        }
        let act = raw.hidden_act.as_str();
        if act != "silu" && act != "swish" {
            return Err(bad(format!("hidden_act {act:?} is not supported (only silu)")));
        }
        let params = raw.rope_parameters.as_ref();
        let rope_theta = raw.rope_theta.or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64())).unwrap_or(10_000.0);
        let scaling = raw.rope_scaling.as_ref().or(params).filter(|v| !v.is_null());
        let rope_llama3 = match scaling {
            None => None,
            Some(s) => parse_rope_scaling(s, raw.max_position_embeddings).map_err(bad)?,
        };
        let fp8_block = match raw.quantization_config.as_ref().filter(|v| !v.is_null()) {
            None => None,
            Some(q) => Some(parse_fp8(q).map_err(bad)?),
        };
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2 hard-codes bias on q/k/v and none on o_proj; Mistral has none.
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
            _ => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        // Every supported config class defaults both to these values in transformers.
        let tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(false);
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        let mut max_total_tokens = raw.max_position_embeddings;
        if architecture == Architecture::Mistral && raw.use_sliding_window != Some(false) {
            if let Some(w) = raw.sliding_window {
                max_total_tokens = max_total_tokens.min(w);
            }
        }
        Ok(ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rope_llama3,
            rms_norm_eps,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            // Only Llama's modeling code reads mlp_bias.
            mlp_bias: raw.mlp_bias && architecture == Architecture::Llama,
            qk_norm: architecture == Architecture::Qwen3,
            checkpoint_dtype: raw.torch_dtype.clone().or_else(|| raw.dtype.clone()),
            bos_token_id: raw.bos_token_id.as_ref().and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            max_total_tokens,
            fp8_block,
        })
    }
}

/// The block size of an FP8 `quantization_config`; other quantization methods are refused.
fn parse_fp8(q: &serde_json::Value) -> std::result::Result<[usize; 2], String> {
    let method = q.get("quant_method").and_then(|v| v.as_str()).unwrap_or("<none>");
    if method != "fp8" {
        return Err(format!(
            "quantization_config.quant_method {method:?} is not supported (fp8 checkpoints are, and GGUF files with --gguf-file)"
        ));
    }
    if let Some(fmt) = q.get("fmt").and_then(|v| v.as_str()).filter(|f| *f != "e4m3") {
        return Err(format!("quantization_config.fmt {fmt:?} is not supported (only e4m3)"));
    }
    let block: Option<Vec<usize>> = q.get("weight_block_size").and_then(|v| serde_json::from_value(v.clone()).ok());
    match block.as_deref() {
        Some(&[rows, cols]) if rows > 0 && cols > 0 => Ok([rows, cols]),
        Some(other) => Err(format!("quantization_config.weight_block_size {other:?} must be two positive sizes")),
        None => Err("quantization_config: fp8 without weight_block_size (one scale per tensor) is not supported".into()),
    }
}

/// The architecture of a config ([`Architecture::detect`]).
fn architecture_of(raw: &HfConfig) -> std::result::Result<Architecture, String> {
    Architecture::detect(raw.model_type.as_deref(), raw.architectures.first().map(String::as_str)).map_err(|e| e.to_string())
}

fn parse_rope_scaling(s: &serde_json::Value, max_pos: usize) -> std::result::Result<Option<Llama3RopeScaling>, String> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &str| s.get(k).and_then(|v| v.as_f64()).ok_or_else(|| format!("rope_scaling.{k} is missing for rope_type llama3"));
            Ok(Some(Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: s
                    .get("original_max_position_embeddings")
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize)
                    .unwrap_or(max_pos),
            }))
        }
        other => Err(format!("rope_scaling type {other:?} is not supported (supported: default, llama3)")),
    }
}

/// `generation_config.json`: the defaults a request falls back on.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`; a missing file means no defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::config(path.display().to_string(), format!("malformed: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// The end-of-sequence ids: generation_config's, else config.json's.
    pub fn eos_ids(&self, model: &ModelConfig) -> Vec<u32> {
        match &self.eos_token_id {
            Some(ids) => ids.to_vec(),
            None => model.eos_token_ids.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN3: &str = r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":192,
        "num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,
        "vocab_size":512,"max_position_embeddings":1024,"rope_theta":1000000.0,"rms_norm_eps":1e-6,
        "tie_word_embeddings":true,"eos_token_id":0}"#;

    #[test]
    fn qwen3_head_dim_is_decoupled_and_qk_norm_on() {
        let c = ModelConfig::from_json(QWEN3).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!((c.head_dim, c.num_kv_heads), (32, 2));
        assert!(c.qk_norm && c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(c.eos_token_ids, vec![0]);
    }

    #[test]
    fn an_fp8_quantization_config_gives_its_block_and_other_methods_are_refused() {
        let with = |q: &str| {
            ModelConfig::from_json(&QWEN3.replace("\"eos_token_id\":0", &format!("\"eos_token_id\":0,\"quantization_config\":{q}")))
        };
        assert_eq!(ModelConfig::from_json(QWEN3).unwrap().fp8_block, None);
        let fp8 = with(r#"{"quant_method":"fp8","fmt":"e4m3","activation_scheme":"dynamic","weight_block_size":[128,128]}"#).unwrap();
        assert_eq!(fp8.fp8_block, Some([128, 128]));
        let err = |q: &str| with(q).unwrap_err().to_string();
        assert!(err(r#"{"quant_method":"awq","bits":4}"#).contains("quant_method \"awq\" is not supported"));
        assert!(err(r#"{"quant_method":"fp8","fmt":"e5m2","weight_block_size":[128,128]}"#).contains("fmt \"e5m2\""));
        assert!(err(r#"{"quant_method":"fp8"}"#).contains("without weight_block_size"));
        assert!(err(r#"{"quant_method":"fp8","weight_block_size":[0,128]}"#).contains("two positive sizes"));
    }

    #[test]
    fn unsupported_architecture_lists_the_supported_ones() {
        let text = QWEN3.replace("Qwen3ForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn model_type_decides_the_architecture_for_the_model_and_its_placement_alike() {
        // model_type alone decides; with architectures too, both must name the same model.
        let text = QWEN3.replace("{\"architectures\":[\"Qwen3ForCausalLM\"]", "{\"model_type\":\"llama\"");
        let c = ModelConfig::from_json(&text).unwrap();
        let shape = crate::placement::ModelShape::from_config_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!((c.architecture, shape.architecture), (Architecture::Llama, Architecture::Llama));
        let both = QWEN3.replace("{\"architectures\"", "{\"model_type\":\"llama\",\"architectures\"");
        let err = ModelConfig::from_json(&both).unwrap_err().to_string();
        assert!(err.contains("\"llama\"") && err.contains("Qwen3ForCausalLM") && err.contains("different"), "{err}");
        let err = crate::placement::ModelShape::from_config_json(&serde_json::from_str(&both).unwrap()).unwrap_err().to_string();
        assert!(err.contains("different"), "{err}");
        for a in Architecture::ALL {
            assert_eq!((Architecture::from_model_type(a.model_type()), Architecture::from_class_name(a.hf_name())), (Some(a), Some(a)));
        }
        let err = ModelConfig::from_json(&QWEN3.replace("{\"architectures\"", "{\"model_type\":\"gpt2\",\"architectures\"")).unwrap_err();
        assert!(err.to_string().contains("\"gpt2\""), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_eos_list() {
        let text = QWEN3.replace("Qwen3ForCausalLM", "Qwen2ForCausalLM").replace("\"eos_token_id\":0", "\"eos_token_id\":[5,7]");
        let c = ModelConfig::from_json(&text).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
    }

    #[test]
    fn bad_gqa_is_rejected() {
        let text = QWEN3.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        let err = ModelConfig::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_others_rejected() {
        let text = QWEN3.replace("Qwen3ForCausalLM", "LlamaForCausalLM").replace(
            "\"rope_theta\":1000000.0",
            r#""rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_llama3.unwrap().factor, 8.0);
        let yarn = text.replace("llama3", "yarn");
        let err = ModelConfig::from_json(&yarn).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}
