//! `shardctl bench --shared-prefix` and `--multi-turn`: workloads whose prompts repeat what
//! earlier requests sent, measured with prefix caching and again, in the same command and on the
//! same cluster, with it off for every request (`skip_prefix_cache`, which computes the whole
//! prompt and publishes nothing, as `--prefix-caching off` does), reported as ratios.
//!
//! - shared prefix: every request is the same prefix of `--shared-prefix` tokens then a suffix of
//!   about `--prompt-tokens` tokens of its own (0: unique prompts only, which measures what the
//!   lookup costs when nothing is shared);
//! - multi-turn: conversations of `--multi-turn` turns, each turn the conversation so far (the
//!   earlier prompts and answers) plus a new user message of about `--prompt-tokens` tokens; the
//!   figure that matters is how TTFT grows from the first turn to the last.

use super::bench::{bounded, build_prompt, one_request, p50_p99, tokenize, BenchArgs, Report, Sample, WORDS};
use super::InferenceClient;
use anyhow::{bail, Context};
use shardserve_proto::v1 as pb;
use std::sync::Arc;
use std::time::Instant;

/// Which workload.
#[derive(Debug, Clone, Copy)]
pub(super) enum Workload {
    SharedPrefix(usize),
    MultiTurn(usize),
}

/// The request every measured one starts from: greedy, exactly `--output-tokens` tokens.
fn template(a: &BenchArgs, model: &str) -> anyhow::Result<pb::GenerateRequest> {
    Ok(pb::GenerateRequest {
        model: model.to_string(),
        max_new_tokens: Some(i32::try_from(a.output_tokens).context("--output-tokens is too large")?),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ignore_eos: true,
        ..Default::default()
    })
}

/// Text of about `n` tokens that no other call gives (`seed` picks its words), to follow
/// `prefix` (whose tokens are `prefix_len`): words are appended until the whole is at least
/// `prefix_len + n` tokens.
async fn unique_text(
    client: &mut InferenceClient,
    model: &str,
    prefix: &str,
    prefix_len: usize,
    n: usize,
    seed: u64,
) -> anyhow::Result<String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A number first: requests differ from their first token on.
    let mut text = format!(" {seed}");
    loop {
        let len = tokenize(client, model, &format!("{prefix}{text}")).await?.len();
        if len >= prefix_len + n {
            return Ok(text);
        }
        for _ in 0..(prefix_len + n - len).div_ceil(2) {
            text.push(' ');
            text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
    }
}

/// Sends `reqs` with `concurrency` in flight, in order; the samples in the same order.
async fn run_all(client: &InferenceClient, reqs: Vec<pb::GenerateRequest>, concurrency: usize) -> anyhow::Result<(Vec<Sample>, f64)> {
    let n = reqs.len();
    let queue = Arc::new(std::sync::Mutex::new(reqs.into_iter().enumerate().collect::<std::collections::VecDeque<_>>()));
    let samples = Arc::new(std::sync::Mutex::new(vec![None; n]));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(n).max(1) {
        let (client, queue, samples) = (client.clone(), queue.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some((i, req)) = queue.lock().unwrap().pop_front() else { return anyhow::Ok(()) };
                let s = bounded("a GenerateStream request", one_request(client.clone(), req)).await?;
                samples.lock().unwrap()[i] = Some(s);
            }
        }));
    }
    for t in futures::future::join_all(tasks).await {
        t.context("a bench task panicked")??;
    }
    let wall = start.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap()).into_iter().map(|s| s.expect("every request ran")).collect();
    Ok((samples, wall))
}

/// One side of the comparison: prefix caching on (`skip` false) or off for every request.
fn with_cache(mut reqs: Vec<pb::GenerateRequest>, skip: bool) -> Vec<pb::GenerateRequest> {
    for r in &mut reqs {
        r.skip_prefix_cache = skip;
    }
    reqs
}

/// What the shared-prefix workload measured on one side.
struct SharedRun {
    report: Report,
    cached_tokens: usize,
}

/// `--shared-prefix`: `warmup` requests, then `requests` measured at `concurrency`, each with
/// a suffix of its own; caching off first, then on.
async fn shared_prefix(a: &BenchArgs, client: &mut InferenceClient, model: &str, shared: usize) -> anyhow::Result<serde_json::Value> {
    let concurrency = a.concurrency[0];
    let requests = a.requests.unwrap_or(concurrency.max(4));
    let (prefix, prefix_len) = match shared {
        0 => (String::new(), 0),
        n => {
            let (text, ids) = build_prompt(client, model, n).await?;
            (text, ids.len())
        }
    };
    let base = template(a, model)?;
    // Every request of both sides and their warmups has a suffix of its own: nothing but the
    // prefix is shared.
    let make = |texts: Vec<String>| texts.into_iter().map(|t| pb::GenerateRequest { prompt: t, ..base.clone() }).collect::<Vec<_>>();
    let mut prompts = Vec::new();
    for i in 0..2 * (a.warmup + requests) {
        let suffix =
            unique_text(client, model, &prefix, prefix_len, a.prompt_tokens, a.seed.wrapping_mul(1_000_003).wrapping_add(i as u64)).await?;
        prompts.push(format!("{prefix}{suffix}"));
    }
    let prompt_tokens = tokenize(client, model, &prompts[0]).await?.len();
    let mut sides = Vec::new();
    for (k, skip) in [true, false].into_iter().enumerate() {
        let own = &prompts[k * (a.warmup + requests)..(k + 1) * (a.warmup + requests)];
        let warm = make(own[..a.warmup].to_vec());
        run_all(client, with_cache(warm, skip), concurrency).await?;
        let measured = make(own[a.warmup..].to_vec());
        let (samples, wall) = run_all(client, with_cache(measured, skip), concurrency).await?;
        let cached_tokens = samples.iter().map(|s| s.cached_tokens).sum::<usize>() / samples.len().max(1);
        sides.push(SharedRun { report: Report::new(&samples, wall, Some(concurrency.min(requests))), cached_tokens });
    }
    let (off, on) = (&sides[0], &sides[1]);
    let ratio = serde_json::json!({
        "ttft_p50_off_over_on": on.report.ttft_ms.0.recip() * off.report.ttft_ms.0,
        "aggregate_tok_s_on_over_off": on.report.aggregate_tok_s / off.report.aggregate_tok_s,
        "wall_off_over_on": off.report.wall_s / on.report.wall_s,
    });
    if !a.json {
        println!("bench [{}]: shared prefix of {prefix_len} tokens, prompts of {prompt_tokens}, output {} tokens, {requests} requests at concurrency {concurrency}", a.label, a.output_tokens);
        on.report.print("  cache on");
        println!("            {} prompt tokens cached per request on average", on.cached_tokens);
        off.report.print("  cache off");
        println!(
            "  ratio     ttft p50 off/on {:.2} | aggregate tok/s on/off {:.2}",
            ratio["ttft_p50_off_over_on"].as_f64().unwrap_or(f64::NAN),
            ratio["aggregate_tok_s_on_over_off"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(serde_json::json!({
        "label": a.label, "model": model, "workload": "shared_prefix", "shared_prefix_tokens": prefix_len,
        "prompt_tokens": prompt_tokens, "output_tokens": a.output_tokens, "requests": requests, "concurrency": concurrency,
        "cache_on": on.report.to_json(), "cache_on_cached_tokens": on.cached_tokens,
        "cache_off": off.report.to_json(), "ratio": ratio,
    }))
}

/// `--multi-turn`: `--concurrency` conversations at once, each of `turns` turns in order; TTFT
/// by turn, caching off first, then on.
async fn multi_turn(a: &BenchArgs, client: &mut InferenceClient, model: &str, turns: usize) -> anyhow::Result<serde_json::Value> {
    let concurrency = a.concurrency[0];
    let conversations = concurrency;
    let base = template(a, model)?;
    let mut by_side = Vec::new();
    for (k, skip) in [true, false].into_iter().enumerate() {
        // The user's messages, made up front (each its own), so that only the model runs while
        // the clock does.
        let mut messages = Vec::new();
        for c in 0..conversations {
            let mut turns_of = Vec::new();
            for t in 0..turns {
                let seed = a.seed.wrapping_mul(7_919).wrapping_add((k * conversations * turns + c * turns + t) as u64 + 1);
                turns_of.push(unique_text(client, model, "", 0, a.prompt_tokens, seed).await?);
            }
            messages.push(turns_of);
        }
        let start = Instant::now();
        let tasks: Vec<_> = messages
            .into_iter()
            .map(|msgs| {
                let (client, base) = (client.clone(), base.clone());
                tokio::spawn(async move {
                    let mut conversation = String::new();
                    let mut samples = Vec::new();
                    for m in msgs {
                        conversation.push_str(&m);
                        let req = pb::GenerateRequest { prompt: conversation.clone(), skip_prefix_cache: skip, ..base.clone() };
                        let s = bounded("a GenerateStream request", one_request(client.clone(), req)).await?;
                        // The next turn resends the answer as the conversation so far.
                        conversation.push_str(&s.text);
                        samples.push(s);
                    }
                    anyhow::Ok(samples)
                })
            })
            .collect();
        let mut per_turn: Vec<Vec<Sample>> = vec![Vec::new(); turns];
        for t in futures::future::join_all(tasks).await {
            for (i, s) in t.context("a bench task panicked")??.into_iter().enumerate() {
                per_turn[i].push(s);
            }
        }
        by_side.push((per_turn, start.elapsed().as_secs_f64()));
    }
    let describe = |(per_turn, wall): &(Vec<Vec<Sample>>, f64)| {
        let all: Vec<Sample> = per_turn.iter().flatten().cloned().collect();
        let ttft: Vec<f64> = per_turn.iter().map(|s| p50_p99(s.iter().map(|x| x.ttft * 1e3).collect()).0).collect();
        let cached: Vec<usize> = per_turn.iter().map(|s| s.iter().map(|x| x.cached_tokens).sum::<usize>() / s.len().max(1)).collect();
        (Report::new(&all, *wall, None), ttft, cached)
    };
    let (off, off_ttft, _) = describe(&by_side[0]);
    let (on, on_ttft, on_cached) = describe(&by_side[1]);
    let growth = |t: &[f64]| t[t.len() - 1] / t[0];
    if !a.json {
        println!("bench [{}]: {conversations} conversations of {turns} turns ({} new prompt tokens a turn, output {} tokens), {concurrency} at once", a.label, a.prompt_tokens, a.output_tokens);
        let fmt = |t: &[f64]| t.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
        println!(
            "  cache on   ttft p50 by turn (ms): {} | last/first {:.2} | cached tokens by turn: {on_cached:?}",
            fmt(&on_ttft),
            growth(&on_ttft)
        );
        println!("  cache off  ttft p50 by turn (ms): {} | last/first {:.2}", fmt(&off_ttft), growth(&off_ttft));
        println!("  aggregate tok/s: on {:.1}, off {:.1}", on.aggregate_tok_s, off.aggregate_tok_s);
    }
    Ok(serde_json::json!({
        "label": a.label, "model": model, "workload": "multi_turn", "turns": turns, "conversations": conversations,
        "new_prompt_tokens_per_turn": a.prompt_tokens, "output_tokens": a.output_tokens,
        "cache_on": {"ttft_p50_ms_by_turn": on_ttft, "last_over_first_ttft": growth(&on_ttft), "cached_tokens_by_turn": on_cached, "report": on.to_json()},
        "cache_off": {"ttft_p50_ms_by_turn": off_ttft, "last_over_first_ttft": growth(&off_ttft), "report": off.to_json()},
    }))
}

/// Runs `workload` against the cluster `client` reaches.
pub(super) async fn run(a: &BenchArgs, client: &mut InferenceClient, model: &str, workload: Workload) -> anyhow::Result<()> {
    if a.concurrency.len() != 1 || !a.request_rate.is_empty() || a.baseline.is_some() || a.baseline_only || a.baseline_from.is_some() {
        bail!("--shared-prefix and --multi-turn take one --concurrency and no --request-rate or baseline (caching off is their baseline)");
    }
    let doc = match workload {
        Workload::SharedPrefix(n) => shared_prefix(a, client, model, n).await?,
        Workload::MultiTurn(0) => bail!("--multi-turn must be at least 1"),
        Workload::MultiTurn(t) => multi_turn(a, client, model, t).await?,
    };
    if a.json {
        println!("{doc}");
    }
    Ok(())
}
