//! `shardctl models list|load|unload`: the models a coordinator serves.

use super::{admin, status_error, Target};
use anyhow::bail;
use shardserve_proto::v1 as pb;
use std::time::{Duration, Instant};

/// `shardctl models ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// List the models served and their state.
    List(ListArgs),
    /// Serve another model on workers reserved for it (free ones first, then some of the
    /// coordinator's own model's, which moves off them once no request is in flight).
    Load(LoadArgs),
    /// Stop serving a model loaded with `load`; its workers go back to the others.
    Unload(UnloadArgs),
}

/// Arguments of `shardctl models list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `shardctl models load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub target: Target,
    /// The model: a local folder or a Hub id (in the coordinator's and workers' cache).
    pub model: String,
    /// The name clients use (default: MODEL).
    #[arg(long)]
    pub name: Option<String>,
    /// Hub revision.
    #[arg(long)]
    pub revision: Option<String>,
    /// Workers reserved for it (pipeline stages × --tp).
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Tensor-parallel ranks per stage.
    #[arg(long, default_value_t = 1)]
    pub tp: u32,
    /// Compute dtype: auto, f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// The GGUF file of a folder or repo holding several.
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// Dequantize a GGUF checkpoint's block-type weights to --dtype at load.
    #[arg(long)]
    pub dequantize: bool,
    /// Copies of the model over the --workers reserved for it, each its own placement of
    /// --workers / N of them, requests routed among them; `auto`: as many as those workers
    /// hold. Default: one placement over them all.
    #[arg(long)]
    pub replicas: Option<crate::engine::ReplicaCount>,
    /// Seconds to wait until it serves (0: return once it is registered).
    #[arg(long, default_value_t = 300)]
    pub wait_s: u64,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `shardctl models unload`.
#[derive(Debug, Clone, clap::Args)]
pub struct UnloadArgs {
    #[command(flatten)]
    pub target: Target,
    /// The model's name.
    pub name: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn info_json(m: &pb::ModelInfo) -> serde_json::Value {
    serde_json::json!({"name": m.name, "state": m.state, "architecture": m.architecture, "layers": m.num_layers, "dtype": m.dtype,
        "quantize": (!m.quantize.is_empty()).then_some(&m.quantize)})
}

async fn list_models(target: &Target) -> anyhow::Result<Vec<pb::ModelInfo>> {
    let mut c = super::inference(target).await?;
    Ok(c.list_models(pb::ListModelsRequest {}).await.map_err(status_error)?.into_inner().models)
}

/// `shardctl models ...`.
pub async fn run(cmd: ModelsCommand) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List(a) => {
            let models = list_models(&a.target).await?;
            if a.json {
                println!("{}", serde_json::json!({"models": models.iter().map(info_json).collect::<Vec<_>>()}));
            } else {
                for m in &models {
                    let quantize = if m.quantize.is_empty() { String::new() } else { format!(" quantize={}", m.quantize) };
                    println!("{:<40} {:<12} {} layers={} dtype={}{quantize}", m.name, m.state, m.architecture, m.num_layers, m.dtype);
                }
            }
            Ok(())
        }
        ModelsCommand::Load(a) => {
            let resp = admin(&a.target)
                .await?
                .load_model(pb::LoadModelRequest {
                    model: a.model.clone(),
                    revision: a.revision.clone().unwrap_or_default(),
                    name: a.name.clone().unwrap_or_default(),
                    workers: a.workers,
                    tp: a.tp,
                    dtype: a.dtype.clone(),
                    replicas: a.replicas.map(|r| r.to_string()).unwrap_or_default(),
                    gguf_file: a.gguf_file.clone().unwrap_or_default(),
                    dequantize: a.dequantize,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut info = resp.model.unwrap_or_default();
            let deadline = Instant::now() + Duration::from_secs(a.wait_s);
            while a.wait_s > 0 && info.state != "ready" {
                if Instant::now() > deadline {
                    bail!("model {} was not ready within {} s (state: {})", info.name, a.wait_s, info.state);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(m) = list_models(&a.target).await?.into_iter().find(|m| m.name == info.name) {
                    info = m;
                }
            }
            if a.json {
                println!("{}", serde_json::json!({"model": info_json(&info), "workers": resp.workers}));
            } else {
                println!("{} {} on {}", info.name, info.state, resp.workers.join(", "));
            }
            Ok(())
        }
        ModelsCommand::Unload(a) => {
            let resp = admin(&a.target)
                .await?
                .unload_model(pb::UnloadModelRequest { name: a.name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if a.json {
                println!("{}", serde_json::json!({"unloaded": a.name, "workers": resp.workers}));
            } else {
                println!("unloaded {}; released {}", a.name, resp.workers.join(", "));
            }
            Ok(())
        }
    }
}
