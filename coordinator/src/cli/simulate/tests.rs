//! The router simulator: its flags, Mooncake traces, the bench cost model and what KV-aware routing gains.

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
