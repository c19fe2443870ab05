//! Prometheus metrics: one recorder per process (the `metrics` facade with
//! `metrics-exporter-prometheus`), served as text on `GET /metrics`. Names follow TGI's and
//! vLLM's style: `shardserve_*`, seconds for durations, `_total` for counters.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tokio_util::sync::CancellationToken;

/// Buckets of the latency histograms, in seconds (1 ms to 2 min).
const SECONDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Buckets of the batch histograms (sequences or tokens per step).
const COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), COUNTS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_tokens".into()), COUNTS))
            .expect("static buckets are valid");
        match builder.install_recorder() {
            Ok(h) => h,
            // Another recorder came first (a test harness, say): keep one of our own to render.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let handle = handle();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()) }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Binds `address` for metrics and serves them on a task of their own until `shutdown`;
/// returns the bound address.
pub async fn start(address: &str, shutdown: CancellationToken) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    handle();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, shutdown).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// Binds `address` and serves `routes` (the process's grpc.health.v1 service) there alone, in
/// plaintext, on a task of its own until `shutdown`; returns the bound address. For probes that
/// cannot speak TLS — Kubernetes' gRPC probes — when the service port needs it (mutual TLS
/// with `--cluster-ca`, or `--tls-cert`). It tells whether the process serves, nothing else.
pub async fn start_health(
    address: &str,
    routes: tonic::service::Routes,
    shutdown: CancellationToken,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let served =
            tonic::transport::Server::builder().add_routes(routes).serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the health port stopped");
        }
    });
    Ok(bound)
}
