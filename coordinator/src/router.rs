//! Which replica of a model serves a request: pure logic, shared by the engine and by
//! `shardctl dev simulate-router`.
//!
//! [`PrefixIndex`] knows which replicas cache which prefix blocks (published by each replica's
//! block manager as it caches and evicts); [`Router`] weighs each replica's overlap with the
//! request's block chain against its load ([`ReplicaLoad`]), as Dynamo's KV router does: a
//! request sent where its prefix is cached skips that much prefill, but a replica already busy
//! makes it wait, so the cost of a replica is the prefill it would still do plus the blocks its
//! sequences hold or will need.

use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// How requests are spread over a model's replicas (`--router`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RouterPolicy {
    /// By the prefix each replica caches and by its load (Dynamo's KV router): the replica
    /// with the least prefill left to do plus KV blocks in use, passing over overloaded ones.
    #[default]
    Kv,
    /// The replica with the fewest requests waiting or running, then the most free KV blocks.
    LeastLoaded,
    /// Each available replica in turn.
    RoundRobin,
}

impl RouterPolicy {
    /// The policy's name as `--router` spells it.
    pub fn name(self) -> &'static str {
        match self {
            RouterPolicy::Kv => "kv",
            RouterPolicy::LeastLoaded => "least-loaded",
            RouterPolicy::RoundRobin => "round-robin",
        }
    }
}

/// Which replicas hold which blocks: each key (a block's chained hash) maps to a bitset of
/// replicas, one bit per replica in `u64` words, so a lookup costs a word per 64 replicas.
/// Each replica's keys are also kept by replica, so that dropping a replica costs what it held.
#[derive(Debug, Clone)]
pub struct PrefixIndex<K> {
    /// How many replicas there are (bits in use in each set).
    replicas: usize,
    /// Key → the replicas holding it. A set may have fewer words than the replica count needs
    /// (it was made before the index grew): missing words are zero. A key no replica holds is
    /// removed.
    holders: HashMap<K, Vec<u64>>,
    /// Replica → the keys it holds.
    held: Vec<HashSet<K>>,
}

impl<K: Hash + Eq + Clone> PrefixIndex<K> {
    /// An empty index over `replicas` replicas.
    pub fn new(replicas: usize) -> Self {
        PrefixIndex { replicas, holders: HashMap::new(), held: (0..replicas).map(|_| HashSet::new()).collect() }
    }

    /// How many replicas the index covers.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Covers at least `replicas` replicas (the new ones hold nothing); never shrinks.
    pub fn grow(&mut self, replicas: usize) {
        if replicas > self.replicas {
            self.held.resize_with(replicas, HashSet::new);
            self.replicas = replicas;
        }
    }

    /// Adds a replica holding nothing; returns its index.
    pub fn add_replica(&mut self) -> usize {
        self.grow(self.replicas + 1);
        self.replicas - 1
    }

    /// How many distinct keys some replica holds.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    /// Whether no replica holds anything.
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }

    /// How many keys `replica` holds.
    pub fn held_by(&self, replica: usize) -> usize {
        self.held.get(replica).map_or(0, HashSet::len)
    }

    /// Whether `replica` holds `key`.
    pub fn holds(&self, replica: usize, key: &K) -> bool {
        self.held.get(replica).is_some_and(|s| s.contains(key))
    }

    /// `replica` now holds `key` (the index grows to cover it); false if it already did.
    pub fn insert(&mut self, replica: usize, key: K) -> bool {
        self.grow(replica + 1);
        if !self.held[replica].insert(key.clone()) {
            return false;
        }
        let bits = self.holders.entry(key).or_default();
        let (word, bit) = (replica / 64, replica % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        bits[word] |= 1 << bit;
        true
    }

    /// `replica` no longer holds `key`; false if it did not.
    pub fn remove(&mut self, replica: usize, key: &K) -> bool {
        if !self.held.get_mut(replica).is_some_and(|s| s.remove(key)) {
            return false;
        }
        self.unset(replica, key);
        true
    }

    /// `replica` holds nothing any more (it was re-planned, or is gone): costs what it held.
    pub fn clear_replica(&mut self, replica: usize) {
        let Some(keys) = self.held.get_mut(replica).map(std::mem::take) else { return };
        for key in &keys {
            self.unset(replica, key);
        }
    }

    /// Clears `replica`'s bit of `key`, dropping the key when no one holds it any more.
    fn unset(&mut self, replica: usize, key: &K) {
        if let Some(bits) = self.holders.get_mut(key) {
            if let Some(w) = bits.get_mut(replica / 64) {
                *w &= !(1u64 << (replica % 64));
            }
            if bits.iter().all(|&w| w == 0) {
                self.holders.remove(key);
            }
        }
    }

    /// For every replica, how many leading blocks of `chain` it holds: the walk intersects the
    /// holders of each block in turn and stops at the first block no replica still in the
    /// running holds, so it costs the matched depth × the words of a set. A block held after a
    /// gap does not count (its keys and values were computed over the blocks before it).
    pub fn overlaps(&self, chain: &[K]) -> Vec<usize> {
        let mut out = vec![0; self.replicas];
        let Some(first) = chain.first().and_then(|k| self.holders.get(k)) else { return out };
        let mut live = first.clone();
        let mut depth = 1;
        for key in &chain[1..] {
            let Some(bits) = self.holders.get(key) else { break };
            let mut any = false;
            for (w, word) in live.iter_mut().enumerate() {
                let next = *word & bits.get(w).copied().unwrap_or(0);
                set_depth(&mut out, w, *word & !next, depth);
                *word = next;
                any |= next != 0;
            }
            if !any {
                return out;
            }
            depth += 1;
        }
        for (w, &word) in live.iter().enumerate() {
            set_depth(&mut out, w, word, depth);
        }
        out
    }
}

/// Writes `depth` for each replica whose bit is set in `word` (word number `w`).
fn set_depth(out: &mut [usize], w: usize, mut word: u64, depth: usize) {
    while word != 0 {
        let r = w * 64 + word.trailing_zeros() as usize;
        if let Some(o) = out.get_mut(r) {
            *o = depth;
        }
        word &= word - 1;
    }
}

/// The KV policy's default weight of a block to prefill against a block in use.
///
/// Dynamo defaults to 1, for GPUs. Here a prefill block costs far more than a block held by a
/// decoding sequence: on the development machine's CPU 16 tokens of prefill take about 150 ms,
/// while a sequence's 140-odd blocks slow each decode step by about 13 ms (83 ms at batch 1,
/// 484 ms at 32), some 10 ms a block over a 100-token answer. At weight 1 a replica that caches
/// a request's 2,000-token prefix loses it to an idle one as soon as it runs one other
/// sequence. In `shardctl dev simulate-router` (500 prefixes over 64 replicas, the defaults)
/// the KV router at weight 1 caches 13% of prompt tokens, its median TTFT is round robin's and
/// its p99 half again as long; from weight 3 on it caches about half of them and halves the
/// median, and higher weights change little.
pub const DEFAULT_OVERLAP_WEIGHT: f64 = 4.0;

/// A replica's load as the router weighs it, in requests and KV blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaLoad {
    /// Requests routed here and not yet admitted into its batch.
    pub waiting: usize,
    /// Sequences in its batch.
    pub running: usize,
    /// Blocks that its running and waiting sequences hold or will need.
    pub active_blocks: usize,
    /// Blocks neither held nor reserved (cached blocks no sequence holds count as free).
    pub free_blocks: usize,
    /// Whether it serves now; one that does not is never picked.
    pub available: bool,
}

impl ReplicaLoad {
    /// Whether the KV router passes this replica over while another is not overloaded: it
    /// cannot take `new_blocks` more blocks now (they would wait for others to end), or more
    /// than twice its batch plus four requests wait for it (its queue outgrows what the next
    /// steps admit, so any prefix it caches would be paid for in queueing).
    pub fn overloaded(&self, new_blocks: usize) -> bool {
        self.free_blocks < new_blocks || self.waiting > 2 * self.running + 4
    }
}

/// Picks a replica for each request by a [`RouterPolicy`].
#[derive(Debug, Clone)]
pub struct Router {
    /// How it picks.
    policy: RouterPolicy,
    /// KV policy: the weight of a block to prefill against a block in use
    /// ([`DEFAULT_OVERLAP_WEIGHT`] by default).
    overlap_weight: f64,
    /// KV policy: 0 picks the cheapest replica (ties to the lowest index); above 0 samples by
    /// a softmax of −cost / the highest cost at this temperature.
    temperature: f64,
    /// Round robin: where the next turn starts.
    next: usize,
    /// Draws the KV policy's samples.
    rng: rand::rngs::StdRng,
}

impl Router {
    /// A router by `policy`, the default overlap weight, temperature 0, its randomness from
    /// the OS.
    pub fn new(policy: RouterPolicy) -> Self {
        Router { policy, overlap_weight: DEFAULT_OVERLAP_WEIGHT, temperature: 0.0, next: 0, rng: rand::rngs::StdRng::from_os_rng() }
    }

    /// A router as [`Router::new`] whose samples are drawn from `seed`.
    pub fn seeded(policy: RouterPolicy, seed: u64) -> Self {
        Router { rng: rand::rngs::StdRng::seed_from_u64(seed), ..Router::new(policy) }
    }

    /// With this weight of a block to prefill against a block in use (KV policy).
    pub fn with_overlap_weight(mut self, weight: f64) -> Self {
        self.overlap_weight = weight;
        self
    }

    /// With this sampling temperature (KV policy; 0 picks the cheapest).
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = temperature;
        self
    }

    /// How it picks.
    pub fn policy(&self) -> RouterPolicy {
        self.policy
    }

    /// The replica (an index into `loads`) for a request of `request_blocks` KV blocks (prompt
    /// and new tokens) whose leading `overlaps[r]` blocks replica `r` caches (missing entries
    /// are 0); `None` when no replica is available.
    pub fn pick(&mut self, request_blocks: usize, overlaps: &[usize], loads: &[ReplicaLoad]) -> Option<usize> {
        let n = loads.len();
        match self.policy {
            RouterPolicy::RoundRobin => {
                let r = (0..n).map(|i| (self.next + i) % n).find(|&r| loads[r].available)?;
                self.next = (r + 1) % n;
                Some(r)
            }
            RouterPolicy::LeastLoaded => loads
                .iter()
                .enumerate()
                .filter(|(_, l)| l.available)
                .min_by(|(_, a), (_, b)| (a.waiting + a.running).cmp(&(b.waiting + b.running)).then(b.free_blocks.cmp(&a.free_blocks)))
                .map(|(r, _)| r),
            RouterPolicy::Kv => self.pick_kv(request_blocks, overlaps, loads),
        }
    }

    /// The KV policy: cost(r) = overlap weight × blocks to prefill + active blocks, over the
    /// replicas not overloaded (all available ones when every one is).
    fn pick_kv(&mut self, request_blocks: usize, overlaps: &[usize], loads: &[ReplicaLoad]) -> Option<usize> {
        let mut candidates: Vec<(usize, f64, bool)> = loads
            .iter()
            .enumerate()
            .filter(|(_, l)| l.available)
            .map(|(r, l)| {
                let prefill = request_blocks - overlaps.get(r).copied().unwrap_or(0).min(request_blocks);
                (r, self.overlap_weight * prefill as f64 + l.active_blocks as f64, l.overloaded(prefill))
            })
            .collect();
        if candidates.iter().any(|c| !c.2) {
            candidates.retain(|c| !c.2);
        }
        if candidates.is_empty() {
            return None;
        }
        if self.temperature <= 0.0 {
            // The first of equal costs: ties go to the lowest index.
            let best = candidates.iter().fold(candidates[0], |best, &c| if c.1 < best.1 { c } else { best });
            return Some(best.0);
        }
        // Dynamo's sampling: costs normalised by the highest, so the temperature means the
        // same whatever the request's size.
        let max = candidates.iter().map(|c| c.1).fold(0.0, f64::max);
        let scale = if max > 0.0 { max } else { 1.0 };
        let logits: Vec<f64> = candidates.iter().map(|c| -c.1 / scale / self.temperature).collect();
        let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
        let mut x = self.rng.random::<f64>() * weights.iter().sum::<f64>();
        for (c, w) in candidates.iter().zip(&weights) {
            if x < *w {
                return Some(c.0);
            }
            x -= w;
        }
        candidates.last().map(|c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An available replica with these requests and blocks.
    fn load(waiting: usize, running: usize, active_blocks: usize, free_blocks: usize) -> ReplicaLoad {
        ReplicaLoad { waiting, running, active_blocks, free_blocks, available: true }
    }

    #[test]
    fn the_longest_overlap_wins_at_equal_load() {
        let mut r = Router::seeded(RouterPolicy::Kv, 1);
        let loads = vec![load(0, 2, 100, 1000); 4];
        assert_eq!(r.pick(20, &[3, 15, 8, 0], &loads), Some(1));
        assert_eq!(r.pick(20, &[3, 15, 18], &loads), Some(2), "a missing overlap counts as 0");
    }

    #[test]
    fn a_loaded_replica_loses_to_an_idle_one_when_the_overlap_is_small() {
        let mut r = Router::seeded(RouterPolicy::Kv, 1).with_overlap_weight(1.0);
        let loads = [load(0, 8, 400, 600), load(0, 0, 0, 1000)];
        // Replica 0 saves 4 blocks of prefill but has 400 blocks in use: 16 + 400 > 20 + 0.
        assert_eq!(r.pick(20, &[4, 0], &loads), Some(1));
        // A large overlap outweighs a light load: 2 + 30 < 100 + 0.
        let loads = [load(0, 1, 30, 900), load(0, 0, 0, 1000)];
        assert_eq!(r.pick(100, &[98, 0], &loads), Some(0));
        // The weight sets the exchange rate: 1 + 30 > 25 + 0 at weight 1, 4 + 30 < 100 at 4.
        let loads = [load(0, 1, 30, 900), load(0, 0, 0, 1000)];
        assert_eq!(r.pick(25, &[24, 0], &loads), Some(1));
        let mut r = Router::seeded(RouterPolicy::Kv, 1);
        assert_eq!(r.pick(25, &[24, 0], &loads), Some(0));
    }

    #[test]
    fn an_overloaded_replica_holding_the_prefix_is_passed_over() {
        let mut r = Router::seeded(RouterPolicy::Kv, 1);
        // No room for the 2 blocks it would allocate.
        let full = [load(0, 1, 10, 1), load(0, 4, 300, 500)];
        assert_eq!(r.pick(100, &[98, 0], &full), Some(1));
        // Too long a queue: 11 waiting > 2 × 3 + 4.
        let queued = [load(11, 3, 10, 900), load(0, 4, 300, 500)];
        assert_eq!(r.pick(100, &[98, 0], &queued), Some(1));
        // 10 waiting is not yet overloaded.
        let queued = [load(10, 3, 10, 900), load(0, 4, 300, 500)];
        assert_eq!(r.pick(100, &[98, 0], &queued), Some(0));
        // When every replica is overloaded, the cheapest still serves.
        let all = [load(0, 1, 10, 1), load(0, 4, 300, 50)];
        assert_eq!(r.pick(100, &[98, 0], &all), Some(0));
    }

    #[test]
    fn ties_go_to_the_lowest_index_at_temperature_0() {
        let mut r = Router::seeded(RouterPolicy::Kv, 1);
        let loads = [load(0, 1, 50, 100), load(0, 0, 10, 100), load(0, 0, 10, 100)];
        assert_eq!(r.pick(10, &[], &loads), Some(1));
        assert_eq!(r.pick(10, &[0, 0, 0], &loads), Some(1));
    }

    #[test]
    fn temperature_samples_favouring_the_cheap() {
        let mut r = Router::seeded(RouterPolicy::Kv, 7).with_temperature(0.5);
        let loads = [load(0, 0, 0, 1000), load(0, 0, 0, 1000)];
        let picks: Vec<usize> = (0..400).filter_map(|_| r.pick(100, &[90, 0], &loads)).collect();
        let cheap = picks.iter().filter(|&&p| p == 0).count();
        // Costs 10 and 100: weights e^{-0.2} and e^{-2}, so about 86% go to replica 0.
        assert!((300..=380).contains(&cheap), "{cheap} of 400 to the cheap replica");
    }

    #[test]
    fn round_robin_cycles_and_skips_the_unavailable() {
        let mut r = Router::new(RouterPolicy::RoundRobin);
        let mut loads = vec![load(0, 0, 0, 10); 4];
        loads[2].available = false;
        let picks: Vec<_> = (0..6).map(|_| r.pick(1, &[], &loads).expect("a replica")).collect();
        assert_eq!(picks, [0, 1, 3, 0, 1, 3]);
        let none = vec![ReplicaLoad::default(); 3];
        assert_eq!(r.pick(1, &[], &none), None);
        assert_eq!(Router::new(RouterPolicy::Kv).pick(1, &[], &none), None);
        assert_eq!(Router::new(RouterPolicy::LeastLoaded).pick(1, &[], &[]), None);
    }

    #[test]
    fn least_loaded_counts_requests_then_free_blocks() {
        let mut r = Router::new(RouterPolicy::LeastLoaded);
        let mut loads = [load(1, 3, 0, 500), load(0, 2, 0, 100), load(1, 1, 0, 300), load(0, 0, 0, 900)];
        loads[3].available = false;
        // Replicas 1 and 2 have 2 requests each; 2 has more free blocks. The overlap is ignored.
        assert_eq!(r.pick(10, &[10, 10, 0, 0], &loads), Some(2));
    }

    #[test]
    fn overlaps_count_leading_blocks_only() {
        let mut ix = PrefixIndex::new(3);
        for k in [10, 11, 13] {
            ix.insert(0, k);
        }
        for k in [10, 11, 12, 13] {
            ix.insert(1, k);
        }
        ix.insert(2, 11);
        // Replica 0 holds blocks 0, 1 and 3 of the chain: the gap stops it at 2.
        assert_eq!(ix.overlaps(&[10, 11, 12, 13]), [2, 4, 0]);
        assert_eq!(ix.overlaps(&[11, 12]), [1, 2, 1]);
        assert_eq!(ix.overlaps(&[99, 10]), [0, 0, 0]);
        assert_eq!(ix.overlaps(&[]), [0, 0, 0]);

        assert!(ix.remove(1, &11));
        assert!(!ix.remove(1, &11), "removed already");
        assert_eq!(ix.overlaps(&[10, 11, 12, 13]), [2, 1, 0]);
        ix.clear_replica(0);
        assert_eq!(ix.overlaps(&[10, 11, 12, 13]), [0, 1, 0]);
        assert_eq!(ix.held_by(0), 0);
        // Replica 2 still holds 11; 13 (held by 1 only) is still known; 10 is only replica 1's.
        assert!(ix.holds(2, &11) && ix.holds(1, &13) && !ix.holds(0, &10));
        ix.clear_replica(1);
        ix.clear_replica(2);
        assert!(ix.is_empty(), "keys no replica holds are dropped");
    }

    #[test]
    fn the_index_covers_hundreds_of_replicas_and_grows() {
        let mut ix = PrefixIndex::new(2);
        ix.insert(0, 1u64);
        ix.grow(600);
        assert_eq!(ix.replicas(), 600);
        for r in [63, 64, 130, 599] {
            ix.insert(r, 1);
            ix.insert(r, 2);
        }
        ix.insert(599, 3);
        let o = ix.overlaps(&[1, 2, 3]);
        assert_eq!((o[0], o[63], o[64], o[130], o[599], o[1]), (1, 2, 2, 2, 3, 0));
        assert_eq!(ix.add_replica(), 600);
        ix.insert(600, 1);
        assert_eq!(ix.overlaps(&[1, 2]).len(), 601);
        assert_eq!(ix.overlaps(&[1, 2])[600], 1);
        ix.clear_replica(599);
        assert_eq!(ix.overlaps(&[1, 2, 3])[599], 0);
        assert_eq!(ix.len(), 2);
    }
}
