//! A soak under faults (run by `scripts/soak.sh`, not by the README's test command, as it takes
//! minutes): real etcd, a coordinator serving the reference model as 2 replicas of 2 workers,
//! `SOAK_STREAMS` greedy streams kept going for `SOAK_SECONDS`, and every `SOAK_KILL_EVERY_S`
//! a random worker `kill -9`'d and started again under its id. Every stream must end with the
//! tokens a run with no fault gives, or with `UNAVAILABLE`; none may hang; afterwards every
//! replica serves again and no worker holds a sequence or a KV block. Prints the counts.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What the streams came to.
#[derive(Default)]
struct Counts {
    completed: AtomicUsize,
    /// Completed although a worker was killed while they ran.
    migrated: AtomicUsize,
    unavailable: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by scripts/soak.sh"]
async fn soak_two_replicas_under_kills() {
    let (seconds, streams, every) = (setting("SOAK_SECONDS", 600), setting("SOAK_STREAMS", 32) as usize, setting("SOAK_KILL_EVERY_S", 30));
    let etcd = Etcd::start();
    let name = unique_cluster("soak");
    let model = reference_model();
    let (_coordinator, url) = spawn_coordinator(&[
        "--model",
        model.to_str().unwrap(),
        "--etcd",
        &etcd.url(),
        "--cluster",
        &name,
        "--workers",
        "4",
        "--replicas",
        "2",
        "--lease-ttl-s",
        "2",
        "--migration-limit",
        "3",
        "--replan-wait-s",
        "20",
        "--max-waiting",
        "1024",
    ]);
    let ids: Vec<String> = (0..4).map(|i| format!("soak-w{i}")).collect();
    let workers: Arc<Mutex<Vec<Proc>>> = Arc::new(Mutex::new(ids.iter().map(|id| worker_at(&etcd, &name, id, 2, "127.0.0.1:0")).collect()));
    wait_replicas_ready(&url, Duration::from_secs(60)).await;

    // What each prompt gives with no fault: 96 tokens, past any end of sequence.
    let cases = reference_cases();
    let request = |p: &str| pb::GenerateRequest { ignore_eos: true, ..greedy(p, 96) };
    let mut c = pb::inference_client::InferenceClient::connect(url.clone()).await.unwrap();
    let mut want = Vec::new();
    for case in &cases {
        want.push(generate(&mut c, request(&case.prompt)).await.unwrap().token_ids);
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let counts = Arc::new(Counts::default());
    let kills: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for k in 0..streams {
        let (url, cases, want, counts, kills, stop) =
            (url.clone(), cases.clone(), want.clone(), counts.clone(), kills.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut c = pb::inference_client::InferenceClient::connect(url).await.unwrap();
            let mut i = k;
            while !stop.load(Ordering::SeqCst) {
                let n = i % cases.len();
                i += 1;
                let begun = Instant::now();
                let ended = tokio::time::timeout(Duration::from_secs(120), async {
                    let mut s = c.generate_stream(request(&cases[n].prompt)).await?.into_inner();
                    let mut tokens = Vec::new();
                    while let Some(m) = s.message().await? {
                        tokens.extend(m.token_ids);
                    }
                    Ok::<_, tonic::Status>(tokens)
                })
                .await
                .unwrap_or_else(|_| panic!("a stream neither ended nor failed within 120 s"));
                match ended {
                    Ok(tokens) => {
                        assert_eq!(tokens, want[n], "a stream of {:?} completed with other tokens than with no fault", cases[n].prompt);
                        counts.completed.fetch_add(1, Ordering::SeqCst);
                        if kills.lock().unwrap().iter().any(|t| *t > begun) {
                            counts.migrated.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "a stream failed otherwise than UNAVAILABLE: {e:?}");
                        counts.unavailable.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }

    // The faults: a random worker killed and started again under its id, every `every` s.
    let mut rng = started.elapsed().as_nanos() as u64 ^ std::process::id() as u64 | 1;
    let mut next = started + Duration::from_secs(every);
    let mut killed = 0;
    while next < deadline {
        tokio::time::sleep_until(next.into()).await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let victim = (rng % ids.len() as u64) as usize;
        {
            let mut w = workers.lock().unwrap();
            w[victim].0.kill().unwrap();
            w[victim].0.wait().unwrap();
            kills.lock().unwrap().push(Instant::now());
            w[victim] = worker_at(&etcd, &name, &ids[victim], 2, "127.0.0.1:0");
        }
        killed += 1;
        eprintln!("soak: {:>4} s: killed and restarted {}", started.elapsed().as_secs(), ids[victim]);
        next += Duration::from_secs(every);
    }
    tokio::time::sleep_until(deadline.into()).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        // Each stream is bounded by 120 s above.
        tokio::time::timeout(Duration::from_secs(150), client).await.expect("a client did not finish").unwrap();
    }

    // Afterwards: both replicas serve again, and nothing is left on any worker.
    wait_replicas_ready(&url, Duration::from_secs(60)).await;
    let listed = pb::admin_client::AdminClient::connect(url.clone())
        .await
        .unwrap()
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    let addresses: Vec<String> = listed.workers.iter().map(|w| w.address.clone()).collect();
    assert_eq!(addresses.len(), 4, "{listed:?}");
    wait_no_sequences(&addresses).await;
    let (completed, migrated, unavailable) =
        (counts.completed.load(Ordering::SeqCst), counts.migrated.load(Ordering::SeqCst), counts.unavailable.load(Ordering::SeqCst));
    println!(
        "soak: {seconds} s, {streams} streams, {killed} workers killed: {} streams, {completed} completed with the fault-free tokens ({migrated} of them while a kill happened), {unavailable} ended UNAVAILABLE, 0 hung, 0 KV blocks left",
        completed + unavailable
    );
    assert!(completed > 0);
}

/// Waits (bounded) until the model's two replicas both serve.
async fn wait_replicas_ready(url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = tokio::time::timeout(Duration::from_secs(5), cluster_status(url)).await.ok();
        let r = s.as_ref().and_then(|s| s.models.first()).map(|m| m.replicas.clone()).unwrap_or_default();
        if r.len() == 2 && r.iter().all(|r| r.state == "ready") {
            return;
        }
        assert!(Instant::now() < deadline, "the two replicas did not serve within {within:?}: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
