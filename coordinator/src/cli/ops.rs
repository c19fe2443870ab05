//! `shardctl cordon|uncordon|drain|scale`: the operator's hands on the fleet.

use super::{admin, status_error, Target};
use shardserve_proto::v1 as pb;

/// Arguments naming one worker.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub target: Target,
    /// The worker's id (as `shardctl workers` lists it).
    pub worker: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `shardctl drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Longest to wait for requests in flight, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u32,
}

/// Arguments of `shardctl scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub target: Target,
    /// The fleet size wanted.
    #[arg(long)]
    pub workers: u32,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `shardctl cordon` (`on`) and `shardctl uncordon`.
pub async fn cordon(a: WorkerArgs, on: bool) -> anyhow::Result<()> {
    let mut c = admin(&a.target).await?;
    let req = pb::CordonRequest { worker_id: a.worker.clone() };
    if on {
        c.cordon(req).await.map_err(status_error)?;
    } else {
        c.uncordon(req).await.map_err(status_error)?;
    }
    let what = if on { "cordoned" } else { "uncordoned" };
    if a.json {
        println!("{}", serde_json::json!({ "worker": a.worker, "state": what }));
    } else {
        println!("{} {what}", a.worker);
    }
    Ok(())
}

/// `shardctl drain`.
pub async fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let mut c = admin(&a.worker.target).await?;
    let r = c
        .drain(pb::DrainRequest { worker_id: a.worker.worker.clone(), timeout_seconds: a.timeout_s })
        .await
        .map_err(status_error)?
        .into_inner();
    let stages: Vec<serde_json::Value> = r
        .stages
        .iter()
        .map(|s| serde_json::json!({"stage": s.stage, "worker": s.worker_id, "layers": [s.layer_start, s.layer_end]}))
        .collect();
    if a.worker.json {
        println!("{}", serde_json::json!({ "worker": a.worker.worker, "state": "drained", "placement": stages }));
    } else {
        println!("{} drained; the model now runs on {} stage(s)", a.worker.worker, stages.len());
    }
    Ok(())
}

/// `shardctl scale`.
pub async fn scale(a: ScaleArgs) -> anyhow::Result<()> {
    let mut c = admin(&a.target).await?;
    let r = c.scale(pb::ScaleRequest { workers: a.workers }).await.map_err(status_error)?.into_inner();
    if a.json {
        println!("{}", serde_json::json!({ "workers": r.workers, "started": r.started, "stopped": r.stopped }));
    } else {
        println!("{} workers (started: {:?}, stopped: {:?})", r.workers, r.started, r.stopped);
    }
    Ok(())
}
