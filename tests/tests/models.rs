//! Several models on one coordinator: `shardctl models load` reserves workers for another model
//! (taking them from the coordinator's own model, which moves off them without failing a
//! request), both serve their own tokens, and `models unload` gives the workers back.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

fn on(model: &str, mut req: pb::GenerateRequest) -> pb::GenerateRequest {
    req.model = model.into();
    req
}

async fn stages(cluster: &Cluster, model: &str) -> Vec<pb::StageInfo> {
    let s = cluster_status(&cluster.url).await;
    s.models.iter().find(|m| m.model.as_ref().is_some_and(|i| i.name == model)).map(|m| m.stages.clone()).unwrap_or_default()
}

fn shardctl_json(args: &[&str]) -> serde_json::Value {
    let out = run_shardctl(args, &[], Duration::from_secs(120));
    assert!(out.status.success(), "shardctl {args:?}: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

/// A 4-layer tiny llama checkpoint made with `seed`, and the 16 greedy tokens one worker
/// serving it alone generates for `prompt`.
async fn tiny_llama(seed: u32, prompt: &str) -> (tempfile::TempDir, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap().to_string();
    let made = run_shardctl(
        &["dev", "tiny-model", "--arch", "llama", "--out", &out, "--layers", "4", "--seed", &seed.to_string()],
        &[],
        Duration::from_secs(60),
    );
    assert!(made.status.success(), "{}", made.stderr);
    let one = Cluster::new(dir.path()).start();
    let mut c = one.client().await;
    let tokens = generate(&mut c, greedy(prompt, 16)).await.unwrap().token_ids;
    drop(one);
    (dir, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_model_is_loaded_on_reserved_workers_and_unloaded_again() {
    let prompt = "The quick brown fox";
    let (dir, want_llama) = tiny_llama(21, prompt).await;
    let llama = dir.path().to_str().unwrap().to_string();

    let primary = reference_model().to_str().unwrap().to_string();
    let cluster = Cluster::new(reference_model()).workers(3).start();
    let mut c = cluster.client().await;
    assert_eq!(stages(&cluster, &primary).await.len(), 3);
    let long = greedy("a", 200);
    let want_long = generate(&mut c, long.clone()).await.unwrap().token_ids;

    // Loading while a request streams: the primary gives up a worker once it is idle, and the
    // request in flight finishes undisturbed.
    let mut s = c.generate_stream(long).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
    let loaded = shardctl_json(&["models", "load", &llama, "--name", "llama", "--json", "--coordinator", &cluster.url]);
    assert_eq!(loaded["model"]["state"], "ready", "{loaded}");
    let reserved: Vec<String> = serde_json::from_value(loaded["workers"].clone()).unwrap();
    assert_eq!(reserved.len(), 1);
    let mut got = first.token_ids;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap() {
        got.extend(m.token_ids);
    }
    assert_eq!(got, want_long, "the stream in flight was disturbed by the load");

    // Both serve, each on its own workers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = stages(&cluster, &primary).await;
        if !p.is_empty() && !p.iter().any(|s| s.worker_id == reserved[0]) {
            assert_eq!(p.len(), 2, "{p:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the primary still uses {}: {p:?}", reserved[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l = stages(&cluster, "llama").await;
    assert_eq!(l.iter().map(|s| s.worker_id.clone()).collect::<Vec<_>>(), reserved);
    assert_eq!(generate(&mut c, on("llama", greedy(prompt, 16))).await.unwrap().token_ids, want_llama);
    for case in &reference_cases()[..2] {
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
        assert_eq!(generate(&mut c, on(&primary, greedy(&case.prompt, 32))).await.unwrap().token_ids, case.new_ids);
    }
    let listed = shardctl_json(&["models", "list", "--json", "--coordinator", &cluster.url]);
    let names: Vec<&str> = listed["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec![primary.as_str(), "llama"]);
    let workers = cluster.workers_json();
    assert!(workers["workers"].as_array().unwrap().iter().all(|w| w["state"] == "serving"), "{workers}");

    // What cannot be done is refused with the reason.
    let mut admin = cluster.admin().await;
    let load = |name: &str, workers: u32| pb::LoadModelRequest { model: llama.clone(), name: name.into(), workers, ..Default::default() };
    let e = admin.load_model(load("llama", 1)).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("already served"), "{e:?}");
    let e = admin.load_model(load("big", 5)).await.unwrap_err();
    assert!(e.code() == Code::ResourceExhausted && e.message().contains("add workers"), "{e:?}");
    let e = admin.load_model(pb::LoadModelRequest { model: "/nonexistent/model".into(), ..Default::default() }).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("/nonexistent/model"), "{e:?}");
    let e = admin.unload_model(pb::UnloadModelRequest { name: primary.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = admin.unload_model(pb::UnloadModelRequest { name: "nobody".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Unloaded: its name is unknown at once, its worker drops the shard and goes back.
    let unloaded = shardctl_json(&["models", "unload", "llama", "--json", "--coordinator", &cluster.url]);
    assert_eq!(unloaded["workers"], serde_json::json!(reserved));
    let e = generate(&mut c, on("llama", greedy(prompt, 4))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while stages(&cluster, &primary).await.len() != 3 {
        assert!(Instant::now() < deadline, "the primary did not take the worker back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let case = &reference_cases()[3];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_every_coordinator_serves_a_model_the_leader_loaded() {
    let prompt = "Once upon a time";
    let (dir, want_llama) = tiny_llama(22, prompt).await;
    let llama = dir.path().to_str().unwrap().to_string();
    let etcd = Etcd::start();
    let name = unique_cluster("models");
    let (_a, leader) = etcd_coordinator(&etcd, &name);
    let _w = ["w1", "w2", "w3"].map(|id| spare_worker(&etcd, &name, id, 2));
    let ready = |url: String, model: String| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = cluster_status(&url).await;
            if s.models.iter().any(|m| m.model.as_ref().is_some_and(|i| i.name == model && i.state == "ready")) {
                return;
            }
            assert!(Instant::now() < deadline, "{model} not ready on {url}: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let primary = reference_model().to_str().unwrap().to_string();
    ready(leader.clone(), primary.clone()).await;
    let (_b, follower) = etcd_coordinator(&etcd, &name);
    ready(follower.clone(), primary.clone()).await;
    assert_eq!(cluster_status(&follower).await.role, "follower");

    // Loading goes through the leader; the follower says so.
    let out = run_shardctl(&["models", "load", &llama, "--name", "llama", "--coordinator", &follower], &[], Duration::from_secs(60));
    assert!(!out.status.success() && out.stderr.contains("follower"), "{}", out.stderr);
    let loaded = shardctl_json(&["models", "load", &llama, "--name", "llama", "--json", "--coordinator", &leader]);
    assert_eq!(loaded["model"]["state"], "ready", "{loaded}");
    // The follower serves it too, on the leader's placement.
    ready(follower.clone(), "llama".into()).await;
    let mut c = pb::inference_client::InferenceClient::connect(follower.clone()).await.unwrap();
    assert_eq!(generate(&mut c, on("llama", greedy(prompt, 16))).await.unwrap().token_ids, want_llama);
    let case = &reference_cases()[5];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);

    // Unloaded through the leader: gone everywhere.
    shardctl_json(&["models", "unload", "llama", "--json", "--coordinator", &leader]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match generate(&mut c, on("llama", greedy(prompt, 2))).await {
            Err(e) if e.code() == Code::NotFound => break,
            other => assert!(Instant::now() < deadline, "the follower still serves llama: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loaded_at_run_time_is_served_as_replicas_of_its_reserved_workers() {
    let prompt = "The quick brown fox";
    let (dir, want_llama) = tiny_llama(23, prompt).await;
    let llama = dir.path().to_str().unwrap().to_string();
    let primary = reference_model().to_str().unwrap().to_string();
    let cluster = Cluster::new(reference_model()).workers(3).start();
    let mut c = cluster.client().await;
    assert_eq!(stages(&cluster, &primary).await.len(), 3);

    // Replicas that cannot split the workers evenly are refused before anything is reserved.
    let mut admin = cluster.admin().await;
    let req = pb::LoadModelRequest { model: llama.clone(), name: "llama".into(), workers: 3, replicas: "2".into(), ..Default::default() };
    let e = admin.load_model(req).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("--replicas 2"), "{e:?}");
    let req = pb::LoadModelRequest { model: llama.clone(), name: "llama".into(), replicas: "two".into(), ..Default::default() };
    let e = admin.load_model(req).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("--replicas"), "{e:?}");
    assert_eq!(stages(&cluster, &primary).await.len(), 3, "a refused load took workers");

    // Two workers as two replicas of one worker each.
    let loaded = shardctl_json(&[
        "models",
        "load",
        &llama,
        "--name",
        "llama",
        "--workers",
        "2",
        "--replicas",
        "2",
        "--json",
        "--coordinator",
        &cluster.url,
    ]);
    assert_eq!(loaded["model"]["state"], "ready", "{loaded}");
    let mut reserved: Vec<String> = serde_json::from_value(loaded["workers"].clone()).unwrap();
    reserved.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster_status(&cluster.url).await;
        let m = s.models.iter().find(|m| m.model.as_ref().is_some_and(|i| i.name == "llama")).expect("llama in the status");
        let ready: Vec<&pb::ReplicaStatus> = m.replicas.iter().filter(|r| r.state == "ready").collect();
        if ready.len() == 2 {
            let mut on: Vec<String> = ready.iter().flat_map(|r| r.stages.iter().map(|st| st.worker_id.clone())).collect();
            on.sort();
            assert_eq!(on, reserved, "each replica is one stage on a reserved worker: {m:?}");
            assert!(m.spares.is_empty(), "{m:?}");
            break;
        }
        assert!(Instant::now() < deadline, "llama's 2 replicas not ready: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both replicas' tokens are the model's, four requests at once; the primary serves on the
    // worker it kept.
    let runs = (0..4).map(|_| {
        let mut c = c.clone();
        async move { generate(&mut c, on("llama", greedy(prompt, 16))).await.unwrap().token_ids }
    });
    for got in futures::future::join_all(runs).await {
        assert_eq!(got, want_llama);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = stages(&cluster, &primary).await;
        if p.len() == 1 {
            assert!(!reserved.contains(&p[0].worker_id), "{p:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the primary is not on the one worker it kept: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let case = &reference_cases()[1];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);

    // Unloaded: both replicas' workers go back to the primary.
    let unloaded = shardctl_json(&["models", "unload", "llama", "--json", "--coordinator", &cluster.url]);
    let mut released: Vec<String> = serde_json::from_value(unloaded["workers"].clone()).unwrap();
    released.sort();
    assert_eq!(released, reserved);
    let e = generate(&mut c, on("llama", greedy(prompt, 4))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while stages(&cluster, &primary).await.len() != 3 {
        assert!(Instant::now() < deadline, "the primary did not take the workers back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let case = &reference_cases()[2];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}
