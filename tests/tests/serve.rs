//! End to end through real processes: `shardctl up` starts a coordinator and workers, clients
//! talk gRPC, and what a user would notice is asserted — tokens equal to transformers', status
//! codes and messages, nothing left running.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// Collects a stream into (text, token_ids, prompt_token_ids, finish_reason, completion_tokens).
async fn stream_all(
    c: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> Result<(String, Vec<u32>, Vec<u32>, String, u32), tonic::Status> {
    let fut = async {
        let mut s = c.generate_stream(req).await?.into_inner();
        let (mut text, mut ids, mut prompt, mut finish, mut completion) = (String::new(), Vec::new(), Vec::new(), String::new(), 0);
        while let Some(m) = s.message().await? {
            text.push_str(&m.text);
            ids.extend(m.token_ids);
            if !m.prompt_token_ids.is_empty() {
                prompt = m.prompt_token_ids;
            }
            if !m.finish_reason.is_empty() {
                finish = m.finish_reason;
            }
            if let Some(u) = m.usage {
                completion = u.completion_tokens;
            }
        }
        Ok((text, ids, prompt, finish, completion))
    };
    tokio::time::timeout(Duration::from_secs(60), fut).await.expect("stream did not finish within 60 s")
}

fn worker_pids(cluster: &Cluster) -> Vec<u32> {
    cluster.workers_json()["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap() as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_equal_transformers_through_up() {
    let cluster = Cluster::new(reference_model()).start();
    let mut c = cluster.client().await;
    for case in reference_cases() {
        let t = c.tokenize(pb::TokenizeRequest { text: case.prompt.clone(), ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(t.token_ids, case.input_ids, "tokenization of {:?}", case.prompt);
        let r = generate(&mut c, greedy(&case.prompt, 32)).await.unwrap();
        assert_eq!(r.prompt_token_ids, case.input_ids);
        assert_eq!(r.token_ids, case.new_ids, "greedy tokens for {:?}", case.prompt);
        assert_eq!(r.text, case.text, "text for {:?}", case.prompt);
        assert_eq!(r.finish_reason, "length");
        let usage = r.usage.unwrap();
        assert_eq!((usage.prompt_tokens as usize, usage.completion_tokens), (case.input_ids.len(), 32));
    }
    // The same through the CLI a user runs.
    let case = &reference_cases()[1];
    let out = run_shardctl(
        &["generate", "--coordinator", &cluster.url, "--prompt", &case.prompt, "--max-new-tokens", "32", "--json"],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(serde_json::from_value::<Vec<u32>>(v["token_ids"].clone()).unwrap(), case.new_ids);
    assert_eq!(serde_json::from_value::<Vec<u32>>(v["prompt_token_ids"].clone()).unwrap(), case.input_ids);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 32);
    // Models, health.
    let models = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1);
    assert_eq!((models[0].state.as_str(), models[0].architecture.as_str()), ("ready", "Qwen3ForCausalLM"));
    let channel = tonic::transport::Endpoint::from_shared(cluster.url.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "shardserve.v1.Inference", "shardserve.v1.Admin"] {
        let h = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }
    // Reflection answers in v1 and in v1alpha (what grpcio-reflection and older grpcurl ask).
    {
        use tonic_reflection::pb::v1alpha as alpha;
        let ask = alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut r = alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let answer = r.server_reflection_info(tokio_stream::iter(vec![ask])).await.unwrap().into_inner().message().await.unwrap().unwrap();
        let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("v1alpha reflection: {answer:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == "shardserve.v1.Inference") && names.iter().any(|n| n == "shardserve.v1.Admin"), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1;
        let ask = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut r = v1::server_reflection_client::ServerReflectionClient::new(channel);
        let answer = r.server_reflection_info(tokio_stream::iter(vec![ask])).await.unwrap().into_inner().message().await.unwrap().unwrap();
        assert!(
            matches!(&answer.message_response, Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) if l.service.iter().any(|s| s.name == "shardserve.v1.Inference")),
            "v1 reflection: {answer:?}"
        );
    }
    // Stopping leaves nothing running.
    let pids = worker_pids(&cluster);
    assert_eq!(pids.len(), 1);
    let status = cluster.stop();
    assert!(status.success(), "shardctl up exited with {status} on SIGTERM");
    wait_until("workers to exit", Duration::from_secs(10), || pids.iter().all(|p| !alive(*p)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_id_from_an_offline_cache_with_symlinked_blobs() {
    let cache = tempfile::tempdir().unwrap();
    let sha = "4d1c8f6e2b7a9c0d3e5f1a2b3c4d5e6f7a8b9c0d";
    let snap = shardserve::hub::install_into_cache(&reference_model(), cache.path(), "shardserve-test/tiny-qwen3", "main", sha).unwrap();
    assert!(std::fs::symlink_metadata(snap.join("model.safetensors")).unwrap().file_type().is_symlink());
    let cluster =
        Cluster::new("shardserve-test/tiny-qwen3").workers(2).env("HF_HUB_CACHE", cache.path()).env("HF_HUB_OFFLINE", "1").start();
    let mut c = cluster.client().await;
    for case in reference_cases() {
        let r = generate(&mut c, greedy(&case.prompt, 32)).await.unwrap();
        assert_eq!(r.prompt_token_ids, case.input_ids);
        assert_eq!(r.token_ids, case.new_ids, "greedy tokens for {:?} via the Hub cache", case.prompt);
    }
    drop(cluster);
    // A model the cache lacks, offline: a one-line error naming it, a non-zero exit.
    let cache_dir = cache.path().to_str().unwrap();
    let out = run_shardctl(
        &["up", "--model", "shardserve-test/not-there", "--listen", "127.0.0.1:0"],
        &[("HF_HUB_CACHE", cache_dir), ("HF_HUB_OFFLINE", "1")],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("shardserve-test/not-there") && out.stderr.contains("HF_HUB_OFFLINE"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sampling_stop_and_penalty_across_two_stages() {
    let cluster = Cluster::new(reference_model()).workers(2).start();
    let mut c = cluster.client().await;
    let cases = reference_cases();
    // Streaming gives the same tokens and text as transformers.
    for case in &cases[..3] {
        let (text, ids, prompt, finish, completion) = stream_all(&mut c, greedy(&case.prompt, 32)).await.unwrap();
        assert_eq!(ids, case.new_ids);
        assert_eq!(text, case.text);
        assert_eq!(prompt, case.input_ids);
        assert_eq!((finish.as_str(), completion), ("length", 32));
    }
    // Seeded sampling: same seed, same tokens, unary or streamed; another seed, other tokens.
    let sampled = |seed: u64| pb::GenerateRequest {
        prompt: cases[1].prompt.clone(),
        max_new_tokens: Some(24),
        sampling: Some(pb::SamplingParams {
            temperature: Some(1.5),
            top_k: Some(100),
            top_p: Some(0.98),
            seed: Some(seed),
            ..Default::default()
        }),
        ..Default::default()
    };
    let a = generate(&mut c, sampled(1234)).await.unwrap().token_ids;
    let b = generate(&mut c, sampled(1234)).await.unwrap().token_ids;
    let (_, s, _, _, _) = stream_all(&mut c, sampled(1234)).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a, s);
    let other = generate(&mut c, sampled(99)).await.unwrap().token_ids;
    assert_ne!(a, other, "a different seed gave the same 24 sampled tokens");
    assert_ne!(a, cases[1].new_ids[..24].to_vec(), "sampling at temperature 1.5 gave the greedy tokens");
    // Stop sequences: the text ends before the stop string, which is not sent.
    let case = &cases[0]; // "??????____…": 6 × '?' then '_'
    let mut req = greedy(&case.prompt, 32);
    req.stop = vec!["_".into()];
    let r = generate(&mut c, req.clone()).await.unwrap();
    assert_eq!((r.text.as_str(), r.finish_reason.as_str()), ("??????", "stop"));
    assert_eq!(r.token_ids, case.new_ids[..7].to_vec());
    let (text, ids, _, finish, _) = stream_all(&mut c, req).await.unwrap();
    assert_eq!((text.as_str(), finish.as_str(), ids.len()), ("??????", "stop", 7));
    // A stop string spanning tokens is held back until it is known.
    let mut req = greedy(&case.prompt, 32);
    req.stop = vec!["?_".into()];
    let (text, _, _, finish, _) = stream_all(&mut c, req).await.unwrap();
    assert_eq!((text.as_str(), finish.as_str()), ("?????", "stop"));
    // Repetition penalty changes a repetitive greedy output.
    let mut req = greedy(&case.prompt, 32);
    req.sampling.as_mut().unwrap().repetition_penalty = Some(3.0);
    let r = generate(&mut c, req).await.unwrap();
    assert_ne!(r.token_ids, case.new_ids);
    assert!(r.token_ids.iter().filter(|&&t| t == 65).count() < 10, "{:?}", r.token_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eos_ends_generation() {
    // Make the token greedy decoding reaches at step 7 the end-of-sequence token.
    let dir = tempfile::tempdir().unwrap();
    copy_model(&reference_model(), dir.path());
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [500, 65], "do_sample": false}"#).unwrap();
    let cluster = Cluster::new(dir.path()).start();
    let mut c = cluster.client().await;
    let case = &reference_cases()[0];
    let r = generate(&mut c, greedy(&case.prompt, 32)).await.unwrap();
    assert_eq!(r.finish_reason, "eos");
    assert_eq!(r.token_ids, case.new_ids[..7].to_vec(), "generation goes on past eos");
    assert_eq!(r.text, "??????");
    let (text, ids, _, finish, completion) = stream_all(&mut c, greedy(&case.prompt, 32)).await.unwrap();
    assert_eq!((text.as_str(), finish.as_str(), ids.len(), completion), ("??????", "eos", 7, 7));
}

fn expect_status(r: Result<pb::GenerateResponse, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} naming {needle:?}, got a response: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(needle), "message {:?} does not name {needle:?}", s.message());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_gets_its_status() {
    let cluster = Cluster::new(reference_model()).arg("--max-concurrent-requests").arg("1").start();
    let mut c = cluster.client().await;
    let base = || greedy("Hello", 8);
    let with = |f: &dyn Fn(&mut pb::GenerateRequest)| {
        let mut r = base();
        f(&mut r);
        r
    };
    let s = |f: &dyn Fn(&mut pb::SamplingParams)| with(&|r| f(r.sampling.as_mut().unwrap()));
    let cases: Vec<(pb::GenerateRequest, Code, &str)> = vec![
        (with(&|r| r.prompt.clear()), Code::InvalidArgument, "prompt"),
        (with(&|r| r.max_new_tokens = Some(0)), Code::InvalidArgument, "max_new_tokens"),
        (with(&|r| r.max_new_tokens = Some(-3)), Code::InvalidArgument, "max_new_tokens"),
        (with(&|r| r.max_new_tokens = Some(1024)), Code::InvalidArgument, "max_new_tokens"),
        (with(&|r| r.prompt = "word ".repeat(1100)), Code::InvalidArgument, "prompt"),
        (s(&|p| p.temperature = Some(-0.5)), Code::InvalidArgument, "temperature"),
        (s(&|p| p.temperature = Some(f32::NAN)), Code::InvalidArgument, "temperature"),
        (s(&|p| p.temperature = Some(f32::INFINITY)), Code::InvalidArgument, "temperature"),
        (s(&|p| p.top_p = Some(0.0)), Code::InvalidArgument, "top_p"),
        (s(&|p| p.top_p = Some(1.01)), Code::InvalidArgument, "top_p"),
        (s(&|p| p.top_k = Some(-1)), Code::InvalidArgument, "top_k"),
        (s(&|p| p.repetition_penalty = Some(0.0)), Code::InvalidArgument, "repetition_penalty"),
        (s(&|p| p.repetition_penalty = Some(f32::NAN)), Code::InvalidArgument, "repetition_penalty"),
        (with(&|r| r.stop = (0..9).map(|i| format!("s{i}")).collect()), Code::InvalidArgument, "stop"),
        (with(&|r| r.stop = vec!["ok".into(), String::new()]), Code::InvalidArgument, "stop[1]"),
        (with(&|r| r.stop = vec!["x".repeat(600)]), Code::InvalidArgument, "stop[0] is longer than 512 bytes"),
        (with(&|r| r.model = "no/such-model".into()), Code::NotFound, "no/such-model"),
    ];
    for (req, code, needle) in cases {
        expect_status(generate(&mut c, req.clone()).await, code, needle);
        // The stream gives the same status before any message.
        let s = stream_all(&mut c, req).await.map(|_| pb::GenerateResponse::default());
        expect_status(s, code, needle);
    }
    // The edge of the context is allowed: prompt + max_new_tokens == 1024 exactly.
    let n =
        c.tokenize(pb::TokenizeRequest { text: "Hello".into(), ..Default::default() }).await.unwrap().into_inner().token_ids.len() as i32;
    expect_status(
        generate(&mut c, with(&|r| r.max_new_tokens = Some(1024 - n + 1))).await,
        Code::InvalidArgument,
        "exceeds the model's context of 1024",
    );
    let r = generate(&mut c, with(&|r| r.max_new_tokens = Some(1024 - n))).await.unwrap();
    assert_eq!((r.token_ids.len() as i32, r.finish_reason.as_str()), (1024 - n, "length"));

    // One request in flight is the limit here: a second gets RESOURCE_EXHAUSTED, and once the
    // first is cancelled (stream dropped) its slot and its KV cache are freed.
    let mut long = c.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), long.message()).await.unwrap().unwrap();
    assert!(first.is_some());
    let mut c2 = cluster.client().await;
    expect_status(generate(&mut c2, base()).await, Code::ResourceExhausted, "max_concurrent_requests");
    drop(long);
    let stage = cluster_status(&cluster.url).await.models[0].stages[0].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = generate(&mut c2, base()).await;
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled request still holds its slot: {:?}", r.unwrap_err());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = Cluster::worker_stats(&stage.address).await;
        if st.sequences == 0 && st.kv_bytes == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "KV caches left after cancel: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_workers_is_still_loading() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin("coordinator"))
        .args(["--model", reference_model().to_str().unwrap(), "--listen", "127.0.0.1:0", "--workers", "1"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let lone = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("coordinator did not start");
    let mut c = pb::inference_client::InferenceClient::connect(format!("http://{addr}")).await.unwrap();
    expect_status(generate(&mut c, greedy("Hello", 4)).await, Code::FailedPrecondition, "waiting for workers");
    let m = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(m[0].state, "loading");
    drop(lone);
}

async fn kill_stage_mid_stream(workers: usize, stage: u32) {
    // Without a re-plan wait, new requests are refused at once while the stage is gone.
    let cluster = Cluster::new(reference_model()).workers(workers).arg("--replan-wait-s").arg("0").start();
    let mut c = cluster.client().await;
    let (victim, pid) = cluster.stage_worker(stage).await;
    let placement = cluster_status(&cluster.url).await.models[0].stages.clone();
    let survivors: Vec<String> = placement.iter().filter(|s| s.worker_id != victim).map(|s| s.address.clone()).collect();
    let mut s = c.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    let (err, took) = kill_during_stream(&mut s, pid).await;
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains(&victim), "message {:?} does not name worker {victim}", err.message());
    assert!(took < Duration::from_secs(3), "the failure took {took:?} to reach the client");
    // A new request does not wait: refused while no placement exists, or served with the right
    // tokens once the model is placed over the survivors (the dead worker fails its load and is
    // left out at once, which on a tiny model can be done before this request arrives).
    let case = &reference_cases()[0];
    let started = Instant::now();
    match generate(&mut c, greedy(&case.prompt, 32)).await {
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{}", e.message()),
        Ok(r) => assert_eq!(r.token_ids, case.new_ids),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Unavailable, or already placed again over the survivors (a dead worker that fails to
    // load is left out at once) — never on the dead worker.
    let status = cluster_status(&cluster.url).await;
    match status.models[0].model.as_ref().unwrap().state.as_str() {
        "unavailable" => {}
        "ready" => assert!(status.models[0].stages.iter().all(|s| s.worker_id != victim), "{status:?}"),
        other => panic!("state {other}: {status:?}"),
    }
    // The surviving stages hold no KV for the failed request.
    for addr in survivors {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = Cluster::worker_stats(&addr).await;
            if st.sequences == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "stage at {addr} still holds {} sequences", st.sequences);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_last_stage_fails_the_stream_with_unavailable() {
    kill_stage_mid_stream(2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_only_worker_fails_the_stream_with_unavailable() {
    kill_stage_mid_stream(1, 0).await;
}

fn up_fails(model: &std::path::Path, needles: &[&str]) {
    let out = run_shardctl(
        &["up", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--ready-timeout-s", "60"],
        &[("RUST_LOG", "error")],
        Duration::from_secs(90),
    );
    assert!(!out.status.success(), "shardctl up succeeded on a broken model");
    for n in needles {
        assert!(out.stderr.contains(n), "stderr does not name {n:?}:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_models_fail_up_with_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    up_fails(empty.path(), &["no config.json"]);

    let arch = tempfile::tempdir().unwrap();
    copy_model(&reference_model(), arch.path());
    let cfg = std::fs::read_to_string(arch.path().join("config.json")).unwrap();
    std::fs::write(arch.path().join("config.json"), cfg.replace("Qwen3ForCausalLM", "GPT2LMHeadModel")).unwrap();
    up_fails(arch.path(), &["GPT2LMHeadModel", "is not supported", "LlamaForCausalLM"]);

    let truncated = tempfile::tempdir().unwrap();
    copy_model(&reference_model(), truncated.path());
    let st = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1000]).unwrap();
    up_fails(truncated.path(), &["model.safetensors", "truncated"]);

    let shape = tempfile::tempdir().unwrap();
    copy_model(&reference_model(), shape.path());
    std::fs::write(shape.path().join("config.json"), cfg.replace("\"intermediate_size\": 192", "\"intermediate_size\": 200")).unwrap();
    up_fails(shape.path(), &["shape mismatch", "mlp"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_arrive_as_they_are_generated() {
    // A small model steps in a millisecond or two; each token must reach the client then, not
    // in a burst at the end (as Nagle's algorithm on the server's sockets would have it).
    let cluster = Cluster::new(reference_model()).workers(2).start();
    let mut c = cluster.client().await;
    let case = &reference_cases()[0];
    let mut s = c.generate_stream(greedy(&case.prompt, 32)).await.unwrap().into_inner();
    let mut arrivals = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), s.message()).await.expect("stream stalled").unwrap() {
        arrivals.push((Instant::now(), m.token_ids.len()));
    }
    assert!(arrivals.len() >= 16, "only {} messages", arrivals.len());
    assert!(arrivals.iter().all(|(_, n)| *n == 1), "tokens were batched into messages");
    // Held back, every message after the first arrives in one burst at the end (gaps of a few
    // microseconds); sent as generated, most gaps are a step long. A loaded machine may bunch
    // a few, hence the margin.
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let spaced = gaps.iter().filter(|g| **g > Duration::from_micros(200)).count();
    assert!(spaced * 4 >= gaps.len(), "tokens arrived in bursts: only {spaced} of {} gaps over 200 µs: {gaps:?}", gaps.len());
}
