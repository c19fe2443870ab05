//! `shardctl status` and `shardctl workers`: what the cluster serves and who is in the fleet.

use super::{admin, status_error, Target};
use shardserve_proto::v1 as pb;

/// Arguments of `shardctl status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `shardctl workers`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Prompt tokens found in the prefix cache per token looked up; `None` before any lookup.
fn hit_rate(m: &pb::ModelStatus) -> Option<f64> {
    (m.prefix_cache_queries > 0).then(|| m.prefix_cache_hits as f64 / m.prefix_cache_queries as f64)
}

/// `shardctl status`.
pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let s = admin(&a.target).await?.cluster_status(pb::ClusterStatusRequest {}).await.map_err(status_error)?.into_inner();
    let models: Vec<serde_json::Value> = s
        .models
        .iter()
        .map(|m| {
            let info = m.model.clone().unwrap_or_default();
            serde_json::json!({
                "name": info.name,
                "state": info.state,
                "architecture": info.architecture,
                "layers": info.num_layers,
                "dtype": info.dtype,
                "quantize": (!info.quantize.is_empty()).then_some(&info.quantize),
                "detail": m.detail,
                "prefix_cache": {
                    "enabled": m.prefix_caching,
                    "queried_tokens": m.prefix_cache_queries,
                    "hit_tokens": m.prefix_cache_hits,
                    "hit_rate": hit_rate(m),
                    "cached_blocks": m.kv_blocks_cached,
                },
                "placement": m.stages.iter().map(|st| serde_json::json!({
                    "stage": st.stage,
                    "worker": st.worker_id,
                    "address": st.address,
                    "layers": [st.layer_start, st.layer_end],
                    "embeddings": st.embeddings,
                    "lm_head": st.lm_head,
                    "bytes": st.bytes,
                    // The stage's tensor-parallel group, rank 0 first (one worker without).
                    "group": std::iter::once(&st.worker_id).chain(&st.ranks).collect::<Vec<_>>(),
                    "kv_blocks": st.kv_blocks,
                    "kv_block_size": st.kv_block_size,
                })).collect::<Vec<_>>(),
                "replicas": m.replicas.iter().map(|r| serde_json::json!({
                    "replica": r.index,
                    "state": r.state,
                    "detail": r.detail,
                    "workers": r.workers,
                    "stages": r.stages.iter().map(|st| std::iter::once(&st.worker_id).chain(&st.ranks).collect::<Vec<_>>()).collect::<Vec<_>>(),
                    "running": r.running,
                    "waiting": r.waiting,
                    "kv_blocks_total": r.kv_blocks_total,
                    "kv_blocks_free": r.kv_blocks_free,
                    "prefix_cache": {"queried_tokens": r.prefix_cache_queries, "hit_tokens": r.prefix_cache_hits},
                })).collect::<Vec<_>>(),
                "spares": m.spares,
            })
        })
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"membership": s.membership, "role": s.role, "workers": s.workers, "metrics_address": s.metrics_address, "http_address": s.http_address, "models": models,
                "downloads": s.downloads.iter().map(|d| serde_json::json!({
                    "repo": d.repo, "file": d.file, "done_bytes": d.done_bytes, "total_bytes": d.total_bytes,
                })).collect::<Vec<_>>()})
        );
        return Ok(());
    }
    println!("membership: {}  role: {}  workers: {}", s.membership, s.role, s.workers);
    for d in &s.downloads {
        let of = match d.total_bytes {
            Some(t) if t > 0 => format!(" of {} ({:.1}%)", human_bytes(t), d.done_bytes as f64 * 100.0 / t as f64),
            _ => String::new(),
        };
        println!("downloading {} {}: {}{of}", d.repo, d.file, human_bytes(d.done_bytes));
    }
    for m in &s.models {
        let info = m.model.clone().unwrap_or_default();
        let quantize = if info.quantize.is_empty() { String::new() } else { format!(" quantize={}", info.quantize) };
        println!("model {} [{}] {} layers={}{quantize} — {}", info.name, info.state, info.architecture, info.num_layers, m.detail);
        if m.prefix_caching {
            let rate = hit_rate(m).map_or_else(|| "no lookups yet".to_string(), |r| format!("{:.1}% hit", r * 100.0));
            println!(
                "  prefix cache: {rate} ({} of {} prompt tokens), {} blocks cached",
                m.prefix_cache_hits, m.prefix_cache_queries, m.kv_blocks_cached
            );
        } else {
            println!("  prefix cache: off");
        }
        for r in &m.replicas {
            let rate = if r.prefix_cache_queries == 0 {
                "no lookups yet".to_string()
            } else {
                format!("{:.1}% hit", r.prefix_cache_hits as f64 * 100.0 / r.prefix_cache_queries as f64)
            };
            let why = if r.detail.is_empty() { String::new() } else { format!(" — {}", r.detail) };
            println!(
                "  replica {} [{}]{why}: {} running, {} waiting, KV {} of {} blocks free, prefix cache {rate}",
                r.index, r.state, r.running, r.waiting, r.kv_blocks_free, r.kv_blocks_total
            );
            for (i, st) in r.stages.iter().enumerate() {
                let group =
                    std::iter::once(st.worker_id.as_str()).chain(st.ranks.iter().map(String::as_str)).collect::<Vec<_>>().join(", ");
                println!("    stage {i} layers {}..{} on {group}", st.layer_start, st.layer_end);
            }
        }
        if !m.spares.is_empty() {
            println!("  spares (complete no replica): {}", m.spares.join(", "));
        }
        for st in &m.stages {
            println!(
                "  stage {} worker {} ({}) layers {}..{} {}",
                st.stage,
                st.worker_id,
                st.address,
                st.layer_start,
                st.layer_end,
                human_bytes(st.bytes)
            );
            if !st.ranks.is_empty() {
                println!("    tensor-parallel group of {}: ranks 1.. on {}", st.ranks.len() + 1, st.ranks.join(", "));
            }
        }
    }
    Ok(())
}

/// `shardctl workers`.
pub async fn workers(a: WorkersArgs) -> anyhow::Result<()> {
    let w = admin(&a.target).await?.list_workers(pb::ListWorkersRequest {}).await.map_err(status_error)?.into_inner();
    if a.json {
        let list: Vec<serde_json::Value> = w
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.id,
                    "address": w.address,
                    "state": w.state,
                    "pid": w.pid,
                    "instance": w.instance,
                    "metrics_address": w.metrics_address,
                    "stage": w.stage,
                    "replica": w.replica,
                    "node": w.node,
                    "version": w.version,
                    "devices": w.devices.iter().map(|d| serde_json::json!({
                        "name": d.name, "total_memory": d.total_memory, "free_memory": d.free_memory,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "workers": list }));
        return Ok(());
    }
    println!("{:<28} {:<22} {:<10} {:>7} {:>6} {:>10} {:>8}  NODE", "ID", "ADDRESS", "STATE", "REPLICA", "STAGE", "FREE", "PID");
    for w in &w.workers {
        let free: u64 = w.devices.iter().map(|d| d.free_memory).sum();
        let stage = w.stage.map_or("-".to_string(), |s| s.to_string());
        let replica = w.replica.map_or("-".to_string(), |s| s.to_string());
        println!(
            "{:<28} {:<22} {:<10} {:>7} {:>6} {:>10} {:>8}  {}",
            w.id,
            w.address,
            w.state,
            replica,
            stage,
            human_bytes(free),
            w.pid,
            w.node
        );
    }
    Ok(())
}

/// Bytes in the largest binary unit that keeps the number at least 1.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
