//! `shardctl dev simulate-router`: a discrete-event simulation of a model's replicas that
//! replays a request trace (Mooncake's JSONL, or a synthetic one) through the engine's own
//! [`Router`] and [`PrefixIndex`], and reports per routing policy TTFT, throughput and the
//! prefix cache's hit rate.
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

use crate::router::{PrefixIndex, ReplicaLoad, Router, RouterPolicy};
use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::BufRead;
use std::path::PathBuf;

/// KV capacity of a replica when `--kv-blocks` is not given, in tokens: 2,048 blocks of 16
/// tokens, which holds about 10 of the synthetic trace's 2,000-token prefixes beside a batch,
/// so a replica caches a few percent of 500 prefixes, not all of them.
const DEFAULT_KV_TOKENS: usize = 32_768;

/// The synthetic arrival rate when `--rate` is not given, per replica (requests/s).
const DEFAULT_RATE_PER_REPLICA: f64 = 0.04;

/// Arguments of `shardctl dev simulate-router`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Replicas of the model.
    #[arg(long, default_value_t = 64)]
    pub replicas: usize,
    /// The routing policies to compare, comma-separated.
    #[arg(long = "router", value_enum, value_delimiter = ',', default_values_t = [RouterPolicy::Kv, RouterPolicy::LeastLoaded, RouterPolicy::RoundRobin])]
    pub routers: Vec<RouterPolicy>,
    /// Replay this Mooncake trace (JSONL: `timestamp` in ms, `input_length`, `output_length`,
    /// `hash_ids`, one id per block of --block-size tokens) instead of a synthetic one.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Requests: generated (default 10000), or the trace's first N (default all).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Synthetic arrivals: a Poisson process at this rate, requests/s (default 0.04 per replica).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seed of the synthetic trace and of the KV router's sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Synthetic: the fraction of requests that start with a shared prefix (the others share
    /// nothing).
    #[arg(long, default_value_t = 0.7)]
    pub shared_fraction: f64,
    /// Synthetic: shared prefixes, each request drawing one uniformly.
    #[arg(long, default_value_t = 500)]
    pub prefixes: usize,
    /// Synthetic: tokens of each shared prefix.
    #[arg(long, default_value_t = 2000)]
    pub prefix_tokens: usize,
    /// Synthetic: prompt tokens after the prefix (a request that shares none has its own
    /// prefix-tokens + suffix-tokens).
    #[arg(long, default_value_t = 200)]
    pub suffix_tokens: usize,
    /// Synthetic: tokens each request generates.
    #[arg(long, default_value_t = 100)]
    pub output_tokens: usize,
    /// Tokens per KV block (default: 16, or 512 with --trace, as Mooncake's hash ids are).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// KV blocks per replica (default: 32768 tokens' worth, 2048 blocks of 16).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Sequences a replica's batch holds.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most prompt tokens of one sequence per step (the coordinator's --prefill-chunk).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Most rows (decode tokens and prefill chunks) per step (the coordinator's
    /// --max-batch-tokens).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Take the costs from a `shardctl bench --json` document: prefill ms per token from the
    /// concurrency-1 TTFT, decode step ms from each level's inter-token p50.
    #[arg(long)]
    pub bench: Option<PathBuf>,
    /// Prefill cost per uncached prompt token, ms (default 9.2, or from --bench).
    #[arg(long)]
    pub prefill_ms_per_token: Option<f64>,
    /// Decode step ms by batch size, BATCH:MS comma-separated, interpolated linearly between
    /// and extrapolated beyond (default 1:83,8:217,16:325,32:484, or from --bench).
    #[arg(long, value_delimiter = ',')]
    pub decode_ms: Vec<DecodePoint>,
    /// KV router: the weight of a block to prefill against a block in use (the engine's
    /// default, `router::DEFAULT_OVERLAP_WEIGHT`).
    #[arg(long, default_value_t = crate::router::DEFAULT_OVERLAP_WEIGHT)]
    pub overlap_weight: f64,
    /// KV router: 0 picks the cheapest replica; above 0 samples (softmax over normalised costs).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// A measured decode step: `batch` sequences took `ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DecodePoint {
    /// Sequences in the step.
    pub batch: usize,
    /// Its duration, ms.
    pub ms: f64,
}

impl std::str::FromStr for DecodePoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (b, ms) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected BATCH:MS"))?;
        let batch = b.trim().parse().map_err(|e| format!("{s:?}: batch {b:?}: {e}"))?;
        let ms: f64 = ms.trim().parse().map_err(|e| format!("{s:?}: ms {ms:?}: {e}"))?;
        if batch == 0 || !ms.is_finite() || ms <= 0.0 {
            return Err(format!("{s:?}: the batch must be at least 1 and the ms above 0"));
        }
        Ok(DecodePoint { batch, ms })
    }
}

/// What a replica's work costs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct CostModel {
    /// Prefill, ms per uncached prompt token.
    prefill_ms_per_token: f64,
    /// Decode steps measured, by batch, increasing, at least one.
    decode_ms: Vec<DecodePoint>,
}

/// The part of a `shardctl bench --json` document the cost model reads.
#[derive(Debug, Deserialize)]
struct BenchDoc {
    prompt_tokens: usize,
    runs: Vec<BenchRun>,
}

/// One level of a bench document (open-loop levels have no concurrency and are skipped).
#[derive(Debug, Deserialize)]
struct BenchRun {
    concurrency: Option<usize>,
    ours: Option<BenchSide>,
}

/// The cluster's figures at one level.
#[derive(Debug, Deserialize)]
struct BenchSide {
    ttft_ms: Percentiles,
    itl_ms: Percentiles,
}

/// A median (null when nothing was measured).
#[derive(Debug, Deserialize)]
struct Percentiles {
    p50: Option<f64>,
}

impl CostModel {
    /// The README's 1-worker figures on the 2-core development machine.
    fn development_machine() -> Self {
        let decode_ms = [(1, 83.0), (8, 217.0), (16, 325.0), (32, 484.0)].map(|(batch, ms)| DecodePoint { batch, ms }).to_vec();
        CostModel { prefill_ms_per_token: 9.2, decode_ms }
    }

    /// From a `shardctl bench --json` document.
    fn from_bench(text: &str) -> anyhow::Result<Self> {
        let doc: BenchDoc = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))?;
        let levels: Vec<(usize, &BenchSide)> = doc.runs.iter().filter_map(|r| Some((r.concurrency?, r.ours.as_ref()?))).collect();
        let ttft = levels.iter().find(|(c, _)| *c == 1).and_then(|(_, s)| s.ttft_ms.p50);
        let Some(ttft) = ttft.filter(|t| *t > 0.0 && doc.prompt_tokens > 0) else {
            bail!("no concurrency-1 run with the cluster's TTFT p50 (ours.ttft_ms.p50) to take the prefill cost from");
        };
        let decode_ms =
            levels.iter().filter_map(|(c, s)| Some(DecodePoint { batch: *c, ms: s.itl_ms.p50.filter(|m| *m > 0.0)? })).collect();
        CostModel::new(ttft / doc.prompt_tokens as f64, decode_ms)
    }

    /// Checked: a positive prefill cost and at least one decode point (sorted here).
    fn new(prefill_ms_per_token: f64, mut decode_ms: Vec<DecodePoint>) -> anyhow::Result<Self> {
        if !(prefill_ms_per_token.is_finite() && prefill_ms_per_token > 0.0) {
            bail!("the prefill cost must be above 0 ms per token, not {prefill_ms_per_token}");
        }
        decode_ms.sort_by_key(|p| p.batch);
        decode_ms.dedup_by_key(|p| p.batch);
        if decode_ms.is_empty() {
            bail!("no decode step cost (inter-token p50 by concurrency)");
        }
        Ok(CostModel { prefill_ms_per_token, decode_ms })
    }

    /// A decode step of `batch` sequences, ms: linear between the measured batch sizes, and
    /// beyond them along the nearest segment (0 for an empty batch).
    fn decode_ms(&self, batch: usize) -> f64 {
        let p = &self.decode_ms;
        if batch == 0 {
            return 0.0;
        }
        if p.len() == 1 {
            return p[0].ms;
        }
        let i = p.partition_point(|q| q.batch < batch).clamp(1, p.len() - 1);
        let (a, b) = (p[i - 1], p[i]);
        let ms = a.ms + (batch as f64 - a.batch as f64) * (b.ms - a.ms) / (b.batch - a.batch) as f64;
        ms.max(0.0)
    }
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TraceRequest {
    /// When it arrives, ms.
    arrival_ms: f64,
    /// Prompt tokens.
    input: usize,
    /// Tokens it generates (at least 1).
    output: usize,
    /// Its blocks' ids.
    blocks: BlockIds,
}

/// The ids of a request's blocks: equal ids are equal prefixes (as chained hashes are).
#[derive(Debug, Clone, PartialEq)]
enum BlockIds {
    /// From a trace: an id per block, the last maybe partial.
    Listed(Vec<u64>),
    /// Synthetic: the first `prefix_blocks` blocks are `prefix..`, when shared, and the others
    /// `unique + k` for block k (kept as a formula: 100,000 requests of 137 blocks would be
    /// 100 MB of ids).
    Synthetic { prefix: Option<u64>, prefix_blocks: usize, unique: u64 },
}

impl TraceRequest {
    /// The ids of its whole prompt blocks: what gets cached.
    fn chain(&self, block_size: usize) -> Vec<u64> {
        let full = self.input / block_size;
        match &self.blocks {
            BlockIds::Listed(ids) => ids[..full.min(ids.len())].to_vec(),
            BlockIds::Synthetic { prefix, prefix_blocks, unique } => (0..full)
                .map(|k| match prefix {
                    Some(p) if k < *prefix_blocks => p + k as u64,
                    _ => unique + k as u64,
                })
                .collect(),
        }
    }
}

/// One line of a Mooncake trace.
#[derive(Debug, Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    hash_ids: Vec<u64>,
}

/// Reads a Mooncake JSONL trace (`name` for messages), its first `limit` requests if given,
/// in arrival order; an error names the line.
pub(crate) fn parse_trace(reader: impl BufRead, name: &str, block_size: usize, limit: Option<usize>) -> anyhow::Result<Vec<TraceRequest>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let n = i + 1;
        let line = line.with_context(|| format!("{name} line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: MooncakeLine = serde_json::from_str(&line).with_context(|| format!("{name} line {n}"))?;
        let full = l.input_length / block_size;
        if l.input_length == 0 || l.hash_ids.len() < full {
            bail!(
                "{name} line {n}: {} hash_ids for {} input tokens: expected one per block of {block_size} tokens (--block-size)",
                l.hash_ids.len(),
                l.input_length
            );
        }
        out.push(TraceRequest {
            arrival_ms: l.timestamp,
            input: l.input_length,
            output: l.output_length.max(1),
            blocks: BlockIds::Listed(l.hash_ids),
        });
    }
    out.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
    Ok(out)
}

/// The synthetic trace: Poisson arrivals of prompts of prefix + suffix tokens; a
/// `shared_fraction` of them start with one of `prefixes` prefixes drawn uniformly, then tokens
/// of their own; the others are their own throughout.
fn synthetic(a: &SimulateArgs, requests: usize, rate: f64, block_size: usize) -> Vec<TraceRequest> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let prefix_blocks = a.prefix_tokens / block_size;
    let blocks = (a.prefix_tokens + a.suffix_tokens) / block_size + 1;
    let mut unique = (a.prefixes * prefix_blocks) as u64;
    let mut t = 0.0;
    (0..requests)
        .map(|_| {
            t += -(1.0 - rng.random::<f64>()).ln() / rate * 1e3;
            let shared = rng.random::<f64>() < a.shared_fraction;
            let p = rng.random_range(0..a.prefixes.max(1));
            unique += blocks as u64;
            let blocks =
                BlockIds::Synthetic { prefix: shared.then_some((p * prefix_blocks) as u64), prefix_blocks, unique: unique - blocks as u64 };
            TraceRequest { arrival_ms: t, input: a.prefix_tokens + a.suffix_tokens, output: a.output_tokens, blocks }
        })
        .collect()
}

/// What a simulation models, checked.
#[derive(Debug, Clone)]
pub(crate) struct SimConfig {
    replicas: usize,
    block_size: usize,
    kv_blocks: usize,
    max_batch: usize,
    prefill_chunk: usize,
    max_batch_tokens: usize,
    cost: CostModel,
    overlap_weight: f64,
    temperature: f64,
    seed: u64,
}

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

/// What one policy's run measured.
#[derive(Debug, Default)]
struct Outcome {
    ttft_ms: Vec<f64>,
    output_tokens: usize,
    prompt_tokens: usize,
    cached_tokens: usize,
    finished: usize,
    rejected: usize,
    first_arrival_ms: Option<f64>,
    last_finish_ms: f64,
    busy_ms: f64,
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
fn simulate(cfg: &SimConfig, trace: &[TraceRequest], policy: RouterPolicy) -> Outcome {
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

/// One policy's figures.
#[derive(Debug, Clone, Serialize)]
struct PolicyReport {
    router: &'static str,
    ttft_ms: Pair,
    /// Output tokens/s from the first arrival to the last token.
    throughput_tok_s: f64,
    /// Prompt tokens served from the prefix cache / prompt tokens.
    prefix_hit_rate: f64,
    /// Busy replica time / (replicas × that span).
    utilisation: f64,
    requests: usize,
    finished: usize,
    rejected: usize,
    makespan_s: f64,
}

/// A median and a 99th percentile.
#[derive(Debug, Clone, Copy, Serialize)]
struct Pair {
    p50: f64,
    p99: f64,
}

impl PolicyReport {
    fn new(policy: RouterPolicy, o: Outcome, requests: usize, replicas: usize) -> Self {
        let (p50, p99) = super::bench::p50_p99(o.ttft_ms);
        let span_ms = o.last_finish_ms - o.first_arrival_ms.unwrap_or(0.0);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        PolicyReport {
            router: policy.name(),
            ttft_ms: Pair { p50, p99 },
            throughput_tok_s: ratio(o.output_tokens as f64 * 1e3, span_ms),
            prefix_hit_rate: ratio(o.cached_tokens as f64, o.prompt_tokens as f64),
            utilisation: ratio(o.busy_ms, span_ms * replicas as f64),
            requests,
            finished: o.finished,
            rejected: o.rejected,
            makespan_s: span_ms / 1e3,
        }
    }
}

/// The JSON document of `--json`.
#[derive(Debug, Serialize)]
struct Document<'a> {
    replicas: usize,
    requests: usize,
    trace: Option<String>,
    /// Synthetic arrivals per second (none with a trace).
    rate: Option<f64>,
    block_size: usize,
    kv_blocks: usize,
    max_batch: usize,
    prefill_chunk: usize,
    max_batch_tokens: usize,
    cost: &'a CostModel,
    policies: Vec<PolicyReport>,
}

/// The checked configuration and the trace the arguments ask for, and the synthetic rate.
fn prepare(a: &SimulateArgs) -> anyhow::Result<(SimConfig, Vec<TraceRequest>, Option<f64>)> {
    let block_size = a.block_size.unwrap_or(if a.trace.is_some() { 512 } else { 16 });
    if a.replicas == 0
        || a.max_batch == 0
        || block_size == 0
        || a.kv_blocks == Some(0)
        || a.requests == Some(0)
        || a.prefill_chunk == 0
        || a.max_batch_tokens == 0
    {
        bail!("--replicas, --max-batch, --block-size, --kv-blocks, --requests, --prefill-chunk and --max-batch-tokens must be at least 1");
    }
    if a.routers.is_empty() {
        bail!("--router: name at least one policy");
    }
    if !(a.overlap_weight >= 0.0 && a.temperature >= 0.0) {
        bail!("--overlap-weight and --temperature must be at least 0");
    }
    let mut cost = match &a.bench {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("--bench {}", p.display()))?;
            CostModel::from_bench(&text).with_context(|| format!("--bench {}", p.display()))?
        }
        None => CostModel::development_machine(),
    };
    cost = CostModel::new(
        a.prefill_ms_per_token.unwrap_or(cost.prefill_ms_per_token),
        if a.decode_ms.is_empty() { cost.decode_ms } else { a.decode_ms.clone() },
    )?;
    let cfg = SimConfig {
        replicas: a.replicas,
        block_size,
        kv_blocks: a.kv_blocks.unwrap_or((DEFAULT_KV_TOKENS / block_size).max(1)),
        max_batch: a.max_batch,
        prefill_chunk: a.prefill_chunk,
        max_batch_tokens: a.max_batch_tokens,
        cost,
        overlap_weight: a.overlap_weight,
        temperature: a.temperature,
        seed: a.seed,
    };
    let (trace, rate) = match &a.trace {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("--trace {}", p.display()))?;
            (parse_trace(std::io::BufReader::new(f), &p.display().to_string(), block_size, a.requests)?, None)
        }
        None => {
            let rate = a.rate.unwrap_or(DEFAULT_RATE_PER_REPLICA * a.replicas as f64);
            if !(rate.is_finite() && rate > 0.0 && (0.0..=1.0).contains(&a.shared_fraction)) {
                bail!("--rate must be above 0 and --shared-fraction between 0 and 1");
            }
            if a.prefixes == 0 || a.prefix_tokens + a.suffix_tokens == 0 || a.output_tokens == 0 {
                bail!("--prefixes, --output-tokens and the prompt (--prefix-tokens + --suffix-tokens) must be at least 1");
            }
            (synthetic(a, a.requests.unwrap_or(10_000), rate, block_size), Some(rate))
        }
    };
    Ok((cfg, trace, rate))
}

/// `shardctl dev simulate-router`.
pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let (cfg, trace, rate) = prepare(&a)?;
    let policies: Vec<PolicyReport> =
        a.routers.iter().map(|&p| PolicyReport::new(p, simulate(&cfg, &trace, p), trace.len(), cfg.replicas)).collect();
    if a.json {
        let doc = Document {
            replicas: cfg.replicas,
            requests: trace.len(),
            trace: a.trace.as_ref().map(|p| p.display().to_string()),
            rate,
            block_size: cfg.block_size,
            kv_blocks: cfg.kv_blocks,
            max_batch: cfg.max_batch,
            prefill_chunk: cfg.prefill_chunk,
            max_batch_tokens: cfg.max_batch_tokens,
            cost: &cfg.cost,
            policies,
        };
        println!("{}", serde_json::to_string(&doc)?);
        return Ok(());
    }
    let source = match (&a.trace, rate) {
        (Some(p), _) => format!("{} requests from {}", trace.len(), p.display()),
        (None, rate) => format!(
            "{} synthetic requests at {:.2}/s ({:.0}% share one of {} prefixes of {} tokens; {} more prompt tokens, {} output tokens)",
            trace.len(),
            rate.unwrap_or(f64::NAN),
            a.shared_fraction * 100.0,
            a.prefixes,
            a.prefix_tokens,
            a.suffix_tokens,
            a.output_tokens
        ),
    };
    let decode: Vec<String> = cfg.cost.decode_ms.iter().map(|p| format!("{}:{}", p.batch, p.ms)).collect();
    println!("simulate-router: {source}");
    println!(
        "{} replicas of {} KV blocks × {} tokens, batch ≤ {} sequences and {} rows, prefill chunks ≤ {}; prefill {} ms/token, decode step ms by batch {}",
        cfg.replicas,
        cfg.kv_blocks,
        cfg.block_size,
        cfg.max_batch,
        cfg.max_batch_tokens,
        cfg.prefill_chunk,
        cfg.cost.prefill_ms_per_token,
        decode.join(",")
    );
    println!(
        "{:<13} {:>12} {:>12} {:>13} {:>10} {:>8} {:>9}",
        "router", "ttft p50 ms", "ttft p99 ms", "output tok/s", "hit rate", "busy", "finished"
    );
    for p in &policies {
        println!(
            "{:<13} {:>12.0} {:>12.0} {:>13.1} {:>9.1}% {:>7.1}% {:>9}",
            p.router,
            p.ttft_ms.p50,
            p.ttft_ms.p99,
            p.throughput_tok_s,
            p.prefix_hit_rate * 100.0,
            p.utilisation * 100.0,
            format!("{}/{}", p.finished, p.requests)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `shardctl dev simulate-router` as parsed from these flags.
    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn args(flags: &[&str]) -> SimulateArgs {
        Cli::parse_from(std::iter::once("simulate-router").chain(flags.iter().copied())).args
    }

    fn run_all(a: &SimulateArgs) -> Vec<PolicyReport> {
        let (cfg, trace, _) = prepare(a).expect("valid flags");
        a.routers.iter().map(|&p| PolicyReport::new(p, simulate(&cfg, &trace, p), trace.len(), cfg.replicas)).collect()
    }

    #[test]
    fn many_replicas_and_requests_simulate_within_a_minute() {
        let a = args(&["--replicas", "256", "--requests", "100000", "--router", "kv"]);
        let started = std::time::Instant::now();
        let r = run_all(&a);
        let elapsed = started.elapsed();
        eprintln!("256 replicas × 100000 requests: {:.1} s: {:?}", elapsed.as_secs_f64(), r[0]);
        assert!(elapsed.as_secs() < 60, "took {elapsed:?}");
        assert_eq!((r[0].finished, r[0].rejected), (100_000, 0));
    }

    #[test]
    fn kv_routing_halves_ttft_against_round_robin_on_shared_prefixes() {
        let a = args(&["--replicas", "64", "--requests", "20000", "--router", "kv,round-robin"]);
        let r = run_all(&a);
        let (kv, rr) = (&r[0], &r[1]);
        eprintln!("{kv:?}\n{rr:?}");
        assert!(rr.utilisation > 0.6, "round robin should keep the replicas busy: {rr:?}");
        assert!(kv.finished == 20_000 && rr.finished == 20_000);
        assert!(kv.ttft_ms.p50 <= 0.5 * rr.ttft_ms.p50, "kv {kv:?}\nround robin {rr:?}");
        assert!(kv.throughput_tok_s >= rr.throughput_tok_s, "kv {kv:?}\nround robin {rr:?}");
        assert!(kv.prefix_hit_rate > 2.0 * rr.prefix_hit_rate);
    }

    #[test]
    fn a_mooncake_trace_parses_and_a_bad_line_is_named() {
        let text = r#"{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353, 2354]}
{"timestamp": 100, "input_length": 1024, "output_length": 0, "hash_ids": [46, 47]}
"#;
        let t = parse_trace(text.as_bytes(), "t.jsonl", 512, None).expect("a valid trace");
        assert_eq!(t.len(), 2);
        // In arrival order; 6955 tokens are 13 whole blocks of 512 and a partial one.
        assert_eq!((t[0].arrival_ms, t[0].input, t[0].output), (100.0, 1024, 1));
        assert_eq!(t[1].chain(512), [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353]);
        assert_eq!(parse_trace(text.as_bytes(), "t.jsonl", 512, Some(1)).expect("valid").len(), 1);

        let bad = format!("{text}\n{{\"timestamp\": 1, \"input_length\": 10}}\n");
        let e = format!("{:#}", parse_trace(bad.as_bytes(), "t.jsonl", 512, None).expect_err("a missing field"));
        assert!(e.contains("t.jsonl line 4") && e.contains("output_length"), "{e}");
        let short = r#"{"timestamp": 1, "input_length": 2000, "output_length": 5, "hash_ids": [1, 2]}"#;
        let e = format!("{:#}", parse_trace(short.as_bytes(), "t.jsonl", 512, None).expect_err("too few ids"));
        assert!(e.contains("t.jsonl line 1") && e.contains("2 hash_ids"), "{e}");
    }

    #[test]
    fn a_trace_replays_with_its_prefix_hits() {
        // Two requests sharing 2 blocks of 4 tokens; the second arrives after the first ends.
        let text = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1, 2, 3]}\n\
                    {\"timestamp\": 60000, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1, 2, 9]}\n";
        let trace = parse_trace(text.as_bytes(), "t", 4, None).expect("valid");
        let cfg = SimConfig {
            replicas: 2,
            block_size: 4,
            kv_blocks: 16,
            max_batch: 4,
            prefill_chunk: 512,
            max_batch_tokens: 4096,
            cost: CostModel::new(10.0, vec![DecodePoint { batch: 1, ms: 50.0 }]).expect("valid"),
            overlap_weight: 1.0,
            temperature: 0.0,
            seed: 0,
        };
        let kv = simulate(&cfg, &trace, RouterPolicy::Kv);
        // The first prefills 10 tokens (100 ms); the second reuses 8 on the same replica.
        assert_eq!(kv.ttft_ms, [100.0, 20.0]);
        assert_eq!((kv.cached_tokens, kv.prompt_tokens, kv.output_tokens), (8, 20, 4));
        let rr = simulate(&cfg, &trace, RouterPolicy::RoundRobin);
        assert_eq!((rr.ttft_ms.as_slice(), rr.cached_tokens), ([100.0, 100.0].as_slice(), 0));
    }

    #[test]
    fn the_bench_cost_model_reads_a_document_and_interpolates() {
        let doc = r#"{"prompt_tokens": 128, "output_tokens": 64, "label": "",
            "runs": [
              {"concurrency": 1, "requests": 4, "ours": {"ttft_ms": {"p50": 1280.0, "p99": 1300.0}, "itl_ms": {"p50": 80.0, "p99": 90.0}}, "baseline": null},
              {"concurrency": 8, "requests": 8, "ours": {"ttft_ms": {"p50": 9000.0, "p99": null}, "itl_ms": {"p50": 220.0, "p99": 300.0}}},
              {"concurrency": 16, "ours": {"ttft_ms": {"p50": 1.0, "p99": 1.0}, "itl_ms": {"p50": 300.0, "p99": 300.0}}},
              {"request_rate": 2.0, "ours": {"ttft_ms": {"p50": 1.0, "p99": 1.0}, "itl_ms": {"p50": 999.0, "p99": 999.0}}}
            ]}"#;
        let m = CostModel::from_bench(doc).expect("a bench document");
        assert_eq!(m.prefill_ms_per_token, 10.0);
        assert_eq!(m.decode_ms.len(), 3, "the open-loop level is skipped");
        assert_eq!(m.decode_ms(0), 0.0);
        assert_eq!(m.decode_ms(1), 80.0);
        assert_eq!(m.decode_ms(8), 220.0);
        assert_eq!(m.decode_ms(4), 80.0 + 3.0 * 20.0);
        assert_eq!(m.decode_ms(12), 260.0);
        assert_eq!(m.decode_ms(32), 300.0 + 16.0 * 10.0, "beyond: along the last segment");
        assert!(CostModel::from_bench(r#"{"prompt_tokens": 128, "runs": []}"#).is_err());
        let e = format!("{:#}", CostModel::from_bench(r#"{"prompt_tokens": "x", "runs": []}"#).expect_err("a bad field"));
        assert!(e.contains("prompt_tokens"), "{e}");

        let dev = CostModel::development_machine();
        assert_eq!(dev.decode_ms(24), (325.0 + 484.0) / 2.0);
        assert_eq!("8:217".parse::<DecodePoint>(), Ok(DecodePoint { batch: 8, ms: 217.0 }));
        assert!("8".parse::<DecodePoint>().is_err() && "0:5".parse::<DecodePoint>().is_err());
        let a = args(&["--decode-ms", "1:50,4:100", "--prefill-ms-per-token", "2"]);
        let (cfg, _, _) = prepare(&SimulateArgs { requests: Some(1), ..a }).expect("valid");
        assert_eq!((cfg.cost.prefill_ms_per_token, cfg.cost.decode_ms(2)), (2.0, 50.0 + 50.0 / 3.0));
    }
}
