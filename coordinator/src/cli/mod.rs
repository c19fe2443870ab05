//! `shardctl`, the operator CLI: start a local cluster, generate, inspect, make tiny models.

pub mod bench;
pub mod cache;
pub mod cluster;
pub mod demo;
pub mod dev;
pub mod generate;
pub mod models;
pub mod ops;
pub mod plan;
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
    #[arg(long, env = "SHARDSERVE_COORDINATOR", default_value = crate::DEFAULT_COORDINATOR)]
    pub coordinator: String,
}

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
pub async fn admin(target: &Target) -> anyhow::Result<shardserve_proto::v1::admin_client::AdminClient<tonic::transport::Channel>> {
    let url = crate::url(&target.coordinator);
    shardserve_proto::v1::admin_client::AdminClient::connect(url.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {url}: {e}"))
}

/// Turns a gRPC status into a one-line error that keeps its code.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
