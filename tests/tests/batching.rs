//! Continuous batching through real clusters: requests sent at once run as one batch and get
//! exactly the tokens they get alone (transformers' for the reference prompts) on every layout;
//! KV blocks come back on every stage however a request ends; a small pool, a full queue, a
//! slow reader and a killed stage each get the status a client should see; metrics count what
//! happened.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// `Generate` for every request at once, each on its own task; answers in order.
async fn generate_all(c: &Client, reqs: Vec<pb::GenerateRequest>) -> Vec<Result<pb::GenerateResponse, tonic::Status>> {
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { generate(&mut c, r).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a request task panicked"));
    }
    out
}

/// The coordinator's metrics, scraped.
async fn scrape(cluster: &Cluster) -> String {
    let at = cluster.metrics_address().await;
    let (code, body) = tokio::task::spawn_blocking(move || http_get(&at, "/metrics")).await.unwrap();
    assert_eq!(code, 200, "GET /metrics answered {code}");
    body
}

/// How many steps carried more than `n` of what the histogram `name` counts.
fn steps_above(metrics: &str, name: &str, n: &str) -> f64 {
    let count = metric(metrics, &format!("{name}_count"), &[]).unwrap_or_else(|| panic!("no {name} in the metrics"));
    count - metric(metrics, &format!("{name}_bucket"), &[("le", n)]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_prompts_at_once_give_transformers_tokens_on_every_layout() {
    let cases = reference_cases();
    let sampled_req = sampled("Once upon a time", 42);
    for (workers, tp) in [(1, 1), (2, 1), (3, 1), (2, 2)] {
        let layout = format!("{workers} workers, tp {tp}");
        let cluster = Cluster::new(reference_model())
            .workers(workers)
            .arg("--tp")
            .arg(&tp.to_string())
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .start();
        let c = cluster.client().await;
        let alone = generate(&mut c.clone(), sampled_req.clone()).await.unwrap().token_ids;
        let mut reqs: Vec<pb::GenerateRequest> = cases.iter().map(|k| greedy(&k.prompt, k.new_ids.len() as i32)).collect();
        reqs.push(sampled_req.clone());
        let answers = generate_all(&c, reqs).await;
        for (case, got) in cases.iter().zip(&answers) {
            assert_eq!(got.as_ref().unwrap().token_ids, case.new_ids, "{layout}: {:?}", case.prompt);
        }
        assert_eq!(answers[8].as_ref().unwrap().token_ids, alone, "{layout}: a seeded request in a batch differs from alone");
        // They did run together: some step carried more than one sequence.
        let m = scrape(&cluster).await;
        assert!(steps_above(&m, "shardserve_batch_size", "1") > 0.0, "{layout}: no step carried two sequences");
        wait_no_sequences(&cluster.stage_addresses().await).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_file_bf16_llama_gives_the_same_tokens_batched_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let made = run_shardctl(
        &["dev", "tiny-model", "--arch", "llama", "--out", out, "--dtype", "bf16", "--shards", "2", "--layers", "4", "--seed", "5"],
        &[],
        Duration::from_secs(60),
    );
    assert!(made.status.success(), "{}", made.stderr);
    let cluster = Cluster::new(dir.path()).workers(2).start();
    let c = cluster.client().await;
    let prompts = ["The quick brown fox", "Once upon a time", "a", "It was the best of times, it was the worst of times"];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(generate(&mut c.clone(), greedy(p, 24)).await.unwrap().token_ids);
    }
    alone.push(generate(&mut c.clone(), sampled(prompts[1], 7)).await.unwrap().token_ids);
    let mut reqs: Vec<pb::GenerateRequest> = prompts.iter().map(|p| greedy(p, 24)).collect();
    reqs.push(sampled(prompts[1], 7));
    let together: Vec<Vec<u32>> = generate_all(&c, reqs).await.into_iter().map(|r| r.unwrap().token_ids).collect();
    assert_eq!(together, alone);
    wait_no_sequences(&cluster.stage_addresses().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_prefilled_in_chunks_alongside_a_running_stream() {
    let cases = reference_cases();
    let long = &cases[7];
    // One stage, 4-token chunks: while the stream decodes, every step holds its row and a chunk.
    let cluster = Cluster::new(reference_model()).arg("--prefill-chunk").arg("4").arg("--metrics-listen").arg("127.0.0.1:0").start();
    let mut c = cluster.client().await;
    let streaming = greedy("a", 400);
    let want_stream = generate(&mut c, streaming.clone()).await.unwrap().token_ids;
    let before = scrape(&cluster).await;
    let mut s = c.generate_stream(streaming).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
    let mut got = first.token_ids;
    let joined = generate(&mut c, greedy(&long.prompt, 32)).await.unwrap();
    assert_eq!(joined.token_ids, long.new_ids);
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = s.message().await.unwrap() {
            got.extend(m.token_ids);
        }
    });
    rest.await.expect("the stream did not finish within 60 s");
    assert_eq!(got, want_stream, "the stream changed when a prompt was prefilled beside it");
    // Steps of 5 rows (a decode row and a 4-token chunk) happened only in the second run.
    let after = scrape(&cluster).await;
    let mixed = steps_above(&after, "shardserve_batch_tokens", "4") - steps_above(&before, "shardserve_batch_tokens", "4");
    assert!(mixed >= (long.input_ids.len() / 4 - 1) as f64, "{mixed} steps mixed a chunk with a decode row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_leaves_the_others_unchanged_and_every_block_comes_back() {
    let cluster = Cluster::new(reference_model()).workers(3).start();
    let addrs = cluster.stage_addresses().await;
    let c = cluster.client().await;
    let prompts = ["a", "The", "Once upon", "It was"];
    let mut want = Vec::new();
    for p in prompts {
        want.push(generate(&mut c.clone(), greedy(p, 300)).await.unwrap().token_ids);
    }
    let mut streams = Vec::new();
    for p in prompts {
        streams.push(c.clone().generate_stream(greedy(p, 300)).await.unwrap().into_inner());
    }
    // Everyone has started; then the second client goes away.
    for s in &mut streams {
        assert!(tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().is_some());
    }
    let mut cancelled = streams.remove(1);
    let _ = cancelled.message().await;
    drop(cancelled);
    let mut rest_want = want.clone();
    rest_want.remove(1);
    for (mut s, w) in streams.into_iter().zip(rest_want) {
        let mut got = Vec::new();
        // The first message was read above; its tokens are the first of `w`.
        let read = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(m) = s.message().await.unwrap() {
                got.extend(m.token_ids);
            }
        });
        read.await.expect("a stream did not finish within 60 s");
        assert_eq!(got[..], w[w.len() - got.len()..], "a stream changed when another was cancelled");
        assert_eq!(got.len(), w.len() - 1);
    }
    wait_no_sequences(&addrs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_against_a_small_pool_finish_or_are_refused() {
    // 480 KiB per stage holds 10 to 30 blocks of 16 tokens of this model, by its layers: a few
    // requests of case 0 at a time, the next 64 wait, the rest are refused at once.
    let cluster = Cluster::new(reference_model()).workers(2).arg("--kv-memory").arg("480KiB").arg("--max-waiting").arg("64").start();
    let addrs = cluster.stage_addresses().await;
    // Each stage's pool is what 480 KiB holds of its layers; the smallest is the limit.
    let stages = placement(&cluster).await;
    let blocks = stages.iter().map(|s| s.kv_blocks).min().unwrap();
    assert!(stages.iter().all(|s| s.kv_block_size == 16), "{stages:?}");
    let bytes_per_block = |layers: u32| 16 * 2 * layers * 2 * 32 * 4;
    for s in &stages {
        assert_eq!(s.kv_blocks, 480 * 1024 / bytes_per_block(s.layer_end - s.layer_start), "{s:?}");
    }
    let case = &reference_cases()[0];
    let c = cluster.client().await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut c = c.clone();
            let req = greedy(&case.prompt, 32);
            tokio::spawn(async move {
                let mut s = c.generate_stream(req).await?.into_inner();
                let mut ids = Vec::new();
                while let Some(m) = s.message().await? {
                    ids.extend(m.token_ids);
                }
                Ok::<_, tonic::Status>(ids)
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for t in tasks {
        let answer = tokio::time::timeout(Duration::from_secs(120), t).await.expect("a stream hung").unwrap();
        match answer {
            Ok(ids) => {
                assert_eq!(ids, case.new_ids);
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("max_waiting"), "{}", e.message());
                refused += 1;
            }
        }
    }
    assert!(served >= 64, "only {served} served ({refused} refused) in {:?}", started.elapsed());
    assert_eq!(served + refused, 200);
    wait_no_sequences(&addrs).await;

    // A request that could never fit is refused before it queues, naming the limit.
    let mut c = c.clone();
    let e = generate(&mut c, greedy("a", (blocks * 16) as i32)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let limit = format!("holds {} tokens", blocks * 16);
    assert!(e.message().contains("can never fit") && e.message().contains(&limit), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let cluster = Cluster::new(reference_model())
        .arg("--max-batch-size")
        .arg("1")
        .arg("--max-waiting")
        .arg("1")
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .start();
    let c = cluster.client().await;
    let mut running = c.clone().generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    assert!(tokio::time::timeout(Duration::from_secs(30), running.message()).await.unwrap().unwrap().is_some());
    let mut waiting = c.clone().generate_stream(greedy("The", 8)).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&scrape(&cluster).await, "shardserve_queue_depth", &[]) != Some(1.0) {
        assert!(Instant::now() < deadline, "the second request never waited in the queue");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = Instant::now();
    let e = generate(&mut c.clone(), greedy("It", 8)).await.unwrap_err();
    assert!(asked.elapsed() < Duration::from_secs(2), "refused after {:?}", asked.elapsed());
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("queue") && e.message().contains("full"), "{}", e.message());
    // The one that waited runs once the first is gone.
    drop(running);
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        let mut ids = Vec::new();
        while let Some(m) = waiting.message().await.unwrap() {
            ids.extend(m.token_ids);
        }
        ids
    })
    .await
    .expect("the waiting request did not run after the first was cancelled");
    assert_eq!(got.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_cancelled_and_holds_up_no_one() {
    let cluster = Cluster::new(reference_model()).workers(2).arg("--max-buffered-tokens").arg("8").start();
    let addrs = cluster.stage_addresses().await;
    // A client whose HTTP/2 window is 1 KiB: unread, its stream stalls after a few dozen tokens.
    let channel = tonic::transport::Endpoint::from_shared(cluster.url.clone())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut slow_client = pb::inference_client::InferenceClient::new(channel);
    let mut slow = slow_client.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    // Meanwhile another request is served at once, with its own tokens.
    let mut c = cluster.client().await;
    let case = &reference_cases()[2];
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
        assert!(started.elapsed() < Duration::from_secs(10), "a request took {:?} beside an unread stream", started.elapsed());
    }
    // The slow client's sequence was cancelled and freed on every stage while it read nothing.
    wait_no_sequences(&addrs).await;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        let mut tokens = 0;
        loop {
            match slow.message().await {
                Ok(Some(m)) => tokens += m.token_ids.len(),
                Ok(None) => panic!("the unread stream finished normally after {tokens} tokens"),
                Err(e) => return (e, tokens),
            }
        }
    });
    let (e, tokens) = end.await.expect("the unread stream did not end");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("did not read its stream"), "{}", e.message());
    assert!(tokens < 1000, "{tokens}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_batch_moves_when_a_stage_dies() {
    let etcd = Etcd::start();
    let cluster = migrating_cluster(&etcd, &unique_cluster("batch-migrate"));
    let c = cluster.client().await;
    let prompts = ["a", "The", "Once upon", "It was"];
    let mut want = Vec::new();
    for p in prompts {
        want.push(generate(&mut c.clone(), greedy(p, 600)).await.unwrap().token_ids);
    }
    let (victim, pid) = cluster.stage_worker(1).await;
    let mut streams = Vec::new();
    for p in prompts {
        let mut s = c.clone().generate_stream(greedy(p, 600)).await.unwrap().into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
        streams.push((s, first.token_ids));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    for ((mut s, mut got), w) in streams.into_iter().zip(want) {
        let read = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(m) = s.message().await? {
                got.extend(m.token_ids);
            }
            Ok::<_, tonic::Status>(())
        });
        read.await.expect("a migrated stream did not finish within 60 s").unwrap_or_else(|e| panic!("a stream of the batch failed: {e:?}"));
        assert_eq!(got, w, "a migrated request must give the undisturbed tokens");
    }
    let stages = placement(&cluster).await;
    assert!(!stages.iter().any(|s| s.worker_id == victim), "{stages:?}");
    wait_no_sequences(&cluster.stage_addresses().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_requests_made() {
    let cluster = Cluster::new(reference_model()).workers(2).arg("--metrics-listen").arg("127.0.0.1:0").start();
    let model = reference_model().to_str().unwrap().to_string();
    let mut c = cluster.client().await;
    let cases = reference_cases();
    let mut generated = 0;
    let mut prompt = 0;
    for case in &cases[..3] {
        let r = generate(&mut c, greedy(&case.prompt, 16)).await.unwrap();
        generated += r.token_ids.len();
        prompt += r.prompt_token_ids.len();
    }
    for _ in 0..2 {
        assert_eq!(generate(&mut c, greedy("", 4)).await.unwrap_err().code(), Code::InvalidArgument);
    }
    let mut unknown = greedy("a", 4);
    unknown.model = "no-such-model".into();
    assert_eq!(generate(&mut c, unknown).await.unwrap_err().code(), Code::NotFound);
    let m = scrape(&cluster).await;
    let requests = |outcome: &str, model: &str| metric(&m, "shardserve_requests_total", &[("outcome", outcome), ("model", model)]);
    assert_eq!(requests("ok", &model), Some(3.0), "{m}");
    assert_eq!(requests("invalid_argument", &model), Some(2.0), "{m}");
    assert_eq!(requests("not_found", "no-such-model"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "shardserve_generated_tokens_total", &[("model", &model)]), Some(generated as f64));
    assert_eq!(metric(&m, "shardserve_prompt_tokens_total", &[("model", &model)]), Some(prompt as f64));
    assert_eq!(metric(&m, "shardserve_time_to_first_token_seconds_count", &[("model", &model)]), Some(3.0));
    assert_eq!(metric(&m, "shardserve_request_duration_seconds_count", &[("model", &model)]), Some(3.0));
    assert_eq!(metric(&m, "shardserve_running_sequences", &[("model", &model)]), Some(0.0));
    // Every worker serves its own: its stage's KV pool and step times.
    let workers = cluster.admin().await.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert!(!w.metrics_address.is_empty(), "worker {} serves no metrics", w.id);
        let stage = w.stage.expect("a serving worker has a stage").to_string();
        let at = w.metrics_address.clone();
        let (code, text) = tokio::task::spawn_blocking(move || http_get(&at, "/metrics")).await.unwrap();
        assert_eq!(code, 200);
        assert!(metric(&text, "shardserve_kv_blocks_total", &[("stage", &stage)]).is_some_and(|b| b > 0.0), "{text}");
        assert_eq!(metric(&text, "shardserve_kv_blocks_used", &[("stage", &stage)]), Some(0.0), "{text}");
        assert!(metric(&text, "shardserve_step_duration_seconds_count", &[("stage", &stage)]).is_some_and(|n| n > 0.0), "{text}");
    }
}
