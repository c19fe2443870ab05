//! Membership in a real etcd: workers join and leave, a dead one is noticed within seconds and
//! the client is told the truth, and an etcd outage is ridden out without restarting anything.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

async fn stages(cluster: &Cluster) -> Vec<pb::StageInfo> {
    let s = cluster_status(&cluster.url).await;
    s.models[0].stages.clone()
}

fn worker_ids(cluster: &Cluster) -> Vec<String> {
    cluster.workers_json()["workers"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap().to_string()).collect()
}

async fn wait_for_stages(cluster: &Cluster, n: usize, within: Duration) -> Vec<pb::StageInfo> {
    let deadline = Instant::now() + within;
    loop {
        let s = stages(cluster).await;
        if s.len() == n {
            return s;
        }
        assert!(Instant::now() < deadline, "placement did not reach {n} stages within {within:?}: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_worker_joins_and_the_model_is_replanned_over_it() {
    let etcd = Etcd::start();
    let name = unique_cluster("join");
    let cluster = Cluster::new(reference_model()).workers(2).etcd(&etcd, &name).start();
    assert_eq!(worker_ids(&cluster).len(), 2);
    let status = run_shardctl(&["status", "--json", "--coordinator", &cluster.url], &[], Duration::from_secs(20));
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["membership"], "etcd");
    let _spare = spare_worker(&etcd, &name, "third", 10);
    let s = wait_for_stages(&cluster, 3, Duration::from_secs(20)).await;
    assert!(s.iter().any(|st| st.worker_id == "third"), "{s:?}");
    let ids = worker_ids(&cluster);
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&"third".to_string()));
    // The plan is in etcd, naming the three workers.
    let mut client = shardserve::membership::connect(&[etcd.url()]).await.unwrap();
    let key = shardserve::membership::placement_key(&name, reference_model().to_str().unwrap());
    let got = client.get(key.as_str(), None).await.unwrap();
    let plan: serde_json::Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
    assert_eq!(plan["stages"].as_array().unwrap().len(), 3);
    assert!(plan.to_string().contains("\"third\""));
    let mut c = cluster.client().await;
    for case in &reference_cases()[..3] {
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_the_stream_and_leaves_the_fleet_within_two_ttl() {
    let etcd = Etcd::start();
    let name = unique_cluster("kill");
    let ttl = 2u64;
    let cluster = Cluster::new(reference_model()).workers(2).etcd(&etcd, &name).arg("--lease-ttl-s").arg(&ttl.to_string()).start();
    let (victim, pid) = cluster.stage_worker(1).await;
    let mut c = cluster.client().await;
    let mut s = c.generate_stream(greedy("a", 1000)).await.unwrap().into_inner();
    let (err, took) = kill_during_stream(&mut s, pid).await;
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains(&victim), "{:?} does not name {victim}", err.message());
    assert!(took <= Duration::from_secs(2 * ttl), "the client heard after {took:?} (TTL {ttl} s)");
    // It leaves the fleet within 2 × TTL of the kill; one second more covers asking (each
    // look runs `shardctl workers`).
    let killed = Instant::now() - took;
    let within = Duration::from_secs(2 * ttl + 1).saturating_sub(killed.elapsed());
    wait_until("the dead worker to leave the fleet within 2 × TTL of the kill", within, || !worker_ids(&cluster).contains(&victim));
    assert!(!alive(pid));
    // The model is re-planned over the worker that remains and serves correctly again.
    let s = wait_for_stages(&cluster, 1, Duration::from_secs(10)).await;
    assert_ne!(s[0].worker_id, victim);
    let case = &reference_cases()[0];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_of_five_seconds_is_ridden_out() {
    let mut etcd = Etcd::start();
    let name = unique_cluster("outage");
    let cluster = Cluster::new(reference_model()).workers(2).etcd(&etcd, &name).start();
    let before = cluster.workers_json();
    let pids: Vec<u64> = before["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    let mut c = cluster.client().await;
    let cases = reference_cases();
    etcd.stop();
    // While etcd is down the cluster keeps serving what it planned, correctly.
    let outage = Instant::now();
    for case in &cases[..2] {
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    }
    let rest = Duration::from_secs(5).saturating_sub(outage.elapsed());
    tokio::time::sleep(rest).await;
    etcd.restart();
    // After it the workers' registrations are in etcd again, kept alive by the same processes:
    // same workers, same answers; nothing was restarted.
    let mut etcd_client = shardserve::membership::connect(&[etcd.url()]).await.unwrap();
    let prefix = format!("{}workers/", shardserve::membership::prefix(&name));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = etcd_client.get(prefix.as_str(), Some(shardserve::membership::etcd_client::GetOptions::new().with_prefix())).await;
        if listed.is_ok_and(|r| r.kvs().len() == pids.len()) {
            break;
        }
        assert!(Instant::now() < deadline, "the workers did not keep their registrations across the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = cluster.workers_json();
    let pids_after: Vec<u64> = after["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids, pids_after, "workers changed across the outage: {before} vs {after}");
    assert!(pids.iter().all(|p| alive(*p as u32)));
    for case in &cases {
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    }
    // And membership works again: a worker joining now is seen.
    let _spare = spare_worker(&etcd, &name, "after-outage", 10);
    wait_until("the new worker to register", Duration::from_secs(20), || worker_ids(&cluster).contains(&"after-outage".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_migration_limit_a_killed_stage_does_not_interrupt_the_stream() {
    let etcd = Etcd::start();
    let cluster = migrating_cluster(&etcd, &unique_cluster("migrate"));
    let mut c = cluster.client().await;
    let req = greedy("a", 1000);
    let undisturbed = generate(&mut c, req.clone()).await.unwrap();
    let (victim, pid) = cluster.stage_worker(1).await;
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut ids = first.token_ids;
    let mut text = first.text;
    let mut finish = first.finish_reason;
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = s.message().await? {
            ids.extend(m.token_ids);
            text.push_str(&m.text);
            if !m.finish_reason.is_empty() {
                finish = m.finish_reason;
            }
        }
        Ok::<_, tonic::Status>(())
    })
    .await
    .expect("the migrated stream did not finish within 60 s");
    rest.unwrap_or_else(|e| panic!("the stream failed although migration was allowed: {e:?}"));
    assert_eq!(finish, "length");
    assert_eq!(ids, undisturbed.token_ids, "a migrated request must give the undisturbed tokens");
    assert_eq!(text, undisturbed.text);
    let s = stages(&cluster).await;
    assert!(!s.iter().any(|st| st.worker_id == victim), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_leaves_at_once_and_the_model_moves() {
    let etcd = Etcd::start();
    let name = unique_cluster("sigterm");
    let cluster = Cluster::new(reference_model()).workers(2).etcd(&etcd, &name).start();
    let (victim, pid) = cluster.stage_worker(1).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    // Well before the 10 s lease would run out: the worker revoked it.
    wait_until("the worker to exit", Duration::from_secs(5), || !alive(pid));
    wait_until("the worker to leave the fleet", Duration::from_secs(3), || !worker_ids(&cluster).contains(&victim));
    let s = wait_for_stages(&cluster, 1, Duration::from_secs(10)).await;
    assert_ne!(s[0].worker_id, victim);
    let mut c = cluster.client().await;
    let case = &reference_cases()[2];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}

async fn wait_ready(url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = cluster_status(url).await;
        if s.models.first().and_then(|m| m.model.as_ref()).is_some_and(|m| m.state == "ready") {
            return;
        }
        assert!(Instant::now() < deadline, "{url} not ready within {within:?}: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_coordinator_dies_the_other_takes_over_within_two_ttl() {
    let etcd = Etcd::start();
    let name = unique_cluster("ha");
    let (a, url_a) = etcd_coordinator(&etcd, &name);
    let _w1 = spare_worker(&etcd, &name, "w1", 2);
    let w2 = spare_worker(&etcd, &name, "w2", 2);
    wait_ready(&url_a, Duration::from_secs(30)).await;
    let (_b, url_b) = etcd_coordinator(&etcd, &name);
    wait_ready(&url_b, Duration::from_secs(30)).await;
    assert_eq!(cluster_status(&url_a).await.role, "leader");
    assert_eq!(cluster_status(&url_b).await.role, "follower");
    // The follower serves the leader's placement, with the right tokens.
    let mut c = pb::inference_client::InferenceClient::connect(url_b.clone()).await.unwrap();
    let cases = reference_cases();
    assert_eq!(generate(&mut c, greedy(&cases[0].prompt, 32)).await.unwrap().token_ids, cases[0].new_ids);
    // Kill the leader: the follower becomes leader within 2 × TTL and keeps serving.
    drop(a);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(4);
    while cluster_status(&url_b).await.role != "leader" {
        assert!(Instant::now() < deadline, "no takeover within 2 × TTL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(generate(&mut c, greedy(&cases[1].prompt, 32)).await.unwrap().token_ids, cases[1].new_ids);
    // As leader it plans: a worker dying is re-planned around.
    drop(w2);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = cluster_status(&url_b).await;
        let st = &s.models[0].stages;
        if st.len() == 1 && st[0].worker_id == "w1" {
            break;
        }
        assert!(Instant::now() < deadline, "the new leader did not re-plan: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(generate(&mut c, greedy(&cases[2].prompt, 32)).await.unwrap().token_ids, cases[2].new_ids);
}

fn worker_state(cluster: &Cluster, id: &str) -> Option<String> {
    cluster.workers_json()["workers"].as_array().unwrap().iter().find(|w| w["id"] == id).map(|w| w["state"].as_str().unwrap().to_string())
}

fn shardctl_ok(args: &[&str]) -> serde_json::Value {
    let out = run_shardctl(args, &[], Duration::from_secs(120));
    assert!(out.status.success(), "shardctl {args:?} failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_drain_and_scale_change_the_fleet_and_the_placement() {
    let etcd = Etcd::start();
    let name = unique_cluster("ops");
    let cluster = Cluster::new(reference_model()).workers(2).etcd(&etcd, &name).arg("--lease-ttl-s").arg("2").start();
    let url = cluster.url.clone();
    let cases = reference_cases();
    let mut c = cluster.client().await;
    let (x, _) = cluster.stage_worker(1).await;

    // Cordon: no new work for x, but what runs there stays.
    shardctl_ok(&["cordon", &x, "--json", "--coordinator", &url]);
    assert_eq!(worker_state(&cluster, &x).as_deref(), Some("cordoned"));
    assert!(stages(&cluster).await.iter().any(|s| s.worker_id == x));
    shardctl_ok(&["uncordon", &x, "--json", "--coordinator", &url]);
    assert_eq!(worker_state(&cluster, &x).as_deref(), Some("serving"));
    let out = run_shardctl(&["cordon", "nobody", "--coordinator", &url], &[], Duration::from_secs(20));
    assert!(!out.status.success() && out.stderr.contains("NotFound") && out.stderr.contains("nobody"), "{}", out.stderr);

    // Drain while a request streams: it finishes, then the model leaves x.
    let mut s = c.generate_stream(greedy("a", 600)).await.unwrap().into_inner();
    assert!(s.message().await.unwrap().is_some());
    let drain_url = url.clone();
    let xd = x.clone();
    let drain = tokio::task::spawn_blocking(move || shardctl_ok(&["drain", &xd, "--json", "--coordinator", &drain_url]));
    let mut n = 1;
    while let Some(m) =
        tokio::time::timeout(Duration::from_secs(60), s.message()).await.unwrap().expect("the streaming request failed during the drain")
    {
        n += m.token_ids.len();
    }
    assert_eq!(n, 600);
    let drained = tokio::time::timeout(Duration::from_secs(60), drain).await.unwrap().unwrap();
    assert!(!drained["placement"].to_string().contains(&format!("\"{x}\"")), "{drained}");
    assert!(!stages(&cluster).await.iter().any(|s| s.worker_id == x));
    assert_eq!(generate(&mut c, greedy(&cases[0].prompt, 32)).await.unwrap().token_ids, cases[0].new_ids);

    // Scale up: a new local worker joins and the model spreads over it (x stays cordoned).
    let up = shardctl_ok(&["scale", "--workers", "3", "--json", "--coordinator", &url]);
    let started = up["started"][0].as_str().unwrap().to_string();
    assert_eq!(worker_ids(&cluster).len(), 3);
    let s = wait_for_stages(&cluster, 2, Duration::from_secs(20)).await;
    assert!(s.iter().any(|st| st.worker_id == started), "{s:?}");
    assert_eq!(generate(&mut c, greedy(&cases[1].prompt, 32)).await.unwrap().token_ids, cases[1].new_ids);

    // Scale down: the newest worker is drained and stopped.
    let down = shardctl_ok(&["scale", "--workers", "2", "--json", "--coordinator", &url]);
    assert_eq!(down["stopped"][0].as_str().unwrap(), started);
    assert_eq!(worker_ids(&cluster).len(), 2);
    assert!(!stages(&cluster).await.iter().any(|s| s.worker_id == started));
    assert_eq!(generate(&mut c, greedy(&cases[2].prompt, 32)).await.unwrap().token_ids, cases[2].new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_asked_of_a_follower_coordinator_moves_the_leaders_plan() {
    let etcd = Etcd::start();
    let name = unique_cluster("drainf");
    let (_a, url_a) = etcd_coordinator(&etcd, &name);
    let _w1 = spare_worker(&etcd, &name, "w1", 2);
    let _w2 = spare_worker(&etcd, &name, "w2", 2);
    wait_ready(&url_a, Duration::from_secs(30)).await;
    let (_b, url_b) = etcd_coordinator(&etcd, &name);
    wait_ready(&url_b, Duration::from_secs(30)).await;
    assert_eq!(cluster_status(&url_b).await.role, "follower");
    let st = cluster_status(&url_a).await.models[0].stages.clone();
    assert_eq!(st.len(), 2, "{st:?}");
    let victim = st[1].worker_id.clone();
    // Asked of the follower; it is the leader that plans, and it moves off the worker.
    let drained = shardctl_ok(&["drain", &victim, "--timeout-s", "20", "--json", "--coordinator", &url_b]);
    assert_eq!(drained["state"], "drained", "{drained}");
    for url in [&url_a, &url_b] {
        let st = cluster_status(url).await.models[0].stages.clone();
        assert!(!st.is_empty() && st.iter().all(|s| s.worker_id != victim), "{url}: {st:?}");
    }
    let mut c = pb::inference_client::InferenceClient::connect(url_b.clone()).await.unwrap();
    let case = &reference_cases()[4];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
}

/// A worker restarted under the same id and address (a StatefulSet pod, say) is a new process
/// holding no shard: the coordinator sees it register again and places the model anew, so the
/// next request is served, not failed against a stage that lost its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_under_the_same_id_and_address_is_placed_again() {
    let etcd = Etcd::start();
    let name = unique_cluster("restart");
    let (_coordinator, url) = etcd_coordinator(&etcd, &name);
    // A long lease: the old process's registration would outlive the restart, so nothing but
    // the new process registering can tell the coordinator.
    let _w1 = spare_worker(&etcd, &name, "w1", 2);
    let w2 = worker_at(&etcd, &name, "w2", 30, "127.0.0.1:0");
    wait_ready(&url, Duration::from_secs(30)).await;
    let stages = cluster_status(&url).await.models[0].stages.clone();
    // The address it bound: the restarted process listens there again.
    let address = stages.iter().find(|s| s.worker_id == "w2").map(|s| s.address.clone()).unwrap_or_else(|| panic!("{stages:?}"));
    let cases = reference_cases();
    let mut c = pb::inference_client::InferenceClient::connect(url.clone()).await.unwrap();
    assert_eq!(generate(&mut c, greedy(&cases[0].prompt, 32)).await.unwrap().token_ids, cases[0].new_ids);

    let before = instance_of(&url, "w2");
    assert!(!before.is_empty());

    drop(w2);
    let _w2 = worker_at(&etcd, &name, "w2", 30, &address);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The new process may not listen yet: any answer but a loaded shard means "not yet".
        let held = tokio::time::timeout(Duration::from_secs(2), async {
            let mut w = pb::worker_client::WorkerClient::connect(format!("http://{address}")).await.ok()?;
            w.stats(pb::StatsRequest {}).await.ok().map(|r| r.into_inner())
        })
        .await
        .ok()
        .flatten();
        if held.as_ref().is_some_and(|s| s.layer_end > s.layer_start) {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted w2 was not given a shard again: {held:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_ready(&url, Duration::from_secs(20)).await;
    assert_eq!(generate(&mut c, greedy(&cases[1].prompt, 32)).await.unwrap().token_ids, cases[1].new_ids);
    // `workers --json` tells the two processes apart.
    let after = instance_of(&url, "w2");
    assert!(!after.is_empty() && after != before, "instance {before:?} then {after:?}");
}

/// The `instance` that `shardctl workers --json` shows for worker `id`.
fn instance_of(url: &str, id: &str) -> String {
    let out = run_shardctl(&["workers", "--json", "--coordinator", url], &[], Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let w = v["workers"].as_array().unwrap().iter().find(|w| w["id"] == id).cloned();
    w.and_then(|w| w["instance"].as_str().map(str::to_string)).unwrap_or_default()
}
