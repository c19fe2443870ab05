//! Replicas through real processes: `shardctl up --workers 4 --replicas 2` serves two copies of
//! a 2-stage model, each with its own placement, scheduler and KV pools; requests are routed
//! between them (the same prompt again lands where its prefix is cached); a worker killed costs
//! only its replica, whose streams migrate with identical tokens or end UNAVAILABLE while the
//! other replica serves the next request at once.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// The model's replicas as `ClusterStatus` shows them.
async fn replicas(cluster: &Cluster) -> (Vec<pb::ReplicaStatus>, Vec<String>) {
    let s = cluster_status(&cluster.url).await;
    let m = &s.models[0];
    (m.replicas.clone(), m.spares.clone())
}

/// Waits (bounded) until the replicas serve over `stages` stages each (by replica); returns
/// them.
async fn wait_ready(cluster: &Cluster, stages: &[usize], within: Duration) -> Vec<pb::ReplicaStatus> {
    let deadline = Instant::now() + within;
    loop {
        let (r, _) = replicas(cluster).await;
        if r.len() == stages.len() && r.iter().zip(stages).all(|(r, &n)| r.state == "ready" && r.stages.len() == n) {
            return r;
        }
        assert!(Instant::now() < deadline, "replicas of {stages:?} stages did not serve within {within:?}: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every worker of every stage of `r`, ranks included.
fn workers_of(r: &pb::ReplicaStatus) -> Vec<String> {
    r.stages.iter().flat_map(|s| std::iter::once(s.worker_id.clone()).chain(s.ranks.clone())).collect()
}

/// Where each worker of `cluster` listens, by id.
async fn addresses(cluster: &Cluster) -> std::collections::HashMap<String, (String, u32)> {
    let mut admin = cluster.admin().await;
    let listed = tokio::time::timeout(Duration::from_secs(10), admin.list_workers(pb::ListWorkersRequest {}));
    let workers = listed.await.expect("ListWorkers did not answer within 10 s").unwrap().into_inner().workers;
    workers.into_iter().map(|w| (w.id, (w.address, w.pid))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_two_stages_give_transformers_tokens_and_route_by_prefix() {
    let cluster = Cluster::new(reference_model()).workers(4).arg("--replicas").arg("2").arg("--kv-block-size").arg("8").start();
    let ready = wait_ready(&cluster, &[2, 2], Duration::from_secs(60)).await;
    // Two disjoint pairs of workers, and none spare.
    let (a, b) = (workers_of(&ready[0]), workers_of(&ready[1]));
    assert!(a.iter().all(|w| !b.contains(w)), "replicas share a worker: {a:?} {b:?}");
    assert!(replicas(&cluster).await.1.is_empty());
    let listed = cluster.workers_json();
    let spread: Vec<(String, u64)> = listed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["state"].as_str().unwrap_or("").to_string(), w["replica"].as_u64().unwrap_or(99)))
        .collect();
    assert_eq!(spread.iter().filter(|(s, r)| s == "serving" && *r == 0).count(), 2, "{listed}");
    assert_eq!(spread.iter().filter(|(s, r)| s == "serving" && *r == 1).count(), 2, "{listed}");

    // transformers' tokens, the 8 prompts at once.
    let cases = reference_cases();
    let mut tasks = Vec::new();
    for case in cases.clone() {
        let mut c = cluster.client().await;
        tasks.push(tokio::spawn(
            async move { (case.prompt.clone(), case.new_ids.clone(), generate(&mut c, greedy(&case.prompt, 32)).await) },
        ));
    }
    let mut same = 0;
    for t in tasks {
        let (prompt, want, got) = tokio::time::timeout(Duration::from_secs(120), t).await.expect("no answer within 120 s").unwrap();
        assert_eq!(got.unwrap_or_else(|e| panic!("{prompt:?}: {e:?}")).token_ids, want, "{prompt:?}");
        same += 1;
    }
    assert_eq!(same, 8);
    // Both replicas took requests: the router weighs load, and 8 at once are more than one
    // replica's share.
    let (after, _) = replicas(&cluster).await;
    assert!(after.iter().all(|r| r.prefix_cache_queries > 0), "a replica took no request: {after:?}");

    // The same long prompt twice: the second lands where the first left its blocks.
    let mut c = cluster.client().await;
    // (Starting with words no earlier prompt starts with, so nothing of it is cached yet.)
    let prompt: String = std::iter::once("Read these again:").chain(cases.iter().map(|c| c.prompt.as_str())).collect::<Vec<_>>().join(" ");
    let first = generate(&mut c, greedy(&prompt, 8)).await.unwrap();
    assert_eq!(first.usage.as_ref().unwrap().cached_tokens, 0);
    // Other traffic in between, so that load alone would not pick the same replica.
    for case in &cases[..3] {
        generate(&mut c, greedy(&case.prompt, 4)).await.unwrap();
    }
    let second = generate(&mut c, greedy(&prompt, 8)).await.unwrap();
    let prompt_tokens = second.usage.as_ref().unwrap().prompt_tokens;
    let cached = second.usage.as_ref().unwrap().cached_tokens;
    assert!(cached > 0 && cached as usize >= (prompt_tokens as usize - 1) / 8 * 8, "{cached} of {prompt_tokens} prompt tokens cached");
    assert_eq!(second.token_ids, first.token_ids);
    assert!(cluster.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_costs_only_its_replica() {
    let cluster = Cluster::new(reference_model())
        .workers(4)
        .arg("--replicas")
        .arg("2")
        .arg("--router")
        .arg("round-robin")
        .arg("--lease-ttl-s")
        .arg("2")
        .arg("--migration-limit")
        .arg("1")
        .start();
    let ready = wait_ready(&cluster, &[2, 2], Duration::from_secs(60)).await;
    let addrs = addresses(&cluster).await;
    let victim = ready[1].stages[1].worker_id.clone();
    let (_, pid) = addrs[&victim].clone();
    let cases = reference_cases();
    // Four streams, two on each replica (round-robin), each long enough to be running when the
    // worker dies; what each should give comes from a run with no fault.
    let long = |p: &str| pb::GenerateRequest { ignore_eos: true, ..greedy(p, 200) };
    let mut c = cluster.client().await;
    let mut want = Vec::new();
    for case in &cases[..4] {
        want.push(generate(&mut c, long(&case.prompt)).await.unwrap().token_ids);
    }
    let mut streams = Vec::new();
    for case in &cases[..4] {
        let mut s = c.generate_stream(long(&case.prompt)).await.unwrap().into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.expect("no first token within 30 s").unwrap();
        streams.push((first.expect("a first message").token_ids, s));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let (mut completed, mut unavailable) = (0, 0);
    for (i, (mut tokens, mut s)) in streams.into_iter().enumerate() {
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match s.message().await {
                    Ok(Some(m)) => tokens.extend(m.token_ids),
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("a stream neither ended nor failed within 60 s of the kill");
        match ended {
            Ok(()) => {
                assert_eq!(tokens, want[i], "stream {i} completed with other tokens than with no fault");
                completed += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "stream {i}: {e:?}");
                unavailable += 1;
            }
        }
    }
    assert_eq!(completed + unavailable, 4);
    // The streams on the other replica never noticed.
    assert!(completed >= 2, "{completed} completed, {unavailable} unavailable");
    // The next request is served at once, by the replica that lost nothing.
    let case = &cases[5];
    let started = Instant::now();
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    assert!(started.elapsed() < Duration::from_secs(5), "the next request took {:?}", started.elapsed());
    // Replica 0 kept its placement throughout.
    let (now, _) = replicas(&cluster).await;
    assert_eq!(workers_of(&now[0]), workers_of(&ready[0]));
    // The wounded replica re-plans over its survivor (the model fits one worker) and serves
    // again; nothing is left on any worker.
    let back = wait_ready(&cluster, &[2, 1], Duration::from_secs(30)).await;
    assert!(!workers_of(&back[1]).contains(&victim));
    for case in &cases[..2] {
        assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids);
    }
    let live: Vec<String> = back.iter().flat_map(workers_of).map(|w| addrs[&w].0.clone()).collect();
    wait_no_sequences(&live).await;
    assert!(cluster.stop().success());
}

/// `shardctl scale --workers N` on `cluster`, with its JSON answer.
fn scale(cluster: &Cluster, workers: usize) -> serde_json::Value {
    let out =
        run_shardctl(&["scale", "--workers", &workers.to_string(), "--json", "--coordinator", &cluster.url], &[], Duration::from_secs(180));
    assert!(out.status.success(), "scale --workers {workers} failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_adds_and_removes_whole_replicas_without_failing_a_request() {
    let cluster = Cluster::new(reference_model()).workers(4).arg("--replicas").arg("2").start();
    let before = wait_ready(&cluster, &[2, 2], Duration::from_secs(60)).await;
    // Clients keep requests going throughout: each one must come back with transformers'
    // tokens, whatever the fleet does meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cases = reference_cases();
    let mut clients = Vec::new();
    for k in 0..4 {
        let (mut c, stop, cases) = (cluster.client().await, stop.clone(), cases.clone());
        clients.push(tokio::spawn(async move {
            let mut spans = Vec::new();
            let mut i = k;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let case = &cases[i % cases.len()];
                let started = Instant::now();
                let got = tokio::time::timeout(Duration::from_secs(120), generate(&mut c, greedy(&case.prompt, 32))).await;
                let got =
                    got.expect("a request took over 120 s").unwrap_or_else(|e| panic!("{:?} failed during a scale: {e:?}", case.prompt));
                assert_eq!(got.token_ids, case.new_ids, "{:?}", case.prompt);
                spans.push((started, Instant::now()));
                i += 1;
            }
            spans
        }));
    }

    // Up: two more workers make a third replica; the first two keep their workers.
    let up = scale(&cluster, 6);
    assert_eq!(up["started"].as_array().unwrap().len(), 2, "{up}");
    let three = wait_ready(&cluster, &[2, 2, 2], Duration::from_secs(60)).await;
    assert_eq!(workers_of(&three[0]), workers_of(&before[0]));
    assert_eq!(workers_of(&three[1]), workers_of(&before[1]));
    let mut third = workers_of(&three[2]);
    third.sort();
    let mut started: Vec<String> = up["started"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    started.sort();
    assert_eq!(third, started);

    // Down to two workers: the last two replicas go, drained first, while requests run.
    let (down_from, down) = (Instant::now(), scale(&cluster, 2));
    let down_to = Instant::now();
    let mut stopped: Vec<String> = down["stopped"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    stopped.sort();
    let mut gone: Vec<String> = workers_of(&three[1]).into_iter().chain(workers_of(&three[2])).collect();
    gone.sort();
    assert_eq!(stopped, gone, "{down}");
    let one = wait_ready(&cluster, &[2], Duration::from_secs(60)).await;
    assert_eq!(workers_of(&one[0]), workers_of(&before[0]));

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut overlapped = 0;
    let mut total = 0;
    for c in clients {
        let spans = tokio::time::timeout(Duration::from_secs(150), c).await.expect("a client did not finish").unwrap();
        total += spans.len();
        overlapped += spans.iter().filter(|(s, e)| *s < down_to && *e > down_from).count();
    }
    assert!(overlapped > 0, "no request ran while the fleet shrank ({total} in all)");
    assert!(cluster.stop().success());
}
