//! The integration-test harness: starts real `shardctl up` clusters (a coordinator and worker
//! processes on loopback) from the workspace's built binaries, talks to them over gRPC, and
//! kills everything it started when dropped. Every wait is bounded.

use shardserve_proto::v1 as pb;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod certs;
mod etcd;
mod http;
mod procs;
pub use etcd::{Etcd, EtcdSecurity};
pub use http::{http_get, http_post, http_request, metric};
pub use procs::{etcd_coordinator, migrating_cluster, spare_worker, spawn_coordinator, worker_at, worker_until_it_logs, Proc};

/// The workspace's `target/<profile>` folder, where `cargo build --bins` put the binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHARDSERVE_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// A built binary; panics with the command that builds it when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} is missing: run `cargo build --bins` before the integration tests", p.display());
    p
}

/// The fixtures folder (`tests/fixtures/`: transformers' and accelerate's own outputs;
/// `SHARDSERVE_FIXTURES` points elsewhere).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("SHARDSERVE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// The tiny Qwen3 checkpoint transformers' reference outputs were made with.
pub fn reference_model() -> PathBuf {
    fixtures().join("hf-reference/tiny-qwen3")
}

/// Up to `n` greedy tokens of `shard` (a whole model) after `prompt`, run in this process,
/// stopping after an end-of-sequence token as the server does.
pub fn greedy_in_process(shard: &shardserve::model::Shard, prompt: &[u32], n: usize) -> Vec<u32> {
    use shardserve::model::{StageInput, StageOutput};
    let eos = &shard.config().eos_token_ids;
    let mut pool = shard.new_pool(64, 16).unwrap();
    let (mut out, mut feed) = (Vec::new(), prompt.to_vec());
    for _ in 0..n {
        let StageOutput::Logits(l) = shard.forward(&mut pool, 0, StageInput::Tokens(&feed)).unwrap() else { panic!("no logits") };
        let t = shardserve::sampling::argmax(&l.to_vec1::<f32>().unwrap());
        out.push(t);
        if eos.contains(&t) {
            break;
        }
        feed = vec![t];
    }
    out
}

/// One case of the transformers reference.
#[derive(Debug, Clone)]
pub struct ReferenceCase {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    pub text: String,
}

/// The 8 cases of `tiny-qwen3.reference.json`.
pub fn reference_cases() -> Vec<ReferenceCase> {
    let path = fixtures().join("hf-reference/tiny-qwen3.reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| ReferenceCase {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: serde_json::from_value(c["input_ids"].clone()).unwrap(),
            new_ids: serde_json::from_value(c["new_ids"].clone()).unwrap(),
            text: c["text"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// A local cluster started through `shardctl up`.
pub struct Cluster {
    child: Child,
    pub url: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Builds a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    model: String,
    workers: usize,
    envs: Vec<(String, String)>,
    args: Vec<String>,
    ready_within: Duration,
}

impl Cluster {
    /// A cluster serving `model` (a folder or Hub id).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(model: impl AsRef<Path>) -> ClusterBuilder {
        ClusterBuilder {
            model: model.as_ref().display().to_string(),
            workers: 1,
            envs: Vec::new(),
            args: Vec::new(),
            ready_within: Duration::from_secs(120),
        }
    }

    /// What the cluster's processes wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// A gRPC client of the coordinator's Inference API.
    pub async fn client(&self) -> pb::inference_client::InferenceClient<tonic::transport::Channel> {
        tokio::time::timeout(Duration::from_secs(10), pb::inference_client::InferenceClient::connect(self.url.clone()))
            .await
            .expect("connect timed out")
            .expect("connect to the coordinator")
    }

    /// A gRPC client of the coordinator's Admin API.
    pub async fn admin(&self) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
        tokio::time::timeout(Duration::from_secs(10), pb::admin_client::AdminClient::connect(self.url.clone()))
            .await
            .expect("connect timed out")
            .expect("connect to the coordinator")
    }

    /// The fleet as `shardctl workers --json` prints it.
    pub fn workers_json(&self) -> serde_json::Value {
        let out = run_shardctl(&["workers", "--json", "--coordinator", &self.url], &[], Duration::from_secs(20));
        assert!(out.status.success(), "shardctl workers failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("workers --json is not JSON ({e}): {}", out.stdout))
    }

    /// The worker serving pipeline stage `stage`: (id, pid).
    pub async fn stage_worker(&self, stage: u32) -> (String, u32) {
        let status = cluster_status(&self.url).await;
        let st = status.models[0].stages.iter().find(|s| s.stage == stage).expect("stage in placement").clone();
        let workers = self.workers_json();
        let pid = workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == st.worker_id)
            .and_then(|w| w["pid"].as_u64())
            .expect("worker pid") as u32;
        (st.worker_id, pid)
    }

    /// The stats of the worker at `address` (a stage); panics when it does not answer within
    /// 10 s.
    pub async fn worker_stats(address: &str) -> pb::StatsResponse {
        let call = async {
            let mut c = pb::worker_client::WorkerClient::connect(format!("http://{address}")).await.expect("connect worker");
            c.stats(pb::StatsRequest {}).await.expect("stats").into_inner()
        };
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("worker at {address} did not answer Stats within 10 s"))
    }

    /// Where the coordinator serves metrics (started with `--metrics-listen`).
    pub async fn metrics_address(&self) -> String {
        let s = cluster_status(&self.url).await;
        assert!(!s.metrics_address.is_empty(), "the coordinator serves no metrics (start it with --metrics-listen)");
        s.metrics_address
    }

    /// The addresses of every worker of the first model's placement, every rank included.
    pub async fn stage_addresses(&self) -> Vec<String> {
        let status = cluster_status(&self.url).await;
        let mut admin = self.admin().await;
        let listed = tokio::time::timeout(Duration::from_secs(10), admin.list_workers(pb::ListWorkersRequest {}));
        let workers = listed.await.expect("ListWorkers did not answer within 10 s").unwrap().into_inner().workers;
        let mut out = Vec::new();
        for st in &status.models[0].stages {
            for id in std::iter::once(&st.worker_id).chain(&st.ranks) {
                let w = workers.iter().find(|w| &w.id == id).unwrap_or_else(|| panic!("worker {id} is not listed"));
                out.push(w.address.clone());
            }
        }
        out
    }

    /// Stops the cluster as an operator would (SIGTERM) and waits, bounded, for it to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "shardctl up did not exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process group id (every process the cluster started is in it).
    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Everything `up` started shares its process group.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid()), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl ClusterBuilder {
    /// Worker processes (pipeline stages).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// An environment variable for every process of the cluster.
    pub fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Self {
        self.envs.push((k.to_string(), v.as_ref().to_string_lossy().into_owned()));
        self
    }

    /// Extra `shardctl up` arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(bin("shardctl"));
        cmd.args(["up", "--model", &self.model, "--listen", "127.0.0.1:0", "--workers", &self.workers.to_string()])
            .args(&self.args)
            .env("SHARDSERVE_BIN_DIR", bin_dir())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// Starts the cluster and waits for `ready URL`; panics with stderr if it does not come.
    pub fn start(self) -> Cluster {
        match self.try_start() {
            Ok(c) => c,
            Err((why, stderr)) => panic!("cluster did not start: {why}\n--- stderr ---\n{stderr}"),
        }
    }

    /// Starts the cluster; on failure returns why and what it wrote to stderr.
    pub fn try_start(self) -> Result<Cluster, (String, String)> {
        let mut child = self.command().spawn().expect("spawn shardctl up");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().unwrap();
        let (stderr_closed, stderr_done) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
            let _ = stderr_closed.send(());
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ready ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let deadline = Instant::now() + self.ready_within;
        loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(50)) {
                return Ok(Cluster { child, url, stderr });
            }
            if let Some(status) = child.try_wait().unwrap() {
                // What it wrote last is read once its stderr closes (bounded: a stray process
                // may hold it open).
                let _ = stderr_done.recv_timeout(Duration::from_secs(5));
                let e = stderr.lock().unwrap().clone();
                return Err((format!("shardctl up exited with {status}"), e));
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                let e = stderr.lock().unwrap().clone();
                return Err((format!("no `ready` line within {:?}", self.ready_within), e));
            }
        }
    }
}

/// What a finished `shardctl` invocation printed.
#[derive(Debug)]
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Asserts that operators see the first model's quantization as `want`: in `shardctl status
/// --json` (`"quantize"`) and in `shardctl models list` (`quantize=…`).
pub fn assert_quantization_shown(url: &str, want: &str) {
    let out = run_shardctl(&["status", "--json", "--coordinator", url], &[], Duration::from_secs(20));
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(status["models"][0]["quantize"], want, "{status}");
    let out = run_shardctl(&["models", "list", "--coordinator", url], &[], Duration::from_secs(20));
    assert!(out.status.success() && out.stdout.contains(&format!("quantize={want}")), "{}", out.stdout);
}

/// Runs `shardctl ARGS` to completion (bounded), with extra environment.
pub fn run_shardctl(args: &[&str], envs: &[(&str, &str)], within: Duration) -> Output {
    let mut cmd = Command::new(bin("shardctl"));
    cmd.args(args).env("SHARDSERVE_BIN_DIR", bin_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = bounded(&mut cmd, within);
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `cmd` to its end in a process group of its own (stdin closed, stdout and stderr
/// captured), or kills the group past `within` and panics.
pub fn bounded(cmd: &mut Command, within: Duration) -> std::process::Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{shown}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            panic!("{shown} did not finish within {within:?}");
        }
    }
}

/// Whether a process is still alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}

/// Waits (bounded) until `cond` holds; panics with `what` otherwise.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A greedy request for `prompt`.
pub fn greedy(prompt: &str, max_new_tokens: i32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.to_string(),
        max_new_tokens: Some(max_new_tokens),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

/// Copies a model folder (following symlinks) so a test can change it.
pub fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Kills `pid` (SIGKILL) while `stream` is running and returns the status the stream ends
/// with and how long after the kill it came; panics if the stream finishes normally or no
/// error comes within 10 s.
pub async fn kill_during_stream(stream: &mut tonic::Streaming<pb::GenerateStreamResponse>, pid: u32) -> (tonic::Status, Duration) {
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("no first message within 30 s")
        .expect("stream failed before the kill");
    assert!(first.is_some(), "the stream ended before the kill");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).expect("kill");
    let killed = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream finished normally although process {pid} was killed"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("no error within 10 s of the kill");
    (err, killed.elapsed())
}

/// A name no other test uses, for etcd key prefixes.
pub fn unique_cluster(tag: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// The coordinator's `ClusterStatus`.
pub async fn cluster_status(url: &str) -> pb::ClusterStatusResponse {
    let mut a = tokio::time::timeout(Duration::from_secs(10), pb::admin_client::AdminClient::connect(url.to_string()))
        .await
        .expect("connect timed out")
        .expect("connect");
    tokio::time::timeout(Duration::from_secs(10), a.cluster_status(pb::ClusterStatusRequest {}))
        .await
        .expect("ClusterStatus did not answer within 10 s")
        .expect("ClusterStatus")
        .into_inner()
}

/// A client of the coordinator's Inference API.
pub type Client = pb::inference_client::InferenceClient<tonic::transport::Channel>;

/// `Generate`, bounded: panics when no answer comes within 60 s.
pub async fn generate(c: &mut Client, req: pb::GenerateRequest) -> Result<pb::GenerateResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(60), c.generate(req))
        .await
        .expect("Generate did not answer within 60 s")
        .map(|r| r.into_inner())
}

/// A seeded sampling request (temperature, top-p and repetition penalty all in play).
pub fn sampled(prompt: &str, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(20),
        sampling: Some(pb::SamplingParams {
            temperature: Some(1.3),
            top_k: Some(0),
            top_p: Some(0.97),
            repetition_penalty: Some(1.1),
            seed: Some(seed),
        }),
        ..Default::default()
    }
}

/// The placement of the coordinator's (first) model.
pub async fn placement(cluster: &Cluster) -> Vec<pb::StageInfo> {
    cluster_status(&cluster.url).await.models[0].stages.clone()
}

/// Waits (5 s at most) until every worker at `addresses` holds no sequence and no KV block.
pub async fn wait_no_sequences(addresses: &[String]) {
    for addr in addresses {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = Cluster::worker_stats(addr).await;
            if st.sequences == 0 && st.kv_bytes == 0 && st.kv_blocks_used == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "stage at {addr} still holds {} sequences ({} KV blocks, {} bytes) after 5 s",
                st.sequences,
                st.kv_blocks_used,
                st.kv_bytes
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A venv with the official `openai` package and `jsonschema` (made once per target folder).
pub fn python_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/openai-venv");
    let python = venv.join("bin/python");
    let ok =
        |py: &Path| Command::new(py).args(["-c", "import openai, jsonschema"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok(&python) {
        let out = bounded(Command::new("python3").args(["-m", "venv"]).arg(&venv), Duration::from_secs(120));
        assert!(out.status.success(), "python3 -m venv: {}", String::from_utf8_lossy(&out.stderr));
        let out = bounded(
            Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai>=1.50", "jsonschema>=4"]),
            Duration::from_secs(300),
        );
        assert!(out.status.success(), "pip install openai jsonschema: {}", String::from_utf8_lossy(&out.stderr));
    }
    python
}

/// The reference model with the Qwen3 chat template the chat fixtures were rendered with.
pub fn chat_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_model(&reference_model(), dir.path());
    std::fs::copy(fixtures().join("chat/qwen3.jinja"), dir.path().join("chat_template.jinja")).unwrap();
    dir
}
