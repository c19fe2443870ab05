//! Prefix caching through real clusters: a request that starts from cached blocks gets the
//! tokens (and, to float rounding, the log-probabilities) it gets when it computes its whole
//! prompt — a whole-block prefix, a partial-block one, several requests sharing one prefix in
//! the same step, and a hit on blocks whose writer is still running — on 1 worker, 2 and 3
//! stages, `--tp 2` and 2 stages × `--tp 2`; nothing cached survives a re-plan or an unload;
//! tenants and salts never share; two coordinators on one etcd never over-commit a pool.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// Tokens per KV block in these tests: small, so that prompts span many blocks.
const BLOCK: usize = 8;

/// What one greedy request got.
#[derive(Debug, Clone)]
struct Got {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    cached: u32,
}

/// A greedy request for `n` tokens with log-probabilities; `skip`: it computes its whole prompt
/// and publishes nothing (the reference a hit is held to).
fn request(prompt: &str, n: i32, skip: bool) -> pb::GenerateRequest {
    pb::GenerateRequest { logprobs: true, ignore_eos: true, skip_prefix_cache: skip, ..greedy(prompt, n) }
}

async fn run(c: &Client, prompt: &str, n: i32, skip: bool) -> Got {
    let r = generate(&mut c.clone(), request(prompt, n, skip)).await.unwrap_or_else(|e| panic!("{prompt:?}: {e:?}"));
    Got { tokens: r.token_ids, logprobs: r.logprobs, cached: r.usage.expect("usage").cached_tokens }
}

/// Largest log-probability difference seen by [`same`] (for the record).
static WORST: std::sync::Mutex<f32> = std::sync::Mutex::new(0.0);

/// `got` has `want`'s tokens, and its log-probabilities within float rounding: the rows of a
/// step go through the matmuls in batches of other sizes when part of the prompt is cached
/// (as they do when a request shares its steps with other traffic), which moves the last bits.
fn same(what: &str, got: &Got, want: &Got) {
    assert_eq!(got.tokens, want.tokens, "{what}: tokens differ from a full prefill");
    assert_eq!(got.logprobs.len(), want.logprobs.len(), "{what}");
    for (i, (a, b)) in got.logprobs.iter().zip(&want.logprobs).enumerate() {
        let d = (a - b).abs();
        let mut worst = WORST.lock().unwrap();
        *worst = worst.max(d);
        assert!(d <= 1e-4, "{what}: logprob {i} is {a}, with a full prefill {b}");
    }
}

async fn tokens(c: &Client, text: &str) -> Vec<u32> {
    let req = pb::TokenizeRequest { model: String::new(), text: text.to_string() };
    c.clone().tokenize(req).await.unwrap().into_inner().token_ids
}

async fn token_count(c: &Client, text: &str) -> usize {
    tokens(c, text).await.len()
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A prompt of many blocks that ends part-way into a block, and its token count.
async fn base_prompt(c: &Client, seed: usize) -> (String, usize) {
    let cases = reference_cases();
    let mut text: String = (0..8).map(|i| cases[(i + seed) % 8].prompt.clone()).collect::<Vec<_>>().join(" ");
    loop {
        let n = token_count(c, &text).await;
        if n % BLOCK != 0 {
            return (text, n);
        }
        text.push_str(" x");
    }
}

/// Whole blocks of `tokens` tokens.
fn whole(tokens: usize) -> u32 {
    (tokens / BLOCK * BLOCK) as u32
}

/// Every case of item 2 on one running cluster.
async fn parity(cluster: &Cluster, layout: &str) {
    let c = cluster.client().await;
    let (base, len) = base_prompt(&c, 0).await;
    let extended = format!("{base} and then some more words follow it");
    // The tails part from each other at their first word: whichever of them is admitted first
    // publishes no whole block that another tail (or the extended prompt) shares beyond the
    // base's, so each one's hit is the base's whole blocks however the four are scheduled.
    let tails: Vec<String> = ["alpha", "bravo", "charlie", "delta"].iter().map(|w| format!("{base} {w} tail ends here")).collect();
    let mut others = vec![tokens(&c, &extended).await];
    for t in &tails {
        others.push(tokens(&c, t).await);
    }
    for (i, t) in others.iter().enumerate().skip(1) {
        for o in others.iter().take(i) {
            let shared = common_prefix(t, o);
            assert_eq!(whole(shared), whole(len), "{layout}: tail {} shares {shared} tokens with another prompt", i - 1);
        }
    }
    let (writer, writer_len) = base_prompt(&c, 3).await;
    let reader = format!("{writer} read while it is written");
    for p in [&extended, &tails[0], &reader] {
        assert!(token_count(&c, p).await > len.min(writer_len), "{layout}: {p:?} is not longer than its prefix");
    }
    // The references: every prompt computed whole, nothing published.
    let r_base = run(&c, &base, 16, true).await;
    let r_ext = run(&c, &extended, 16, true).await;
    let mut r_tails = Vec::new();
    for t in &tails {
        r_tails.push(run(&c, t, 16, true).await);
    }
    let r_reader = run(&c, &reader, 16, true).await;
    assert!([&r_base, &r_ext, &r_reader].iter().all(|g| g.cached == 0), "{layout}: a skipped request read the cache");

    // Nothing was published by the references: the first normal run computes it all.
    let first = run(&c, &base, 16, false).await;
    assert_eq!(first.cached, 0, "{layout}");
    same(&format!("{layout}, first run"), &first, &r_base);
    // A whole-block prefix: every block but the one holding the last prompt token.
    let again = run(&c, &base, 16, false).await;
    assert_eq!(again.cached, ((len - 1) / BLOCK * BLOCK) as u32, "{layout}: {len} prompt tokens");
    same(&format!("{layout}, whole-block hit"), &again, &r_base);
    // A partial-block prefix: the prompt's whole blocks; its last, part-filled block is not
    // the extended prompt's.
    let ext = run(&c, &extended, 16, false).await;
    assert_eq!(ext.cached, whole(len), "{layout}");
    same(&format!("{layout}, partial-block hit"), &ext, &r_ext);
    // Four requests sharing the prefix, sent together: they share steps as they are admitted.
    let tasks: Vec<_> = tails
        .iter()
        .map(|t| {
            let (c, t) = (c.clone(), t.clone());
            tokio::spawn(async move { run(&c, &t, 16, false).await })
        })
        .collect();
    for (i, (t, want)) in tasks.into_iter().zip(&r_tails).enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got.cached, whole(len), "{layout}: tail {i}");
        same(&format!("{layout}, shared in one step, tail {i}"), &got, want);
    }

    // A hit on blocks whose writer is still generating: its prompt's blocks were published
    // once written, and are shared while it runs on.
    let mut w = c.clone().generate_stream(request(&writer, 700, false)).await.unwrap().into_inner();
    let first_token = tokio::time::timeout(Duration::from_secs(30), w.message()).await.expect("no first token").unwrap();
    assert!(first_token.is_some_and(|m| !m.token_ids.is_empty()), "{layout}: the writer produced nothing");
    let writer_task = tokio::spawn(async move {
        let mut n = 1;
        while let Some(m) = w.message().await.expect("the writer failed") {
            n += m.token_ids.len();
        }
        (n, Instant::now())
    });
    let read = run(&c, &reader, 16, false).await;
    let read_at = Instant::now();
    assert_eq!(read.cached, whole(writer_len), "{layout}");
    same(&format!("{layout}, hit while the writer runs"), &read, &r_reader);
    let (n, writer_done) = tokio::time::timeout(Duration::from_secs(120), writer_task).await.expect("the writer hung").unwrap();
    assert_eq!(n, 700, "{layout}");
    assert!(writer_done > read_at, "{layout}: the writer had finished before the reader came back");

    // Nothing is held afterwards: the cached blocks belong to no sequence.
    wait_no_sequences(&cluster.stage_addresses().await).await;
    let status = cluster_status(&cluster.url).await;
    let m = &status.models[0];
    assert!(m.prefix_caching && m.prefix_cache_hits > 0 && m.prefix_cache_queries > m.prefix_cache_hits, "{layout}: {m:?}");
    assert!(m.kv_blocks_cached > 0, "{layout}: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prefix_gives_the_tokens_of_a_full_prefill_on_every_layout() {
    for (workers, tp) in [(1, 1), (2, 1), (3, 1), (2, 2), (4, 2)] {
        let layout = format!("{} stage(s) × tp {tp}", workers / tp);
        let cluster = Cluster::new(reference_model())
            .workers(workers)
            .arg("--tp")
            .arg(&tp.to_string())
            .arg("--kv-block-size")
            .arg(&BLOCK.to_string())
            .start();
        parity(&cluster, &layout).await;
    }
    eprintln!("largest log-probability difference with a hit: {:e}", *WORST.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_prefill_publishes_nothing_half_written() {
    // Prefilled 8 tokens a step: a client that goes away stops it part-way.
    let cluster =
        Cluster::new(reference_model()).workers(2).arg("--kv-block-size").arg(&BLOCK.to_string()).arg("--prefill-chunk").arg("8").start();
    let c = cluster.client().await;
    let (prompt, len) = base_prompt(&c, 5).await;
    let reference = run(&c, &prompt, 16, true).await;
    for _ in 0..3 {
        let s = c.clone().generate_stream(request(&prompt, 16, false)).await.unwrap();
        drop(s);
    }
    wait_no_sequences(&cluster.stage_addresses().await).await;
    // Whatever the cancelled ones left cached was written whole; the answer is unchanged.
    let after = run(&c, &prompt, 16, false).await;
    assert!(after.cached <= whole(len - 1), "{after:?}");
    same("after cancelled prefills", &after, &reference);
    let again = run(&c, &prompt, 16, false).await;
    assert_eq!(again.cached, ((len - 1) / BLOCK * BLOCK) as u32);
    same("after cancelled prefills, cached", &again, &reference);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replan_or_an_unload_drops_the_cache_and_nothing_stale_is_served() {
    let cluster =
        Cluster::new(reference_model()).workers(3).arg("--lease-ttl-s").arg("2").arg("--kv-block-size").arg(&BLOCK.to_string()).start();
    let c = cluster.client().await;
    let (prompt, len) = base_prompt(&c, 2).await;
    let reference = run(&c, &prompt, 16, true).await;
    run(&c, &prompt, 16, false).await;
    assert!(run(&c, &prompt, 16, false).await.cached > 0);
    // A stage dies: the model is placed again over the survivors, with empty pools.
    let (_, pid) = cluster.stage_worker(1).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match generate(&mut c.clone(), request(&prompt, 16, false)).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(matches!(e.code(), Code::Unavailable | Code::FailedPrecondition), "{e:?}");
                assert!(Instant::now() < deadline, "no re-plan within 30 s: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(placement(&cluster).await.len(), 2);
    assert_eq!(after.usage.unwrap().cached_tokens, 0, "a block cached on the old placement was served");
    assert_eq!(after.token_ids, reference.tokens);
    assert_eq!(run(&c, &prompt, 16, false).await.cached, ((len - 1) / BLOCK * BLOCK) as u32);

    // A model loaded at run time, unloaded and loaded again starts with nothing cached. (Once
    // the dead worker has left the fleet: a load would pick it while its lease lasts.)
    wait_until("the killed worker leaving the fleet", Duration::from_secs(10), || {
        cluster.workers_json()["workers"].as_array().unwrap().len() == 2
    });
    let dir = tempfile::tempdir().unwrap();
    copy_model(&reference_model(), dir.path());
    let load = || {
        let args =
            ["models", "load", dir.path().to_str().unwrap(), "--name", "again", "--wait-s", "60", "--json", "--coordinator", &cluster.url];
        run_shardctl(&args, &[], Duration::from_secs(90))
    };
    let out = load();
    assert!(out.status.success(), "models load: {}\n{}", out.stderr, cluster.stderr());
    let named = |skip| pb::GenerateRequest { model: "again".into(), ..request(&prompt, 16, skip) };
    for _ in 0..2 {
        generate(&mut c.clone(), named(false)).await.unwrap();
    }
    assert!(generate(&mut c.clone(), named(false)).await.unwrap().usage.unwrap().cached_tokens > 0);
    let out = run_shardctl(&["models", "unload", "again", "--json", "--coordinator", &cluster.url], &[], Duration::from_secs(60));
    assert!(out.status.success(), "models unload: {}", out.stderr);
    let out = load();
    assert!(out.status.success(), "models load again: {}\n{}", out.stderr, cluster.stderr());
    let r = generate(&mut c.clone(), named(false)).await.unwrap();
    assert_eq!((r.usage.unwrap().cached_tokens, r.token_ids), (0, reference.tokens));
}

/// POST to the HTTP API with a bearer key: the status and the body as JSON.
fn post_json(addr: &str, path: &str, key: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (code, text) = http_post(addr, path, Some(key), &body.to_string());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (code, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_per_key_scope_one_tenant_never_hits_another_and_salts_separate_requests() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "tenant-a-key\ntenant-b-key\n").unwrap();
    let cluster = Cluster::new(reference_model())
        .workers(2)
        .arg("--api-keys-file")
        .arg(keys.to_str().unwrap())
        .arg("--prefix-cache-scope")
        .arg("per-key")
        .arg("--kv-block-size")
        .arg(&BLOCK.to_string())
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .env("SHARDSERVE_API_KEY", "tenant-a-key")
        .start();
    let http = cluster_status(&cluster.url).await.http_address;
    let prompt = reference_cases().iter().map(|c| c.prompt.clone()).collect::<Vec<_>>().join(" ");
    let complete = |key: &str, salt: Option<&str>| {
        let mut body = serde_json::json!({"model": "", "prompt": prompt, "max_tokens": 4, "temperature": 0});
        if let Some(s) = salt {
            body["cache_salt"] = serde_json::json!(s);
        }
        let (code, v) = post_json(&http, "/v1/completions", key, body);
        assert_eq!(code, 200, "{v}");
        (
            v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("usage.prompt_tokens_details.cached_tokens"),
            v["choices"][0]["text"].clone(),
        )
    };
    let (cached, text_a) = complete("tenant-a-key", None);
    assert_eq!(cached, 0);
    let (cached, again) = complete("tenant-a-key", None);
    assert!(cached > 0, "tenant A's own prompt was not reused");
    assert_eq!(again, text_a);
    // Tenant B, the same prompt: nothing of A's is reused.
    let (cached, text_b) = complete("tenant-b-key", None);
    assert_eq!(cached, 0, "tenant B hit tenant A's cached prompt");
    assert_eq!(text_b, text_a);
    // A salt separates requests of one tenant; the same salt shares.
    assert_eq!(complete("tenant-a-key", Some("conversation-1")).0, 0);
    assert!(complete("tenant-a-key", Some("conversation-1")).0 > 0);
    let (code, v) = post_json(&http, "/v1/completions", "tenant-a-key", serde_json::json!({"prompt": "a", "cache_salt": ""}));
    assert_eq!((code, v["error"]["param"].as_str()), (400, Some("cache_salt")), "{v}");
    // The metrics count tokens looked up and found; status shows the hit rate.
    let at = cluster.metrics_address().await;
    let (_, m) = tokio::task::spawn_blocking(move || http_get(&at, "/metrics")).await.unwrap();
    let queries = metric(&m, "shardserve_prefix_cache_queries_total", &[]).expect("shardserve_prefix_cache_queries_total");
    let hits = metric(&m, "shardserve_prefix_cache_hits_total", &[]).expect("shardserve_prefix_cache_hits_total");
    assert!(hits > 0.0 && queries > hits, "{queries} queried, {hits} hit");
    let out =
        run_shardctl(&["status", "--coordinator", &cluster.url], &[("SHARDSERVE_ADMIN_KEY", "tenant-a-key")], Duration::from_secs(20));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("prefix cache") && out.stdout.contains("% hit"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_never_over_commit_a_pool() {
    let etcd = Etcd::start();
    let name = unique_cluster("owner");
    let model = reference_model();
    let args = |url: &str| -> Vec<String> {
        [
            "--model",
            model.to_str().unwrap(),
            "--etcd",
            url,
            "--cluster",
            &name,
            "--workers",
            "2",
            "--lease-ttl-s",
            "2",
            "--kv-memory",
            "512KiB",
            "--max-waiting",
            "64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a_args = args(&etcd.url());
    let (_a, url_a) = spawn_coordinator(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let _w1 = spare_worker(&etcd, &name, "w1", 2);
    let _w2 = spare_worker(&etcd, &name, "w2", 2);
    let (_b, url_b) = spawn_coordinator(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    for url in [&url_a, &url_b] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster_status(url).await.models[0].model.as_ref().map(|m| m.state.as_str()) != Some("ready") {
            assert!(Instant::now() < deadline, "{url} not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let roles = [cluster_status(&url_a).await.role, cluster_status(&url_b).await.role];
    assert!(roles.contains(&"leader".to_string()) && roles.contains(&"follower".to_string()), "{roles:?}");
    let cases = reference_cases();
    let clients = [Client::connect(url_a.clone()).await.unwrap(), Client::connect(url_b.clone()).await.unwrap()];
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            let case = cases[i % cases.len()].clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                let outcome = async {
                    let mut s = c.generate_stream(greedy(&case.prompt, 32)).await?.into_inner();
                    while let Some(m) = s.message().await? {
                        ids.extend(m.token_ids);
                    }
                    Ok::<_, tonic::Status>(())
                }
                .await;
                (i, case, ids, outcome)
            })
        })
        .collect();
    let (mut served, mut refused) = ([0; 2], 0);
    for t in tasks {
        let (i, case, ids, outcome) = tokio::time::timeout(Duration::from_secs(180), t).await.expect("a stream hung").unwrap();
        match outcome {
            Ok(()) => {
                assert_eq!(ids, case.new_ids, "stream {i}");
                served[i % 2] += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "stream {i} failed: {e:?}");
                assert!(ids.is_empty(), "stream {i} was refused after {} tokens: {e:?}", ids.len());
                refused += 1;
            }
        }
    }
    // The leader's queue holds 64 requests besides those running: at least that many were
    // served, whoever received them.
    assert!(served[0] + served[1] >= 64, "served through each coordinator: {served:?} ({refused} refused)");
    // The follower hands its requests to the leader: one more through it gets the right tokens.
    let follower = if cluster_status(&url_a).await.role == "follower" { &clients[0] } else { &clients[1] };
    let case = &cases[3];
    assert_eq!(generate(&mut follower.clone(), greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    // A constrained request handed over keeps its grammar (the leader checks it again).
    let choices = vec!["north".to_string(), "south".to_string()];
    let constrained = pb::GenerateRequest {
        structured_output: Some(pb::StructuredOutput {
            kind: Some(pb::structured_output::Kind::Choice(pb::Choices { choices: choices.clone() })),
        }),
        ..greedy(&case.prompt, 32)
    };
    let text = generate(&mut follower.clone(), constrained).await.unwrap().text;
    assert!(choices.contains(&text), "through the follower: {text:?}");
    // No worker holds a block afterwards.
    let workers = pb::admin_client::AdminClient::connect(url_a.clone())
        .await
        .unwrap()
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let addresses: Vec<String> = workers.iter().map(|w| w.address.clone()).collect();
    assert_eq!(addresses.len(), 2);
    wait_no_sequences(&addresses).await;
}
