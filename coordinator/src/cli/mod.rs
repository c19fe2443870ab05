//! `shardctl`, the operator CLI: start a local cluster, generate, inspect, make tiny models.

pub mod bench;
mod bench_prefix;
mod bench_structured;
pub mod cache;
pub mod cluster;
pub mod demo;
pub mod dev;
pub mod generate;
pub mod models;
pub mod ops;
pub mod plan;
mod simulate;
pub mod status;

use clap::{Parser, Subcommand};

/// shardctl: run and operate a shardserve cluster.
#[derive(Debug, Parser)]
#[command(name = "shardctl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The coordinator a command talks to.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Coordinator URL.
    #[arg(long, env = "SHARDSERVE_COORDINATOR", default_value = crate::util::DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// A file holding the key to present (its first line). Without it: SHARDSERVE_ADMIN_KEY for
    /// operator commands, SHARDSERVE_API_KEY (else SHARDSERVE_ADMIN_KEY) for the others.
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// The CA (PEM) to trust for a coordinator serving TLS (`https://` URLs).
    #[arg(long, env = "SHARDSERVE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Target {
    /// The key to present for `role`, if any.
    pub fn key(&self, role: crate::auth::Role) -> anyhow::Result<Option<String>> {
        if let Some(p) = &self.api_key_file {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", p.display()))?;
            let key = text.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string);
            return key.map(Some).ok_or_else(|| anyhow::anyhow!("--api-key-file {}: empty", p.display()));
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Ok(match role {
            crate::auth::Role::Admin => env("SHARDSERVE_ADMIN_KEY"),
            crate::auth::Role::Inference => env("SHARDSERVE_API_KEY").or_else(|| env("SHARDSERVE_ADMIN_KEY")),
        })
    }
}

/// Presents a key (`authorization: Bearer KEY`) on every call, when there is one.
#[derive(Debug, Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(key: Option<&str>) -> anyhow::Result<Self> {
        key.map(|k| format!("Bearer {k}").parse().map_err(|_| anyhow::anyhow!("the key is not printable ASCII"))).transpose().map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// An Admin client that presents the operator's key.
pub type AdminClient =
    shardserve_proto::v1::admin_client::AdminClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;
/// An Inference client that presents the user's key.
pub type InferenceClient = shardserve_proto::v1::inference_client::InferenceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A channel to `url`: TLS (trusting `tls_ca`) for `https://`, plain HTTP/2 otherwise.
pub async fn channel(url: &str, tls_ca: Option<&std::path::Path>) -> anyhow::Result<tonic::transport::Channel> {
    if url.starts_with("https://") {
        let ca =
            tls_ca.ok_or_else(|| anyhow::anyhow!("{url} is served over TLS: give the CA to trust with --tls-ca (or SHARDSERVE_TLS_CA)"))?;
        let cfg = shardserve::tls::client_config(ca)?;
        return tonic::transport::Endpoint::from_shared(shardserve::tls::plain_url(url))?
            .connect_with_connector(shardserve::tls::connector(cfg))
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {url} over TLS: {}", shardserve::tls::error_chain(&e)));
    }
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {url}: {e}"))
}

/// An Inference client of `url` presenting `key`.
pub async fn inference_at(url: &str, key: Option<&str>, tls_ca: Option<&std::path::Path>) -> anyhow::Result<InferenceClient> {
    Ok(shardserve_proto::v1::inference_client::InferenceClient::with_interceptor(channel(url, tls_ca).await?, Bearer::new(key)?))
}

/// An Admin client of `url` presenting `key`.
pub async fn admin_at(url: &str, key: Option<&str>, tls_ca: Option<&std::path::Path>) -> anyhow::Result<AdminClient> {
    Ok(shardserve_proto::v1::admin_client::AdminClient::with_interceptor(channel(url, tls_ca).await?, Bearer::new(key)?))
}

impl Target {
    /// The coordinator's URL: `https://` when a CA to trust is given and no scheme is.
    pub fn url(&self) -> String {
        if self.tls_ca.is_some() && !self.coordinator.contains("://") {
            format!("https://{}", self.coordinator)
        } else {
            crate::util::url(&self.coordinator)
        }
    }
}

/// An Inference client of the target.
pub async fn inference(target: &Target) -> anyhow::Result<InferenceClient> {
    inference_at(&target.url(), target.key(crate::auth::Role::Inference)?.as_deref(), target.tls_ca.as_deref()).await
}

// Parsed once per run: the size of its largest variant (`up`'s flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole local cluster (coordinator + workers) in the foreground.
    Up(cluster::UpArgs),
    /// Generate text from a running cluster.
    Generate(generate::GenerateArgs),
    /// Print the device map transformers would use for a model (needs only config.json).
    Plan(plan::PlanArgs),
    /// Show models, placements and health.
    Status(status::StatusArgs),
    /// List the workers of the fleet.
    Workers(status::WorkersArgs),
    /// Leave a worker out of every plan from now on.
    Cordon(ops::WorkerArgs),
    /// Let a cordoned worker be planned on again.
    Uncordon(ops::WorkerArgs),
    /// Cordon a worker, let its requests finish, and move the model off it.
    Drain(ops::DrainArgs),
    /// Start or stop local workers until the fleet has --workers.
    Scale(ops::ScaleArgs),
    /// Build a tiny model, start a local cluster, generate, and print the output and tokens/s.
    Demo(demo::DemoArgs),
    /// Measure TTFT, inter-token latency and tokens/s of a running cluster.
    Bench(bench::BenchArgs),
    /// List, load and unload the models served.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// The shared Hugging Face cache: fill it with a model ahead of the servers.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Developer tools.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

/// Runs the CLI; returns the process exit code.
pub async fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(a) => cluster::up(a).await,
        Command::Generate(a) => generate::run(a).await,
        Command::Plan(a) => plan::run(a),
        Command::Status(a) => status::status(a).await,
        Command::Workers(a) => status::workers(a).await,
        Command::Cordon(a) => ops::cordon(a, true).await,
        Command::Uncordon(a) => ops::cordon(a, false).await,
        Command::Drain(a) => ops::drain(a).await,
        Command::Scale(a) => ops::scale(a).await,
        Command::Demo(a) => demo::run(a).await,
        Command::Bench(a) => bench::run(a).await,
        Command::Models(m) => models::run(m).await,
        Command::Cache(c) => cache::run(c),
        Command::Dev(d) => dev::run(d),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shardctl: error: {e:#}");
            1
        }
    }
}

/// A client of the coordinator's Admin API.
pub async fn admin(target: &Target) -> anyhow::Result<AdminClient> {
    admin_at(&target.url(), target.key(crate::auth::Role::Admin)?.as_deref(), target.tls_ca.as_deref()).await
}

/// Turns a gRPC status into a one-line error that keeps its code.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
