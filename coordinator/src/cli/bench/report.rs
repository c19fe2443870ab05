//! What a bench run measured: each request's sample, and a side's summary (percentiles of
//! TTFT, inter-token latency and decode rate, throughput) as printed and as JSON.

/// What one request measured; times in seconds.
#[derive(Debug, Clone, Default)]
pub(in crate::cli) struct Sample {
    pub(in crate::cli) ttft: f64,
    pub(in crate::cli::bench) itl: Vec<f64>,
    pub(in crate::cli::bench) total: f64,
    pub(in crate::cli::bench) tokens: usize,
    pub(in crate::cli) token_ids: Vec<u32>,
    /// The text generated.
    pub(in crate::cli) text: String,
    /// Prompt tokens the cluster served from its prefix cache.
    pub(in crate::cli) cached_tokens: usize,
}

/// The summary of one side (ours or the baseline).
#[derive(Debug, Clone)]
pub(in crate::cli) struct Report {
    pub(in crate::cli) ttft_ms: (f64, f64),
    pub(in crate::cli::bench) itl_ms: (f64, f64),
    pub(in crate::cli::bench) decode_tok_s: (f64, f64),
    /// Decode tokens/s of all requests together (closed loop: concurrency × the token-weighted
    /// per-request decode rate); NaN in the open loop, where concurrency varies.
    pub(in crate::cli::bench) decode_aggregate_tok_s: f64,
    pub(in crate::cli) aggregate_tok_s: f64,
    pub(in crate::cli::bench) tokens: usize,
    pub(in crate::cli) wall_s: f64,
}

/// Nearest-rank percentile; NaN for no samples (printed as JSON null).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The 50th and 99th nearest-rank percentiles of `v`.
pub(in crate::cli) fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 50.0), percentile(&v, 99.0))
}

impl Report {
    pub(in crate::cli) fn new(samples: &[Sample], wall_s: f64, concurrency: Option<usize>) -> Self {
        let tokens: usize = samples.iter().map(|s| s.tokens).sum();
        // A request that produced one token (early eos) has no decode phase to rate.
        let decoding: Vec<&Sample> = samples.iter().filter(|s| s.tokens > 1 && s.total > s.ttft).collect();
        let decode = decoding.iter().map(|s| (s.tokens - 1) as f64 / (s.total - s.ttft)).collect();
        let (decoded, decode_time) = decoding.iter().fold((0.0, 0.0), |(n, t), s| (n + (s.tokens - 1) as f64, t + s.total - s.ttft));
        Report {
            decode_aggregate_tok_s: match concurrency {
                Some(c) if decode_time > 0.0 => c as f64 * decoded / decode_time,
                _ => f64::NAN,
            },
            ttft_ms: p50_p99(samples.iter().map(|s| s.ttft * 1e3).collect()),
            itl_ms: p50_p99(samples.iter().flat_map(|s| s.itl.iter().map(|t| t * 1e3)).collect()),
            decode_tok_s: p50_p99(decode),
            aggregate_tok_s: if wall_s > 0.0 { tokens as f64 / wall_s } else { f64::NAN },
            tokens,
            wall_s,
        }
    }

    pub(in crate::cli) fn to_json(&self) -> serde_json::Value {
        let pair = |(a, b): (f64, f64)| serde_json::json!({"p50": num(a), "p99": num(b)});
        serde_json::json!({
            "ttft_ms": pair(self.ttft_ms),
            "itl_ms": pair(self.itl_ms),
            "decode_tok_s": pair(self.decode_tok_s),
            "decode_aggregate_tok_s": num(self.decode_aggregate_tok_s),
            "aggregate_tok_s": num(self.aggregate_tok_s),
            "tokens": self.tokens,
            "wall_s": num(self.wall_s),
        })
    }

    /// Reads back what [`Report::to_json`] wrote.
    pub(in crate::cli::bench) fn from_json(v: &serde_json::Value) -> Option<Self> {
        let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
        let pair = |k: &str| Some((f(v.get(k)?.get("p50")?), f(v.get(k)?.get("p99")?)));
        Some(Report {
            ttft_ms: pair("ttft_ms")?,
            itl_ms: pair("itl_ms")?,
            decode_tok_s: pair("decode_tok_s")?,
            decode_aggregate_tok_s: v.get("decode_aggregate_tok_s").map_or(f64::NAN, f),
            aggregate_tok_s: f(v.get("aggregate_tok_s")?),
            tokens: v.get("tokens")?.as_u64()? as usize,
            wall_s: f(v.get("wall_s")?),
        })
    }

    pub(in crate::cli) fn print(&self, name: &str) {
        println!(
            "{name:<9} ttft p50 {:.1} ms p99 {:.1} ms | itl p50 {:.2} ms p99 {:.2} ms | decode p50 {:.1} tok/s per request, {:.1} in all | aggregate {:.1} tok/s ({} tokens in {:.2} s)",
            self.ttft_ms.0, self.ttft_ms.1, self.itl_ms.0, self.itl_ms.1, self.decode_tok_s.0,
            self.decode_aggregate_tok_s, self.aggregate_tok_s, self.tokens, self.wall_s
        );
    }
}

/// JSON has no NaN: an undefined figure is null.
pub(in crate::cli::bench) fn num(x: f64) -> serde_json::Value {
    serde_json::json!(x.is_finite().then_some(x))
}
