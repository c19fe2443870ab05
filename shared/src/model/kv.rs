//! A stage's KV cache as a pool of fixed-size blocks (paged attention, as vLLM and TGI keep
//! it): one preallocated key tensor and one value tensor per layer, each holding
//! `blocks × block_size` token slots, and a block table per sequence. A step writes the new
//! tokens' keys and values into their slots in place; nothing is copied or reallocated per step,
//! and a sequence's memory is its blocks, given back at once when it ends.
//!
//! Blocks are shared for prefix caching. The scheduler that owns the pool names the blocks a
//! sequence gets (every stage and rank gets the same ids); the pool counts how many sequences
//! hold each block and never hands out, or lets a step write into, a block another sequence
//! holds. A sequence whose steps name no blocks (a client driving a stage directly) takes the
//! highest free ones itself, and gives them up — it is dropped — when the scheduler names one
//! of them: the pool is the scheduler's. A block a sequence filled is tagged with its content address
//! ([`crate::prefix`]), computed here from the tokens written, and keeps that tag after the
//! sequence ends (cached) until it is written again (evicted). A sequence that starts from
//! cached blocks names them with the tokens they hold; the pool checks each tag against the
//! hashes of those tokens, so a block is never read for a prefix it does not hold.

use crate::error::{Error, Result};
use crate::prefix::{self, BlockHash};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};

/// What a stage answers a step from a scheduler whose term is older than the pool's owner:
/// the scheduler recognises it and stops (another coordinator schedules the model now).
pub const FENCED: &str = "belongs to a newer scheduler";

/// Tokens per block unless configured otherwise (vLLM's and TGI's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// One sequence's place in the pool: its blocks in order, and how many tokens it holds.
#[derive(Debug, Default, Clone)]
struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// When the sequence's blocks are content-addressed: the hash of its last full block (the
    /// chain's root before the first), and the tokens written since that block.
    chain: Option<(BlockHash, Vec<u32>)>,
    /// Its blocks are named by the scheduler (not taken by the pool itself).
    named: bool,
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
    /// Blocks no sequence holds (some of them cached).
    free: BTreeSet<u32>,
    /// Per block: the sequences holding it, and the content address of what it holds.
    refs: Vec<u32>,
    tags: Vec<Option<BlockHash>>,
    /// Free blocks that hold a tag.
    cached: usize,
    /// Tagged blocks written again since the pool was made.
    evicted: u64,
    total: usize,
    sequences: HashMap<u64, BlockTable>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("block_size", &self.block_size)
            .field("blocks", &self.total)
            .field("free", &self.free.len())
            .field("cached", &self.cached)
            .field("sequences", &self.sequences.len())
            .finish()
    }
}

/// Bytes one token's keys and values take over `layers` layers.
pub fn bytes_per_token(layers: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> u64 {
    (2 * layers * kv_heads * head_dim * dtype.size_in_bytes()) as u64
}

/// `t`, a pool tensor just made of zeros, on small pages resident only where written
/// ([`crate::pages::small_untouched_pages`]).
fn small_pages(t: &Tensor) {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return };
    match cpu {
        CpuStorage::F32(v) => crate::pages::small_untouched_pages(v),
        CpuStorage::BF16(v) => crate::pages::small_untouched_pages(v),
        CpuStorage::F16(v) => crate::pages::small_untouched_pages(v),
        _ => {}
    }
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
        if blocks > u32::MAX as usize {
            return Err(Error::Sequence(format!("{blocks} KV blocks are more than a pool can number")));
        }
        let slots = blocks * block_size;
        let layers = (0..layers)
            .map(|_| {
                let k = Tensor::zeros((kv_heads, slots, head_dim), dtype, device)?;
                let v = Tensor::zeros((kv_heads, slots, head_dim), dtype, device)?;
                small_pages(&k);
                small_pages(&v);
                Ok((k, v))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(Error::Forward)?;
        Ok(KvPool {
            block_size,
            kv_heads,
            head_dim,
            layers,
            free: (0..blocks as u32).collect(),
            refs: vec![0; blocks],
            tags: vec![None; blocks],
            cached: 0,
            evicted: 0,
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

    /// Blocks no sequence holds (cached ones included).
    pub fn blocks_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks no sequence holds that still hold a tagged prefix.
    pub fn blocks_cached(&self) -> usize {
        self.cached
    }

    /// Cached blocks written again since the pool was made.
    pub fn blocks_evicted(&self) -> u64 {
        self.evicted
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

    /// Starts holding sequence `id` (not held yet) from cached blocks: `blocks` hold its first
    /// `tokens`, whole blocks of them, as the chain from `root` names them. With no root the
    /// sequence is not content-addressed and may start from no cached block. Checks every
    /// block's tag first and changes nothing when one does not match.
    pub fn insert_cached(&mut self, id: u64, root: Option<BlockHash>, blocks: &[u32], tokens: &[u32]) -> Result<()> {
        let bad = |why: String| Err(Error::Sequence(why));
        if self.sequences.contains_key(&id) {
            return bad(format!("sequence {id} is held already"));
        }
        if tokens.len() != blocks.len() * self.block_size {
            return bad(format!("{} cached tokens do not fill {} blocks of {} tokens", tokens.len(), blocks.len(), self.block_size));
        }
        let Some(root) = root else {
            if blocks.is_empty() {
                self.insert(id);
                return Ok(());
            }
            return bad("cached blocks need the prefix root that names them".into());
        };
        let hashes = prefix::chain(&root, tokens, self.block_size);
        for (i, (&b, h)) in blocks.iter().zip(&hashes).enumerate() {
            if b as usize >= self.total {
                return bad(format!("cached block {b} is outside the pool of {} blocks", self.total));
            }
            if self.tags[b as usize].as_ref() != Some(h) {
                // What the scheduler published is not what this stage holds: refuse rather
                // than attend to another prompt's keys and values.
                return bad(format!("cached block {b} (block {i} of the prefix) does not hold that prefix here"));
            }
        }
        for &b in blocks {
            self.take(b);
        }
        let last = hashes.last().copied().unwrap_or(root);
        let named = !blocks.is_empty();
        self.sequences.insert(id, BlockTable { blocks: blocks.to_vec(), len: tokens.len(), chain: Some((last, Vec::new())), named });
        Ok(())
    }

    /// One more holder of block `b`.
    fn take(&mut self, b: u32) {
        if self.free.remove(&b) && self.tags[b as usize].is_some() {
            self.cached -= 1;
        }
        self.refs[b as usize] += 1;
    }

    /// One holder fewer of block `b`; free (and cached, when tagged) once none is left.
    fn put(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r == 0 && self.free.insert(b) && self.tags[b as usize].is_some() {
            self.cached += 1;
        }
    }

    /// Frees sequence `id`; its blocks go back once no other sequence holds them (those it
    /// filled stay cached). Whether it was held.
    pub fn remove(&mut self, id: u64) -> bool {
        match self.sequences.remove(&id) {
            Some(t) => {
                for b in t.blocks {
                    self.put(b);
                }
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

    /// Frees every sequence and forgets every cached prefix (a new owner takes the pool).
    pub fn reset(&mut self) {
        self.clear();
        self.tags.iter_mut().for_each(|t| *t = None);
        self.cached = 0;
    }

    /// Blocks sequence `id` still needs to hold `extra` more tokens.
    pub fn blocks_needed(&self, id: u64, extra: usize) -> usize {
        let t = self.sequences.get(&id);
        let (len, held) = t.map_or((0, 0), |t| (t.len, t.blocks.len()));
        self.blocks_for(len + extra).saturating_sub(held)
    }

    /// Gives sequence `id` blocks for `extra` more tokens, all or nothing: the blocks `given`
    /// (as many as it needs, none held by a sequence whose blocks are named too), or with none
    /// given the highest free ones. A block taken this way loses what it cached. Returns the
    /// sequences dropped because they held a block `given` names (they took it themselves).
    pub fn grow_with(&mut self, id: u64, extra: usize, given: &[u32]) -> Result<Vec<u64>> {
        let needed = self.blocks_needed(id, extra);
        let table = self.sequences.get(&id).ok_or_else(|| Error::Sequence(format!("sequence {id} is not held")))?;
        if table.named && given.is_empty() && needed > 0 {
            return Err(Error::Sequence(format!("sequence {id} needs {needed} new blocks and the step names none")));
        }
        if table.len % self.block_size != 0 && extra > 0 {
            // The new tokens begin in the sequence's last block: it must be its own.
            let last = *table.blocks.last().expect("a partly filled block is held");
            if self.refs[last as usize] != 1 {
                return Err(Error::Sequence(format!("block {last} is shared: sequence {id} may not write into it")));
            }
        }
        let mut dropped = Vec::new();
        let picked: Vec<u32> = if given.is_empty() {
            if needed > self.free.len() {
                return Err(Error::KvFull { needed, free: self.free.len(), total: self.total });
            }
            self.free.iter().rev().take(needed).copied().collect()
        } else {
            if given.len() != needed {
                return Err(Error::Sequence(format!(
                    "sequence {id} needs {needed} new blocks for {extra} tokens, the step names {}",
                    given.len()
                )));
            }
            let mut seen = BTreeSet::new();
            for &b in given {
                if b as usize >= self.total {
                    return Err(Error::Sequence(format!("block {b} is outside the pool of {} blocks", self.total)));
                }
                if !seen.insert(b) {
                    return Err(Error::Sequence(format!("block {b} is named twice")));
                }
            }
            let holders: Vec<(u64, bool)> = self
                .sequences
                .iter()
                .filter(|(other, t)| **other != id && t.blocks.iter().any(|b| seen.contains(b)))
                .map(|(other, t)| (*other, t.named))
                .collect();
            if let Some((other, _)) = holders.iter().find(|(_, named)| *named) {
                return Err(Error::Sequence(format!("a block named for sequence {id} is held by sequence {other}")));
            }
            for (other, _) in holders {
                self.remove(other);
                dropped.push(other);
            }
            self.sequences.get_mut(&id).expect("held").named = true;
            given.to_vec()
        };
        for &b in &picked {
            if self.tags[b as usize].take().is_some() {
                self.evicted += 1;
                self.cached -= 1;
            }
            self.free.remove(&b);
            self.refs[b as usize] += 1;
        }
        self.sequences.get_mut(&id).expect("held").blocks.extend(picked);
        Ok(dropped)
    }

    /// Gives sequence `id` blocks for `extra` more tokens from the free ones, all or nothing.
    pub(crate) fn grow(&mut self, id: u64, extra: usize) -> Result<()> {
        self.grow_with(id, extra, &[]).map(|_| ())
    }

    /// Records that sequence `id` now holds `extra` more tokens (written by the step).
    pub(crate) fn advance(&mut self, id: u64, extra: usize) {
        if let Some(t) = self.sequences.get_mut(&id) {
            t.len += extra;
        }
    }

    /// Tags the blocks sequence `id` filled with `tokens`, the tokens its last step wrote
    /// (after [`KvPool::advance`]); nothing for a sequence that is not content-addressed.
    pub fn record(&mut self, id: u64, tokens: &[u32]) {
        let bs = self.block_size;
        let Some(t) = self.sequences.get_mut(&id) else { return };
        let Some((parent, pending)) = t.chain.as_mut() else { return };
        pending.extend_from_slice(tokens);
        let first_full = (t.len - pending.len()) / bs;
        let full = pending.len() / bs;
        for k in 0..full {
            *parent = prefix::block_hash(parent, &pending[k * bs..(k + 1) * bs]);
            let b = t.blocks[first_full + k] as usize;
            self.tags[b] = Some(*parent);
        }
        pending.drain(..full * bs);
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

#[cfg(test)]
mod tests;
