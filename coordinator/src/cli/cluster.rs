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
    #[command(flatten)]
    pub serve: crate::flags::ServeArgs,
    /// Where the workers compute: cpu, cuda or cuda:N (every worker on the same device; a
    /// build with --features cuda).
    #[arg(long, env = "SHARDSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// CPU threads each worker's kernels use (default: the machine's cores divided among the
    /// workers, so stages on one machine do not contend for the same cores).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// The CA (PEM) `up` trusts for its own calls to a coordinator serving TLS (--tls-cert).
    #[arg(long, env = "SHARDSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
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
    /// The CA trusted for the coordinator's TLS, when it serves TLS.
    pub tls_ca: Option<PathBuf>,
    coordinator: Child,
    workers: Vec<Child>,
}

/// Where the sibling binaries live: next to this one, or `SHARDSERVE_BIN_DIR`.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("SHARDSERVE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?.parent().context("shardctl has no parent folder")?.to_path_buf(),
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
        if a.serve.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if a.serve.tp == 0 || !a.serve.workers.is_multiple_of(a.serve.tp) {
            bail!("--workers {} is not a multiple of --tp {} (workers = stages × tp)", a.serve.workers, a.serve.tp);
        }
        let cluster_tls = a.serve.cluster_tls.cluster_ca.is_some();
        if a.serve.auth.tls_cert.is_some() && a.serve.etcd.etcd.is_none() && !cluster_tls {
            bail!("--tls-cert needs --etcd or the cluster's certificates (--cluster-ca, --cluster-cert, --cluster-key): with membership embedded in the coordinator, the workers join it over its TLS port");
        }
        // With the cluster's certificates and embedded membership the port is TLS even without
        // --tls-cert: it then presents the coordinator's cluster certificate.
        let tls = a.serve.auth.tls_cert.is_some() || (cluster_tls && a.serve.etcd.etcd.is_none());
        let tls_ca = match (&a.tls_ca, a.serve.auth.tls_cert.is_some()) {
            (Some(ca), _) => Some(ca.clone()),
            (None, false) if tls => a.serve.cluster_tls.cluster_ca.clone(),
            (None, _) if tls => bail!("--tls-cert: give --tls-ca too, the CA `up` trusts for its own calls to the coordinator"),
            (None, _) => None,
        };
        let mut cmd = Command::new(bin_path("coordinator")?);
        a.serve.batch.validate()?;
        a.serve.http.validate()?;
        cmd.args(a.serve.to_args())
            .arg("--worker-bin")
            .arg(bin_path("worker")?)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let quiet = a.quiet && std::env::var_os("RUST_LOG").is_none();
        if quiet {
            cmd.env("RUST_LOG", "warn");
        }
        let mut coordinator = cmd.spawn().context("starting the coordinator")?;
        let addr = wait_line(&mut coordinator, "listening ", Duration::from_secs(60)).await.context("the coordinator did not start")?;
        let url = if tls { format!("https://{addr}") } else { crate::util::url(&addr) };
        let mut cluster = LocalCluster { url: url.clone(), key: a.serve.auth.own_key()?, tls_ca, coordinator, workers: Vec::new() };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = a.worker_threads.unwrap_or((cores / a.serve.workers).max(1));
        for i in 0..a.serve.workers {
            let mut cmd = Command::new(bin_path("worker")?);
            // candle's CPU kernels size their thread pool from this variable.
            if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                cmd.env("RAYON_NUM_THREADS", threads.to_string());
            }
            if quiet {
                cmd.env("RUST_LOG", "warn");
            }
            cmd.args(["--cluster", &a.serve.cluster, "--lease-ttl-s", &a.serve.lease_ttl_s.to_string()]).args(["--device", &a.device]);
            if let Some(m) = &a.serve.batch.metrics_listen {
                // Each worker on a free port of the same host.
                let host = m.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                cmd.args(["--metrics-listen", &format!("{host}:0")]);
            }
            cmd.args(a.serve.etcd.to_args());
            // The workers it starts present the same cluster certificate.
            cmd.args(a.serve.cluster_tls.to_args());
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

    /// Whether every replica laid out serves (true for models without replicas).
    async fn replicas_ready(&self) -> bool {
        let Ok(mut a) = super::admin_at(&self.url, self.key.as_deref(), self.tls_ca.as_deref()).await else { return false };
        let Ok(s) = a.cluster_status(pb::ClusterStatusRequest {}).await else { return false };
        s.into_inner().models.iter().all(|m| m.replicas.iter().all(|r| r.state == "ready"))
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.coordinator.try_wait()? {
                bail!("the coordinator exited ({status}) before the model was ready");
            }
            if let Ok(mut c) = super::inference_at(&self.url, self.key.as_deref(), self.tls_ca.as_deref()).await {
                if let Ok(r) = c.list_models(pb::ListModelsRequest {}).await {
                    let models = r.into_inner().models;
                    if !models.is_empty() && models.iter().all(|m| m.state == "ready") && self.replicas_ready().await {
                        return Ok(());
                    }
                    if let Ok(mut a) = super::admin_at(&self.url, self.key.as_deref(), self.tls_ca.as_deref()).await {
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
        _ = crate::util::shutdown_signal() => bail!("interrupted before the cluster was ready"),
    };
    println!("ready {}", cluster.url);
    let result = tokio::select! {
        _ = crate::util::shutdown_signal() => Ok(()),
        r = cluster.coordinator_exit() => r,
    };
    cluster.stop().await;
    result
}
