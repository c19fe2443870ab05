//! Tensor parallelism through real processes: stages that are groups of ranks (all-reducing
//! over the CPU collective) give the tokens of one worker and of transformers, alone and
//! combined with pipeline stages; every rank reads only its slices and frees its KV caches; a
//! rank killed mid-request fails the request with UNAVAILABLE at once.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// Every worker of the placement, stage by stage and rank by rank: (id, address, pid).
fn ranks(cluster: &Cluster, stages: &[pb::StageInfo]) -> Vec<Vec<(String, String, u32)>> {
    let workers = cluster.workers_json();
    let find = |id: &str| {
        let w = workers["workers"].as_array().unwrap().iter().find(|w| w["id"] == id).unwrap_or_else(|| panic!("{id} not in {workers}"));
        (id.to_string(), w["address"].as_str().unwrap().to_string(), w["pid"].as_u64().unwrap() as u32)
    };
    stages.iter().map(|s| std::iter::once(&s.worker_id).chain(&s.ranks).map(|id| find(id)).collect()).collect()
}

/// Checks the placement is `stages` groups of `tp` ranks whose shards say so, no final norm
/// or lm_head off rank 0, and (one stage) every rank holding less than `whole` bytes, what one
/// worker holds for the whole model.
async fn check_groups(cluster: &Cluster, stages: usize, tp: usize, whole: u64) -> Vec<String> {
    let p = placement(cluster).await;
    assert_eq!(p.len(), stages, "{p:?}");
    let mut addresses = Vec::new();
    for (st, group) in p.iter().zip(ranks(cluster, &p)) {
        assert_eq!(group.len(), tp, "stage {} is not a group of {tp}: {st:?}", st.stage);
        for (rank, (id, addr, _)) in group.iter().enumerate() {
            let stats = Cluster::worker_stats(addr).await;
            assert_eq!((stats.tp_rank, stats.tp_size), (rank as u32, tp as u32), "{id}");
            assert_eq!((stats.layer_start, stats.layer_end), (st.layer_start, st.layer_end), "{id}");
            if rank > 0 {
                assert!(
                    !stats.tensors.iter().any(|t| t.starts_with("lm_head") || t.starts_with("model.norm")),
                    "rank {rank} of stage {} read the head: {:?}",
                    st.stage,
                    stats.tensors
                );
            }
            if stages == 1 {
                assert!(stats.weight_bytes < whole, "rank {rank} holds {} of the model's {whole}", stats.weight_bytes);
            }
            addresses.push(addr.clone());
        }
    }
    addresses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp2_and_tp2_by_pp2_give_the_transformers_tokens() {
    let cases = reference_cases();
    let one = Cluster::new(reference_model()).start();
    let whole = placement(&one).await[0].bytes;
    let mut c = one.client().await;
    let mut seeded_one = Vec::new();
    for case in &cases[..3] {
        seeded_one.push(generate(&mut c, sampled(&case.prompt, 9)).await.unwrap().token_ids);
    }
    drop(one);
    for (workers, tp) in [(2, 2), (4, 2)] {
        let cluster = Cluster::new(reference_model()).workers(workers).arg("--tp").arg(&tp.to_string()).start();
        let addresses = check_groups(&cluster, workers / tp, tp, whole).await;
        let mut c = cluster.client().await;
        for case in &cases {
            let r = generate(&mut c, greedy(&case.prompt, 32)).await.unwrap();
            assert_eq!(r.token_ids, case.new_ids, "{workers} workers, tp {tp}, prompt {:?}", case.prompt);
        }
        for (case, want) in cases[..3].iter().zip(&seeded_one) {
            let r = generate(&mut c, sampled(&case.prompt, 9)).await.unwrap();
            assert_eq!(&r.token_ids, want, "seeded sampling differs with {workers} workers, tp {tp}");
        }
        // Concurrent requests interleave through the groups.
        let mut tasks = Vec::new();
        for case in cases.iter().take(4).cloned() {
            let mut c = cluster.client().await;
            tasks.push(tokio::spawn(async move { (case.new_ids.clone(), generate(&mut c, greedy(&case.prompt, 32)).await) }));
        }
        for t in tasks {
            let (want, got) = tokio::time::timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
            assert_eq!(got.unwrap().token_ids, want);
        }
        // Every rank, followers included, has freed every sequence.
        wait_no_sequences(&addresses).await;
        let out = run_shardctl(&["status", "--json", "--coordinator", &cluster.url], &[], Duration::from_secs(20));
        let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        for st in status["models"][0]["placement"].as_array().unwrap() {
            assert_eq!(st["group"].as_array().unwrap().len(), tp, "{st}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_with_tensor_and_pipeline_parallelism_equals_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_shardctl(
        &["dev", "tiny-model", "--arch", "llama", "--out", dir.path().to_str().unwrap(), "--shards", "2", "--layers", "4", "--seed", "21"],
        &[],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let prompts = ["The quick brown fox", "Once upon a time, in a data center", "0 1 2 3"];
    let one = Cluster::new(dir.path()).start();
    let whole = placement(&one).await[0].bytes;
    let mut c = one.client().await;
    let mut want = Vec::new();
    for p in prompts {
        want.push(generate(&mut c, greedy(p, 24)).await.unwrap().token_ids);
    }
    drop(one);
    for (workers, tp) in [(2, 2), (4, 2)] {
        let cluster = Cluster::new(dir.path()).workers(workers).arg("--tp").arg(&tp.to_string()).start();
        check_groups(&cluster, workers / tp, tp, whole).await;
        let mut c = cluster.client().await;
        for (p, w) in prompts.iter().zip(&want) {
            assert_eq!(&generate(&mut c, greedy(p, 24)).await.unwrap().token_ids, w, "{p:?}, {workers} workers, tp {tp}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rank_fails_the_request_with_unavailable_at_once() {
    let cluster = Cluster::new(reference_model()).workers(4).arg("--tp").arg("2").arg("--lease-ttl-s").arg("2").start();
    let p = placement(&cluster).await;
    let groups = ranks(&cluster, &p);
    // Rank 1 of the first stage: a follower, which the pipeline never talks to directly.
    let (victim, _, pid) = groups[0][1].clone();
    let mut c = cluster.client().await;
    let mut s = c.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    let (err, took) = kill_during_stream(&mut s, pid).await;
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains(&victim), "{:?} does not name {victim}", err.message());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // The survivors hold nothing, and nothing was left running by the dead rank.
    let survivors: Vec<String> = groups.iter().flatten().filter(|(id, _, _)| *id != victim).map(|(_, a, _)| a.clone()).collect();
    wait_no_sequences(&survivors).await;
    wait_until("the killed rank is gone", Duration::from_secs(5), || !alive(pid));
    // Three workers are left: one group of two is re-planned and serves the right tokens.
    let case = &reference_cases()[2];
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match generate(&mut c, greedy(&case.prompt, 32)).await {
            Ok(r) => break r,
            Err(e) => {
                assert!(matches!(e.code(), Code::Unavailable | Code::FailedPrecondition), "{e:?}");
                assert!(Instant::now() < deadline, "no recovery within 30 s: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(r.token_ids, case.new_ids);
    let p = placement(&cluster).await;
    assert!(p.iter().all(|s| s.ranks.len() == 1 && s.worker_id != victim && !s.ranks.contains(&victim)), "{p:?}");
}

#[test]
fn tp_sizes_are_checked_before_anything_loads() {
    let m = reference_model();
    let up = |extra: &[&str]| {
        let mut args = vec!["up", "--model", m.to_str().unwrap(), "--listen", "127.0.0.1:0", "--ready-timeout-s", "60"];
        args.extend_from_slice(extra);
        run_shardctl(&args, &[("RUST_LOG", "error")], Duration::from_secs(90))
    };
    // The fixture has 4 query heads.
    let out = up(&["--workers", "3", "--tp", "3"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("--tp 3 does not divide num_attention_heads (4)"), "{}", out.stderr);
    let out = up(&["--workers", "3", "--tp", "2"]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("not a multiple of --tp 2"), "{}", out.stderr);

    let plan = run_shardctl(
        &["plan", "--model", m.to_str().unwrap(), "--max-memory", "0=1MiB,1=1MiB,2=1MiB,3=1MiB", "--tp", "2", "--json"],
        &[],
        Duration::from_secs(20),
    );
    assert!(plan.status.success(), "{}", plan.stderr);
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(v["tp"], 2);
    assert_eq!(v["groups"], serde_json::json!([[0, 1], [2, 3]]));
    assert_eq!(v["device_map"]["model.layers.0"], 0);
    assert_eq!(v["device_map"]["model.norm"], 1);
    let plan =
        run_shardctl(&["plan", "--model", m.to_str().unwrap(), "--max-memory", "0=1MiB,1=1MiB", "--tp", "3"], &[], Duration::from_secs(20));
    assert!(!plan.status.success() && plan.stderr.contains("num_attention_heads (4)"), "{}", plan.stderr);
}
