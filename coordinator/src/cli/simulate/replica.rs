//! The simulation itself: the modelled replicas and the events that drive them.
//!
//! A replica is the engine's scheduler reduced to its costs. It runs steps back to back while
//! it has work. At a step's start it admits waiting requests in arrival order while their
//! blocks fit and its batch has room: a request reserves the blocks of its whole prompt and
//! output up front, less the leading prompt blocks its cache holds (only whole blocks are
//! cached, and the last prompt token is always computed, so a prompt of exactly k blocks reuses
//! at most k − 1), evicting the cached blocks no sequence holds, least recently freed first.
//! The step is planned as the scheduler plans it (`engine/steps.rs`): a row for each decoding
//! sequence, then prefill chunks of at most `--prefill-chunk` tokens in admission order, within
//! `--max-batch-tokens` rows; it costs the prefill rows × the prefill cost per token plus a
//! decode step of that many sequences. At its end the prompt blocks a chunk filled are cached
//! (and published to the index), a sequence whose prompt is done has its first token, the
//! decoding ones one more, and a sequence with all its tokens ends, its cached blocks kept
//! until evicted.

use super::{Outcome, SimConfig, TraceRequest};
use crate::router::{PrefixIndex, ReplicaLoad, Router, RouterPolicy};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

/// A cached block.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Sequences holding it; at 0 it is evictable.
    refs: u32,
    /// When it was last freed: matches its live record in the eviction queue.
    stamp: u64,
}

/// A request routed to a replica, not yet admitted.
#[derive(Debug)]
struct Waiting {
    req: usize,
    chain: Vec<u64>,
    /// The blocks the router counted it as needing (its load until admitted).
    estimate: usize,
}

/// A sequence in a replica's batch.
#[derive(Debug)]
struct Seq {
    req: usize,
    /// Its whole prompt blocks' ids (dropped once all are written).
    chain: Vec<u64>,
    /// Prompt tokens written (cached ones included).
    written: usize,
    /// Blocks of `chain` cached, or looked at for caching, so far.
    published: usize,
    /// Tokens still to generate.
    left: usize,
    /// Blocks it alone holds.
    private: usize,
    /// Cached blocks it holds a reference on.
    refs: Vec<u64>,
    /// Rows it has in the step now running.
    rows: usize,
}

/// One modelled replica.
#[derive(Debug, Default)]
struct Replica {
    queue: VecDeque<Waiting>,
    running: Vec<Seq>,
    busy: bool,
    /// Cached blocks by id (a block a sequence alone holds is not here).
    cache: HashMap<u64, Entry>,
    /// Evictable blocks, least recently freed first: (stamp, id); a record whose stamp no
    /// longer matches its entry's (or whose entry is held or gone) is stale and skipped.
    lru: VecDeque<(u64, u64)>,
    /// Blocks held by single sequences.
    private: usize,
    /// Cached blocks some sequence holds.
    referenced: usize,
    /// Blocks the waiting requests were counted as needing.
    waiting_blocks: usize,
}

/// A step's end on a replica, ordered by time (then replica) for the event queue.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StepEnd(f64, usize);

impl Eq for StepEnd {}

impl PartialOrd for StepEnd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StepEnd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// A simulation in progress.
struct Sim<'a> {
    cfg: &'a SimConfig,
    trace: &'a [TraceRequest],
    replicas: Vec<Replica>,
    index: PrefixIndex<u64>,
    router: Router,
    events: BinaryHeap<Reverse<StepEnd>>,
    stamp: u64,
    out: Outcome,
}

/// Replays `trace` over `cfg.replicas` replicas routed by `policy`.
pub(super) fn simulate(cfg: &SimConfig, trace: &[TraceRequest], policy: RouterPolicy) -> Outcome {
    let router = Router::seeded(policy, cfg.seed).with_overlap_weight(cfg.overlap_weight).with_temperature(cfg.temperature);
    let mut sim = Sim {
        cfg,
        trace,
        replicas: (0..cfg.replicas).map(|_| Replica::default()).collect(),
        index: PrefixIndex::new(cfg.replicas),
        router,
        events: BinaryHeap::new(),
        stamp: 0,
        out: Outcome::default(),
    };
    let mut next = 0;
    loop {
        let step = sim.events.peek().map(|e| e.0);
        match (step, trace.get(next)) {
            // A step that ends when a request arrives ends first: its room goes to the newcomer.
            (Some(StepEnd(t, r)), req) if req.is_none_or(|q| t <= q.arrival_ms) => {
                sim.events.pop();
                sim.end_step(r, t);
                sim.start_step(r, t);
            }
            (_, Some(req)) => {
                sim.arrive(next, req.arrival_ms);
                next += 1;
            }
            // (A step with no arrival left is taken by the first arm.)
            _ => break,
        }
    }
    sim.out
}

impl Sim<'_> {
    /// Routes request `i`, arriving at `now`.
    fn arrive(&mut self, i: usize, now: f64) {
        let (bs, kv) = (self.cfg.block_size, self.cfg.kv_blocks);
        let req = &self.trace[i];
        self.out.first_arrival_ms.get_or_insert(now);
        let blocks = (req.input + req.output).div_ceil(bs);
        if blocks > kv {
            // It could never be admitted, as the scheduler rejects a request larger than its pool.
            self.out.rejected += 1;
            return;
        }
        let chain = req.chain(bs);
        let reusable = ((req.input - 1) / bs).min(chain.len());
        let overlaps = self.index.overlaps(&chain[..reusable]);
        let loads: Vec<ReplicaLoad> = self
            .replicas
            .iter()
            .map(|r| {
                let active = r.private + r.referenced + r.waiting_blocks;
                ReplicaLoad {
                    waiting: r.queue.len(),
                    running: r.running.len(),
                    active_blocks: active,
                    free_blocks: kv.saturating_sub(active),
                    available: true,
                }
            })
            .collect();
        let r = self.router.pick(blocks, &overlaps, &loads).expect("every replica is available");
        let estimate = blocks - overlaps[r].min(blocks);
        let rep = &mut self.replicas[r];
        rep.waiting_blocks += estimate;
        rep.queue.push_back(Waiting { req: i, chain, estimate });
        if !rep.busy {
            self.start_step(r, now);
        }
    }

    /// Replica `r` is idle at `now`: admits what fits and starts a step, if it has work.
    fn start_step(&mut self, r: usize, now: f64) {
        let (bs, kv) = (self.cfg.block_size, self.cfg.kv_blocks);
        let rep = &mut self.replicas[r];
        while rep.running.len() < self.cfg.max_batch {
            let Some(w) = rep.queue.front() else { break };
            let req = &self.trace[w.req];
            let reusable = ((req.input - 1) / bs).min(w.chain.len());
            let reused = w.chain[..reusable].iter().take_while(|k| rep.cache.contains_key(k)).count();
            let need = (req.input + req.output).div_ceil(bs) - reused;
            let idle_reused = w.chain[..reused].iter().filter(|k| rep.cache[k].refs == 0).count();
            let empty = kv - rep.private - rep.cache.len();
            let evictable = rep.cache.len() - rep.referenced - idle_reused;
            if empty + evictable < need {
                break;
            }
            let w = rep.queue.pop_front().expect("looked at");
            rep.waiting_blocks -= w.estimate;
            for k in &w.chain[..reused] {
                let e = rep.cache.get_mut(k).expect("counted as cached");
                e.refs += 1;
                if e.refs == 1 {
                    rep.referenced += 1;
                }
            }
            while kv - rep.private - rep.cache.len() < need {
                let (stamp, k) = rep.lru.pop_front().expect("counted as evictable");
                if rep.cache.get(&k).is_some_and(|e| e.refs == 0 && e.stamp == stamp) {
                    rep.cache.remove(&k);
                    self.index.remove(r, &k);
                }
            }
            rep.private += need;
            self.out.prompt_tokens += req.input;
            self.out.cached_tokens += reused * bs;
            let refs = w.chain[..reused].to_vec();
            rep.running.push(Seq {
                req: w.req,
                chain: w.chain,
                written: reused * bs,
                published: reused,
                left: req.output,
                private: need,
                refs,
                rows: 0,
            });
        }
        if rep.running.is_empty() {
            return;
        }
        // Decode rows first, then prefill chunks in admission order, within the row budget.
        let (mut budget, mut decoding, mut prefill) = (self.cfg.max_batch_tokens, 0, 0);
        for pass in [false, true] {
            for seq in rep.running.iter_mut() {
                let to_write = self.trace[seq.req].input - seq.written;
                if (to_write > 0) != pass {
                    continue;
                }
                seq.rows = if pass { to_write.min(self.cfg.prefill_chunk) } else { 1 }.min(budget);
                budget -= seq.rows;
                if pass {
                    prefill += seq.rows;
                } else {
                    decoding += seq.rows;
                }
            }
        }
        let ms = prefill as f64 * self.cfg.cost.prefill_ms_per_token + self.cfg.cost.decode_ms(decoding);
        rep.busy = true;
        self.out.busy_ms += ms;
        self.events.push(Reverse(StepEnd(now + ms, r)));
    }

    /// Replica `r`'s step ends at `now`: the prompt blocks its chunks filled are cached; a
    /// sequence whose prompt is done has its first token, the decoding ones one more; finished
    /// sequences free their blocks.
    fn end_step(&mut self, r: usize, now: f64) {
        let bs = self.cfg.block_size;
        let rep = &mut self.replicas[r];
        rep.busy = false;
        let running = std::mem::take(&mut rep.running);
        for mut seq in running {
            let (rows, input) = (std::mem::take(&mut seq.rows), self.trace[seq.req].input);
            if rows == 0 {
                rep.running.push(seq);
                continue;
            }
            if seq.written < input {
                seq.written += rows;
                let full = (seq.written / bs).min(seq.chain.len());
                for &k in &seq.chain[seq.published..full] {
                    // A block another sequence cached first stays this one's own.
                    if let std::collections::hash_map::Entry::Vacant(v) = rep.cache.entry(k) {
                        v.insert(Entry { refs: 1, stamp: 0 });
                        rep.referenced += 1;
                        rep.private -= 1;
                        seq.private -= 1;
                        seq.refs.push(k);
                        self.index.insert(r, k);
                    }
                }
                seq.published = full;
                if seq.written < input {
                    rep.running.push(seq);
                    continue;
                }
                seq.chain = Vec::new();
                self.out.ttft_ms.push(now - self.trace[seq.req].arrival_ms);
            }
            seq.left -= 1;
            if seq.left > 0 {
                rep.running.push(seq);
                continue;
            }
            rep.private -= seq.private;
            // The tail first: a prefix's later blocks are evicted before its earlier ones.
            for k in seq.refs.iter().rev() {
                let e = rep.cache.get_mut(k).expect("a held block stays cached");
                e.refs -= 1;
                if e.refs == 0 {
                    rep.referenced -= 1;
                    self.stamp += 1;
                    e.stamp = self.stamp;
                    rep.lru.push_back((self.stamp, *k));
                }
            }
            self.out.output_tokens += self.trace[seq.req].output;
            self.out.finished += 1;
            self.out.last_finish_ms = now;
        }
        // Stale records are dropped once they outnumber the live ones.
        if rep.lru.len() > 2 * rep.cache.len() + 64 {
            let cache = &rep.cache;
            rep.lru.retain(|(stamp, k)| cache.get(k).is_some_and(|e| e.refs == 0 && e.stamp == *stamp));
        }
    }
}
