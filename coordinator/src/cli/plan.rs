//! `shardctl plan`: the device map transformers' `from_pretrained(..., device_map=...)` would
//! produce for a model, from its config.json alone.

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
    /// dtype the sizes are computed in: auto (config.json's), float32/f32, bfloat16/bf16, float16/f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// auto (= balanced), balanced, balanced_low_0 or sequential.
    #[arg(long, default_value = "auto")]
    pub strategy: String,
    /// Print exactly accelerate's dict as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The dtype width in bytes: config.json's `torch_dtype`/`dtype` under `auto`, else f32.
pub fn dtype_bytes_for(dtype: &str, config: &serde_json::Value) -> anyhow::Result<u64> {
    let name = if dtype == "auto" {
        config
            .get("torch_dtype")
            .or_else(|| config.get("dtype"))
            .and_then(|v| v.as_str())
            .unwrap_or("float32")
            .to_string()
    } else {
        dtype.to_string()
    };
    Ok(placement::dtype_bytes(&name)?)
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
    let bytes = dtype_bytes_for(&a.dtype, &config)?;
    let map = placement::infer_device_map(&shape, bytes, &max_memory, strategy)?;
    if a.json {
        println!("{}", map.to_json_string());
        return Ok(());
    }
    let sizes = placement::module_sizes(&shape, bytes)?;
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
