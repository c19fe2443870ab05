//! The layers of the decoder: rotary embedding, attention (grouped KV heads, optional q/k norm
//! and biases, keys and values in the stage's block pool), the gated MLP, and the decoder layer around them. Under tensor
//! parallelism each holds its rank's heads and intermediate columns, and the row-parallel
//! projections sum over the group.

use super::attention::{causal_softmax_cpu, cpu_f32 as cpu_f32_storage, padded_decode, paged_decode_cpu, slice_of, DecodeRow};
use super::kv::KvPool;
use super::Batch;
use super::{qskinny, skinny};
use crate::collective::{Collective, TpSplit};
use crate::config::ModelConfig;
use crate::quant::QuantizedWeights;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

pub(super) struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub(super) fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..d).step_by(2).map(|i| (1.0 / cfg.rope_theta.powf(i as f64 / d as f64)) as f32).collect();
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
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                };
            }
        }
        Rope { inv_freq }
    }

    /// cos and sin of every position `0..positions`, each `(positions, head_dim / 2)`: built
    /// once at load; a step picks its rows by position.
    pub(super) fn table(&self, positions: usize, dtype: DType, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (positions, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// A linear layer over the rows of a step, `(rows, in) → (rows, out)`.
///
/// A decode step (a few rows, f32 on a CPU) goes through [`skinny`], which reads each weight
/// once for every row of the step; Q8_0 and Q4_K weights on a CPU go through [`qskinny`],
/// which does the same for their blocks, and other block types through candle's `QMatMul`.
/// Larger f32 steps go through gemm as `(W · xᵀ)ᵀ` rather than `x · Wᵀ`: with the weight as
/// the left operand gemm streams it row by row as it lies in memory; as the (transposed) right
/// operand it is repacked on every call (a 3072×1024 f32 layer over 8 rows: 0.59 ms against
/// 1.77 ms, measured on a 2-core AVX2 machine).
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// A layer's weight: as the compute dtype, or quantized at load.
enum Weight {
    Dense(Tensor),
    Quantized(candle_core::quantized::QMatMul),
    /// A block type [`qskinny`] reads, on a CPU that runs it, laid out for its kernel.
    Blocks(qskinny::Weights),
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: Weight::Dense(weight), bias }
    }

    /// A layer over a quantized weight (the blocks [`qskinny`] reads are copied into its
    /// layout, and `weight` dropped).
    fn quantized(weight: std::sync::Arc<candle_core::quantized::QTensor>, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let own = qskinny::Blocks::of(weight.dtype()).filter(|_| weight.device().is_cpu());
        let weight = match (own, weight.shape().dims2()) {
            (Some(blocks), Ok((out, inp))) if inp.is_multiple_of(blocks.weights()) => {
                Weight::Blocks(qskinny::Weights::new(blocks, out, inp, &weight.data()?))
            }
            _ => Weight::Quantized(candle_core::quantized::QMatMul::from_arc(weight)?),
        };
        Ok(Linear { weight, bias })
    }
}

impl Linear {
    /// `x · Wᵀ` through the decode kernel, when it applies.
    fn skinny(&self, w: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let rows = x.dim(0)?;
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if rows > skinny::MAX_ROWS || !cpu_f32(x) || !cpu_f32(w) || !w.is_contiguous() {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (out, inp) = w.dims2()?;
        let y = {
            let (ws, wo) = cpu_f32_storage(w)?;
            let (xs, xo) = cpu_f32_storage(&x)?;
            let (w, x) = (&slice_of(&ws, wo)?[..out * inp], &slice_of(&xs, xo)?[..rows * inp]);
            skinny::matmul(w, out, inp, x, rows)
        };
        Ok(Some(Tensor::from_vec(y, (rows, out), x.device())?))
    }

    /// `x · Wᵀ` of each of `layers`, which read the same `x` (q, k and v; gate and up): the
    /// rows are quantized once for all the layers whose blocks take them alike.
    fn forward_all<const N: usize>(layers: [&Linear; N], x: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let mut input: Option<qskinny::Input> = None;
        let mut ys = Vec::with_capacity(N);
        for layer in layers {
            let y = match &layer.weight {
                Weight::Blocks(w) => {
                    let rows = x.dim(0)?;
                    let input = match input.take() {
                        Some(i) if i.fits(w) => input.insert(i),
                        _ => {
                            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                            input.insert(qskinny::Input::new(w.blocks(), w.inp(), &xs, rows))
                        }
                    };
                    let y = qskinny::matmul(input, w);
                    // The output keeps the input's dtype.
                    Tensor::from_vec(y, (rows, w.out()), x.device())?.to_dtype(x.dtype())?
                }
                // Quantized matmuls take f32.
                Weight::Quantized(q) => q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?,
                Weight::Dense(w) => match layer.skinny(w, x)? {
                    Some(y) => y,
                    None => w.matmul(&x.t()?)?.t()?.contiguous()?,
                },
            };
            ys.push(match &layer.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        Ok(ys.try_into().unwrap_or_else(|_| unreachable!("one output a layer")))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [y] = Linear::forward_all([self], x)?;
        Ok(y)
    }
}

/// The layer `vb` names; a quantized weight is taken out of `quantized`, so that once its
/// layer holds it in the kernel's layout the loaded copy is gone.
fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder, quantized: &mut QuantizedWeights) -> candle_core::Result<Linear> {
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    if let Some(q) = quantized.remove(&format!("{}.weight", vb.prefix())) {
        if q.shape().dims() != [out_dim, in_dim] {
            candle_core::bail!("{}.weight: quantized shape {:?}, expected [{out_dim}, {in_dim}]", vb.prefix(), q.shape().dims());
        }
        return Linear::quantized(q, bias);
    }
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, bias))
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
    fn new(cfg: &ModelConfig, split: &TpSplit, vb: VarBuilder, q: &mut QuantizedWeights) -> candle_core::Result<Self> {
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
            q_proj: linear(cfg.hidden_size, h * d, cfg.qkv_bias, vb.pp("q_proj"), q)?,
            k_proj: linear(cfg.hidden_size, kv * d, cfg.qkv_bias, vb.pp("k_proj"), q)?,
            v_proj: linear(cfg.hidden_size, kv * d, cfg.qkv_bias, vb.pp("v_proj"), q)?,
            o_proj: linear(h * d, cfg.hidden_size, false, vb.pp("o_proj"), q)?,
            o_bias: if cfg.o_bias { Some(vb.pp("o_proj").get(cfg.hidden_size, "bias")?) } else { None },
            q_norm,
            k_norm,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    /// Attention for every sequence of a step: `x` is `(rows, hidden)`, the rows of each
    /// sequence in `batch` order; their keys and values go into `pool` (layer `layer`) first.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &Batch,
        pool: &KvPool,
        layer: usize,
        group: Option<&dyn Collective>,
    ) -> candle_core::Result<Tensor> {
        let t = x.dim(0)?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = Linear::forward_all([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let q = q.reshape((1, t, h, d))?;
        let k = k.reshape((1, t, kvh, d))?;
        let v = v.reshape((t, kvh, d))?;
        // Qwen3 normalises each head before the rotation.
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        // Each row is rotated by its own position (`cos`/`sin` hold one row per token).
        let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?.squeeze(0)?;
        let v = v.contiguous()?;
        for s in &batch.seqs {
            pool.write(layer, s.id, s.start, &k.narrow(0, s.offset, s.len)?, &v.narrow(0, s.offset, s.len)?)?;
        }
        let scale = 1.0 / (d as f64).sqrt();
        let (pk, pv) = pool.layer(layer);
        // Decode rows (one token) of every sequence are attended together: on a CPU in f32,
        // reading their context in place from the pool's blocks; elsewhere (GPUs) gathered into
        // one padded batch, a few kernels whatever the batch. Prefill chunks go through plain
        // matmul attention, sequence by sequence, which is faster for many query rows.
        let decode: Vec<DecodeRow> =
            batch.seqs.iter().filter(|s| s.len == 1).map(|s| DecodeRow { row: s.offset, slots: s.slots.clone() }).collect();
        let decoded = match decode.is_empty() {
            true => None,
            false if x.device().is_cpu() && x.dtype() == DType::F32 => Some(paged_decode_cpu(&q, pk, pv, &decode, scale as f32)?),
            false => Some(padded_decode(&q, pk, pv, &decode, scale)?),
        };
        if decode.len() == batch.seqs.len() {
            let ctx = decoded.expect("decode rows computed");
            return row_parallel_out(self.o_proj.forward(&ctx)?, self.o_bias.as_ref(), group);
        }
        let mut next_decoded = 0;
        let mut pieces = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            if s.len == 1 {
                pieces.push(decoded.as_ref().expect("decode rows computed").narrow(0, next_decoded, 1)?);
                next_decoded += 1;
                continue;
            }
            let qs = q.narrow(0, s.offset, s.len)?.transpose(0, 1)?.contiguous()?;
            // Keys and values as (kv heads, context, head_dim): this chunk's own when it is the
            // whole context, else gathered from the pool (a prefill chunk, once per chunk).
            let (ks, vs) = if s.start == 0 {
                let head_major = |t: &Tensor| t.narrow(0, s.offset, s.len)?.transpose(0, 1)?.contiguous();
                (head_major(&k)?, head_major(&v)?)
            } else {
                let slots = Tensor::new(s.slots.as_slice(), x.device())?;
                (pk.index_select(&slots, 1)?, pv.index_select(&slots, 1)?)
            };
            // Grouped KV heads without copying them: the `h / kvh` query heads that share a KV
            // head (consecutive, as transformers' `repeat_kv` arranges them) go through one
            // matmul as `h / kvh` times the rows.
            let (rep, total) = (h / kvh, ks.dim(1)?);
            let qg = qs.reshape((kvh, rep * s.len, d))?;
            let scores = qg.matmul(&ks.t()?)?;
            let probs = if x.device().is_cpu() && scores.dtype() == DType::F32 {
                // Scale, mask and softmax in one pass over the scores.
                causal_softmax_cpu(&scores, s.len, s.start, scale as f32)?
            } else {
                let mut scores = (scores * scale)?;
                if s.len > 1 {
                    let mask = causal_mask(s.len, s.start, scores.dtype(), x.device())?;
                    scores = scores.reshape((kvh, rep, s.len, total))?.broadcast_add(&mask)?.reshape((kvh, rep * s.len, total))?;
                }
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(vs.dtype())?
            };
            let ctx = probs.matmul(&vs)?.reshape((h, s.len, d))?.transpose(0, 1)?.reshape((s.len, h * d))?;
            pieces.push(ctx);
        }
        let ctx = Tensor::cat(&pieces, 0)?;
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

fn causal_mask(l: usize, offset: usize, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let total = l + offset;
    let mask: Vec<f32> = (0..l).flat_map(|i| (0..total).map(move |j| if j > i + offset { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (l, total), dev)?.to_dtype(dtype)
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    down_bias: Option<Tensor>,
}

impl Mlp {
    fn new(cfg: &ModelConfig, split: &TpSplit, vb: VarBuilder, q: &mut QuantizedWeights) -> candle_core::Result<Self> {
        let (hs, is) = (cfg.hidden_size, split.intermediate.len());
        Ok(Mlp {
            gate_proj: linear(hs, is, cfg.mlp_bias, vb.pp("gate_proj"), q)?,
            up_proj: linear(hs, is, cfg.mlp_bias, vb.pp("up_proj"), q)?,
            down_proj: linear(is, hs, false, vb.pp("down_proj"), q)?,
            down_bias: if cfg.mlp_bias { Some(vb.pp("down_proj").get(hs, "bias")?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor, group: Option<&dyn Collective>) -> candle_core::Result<Tensor> {
        let [gate, up] = Linear::forward_all([&self.gate_proj, &self.up_proj], x)?;
        let down = self.down_proj.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
        row_parallel_out(down, self.down_bias.as_ref(), group)
    }
}

pub(super) struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub(super) fn new(cfg: &ModelConfig, split: &TpSplit, vb: VarBuilder, q: &mut QuantizedWeights) -> candle_core::Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::new(cfg, split, vb.pp("self_attn"), q)?,
            mlp: Mlp::new(cfg, split, vb.pp("mlp"), q)?,
            input_layernorm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &Batch,
        pool: &KvPool,
        layer: usize,
        group: Option<&dyn Collective>,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, batch, pool, layer, group)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?, group)?;
        x + h
    }
}
