//! `shardctl dev`: developer tools — tiny random checkpoints in the exact HF layout.

use anyhow::bail;
use shardserve::config::Architecture;
use shardserve::tiny::{self, TinySpec};
use std::path::PathBuf;

/// Developer tools.
#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Write a random-weight checkpoint (config, safetensors, trained BPE tokenizer).
    TinyModel(TinyModelArgs),
}

/// Arguments of `shardctl dev tiny-model`.
#[derive(Debug, Clone, clap::Args)]
pub struct TinyModelArgs {
    /// Architecture: qwen3 or llama.
    #[arg(long, default_value = "qwen3")]
    pub arch: String,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype on disk: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Number of safetensors files (more than 1 writes a sharded index).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP intermediate size.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (GQA).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension (Qwen3 decouples it from hidden / heads).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Target vocabulary size of the trained tokenizer.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// max_position_embeddings.
    #[arg(long)]
    pub max_position_embeddings: Option<usize>,
    /// Tie lm_head to the embedding (true/false; default: qwen3 true, llama false).
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl TryFrom<&TinyModelArgs> for TinySpec {
    type Error = anyhow::Error;

    fn try_from(a: &TinyModelArgs) -> anyhow::Result<Self> {
        let arch = match a.arch.as_str() {
            "qwen3" => Architecture::Qwen3,
            "llama" => Architecture::Llama,
            other => bail!("--arch {other:?}: expected qwen3 or llama"),
        };
        let mut s = TinySpec::new(arch);
        s.dtype = match a.dtype.as_str() {
            "f32" | "float32" => candle_core::DType::F32,
            "bf16" | "bfloat16" => candle_core::DType::BF16,
            "f16" | "float16" => candle_core::DType::F16,
            other => bail!("--dtype {other:?}: expected f32, bf16 or f16"),
        };
        if a.shards == 0 {
            bail!("--shards must be at least 1");
        }
        s.shards = a.shards;
        s.seed = a.seed;
        if let Some(v) = a.layers {
            s.num_layers = v;
        }
        if let Some(v) = a.hidden {
            s.hidden_size = v;
            if a.head_dim.is_none() && arch == Architecture::Llama {
                s.head_dim = v / a.heads.unwrap_or(s.num_heads).max(1);
            }
        }
        if let Some(v) = a.intermediate {
            s.intermediate_size = v;
        }
        if let Some(v) = a.heads {
            s.num_heads = v;
            if a.head_dim.is_none() && arch == Architecture::Llama {
                s.head_dim = s.hidden_size / v.max(1);
            }
        }
        if let Some(v) = a.kv_heads {
            s.num_kv_heads = v;
        }
        if let Some(v) = a.head_dim {
            s.head_dim = v;
        }
        if let Some(v) = a.vocab {
            if v < 300 {
                bail!("--vocab {v}: a byte-level BPE needs at least 300 tokens (256 bytes + specials + merges)");
            }
            s.vocab_size = v;
        }
        if let Some(v) = a.max_position_embeddings {
            s.max_position_embeddings = v;
        }
        if let Some(v) = a.tie_embeddings {
            s.tie_word_embeddings = v;
        }
        for (name, v) in [("layers", s.num_layers), ("hidden", s.hidden_size), ("intermediate", s.intermediate_size), ("heads", s.num_heads), ("kv-heads", s.num_kv_heads), ("head-dim", s.head_dim), ("max-position-embeddings", s.max_position_embeddings)] {
            if v == 0 {
                bail!("--{name} must be at least 1");
            }
        }
        Ok(s)
    }
}

/// `shardctl dev ...`.
pub fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::TinyModel(a) => {
            let spec = TinySpec::try_from(&a)?;
            tiny::write(&a.out, &spec)?;
            println!("wrote {} ({} {} layers, {:?}, {} file(s))", a.out.display(), a.arch, spec.num_layers, spec.dtype, spec.shards);
            Ok(())
        }
    }
}
