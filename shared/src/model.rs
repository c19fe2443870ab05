//! The sharded decoder: one pipeline stage of a Qwen3, Qwen2, Llama or Mistral model — a
//! contiguous range of decoder layers, plus the embedding on the first stage and the final norm
//! and lm_head on the last — reading from the checkpoint only the tensors it owns.

use crate::collective::{tp_split, Collective, TpRank, TpSplit};
use crate::config::ModelConfig;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::weights::{self, LoadedTensors};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, RmsNorm, VarBuilder};
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

mod attention;
pub mod kv;
mod layers;
mod qskinny;
mod shapes;
mod skinny;

pub use kv::KvPool;
use layers::{DecoderLayer, Linear, Rope};
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
    /// The linear weights quantized at load to this type (none: as the compute dtype).
    pub quantize: Option<crate::quant::Quantize>,
    /// A GGUF checkpoint's block-type weights dequantized at load to the compute dtype (else
    /// they stay in their type).
    pub dequantize: bool,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn whole(cfg: &ModelConfig) -> Self {
        StageSpec { layers: 0..cfg.num_layers, first: true, last: true, tp: TpRank::default(), quantize: None, dequantize: false }
    }

    /// Stage `stage` of `num_stages` holding `layers`.
    pub fn new(layers: Range<usize>, stage: usize, num_stages: usize) -> Self {
        StageSpec { layers, first: stage == 0, last: stage + 1 == num_stages, tp: TpRank::default(), quantize: None, dequantize: false }
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
            return rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| self.layers.contains(&i));
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

/// Checks, before anything loads, that every rank of a `tp`-way split of `cfg` can quantize its
/// slice of every projection to `q` (no row cut through a block).
pub fn check_quantizable(cfg: &ModelConfig, tp: usize, q: crate::quant::Quantize) -> Result<()> {
    for rank in 0..tp.max(1) {
        let tp = TpRank { rank, size: tp.max(1) };
        let split = tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp).map_err(Error::LoadWeights)?;
        let spec = StageSpec::whole(cfg).with_tp(tp);
        for (name, mut shape) in checkpoint_shapes(cfg).into_iter().filter(|(n, _)| crate::quant::is_linear_weight(n)) {
            if let Some((dim, r)) = spec.slice_of(&split, cfg.head_dim, &name, &shape) {
                shape[dim] = r.len();
            }
            q.check(&name, &shape).map_err(|e| match e {
                Error::LoadWeights(m) if tp.size > 1 => Error::LoadWeights(format!("{m} (tensor-parallel rank {rank} of {})", tp.size)),
                e => e,
            })?;
        }
    }
    Ok(())
}

/// The dtype `device` computes `cfg` in for the `requested` choice (see [`Dtype::resolve`]).
pub fn resolve_dtype(requested: Dtype, cfg: &ModelConfig, device: &Device) -> DType {
    requested.resolve(cfg.checkpoint_dtype.as_deref(), !device.is_cpu())
}

/// What enters a stage for one sequence ([`Shard::forward`]).
#[derive(Debug)]
pub enum StageInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [u32]),
    /// Hidden states from the previous stage, `(1, tokens, hidden)` or `(tokens, hidden)`.
    Hidden(Tensor),
}

/// What leaves a stage for one sequence.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states for the next stage, (1, tokens, hidden).
    Hidden(Tensor),
    /// Logits at the last position, f32, (vocab,).
    Logits(Tensor),
}

/// What enters a stage for a whole step: the rows of every sequence, in the step's order.
#[derive(Debug)]
pub enum BatchInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [u32]),
    /// Hidden states from the previous stage, `(rows, hidden)`.
    Hidden(Tensor),
}

/// What leaves a stage for a whole step.
#[derive(Debug)]
pub enum BatchOutput {
    /// Hidden states for the next stage, `(rows, hidden)`.
    Hidden(Tensor),
    /// Last stage: f32 logits at the last position of each sequence that asked for them, in
    /// step order, `(sequences, vocab)`.
    Logits(Tensor),
    /// Last stage, when some sequences asked for embeddings: the logits as above, and the f32
    /// final-norm hidden states of every row of those sequences, in step order,
    /// `(rows, hidden)`.
    Embedded { logits: Tensor, hidden: Tensor },
}

/// One sequence of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep {
    /// The sequence, as its pool knows it.
    pub id: u64,
    /// Tokens this step feeds it (at its next positions).
    pub tokens: usize,
    /// Last stage: whether to produce logits for it (a non-final prefill chunk does not).
    pub logits: bool,
    /// Last stage: whether to give the final-norm hidden states of its rows (an embedding).
    pub embed: bool,
}

/// Where each sequence's rows lie within a step, and where its tokens lie in the pool.
pub(crate) struct Batch {
    pub(crate) seqs: Vec<BatchSeq>,
}

pub(crate) struct BatchSeq {
    pub(crate) id: u64,
    /// First row of this sequence in the step.
    pub(crate) offset: usize,
    /// Rows (tokens) it has in the step.
    pub(crate) len: usize,
    /// Position of its first row.
    pub(crate) start: usize,
    /// Pool slots of its positions `0..start + len` (the same in every layer).
    pub(crate) slots: Vec<u32>,
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
    /// RoPE's cos and sin of every position, built once at load.
    rope: (Tensor, Tensor),
    /// Key/value heads this rank holds per layer.
    kv_heads: usize,
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
    /// Loads the stage `spec` of the checkpoint at `path` (a safetensors folder, or a GGUF
    /// file), reading only the tensors it owns.
    pub fn load(cfg: &ModelConfig, spec: StageSpec, path: &Path, dtype: DType, device: &Device) -> Result<Self> {
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
        let loaded: LoadedTensors = if path.is_file() && path.to_str().is_some_and(crate::gguf::is_gguf_name) {
            if let Some(q) = spec.quantize {
                return Err(Error::LoadWeights(format!(
                    "--quantize {q} applies to safetensors checkpoints; {} is already quantized (--dequantize runs it at the compute dtype)",
                    path.display()
                )));
            }
            let gguf = crate::gguf::Gguf::open(path)?;
            gguf.check_tp(cfg, spec.tp.size)?;
            gguf.load(cfg, &|n| spec.owns(cfg, n), &slicer, dtype, spec.dequantize, device)?
        } else {
            weights::load_quantized(path, &|n| spec.owns(cfg, n), &slicer, Some(dtype), spec.quantize, cfg.fp8_block, device)?
        };
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
        let mut tensors = random_tensors(&wanted, dtype, device, seed).map_err(|e| Error::LoadWeights(e.to_string()))?;
        let mut quantized = crate::quant::QuantizedWeights::new();
        if let Some(q) = spec.quantize {
            let names: Vec<String> = tensors.keys().filter(|n| crate::quant::is_linear_weight(n)).cloned().collect();
            for name in names {
                let t = tensors.remove(&name).expect("listed above");
                quantized.insert(name.clone(), Arc::new(q.quantize(&name, &t)?));
            }
        }
        let loaded = LoadedTensors { tensors, quantized, files: Default::default() };
        Self::build(cfg, spec, &split, loaded, dtype, device)
    }

    fn build(cfg: &ModelConfig, spec: StageSpec, split: &TpSplit, loaded: LoadedTensors, dtype: DType, device: &Device) -> Result<Self> {
        let names = loaded.tensors.keys().chain(loaded.quantized.keys()).cloned().collect();
        let report = LoadReport { tensors: names, files: loaded.files.clone(), bytes: loaded.bytes() };
        let mut quantized = loaded.quantized;
        let vb = VarBuilder::from_tensors(loaded.tensors, dtype, device);
        let wrap = |e: candle_core::Error| Error::LoadWeights(e.to_string());
        let embed_weight = |vb: &VarBuilder| vb.pp("model.embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight").map_err(wrap);
        let embed = if spec.first { Some(Embedding::new(embed_weight(&vb)?, cfg.hidden_size)) } else { None };
        let layers = spec
            .layers
            .clone()
            .map(|i| DecoderLayer::new(cfg, split, vb.pp("model.layers").pp(i), &mut quantized).map_err(wrap))
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if spec.has_head() {
            let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm")).map_err(wrap)?;
            let head = if cfg.tie_word_embeddings {
                Linear::new(embed_weight(&vb)?, None)
            } else {
                Linear::new(vb.pp("lm_head").get((cfg.vocab_size, cfg.hidden_size), "weight").map_err(wrap)?, None)
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
            rope: Rope::new(cfg).table(cfg.max_position_embeddings, dtype, device).map_err(wrap)?,
            kv_heads: split.kv_heads.len(),
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

    /// A KV pool of `blocks` blocks of `block_size` tokens for this shard's layers, allocated
    /// now on its device.
    pub fn new_pool(&self, blocks: usize, block_size: usize) -> Result<KvPool> {
        KvPool::new(self.layers.len(), self.kv_heads, self.cfg.head_dim, block_size, blocks, self.dtype, &self.device)
    }

    /// Bytes one token's keys and values take on this shard.
    pub fn kv_bytes_per_token(&self) -> u64 {
        kv::bytes_per_token(self.layers.len(), self.kv_heads, self.cfg.head_dim, self.dtype)
    }

    /// Checks the token ids a first stage would embed.
    pub fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Sequence("a step must carry at least one token".into()));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Sequence(format!("token id {bad} is outside the vocabulary ({})", self.cfg.vocab_size)));
        }
        Ok(())
    }

    /// Checks that positions `start..start + tokens` exist in this model.
    pub fn check_positions(&self, start: usize, tokens: usize) -> Result<()> {
        if start + tokens > self.cfg.max_position_embeddings {
            return Err(Error::Sequence(format!(
                "position {} is past max_position_embeddings ({})",
                start + tokens,
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Runs this stage for one sequence `id` of `pool` (held from now on if it was not):
    /// `input` holds the tokens at its next positions.
    pub fn forward(&self, pool: &mut KvPool, id: u64, input: StageInput<'_>) -> Result<StageOutput> {
        pool.insert(id);
        let (batch_input, tokens) = match input {
            StageInput::Tokens(ids) => (BatchInput::Tokens(ids), ids.len()),
            StageInput::Hidden(h) => {
                let h = if h.rank() == 3 { h.squeeze(0).map_err(Error::Forward)? } else { h };
                let n = h.dim(0).map_err(Error::Forward)?;
                (BatchInput::Hidden(h), n)
            }
        };
        let seq = SeqStep { id, tokens, logits: true, embed: false };
        match self.forward_batch(pool, &[seq], batch_input)? {
            BatchOutput::Hidden(h) => Ok(StageOutput::Hidden(h.unsqueeze(0).map_err(Error::Forward)?)),
            BatchOutput::Logits(l) | BatchOutput::Embedded { logits: l, .. } => {
                Ok(StageOutput::Logits(l.flatten_all().map_err(Error::Forward)?))
            }
        }
    }

    /// Runs this stage for every sequence of a step at once: each linear layer is one matmul
    /// over all rows, attention runs per sequence against its own blocks. The sequences must be
    /// held by `pool`; they get the blocks their new tokens need (all or none: a pool too full
    /// fails the step with [`Error::KvFull`] before anything changes).
    pub fn forward_batch(&self, pool: &mut KvPool, seqs: &[SeqStep], input: BatchInput<'_>) -> Result<BatchOutput> {
        let total: usize = seqs.iter().map(|s| s.tokens).sum();
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens == 0) {
            return Err(Error::Sequence("a step must carry at least one token for each sequence".into()));
        }
        let x = match (input, &self.embed) {
            (BatchInput::Tokens(ids), Some(embed)) => {
                self.check_tokens(ids)?;
                if ids.len() != total {
                    return Err(Error::Sequence(format!("the step carries {} tokens for sequences of {total}", ids.len())));
                }
                let ids = Tensor::new(ids, &self.device).map_err(Error::Forward)?;
                embed.forward(&ids).map_err(Error::Forward)?
            }
            (BatchInput::Hidden(h), None) => {
                let dims = h.dims().to_vec();
                if dims.len() != 2 || dims[1] != self.cfg.hidden_size || dims[0] != total {
                    return Err(Error::Sequence(format!(
                        "hidden states of shape {dims:?} do not fit {total} rows of hidden_size {}",
                        self.cfg.hidden_size
                    )));
                }
                h.to_device(&self.device).and_then(|h| h.to_dtype(self.dtype)).map_err(Error::Forward)?
            }
            (BatchInput::Tokens(_), None) => return Err(Error::Sequence("this stage takes hidden states, not tokens".into())),
            (BatchInput::Hidden(_), Some(_)) => return Err(Error::Sequence("this stage takes tokens, not hidden states".into())),
        };
        let mut starts = Vec::with_capacity(seqs.len());
        for s in seqs {
            let start = pool.len_of(s.id).ok_or_else(|| Error::Sequence(format!("sequence {} is not held here", s.id)))?;
            self.check_positions(start, s.tokens)?;
            starts.push(start);
        }
        let needed: usize = seqs.iter().map(|s| pool.blocks_needed(s.id, s.tokens)).sum();
        if needed > pool.blocks_free() {
            return Err(Error::KvFull { needed, free: pool.blocks_free(), total: pool.blocks_total() });
        }
        for s in seqs {
            pool.grow(s.id, s.tokens)?;
        }
        let mut offset = 0;
        let mut positions = Vec::with_capacity(total);
        let batch = Batch {
            seqs: seqs
                .iter()
                .zip(&starts)
                .map(|(s, &start)| {
                    positions.extend(start as u32..(start + s.tokens) as u32);
                    let b = BatchSeq { id: s.id, offset, len: s.tokens, start, slots: pool.slots(s.id, start + s.tokens) };
                    offset += s.tokens;
                    b
                })
                .collect(),
        };
        let out = self.run_layers(x, &positions, &batch, seqs, pool).map_err(Error::Forward)?;
        for s in seqs {
            pool.advance(s.id, s.tokens);
        }
        Ok(out)
    }

    fn run_layers(
        &self,
        mut x: Tensor,
        positions: &[u32],
        batch: &Batch,
        seqs: &[SeqStep],
        pool: &KvPool,
    ) -> candle_core::Result<BatchOutput> {
        let pos = Tensor::new(positions, &self.device)?;
        let cos = self.rope.0.index_select(&pos, 0)?;
        let sin = self.rope.1.index_select(&pos, 0)?;
        let group = self.group.as_deref();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, batch, pool, i, group)?;
        }
        match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) => {
                let rows: Vec<u32> =
                    batch.seqs.iter().zip(seqs).filter(|(_, s)| s.logits).map(|(b, _)| (b.offset + b.len - 1) as u32).collect();
                let logits = if rows.is_empty() {
                    Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?
                } else {
                    let last = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
                    head.forward(&norm.forward(&last)?)?.to_dtype(DType::F32)?
                };
                let embed: Vec<u32> = batch
                    .seqs
                    .iter()
                    .zip(seqs)
                    .filter(|(_, s)| s.embed)
                    .flat_map(|(b, _)| (b.offset as u32)..(b.offset + b.len) as u32)
                    .collect();
                if embed.is_empty() {
                    return Ok(BatchOutput::Logits(logits));
                }
                let rows = x.index_select(&Tensor::new(embed.as_slice(), &self.device)?, 0)?;
                let hidden = norm.forward(&rows)?.to_dtype(DType::F32)?;
                Ok(BatchOutput::Embedded { logits, hidden })
            }
            _ => Ok(BatchOutput::Hidden(x)),
        }
    }
}

/// The `k` largest of `values` (most likely first; ties by lower id) and their values.
pub fn top_k(values: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(values.len());
    if k == 0 {
        return (Vec::new(), Vec::new());
    }
    let by = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by);
    idx.truncate(k);
    idx.sort_by(by);
    let vals = idx.iter().map(|&i| values[i as usize]).collect();
    (idx, vals)
}

/// Softmax over `logits` then log, as f32 values.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    candle_nn::ops::log_softmax(logits, D::Minus1).and_then(|t| t.to_vec1::<f32>()).map_err(Error::Forward)
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_gives_the_largest_first_ties_by_lower_id() {
        let v = [0.1, -2.0, 3.0, 0.1, 2.5];
        assert_eq!(top_k(&v, 3), (vec![2, 4, 0], vec![3.0, 2.5, 0.1]));
        assert_eq!(top_k(&v, 0), (vec![], vec![]));
        assert_eq!(top_k(&v, 9).0, vec![2, 4, 0, 3, 1]);
    }
}
