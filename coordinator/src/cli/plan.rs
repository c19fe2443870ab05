//! `shardctl plan`: the device map transformers' `from_pretrained(..., device_map=...)` would
//! produce for a model, from its config.json alone.

use shardserve::dtype::Dtype;
use anyhow::Context;
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
    let path = shardserve::hub::resolve_config(&a.model, a.revision.as_deref())?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let shape = ModelShape::from_config_json(&config)?;
    let strategy: Strategy = a.strategy.parse()?;
    let max_memory = placement::parse_max_memory(&a.max_memory)?;
    let bytes = dtype_bytes_for(a.dtype, &config);
    anyhow::ensure!(a.tp >= 1, "--tp must be at least 1");
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
        println!(
            "{{\"device_map\": {}, \"tp\": {}, \"groups\": {}}}",
            map.to_json_string(),
            a.tp,
            serde_json::to_string(&groups)?
        );
        return Ok(());
    }
    print_map(&shape, bytes, &map)?;
    for (g, devices) in groups.iter().enumerate() {
        let list: Vec<String> = devices.iter().map(u32::to_string).collect();
        println!("group {g}: devices {} (tensor-parallel ranks 0..{})", list.join(","), a.tp);
    }
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
