//! `shardctl plan`: the device map transformers' `from_pretrained(..., device_map=...)` would
//! produce for a model, from its config.json alone.

use anyhow::Context;
use shardserve::dtype::Dtype;
use shardserve::placement::{self, ModelShape, Strategy};

/// Arguments of `shardctl plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// The model: a local folder or a Hub id (only config.json is read).
    #[arg(long)]
    pub model: String,
    /// Hub revision.
    #[arg(long)]
    pub revision: Option<String>,
    /// The GGUF file of a folder or repo holding several, whose header gives the config.
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// Memory per device, accelerate's `max_memory`: e.g. 0=40GiB,1=40GiB,cpu=64GiB.
    #[arg(long)]
    pub max_memory: String,
    /// dtype the sizes are computed in: auto (config.json's, as on GPUs), f32, bf16 or f16
    /// (transformers' names float32, bfloat16, float16 too).
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// auto (= balanced), balanced, balanced_low_0 or sequential.
    #[arg(long, default_value = "auto")]
    pub strategy: String,
    /// Tensor-parallel ranks per stage: consecutive GPU indices of --max-memory form a group
    /// (0,1 → group 0; 2,3 → group 1), which offers --tp times its smallest device; the map
    /// then names groups.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Print exactly accelerate's dict as JSON (with --tp above 1: {"device_map": that dict,
    /// "tp": N, "groups": [[devices of group 0], ...]}).
    #[arg(long)]
    pub json: bool,
    /// Replicas of the model over the numbered devices of --max-memory, each on stages × --tp
    /// of them: a number (the devices split evenly), or auto (as many as fit, each on the
    /// fewest devices that hold the model). Prints each replica's device map and the spares.
    #[arg(long)]
    pub replicas: Option<crate::engine::ReplicaCount>,
    /// With --replicas: the node of each device (0=a,1=a,2=b,...; default one node), as
    /// workers report theirs. Tensor-parallel groups stay within a node; replicas spread over
    /// nodes.
    #[arg(long, requires = "replicas")]
    pub nodes: Option<String>,
}

/// Memory per device, as accelerate's `max_memory`.
type MaxMemory = Vec<(placement::Device, u64)>;

/// Groups the GPU entries of `max_memory` into tensor-parallel groups of `tp`; other entries
/// (cpu, disk) stay as they are. Returns the budgets by group and each group's devices.
fn tp_groups(max_memory: &[(placement::Device, u64)], tp: usize) -> anyhow::Result<(MaxMemory, Vec<Vec<u32>>)> {
    let gpus: Vec<(u32, u64)> = max_memory
        .iter()
        .filter_map(|(d, b)| match d {
            placement::Device::Index(i) => Some((*i, *b)),
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        !gpus.is_empty() && gpus.len().is_multiple_of(tp),
        "--tp {tp} needs a multiple of {tp} devices in --max-memory; it names {}",
        gpus.len()
    );
    let mut budgets = Vec::new();
    let mut groups = Vec::new();
    for (g, chunk) in gpus.chunks(tp).enumerate() {
        let min = chunk.iter().map(|(_, b)| *b).min().unwrap_or(0);
        budgets.push((placement::Device::Index(g as u32), min.saturating_mul(tp as u64)));
        groups.push(chunk.iter().map(|(i, _)| *i).collect());
    }
    budgets.extend(max_memory.iter().filter(|(d, _)| !matches!(d, placement::Device::Index(_))).cloned());
    Ok((budgets, groups))
}

/// The dtype width in bytes: config.json's `torch_dtype`/`dtype` under `auto` (f32 when it
/// names none), as `from_pretrained(..., dtype="auto")` loads it on GPUs.
pub fn dtype_bytes_for(dtype: Dtype, config: &serde_json::Value) -> u64 {
    let checkpoint = config.get("torch_dtype").or_else(|| config.get("dtype")).and_then(|v| v.as_str());
    dtype.resolve(checkpoint, true).size_in_bytes() as u64
}

/// `shardctl plan`.
pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let config = shardserve::hub::resolve_config(&a.model, a.revision.as_deref(), a.gguf_file.as_deref())?;
    let shape = ModelShape::from_config_json(&config)?;
    let strategy: Strategy = a.strategy.parse()?;
    let max_memory = placement::parse_max_memory(&a.max_memory)?;
    let bytes = dtype_bytes_for(a.dtype, &config);
    anyhow::ensure!(a.tp >= 1, "--tp must be at least 1");
    if let Some(replicas) = a.replicas {
        return plan_replicas(&a, &shape, bytes, &max_memory, strategy, replicas);
    }
    if a.tp == 1 {
        let map = placement::infer_device_map(&shape, bytes, &max_memory, strategy)?;
        if a.json {
            println!("{}", map.to_json_string());
            return Ok(());
        }
        return print_map(&shape, bytes, &map);
    }
    let tp = shardserve::collective::TpRank { rank: 0, size: a.tp };
    shardserve::collective::tp_split(
        shape.num_attention_heads as usize,
        shape.num_key_value_heads as usize,
        shape.intermediate_size as usize,
        tp,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", a.model))?;
    let (budgets, groups) = tp_groups(&max_memory, a.tp)?;
    let map = placement::infer_device_map(&shape, bytes, &budgets, strategy)?;
    if a.json {
        println!("{{\"device_map\": {}, \"tp\": {}, \"groups\": {}}}", map.to_json_string(), a.tp, serde_json::to_string(&groups)?);
        return Ok(());
    }
    print_map(&shape, bytes, &map)?;
    for (g, devices) in groups.iter().enumerate() {
        let list: Vec<String> = devices.iter().map(u32::to_string).collect();
        println!("group {g}: devices {} (tensor-parallel ranks 0..{})", list.join(","), a.tp);
    }
    Ok(())
}

/// The node of each device from `--nodes` (`0=a,1=a,2=b`); every device on one node without it.
fn parse_nodes(nodes: Option<&str>, devices: &[u32]) -> anyhow::Result<std::collections::HashMap<u32, String>> {
    let mut out: std::collections::HashMap<u32, String> = devices.iter().map(|d| (*d, "local".to_string())).collect();
    let Some(nodes) = nodes else { return Ok(out) };
    for item in nodes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (d, n) = item.split_once('=').with_context(|| format!("--nodes takes DEVICE=NODE items, not {item:?}"))?;
        let d: u32 = d.trim().parse().with_context(|| format!("--nodes: {d:?} is not a device index"))?;
        anyhow::ensure!(out.contains_key(&d), "--nodes names device {d}, which --max-memory does not");
        anyhow::ensure!(!n.trim().is_empty(), "--nodes: device {d} has an empty node name");
        out.insert(d, n.trim().to_string());
    }
    Ok(out)
}

/// `plan --replicas`: the replica layout (the one the coordinator makes over workers, here
/// over devices), then each replica's device map over its own devices.
fn plan_replicas(
    a: &PlanArgs,
    shape: &ModelShape,
    bytes: u64,
    max_memory: &[(placement::Device, u64)],
    strategy: Strategy,
    replicas: crate::engine::ReplicaCount,
) -> anyhow::Result<()> {
    use shardserve::placement::replicas::{self as layout, Shape, Slot, Wanted};
    let gpus: Vec<(u32, u64)> = max_memory
        .iter()
        .map(|(d, b)| match d {
            placement::Device::Index(i) => Ok((*i, *b)),
            other => anyhow::bail!("--replicas lays replicas over numbered devices; leave {other} out of --max-memory"),
        })
        .collect::<anyhow::Result<_>>()?;
    if a.tp > 1 {
        let tp = shardserve::collective::TpRank { rank: 0, size: a.tp };
        shardserve::collective::tp_split(
            shape.num_attention_heads as usize,
            shape.num_key_value_heads as usize,
            shape.intermediate_size as usize,
            tp,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.model))?;
    }
    let devices: Vec<u32> = gpus.iter().map(|(d, _)| *d).collect();
    let nodes = parse_nodes(a.nodes.as_deref(), &devices)?;
    let per = match replicas {
        crate::engine::ReplicaCount::Auto => {
            let total = placement::module_sizes(shape, bytes)?.total();
            let budgets: Vec<u64> = gpus.iter().map(|(_, b)| *b).collect();
            layout::fewest_workers(total, &budgets, a.tp).with_context(|| {
                format!(
                    "the model's {:.2} GiB do not fit all {} devices of --max-memory together",
                    total as f64 / (1u64 << 30) as f64,
                    gpus.len()
                )
            })?
        }
        crate::engine::ReplicaCount::Count(n) => {
            anyhow::ensure!(
                gpus.len().is_multiple_of(n),
                "--max-memory names {} devices, which --replicas {n} cannot split evenly",
                gpus.len()
            );
            let per = gpus.len() / n;
            anyhow::ensure!(per.is_multiple_of(a.tp), "each of the {n} replicas gets {per} devices, not a multiple of --tp {}", a.tp);
            per
        }
    };
    let wanted = match replicas {
        crate::engine::ReplicaCount::Count(n) => Wanted::Count(n),
        crate::engine::ReplicaCount::Auto => Wanted::Auto,
    };
    let slots: Vec<Slot> = devices.iter().map(|d| Slot { id: d.to_string(), node: nodes[d].clone() }).collect();
    let laid = layout::layout(&slots, &[], Shape { stages: per / a.tp, tp: a.tp }, wanted);
    let formed: Vec<Vec<u32>> = laid
        .replicas
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| r.iter().map(|d| d.parse().expect("device ids are numbers")).collect())
        .collect();
    anyhow::ensure!(
        !formed.is_empty(),
        "no replica of {per} devices can be formed: {} devices on {} node(s)",
        devices.len(),
        nodes.values().collect::<std::collections::BTreeSet<_>>().len()
    );
    let mut out = Vec::new();
    for (i, devs) in formed.iter().enumerate() {
        let own: MaxMemory =
            devs.iter().map(|d| (placement::Device::Index(*d), gpus.iter().find(|(g, _)| g == d).map_or(0, |(_, b)| *b))).collect();
        // Each replica is planned as the coordinator plans it: over its own devices, in rank
        // order, consecutive ones forming a tensor-parallel group.
        let (budgets, groups) = if a.tp > 1 { tp_groups(&own, a.tp)? } else { (own.clone(), devs.iter().map(|d| vec![*d]).collect()) };
        let map =
            placement::infer_device_map(shape, bytes, &budgets, strategy).with_context(|| format!("replica {i} over devices {devs:?}"))?;
        out.push((devs.clone(), map, groups));
    }
    let spares: Vec<u32> = laid.spares.iter().map(|d| d.parse().expect("device ids are numbers")).collect();
    if a.json {
        let replicas: Vec<serde_json::Value> = out
            .iter()
            .map(|(devs, map, groups)| {
                let map: serde_json::Value = serde_json::from_str(&map.to_json_string()).expect("a device map is JSON");
                let nodes: Vec<&str> = devs.iter().map(|d| nodes[d].as_str()).collect();
                serde_json::json!({"devices": devs, "nodes": nodes, "device_map": map, "groups": groups})
            })
            .collect();
        println!("{}", serde_json::json!({"tp": a.tp, "replicas": replicas, "spares": spares}));
        return Ok(());
    }
    for (i, (devs, map, groups)) in out.iter().enumerate() {
        let on: Vec<String> = devs.iter().map(|d| format!("{d}@{}", nodes[d])).collect();
        println!("replica {i}: devices {}", on.join(", "));
        if a.tp > 1 {
            for (g, devices) in groups.iter().enumerate() {
                let list: Vec<String> = devices.iter().map(u32::to_string).collect();
                println!("  group {g}: devices {} (tensor-parallel ranks 0..{})", list.join(","), a.tp);
            }
        }
        print_map(shape, bytes, map)?;
    }
    let list: Vec<String> = spares.iter().map(u32::to_string).collect();
    println!("spares: {}", if list.is_empty() { "none".to_string() } else { list.join(", ") });
    Ok(())
}

/// The map as a table, then the bytes each device holds.
fn print_map(shape: &ModelShape, bytes: u64, map: &placement::DeviceMap) -> anyhow::Result<()> {
    let sizes = placement::module_sizes(shape, bytes)?;
    for (module, device) in &map.0 {
        println!("{module:<24} {device}");
    }
    let mut per_device: Vec<(String, u64)> = Vec::new();
    for (module, device) in &map.0 {
        let d = device.to_string();
        let b = sizes.get(module);
        match per_device.iter_mut().find(|(k, _)| *k == d) {
            Some((_, total)) => *total += b,
            None => per_device.push((d, b)),
        }
    }
    for (d, b) in per_device {
        println!("device {d}: {:.2} GiB", b as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}
