//! The shardserve worker: holds one shard of a model (a pipeline stage), runs its steps, streams
//! hidden states to the next stage, and keeps itself registered with the fleet.
//!
//! - [`service`]: the `Worker` gRPC service (LoadShard, Step, Release, Stats).
//! - [`register`]: joining the fleet and keeping the lease alive.
//! - [`group`]: tensor-parallel groups: peers meeting at the leader, followers mirroring it.

pub mod group;
pub mod register;
pub mod service;

use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique id in the fleet.
    pub id: String,
    /// The address other processes reach this worker at (host:port).
    pub advertise: String,
    /// The coordinator whose embedded membership this worker joins.
    pub coordinator: String,
    /// Longest a single step may take before the previous stage gives up on this one.
    pub step_timeout: std::time::Duration,
    /// The etcd to register in; none means joining the coordinator's embedded membership.
    pub etcd: Option<shardserve::membership::Etcd>,
    /// The cluster's name (etcd key prefix `/shardserve/<cluster>/`).
    pub cluster: String,
    /// TTL of the etcd lease the registration is bound to.
    pub lease_ttl: std::time::Duration,
    /// Where tensor-parallel peers reach this worker's collective listener (host:port); set
    /// by [`run`] once it listens.
    pub collective_address: String,
    /// Longest a collective operation may wait on a peer before the group is failed.
    pub collective_timeout: std::time::Duration,
    /// Where shards compute.
    pub device: candle_core::Device,
    /// Where Prometheus metrics are served (host:port), if they are; set by the caller once
    /// it listens.
    pub metrics_address: String,
    /// The cluster identity, when every link inside the cluster is mutual TLS: the Worker port
    /// and the collective port then refuse peers without a certificate of the cluster CA.
    pub tls: Option<Arc<shardserve::tls::ClusterTls>>,
    /// Where grpc.health.v1 is also served alone, in plaintext (probes that cannot speak
    /// mutual TLS), if anywhere; printed as `health ADDR` once bound.
    pub health_listen: Option<String>,
    /// The machine this worker runs on (its host name, or the Kubernetes node).
    pub node: String,
}

/// Serves the worker on `listener` until `shutdown` fires, then revokes its registration.
pub async fn run(mut config: WorkerConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Tensor-parallel peers connect on the advertised host, on a port of their own.
    let host = config.advertise.rsplit_once(':').map_or(config.advertise.as_str(), |(h, _)| h);
    let rendezvous = group::Rendezvous::start(host, config.tls.clone())?;
    config.collective_address = rendezvous.address().to_string();
    let state = Arc::new(service::WorkerState::new(
        config.id.clone(),
        config.step_timeout,
        config.collective_timeout,
        rendezvous,
        config.device.clone(),
        config.tls.clone(),
        shutdown.clone(),
    ));
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<shardserve_proto::v1::worker_server::WorkerServer<service::WorkerService>>().await;
    if let Some(a) = &config.health_listen {
        let at = shardserve::telemetry::start_health(a, tonic::service::Routes::new(health.clone()), shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve health on {a}: {e}"))?;
        println!("health {at}");
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(shardserve_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let svc = shardserve_proto::v1::worker_server::WorkerServer::new(service::WorkerService::new(state.clone()))
        .max_decoding_message_size(shardserve::stage::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(shardserve::stage::MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection)
        .add_service(svc);
    let server = async {
        match config.tls.clone() {
            Some(tls) => {
                use shardserve::tls::ClientAuth;
                let conns = shardserve::tls::accept(
                    listener,
                    move || tls.server_config(None, &[b"h2"], ClientAuth::Required),
                    "worker",
                    shutdown.clone(),
                );
                let incoming = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(conns), Ok::<_, std::io::Error>);
                router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()).await
            }
            None => {
                // Accepted sockets need nodelay set here (the builder's covers only sockets it binds).
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()).await
            }
        }
    };
    let registration = async {
        if let Some(etcd) = config.etcd.clone() {
            let record = shardserve::membership::WorkerRecord::from(&register::worker_info(&config));
            let st = state.clone();
            shardserve::membership::keep_registered(
                etcd,
                config.cluster.clone(),
                record,
                config.lease_ttl,
                move || st.unload(),
                shutdown.clone(),
            )
            .await
        } else {
            register::keep_registered(config.clone(), state.clone(), shutdown.clone()).await
        }
    };
    let (served, _) = tokio::join!(server, registration);
    served?;
    Ok(())
}
