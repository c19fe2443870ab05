//! Pipeline parallelism through real processes: a model split over 2, 3 and 4 workers gives the
//! tokens of one worker and of transformers; requests interleave; a stage that dies fails its
//! requests with UNAVAILABLE everywhere and the cluster serves again once a worker is back;
//! cancellation and errors leave no KV cache on any stage.

use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_tokens_through_two_three_and_four_stages() {
    let cases = reference_cases();
    let one = Cluster::new(reference_model()).start();
    let mut c = one.client().await;
    let mut seeded_one = Vec::new();
    for case in &cases[..3] {
        seeded_one.push(generate(&mut c, sampled(&case.prompt, 42)).await.unwrap().token_ids);
    }
    drop(one);
    for stages in [2, 3, 4] {
        // The 4-stage run also prefills in chunks of 3 tokens.
        let mut b = Cluster::new(reference_model()).workers(stages);
        if stages == 4 {
            b = b.arg("--prefill-chunk").arg("3");
        }
        let cluster = b.start();
        let p = placement(&cluster).await;
        assert_eq!(p.len(), stages, "auto did not spread over all {stages} workers: {p:?}");
        let mut c = cluster.client().await;
        for case in &cases {
            let r = generate(&mut c, greedy(&case.prompt, 32)).await.unwrap();
            assert_eq!(r.token_ids, case.new_ids, "{stages} stages, prompt {:?}", case.prompt);
        }
        for (case, want) in cases[..3].iter().zip(&seeded_one) {
            let r = generate(&mut c, sampled(&case.prompt, 42)).await.unwrap();
            assert_eq!(&r.token_ids, want, "seeded sampling differs with {stages} stages");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_bf16_llama_over_two_three_and_four_stages_reads_only_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_shardctl(
        &[
            "dev",
            "tiny-model",
            "--arch",
            "llama",
            "--out",
            dir.path().to_str().unwrap(),
            "--shards",
            "2",
            "--layers",
            "6",
            "--dtype",
            "bf16",
            "--seed",
            "11",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let prompts = ["The quick brown fox", "Once upon a time, in a data center", "0 1 2 3"];
    let one = Cluster::new(dir.path()).start();
    let mut c = one.client().await;
    let mut want = Vec::new();
    for p in prompts {
        want.push((generate(&mut c, greedy(p, 24)).await.unwrap().token_ids, generate(&mut c, sampled(p, 7)).await.unwrap().token_ids));
    }
    drop(one);
    // Four stages through an explicit map (accelerate's auto may use fewer workers for six
    // layers), two through auto.
    let map = dir.path().join("map4.json");
    std::fs::write(
        &map,
        r#"{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1, "model.layers.4": 2, "model.layers.5": 3, "model.norm": 3, "lm_head": 3}"#,
    )
    .unwrap();
    for n in [2, 4] {
        let mut b = Cluster::new(dir.path()).workers(n);
        if n == 4 {
            b = b.arg("--device-map").arg(map.to_str().unwrap());
        }
        let cluster = b.start();
        let mut c = cluster.client().await;
        assert_eq!(placement(&cluster).await.len(), n);
        for (p, (g, s)) in prompts.iter().zip(&want) {
            assert_eq!(&generate(&mut c, greedy(p, 24)).await.unwrap().token_ids, g, "greedy, {p:?}, {n} stages");
            assert_eq!(&generate(&mut c, sampled(p, 7)).await.unwrap().token_ids, s, "seeded, {p:?}, {n} stages");
        }
    }
    let cluster = Cluster::new(dir.path()).workers(3).start();
    let mut c = cluster.client().await;
    for (p, (g, s)) in prompts.iter().zip(&want) {
        assert_eq!(&generate(&mut c, greedy(p, 24)).await.unwrap().token_ids, g, "greedy, {p:?}");
        assert_eq!(&generate(&mut c, sampled(p, 7)).await.unwrap().token_ids, s, "seeded, {p:?}");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let stages = placement(&cluster).await;
    assert_eq!(stages.len(), 3);
    let mut files_per_stage = Vec::new();
    for st in &stages {
        let stats = Cluster::worker_stats(&st.address).await;
        assert_eq!((stats.layer_start, stats.layer_end), (st.layer_start, st.layer_end));
        for t in &stats.tensors {
            let own = match t.strip_prefix("model.layers.") {
                Some(rest) => {
                    let l: u32 = rest.split('.').next().unwrap().parse().unwrap();
                    (st.layer_start..st.layer_end).contains(&l)
                }
                None => {
                    (t.starts_with("model.embed_tokens.") && st.embeddings)
                        || ((t.starts_with("model.norm.") || t.starts_with("lm_head.")) && st.lm_head)
                }
            };
            assert!(own, "stage {} read {t}", st.stage);
        }
        let expected: std::collections::BTreeSet<String> =
            stats.tensors.iter().map(|t| weight_map[t].as_str().unwrap().to_string()).collect();
        let opened: std::collections::BTreeSet<String> = stats.files.iter().cloned().collect();
        assert_eq!(opened, expected, "stage {} opened files holding none of its tensors", st.stage);
        files_per_stage.push(opened);
    }
    assert_ne!(files_per_stage[0], files_per_stage[2], "first and last stage read the same files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_interleave_through_three_stages() {
    let cluster = Cluster::new(reference_model()).workers(3).start();
    let cases = reference_cases();
    let mut tasks = Vec::new();
    for case in cases.clone() {
        let mut c = cluster.client().await;
        tasks.push(tokio::spawn(async move { (case.new_ids.clone(), generate(&mut c, greedy(&case.prompt, 32)).await) }));
    }
    for t in tasks {
        let (want, got) = tokio::time::timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
        assert_eq!(got.unwrap().token_ids, want);
    }
    let addrs: Vec<String> = placement(&cluster).await.iter().map(|s| s.address.clone()).collect();
    wait_no_sequences(&addrs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_stream_frees_kv_on_every_stage() {
    let cluster = Cluster::new(reference_model()).workers(3).start();
    let addrs: Vec<String> = placement(&cluster).await.iter().map(|s| s.address.clone()).collect();
    let mut c = cluster.client().await;
    let mut s = c.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    assert!(tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().is_some());
    let mut holding = 0;
    for a in &addrs {
        holding += Cluster::worker_stats(a).await.sequences;
    }
    assert!(holding > 0, "no stage held the sequence while it ran");
    drop(s);
    wait_no_sequences(&addrs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_middle_stage_fails_requests_and_a_new_worker_restores_service() {
    let cluster = Cluster::new(reference_model()).workers(3).arg("--lease-ttl-s").arg("2").start();
    let stages = placement(&cluster).await;
    let (victim, pid) = cluster.stage_worker(1).await;
    let survivors: Vec<String> = stages.iter().filter(|s| s.worker_id != victim).map(|s| s.address.clone()).collect();
    let mut c = cluster.client().await;
    let mut s = c.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    let (err, took) = kill_during_stream(&mut s, pid).await;
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains(&victim), "{:?} does not name {victim}", err.message());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    wait_no_sequences(&survivors).await;
    // A new request waits for the re-plan over the two survivors instead of failing.
    let case = &reference_cases()[1];
    let started = Instant::now();
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());

    // A replacement joins; once the dead worker's lease is gone the model is re-planned.
    let _spare = Proc(
        std::process::Command::new(bin("worker"))
            .args(["--coordinator", &cluster.url, "--listen", "127.0.0.1:0", "--id", "replacement"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let case = &reference_cases()[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match generate(&mut c, greedy(&case.prompt, 32)).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(matches!(e.code(), Code::Unavailable | Code::FailedPrecondition), "unexpected status while recovering: {e:?}");
                assert!(Instant::now() < deadline, "no recovery within 30 s: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(r.token_ids, case.new_ids);
    // The fleet grew again: the model spreads over the replacement too.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = placement(&cluster).await;
        if p.iter().any(|s| s.worker_id == "replacement") {
            assert!(!p.iter().any(|s| s.worker_id == victim), "{p:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the replacement was not planned on: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_inputs_are_checked_before_anything_loads() {
    let m = reference_model();
    let up = |extra: &[&str]| {
        let mut args = vec!["up", "--model", m.to_str().unwrap(), "--listen", "127.0.0.1:0", "--workers", "2", "--ready-timeout-s", "60"];
        args.extend_from_slice(extra);
        run_shardctl(&args, &[("RUST_LOG", "error")], Duration::from_secs(90))
    };
    let out = up(&["--max-memory", "0=1KiB,1=1KiB"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("does not fit") && out.stderr.contains("missing"), "{}", out.stderr);
    let out = up(&["--max-memory", "cpu=1GiB"]);
    assert!(!out.status.success() && out.stderr.contains("cpu"), "{}", out.stderr);

    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    std::fs::write(&map, r#"{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "nobody", "model.layers.3": 1, "model.layers.4": 1, "model.layers.5": 1}"#).unwrap();
    let out = up(&["--device-map", map.to_str().unwrap()]);
    assert!(!out.status.success() && out.stderr.contains("nobody"), "{}", out.stderr);
    std::fs::write(&map, r#"{"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1}"#).unwrap();
    let out = up(&["--device-map", map.to_str().unwrap()]);
    assert!(!out.status.success() && out.stderr.contains("model.layers.4"), "{}", out.stderr);

    // A valid explicit map is followed exactly.
    std::fs::write(&map, r#"{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 0, "model.layers.3": 0, "model.layers.4": 0, "model.layers.5": 1, "model.norm": 1, "lm_head": 1}"#).unwrap();
    let cluster = Cluster::new(&m).workers(2).arg("--device-map").arg(map.to_str().unwrap()).start();
    let p = placement(&cluster).await;
    assert_eq!(p.iter().map(|s| (s.layer_start, s.layer_end)).collect::<Vec<_>>(), vec![(0, 5), (5, 6)]);
    let mut c = cluster.client().await;
    let case = &reference_cases()[3];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_worker_that_cannot_load_is_left_out_and_the_model_keeps_serving() {
    // The model is named by a relative path, which a worker started elsewhere cannot resolve:
    // a joiner that has not got the model.
    let here = std::env::current_dir().unwrap();
    let model = reference_model().canonicalize().unwrap();
    let relative = format!("{}{}", "../".repeat(here.components().count() - 1), model.strip_prefix("/").unwrap().display());
    let cluster = Cluster::new(&relative).workers(2).start();
    let mut c = cluster.client().await;
    let cases = reference_cases();
    assert_eq!(generate(&mut c, greedy(&cases[0].prompt, 32)).await.unwrap().token_ids, cases[0].new_ids);
    let elsewhere = tempfile::tempdir().unwrap();
    let deep = elsewhere.path().join("a/b/c/d/e/f/g/h/i/j/k/l");
    std::fs::create_dir_all(&deep).unwrap();
    let _joiner = Proc(
        std::process::Command::new(bin("worker"))
            .args(["--coordinator", &cluster.url, "--listen", "127.0.0.1:0", "--id", "joiner"])
            .current_dir(&deep)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The coordinator tries the larger fleet, the joiner fails, and the model goes back to the
    // two that work — serving the right tokens throughout, never UNAVAILABLE for good.
    let deadline = Instant::now() + Duration::from_secs(20);
    // Whatever else it says, the coordinator names the joiner when its load fails.
    while !cluster.stderr().contains("joiner") {
        assert!(Instant::now() < deadline, "the joiner was never tried: {}", cluster.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for case in &cases[1..4] {
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    }
    let p = placement(&cluster).await;
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p.iter().all(|s| s.worker_id != "joiner"), "{p:?}");
}
