//! The shardserve coordinator and the operator CLI.
//!
//! - [`engine`]: a model's placement over the fleet and its scheduler (continuous batching).
//! - [`validate`]: client requests parsed into validated ones.
//! - [`frontend`]: what a model's output means to a client (reasoning, tool calls).
//! - [`service`]: the `Inference` and `Admin` gRPC services.
//! - [`relay`]: followers handing requests to the leader coordinator, which alone schedules
//!   each model.
//! - [`membership`]: the fleet view, embedded in the coordinator or (later) in etcd.
//! - [`error`]: request failures and their gRPC statuses.
//! - [`flags`]: flags the coordinator and `shardctl up` share.
//! - [`scale`]: starting and stopping local workers.
//! - [`cli`]: `shardctl`, the operator CLI.
//! - [`util`]: small helpers every layer uses (ids, URLs, tracing, signals).

pub mod auth;
pub mod cli;
pub mod engine;
pub mod error;
pub mod flags;
pub mod frontend;
pub mod http;
pub mod kubernetes;
pub mod membership;
pub mod models;
pub mod relay;
pub mod router;
pub mod scale;
pub mod service;
pub mod util;
pub mod validate;

pub use util::{init_tracing, random_u64, shutdown_signal, url, DEFAULT_COORDINATOR};

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub engine: engine::EngineConfig,
    /// Lease TTL of embedded membership.
    pub lease_ttl: Duration,
    /// The etcd holding membership; none means membership is embedded in the coordinator.
    pub etcd: Option<shardserve::membership::Etcd>,
    /// The cluster's name: its etcd key prefix is `/shardserve/<cluster>/`.
    pub cluster: String,
    /// How to start workers on this machine (for `Scale`), when the coordinator may.
    pub local_workers: Option<scale::LocalWorkers>,
    /// The worker StatefulSet `Scale` changes, when the coordinator runs in Kubernetes.
    pub kubernetes: Option<kubernetes::StatefulSetScaler>,
    /// Where Prometheus metrics are served (bound already), if they are.
    pub metrics_listen: Option<String>,
    /// Where the OpenAI-compatible HTTP API is served (bound already), if it is.
    pub http_address: Option<String>,
    /// What one HTTP request may ask.
    pub http_limits: http::Limits,
    /// API and admin keys.
    pub auth: auth::Auth,
    /// Serve gRPC reflection.
    pub reflection: bool,
    /// TLS on the client ports, when asked for.
    pub tls: Option<Arc<shardserve::tls::CertFiles>>,
    /// Where grpc.health.v1 is also served alone, in plaintext, if anywhere.
    pub health_listen: Option<String>,
}

/// Serves the coordinator on `listener` (and the HTTP API on `http`, when given) until
/// `shutdown` fires.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use shardserve_proto::v1::{
        admin_server::AdminServer, inference_server::InferenceServer, membership_server::MembershipServer, relay_server::RelayServer,
    };
    let embedded = membership::Embedded::new(config.lease_ttl, shutdown.clone());
    let (fleet, etcd): (std::sync::Arc<dyn membership::Membership>, _) = match &config.etcd {
        None => (embedded.clone(), None),
        Some(etcd) => {
            let fleet = shardserve::membership::EtcdFleet::start(etcd.clone(), config.cluster.clone(), shutdown.clone())
                .await
                .map_err(|e| anyhow::anyhow!("etcd at {}: {}", etcd.endpoints().join(","), shardserve::tls::error_chain(&e)))?;
            (fleet, Some((etcd.clone(), config.cluster.clone())))
        }
    };
    let engine = engine::Engine::start(config.engine.clone(), fleet.clone(), etcd.clone(), shutdown.clone()).await?;
    let models = models::Models::new(engine.clone(), fleet, etcd, shutdown.clone());
    let http_tls = match &config.tls {
        Some(files) => Some(shardserve::tls::server_config(files.clone(), &[b"http/1.1"])?),
        None => None,
    };
    let http_task = http.map(|l| {
        let (models, stop, limits, keys) = (models.clone(), shutdown.clone(), config.http_limits, config.auth.clone());
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, http_tls, models, limits, keys, stop).await {
                tracing::error!(error = %e, "the HTTP API stopped");
            }
        })
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    // Admin answers whenever the coordinator runs (it is how an operator sees why the model
    // is not ready).
    reporter.set_serving::<AdminServer<service::AdminService>>().await;
    // grpc.health.v1 says SERVING (overall and for Inference) only while the model is placed
    // and ready: what a Kubernetes readiness probe asks before sending traffic.
    let mut state = engine.entry().subscribe();
    let stop = shutdown.clone();
    let health_task = tokio::spawn(async move {
        loop {
            let ready = matches!(*state.borrow_and_update(), engine::ServingState::Ready(_));
            let status = if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            if ready {
                reporter.set_serving::<InferenceServer<service::InferenceService>>().await;
            } else {
                reporter.set_not_serving::<InferenceServer<service::InferenceService>>().await;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = state.changed() => if changed.is_err() { return },
            }
        }
    });
    if let Some(a) = &config.health_listen {
        let at = shardserve::telemetry::start_health(a, tonic::service::Routes::new(health.clone()), shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve health on {a}: {e}"))?;
        println!("health {at}");
    }
    // Reflection in both versions: v1, and v1alpha, the only one grpcio-reflection's client,
    // older grpcurl and Postman speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shardserve_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let inference = config.auth.interceptor(auth::Role::Inference);
    let admin = config.auth.interceptor(auth::Role::Admin);
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_optional_service(config.reflection.then_some(reflection))
        .add_optional_service(config.reflection.then_some(reflection_v1alpha))
        .add_service(InferenceServer::with_interceptor(service::InferenceService(models.clone()), inference))
        .add_service(AdminServer::with_interceptor(
            service::AdminService {
                models: models.clone(),
                local: config.local_workers.clone(),
                kubernetes: config.kubernetes.clone(),
                spawned: Arc::default(),
                metrics_address: config.metrics_listen.clone().unwrap_or_default(),
                http_address: config.http_address.clone().unwrap_or_default(),
            },
            admin,
        ))
        .add_service(RelayServer::with_interceptor(relay::RelayService(models.clone()), config.auth.interceptor(auth::Role::Inference)))
        .add_service(MembershipServer::with_interceptor(
            membership::MembershipService(embedded),
            membership::members_only(config.engine.tls.is_some()),
        ));
    match grpc_tls(&config)? {
        Some(tls) => {
            let conns = shardserve::tls::accept(listener, tls, "grpc", shutdown.clone());
            let incoming = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(conns), Ok::<_, std::io::Error>);
            router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()).await?;
        }
        None => {
            // The builder's own tcp_nodelay covers only sockets it binds itself: without it on
            // these, Nagle's algorithm holds streamed tokens back until the client's delayed
            // ACK (~40 ms).
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()).await?;
        }
    }
    shutdown.cancel();
    let _ = health_task.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    Ok(())
}

/// What TLS the gRPC port speaks: with the cluster's certificates and membership embedded,
/// workers join over this port, so it is TLS and takes (without insisting on) a certificate of
/// the cluster CA, presenting `--tls-cert` or else the coordinator's cluster certificate;
/// otherwise `--tls-cert` alone, when given.
type ConfigSource = Box<dyn Fn() -> Result<Arc<rustls::ServerConfig>, shardserve::tls::TlsError> + Send>;

fn grpc_tls(config: &CoordinatorConfig) -> anyhow::Result<Option<ConfigSource>> {
    let files = config.tls.clone();
    Ok(match (config.engine.tls.clone(), files) {
        (Some(cluster), files) if config.etcd.is_none() => {
            // Fail at start, not on the first connection.
            cluster.server_config(files.clone(), &[b"h2"], shardserve::tls::ClientAuth::Optional)?;
            Some(Box::new(move || cluster.server_config(files.clone(), &[b"h2"], shardserve::tls::ClientAuth::Optional)))
        }
        (_, Some(files)) => {
            let cfg = shardserve::tls::server_config(files, &[b"h2"])?;
            Some(Box::new(move || Ok(cfg.clone())))
        }
        (_, None) => None,
    })
}
