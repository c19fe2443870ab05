//! `coordinator`: plans a model over the fleet and serves the client and admin APIs.

use clap::Parser;
use shardserve_coordinator::{engine::EngineConfig, run, CoordinatorConfig};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The shardserve coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Args {
    #[command(flatten)]
    serve: shardserve_coordinator::flags::ServeArgs,
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
        anyhow::ensure!(a.serve.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(a.serve.tp >= 1, "--tp must be at least 1");
        anyhow::ensure!(
            a.serve.workers.is_multiple_of(a.serve.tp),
            "--workers {} is not a multiple of --tp {} (workers = stages × tp)",
            a.serve.workers,
            a.serve.tp
        );
        anyhow::ensure!(a.serve.max_concurrent_requests >= 1, "--max-concurrent-requests must be at least 1");
        anyhow::ensure!(a.serve.lease_ttl_s >= 1, "--lease-ttl-s must be at least 1");
        if let Some(m) = a.serve.max_total_tokens {
            anyhow::ensure!(m >= 2, "--max-total-tokens must be at least 2");
        }
        anyhow::ensure!((0.0..1.0).contains(&a.serve.kv_reserve), "--kv-reserve must be in [0, 1), got {}", a.serve.kv_reserve);
        anyhow::ensure!(a.serve.prefill_chunk >= 1, "--prefill-chunk must be at least 1");
        let kv_memory = a.serve.batch.validate()?;
        anyhow::ensure!(
            a.serve.batch.prefix_cache_scope != shardserve_coordinator::engine::PrefixCacheScope::PerKey
                || a.serve.auth.api_keys_file.is_some()
                || a.serve.auth.admin_keys_file.is_some(),
            "--prefix-cache-scope per-key needs --api-keys-file or --admin-keys-file: without keys every client is the same tenant"
        );
        anyhow::ensure!(
            !a.serve.cluster.is_empty() && a.serve.cluster.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "--cluster {:?}: use letters, digits, '-', '_' or '.'",
            a.serve.cluster
        );
        let strategy: shardserve::placement::Strategy = a.serve.strategy.parse()?;
        let max_memory = match &a.serve.max_memory {
            None => None,
            Some(s) => {
                let mm = shardserve::placement::parse_max_memory(s)?;
                if let Some((d, _)) = mm.iter().find(|(d, _)| !matches!(d, shardserve::placement::Device::Index(_))) {
                    anyhow::bail!("--max-memory {s}: {d} is not a worker; name workers by index (0=2GiB,1=2GiB)");
                }
                Some(mm)
            }
        };
        let device_map = match &a.serve.device_map {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--device-map {}: {e}", p.display()))?;
                Some(serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--device-map {}: not JSON: {e}", p.display()))?)
            }
        };
        Ok(CoordinatorConfig {
            engine: EngineConfig {
                name: a.serve.name.unwrap_or_else(|| a.serve.model.clone()),
                model: a.serve.model,
                revision: a.serve.revision,
                prepared: None,
                dtype: a.serve.dtype,
                quantize: a.serve.quantize,
                gguf_file: a.serve.gguf_file,
                dequantize: a.serve.dequantize,
                workers: shardserve_coordinator::engine::workers_per_replica(a.serve.workers, a.serve.tp, a.serve.replicas)
                    .map_err(|e| anyhow::anyhow!(e))?,
                tp: a.serve.tp,
                replicas: a.serve.replicas,
                router: a.serve.router,
                replica: None,
                random_weights: a.serve.random_weights,
                max_total_tokens: a.serve.max_total_tokens,
                max_concurrent_requests: a.serve.max_concurrent_requests,
                max_batch_size: a.serve.batch.max_batch_size,
                max_batch_tokens: a.serve.batch.max_batch_tokens,
                max_waiting: a.serve.batch.max_waiting,
                kv_memory,
                kv_block_size: a.serve.batch.kv_block_size,
                max_buffered_tokens: a.serve.batch.max_buffered_tokens,
                step_timeout: Duration::from_secs(a.serve.step_timeout_s),
                tls: a.serve.cluster_tls.open()?,
                strategy,
                max_memory,
                device_map,
                reserve: a.serve.kv_reserve,
                prefill_chunk: a.serve.prefill_chunk,
                migration_limit: a.serve.migration_limit,
                migration_wait: Duration::from_secs(a.serve.migration_wait_s),
                lease_ttl: Duration::from_secs(a.serve.lease_ttl_s),
                replan_wait: Duration::from_secs(a.serve.replan_wait_s),
                prefix_caching: a.serve.batch.prefix_caching == shardserve_coordinator::flags::OnOff::On,
                prefix_cache_scope: a.serve.batch.prefix_cache_scope,
                // Known once the port is bound (see main).
                peers: None,
            },
            lease_ttl: Duration::from_secs(a.serve.lease_ttl_s),
            metrics_listen: a.serve.batch.metrics_listen.clone(),
            http_address: None,
            http_limits: a.serve.http.validate()?,
            auth: a.serve.auth.load()?,
            reflection: !a.serve.auth.no_reflection,
            tls: a.serve.auth.tls()?,
            health_listen: a.serve.auth.health_listen.clone(),
            etcd: a.serve.etcd.open()?,
            kubernetes: match (a.fleet, a.statefulset) {
                (Fleet::Kubernetes, Some(name)) => {
                    Some(shardserve_coordinator::kubernetes::StatefulSetScaler::in_cluster(name, a.namespace)?)
                }
                _ => None,
            },
            local_workers: a.worker_bin.map(|bin| shardserve_coordinator::scale::LocalWorkers {
                bin,
                args: [
                    vec!["--cluster".into(), a.serve.cluster.clone(), "--lease-ttl-s".into(), a.serve.lease_ttl_s.to_string()],
                    a.serve.cluster_tls.to_args(),
                ]
                .concat(),
            }),
            cluster: a.serve.cluster,
        })
    }
}

#[tokio::main]
async fn main() {
    shardserve_coordinator::init_tracing();
    let args = Args::parse();
    let listen = args.serve.listen.clone();
    let advertise = args.serve.advertise.clone();
    let peer_ca = args.serve.auth.peer_ca.clone();
    let http_listen = args.serve.http.http_listen.clone();
    let result = async {
        let mut config = CoordinatorConfig::try_from(args)?;
        let c = config.engine.clone();
        let prepared = tokio::task::spawn_blocking(move || shardserve_coordinator::engine::preflight(&c)).await??;
        config.engine.prepared = Some(std::sync::Arc::new(prepared));
        let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let bound = listener.local_addr()?;
        let advertise = advertise.unwrap_or_else(|| shardserve::membership::default_advertise(bound, &shardserve::membership::hostname()));
        let peer_tls = match (&peer_ca, &config.engine.tls) {
            (Some(ca), _) => Some(shardserve::tls::client_config(ca)?),
            (None, Some(cluster)) => Some(cluster.client_config(&[b"h2"])?),
            (None, None) => None,
        };
        let serves_tls = config.tls.is_some() || (config.engine.tls.is_some() && config.etcd.is_none());
        config.engine.peers = Some(shardserve_coordinator::relay::Peers::new(advertise, serves_tls, peer_tls));
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
            if let Some(etcd) = &config.etcd {
                local.args.extend(etcd.to_args());
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
