//! `coordinator`: plans a model over the fleet and serves the client and admin APIs.

use clap::Parser;
use shardserve_coordinator::{engine::EngineConfig, run, CoordinatorConfig};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The shardserve coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Args {
    /// The model: a local folder or a Hugging Face Hub id (ORG/NAME).
    #[arg(long, env = "SHARDSERVE_MODEL")]
    model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, env = "SHARDSERVE_REVISION")]
    revision: Option<String>,
    /// Name clients use for the model (default: as given by --model).
    #[arg(long, env = "SHARDSERVE_MODEL_NAME")]
    name: Option<String>,
    /// Address to serve on (port 0 picks a free one; printed as `listening ADDR`).
    #[arg(long, env = "SHARDSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Compute dtype: auto (checkpoint's on GPU, f32 on CPU), f32, bf16 or f16.
    #[arg(long, env = "SHARDSERVE_DTYPE", value_enum, default_value_t = shardserve::dtype::Dtype::Auto)]
    dtype: shardserve::dtype::Dtype,
    /// Workers (pipeline stages) to spread the model over; waits until that many joined.
    #[arg(long, env = "SHARDSERVE_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Tensor-parallel ranks per pipeline stage: each stage is a group of this many workers
    /// that split every layer (--workers = stages × --tp).
    #[arg(long, env = "SHARDSERVE_TP", default_value_t = 1)]
    tp: usize,
    /// Workers make seeded random weights of the model's shapes instead of reading its
    /// checkpoint (benchmarks of shapes whose weights are not on disk).
    #[arg(long, env = "SHARDSERVE_RANDOM_WEIGHTS")]
    random_weights: bool,
    /// Cap on prompt + generated tokens (default: the model's max_position_embeddings).
    #[arg(long, env = "SHARDSERVE_MAX_TOTAL_TOKENS")]
    max_total_tokens: Option<usize>,
    /// Requests per model (running or waiting) before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SHARDSERVE_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    max_concurrent_requests: usize,
    #[command(flatten)]
    batch: shardserve_coordinator::flags::BatchArgs,
    #[command(flatten)]
    http: shardserve_coordinator::flags::HttpArgs,
    #[command(flatten)]
    auth: shardserve_coordinator::flags::AuthArgs,
    /// Seconds a worker's lease lasts without a keep-alive.
    #[arg(long, env = "SHARDSERVE_LEASE_TTL", default_value_t = 10)]
    lease_ttl_s: u64,
    /// Seconds one pipeline step may take before the request fails.
    #[arg(long, env = "SHARDSERVE_STEP_TIMEOUT", default_value_t = 300)]
    step_timeout_s: u64,
    /// Placement strategy over the workers, as transformers' device_map: auto, balanced,
    /// balanced_low_0 or sequential.
    #[arg(long, env = "SHARDSERVE_STRATEGY", default_value = "auto")]
    strategy: String,
    /// Weight budget per worker by index in join order, e.g. 0=2GiB,1=2GiB (default: each
    /// worker's free memory less --kv-reserve).
    #[arg(long, env = "SHARDSERVE_MAX_MEMORY")]
    max_memory: Option<String>,
    /// An explicit placement: a JSON file of Hugging Face module names → worker index or id.
    #[arg(long, env = "SHARDSERVE_DEVICE_MAP")]
    device_map: Option<std::path::PathBuf>,
    /// Share of each worker's free memory kept for KV caches and activations.
    #[arg(long, env = "SHARDSERVE_KV_RESERVE", default_value_t = 0.1)]
    kv_reserve: f64,
    /// Most prompt tokens per pipeline step; longer prompts are prefilled in chunks.
    #[arg(long, env = "SHARDSERVE_PREFILL_CHUNK", default_value_t = 512)]
    prefill_chunk: usize,
    /// etcd endpoints (comma-separated) holding membership; without it, membership is embedded.
    #[arg(long, env = "SHARDSERVE_ETCD")]
    etcd: Option<String>,
    /// The cluster's name (its etcd keys live under /shardserve/<cluster>/).
    #[arg(long, env = "SHARDSERVE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Times a request may move to a new placement when a stage under it dies, keeping the
    /// tokens it already has (0: it fails with UNAVAILABLE at once).
    #[arg(long, env = "SHARDSERVE_MIGRATION_LIMIT", default_value_t = 0)]
    migration_limit: usize,
    /// Seconds a migrating request waits for the new placement.
    #[arg(long, env = "SHARDSERVE_MIGRATION_WAIT", default_value_t = 60)]
    migration_wait_s: u64,
    /// Seconds a new request waits for the model to be placed again after a stage was lost,
    /// before it gets UNAVAILABLE.
    #[arg(long, env = "SHARDSERVE_REPLAN_WAIT", default_value_t = 10)]
    replan_wait_s: u64,
    /// A `worker` binary this coordinator may start on this machine when asked to scale up
    /// (`shardctl scale`); without it, scaling is refused.
    #[arg(long, env = "SHARDSERVE_WORKER_BIN")]
    worker_bin: Option<std::path::PathBuf>,
    /// Where `shardctl scale` gets workers: local processes (--worker-bin), or the worker
    /// StatefulSet of the Kubernetes cluster this coordinator runs in (--statefulset).
    #[arg(long, env = "SHARDSERVE_FLEET", value_enum, default_value_t = Fleet::Local)]
    fleet: Fleet,
    /// The worker StatefulSet to scale with --fleet kubernetes (its pods register under their
    /// pod names).
    #[arg(long, env = "SHARDSERVE_STATEFULSET", required_if_eq("fleet", "kubernetes"))]
    statefulset: Option<String>,
    /// The StatefulSet's namespace (default: this pod's own).
    #[arg(long, env = "SHARDSERVE_NAMESPACE")]
    namespace: Option<String>,
}

/// Where scaled workers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fleet {
    /// Worker processes on this machine.
    Local,
    /// A Kubernetes StatefulSet, through its scale subresource (in-cluster configuration).
    Kubernetes,
}

impl TryFrom<Args> for CoordinatorConfig {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Self> {
        anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(a.tp >= 1, "--tp must be at least 1");
        anyhow::ensure!(
            a.workers.is_multiple_of(a.tp),
            "--workers {} is not a multiple of --tp {} (workers = stages × tp)",
            a.workers,
            a.tp
        );
        anyhow::ensure!(a.max_concurrent_requests >= 1, "--max-concurrent-requests must be at least 1");
        anyhow::ensure!(a.lease_ttl_s >= 1, "--lease-ttl-s must be at least 1");
        if let Some(m) = a.max_total_tokens {
            anyhow::ensure!(m >= 2, "--max-total-tokens must be at least 2");
        }
        anyhow::ensure!((0.0..1.0).contains(&a.kv_reserve), "--kv-reserve must be in [0, 1), got {}", a.kv_reserve);
        anyhow::ensure!(a.prefill_chunk >= 1, "--prefill-chunk must be at least 1");
        let kv_memory = a.batch.validate()?;
        anyhow::ensure!(
            !a.cluster.is_empty() && a.cluster.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "--cluster {:?}: use letters, digits, '-', '_' or '.'",
            a.cluster
        );
        let strategy: shardserve::placement::Strategy = a.strategy.parse()?;
        let max_memory = match &a.max_memory {
            None => None,
            Some(s) => {
                let mm = shardserve::placement::parse_max_memory(s)?;
                if let Some((d, _)) = mm.iter().find(|(d, _)| !matches!(d, shardserve::placement::Device::Index(_))) {
                    anyhow::bail!("--max-memory {s}: {d} is not a worker; name workers by index (0=2GiB,1=2GiB)");
                }
                Some(mm)
            }
        };
        let device_map = match &a.device_map {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--device-map {}: {e}", p.display()))?;
                Some(serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--device-map {}: not JSON: {e}", p.display()))?)
            }
        };
        Ok(CoordinatorConfig {
            engine: EngineConfig {
                name: a.name.unwrap_or_else(|| a.model.clone()),
                model: a.model,
                revision: a.revision,
                dtype: a.dtype,
                workers: a.workers,
                tp: a.tp,
                random_weights: a.random_weights,
                max_total_tokens: a.max_total_tokens,
                max_concurrent_requests: a.max_concurrent_requests,
                max_batch_size: a.batch.max_batch_size,
                max_batch_tokens: a.batch.max_batch_tokens,
                max_waiting: a.batch.max_waiting,
                kv_memory,
                kv_block_size: a.batch.kv_block_size,
                max_buffered_tokens: a.batch.max_buffered_tokens,
                step_timeout: Duration::from_secs(a.step_timeout_s),
                strategy,
                max_memory,
                device_map,
                reserve: a.kv_reserve,
                prefill_chunk: a.prefill_chunk,
                migration_limit: a.migration_limit,
                migration_wait: Duration::from_secs(a.migration_wait_s),
                lease_ttl: Duration::from_secs(a.lease_ttl_s),
                replan_wait: Duration::from_secs(a.replan_wait_s),
            },
            lease_ttl: Duration::from_secs(a.lease_ttl_s),
            metrics_listen: a.batch.metrics_listen.clone(),
            http_address: None,
            http_limits: a.http.validate()?,
            auth: a.auth.load()?,
            reflection: !a.auth.no_reflection,
            etcd: a.etcd.as_deref().map(shardserve::membership::endpoints).unwrap_or_default(),
            kubernetes: match (a.fleet, a.statefulset) {
                (Fleet::Kubernetes, Some(name)) => {
                    Some(shardserve_coordinator::kubernetes::StatefulSetScaler::in_cluster(name, a.namespace)?)
                }
                _ => None,
            },
            local_workers: a.worker_bin.map(|bin| shardserve_coordinator::scale::LocalWorkers {
                bin,
                args: vec!["--cluster".into(), a.cluster.clone(), "--lease-ttl-s".into(), a.lease_ttl_s.to_string()],
            }),
            cluster: a.cluster,
        })
    }
}

#[tokio::main]
async fn main() {
    shardserve_coordinator::init_tracing();
    let args = Args::parse();
    let listen = args.listen.clone();
    let http_listen = args.http.http_listen.clone();
    let result = async {
        let mut config = CoordinatorConfig::try_from(args)?;
        let c = config.engine.clone();
        tokio::task::spawn_blocking(move || shardserve_coordinator::engine::preflight(&c)).await??;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let bound = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        if let Some(m) = config.metrics_listen.clone() {
            let at = shardserve::telemetry::start(&m, shutdown.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {m}: {e}"))?;
            config.metrics_listen = Some(at.to_string());
            println!("metrics {at}");
        }
        if let Some(local) = &mut config.local_workers {
            // Workers it starts join the same fleet.
            local.args.extend(["--coordinator".to_string(), format!("http://{bound}")]);
            if !config.etcd.is_empty() {
                local.args.extend(["--etcd".to_string(), config.etcd.join(",")]);
            }
            if let Some(m) = &config.metrics_listen {
                let host = m.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                local.args.extend(["--metrics-listen".to_string(), format!("{host}:0")]);
            }
        }
        let http = match &http_listen {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("cannot serve HTTP on {a}: {e}"))?;
                let at = l.local_addr()?;
                config.http_address = Some(at.to_string());
                println!("http {at}");
                Some(l)
            }
            None => None,
        };
        println!("listening {bound}");
        let stop = shutdown.clone();
        tokio::spawn(async move {
            shardserve_coordinator::shutdown_signal().await;
            stop.cancel();
        });
        run(config, listener, http, shutdown).await
    }
    .await;
    if let Err(e) = result {
        eprintln!("coordinator: error: {e:#}");
        std::process::exit(1);
    }
}
