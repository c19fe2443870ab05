//! `shardctl dev simulate-router`: a discrete-event simulation of a model's replicas that
//! replays a request trace (Mooncake's JSONL, or a synthetic one) through the engine's own
//! [`Router`](crate::router::Router) and [`PrefixIndex`](crate::router::PrefixIndex), and
//! reports per routing policy TTFT, throughput and the prefix cache's hit rate. The replicas
//! themselves are modelled in `replica.rs`.

mod replica;

use crate::router::RouterPolicy;
use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use replica::simulate;
use serde::{Deserialize, Serialize};
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
mod tests;
