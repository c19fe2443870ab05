//! `shardctl bench`: TTFT, inter-token latency and tokens/s of a running cluster at one or more
//! concurrency levels (closed loop) or Poisson arrival rates (open loop, as vLLM's serving
//! benchmark), optionally against candle-transformers' own model on the same weights in the same
//! run — at each concurrency level B, that model runs a batch of B equal prompts.

mod baseline;
mod report;

use super::{status_error, Target};
use anyhow::{anyhow, bail, Context};
use baseline::{measure_baseline, BaselineSetup};
use report::num;
pub(super) use report::{p50_p99, Report, Sample};
use shardserve_proto::v1 as pb;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bounds every single RPC, so a stuck cluster ends the bench with an error instead of a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Arguments of `shardctl bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: Target,
    /// Model name (default: the only model served).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Prompt length in tokens (the prompt is built to tokenize to exactly this many).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate per request (greedy; fewer if the model emits an end-of-sequence id).
    #[arg(long, default_value_t = 64)]
    pub output_tokens: usize,
    /// Requests in flight at a time; a list (1,8,16,32) measures each level in turn.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<usize>,
    /// Open loop instead: requests arrive as a Poisson process at this rate (requests/s),
    /// however many are in flight; a list measures each rate in turn.
    #[arg(long, value_delimiter = ',')]
    pub request_rate: Vec<f64>,
    /// Seed of the open loop's arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Measured requests per level (default: the concurrency and at least 4; 32 per rate).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Unmeasured requests sent first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Also run candle-transformers' model on these weights (folder or Hub id), in this process.
    #[arg(long)]
    pub baseline: Option<String>,
    /// The baseline's device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub baseline_device: String,
    /// The baseline's dtype.
    #[arg(long, value_enum, default_value_t = shardserve::dtype::Dtype::F32)]
    pub baseline_dtype: shardserve::dtype::Dtype,
    /// The baseline uses seeded random weights of its config's shapes — the same values the
    /// workers make under `up --random-weights` — instead of reading a checkpoint.
    #[arg(long)]
    pub baseline_random: bool,
    /// Measure only the baseline (no cluster is contacted): for models too large to hold twice
    /// on one device. Its JSON document can be given to a later run with --baseline-from.
    #[arg(long)]
    pub baseline_only: bool,
    /// The baseline as measured earlier by `--baseline-only --json` (a file holding that
    /// document): ratios are computed against it.
    #[arg(long, conflicts_with = "baseline")]
    pub baseline_from: Option<std::path::PathBuf>,
    /// Free text copied into the report.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Every request starts with the same TOKENS tokens, then about --prompt-tokens of its own;
    /// measured with prefix caching and again with it off for every request, as ratios (0:
    /// unique prompts only, which measures what the cache's lookup costs).
    #[arg(long, conflicts_with = "multi_turn")]
    pub shared_prefix: Option<usize>,
    /// Conversations of TURNS turns (--concurrency of them at once): each turn sends the
    /// conversation so far plus a new user message of about --prompt-tokens tokens; TTFT by
    /// turn, with prefix caching and again with it off.
    #[arg(long)]
    pub multi_turn: Option<usize>,
    /// Decoding held to the JSON schema in FILE, against free decoding of the same prompt
    /// (both sampled at temperature 1): aggregate tok/s as a ratio at each --concurrency, and
    /// llguidance's mask time per token.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["shared_prefix", "multi_turn", "baseline", "baseline_from"])]
    pub json_schema: Option<std::path::PathBuf>,
}

pub(super) async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, fut).await.map_err(|_| anyhow!("{what} took longer than {} s", REQUEST_TIMEOUT.as_secs()))?
}

pub(super) async fn tokenize(client: &mut super::InferenceClient, model: &str, text: &str) -> anyhow::Result<Vec<u32>> {
    let req = pb::TokenizeRequest { model: model.to_string(), text: text.to_string() };
    bounded("Tokenize", async { Ok(client.tokenize(req).await.map_err(status_error)?.into_inner().token_ids) }).await
}

/// Plain words that most BPE vocabularies keep whole, so the count grows about one per word.
pub(super) const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs", "into", "forest", "where", "it", "finds",
    "small", "river", "near", "old", "stone", "bridge", "under", "blue", "sky",
];
/// Short tails to close the last few-token gap when one more word would overshoot.
const FILLERS: &[&str] = &[" a", ".", ",", " I", "!", "?", " x", "-", " 1", ";", ":", " o"];

fn words(k: usize) -> String {
    (0..k).map(|i| WORDS[i % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

/// Finds a prompt that the model's own tokenizer turns into exactly `n` ids.
pub(super) async fn build_prompt(client: &mut super::InferenceClient, model: &str, n: usize) -> anyhow::Result<(String, Vec<u32>)> {
    let empty = tokenize(client, model, "").await?.len();
    if n <= empty {
        bail!("--prompt-tokens {n} is too small: the tokenizer adds {empty} special token(s) to any prompt");
    }
    // Bisect on the word count (token count grows with it), then pad with one-token tails.
    let (mut lo, mut hi) = (0usize, None::<usize>);
    let mut k = n;
    loop {
        let ids = tokenize(client, model, &words(k)).await?;
        if ids.len() == n {
            return Ok((words(k), ids));
        }
        if ids.len() < n {
            lo = lo.max(k)
        } else {
            hi = Some(hi.map_or(k, |h| h.min(k)))
        }
        k = match hi {
            None => k + (n - ids.len()),
            Some(h) if h > lo + 1 => (lo + h) / 2,
            Some(_) => break,
        };
    }
    let mut text = words(lo);
    let mut count = tokenize(client, model, &text).await?.len();
    while count < n {
        let mut grew = false;
        for f in FILLERS {
            let t = format!("{text}{f}");
            let ids = tokenize(client, model, &t).await?;
            if ids.len() == n {
                return Ok((t, ids));
            }
            if ids.len() > count && ids.len() < n {
                (text, count, grew) = (t, ids.len(), true);
                break;
            }
        }
        if !grew {
            break;
        }
    }
    bail!("could not build a prompt of exactly {n} tokens with this tokenizer (closest: {count})")
}

/// One streamed greedy request, timed from send to each token's arrival.
pub(super) async fn one_request(mut client: super::InferenceClient, req: pb::GenerateRequest) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut stream = client.generate_stream(req).await.map_err(status_error)?.into_inner();
    let mut s = Sample::default();
    let mut last: Option<Instant> = None;
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        s.text.push_str(&msg.text);
        if let Some(u) = msg.usage {
            s.cached_tokens = u.cached_tokens as usize;
        }
        if msg.token_ids.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => s.ttft = (now - start).as_secs_f64(),
            Some(prev) => s.itl.push((now - prev).as_secs_f64()),
        }
        // Tokens that came in the same message arrived together: a zero gap each.
        s.itl.extend(std::iter::repeat_n(0.0, msg.token_ids.len() - 1));
        last = Some(now);
        s.tokens += msg.token_ids.len();
        s.token_ids.extend(msg.token_ids);
    }
    if s.tokens == 0 {
        bail!("the cluster answered a request with no tokens");
    }
    s.total = (last.unwrap_or(start) - start).as_secs_f64();
    Ok(s)
}

/// Sends `total` requests with `concurrency` in flight; returns the samples and the wall time.
pub(super) async fn run_phase(
    client: &super::InferenceClient,
    req: &pb::GenerateRequest,
    total: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(total) {
        let (client, req, next, samples) = (client.clone(), req.clone(), next.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < total {
                let s = bounded("a GenerateStream request", one_request(client.clone(), req.clone())).await?;
                samples.lock().unwrap().push(s);
            }
            anyhow::Ok(())
        }));
    }
    for t in futures::future::join_all(tasks).await {
        t.context("a bench task panicked")??;
    }
    let wall = start.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Ok((samples, wall))
}

/// Sends `total` requests arriving as a Poisson process of `rate` per second (seeded), each as
/// soon as it arrives; returns the samples and the wall time.
async fn run_open_loop(
    client: &super::InferenceClient,
    req: &pb::GenerateRequest,
    total: usize,
    rate: f64,
    seed: u64,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = tokio::time::Instant::now();
    let mut at = 0.0f64;
    let mut tasks = Vec::with_capacity(total);
    for _ in 0..total {
        // Exponential gaps: -ln(1 - U) / rate.
        at += -(1.0 - rng.random::<f64>()).ln() / rate;
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let (client, req) = (client.clone(), req.clone());
        tasks.push(tokio::spawn(async move { bounded("a GenerateStream request", one_request(client, req)).await }));
    }
    let mut samples = Vec::with_capacity(total);
    for t in futures::future::join_all(tasks).await {
        samples.push(t.context("a bench task panicked")??);
    }
    Ok((samples, start.elapsed().as_secs_f64()))
}

/// One measurement: a concurrency level (closed loop) or an arrival rate (open loop).
#[derive(Debug, Clone, Copy)]
enum Level {
    Concurrency(usize),
    Rate(f64),
}

impl Level {
    fn describe(self) -> String {
        match self {
            Level::Concurrency(c) => format!("concurrency {c}"),
            Level::Rate(r) => format!("rate {r}/s"),
        }
    }

    fn requests(self, asked: Option<usize>) -> usize {
        match self {
            Level::Concurrency(c) => asked.unwrap_or(c.max(4)),
            Level::Rate(_) => asked.unwrap_or(32),
        }
    }

    /// The batch the baseline runs at this level (open loop: one sequence at a time).
    fn batch(self) -> usize {
        match self {
            Level::Concurrency(c) => c,
            Level::Rate(_) => 1,
        }
    }

    fn to_json(self) -> serde_json::Value {
        match self {
            Level::Concurrency(c) => serde_json::json!({"concurrency": c}),
            Level::Rate(r) => serde_json::json!({"request_rate": r}),
        }
    }
}

/// What one level measured.
struct Run {
    level: Level,
    requests: usize,
    ours: Option<Report>,
    baseline: Option<Report>,
}

impl Run {
    /// ours / baseline: aggregate tok/s, decode tok/s of all requests together, per-request
    /// decode tok/s, TTFT.
    fn ratio(&self) -> Option<(f64, f64, f64, f64)> {
        let (o, b) = (self.ours.as_ref()?, self.baseline.as_ref()?);
        Some((
            o.aggregate_tok_s / b.aggregate_tok_s,
            o.decode_aggregate_tok_s / b.decode_aggregate_tok_s,
            o.decode_tok_s.0 / b.decode_tok_s.0,
            o.ttft_ms.0 / b.ttft_ms.0,
        ))
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = self.level.to_json();
        v["requests"] = serde_json::json!(self.requests);
        v["ours"] = serde_json::json!(self.ours.as_ref().map(Report::to_json));
        v["baseline"] = serde_json::json!(self.baseline.as_ref().map(Report::to_json));
        v["ratio"] = serde_json::json!(self
            .ratio()
            .map(|(a, da, d, t)| serde_json::json!({"aggregate_tok_s": num(a), "decode_aggregate_tok_s": num(da), "decode_tok_s": num(d), "ttft": num(t)})));
        v
    }
}

/// `shardctl bench`.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let levels: Vec<Level> = if a.request_rate.is_empty() {
        a.concurrency.iter().map(|&c| Level::Concurrency(c)).collect()
    } else {
        a.request_rate.iter().map(|&r| Level::Rate(r)).collect()
    };
    if a.concurrency.contains(&0) || a.output_tokens == 0 || a.prompt_tokens == 0 || a.requests == Some(0) {
        bail!("--concurrency, --requests, --output-tokens and --prompt-tokens must be at least 1");
    }
    if a.request_rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--request-rate must be a positive number of requests per second");
    }
    // Resolved up front so a wrong --baseline fails before minutes of cluster measurement.
    let setup = match &a.baseline {
        Some(spec) => Some(BaselineSetup {
            files: shardserve::hub::resolve(spec, None).map_err(|e| anyhow!("--baseline: {e}"))?,
            device: shardserve::device::parse_device(&a.baseline_device).map_err(|e| anyhow!("--baseline-device: {e}"))?,
            dtype: match a.baseline_dtype {
                shardserve::dtype::Dtype::Auto => bail!("--baseline-dtype: name a dtype (f32, bf16 or f16)"),
                d => d.resolve(None, false),
            },
            random: a.baseline_random,
        }),
        None => None,
    };
    let earlier: Option<serde_json::Value> = match &a.baseline_from {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--baseline-from {}", path.display()))?;
            Some(serde_json::from_str(text.trim()).with_context(|| format!("--baseline-from {}: not JSON", path.display()))?)
        }
        None => None,
    };
    let mut model = a.model.clone();
    let mut client = None;
    let mut prompt = None;
    if !a.baseline_only {
        let url = a.target.url();
        let channel = super::channel(&url, a.target.tls_ca.as_deref()).await?;
        let key = a.target.key(crate::auth::Role::Inference)?;
        let mut c = pb::inference_client::InferenceClient::with_interceptor(channel, super::Bearer::new(key.as_deref())?);
        if model.is_empty() {
            let list = bounded("ListModels", async { c.list_models(pb::ListModelsRequest {}).await.map_err(status_error) });
            if let [only] = list.await?.into_inner().models.as_slice() {
                model = only.name.clone();
            }
        }
        let workload = match (a.shared_prefix, a.multi_turn) {
            (Some(n), _) => Some(super::bench_prefix::Workload::SharedPrefix(n)),
            (None, Some(t)) => Some(super::bench_prefix::Workload::MultiTurn(t)),
            (None, None) => None,
        };
        if let Some(w) = workload {
            return super::bench_prefix::run(&a, &mut c, &model, w).await;
        }
        if let Some(path) = &a.json_schema {
            let schema = std::fs::read_to_string(path).with_context(|| format!("--json-schema {}", path.display()))?;
            return super::bench_structured::run(&a, &mut c, &model, &schema).await;
        }
        prompt = Some(build_prompt(&mut c, &model, a.prompt_tokens).await?);
        client = Some(c);
    }
    let (prompt_text, prompt_ids) = match prompt {
        Some(p) => p,
        // Any ids do for timing the baseline alone; these stay inside every vocabulary.
        None => (String::new(), (0..a.prompt_tokens).map(|i| 10 + (i % 200) as u32).collect()),
    };
    let req = pb::GenerateRequest {
        model: model.clone(),
        prompt: prompt_text,
        max_new_tokens: Some(i32::try_from(a.output_tokens).context("--output-tokens is too large")?),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        stop: vec![],
        logprobs: false,
        // Every request generates exactly --output-tokens, as vLLM's benchmark does.
        ignore_eos: true,
        ..Default::default()
    };
    let mut runs = Vec::with_capacity(levels.len());
    for (i, &level) in levels.iter().enumerate() {
        let requests = level.requests(a.requests);
        let mut run = Run { level, requests, ours: None, baseline: None };
        let mut produced = a.output_tokens;
        let mut ours_tokens = None;
        if let Some(client) = &client {
            let (samples, wall) = match level {
                Level::Concurrency(c) => {
                    if a.warmup > 0 {
                        run_phase(client, &req, a.warmup.max(c), c).await?;
                    }
                    run_phase(client, &req, requests, c).await?
                }
                Level::Rate(r) => {
                    if a.warmup > 0 {
                        run_phase(client, &req, a.warmup, 1).await?;
                    }
                    run_open_loop(client, &req, requests, r, a.seed.wrapping_add(i as u64)).await?
                }
            };
            if samples.iter().any(|s| s.tokens < a.output_tokens) {
                eprintln!("shardctl bench: some requests ended early (end-of-sequence); rates use the tokens actually produced");
            }
            // The baseline produces as many, so both decode over the same context lengths.
            produced = samples.iter().map(|s| s.tokens).max().unwrap_or(a.output_tokens);
            ours_tokens = samples.first().map(|s| s.token_ids.clone());
            let concurrency = match level {
                Level::Concurrency(c) => Some(c.min(requests)),
                Level::Rate(_) => None,
            };
            run.ours = Some(Report::new(&samples, wall, concurrency));
        }
        if let Some(setup) = setup.clone() {
            let (ids, batch) = (prompt_ids.clone(), level.batch());
            let times = (requests / batch).max(1);
            let (samples, wall) = tokio::task::spawn_blocking(move || measure_baseline(&setup, &ids, produced, batch, times))
                .await
                .context("the baseline panicked")??;
            if let (Some(o), Some(b)) = (&ours_tokens, samples.first()) {
                warn_disagreement(o, &b.token_ids);
            }
            run.baseline = Some(Report::new(&samples, wall, Some(batch)));
        } else if let Some(doc) = &earlier {
            run.baseline = earlier_baseline(doc, level);
        }
        if !a.json {
            print_run(&run, i == 0, &model, &a);
        }
        runs.push(run);
    }
    if a.json {
        let first = &runs[0];
        let mut doc = serde_json::json!({
            "label": a.label,
            "model": model,
            "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens,
            "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
        });
        // The first level's figures at the top as well, as single-level reports have them.
        for (k, v) in first.to_json().as_object().expect("an object") {
            doc[k] = v.clone();
        }
        println!("{doc}");
    }
    Ok(())
}

/// Greedy on the same weights should agree; a mismatch is worth knowing, not fatal (near-tied
/// logits in random-weight models can flip under different kernels).
fn warn_disagreement(ours: &[u32], baseline: &[u32]) {
    let same = ours.iter().zip(baseline).take_while(|(x, y)| x == y).count();
    if same < ours.len().min(baseline.len()) {
        eprintln!("shardctl bench: the baseline's greedy tokens differ from the cluster's after {same} token(s)");
    }
}

/// The baseline of `level` in an earlier `--baseline-only --json` document.
fn earlier_baseline(doc: &serde_json::Value, level: Level) -> Option<Report> {
    let runs = doc["runs"].as_array();
    let matching = runs.and_then(|r| {
        r.iter().find(|run| match level {
            Level::Concurrency(c) => run["concurrency"].as_u64() == Some(c as u64),
            Level::Rate(_) => run["concurrency"].as_u64() == Some(1),
        })
    });
    Report::from_json(&matching.unwrap_or(doc)["baseline"])
}

fn print_run(run: &Run, header: bool, model: &str, a: &BenchArgs) {
    if header {
        let label = if a.label.is_empty() { String::new() } else { format!(" [{}]", a.label) };
        println!("bench{label}: model {model}, prompt {} tokens, output {} tokens", a.prompt_tokens, a.output_tokens);
    }
    println!("{} ({} requests)", run.level.describe(), run.requests);
    if let Some(o) = &run.ours {
        o.print("  ours");
    }
    if let Some(b) = &run.baseline {
        b.print("  baseline");
    }
    if let Some((agg, dec_all, dec, ttft)) = run.ratio() {
        println!(
            "  ratio     ours/baseline: aggregate tok/s {agg:.2} | decode tok/s in all {dec_all:.2}, per request {dec:.2} | ttft {ttft:.2}"
        );
    }
}
