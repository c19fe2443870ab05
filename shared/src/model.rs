//! The sharded decoder: one pipeline stage of a Qwen3, Qwen2, Llama or Mistral model — a
//! contiguous range of decoder layers, plus the embedding on the first stage and the final norm
//! and lm_head on the last — reading from the checkpoint only the tensors it owns.

use crate::collective::{tp_split, Collective, TpRank, TpSplit};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::{self, LoadedTensors};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

mod layers;
mod shapes;

use layers::{DecoderLayer, Rope};
pub use shapes::{checkpoint_shapes, random_tensors};

/// Which part of the model a stage holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    /// Decoder layers, by index.
    pub layers: Range<usize>,
    /// Holds the token embedding (and takes token ids as input).
    pub first: bool,
    /// Holds the final norm and lm_head (and produces logits).
    pub last: bool,
    /// The tensor-parallel rank: its slice of every layer. Only rank 0 of the last stage holds
    /// the final norm and lm_head (it alone samples); the embedding is replicated.
    pub tp: TpRank,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn whole(cfg: &ModelConfig) -> Self {
        StageSpec {
            layers: 0..cfg.num_layers,
            first: true,
            last: true,
            tp: TpRank::default(),
        }
    }

    /// Stage `stage` of `num_stages` holding `layers`.
    pub fn new(layers: Range<usize>, stage: usize, num_stages: usize) -> Self {
        StageSpec {
            layers,
            first: stage == 0,
            last: stage + 1 == num_stages,
            tp: TpRank::default(),
        }
    }

    /// The same stage as rank `tp.rank` of a tensor-parallel group.
    pub fn with_tp(mut self, tp: TpRank) -> Self {
        self.tp = tp;
        self
    }

    /// Whether this rank holds the final norm and lm_head.
    pub fn has_head(&self) -> bool {
        self.last && self.tp.is_leader()
    }

    /// Whether the checkpoint tensor `name` belongs to this stage.
    pub fn owns(&self, cfg: &ModelConfig, name: &str) -> bool {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            return rest
                .split('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| self.layers.contains(&i));
        }
        if name.starts_with("model.embed_tokens.") {
            // With tied embeddings the last stage's lm_head is the embedding matrix.
            return self.first || (self.has_head() && cfg.tie_word_embeddings);
        }
        if name.starts_with("model.norm.") {
            return self.has_head();
        }
        if name.starts_with("lm_head.") {
            return self.has_head() && !cfg.tie_word_embeddings;
        }
        false
    }

    /// The part of `name` (shaped `shape` on disk) this rank reads: q/k/v and gate/up split by
    /// rows (column-parallel), o_proj and down_proj by columns (row-parallel); everything else
    /// whole.
    pub fn slice_of(&self, split: &TpSplit, head_dim: usize, name: &str, shape: &[usize]) -> Option<(usize, Range<usize>)> {
        if self.tp.size <= 1 {
            return None;
        }
        let scaled = |r: &Range<usize>, by: usize| r.start * by..r.end * by;
        let part = name.strip_prefix("model.layers.")?.split_once('.')?.1;
        let (module, param) = part.rsplit_once('.')?;
        let rows = |r: Range<usize>| Some((0, r));
        match (module, param) {
            ("self_attn.q_proj", _) => rows(scaled(&split.heads, head_dim)),
            ("self_attn.k_proj" | "self_attn.v_proj", _) => rows(scaled(&split.kv_heads, head_dim)),
            ("self_attn.o_proj", "weight") if shape.len() == 2 => Some((1, scaled(&split.heads, head_dim))),
            ("mlp.gate_proj" | "mlp.up_proj", _) => rows(split.intermediate.clone()),
            ("mlp.down_proj", "weight") if shape.len() == 2 => Some((1, split.intermediate.clone())),
            _ => None,
        }
    }
}

/// Picks the compute dtype: `auto` keeps the checkpoint's dtype on GPU and uses f32 on CPU,
/// where bf16/f16 matmuls are an order of magnitude slower.
pub fn resolve_dtype(requested: &str, cfg: &ModelConfig, device: &Device) -> Result<DType> {
    match requested {
        "" | "auto" => {
            if device.is_cpu() {
                return Ok(DType::F32);
            }
            Ok(match cfg.checkpoint_dtype.as_deref() {
                Some("bfloat16") => DType::BF16,
                Some("float16") => DType::F16,
                _ => DType::F32,
            })
        }
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::config(
            "dtype",
            format!("unknown dtype {other:?} (expected auto, f32, bf16 or f16)"),
        )),
    }
}

/// Per-sequence attention cache of one stage: keys and values of every layer it holds,
/// shaped (1, kv_heads, seq, head_dim).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| ((k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()) as u64)
            .sum()
    }
}

/// What enters a stage.
#[derive(Debug)]
pub enum StageInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [u32]),
    /// Hidden states from the previous stage, (1, tokens, hidden).
    Hidden(Tensor),
}

/// What leaves a stage.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states for the next stage, (1, tokens, hidden).
    Hidden(Tensor),
    /// Logits at the last position, f32, (vocab,).
    Logits(Tensor),
}

/// What a shard read from the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensor names read.
    pub tensors: BTreeSet<String>,
    /// Checkpoint files opened.
    pub files: BTreeSet<String>,
    /// Bytes of weights held.
    pub bytes: u64,
}

/// One pipeline stage of a decoder-only model, ready to run.
pub struct Shard {
    cfg: ModelConfig,
    spec: StageSpec,
    embed: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rope: Rope,
    device: Device,
    dtype: DType,
    report: LoadReport,
    /// The all-reduce of this shard's tensor-parallel group (none without tensor parallelism).
    group: Option<Arc<dyn Collective>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("architecture", &self.cfg.architecture)
            .field("spec", &self.spec)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Loads the stage `spec` of the checkpoint in `dir`, reading only the tensors it owns.
    pub fn load(cfg: &ModelConfig, spec: StageSpec, dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if spec.layers.end > cfg.num_layers || spec.layers.start > spec.layers.end {
            return Err(Error::LoadWeights(format!(
                "layer range {}..{} is outside the model's {} layers",
                spec.layers.start, spec.layers.end, cfg.num_layers
            )));
        }
        if dtype == DType::F64 {
            // Nothing in the serving path is written for f64, and no checkpoint ships it.
            return Err(Error::LoadWeights("f64 is not supported; use f32, bf16 or f16".into()));
        }
        let split = tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, spec.tp).map_err(Error::LoadWeights)?;
        let slicer = |name: &str, shape: &[usize]| spec.slice_of(&split, cfg.head_dim, name, shape);
        let loaded: LoadedTensors = weights::load(dir, &|n| spec.owns(cfg, n), &slicer, Some(dtype), device)?;
        Self::build(cfg, spec, &split, loaded, dtype, device)
    }

    /// The stage `spec` with random weights made on `device` (normal, std 0.02; norms 1), for
    /// benchmarks of model shapes whose checkpoints would not fit on disk. Seeded: a tensor's
    /// values depend on the seed and its name (for one kind of device).
    pub fn random(cfg: &ModelConfig, spec: StageSpec, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        if spec.layers.end > cfg.num_layers || spec.layers.start > spec.layers.end {
            return Err(Error::LoadWeights(format!(
                "layer range {}..{} is outside the model's {} layers",
                spec.layers.start, spec.layers.end, cfg.num_layers
            )));
        }
        let split = tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, spec.tp).map_err(Error::LoadWeights)?;
        let wanted: Vec<(String, Vec<usize>)> = checkpoint_shapes(cfg)
            .into_iter()
            .filter(|(n, _)| spec.owns(cfg, n))
            .map(|(n, mut shape)| {
                if let Some((dim, r)) = spec.slice_of(&split, cfg.head_dim, &n, &shape) {
                    shape[dim] = r.len();
                }
                (n, shape)
            })
            .collect();
        let tensors = random_tensors(&wanted, dtype, device, seed).map_err(|e| Error::LoadWeights(e.to_string()))?;
        let loaded = LoadedTensors { tensors, files: Default::default() };
        Self::build(cfg, spec, &split, loaded, dtype, device)
    }

    fn build(cfg: &ModelConfig, spec: StageSpec, split: &TpSplit, loaded: LoadedTensors, dtype: DType, device: &Device) -> Result<Self> {
        let report = LoadReport {
            tensors: loaded.tensors.keys().cloned().collect(),
            files: loaded.files.clone(),
            bytes: loaded.bytes(),
        };
        let vb = VarBuilder::from_tensors(loaded.tensors, dtype, device);
        let wrap = |e: candle_core::Error| Error::LoadWeights(e.to_string());
        let embed_weight = |vb: &VarBuilder| {
            vb.pp("model.embed_tokens")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")
                .map_err(wrap)
        };
        let embed = if spec.first {
            Some(Embedding::new(embed_weight(&vb)?, cfg.hidden_size))
        } else {
            None
        };
        let layers = spec
            .layers
            .clone()
            .map(|i| DecoderLayer::new(cfg, split, vb.pp("model.layers").pp(i)).map_err(wrap))
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if spec.has_head() {
            let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm")).map_err(wrap)?;
            let head = if cfg.tie_word_embeddings {
                Linear::new(embed_weight(&vb)?, None)
            } else {
                candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head")).map_err(wrap)?
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        Ok(Shard {
            cfg: cfg.clone(),
            spec,
            embed,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            device: device.clone(),
            dtype,
            report,
            group: None,
        })
    }

    /// Joins this shard to its tensor-parallel group; every row-parallel layer sums over it.
    pub fn set_group(&mut self, group: Arc<dyn Collective>) {
        self.group = Some(group);
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The part of the model this shard holds.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What was read from the checkpoint.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Runs this stage for one sequence: `input` holds the tokens at positions
    /// `cache.len()..`, and the cache grows by as many.
    pub fn forward(&self, input: StageInput<'_>, cache: &mut KvCache) -> Result<StageOutput> {
        let offset = cache.len;
        let x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => {
                if ids.is_empty() {
                    return Err(Error::Sequence("a step must carry at least one token".into()));
                }
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                    return Err(Error::Sequence(format!(
                        "token id {bad} is outside the vocabulary ({})",
                        self.cfg.vocab_size
                    )));
                }
                let ids = Tensor::new(ids, &self.device).and_then(|t| t.unsqueeze(0));
                ids.and_then(|ids| embed.forward(&ids)).map_err(Error::Forward)?
            }
            (StageInput::Hidden(h), None) => {
                let dims = h.dims().to_vec();
                if dims.len() != 3 || dims[0] != 1 || dims[2] != self.cfg.hidden_size || dims[1] == 0 {
                    return Err(Error::Sequence(format!(
                        "hidden states of shape {dims:?} do not fit hidden_size {}",
                        self.cfg.hidden_size
                    )));
                }
                h.to_device(&self.device)
                    .and_then(|h| h.to_dtype(self.dtype))
                    .map_err(Error::Forward)?
            }
            (StageInput::Tokens(_), None) => {
                return Err(Error::Sequence("this stage takes hidden states, not tokens".into()))
            }
            (StageInput::Hidden(_), Some(_)) => {
                return Err(Error::Sequence("this stage takes tokens, not hidden states".into()))
            }
        };
        let l = x.dim(1).map_err(Error::Forward)?;
        if offset + l > self.cfg.max_position_embeddings {
            return Err(Error::Sequence(format!(
                "position {} is past max_position_embeddings ({})",
                offset + l,
                self.cfg.max_position_embeddings
            )));
        }
        let out = self.run_layers(x, offset, cache).map_err(Error::Forward)?;
        cache.len = offset + l;
        Ok(out)
    }

    fn run_layers(&self, mut x: Tensor, offset: usize, cache: &mut KvCache) -> candle_core::Result<StageOutput> {
        let l = x.dim(1)?;
        let (cos, sin) = self.rope.cos_sin(offset, l, self.dtype, &self.device)?;
        let group = self.group.as_deref();
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, offset, kv, group)?;
        }
        match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) => {
                let last = x.narrow(1, l - 1, 1)?;
                let logits = head.forward(&norm.forward(&last)?)?;
                Ok(StageOutput::Logits(logits.to_dtype(DType::F32)?.flatten_all()?))
            }
            _ => Ok(StageOutput::Hidden(x)),
        }
    }
}

/// Softmax over `logits` then log, as f32 values.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(Error::Forward)
}
