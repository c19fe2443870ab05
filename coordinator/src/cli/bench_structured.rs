//! `shardctl bench --json-schema FILE`: decoding held to a JSON schema against free decoding of
//! the same prompt, in the same command and on the same cluster, as a ratio of aggregate
//! tokens/s at each `--concurrency`; and the time llguidance takes per token to compute the mask
//! (the work the sampling rank does beside each forward pass), measured here by replaying the
//! constrained outputs through the model's own tokenizer.

use super::bench::{build_prompt, p50_p99, run_phase, BenchArgs, Report, Sample};
use super::InferenceClient;
use crate::frontend::output::Reasoning;
use crate::frontend::structured::Constraint;
use anyhow::{anyhow, bail, Context};
use shardserve_proto::v1 as pb;
use std::time::Instant;

/// Runs the comparison at each concurrency of `a` with `schema` (its text).
pub(super) async fn run(a: &BenchArgs, client: &mut InferenceClient, model: &str, schema: &str) -> anyhow::Result<()> {
    if !a.request_rate.is_empty() {
        bail!("--json-schema measures closed loops (--concurrency), not --request-rate");
    }
    let (prompt, _) = build_prompt(client, model, a.prompt_tokens).await?;
    let free = pb::GenerateRequest {
        model: model.to_string(),
        prompt,
        max_new_tokens: Some(i32::try_from(a.output_tokens).context("--output-tokens is too large")?),
        sampling: Some(pb::SamplingParams { temperature: Some(1.0), top_k: Some(0), seed: Some(a.seed), ..Default::default() }),
        ..Default::default()
    };
    let structured = pb::StructuredOutput { kind: Some(pb::structured_output::Kind::JsonSchema(schema.to_string())) };
    let held = pb::GenerateRequest { structured_output: Some(structured), ..free.clone() };
    let mut runs = Vec::new();
    let mut outputs: Vec<Vec<u32>> = Vec::new();
    for &c in &a.concurrency {
        let requests = a.requests.unwrap_or(c.max(4) * 2);
        let mut measured = Vec::new();
        for req in [&free, &held] {
            if a.warmup > 0 {
                run_phase(client, req, a.warmup.max(c), c).await?;
            }
            let (samples, wall): (Vec<Sample>, f64) = run_phase(client, req, requests, c).await?;
            measured.push(Report::new(&samples, wall, Some(c.min(requests))));
            if std::ptr::eq(req, &held) {
                outputs.extend(samples.into_iter().map(|s| s.token_ids));
            }
        }
        let ratio = measured[1].aggregate_tok_s / measured[0].aggregate_tok_s;
        if !a.json {
            println!("concurrency {c} ({requests} requests each)");
            measured[0].print("  free");
            measured[1].print("  schema");
            println!("  ratio     schema/free: aggregate tok/s {ratio:.2}");
        }
        runs.push(serde_json::json!({
            "concurrency": c, "requests": requests, "free": measured[0].to_json(), "schema": measured[1].to_json(),
            "ratio_aggregate_tok_s": ratio,
        }));
    }
    let mask = match mask_times(model, schema, &outputs) {
        Ok((p50, p99, tokens, vocab)) => {
            if !a.json {
                println!("mask      p50 {p50:.1} us, p99 {p99:.1} us per token ({tokens} tokens replayed, vocabulary {vocab})");
            }
            serde_json::json!({"p50_us": p50, "p99_us": p99, "tokens": tokens, "vocab": vocab})
        }
        Err(e) => {
            eprintln!("shardctl bench: the mask time is not measured: {e:#}");
            serde_json::Value::Null
        }
    };
    if a.json {
        println!("{}", serde_json::json!({"label": a.label, "model": model, "json_schema": schema, "runs": runs, "mask": mask}));
    }
    Ok(())
}

/// Replays `outputs` through a fresh grammar of `schema` for `model` (read from its folder or
/// the Hub cache), timing each mask: p50 and p99 in microseconds, tokens, vocabulary size.
fn mask_times(model: &str, schema: &str, outputs: &[Vec<u32>]) -> anyhow::Result<(f64, f64, usize, usize)> {
    let files = shardserve::hub::resolve(model, None).map_err(|e| anyhow!("model {model} is not readable here: {e}"))?;
    let cfg = files.config()?;
    let eos = files.generation()?.eos_ids(&cfg);
    let tokenizer = files.tokenizer()?;
    let grammars = shardserve::guide::Grammars::new(&tokenizer, cfg.vocab_size, &eos)?;
    // The grammar the coordinator compiles for such a request.
    let grammar = Constraint::Json(serde_json::from_str(schema)?).grammar(Reasoning::Off, &tokenizer);
    let mut times = Vec::new();
    for out in outputs {
        let mut guide = grammars.guide(&grammar)?;
        for &t in out {
            let started = Instant::now();
            guide.mask()?;
            times.push(started.elapsed().as_secs_f64() * 1e6);
            if eos.contains(&t) {
                break;
            }
            guide.advance(t)?;
        }
    }
    let tokens = times.len();
    let (p50, p99) = p50_p99(times);
    Ok((p50, p99, tokens, cfg.vocab_size))
}
