//! The Compose cluster of `deploy/compose.yaml` on real containers: the image that
//! `deploy/docker/build.sh` builds, etcd, two coordinators and scaled workers, each a container
//! with its own address on a private network. Containers are killed, cut off the network,
//! stopped and restarted the way an operator or a failing host would.

use shardserve_proto::v1 as pb;
use shardserve_tests::*;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lease TTL of the test clusters, in seconds.
const TTL: u64 = 2;

/// The Compose command: Docker's plugin (`docker compose`) or the standalone `docker-compose`.
fn compose_cmd() -> Vec<&'static str> {
    let plugin = Command::new("docker").args(["compose", "version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if plugin.is_ok_and(|s| s.success()) {
        vec!["docker", "compose"]
    } else {
        vec!["docker-compose"]
    }
}

/// Runs `cmd`, killing it past `within`; panics when it does not succeed.
fn run(cmd: &mut Command, within: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = bounded(cmd, within);
    assert!(out.status.success(), "{shown} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds `shardserve:latest` and `shardserve-etcd:latest` once per test run, from the
/// binaries the tests use (no cargo run inside the tests).
fn build_images() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if *built {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    run(
        Command::new("bash").arg(root.join("deploy/docker/build.sh")).env("BIN_DIR", bin_dir()).current_dir(&root),
        Duration::from_secs(600),
    );
    *built = true;
}

/// One Compose project of `deploy/compose.yaml`, taken down with its volumes when dropped.
struct Compose {
    project: String,
    env: HashMap<&'static str, String>,
    cmd: Vec<&'static str>,
}

impl Compose {
    /// Starts etcd, both coordinators and `workers` workers; the coordinators place the model
    /// over `place_on` of them.
    fn up(tag: &str, workers: usize, place_on: usize, migration_limit: u32, ttl_s: u64) -> Compose {
        Self::up_with(tag, workers, place_on, migration_limit, ttl_s, &[])
    }

    /// Like [`Compose::up`], with more of compose.yaml's settings (`REPLICAS`, say).
    fn up_with(tag: &str, workers: usize, place_on: usize, migration_limit: u32, ttl_s: u64, settings: &[(&'static str, &str)]) -> Compose {
        build_images();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let model = reference_model();
        let mut env = HashMap::new();
        env.insert("MODELS_DIR", model.parent().unwrap().display().to_string());
        env.insert("MODEL", format!("/models/{}", model.file_name().unwrap().to_string_lossy()));
        env.insert("WORKERS", place_on.to_string());
        env.insert("LEASE_TTL", ttl_s.to_string());
        env.insert("MIGRATION_LIMIT", migration_limit.to_string());
        env.insert("ETCD_IMAGE", "shardserve-etcd:latest".into());
        env.insert("SHARDSERVE_IMAGE", "shardserve:latest".into());
        // Free host ports, so test clusters never clash with each other or a real one.
        env.insert("COORDINATOR_1_PORT", String::new());
        env.insert("COORDINATOR_2_PORT", String::new());
        env.insert("COMPOSE_FILE", root.join("deploy/compose.yaml").display().to_string());
        for (k, v) in settings {
            env.insert(*k, v.to_string());
        }
        let c = Compose { project: format!("shardserve-test-{}-{tag}", std::process::id()), env, cmd: compose_cmd() };
        c.compose(&["up", "-d", "--scale", &format!("worker={workers}")], Duration::from_secs(180));
        c
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.cmd[0]);
        cmd.args(&self.cmd[1..]).arg("-p").arg(&self.project).args(args).envs(&self.env);
        cmd
    }

    fn compose(&self, args: &[&str], within: Duration) -> String {
        run(&mut self.command(args), within)
    }

    /// The published gRPC address of a coordinator service, as a URL.
    fn url(&self, service: &str) -> String {
        let out = self.compose(&["port", service, "50051"], Duration::from_secs(30));
        let addr = out.trim().lines().next().unwrap_or_default().to_string();
        assert!(addr.starts_with("127.0.0.1:"), "{service} publishes {addr:?}");
        format!("http://{addr}")
    }

    /// Container ids of a service.
    fn containers(&self, service: &str) -> Vec<String> {
        self.compose(&["ps", "-q", service], Duration::from_secs(30))
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The private network the services share.
    fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    fn logs(&self) -> String {
        let out = bounded(&mut self.command(&["logs", "--no-color", "--tail", "60"]), Duration::from_secs(60));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- logs of {} ---\n{}", self.project, self.logs());
        }
        let _ = bounded(&mut self.command(&["down", "-v", "--remove-orphans", "-t", "5"]), Duration::from_secs(120));
    }
}

fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args), Duration::from_secs(90))
}

/// The container a worker id names: workers register as `<container hostname>-<pid>`, and a
/// container's hostname is the start of its id.
fn container_of(compose: &Compose, worker_id: &str) -> String {
    let host = worker_id.rsplit_once('-').map_or(worker_id, |(h, _)| h);
    compose
        .containers("worker")
        .into_iter()
        .find(|c| c.starts_with(host))
        .unwrap_or_else(|| panic!("no worker container has hostname {host}"))
}

/// Tolerates the moments a published port accepts but its process does not answer yet.
async fn try_status(url: &str) -> Option<pb::ClusterStatusResponse> {
    let call = async {
        let mut a = pb::admin_client::AdminClient::connect(url.to_string()).await.ok()?;
        a.cluster_status(pb::ClusterStatusRequest {}).await.ok().map(|r| r.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(5), call).await.ok().flatten()
}

/// Waits until the coordinator at `url` serves its model over `stages` stages.
async fn wait_serving(url: &str, stages: usize, within: Duration) -> pb::ClusterStatusResponse {
    let deadline = Instant::now() + within;
    loop {
        let s = try_status(url).await;
        if let Some(s) = &s {
            let m = s.models.first();
            if m.and_then(|m| m.model.as_ref()).is_some_and(|m| m.state == "ready") && m.is_some_and(|m| m.stages.len() == stages) {
                return s.clone();
            }
        }
        assert!(Instant::now() < deadline, "{url} did not serve over {stages} stages within {within:?}: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn worker_ids(url: &str) -> Vec<String> {
    let mut a = pb::admin_client::AdminClient::connect(url.to_string()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), a.list_workers(pb::ListWorkersRequest {})).await.unwrap().unwrap();
    r.into_inner().workers.into_iter().map(|w| w.id).collect()
}

async fn client(url: &str) -> Client {
    tokio::time::timeout(Duration::from_secs(10), Client::connect(url.to_string())).await.unwrap().unwrap()
}

/// Reads a stream to its end (60 s at most): the token ids, or the status it failed with.
async fn drain_stream(mut s: tonic::Streaming<pb::GenerateStreamResponse>) -> Result<Vec<u32>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut ids = Vec::new();
        while let Some(m) = s.message().await? {
            ids.extend(m.token_ids);
        }
        Ok(ids)
    })
    .await
    .expect("the stream did not finish within 60 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_gives_transformers_tokens_and_rides_out_an_etcd_restart() {
    let compose = Compose::up("tokens", 2, 2, 0, TTL);
    let (url1, url2) = (compose.url("coordinator-1"), compose.url("coordinator-2"));
    let before = wait_serving(&url1, 2, Duration::from_secs(120)).await;
    wait_serving(&url2, 2, Duration::from_secs(60)).await;
    let cases = reference_cases();
    // Through either coordinator's published port: the leader and the follower serve one plan.
    for (i, case) in cases.iter().enumerate() {
        let url = if i % 2 == 0 { &url1 } else { &url2 };
        let got = generate(&mut client(url).await, greedy(&case.prompt, case.new_ids.len() as i32)).await.unwrap();
        assert_eq!(got.token_ids, case.new_ids, "case {i} through {url}");
    }
    // Inside the cluster every link is mutual TLS (certificates from the `certs` service): a
    // worker's port, reached from the host over the Compose network, refuses a plaintext call
    // and logs why.
    let worker = compose.containers("worker")[0].clone();
    let ip = docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &worker]).trim().to_string();
    let plaintext = async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{ip}:50061")).unwrap().connect().await.map_err(|e| e.to_string())?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .map_err(|e| e.to_string())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), plaintext).await.unwrap_or_else(|_| Err("no answer".into()));
    assert!(answer.is_err(), "a worker answered plaintext: {answer:?}");
    wait_until("the worker logging the refused handshake", Duration::from_secs(10), || {
        let out = bounded(Command::new("docker").args(["logs", &worker]), Duration::from_secs(30));
        String::from_utf8_lossy(&out.stderr).contains("TLS handshake refused")
    });
    // etcd's container restarts (its data on a volume): nothing is lost — the same workers,
    // the same placement, the same tokens, and nothing restarted but etcd.
    let workers_before = {
        let mut w = worker_ids(&url1).await;
        w.sort();
        w
    };
    docker(&["restart", "-t", "5", &compose.containers("etcd")[0]]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = client(&url1).await;
    loop {
        match generate(&mut c, greedy(&cases[0].prompt, 8)).await {
            Ok(r) => {
                assert_eq!(r.token_ids, cases[0].new_ids[..8]);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no generation within 30 s of etcd's restart: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = wait_serving(&url1, 2, Duration::from_secs(30)).await;
    let stage_ids = |s: &pb::ClusterStatusResponse| s.models[0].stages.iter().map(|s| s.worker_id.clone()).collect::<Vec<_>>();
    assert_eq!(stage_ids(&after), stage_ids(&before), "the placement changed across etcd's restart");
    let mut workers_after = worker_ids(&url1).await;
    workers_after.sort();
    assert_eq!(workers_after, workers_before);
    for service in ["coordinator-1", "coordinator-2", "worker"] {
        for id in compose.containers(service) {
            let restarts = docker(&["inspect", "-f", "{{.RestartCount}}", &id]);
            assert_eq!(restarts.trim(), "0", "{service} container {id} restarted");
        }
    }
    let r = generate(&mut client(&url2).await, greedy(&cases[3].prompt, cases[3].new_ids.len() as i32)).await.unwrap();
    assert_eq!(r.token_ids, cases[3].new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_container_killed_mid_stream_is_migrated_around_with_the_undisturbed_tokens() {
    let compose = Compose::up("kill", 3, 2, 1, TTL);
    let url = compose.url("coordinator-1");
    let status = wait_serving(&url, 3, Duration::from_secs(120)).await;
    let url = if status.role == "leader" { url } else { compose.url("coordinator-2") };
    let mut c = client(&url).await;
    // Long enough (1,000 tokens, most of the model's 1,024 positions) to be running at the kill.
    let req = greedy("a", 1000);
    let undisturbed = generate(&mut c, req.clone()).await.unwrap();
    let victim = status.models[0].stages[1].worker_id.clone();
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
    docker(&["kill", &container_of(&compose, &victim)]);
    let mut ids = first.token_ids;
    ids.extend(drain_stream(s).await.unwrap_or_else(|e| panic!("the stream failed although migration was allowed: {e:?}")));
    assert_eq!(ids, undisturbed.token_ids, "a migrated request must give the undisturbed tokens");
    let after = wait_serving(&url, 2, Duration::from_secs(30)).await;
    assert!(!after.models[0].stages.iter().any(|s| s.worker_id == victim), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_loses_its_lease_and_rejoins_without_a_restart() {
    let compose = Compose::up("partition", 3, 3, 0, TTL);
    let url = compose.url("coordinator-1");
    let status = wait_serving(&url, 3, Duration::from_secs(120)).await;
    let victim = status.models[0].stages[2].worker_id.clone();
    let container = container_of(&compose, &victim);
    let started = docker(&["inspect", "-f", "{{.State.StartedAt}}", &container]);
    docker(&["network", "disconnect", &compose.network(), &container]);
    let cut = Instant::now();
    // The lease ends within 2 × TTL (plus etcd's own lease check, every 500 ms).
    let deadline = cut + Duration::from_secs(2 * TTL + 2);
    while worker_ids(&url).await.contains(&victim) {
        assert!(Instant::now() < deadline, "{victim} was still a member {:?} after the partition", cut.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lost = cut.elapsed();
    assert!(lost <= Duration::from_secs(2 * TTL + 1), "the lease ended only after {lost:?}");
    // The model is placed again over the other two, with the right tokens.
    let replanned = wait_serving(&url, 2, Duration::from_secs(30)).await;
    assert!(!replanned.models[0].stages.iter().any(|s| s.worker_id == victim));
    let cases = reference_cases();
    let r = generate(&mut client(&url).await, greedy(&cases[1].prompt, cases[1].new_ids.len() as i32)).await.unwrap();
    assert_eq!(r.token_ids, cases[1].new_ids);
    // Reconnected (under its hostname, as Compose had it), the same process registers again.
    let host = &container[..12];
    docker(&["network", "connect", "--alias", "worker", "--alias", host, &compose.network(), &container]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker_ids(&url).await.contains(&victim) {
        assert!(Instant::now() < deadline, "{victim} did not rejoin within 30 s of the reconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(docker(&["inspect", "-f", "{{.State.StartedAt}}", &container]), started, "the worker was restarted");
    assert_eq!(docker(&["inspect", "-f", "{{.RestartCount}}", &container]).trim(), "0");
    // Back in the fleet, it is placed on again.
    let back = wait_serving(&url, 3, Duration::from_secs(60)).await;
    assert!(back.models[0].stages.iter().any(|s| s.worker_id == victim), "{back:?}");
    let r = generate(&mut client(&url).await, greedy(&cases[2].prompt, cases[2].new_ids.len() as i32)).await.unwrap();
    assert_eq!(r.token_ids, cases[2].new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_coordinators_container_is_killed_the_other_leads_within_two_ttl() {
    let compose = Compose::up("leader", 2, 2, 0, TTL);
    let urls = [compose.url("coordinator-1"), compose.url("coordinator-2")];
    let mut roles = Vec::new();
    for u in &urls {
        roles.push(wait_serving(u, 2, Duration::from_secs(120)).await.role);
    }
    let leader = roles.iter().position(|r| r == "leader").unwrap_or_else(|| panic!("no leader: {roles:?}"));
    assert_eq!(roles[1 - leader], "follower", "{roles:?}");
    let services = ["coordinator-1", "coordinator-2"];
    docker(&["kill", &compose.containers(services[leader])[0]]);
    let killed = Instant::now();
    let other = &urls[1 - leader];
    let deadline = killed + Duration::from_secs(2 * TTL);
    while try_status(other).await.map(|s| s.role).as_deref() != Some("leader") {
        assert!(Instant::now() < deadline, "no takeover within 2 × TTL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cases = reference_cases();
    let r = generate(&mut client(other).await, greedy(&cases[4].prompt, cases[4].new_ids.len() as i32)).await.unwrap();
    assert_eq!(r.token_ids, cases[4].new_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_deregisters_at_once_and_requests_in_flight_finish() {
    // A 10 s lease: leaving within a few seconds shows the worker revoked it itself.
    let compose = Compose::up("sigterm", 3, 2, 1, 10);
    let url = compose.url("coordinator-1");
    let status = wait_serving(&url, 3, Duration::from_secs(120)).await;
    let url = if status.role == "leader" { url } else { compose.url("coordinator-2") };
    let victim = status.models[0].stages[1].worker_id.clone();
    let mut c = client(&url).await;
    let req = greedy("a", 1000);
    let undisturbed = generate(&mut c, req.clone()).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = c.generate_stream(req.clone()).await.unwrap().into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap();
        streams.push((first.token_ids, s));
    }
    // What `docker compose stop worker` does to each replica: SIGTERM, then a grace period.
    let container = container_of(&compose, &victim);
    let stop = {
        let container = container.clone();
        std::thread::spawn(move || docker(&["stop", "-t", "60", &container]))
    };
    let sent = Instant::now();
    let deadline = sent + Duration::from_secs(5);
    while worker_ids(&url).await.contains(&victim) {
        assert!(Instant::now() < deadline, "{victim} still a member 5 s after SIGTERM (its lease is 10 s)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (first, s) in streams {
        let mut ids = first;
        ids.extend(drain_stream(s).await.unwrap_or_else(|e| panic!("a request in flight failed: {e:?}")));
        assert_eq!(ids, undisturbed.token_ids);
    }
    stop.join().unwrap();
    assert_eq!(docker(&["inspect", "-f", "{{.State.ExitCode}}", &container]).trim(), "0", "the worker did not exit cleanly on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_serves_two_replicas_with_transformers_tokens() {
    let compose = Compose::up_with("replicas", 4, 4, 0, TTL, &[("REPLICAS", "2")]);
    let urls = [compose.url("coordinator-1"), compose.url("coordinator-2")];
    // The leader lays the replicas out: two of 2 workers each (the model of 4 split in two).
    let deadline = Instant::now() + Duration::from_secs(180);
    let (leader, replicas) = loop {
        let mut found = None;
        for url in &urls {
            if let Some(s) = try_status(url).await {
                let r = s.models.first().map(|m| m.replicas.clone()).unwrap_or_default();
                if s.role == "leader" && r.len() == 2 && r.iter().all(|r| r.state == "ready" && r.stages.len() == 2) {
                    found = Some((url.clone(), r));
                }
            }
        }
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < deadline, "no coordinator led two ready replicas of 2 stages within 180 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let workers = |r: &pb::ReplicaStatus| r.stages.iter().map(|s| s.worker_id.clone()).collect::<Vec<_>>();
    assert!(workers(&replicas[0]).iter().all(|w| !workers(&replicas[1]).contains(w)), "{replicas:?}");
    // The 8 prompts at once, through both coordinators: transformers' tokens from each.
    let cases = reference_cases();
    let mut tasks = Vec::new();
    for (i, case) in cases.iter().cloned().enumerate() {
        let url = urls[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let got = generate(&mut client(&url).await, greedy(&case.prompt, case.new_ids.len() as i32)).await;
            (i, url, case.new_ids, got)
        }));
    }
    for t in tasks {
        let (i, url, want, got) = tokio::time::timeout(Duration::from_secs(120), t).await.expect("no answer within 120 s").unwrap();
        assert_eq!(got.unwrap_or_else(|e| panic!("case {i} through {url}: {e:?}")).token_ids, want, "case {i} through {url}");
    }
    // Both replicas took some of them.
    let after = try_status(&leader).await.expect("the leader answers");
    let r = &after.models[0].replicas;
    assert!(r.len() == 2 && r.iter().all(|r| r.prefix_cache_queries > 0), "a replica took no request: {r:?}");
}
