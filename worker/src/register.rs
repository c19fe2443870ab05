//! Joining the fleet through the coordinator's embedded membership: register, renew the lease
//! every TTL/3, register again when it was lost, and leave on shutdown.

use crate::service::WorkerState;
use crate::WorkerConfig;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::membership_client::MembershipClient;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// This worker as the fleet sees it.
pub fn worker_info(config: &WorkerConfig) -> pb::WorkerInfo {
    let (name, (total, free)) = match shardserve::device::memory(&config.device) {
        Some(gpu) => (device_name(&config.device), gpu),
        None => ("cpu".to_string(), shardserve::device::host_memory()),
    };
    pb::WorkerInfo {
        id: config.id.clone(),
        address: config.advertise.clone(),
        devices: vec![pb::Device { name, total_memory: total, free_memory: free }],
        version: env!("CARGO_PKG_VERSION").to_string(),
        state: "ready".into(),
        pid: std::process::id(),
        stage: None,
        collective_address: config.collective_address.clone(),
        instance: instance().to_string(),
        metrics_address: config.metrics_address.clone(),
        node: config.node.clone(),
        replica: None,
    }
}

/// This process's instance id: random, drawn once.
fn instance() -> &'static str {
    use std::hash::{BuildHasher, Hasher};
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        // std's hasher keys are random per process: a source of randomness with no dependency.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        format!("{:016x}", h.finish())
    })
}

/// `cpu` or `cuda:N`.
fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

/// Total and available memory from /proc/meminfo (0 where unknown).
/// A channel to the coordinator's embedded membership: mutual TLS with the cluster's
/// certificates when the worker has them (the membership refuses workers without one then).
async fn coordinator_channel(config: &WorkerConfig) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(shardserve::tls::plain_url(&config.coordinator))?.connect_timeout(Duration::from_secs(3));
    match &config.tls {
        Some(t) => endpoint.connect_with_connector(shardserve::tls::connector(t.client_config(&[b"h2"])?)).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| anyhow::anyhow!("{}", shardserve::tls::error_chain(&e)))
}

/// Keeps this worker registered until `shutdown`.
pub async fn keep_registered(config: WorkerConfig, state: Arc<WorkerState>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    'register: loop {
        let attempt = async {
            let mut client = MembershipClient::new(coordinator_channel(&config).await?);
            let lease = client.register(pb::RegisterRequest { worker: Some(worker_info(&config)) }).await?.into_inner();
            anyhow::Ok((client, lease))
        };
        let (mut client, lease) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(worker = %config.id, coordinator = %config.coordinator, error = %e, "registration failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'register;
                }
            }
        };
        backoff = Duration::from_millis(200);
        info!(worker = %config.id, lease = lease.lease_id, ttl_s = lease.ttl_seconds, "registered");
        let period = Duration::from_millis(u64::from(lease.ttl_seconds.max(1)) * 1000 / 3);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), client.leave(pb::LeaveRequest { lease_id: lease.lease_id })).await;
                    info!(worker = %config.id, "left the fleet");
                    return;
                }
                _ = tokio::time::sleep(period) => {}
            }
            match client.keep_alive(pb::KeepAliveRequest { lease_id: lease.lease_id }).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // The lease ran out: whatever this worker held is no longer assigned.
                    warn!(worker = %config.id, "lease lost; registering again");
                    state.unload();
                    continue 'register;
                }
                Err(e) => {
                    warn!(worker = %config.id, error = %e, "lease keep-alive failed");
                }
            }
        }
    }
}
