//! A stage's KV cache as a pool of fixed-size blocks (paged attention, as vLLM and TGI keep
//! it): one preallocated key tensor and one value tensor per layer, each holding
//! `blocks × block_size` token slots, and a block table per sequence. A step writes the new
//! tokens' keys and values into their slots in place; nothing is copied or reallocated per step,
//! and a sequence's memory is its blocks, freed at once when it ends.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Storage, Tensor};
use std::collections::HashMap;

/// Tokens per block unless configured otherwise (vLLM's and TGI's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// One sequence's place in the pool: its blocks in order, and how many tokens it holds.
#[derive(Debug, Default, Clone)]
struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
}

/// The KV memory of one stage (or one tensor-parallel rank of it).
pub struct KvPool {
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Per layer: keys and values, each `(kv_heads, blocks × block_size, head_dim)`: head-major,
    /// so one head's keys of one block lie together (a decode reads them as one stream; with
    /// the slots outermost, consecutive positions of a head were a page apart).
    layers: Vec<(Tensor, Tensor)>,
    free: Vec<u32>,
    total: usize,
    sequences: HashMap<u64, BlockTable>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("block_size", &self.block_size)
            .field("blocks", &self.total)
            .field("free", &self.free.len())
            .field("sequences", &self.sequences.len())
            .finish()
    }
}

/// Bytes one token's keys and values take over `layers` layers.
pub fn bytes_per_token(layers: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> u64 {
    (2 * layers * kv_heads * head_dim * dtype.size_in_bytes()) as u64
}

impl KvPool {
    /// A pool of `blocks` blocks of `block_size` tokens for `layers` layers, allocated now.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::Sequence("the KV block size must be at least 1".into()));
        }
        let slots = blocks * block_size;
        let layers = (0..layers)
            .map(|_| {
                let k = Tensor::zeros((kv_heads, slots, head_dim), dtype, device)?;
                let v = Tensor::zeros((kv_heads, slots, head_dim), dtype, device)?;
                Ok((k, v))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(Error::Forward)?;
        Ok(KvPool {
            block_size,
            kv_heads,
            head_dim,
            layers,
            // Popped from the end: low blocks are handed out first.
            free: (0..blocks as u32).rev().collect(),
            total: blocks,
            sequences: HashMap::new(),
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn blocks_total(&self) -> usize {
        self.total
    }

    /// Blocks held by sequences.
    pub fn blocks_used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Blocks no sequence holds.
    pub fn blocks_free(&self) -> usize {
        self.free.len()
    }

    /// Bytes one block holds over every layer.
    pub fn bytes_per_block(&self) -> u64 {
        let dtype = self.layers.first().map_or(DType::F32, |(k, _)| k.dtype());
        bytes_per_token(self.layers.len(), self.kv_heads, self.head_dim, dtype) * self.block_size as u64
    }

    /// Bytes the blocks in use hold.
    pub fn bytes_used(&self) -> u64 {
        self.blocks_used() as u64 * self.bytes_per_block()
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Sequences held.
    pub fn sequences(&self) -> usize {
        self.sequences.len()
    }

    /// Whether sequence `id` is held.
    pub fn contains(&self, id: u64) -> bool {
        self.sequences.contains_key(&id)
    }

    /// Tokens held for sequence `id` (`None`: not held).
    pub fn len_of(&self, id: u64) -> Option<usize> {
        self.sequences.get(&id).map(|t| t.len)
    }

    /// Starts holding sequence `id`, empty. Holding it already is a no-op.
    pub fn insert(&mut self, id: u64) {
        self.sequences.entry(id).or_default();
    }

    /// Frees sequence `id` and its blocks; whether it was held.
    pub fn remove(&mut self, id: u64) -> bool {
        match self.sequences.remove(&id) {
            Some(t) => {
                self.free.extend(t.blocks.into_iter().rev());
                true
            }
            None => false,
        }
    }

    /// Frees every sequence.
    pub fn clear(&mut self) {
        let ids: Vec<u64> = self.sequences.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Blocks sequence `id` still needs to hold `extra` more tokens.
    pub fn blocks_needed(&self, id: u64, extra: usize) -> usize {
        let t = self.sequences.get(&id);
        let (len, held) = t.map_or((0, 0), |t| (t.len, t.blocks.len()));
        self.blocks_for(len + extra).saturating_sub(held)
    }

    /// Gives sequence `id` blocks for `extra` more tokens, all or nothing.
    pub(crate) fn grow(&mut self, id: u64, extra: usize) -> Result<()> {
        let needed = self.blocks_needed(id, extra);
        if needed > self.free.len() {
            return Err(Error::KvFull { needed, free: self.free.len(), total: self.total });
        }
        let table = self.sequences.get_mut(&id).ok_or_else(|| Error::Sequence(format!("sequence {id} is not held")))?;
        for _ in 0..needed {
            table.blocks.push(self.free.pop().expect("counted above"));
        }
        Ok(())
    }

    /// Records that sequence `id` now holds `extra` more tokens (written by the step).
    pub(crate) fn advance(&mut self, id: u64, extra: usize) {
        if let Some(t) = self.sequences.get_mut(&id) {
            t.len += extra;
        }
    }

    /// The pool slot of position `pos` of sequence `id`.
    fn slot(&self, table: &BlockTable, pos: usize) -> usize {
        table.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// The slots of positions `0..end` of sequence `id`.
    pub(crate) fn slots(&self, id: u64, end: usize) -> Vec<u32> {
        let t = &self.sequences[&id];
        (0..end).map(|p| self.slot(t, p) as u32).collect()
    }

    /// Writes keys `k` and values `v` (each `(n, kv_heads, head_dim)`) of layer `layer` at
    /// positions `start..start + n` of sequence `id`, whose blocks must already be held.
    pub(crate) fn write(&self, layer: usize, id: u64, start: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        let table = &self.sequences[&id];
        let (pk, pv) = &self.layers[layer];
        let n = k.dim(0)?;
        let mut i = 0;
        // One copy per run of positions within a block (every head at once).
        while i < n {
            let pos = start + i;
            let run = (self.block_size - pos % self.block_size).min(n - i);
            let slot = self.slot(table, pos);
            pk.slice_set(&k.narrow(0, i, run)?.transpose(0, 1)?.contiguous()?, 1, slot)?;
            pv.slice_set(&v.narrow(0, i, run)?.transpose(0, 1)?.contiguous()?, 1, slot)?;
            i += run;
        }
        Ok(())
    }

    /// Keys and values of positions `0..end` of sequence `id` in layer `layer`, gathered into
    /// contiguous `(kv_heads, end, head_dim)` tensors.
    #[cfg(test)]
    fn gather(&self, layer: usize, id: u64, end: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (pk, pv) = &self.layers[layer];
        let slots = Tensor::new(self.slots(id, end), pk.device())?;
        Ok((pk.index_select(&slots, 1)?, pv.index_select(&slots, 1)?))
    }

    /// Layer `layer`'s key and value tensors.
    pub(crate) fn layer(&self, layer: usize) -> &(Tensor, Tensor) {
        &self.layers[layer]
    }
}

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

pub(crate) fn slice_of<'a>(s: &'a Storage, offset: usize) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[offset..]),
        _ => candle_core::bail!("paged attention on CPU needs CPU tensors"),
    }
}

/// Dot product with 32 accumulators (four 8-lane vectors, so consecutive fused multiply-adds
/// do not wait on each other), which the compiler turns into SIMD.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `out += w · v`.
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

/// Attention of single-token queries against their sequences' cached keys and values, read in
/// place from the pool's blocks (no gather): `q` is `(rows, heads, head_dim)` f32 on the CPU,
/// `keys`/`values` a layer of the pool; returns `(decode rows, heads × head_dim)` in the order
/// of `rows`. Grouped KV heads: query head `h` reads KV head `h / (heads / kv_heads)`, as
/// transformers' `repeat_kv` arranges them.
pub(crate) fn paged_decode_cpu(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    rows: &[DecodeRow],
    scale: f32,
) -> candle_core::Result<Tensor> {
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
    out.par_chunks_mut(rep * d).enumerate().for_each(|(task, chunk)| {
        let (r, g) = (task / kvh, task % kvh);
        let row = &rows[r];
        let ctx = row.slots.len();
        let (kh, vh) = (&ks[g * slots * d..(g + 1) * slots * d], &vs[g * slots * d..(g + 1) * slots * d]);
        let qh = &qs[(row.row * heads + g * rep) * d..(row.row * heads + (g + 1) * rep) * d];
        let mut scores = vec![0f32; rep * ctx];
        for (p, &slot) in row.slots.iter().enumerate() {
            let k = &kh[slot as usize * d..(slot as usize + 1) * d];
            for j in 0..rep {
                scores[j * ctx + p] = dot(&qh[j * d..(j + 1) * d], k) * scale;
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
            let v = &vh[slot as usize * d..(slot as usize + 1) * d];
            for j in 0..rep {
                axpy(&mut chunk[j * d..(j + 1) * d], scores[j * ctx + p], v);
            }
        }
    });
    Tensor::from_vec(out, (rows.len(), heads * d), q.device())
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

    fn pool(blocks: usize) -> KvPool {
        KvPool::new(2, 2, 4, 4, blocks, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn blocks_are_taken_as_tokens_arrive_and_all_come_back() {
        let mut p = pool(5);
        p.insert(1);
        p.insert(2);
        assert_eq!(p.blocks_needed(1, 5), 2);
        p.grow(1, 5).unwrap();
        p.advance(1, 5);
        assert_eq!(p.blocks_used(), 2);
        // 3 more tokens fit the second block.
        assert_eq!(p.blocks_needed(1, 3), 0);
        p.grow(2, 12).unwrap();
        p.advance(2, 12);
        assert_eq!(p.blocks_used(), 5);
        assert!(matches!(p.grow(1, 4), Err(Error::KvFull { needed: 1, free: 0, total: 5 })));
        // A failed grow takes nothing.
        assert_eq!(p.blocks_used(), 5);
        assert!(p.remove(2));
        assert!(!p.remove(2));
        assert_eq!(p.blocks_used(), 2);
        p.clear();
        assert_eq!((p.blocks_used(), p.sequences()), (0, 0));
    }

    #[test]
    fn bytes_per_block_is_keys_and_values_of_every_layer() {
        let p = pool(3);
        // 2 (k, v) × 2 layers × 2 heads × 4 dims × 4 bytes × 4 tokens.
        assert_eq!(p.bytes_per_block(), 2 * 2 * 2 * 4 * 4 * 4);
        assert_eq!(bytes_per_token(28, 8, 128, DType::BF16), 2 * 28 * 8 * 128 * 2);
    }

    #[test]
    fn written_tokens_are_gathered_in_position_order_across_blocks() {
        let mut p = pool(4);
        p.insert(7);
        p.insert(8);
        // Interleave two sequences so their blocks are not contiguous.
        let rows = |n: usize, base: f32| Tensor::arange(0f32, (n * 8) as f32, &Device::Cpu).unwrap().affine(1.0, base as f64).unwrap().reshape((n, 2, 4)).unwrap();
        p.grow(7, 3).unwrap();
        p.write(0, 7, 0, &rows(3, 0.0), &rows(3, 100.0)).unwrap();
        p.advance(7, 3);
        p.grow(8, 4).unwrap();
        p.advance(8, 4);
        p.grow(7, 3).unwrap();
        p.write(0, 7, 3, &rows(3, 24.0), &rows(3, 124.0)).unwrap();
        p.advance(7, 3);
        let (k, v) = p.gather(0, 7, 6).unwrap();
        let want_k: Vec<f32> = (0..48).map(|x| x as f32).collect();
        let head_major = |t: Tensor| t.transpose(0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(head_major(k), want_k);
        let want_v: Vec<f32> = (0..48).map(|x| x as f32 + 100.0).collect();
        assert_eq!(head_major(v), want_v);
    }

    #[test]
    fn paged_decode_equals_dense_attention() {
        let dev = Device::Cpu;
        let (heads, kvh, d, ctx) = (4, 2, 8, 11);
        let mut p = KvPool::new(1, kvh, d, 4, 8, DType::F32, &dev).unwrap();
        p.insert(1);
        p.insert(2);
        p.grow(2, 5).unwrap();
        p.grow(1, ctx).unwrap();
        let k = Tensor::randn(0f32, 1.0, (ctx, kvh, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (ctx, kvh, d), &dev).unwrap();
        p.write(0, 1, 0, &k, &v).unwrap();
        let q = Tensor::randn(0f32, 1.0, (1, heads, d), &dev).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let (pk, pv) = p.layer(0);
        let got = paged_decode_cpu(&q, pk, pv, &[DecodeRow { row: 0, slots: p.slots(1, ctx) }], scale).unwrap();
        // Dense: heads × (1, d) against (ctx, d) of its KV head.
        let kk = k.transpose(0, 1).unwrap().contiguous().unwrap(); // (kvh, ctx, d)
        let vv = v.transpose(0, 1).unwrap().contiguous().unwrap();
        let mut want = Vec::new();
        for h in 0..heads {
            let qh = q.narrow(1, h, 1).unwrap().reshape((1, d)).unwrap();
            let kh = kk.get(h / (heads / kvh)).unwrap();
            let vh = vv.get(h / (heads / kvh)).unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale as f64).unwrap();
            let pr = candle_nn::ops::softmax_last_dim(&s).unwrap();
            want.extend(pr.matmul(&vh).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
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
