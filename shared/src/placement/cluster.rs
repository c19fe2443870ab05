//! Placement over a fleet: accelerate's rules with each worker as a device (its free memory
//! less a reserve for KV caches and activations as the budget), turned into pipeline stages —
//! contiguous layer ranges, the embedding with the first and the final norm and lm_head with
//! the last. Explicit maps (HF keys, worker values) are checked the same way.

use super::*;
use std::ops::Range;

/// One worker as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerBudget {
    pub id: String,
    /// Bytes this worker may hold for weights.
    pub bytes: u64,
}

/// One pipeline stage of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    /// Index into the workers the plan was made over.
    pub worker: usize,
    pub layers: Range<usize>,
    /// Weight bytes the stage holds (its layers, plus embedding / norm / lm_head at the ends).
    pub bytes: u64,
}

fn layer_of(key: &str) -> Option<usize> {
    key.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Bytes of each stage: its layers, the embedding on the first, norm, rotary buffers and the
/// head on the last (tied embeddings: the last stage holds the matrix too).
fn stage_bytes(sizes: &ModuleSizes, shape: &ModelShape, stages: &mut [StagePlan]) {
    let n = stages.len();
    for (i, st) in stages.iter_mut().enumerate() {
        let mut b: u64 = st.layers.clone().map(|l| sizes.get(&format!("model.layers.{l}"))).sum();
        if i == 0 {
            b += sizes.get("model.embed_tokens");
        }
        if i + 1 == n {
            b += sizes.get("model.norm") + sizes.get("model.rotary_emb") + sizes.get("lm_head");
            if shape.tie_word_embeddings && n > 1 {
                b += sizes.get("model.embed_tokens");
            }
        }
        st.bytes = b;
    }
}

/// Groups a per-layer worker assignment into stages; layers of one worker must be contiguous
/// and workers must follow each other in layer order.
fn stages_from_layers(assign: &[usize], num_workers: usize) -> Result<Vec<StagePlan>, String> {
    let mut stages: Vec<StagePlan> = Vec::new();
    for (l, &w) in assign.iter().enumerate() {
        if w >= num_workers {
            return Err(format!("model.layers.{l} is assigned to worker {w}, but there are {num_workers} workers"));
        }
        match stages.last_mut() {
            Some(st) if st.worker == w => st.layers.end = l + 1,
            _ => {
                if let Some(prev) = stages.iter().find(|s| s.worker == w) {
                    return Err(format!(
                        "worker {w} holds layers {}..{} and again layer {l}: a worker's layers must be contiguous",
                        prev.layers.start, prev.layers.end
                    ));
                }
                stages.push(StagePlan { worker: w, layers: l..l + 1, bytes: 0 });
            }
        }
    }
    Ok(stages)
}

/// Plans `shape` over `workers` with accelerate's `strategy`.
pub fn plan(shape: &ModelShape, dtype_bytes: u64, workers: &[WorkerBudget], strategy: Strategy) -> Result<Vec<StagePlan>, PlacementError> {
    if workers.is_empty() {
        return Err(PlacementError::DoesNotFit("there are no workers".into()));
    }
    let sizes = module_sizes(shape, dtype_bytes)?;
    let offered: u64 = workers.iter().map(|w| w.bytes).sum();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if offered < sizes.total() {
        return Err(PlacementError::DoesNotFit(format!(
            "it needs {:.2} GiB of weights, the {} worker(s) offer {:.2} GiB; {:.2} GiB is missing",
            gib(sizes.total()),
            workers.len(),
            gib(offered),
            gib(sizes.total() - offered)
        )));
    }
    let max_memory: Vec<(Device, u64)> = workers.iter().enumerate().map(|(i, w)| (Device::Index(i as u32), w.bytes)).collect();
    let map = infer_device_map(shape, dtype_bytes, &max_memory, strategy)?;
    let mut assign = Vec::with_capacity(shape.num_hidden_layers as usize);
    for l in 0..shape.num_hidden_layers {
        match map.device_of(&format!("model.layers.{l}")) {
            Some(Device::Index(i)) => assign.push(i as usize),
            other => {
                let largest = workers.iter().map(|w| w.bytes).max().unwrap_or(0);
                return Err(PlacementError::DoesNotFit(format!(
                    "model.layers.{l} would go to {} (a layer needs {:.3} GiB, the largest worker budget is {:.3} GiB)",
                    other.map_or("nowhere".to_string(), |d| d.to_string()),
                    gib(sizes.get(&format!("model.layers.{l}"))),
                    gib(largest)
                )));
            }
        }
    }
    for (key, d) in &map.0 {
        if !matches!(d, Device::Index(_)) {
            return Err(PlacementError::DoesNotFit(format!("{key} would go to {d}: no worker has room for it")));
        }
    }
    let mut stages = stages_from_layers(&assign, workers.len()).map_err(PlacementError::Internal)?;
    stage_bytes(&sizes, shape, &mut stages);
    Ok(stages)
}

/// Turns an explicit map (Hugging Face keys → worker index or id) into stages, checking that it
/// names only known workers and covers every layer exactly once.
pub fn from_explicit_map(
    shape: &ModelShape,
    dtype_bytes: u64,
    map: &serde_json::Value,
    worker_ids: &[String],
) -> Result<Vec<StagePlan>, PlacementError> {
    let bad = |m: String| PlacementError::BadDeviceMap(m);
    let obj = map.as_object().ok_or_else(|| bad("must be a JSON object of module name → worker".into()))?;
    let n = shape.num_hidden_layers as usize;
    let mut assign: Vec<Option<usize>> = vec![None; n];
    let resolve = |key: &str, v: &serde_json::Value| -> Result<usize, PlacementError> {
        match v {
            serde_json::Value::Number(num) => {
                let i = num.as_u64().ok_or_else(|| bad(format!("{key}: worker index {num} is not a non-negative integer")))? as usize;
                if i >= worker_ids.len() {
                    return Err(bad(format!("{key}: worker {i} does not exist (the fleet has {} workers)", worker_ids.len())));
                }
                Ok(i)
            }
            serde_json::Value::String(id) => worker_ids
                .iter()
                .position(|w| w == id)
                .ok_or_else(|| bad(format!("{key}: unknown worker {id:?} (workers: {})", worker_ids.join(", ")))),
            other => Err(bad(format!("{key}: expected a worker index or id, got {other}"))),
        }
    };
    let mut whole = None;
    for (key, v) in obj {
        let w = resolve(key, v)?;
        match key.as_str() {
            "" | "model" => whole = Some(w),
            "model.embed_tokens" | "model.norm" | "model.rotary_emb" | "lm_head" | "model.layers" => {}
            k => match layer_of(k) {
                Some(l) if l < n && k == format!("model.layers.{l}") => {
                    assign[l] = Some(w);
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (expected model.embed_tokens, model.layers.N with N < {n}, model.norm, lm_head)"
                    )))
                }
            },
        }
    }
    if let Some(w) = whole {
        for a in assign.iter_mut() {
            a.get_or_insert(w);
        }
    }
    if let Some(w) = obj.get("model.layers") {
        let w = resolve("model.layers", w)?;
        for a in assign.iter_mut() {
            a.get_or_insert(w);
        }
    }
    let missing: Vec<String> = assign.iter().enumerate().filter(|(_, a)| a.is_none()).map(|(l, _)| format!("model.layers.{l}")).collect();
    if !missing.is_empty() {
        return Err(bad(format!("no worker is given {}", missing.join(", "))));
    }
    let assign: Vec<usize> = assign.into_iter().map(|a| a.expect("checked")).collect();
    let mut stages = stages_from_layers(&assign, worker_ids.len()).map_err(bad)?;
    let sizes = module_sizes(shape, dtype_bytes)?;
    stage_bytes(&sizes, shape, &mut stages);
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(layers: u64) -> ModelShape {
        ModelShape::from_config_json(&serde_json::json!({
            "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 32000, "tie_word_embeddings": false
        }))
        .unwrap()
    }

    fn workers(n: usize, gib: u64) -> Vec<WorkerBudget> {
        (0..n).map(|i| WorkerBudget { id: format!("w{i}"), bytes: gib << 30 }).collect()
    }

    #[test]
    fn auto_spreads_over_every_worker_in_contiguous_stages() {
        for n in 1..=4 {
            let stages = plan(&shape(28), 2, &workers(n, 40), Strategy::Auto).unwrap();
            assert_eq!(stages.len(), n, "{stages:?}");
            assert_eq!(stages[0].layers.start, 0);
            assert_eq!(stages.last().unwrap().layers.end, 28);
            for w in stages.windows(2) {
                assert_eq!(w[0].layers.end, w[1].layers.start);
                assert!(w[0].worker < w[1].worker);
            }
        }
    }

    #[test]
    fn sequential_fills_the_first_worker_first() {
        let stages = plan(&shape(28), 2, &workers(3, 40), Strategy::Sequential).unwrap();
        assert_eq!(stages.len(), 1, "{stages:?}");
    }

    #[test]
    fn too_little_memory_says_how_much_is_missing() {
        let err = plan(&shape(28), 2, &workers(2, 0), Strategy::Auto).unwrap_err().to_string();
        assert!(err.contains("does not fit") && err.contains("missing"), "{err}");
    }

    #[test]
    fn explicit_maps_are_checked() {
        let ids: Vec<String> = vec!["a".into(), "b".into()];
        let s = shape(4);
        let ok = serde_json::json!({"model.embed_tokens": 0, "model.layers.0": "a", "model.layers.1": 0, "model.layers.2": "b", "model.layers.3": 1, "model.norm": 1, "lm_head": 1});
        let stages = from_explicit_map(&s, 2, &ok, &ids).unwrap();
        assert_eq!(stages.iter().map(|s| (s.worker, s.layers.clone())).collect::<Vec<_>>(), vec![(0, 0..2), (1, 2..4)]);
        let err = |v: serde_json::Value| from_explicit_map(&s, 2, &v, &ids).unwrap_err().to_string();
        assert!(err(serde_json::json!({"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1})).contains("model.layers.3"));
        assert!(err(serde_json::json!({"model.layers.0": "zed"})).contains("zed"));
        assert!(err(serde_json::json!({"model.layers.0": 5})).contains("worker 5"));
        assert!(err(serde_json::json!({"model.layers.9": 0})).contains("model.layers.9"));
        assert!(err(serde_json::json!({"model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 0, "model.layers.3": 1}))
            .contains("contiguous"));
        let whole = from_explicit_map(&s, 2, &serde_json::json!({"": "b"}), &ids).unwrap();
        assert_eq!((whole.len(), whole[0].worker, whole[0].layers.clone()), (1, 1, 0..4));
    }
}
