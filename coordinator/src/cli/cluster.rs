//! `shardctl up`: a whole local cluster — a coordinator and N worker processes — in the
//! foreground, stopped together on SIGTERM/SIGINT.

use anyhow::{bail, Context};
use shardserve_proto::v1 as pb;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Arguments of `shardctl up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// The model: a local folder or a Hugging Face Hub id (ORG/NAME).
    #[arg(long, env = "SHARDSERVE_MODEL")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Worker processes (= pipeline stages × --tp); each holds one stage, or one rank of one.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Tensor-parallel ranks per stage: each stage is a group of this many workers that split
    /// every layer and all-reduce between them.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Workers make seeded random weights of the model's shapes instead of reading its
    /// checkpoint (for benchmarks; the folder needs only config and tokenizer files).
    #[arg(long)]
    pub random_weights: bool,
    /// etcd endpoints for membership (without it, membership is embedded in the coordinator).
    #[arg(long, env = "SHARDSERVE_ETCD")]
    pub etcd: Option<String>,
    /// The cluster's name (its etcd keys live under /shardserve/<cluster>/).
    #[arg(long, env = "SHARDSERVE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Address the coordinator serves on (port 0 picks a free one).
    #[arg(long, env = "SHARDSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Where the workers compute: cpu, cuda or cuda:N (every worker on the same device; a
    /// build with --features cuda).
    #[arg(long, env = "SHARDSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: auto (the checkpoint's on GPU, f32 on CPU), f32, bf16 or f16.
    #[arg(long, value_enum, default_value_t = shardserve::dtype::Dtype::Auto)]
    pub dtype: shardserve::dtype::Dtype,
    /// Cap on prompt + generated tokens.
    #[arg(long)]
    pub max_total_tokens: Option<usize>,
    /// Seconds a worker's lease lasts without a keep-alive.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl_s: u64,
    /// Requests per model (running or waiting) before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    #[command(flatten)]
    pub batch: crate::flags::BatchArgs,
    #[command(flatten)]
    pub http: crate::flags::HttpArgs,
    #[command(flatten)]
    pub auth: crate::flags::AuthArgs,
    /// Placement over the workers, as transformers' device_map: auto, balanced,
    /// balanced_low_0 or sequential.
    #[arg(long, default_value = "auto")]
    pub strategy: String,
    /// Weight budget per worker by index, e.g. 0=2GiB,1=2GiB (default: free memory less --kv-reserve).
    #[arg(long)]
    pub max_memory: Option<String>,
    /// An explicit placement: a JSON file of Hugging Face module names → worker index or id.
    #[arg(long)]
    pub device_map: Option<PathBuf>,
    /// Share of each worker's free memory kept for KV caches and activations.
    #[arg(long, default_value_t = 0.1)]
    pub kv_reserve: f64,
    /// Most prompt tokens per pipeline step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Times a request may move to a new placement when a stage under it dies (0: fail at once).
    #[arg(long, default_value_t = 0)]
    pub migration_limit: usize,
    /// Seconds a new request waits for a re-plan after a stage was lost, before UNAVAILABLE.
    #[arg(long, default_value_t = 10)]
    pub replan_wait_s: u64,
    /// CPU threads each worker's kernels use (default: the machine's cores divided among the
    /// workers, so stages on one machine do not contend for the same cores).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Seconds to wait for the model to load before giving up.
    #[arg(long, default_value_t = 600)]
    pub ready_timeout_s: u64,
    /// Only warnings and errors from the processes (unless RUST_LOG says otherwise).
    #[arg(skip)]
    pub quiet: bool,
}

/// A running local cluster; everything it started stops when it is dropped.
pub struct LocalCluster {
    pub url: String,
    /// The key this cluster's coordinator asks for, when it asks for one.
    pub key: Option<String>,
    coordinator: Child,
    workers: Vec<Child>,
}

/// Where the sibling binaries live: next to this one, or `SHARDSERVE_BIN_DIR`.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("SHARDSERVE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .context("shardctl has no parent folder")?
            .to_path_buf(),
    };
    let p = dir.join(name);
    if !p.is_file() {
        bail!("{} not found (build it with `cargo build --bins`, or set SHARDSERVE_BIN_DIR)", p.display());
    }
    Ok(p)
}

/// Reads lines of a child's stdout until one starts with `prefix`; returns the rest of it.
async fn wait_line(child: &mut Child, prefix: &str, within: Duration) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("child stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(prefix) {
                return anyhow::Ok(Some(rest.trim().to_string()));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("no `{prefix}` line within {within:?}"))??;
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found.with_context(|| format!("exited before printing `{prefix}`"))
}

impl LocalCluster {
    /// Starts the coordinator and workers and waits until the model serves.
    pub async fn start(a: &UpArgs) -> anyhow::Result<Self> {
        if a.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if a.tp == 0 || !a.workers.is_multiple_of(a.tp) {
            bail!("--workers {} is not a multiple of --tp {} (workers = stages × tp)", a.workers, a.tp);
        }
        let mut cmd = Command::new(bin_path("coordinator")?);
        a.batch.validate()?;
        a.http.validate()?;
        cmd.args(["--model", &a.model, "--listen", &a.listen, "--dtype", &a.dtype.to_string()])
            .args(a.batch.to_args())
            .args(a.http.to_args())
            .args(a.auth.to_args())
            .args(["--workers", &a.workers.to_string(), "--lease-ttl-s", &a.lease_ttl_s.to_string()])
            .args(["--tp", &a.tp.to_string()])
            .args(a.random_weights.then_some("--random-weights"))
            .args(["--max-concurrent-requests", &a.max_concurrent_requests.to_string()])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(r) = &a.revision {
            cmd.args(["--revision", r]);
        }
        if let Some(m) = a.max_total_tokens {
            cmd.args(["--max-total-tokens", &m.to_string()]);
        }
        cmd.args(["--strategy", &a.strategy, "--kv-reserve", &a.kv_reserve.to_string()])
            .args(["--prefill-chunk", &a.prefill_chunk.to_string()]);
        if let Some(m) = &a.max_memory {
            cmd.args(["--max-memory", m]);
        }
        if let Some(m) = &a.device_map {
            cmd.arg("--device-map").arg(m);
        }
        cmd.args(["--cluster", &a.cluster, "--migration-limit", &a.migration_limit.to_string()])
            .args(["--replan-wait-s", &a.replan_wait_s.to_string()])
            .arg("--worker-bin")
            .arg(bin_path("worker")?);
        if let Some(e) = &a.etcd {
            cmd.args(["--etcd", e]);
        }
        let quiet = a.quiet && std::env::var_os("RUST_LOG").is_none();
        if quiet {
            cmd.env("RUST_LOG", "warn");
        }
        let mut coordinator = cmd.spawn().context("starting the coordinator")?;
        let addr = wait_line(&mut coordinator, "listening ", Duration::from_secs(60))
            .await
            .context("the coordinator did not start")?;
        let url = crate::url(&addr);
        let mut cluster = LocalCluster {
            url: url.clone(),
            key: a.auth.own_key()?,
            coordinator,
            workers: Vec::new(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = a.worker_threads.unwrap_or((cores / a.workers).max(1));
        for i in 0..a.workers {
            let mut cmd = Command::new(bin_path("worker")?);
            // candle's CPU kernels size their thread pool from this variable.
            if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                cmd.env("RAYON_NUM_THREADS", threads.to_string());
            }
            if quiet {
                cmd.env("RUST_LOG", "warn");
            }
            cmd.args(["--cluster", &a.cluster, "--lease-ttl-s", &a.lease_ttl_s.to_string()])
                .args(["--device", &a.device]);
            if let Some(m) = &a.batch.metrics_listen {
                // Each worker on a free port of the same host.
                let host = m.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                cmd.args(["--metrics-listen", &format!("{host}:0")]);
            }
            if let Some(e) = &a.etcd {
                cmd.args(["--etcd", e]);
            }
            let child = cmd
                .args(["--coordinator", &url, "--listen", "127.0.0.1:0"])
                .args(["--id", &format!("worker-{i}-{}", std::process::id())])
                .stdout(Stdio::null())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker")?;
            cluster.workers.push(child);
        }
        cluster.wait_ready(Duration::from_secs(a.ready_timeout_s)).await?;
        Ok(cluster)
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.coordinator.try_wait()? {
                bail!("the coordinator exited ({status}) before the model was ready");
            }
            if let Ok(mut c) = super::inference_at(&self.url, self.key.as_deref()).await {
                if let Ok(r) = c.list_models(pb::ListModelsRequest {}).await {
                    let models = r.into_inner().models;
                    if !models.is_empty() && models.iter().all(|m| m.state == "ready") {
                        return Ok(());
                    }
                    if let Ok(mut a) = super::admin_at(&self.url, self.key.as_deref()).await {
                        if let Ok(s) = a.cluster_status(pb::ClusterStatusRequest {}).await {
                            last = s.into_inner().models.iter().map(|m| m.detail.clone()).collect::<Vec<_>>().join("; ");
                        }
                    }
                    // Before the first success, "unavailable" means loading failed for good.
                    if models.iter().any(|m| m.state == "unavailable") {
                        bail!("the model cannot be loaded: {last}");
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("the model was not ready within {within:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops everything: SIGTERM, then SIGKILL for what is still running after 10 s.
    pub async fn stop(mut self) {
        let mut all: Vec<&mut Child> = self.workers.iter_mut().collect();
        all.push(&mut self.coordinator);
        for c in &all {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
        }
        for c in all {
            if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }

    /// Waits until the coordinator exits (an error: it should not).
    async fn coordinator_exit(&mut self) -> anyhow::Result<()> {
        let status = self.coordinator.wait().await?;
        bail!("the coordinator exited unexpectedly ({status})")
    }
}

/// `shardctl up`.
pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    let mut cluster = tokio::select! {
        c = LocalCluster::start(&a) => c?,
        _ = crate::shutdown_signal() => bail!("interrupted before the cluster was ready"),
    };
    println!("ready {}", cluster.url);
    let result = tokio::select! {
        _ = crate::shutdown_signal() => Ok(()),
        r = cluster.coordinator_exit() => r,
    };
    cluster.stop().await;
    result
}
