//! Attention on a CPU against the KV pool's blocks: a decode step's single-token queries read
//! their sequences' keys and values in place ([`paged_decode_cpu`], on the widest vectors the
//! CPU has), a prefill chunk's scores are masked and normalised in one pass
//! ([`causal_softmax_cpu`]), and other devices gather each row's context into a padded batch
//! ([`padded_decode`]).

use candle_core::{DType, Storage, Tensor};
use pulp::{Simd, WithSimd};

/// One decode row for [`paged_decode_cpu`]: its query row in `q`, and the slots of its context.
pub(crate) struct DecodeRow {
    pub(crate) row: usize,
    pub(crate) slots: Vec<u32>,
}

pub(crate) fn cpu_f32(t: &Tensor) -> candle_core::Result<(candle_core::StorageRef<'_>, usize)> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        candle_core::bail!("paged attention needs contiguous tensors");
    }
    Ok((storage, layout.start_offset()))
}

pub(crate) fn slice_of(s: &Storage, offset: usize) -> candle_core::Result<&[f32]> {
    match s {
        Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[offset..]),
        _ => candle_core::bail!("paged attention on CPU needs CPU tensors"),
    }
}

/// Dot product on `S`'s vectors, in two accumulators (so consecutive fused multiply-adds do
/// not wait on each other), summed across lanes once.
#[inline(always)]
fn dot<S: Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut acc = [simd.splat_f32s(0.0); 2];
    let (ap, bp) = (ah.chunks_exact(2), bh.chunks_exact(2));
    let (ar, br) = (ap.remainder(), bp.remainder());
    for (x, y) in ap.zip(bp) {
        acc[0] = simd.mul_add_f32s(x[0], y[0], acc[0]);
        acc[1] = simd.mul_add_f32s(x[1], y[1], acc[1]);
    }
    for (x, y) in ar.iter().zip(br) {
        acc[0] = simd.mul_add_f32s(*x, *y, acc[0]);
    }
    let tail: f32 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
    simd.reduce_sum_f32s(simd.add_f32s(acc[0], acc[1])) + tail
}

/// `out += w · v` on `S`'s vectors.
#[inline(always)]
fn axpy<S: Simd>(simd: S, out: &mut [f32], w: f32, v: &[f32]) {
    let (oh, ot) = S::as_mut_simd_f32s(out);
    let (vh, vt) = S::as_simd_f32s(v);
    let ws = simd.splat_f32s(w);
    for (o, x) in oh.iter_mut().zip(vh) {
        *o = simd.mul_add_f32s(ws, *x, *o);
    }
    for (o, x) in ot.iter_mut().zip(vt) {
        *o += w * x;
    }
}

/// Attention of single-token queries against their sequences' cached keys and values, read in
/// place from the pool's blocks (no gather): `q` is `(rows, heads, head_dim)` f32 on the CPU,
/// `keys`/`values` a layer of the pool; returns `(decode rows, heads × head_dim)` in the order
/// of `rows`. Grouped KV heads: query head `h` reads KV head `h / (heads / kv_heads)`, as
/// transformers' `repeat_kv` arranges them.
pub(crate) fn paged_decode_cpu(q: &Tensor, keys: &Tensor, values: &Tensor, rows: &[DecodeRow], scale: f32) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let (_, heads, d) = q.dims3()?;
    let (kvh, slots, _) = keys.dims3()?;
    let rep = heads / kvh;
    let q = q.contiguous()?;
    let (qs, qo) = cpu_f32(&q)?;
    let (ks, ko) = cpu_f32(keys)?;
    let (vs, vo) = cpu_f32(values)?;
    let (qs, ks, vs) = (slice_of(&qs, qo)?, slice_of(&ks, ko)?, slice_of(&vs, vo)?);
    let mut out = vec![0f32; rows.len() * heads * d];
    // One task per (row, KV head): the query heads sharing a KV head read its keys once, and a
    // head's keys within a block are one contiguous run.
    out.par_chunks_mut(rep * d).enumerate().for_each(|(task, out)| {
        let (row, g) = (&rows[task / kvh], task % kvh);
        let (k, v) = (&ks[g * slots * d..(g + 1) * slots * d], &vs[g * slots * d..(g + 1) * slots * d]);
        let q = &qs[(row.row * heads + g * rep) * d..(row.row * heads + (g + 1) * rep) * d];
        pulp::Arch::new().dispatch(Attend { row, rep, d, q, k, v, scale, out });
    });
    Tensor::from_vec(out, (rows.len(), heads * d), q.device())
}

/// One task of [`paged_decode_cpu`]: a decode row's query heads `q` `(rep, d)` sharing one KV
/// head, whose keys and values `k`, `v` are `(slots, d)`, into `out` `(rep, d)`, on the widest
/// vectors the CPU has (AVX2, AVX-512), chosen at run time by `pulp`.
struct Attend<'a> {
    row: &'a DecodeRow,
    rep: usize,
    d: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    scale: f32,
    out: &'a mut [f32],
}

impl WithSimd for Attend<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Attend { row, rep, d, q, k: keys, v: values, scale, out } = self;
        let ctx = row.slots.len();
        let mut scores = vec![0f32; rep * ctx];
        for (p, &slot) in row.slots.iter().enumerate() {
            fetch_slot(keys, row.slots.get(p + FETCH_AHEAD), d);
            let k = &keys[slot as usize * d..(slot as usize + 1) * d];
            for j in 0..rep {
                scores[j * ctx + p] = dot(simd, &q[j * d..(j + 1) * d], k) * scale;
            }
        }
        for j in 0..rep {
            let s = &mut scores[j * ctx..(j + 1) * ctx];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            for x in s.iter_mut() {
                *x *= inv;
            }
        }
        for (p, &slot) in row.slots.iter().enumerate() {
            fetch_slot(values, row.slots.get(p + FETCH_AHEAD), d);
            let v = &values[slot as usize * d..(slot as usize + 1) * d];
            for j in 0..rep {
                axpy(simd, &mut out[j * d..(j + 1) * d], scores[j * ctx + p], v);
            }
        }
    }
}

/// How many slots ahead of the one it reads [`Attend`] asks for a slot's lines. A sequence's
/// blocks of 16 slots (8 KiB of a head's f32 keys at 128 values a slot) lie apart in the pool,
/// and the hardware's prefetchers stop at each 4 KiB page: the reads of each block's first
/// lines waited on memory. A step of 8 rows at context 160 over 28 layers (8 KV heads of 128,
/// both cores, a Xeon with AVX-512) took 17.6 ms without the requests and 14.2–14.5 ms with
/// them 4, 8, 16 or 32 slots ahead.
const FETCH_AHEAD: usize = 16;

/// Asks for the cache lines of `slot`'s `d` values in `kv` (a head's keys or values), if any.
#[inline(always)]
fn fetch_slot(kv: &[f32], slot: Option<&u32>, d: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(&slot) = slot {
        let start = kv[slot as usize * d..][..d].as_ptr();
        for line in (0..d).step_by(16) {
            // SAFETY: a prefetch reads nothing and cannot fault; the address is within `kv`.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.add(line).cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kv, slot, d);
}

/// Scaled, causally masked softmax of a prefill chunk's attention scores in one pass (CPU, f32):
/// `scores` is `(groups, rows, context)` with the chunk's `len` query rows repeating within
/// each group, the chunk starting at position `start`; row `i` sees keys `0..=start + i`, the
/// rest get probability 0. The same values as `softmax(scores * scale + causal mask)`, without
/// building the mask or a pass per operation.
pub(crate) fn causal_softmax_cpu(scores: &Tensor, len: usize, start: usize, scale: f32) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let (groups, rows, total) = scores.dims3()?;
    let (st, so) = cpu_f32(scores)?;
    let src = &slice_of(&st, so)?[..groups * rows * total];
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(total).zip(src.par_chunks(total)).enumerate().for_each(|(r, (dst, src))| {
        let seen = (start + r % len + 1).min(total);
        let (dst, src) = (&mut dst[..seen], &src[..seen]);
        let mut max = f32::NEG_INFINITY;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s * scale;
            max = max.max(*d);
        }
        let mut sum = 0f32;
        for d in dst.iter_mut() {
            *d = (*d - max).exp();
            sum += *d;
        }
        for d in dst.iter_mut() {
            *d /= sum;
        }
    });
    Tensor::from_vec(out, (groups, rows, total), scores.device())
}

/// The same attention as [`paged_decode_cpu`] on any device, in a few kernels whatever the
/// batch: every row's context is gathered from the pool into one batch padded to the longest
/// (padding masked out), then two batched matmuls. Returns `(rows, heads × head_dim)`.
pub(crate) fn padded_decode(q: &Tensor, keys: &Tensor, values: &Tensor, rows: &[DecodeRow], scale: f64) -> candle_core::Result<Tensor> {
    let (_, heads, d) = q.dims3()?;
    let (kvh, _, _) = keys.dims3()?;
    let n = rows.len();
    let longest = rows.iter().map(|r| r.slots.len()).max().unwrap_or(0);
    let mut index = Vec::with_capacity(n * longest);
    let mut mask = Vec::with_capacity(n * longest);
    for r in rows {
        index.extend_from_slice(&r.slots);
        // Padding reads some valid slot and is masked out.
        index.extend(std::iter::repeat_n(r.slots[0], longest - r.slots.len()));
        mask.extend(std::iter::repeat_n(0f32, r.slots.len()));
        mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, longest - r.slots.len()));
    }
    let dev = q.device();
    let index = Tensor::from_vec(index, n * longest, dev)?;
    let gather = |t: &Tensor| -> candle_core::Result<Tensor> {
        // (kv heads, n × longest, d) → (n, heads, longest, d), KV heads repeated for their group.
        let g = t.index_select(&index, 1)?.reshape((kvh, n, longest, d))?.transpose(0, 1)?;
        g.unsqueeze(2)?.expand((n, kvh, heads / kvh, longest, d))?.reshape((n, heads, longest, d))
    };
    let (k, v) = (gather(keys)?, gather(values)?);
    let rows_of_q = Tensor::new(rows.iter().map(|r| r.row as u32).collect::<Vec<_>>(), dev)?;
    let q = q.index_select(&rows_of_q, 0)?.unsqueeze(2)?; // (n, heads, 1, d)
    let mask = Tensor::from_vec(mask, (n, 1, 1, longest), dev)?.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.transpose(2, 3)?)? * scale)?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    probs.matmul(&v)?.reshape((n, heads * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv::KvPool;
    use candle_core::Device;

    /// Dense attention of one query row against `(ctx, kv heads, d)` keys and values, in f64.
    fn dense(q: &[f32], k: &[f32], v: &[f32], heads: usize, kvh: usize, d: usize, scale: f64) -> Vec<f64> {
        let ctx = k.len() / (kvh * d);
        let mut out = Vec::new();
        for h in 0..heads {
            let g = h / (heads / kvh);
            let at = |t: &[f32], p: usize, i: usize| t[(p * kvh + g) * d + i] as f64;
            let s: Vec<f64> = (0..ctx).map(|p| (0..d).map(|i| q[h * d + i] as f64 * at(k, p, i)).sum::<f64>() * scale).collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            out.extend((0..d).map(|i| (0..ctx).map(|p| e[p] / sum * at(v, p, i)).sum::<f64>()));
        }
        out
    }

    #[test]
    fn paged_decode_equals_dense_attention_for_head_sizes_groupings_and_contexts() {
        let dev = Device::Cpu;
        // Head sizes of whole vectors, of lanes past the last vector and of less than one
        // vector (128, 72, 20, 8); one, two and three query heads a KV head; contexts from one
        // slot to several blocks.
        for (heads, kvh, d) in [(16, 8, 128), (6, 2, 72), (2, 2, 20), (3, 1, 128), (4, 2, 8)] {
            for ctx in [1usize, 3, 8, 11, 37] {
                let mut p = KvPool::new(1, kvh, d, 4, 16, DType::F32, &dev).unwrap();
                p.insert(1);
                p.insert(2);
                // Another sequence's blocks between, so the slots are not one run.
                p.grow(2, 6).unwrap();
                p.grow(1, ctx).unwrap();
                let k = Tensor::randn(0f32, 1.0, (ctx, kvh, d), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (ctx, kvh, d), &dev).unwrap();
                p.write(0, 1, 0, &k, &v).unwrap();
                let q = Tensor::randn(0f32, 1.0, (2, heads, d), &dev).unwrap();
                let scale = 1.0 / (d as f32).sqrt();
                let (pk, pv) = p.layer(0);
                let got = paged_decode_cpu(&q, pk, pv, &[DecodeRow { row: 1, slots: p.slots(1, ctx) }], scale).unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let q1 = q.get(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = dense(&q1, &flat(&k), &flat(&v), heads, kvh, d, scale as f64);
                assert_eq!(got.len(), want.len());
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((*a as f64 - b).abs() < 1e-5, "heads {heads}/{kvh}, d {d}, ctx {ctx}, element {i}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn causal_softmax_equals_scaled_masked_softmax() {
        let dev = Device::Cpu;
        // 2 KV heads × 3 query heads each, a chunk of 4 rows starting at position 5.
        let (groups, rep, len, start) = (2, 3, 4, 5);
        let total = start + len;
        let scores = Tensor::randn(0f32, 3.0, (groups, rep * len, total), &dev).unwrap();
        let got = causal_softmax_cpu(&scores, len, start, 0.25).unwrap().to_vec3::<f32>().unwrap();
        let mask: Vec<f32> = (0..len).flat_map(|i| (0..total).map(move |j| if j > i + start { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (len, total), &dev).unwrap();
        let masked = (scores * 0.25).unwrap().reshape((groups, rep, len, total)).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&masked.reshape((groups, rep * len, total)).unwrap()).unwrap();
        let want = want.to_vec3::<f32>().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() < 1e-6, "key {j}: {a} vs {b}");
            }
        }
        // A row never sees a key after its own position.
        assert_eq!(got[0][0][start + 1..], vec![0f32; len - 1][..]);
    }

    #[test]
    fn padded_decode_equals_paged_decode_for_rows_of_different_lengths() {
        let dev = Device::Cpu;
        let (heads, kvh, d) = (4, 2, 8);
        let mut p = KvPool::new(1, kvh, d, 4, 16, DType::F32, &dev).unwrap();
        let mut rows = Vec::new();
        for (id, ctx) in [(1u64, 9usize), (2, 3), (3, 14)] {
            p.insert(id);
            p.grow(id, ctx).unwrap();
            let k = Tensor::randn(0f32, 1.0, (ctx, kvh, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (ctx, kvh, d), &dev).unwrap();
            p.write(0, id, 0, &k, &v).unwrap();
            rows.push(DecodeRow { row: rows.len(), slots: p.slots(id, ctx) });
        }
        let q = Tensor::randn(0f32, 1.0, (3, heads, d), &dev).unwrap();
        let (pk, pv) = p.layer(0);
        let paged = paged_decode_cpu(&q, pk, pv, &rows, 0.3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let padded = padded_decode(&q, pk, pv, &rows, 0.3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in paged.iter().zip(&padded) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
