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

struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| (1.0 / cfg.rope_theta.powf(i as f64 / d as f64)) as f32)
            .collect();
        if let Some(s) = cfg.rope_llama3 {
            // transformers' `_compute_llama3_parameters`: long wavelengths are divided by the
            // factor, short ones kept, the band between interpolated.
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let freq = *f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen > low_wavelen { freq / s.factor } else { freq };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium {
                    let smooth =
                        (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                };
            }
        }
        Rope { inv_freq }
    }

    /// cos and sin for positions `start..start + len`, each (len, head_dim / 2).
    fn cos_sin(&self, start: usize, len: usize, dtype: DType, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb)
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    /// Without its bias: under tensor parallelism the bias is added once, after the sum.
    o_proj: Linear,
    o_bias: Option<Tensor>,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, split: &TpSplit, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, kv, d) = (split.heads.len(), split.kv_heads.len(), cfg.head_dim);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(candle_nn::rms_norm(d, cfg.rms_norm_eps, vb.pp("q_norm"))?),
                Some(candle_nn::rms_norm(d, cfg.rms_norm_eps, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            q_proj: linear(cfg.hidden_size, h * d, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: linear(cfg.hidden_size, kv * d, cfg.qkv_bias, vb.pp("k_proj"))?,
            v_proj: linear(cfg.hidden_size, kv * d, cfg.qkv_bias, vb.pp("v_proj"))?,
            o_proj: linear(h * d, cfg.hidden_size, false, vb.pp("o_proj"))?,
            o_bias: if cfg.o_bias { Some(vb.pp("o_proj").get(cfg.hidden_size, "bias")?) } else { None },
            q_norm,
            k_norm,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        offset: usize,
        cache: &mut Option<(Tensor, Tensor)>,
        group: Option<&dyn Collective>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((b, l, h, d))?;
        let k = self.k_proj.forward(x)?.reshape((b, l, kvh, d))?;
        let v = self.v_proj.forward(x)?.reshape((b, l, kvh, d))?;
        // Qwen3 normalises each head before the rotation.
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let scale = 1.0 / (d as f64).sqrt();
        // Decode steps on a CPU use candle's CPU flash attention; a prefill is faster through
        // plain matmuls there (measured: a 128-token prefill ~15% faster, 400 tokens ~20%).
        let ctx = if x.device().is_cpu() && l == 1 {
            // candle's CPU flash attention takes (B, S, H, D), handles grouped KV heads and the
            // causal mask itself, and returns (B, H, S, D).
            let q = q.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?;
            let k = k.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?;
            let v = v.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?;
            candle_nn::attention::flash_attn::<f32>(
                &q,
                &k,
                &v,
                scale as f32,
                candle_nn::attention::AttnMask::causal_with_offset(offset),
                None,
                None,
            )?
            .to_dtype(x.dtype())?
        } else {
            let k = repeat_kv(&k, h / kvh)?;
            let v = repeat_kv(&v, h / kvh)?;
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if l > 1 {
                scores = scores.broadcast_add(&causal_mask(l, offset, scores.dtype(), x.device())?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(v.dtype())?;
            probs.matmul(&v)?
        };
        let ctx = ctx.transpose(1, 2)?.reshape((b, l, h * d))?;
        row_parallel_out(self.o_proj.forward(&ctx)?, self.o_bias.as_ref(), group)
    }
}

/// The end of a row-parallel layer: the ranks' partial products summed, then the bias once.
fn row_parallel_out(x: Tensor, bias: Option<&Tensor>, group: Option<&dyn Collective>) -> candle_core::Result<Tensor> {
    let x = match group {
        Some(g) => g.all_reduce_sum(&x)?,
        None => x,
    };
    match bias {
        Some(b) => x.broadcast_add(b),
        None => Ok(x),
    }
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return x.contiguous();
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))
}

fn causal_mask(l: usize, offset: usize, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let total = l + offset;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..total).map(move |j| if j > i + offset { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (l, total), dev)?.to_dtype(dtype)
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    down_bias: Option<Tensor>,
}

impl Mlp {
    fn new(cfg: &ModelConfig, split: &TpSplit, vb: VarBuilder) -> candle_core::Result<Self> {
        let (hs, is) = (cfg.hidden_size, split.intermediate.len());
        Ok(Mlp {
            gate_proj: linear(hs, is, cfg.mlp_bias, vb.pp("gate_proj"))?,
            up_proj: linear(hs, is, cfg.mlp_bias, vb.pp("up_proj"))?,
            down_proj: linear(is, hs, false, vb.pp("down_proj"))?,
            down_bias: if cfg.mlp_bias { Some(vb.pp("down_proj").get(hs, "bias")?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor, group: Option<&dyn Collective>) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let down = self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)?;
        row_parallel_out(down, self.down_bias.as_ref(), group)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, split: &TpSplit, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::new(cfg, split, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, split, vb.pp("mlp"))?,
            input_layernorm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        offset: usize,
        cache: &mut Option<(Tensor, Tensor)>,
        group: Option<&dyn Collective>,
    ) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, offset, cache, group)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?, group)?;
        x + h
    }
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

/// Softmax over `logits` then log, as f32 values.
pub fn log_softmax(logits: &Tensor) -> Result<Vec<f32>> {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(Error::Forward)
}
