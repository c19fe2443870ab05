//! `worker`: serves one shard of a model; joins the fleet through the coordinator.

use clap::Parser;
use shardserve_worker::{run, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// A shardserve worker: holds one pipeline stage of a model and runs it.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Args {
    /// Address to serve the Worker API on (port 0 picks a free one).
    #[arg(long, env = "SHARDSERVE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// Address other processes reach this worker at; defaults to the bound address, or, when
    /// listening on all interfaces (0.0.0.0, [::]), to this host's name and the bound port (as
    /// in a container, a pod or a Compose service scaled to several replicas).
    #[arg(long, env = "SHARDSERVE_WORKER_ADVERTISE")]
    advertise: Option<String>,
    /// The coordinator to join (its embedded membership).
    #[arg(long, env = "SHARDSERVE_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// Unique id of this worker; defaults to HOSTNAME-PID.
    #[arg(long, env = "SHARDSERVE_WORKER_ID")]
    id: Option<String>,
    /// Seconds the next stage may take to answer one step before it is declared failed.
    #[arg(long, env = "SHARDSERVE_STEP_TIMEOUT", default_value_t = 300)]
    step_timeout_s: u64,
    #[command(flatten)]
    etcd: shardserve::membership::EtcdArgs,
    /// The cluster's name (its etcd keys live under /shardserve/<cluster>/).
    #[arg(long, env = "SHARDSERVE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Seconds the etcd lease lasts without a keep-alive (renewed every third of it).
    #[arg(long, env = "SHARDSERVE_LEASE_TTL", default_value_t = 10)]
    lease_ttl_s: u64,
    /// Where shards compute: cpu, cuda (GPU 0) or cuda:N (needs a build with --features cuda).
    #[arg(long, env = "SHARDSERVE_DEVICE", default_value = "cpu")]
    device: String,
    /// Seconds a tensor-parallel all-reduce may wait on a peer before the group is failed.
    #[arg(long, env = "SHARDSERVE_COLLECTIVE_TIMEOUT", default_value_t = 30)]
    collective_timeout_s: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`; port 0 picks a free one,
    /// printed as `metrics ADDR`).
    #[arg(long, env = "SHARDSERVE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (port 0 picks a free
    /// one, printed as `health ADDR`): for probes that cannot speak mutual TLS (Kubernetes'
    /// gRPC probes) when the Worker port asks for the cluster's certificate.
    #[arg(long, env = "SHARDSERVE_HEALTH_LISTEN")]
    health_listen: Option<String>,
    #[command(flatten)]
    cluster_tls: shardserve::tls::ClusterTlsArgs,
    /// The machine this worker runs on, as the planner groups workers: tensor-parallel ranks
    /// within one node, replicas spread over nodes. Defaults to the host name (the Kubernetes
    /// manifests give the node's name through the downward API).
    #[arg(long, env = "SHARDSERVE_NODE")]
    node: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let bound = listener.local_addr()?;
    let advertise = args.advertise.unwrap_or_else(|| shardserve::membership::default_advertise(bound, &shardserve::membership::hostname()));
    let coordinator = if args.coordinator.starts_with("http") { args.coordinator } else { format!("http://{}", args.coordinator) };
    let device = shardserve::device::parse_device(&args.device).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = CancellationToken::new();
    let metrics_address = match &args.metrics_listen {
        Some(a) => {
            let bound =
                shardserve::telemetry::start(a, shutdown.clone()).await.map_err(|e| anyhow::anyhow!("cannot serve metrics on {a}: {e}"))?;
            println!("metrics {bound}");
            bound.to_string()
        }
        None => String::new(),
    };
    let config = WorkerConfig {
        id: args.id.unwrap_or_else(|| format!("{}-{}", shardserve::membership::hostname(), std::process::id())),
        advertise,
        coordinator,
        step_timeout: std::time::Duration::from_secs(args.step_timeout_s),
        etcd: args.etcd.open()?,
        cluster: args.cluster,
        lease_ttl: std::time::Duration::from_secs(args.lease_ttl_s.max(1)),
        collective_address: String::new(),
        device,
        collective_timeout: std::time::Duration::from_secs(args.collective_timeout_s.max(1)),
        metrics_address,
        tls: args.cluster_tls.open()?,
        health_listen: args.health_listen,
        node: args.node.filter(|n| !n.is_empty()).unwrap_or_else(shardserve::membership::hostname),
    };
    println!("listening {bound}");
    tracing::info!(worker = %config.id, address = %config.advertise, "worker serving");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    run(config, listener, shutdown).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use shardserve::membership::default_advertise;

    #[test]
    fn a_worker_on_every_interface_advertises_its_host_name() {
        assert_eq!(default_advertise("0.0.0.0:50061".parse().unwrap(), "worker-3"), "worker-3:50061");
        assert_eq!(default_advertise("[::]:7".parse().unwrap(), "a1b2c3"), "a1b2c3:7");
        assert_eq!(default_advertise("127.0.0.1:9000".parse().unwrap(), "worker-3"), "127.0.0.1:9000");
        assert_eq!(default_advertise("10.0.0.5:9000".parse().unwrap(), "worker-3"), "10.0.0.5:9000");
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
