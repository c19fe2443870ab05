//! The KV blocks of one placement, as the scheduler that owns its pools sees them — pure
//! bookkeeping, tested on its own.
//!
//! The scheduler names every block a sequence gets, so every stage and tensor-parallel rank
//! holds the sequence's keys and values under the same block ids, and one lookup here skips a
//! cached prefix on all of them (no KV moves between stages). A block is published under its
//! content address ([`shardserve::prefix`]) only once the step that filled it came back from
//! the last stage — every stage has written it — so a step that failed, or a request cancelled
//! half-way, publishes nothing half-written. Blocks count their holders; a block no sequence
//! holds keeps its prefix (cached, least recently freed first in line) until a new block is
//! needed and none is empty, as vLLM's automatic prefix caching does.
//!
//! Admission reserves what a request can still need (prompt + max_new_tokens, less the cached
//! blocks it shares) before it runs, so a running sequence never finds the pool full; cached
//! blocks that no one holds count as free, since they are evicted on demand.

use shardserve::prefix::{self, BlockHash};
use std::collections::{BTreeMap, HashMap};

/// One sequence's blocks on the placement.
#[derive(Debug, Default)]
pub(super) struct SeqBlocks {
    /// Its block table, in position order.
    pub(super) table: Vec<u32>,
    /// Leading blocks that came from the cache (their tokens were not computed).
    pub(super) cached: usize,
    /// Blocks reserved for it and not taken yet.
    promised: usize,
    /// The root of its hash chain, when its blocks may be published; and the hashes of its full
    /// blocks so far.
    root: Option<BlockHash>,
    hashes: Vec<BlockHash>,
}

impl SeqBlocks {
    /// Tokens that came from the cache.
    pub(super) fn cached_tokens(&self, block_size: usize) -> usize {
        self.cached * block_size
    }

    /// The root of its hash chain, when its blocks are content-addressed.
    pub(super) fn root(&self) -> Option<BlockHash> {
        self.root
    }
}

/// The blocks of one placement's pools (every stage has at least this many).
#[derive(Debug)]
pub(super) struct Blocks {
    block_size: usize,
    /// Per block: the sequences holding it, and the prefix it holds when published.
    refs: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Free blocks holding nothing reusable.
    empty: Vec<u32>,
    /// Free blocks holding a published prefix, by when they were freed (oldest first).
    lru: BTreeMap<u64, u32>,
    /// The key of each block in `lru`.
    freed_at: Vec<u64>,
    clock: u64,
    by_hash: HashMap<BlockHash, u32>,
    /// Blocks reserved for admitted sequences and not taken yet.
    promised: usize,
    /// Whether blocks are looked up and published at all (`--prefix-caching`).
    caching: bool,
    /// With replicas: where the router learns which prefixes this replica caches (its index
    /// there), kept as blocks are published and evicted.
    index: Option<(super::replicas::SharedIndex, usize)>,
}

impl Blocks {
    /// `total` empty blocks of `block_size` tokens.
    pub(super) fn new(total: usize, block_size: usize, caching: bool) -> Self {
        Blocks {
            block_size: block_size.max(1),
            refs: vec![0; total],
            hash: vec![None; total],
            // Popped from the end: low blocks are handed out first.
            empty: (0..total as u32).rev().collect(),
            lru: BTreeMap::new(),
            freed_at: vec![0; total],
            clock: 0,
            by_hash: HashMap::new(),
            promised: 0,
            caching,
            index: None,
        }
    }

    /// Tells the router's index of replica `replica` what these blocks cache, starting from
    /// nothing (a new placement's pools hold nothing yet).
    pub(super) fn publishing_to(mut self, index: super::replicas::SharedIndex, replica: usize) -> Self {
        index.lock().expect("index lock").clear_replica(replica);
        self.index = Some((index, replica));
        self
    }

    pub(super) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(super) fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that no one holds, cached ones included, less what admitted sequences may still
    /// take.
    pub(super) fn available(&self) -> usize {
        (self.empty.len() + self.lru.len()).saturating_sub(self.promised)
    }

    /// Blocks held by running sequences or reserved for them.
    pub(super) fn reserved(&self) -> usize {
        self.total() - self.empty.len() - self.lru.len() + self.promised
    }

    /// Blocks no one holds that still hold a published prefix.
    pub(super) fn cached(&self) -> usize {
        self.lru.len()
    }

    /// The blocks holding the longest cached prefix of `tokens` under `root`: whole blocks
    /// only, and never all of `tokens` (the last token is always computed, so that there are
    /// logits to sample from).
    fn lookup(&self, root: &BlockHash, tokens: &[u32]) -> (Vec<u32>, Vec<BlockHash>) {
        let usable = tokens.len().saturating_sub(1) / self.block_size * self.block_size;
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        for h in prefix::chain(root, &tokens[..usable], self.block_size) {
            match self.by_hash.get(&h) {
                Some(&b) => {
                    blocks.push(b);
                    hashes.push(h);
                }
                None => break,
            }
        }
        (blocks, hashes)
    }

    /// Admits a sequence whose context is `context` and which may grow to `total_tokens`: its
    /// cached prefix is pinned and the rest reserved. `None` when the pool cannot hold it now
    /// (nothing changes). `root`: its chain's root, or `None` when it neither reads nor
    /// publishes cached blocks; `lookup`: whether it may start from cached blocks.
    pub(super) fn admit(&mut self, root: Option<BlockHash>, lookup: bool, context: &[u32], total_tokens: usize) -> Option<SeqBlocks> {
        let root = root.filter(|_| self.caching);
        let (hit, hashes) = match root {
            Some(r) if lookup => self.lookup(&r, context),
            _ => (Vec::new(), Vec::new()),
        };
        let need = total_tokens.div_ceil(self.block_size).saturating_sub(hit.len());
        // A cached block no one holds stops being free once pinned.
        let pinned_free = hit.iter().filter(|&&b| self.refs[b as usize] == 0).count();
        if need + pinned_free > self.available() {
            return None;
        }
        for &b in &hit {
            self.hold(b);
        }
        self.promised += need;
        Some(SeqBlocks { cached: hit.len(), table: hit, promised: need, root, hashes })
    }

    fn hold(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 && self.hash[i].is_some() {
            self.lru.remove(&self.freed_at[i]);
        }
        self.refs[i] += 1;
    }

    /// The new blocks `seq` needs to hold `tokens` positions, taken from its reservation:
    /// empty blocks first, then the least recently freed cached one (evicting its prefix).
    /// `None` when the pool is out of blocks (the reservation was exceeded; nothing changes).
    pub(super) fn grow(&mut self, seq: &mut SeqBlocks, tokens: usize) -> Option<Vec<u32>> {
        let need = tokens.div_ceil(self.block_size).saturating_sub(seq.table.len());
        let beyond = need.saturating_sub(seq.promised);
        if beyond > self.available() {
            return None;
        }
        let mut out = Vec::with_capacity(need);
        for _ in 0..need {
            let b = match self.empty.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.lru.pop_first().expect("counted as available");
                    let h = self.hash[b as usize].take().expect("a cached block holds a prefix");
                    if self.by_hash.get(&h) == Some(&b) {
                        self.by_hash.remove(&h);
                        if let Some((index, r)) = &self.index {
                            index.lock().expect("index lock").remove(*r, &h);
                        }
                    }
                    b
                }
            };
            self.refs[b as usize] = 1;
            out.push(b);
        }
        let from_promise = need.min(seq.promised);
        seq.promised -= from_promise;
        self.promised -= from_promise;
        seq.table.extend_from_slice(&out);
        Some(out)
    }

    /// Every stage has written positions `0..written` of `seq`, whose tokens are `context`:
    /// the blocks this filled are published, unless an equal block was published first (two
    /// sequences computed the same prefix at once; the other keeps it).
    pub(super) fn written(&mut self, seq: &mut SeqBlocks, context: &[u32], written: usize) {
        let Some(root) = seq.root else { return };
        let bs = self.block_size;
        let full = (written / bs).min(seq.table.len());
        while seq.hashes.len() < full {
            let k = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(root);
            let h = prefix::block_hash(&parent, &context[k * bs..(k + 1) * bs]);
            seq.hashes.push(h);
            let b = seq.table[k];
            if self.hash[b as usize].is_none() && !self.by_hash.contains_key(&h) {
                self.hash[b as usize] = Some(h);
                self.by_hash.insert(h, b);
                if let Some((index, r)) = &self.index {
                    index.lock().expect("index lock").insert(*r, h);
                }
            }
        }
    }

    /// `seq` ended: its reservation is given back, and each of its blocks that no one else
    /// holds becomes free (cached when it holds a published prefix).
    pub(super) fn release(&mut self, seq: SeqBlocks) {
        self.promised -= seq.promised;
        for b in seq.table {
            let i = b as usize;
            self.refs[i] -= 1;
            if self.refs[i] > 0 {
                continue;
            }
            if self.hash[i].is_some() {
                self.clock += 1;
                self.freed_at[i] = self.clock;
                self.lru.insert(self.clock, b);
            } else {
                self.empty.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> BlockHash {
        prefix::root(&[b"model"])
    }

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Runs a sequence's whole prompt as one step and publishes it.
    fn prefill(b: &mut Blocks, ctx: &[u32], total: usize) -> SeqBlocks {
        let mut s = b.admit(Some(root()), true, ctx, total).expect("admitted");
        b.grow(&mut s, ctx.len()).expect("grown");
        b.written(&mut s, ctx, ctx.len());
        s
    }

    #[test]
    fn a_finished_prompt_is_found_again_whole_blocks_only_and_never_its_last_token() {
        let mut b = Blocks::new(16, 4, true);
        let ctx = toks(10, 100);
        let s = prefill(&mut b, &ctx, 12);
        assert_eq!(s.table.len(), 3);
        b.release(s);
        // 2 full blocks of the 10 tokens were published; the partial third was not.
        assert_eq!(b.cached(), 2);
        let mut longer = ctx.clone();
        longer.extend(toks(5, 900));
        let found = |b: &mut Blocks, root: Option<BlockHash>, lookup: bool, ctx: &[u32], total: usize| {
            let s = b.admit(root, lookup, ctx, total).expect("admitted");
            let n = (s.cached, s.cached_tokens(4));
            b.release(s);
            n
        };
        assert_eq!(found(&mut b, Some(root()), true, &longer, 20), (2, 8));
        // Exactly 8 tokens: the last token is computed, so only 1 block is taken.
        assert_eq!(found(&mut b, Some(root()), true, &ctx[..8], 9).0, 1);
        // Another root (salt, tenant), another prefix, no lookup, no root: nothing.
        let other = prefix::root(&[b"model", b"salt"]);
        assert_eq!(found(&mut b, Some(other), true, &longer, 20).0, 0);
        let mut changed = longer.clone();
        changed[5] = 7;
        assert_eq!(found(&mut b, Some(root()), true, &changed, 20).0, 1);
        assert_eq!(found(&mut b, Some(root()), false, &longer, 20).0, 0);
        assert_eq!(found(&mut b, None, true, &longer, 20).0, 0);
        assert_eq!((b.reserved(), b.cached()), (0, 2));
    }

    #[test]
    fn with_caching_off_nothing_is_published_or_found() {
        let mut b = Blocks::new(8, 4, false);
        let ctx = toks(9, 1);
        let s = prefill(&mut b, &ctx, 9);
        b.release(s);
        assert_eq!(b.cached(), 0);
        assert_eq!(b.admit(Some(root()), true, &ctx, 9).unwrap().cached, 0);
    }

    #[test]
    fn a_block_is_published_only_once_written_and_a_failed_step_publishes_nothing() {
        let mut b = Blocks::new(8, 4, true);
        let ctx = toks(12, 1);
        let mut s = b.admit(Some(root()), true, &ctx, 12).unwrap();
        // A chunk of 8 goes out: until it comes back, a lookup finds nothing.
        b.grow(&mut s, 8).unwrap();
        assert!(b.lookup(&root(), &ctx).0.is_empty());
        // It came back: both blocks are published, while the writer still runs.
        b.written(&mut s, &ctx, 8);
        let mut reader = b.admit(Some(root()), true, &ctx, 12).unwrap();
        assert_eq!(reader.cached, 2);
        // The writer's next chunk fails: it ends, and its third block is not published.
        b.grow(&mut s, 12).unwrap();
        b.release(s);
        b.grow(&mut reader, 12).unwrap();
        b.written(&mut reader, &ctx, 12);
        b.release(reader);
        let again = b.admit(Some(root()), true, &toks(13, 1), 13).unwrap();
        // The reader's own third block was published once written.
        assert_eq!(again.cached, 3);
    }

    #[test]
    fn two_sequences_computing_one_prefix_at_once_keep_their_own_blocks() {
        let mut b = Blocks::new(8, 4, true);
        let ctx = toks(8, 1);
        let mut s1 = b.admit(Some(root()), true, &ctx, 8).unwrap();
        let mut s2 = b.admit(Some(root()), true, &ctx, 8).unwrap();
        for s in [&mut s1, &mut s2] {
            b.grow(s, 8).unwrap();
        }
        b.written(&mut s1, &ctx, 8);
        b.written(&mut s2, &ctx, 8);
        assert_ne!(s1.table, s2.table);
        let (t1, t2) = (s1.table.clone(), s2.table.clone());
        b.release(s2);
        // The second's blocks were not published (the first's were): they come back empty.
        assert_eq!(b.cached(), 0);
        b.release(s1);
        assert_eq!(b.cached(), 2);
        let hit = b.admit(Some(root()), true, &toks(9, 1), 9).unwrap();
        assert_eq!(hit.table, t1);
        assert!(t2.iter().all(|x| !hit.table.contains(x)));
    }

    #[test]
    fn admission_reserves_what_may_be_needed_and_counts_cached_blocks_as_free() {
        let mut b = Blocks::new(6, 4, true);
        // 3 blocks reserved up front for 12 tokens, though only 1 is taken yet.
        let mut a = b.admit(Some(root()), true, &toks(3, 1), 12).unwrap();
        b.grow(&mut a, 3).unwrap();
        assert_eq!((b.reserved(), b.available()), (3, 3));
        assert!(b.admit(Some(root()), true, &toks(3, 50), 16).is_none());
        let c = b.admit(Some(root()), true, &toks(3, 50), 12).unwrap();
        assert_eq!(b.available(), 0);
        b.release(c);
        b.release(a);
        assert_eq!((b.reserved(), b.available()), (0, 6));
        // Cached blocks are free for a request that shares nothing: it evicts them.
        let s = prefill(&mut b, &toks(16, 1), 16);
        b.release(s);
        assert_eq!(b.cached(), 4);
        let mut big = b.admit(Some(root()), true, &toks(24, 500), 24).unwrap();
        assert_eq!(b.grow(&mut big, 24).unwrap().len(), 6);
        assert_eq!(b.cached(), 0);
        b.release(big);
        assert_eq!(b.admit(Some(root()), true, &toks(16, 1), 16).unwrap().cached, 0);
    }

    #[test]
    fn pinning_a_cached_block_takes_it_out_of_the_free_count() {
        let mut b = Blocks::new(4, 4, true);
        let s = prefill(&mut b, &toks(8, 1), 8);
        b.release(s);
        // 4 free blocks, 2 of them cached. A hit on both that needs 2 more uses all 4.
        let hit = b.admit(Some(root()), true, &toks(9, 1), 16).unwrap();
        assert_eq!((hit.cached, b.available()), (2, 0));
        assert!(b.admit(None, false, &toks(1, 0), 1).is_none());
        b.release(hit);
        assert_eq!(b.available(), 4);
    }

    #[test]
    fn the_least_recently_freed_prefix_is_evicted_first() {
        let mut b = Blocks::new(4, 4, true);
        let old = prefill(&mut b, &toks(4, 1), 4);
        let new = prefill(&mut b, &toks(4, 100), 4);
        b.release(old);
        b.release(new);
        let mut s = b.admit(None, false, &toks(4, 7), 12).unwrap();
        // 2 empty blocks first, then the older cached prefix.
        b.grow(&mut s, 12).unwrap();
        assert!(b.lookup(&root(), &toks(5, 1)).0.is_empty());
        assert_eq!(b.cached(), 1);
        b.release(s);
        assert_eq!(b.lookup(&root(), &toks(5, 100)).0.len(), 1);
    }
}
