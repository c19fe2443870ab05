//! `shardctl bench --baseline`: candle-transformers' own model on the same weights, run in this
//! process as a batch of equal prompts, greedy, a token per sequence per forward.

use super::Sample;
use anyhow::{anyhow, bail, Context};
use std::time::Instant;

/// candle-transformers' own model for the architectures the baseline supports.
enum Baseline {
    Qwen3(candle_transformers::models::qwen3::ModelForCausalLM),
    Llama(candle_transformers::models::llama::Llama, candle_transformers::models::llama::Config),
}

/// Where and how the baseline runs.
#[derive(Debug, Clone)]
pub(super) struct BaselineSetup {
    pub(super) files: shardserve::hub::ModelFiles,
    pub(super) device: candle_core::Device,
    pub(super) dtype: candle_core::DType,
    pub(super) random: bool,
}

fn load_baseline(setup: &BaselineSetup) -> anyhow::Result<Baseline> {
    use candle_transformers::models::{llama, qwen3};
    let files = &setup.files;
    let (dtype, device) = (setup.dtype, &setup.device);
    let text = std::fs::read_to_string(files.file("config.json")).context("reading config.json of the baseline")?;
    let value: serde_json::Value = serde_json::from_str(&text).context("parsing config.json of the baseline")?;
    let arch = value["architectures"][0].as_str().unwrap_or("").to_string();
    let vb = if setup.random {
        let cfg = shardserve::config::ModelConfig::from_file(&files.file("config.json"))?;
        let shapes = shardserve::model::checkpoint_shapes(&cfg);
        candle_nn::VarBuilder::from_tensors(shardserve::model::random_tensors(&shapes, dtype, device, 0)?, dtype, device)
    } else {
        let weights: Vec<_> =
            shardserve::hub::weight_files(&files.dir).map_err(|e| anyhow!("{e}"))?.into_iter().map(|f| files.dir.join(f)).collect();
        #[allow(unsafe_code)]
        // SAFETY: the checkpoint is only read; nothing in this process writes these files while mapped.
        unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&weights, dtype, device)?
        }
    };
    match arch.as_str() {
        "Qwen3ForCausalLM" => {
            let cfg: qwen3::Config = serde_json::from_str(&text).context("config.json as a Qwen3 config")?;
            Ok(Baseline::Qwen3(qwen3::ModelForCausalLM::new(&cfg, vb)?))
        }
        "LlamaForCausalLM" => {
            let lc: llama::LlamaConfig = serde_json::from_str(&text).context("config.json as a Llama config")?;
            let cfg = lc.into_config(false);
            Ok(Baseline::Llama(llama::Llama::load(vb, &cfg)?, cfg))
        }
        other => bail!("--baseline supports Qwen3ForCausalLM and LlamaForCausalLM, not {other:?}"),
    }
}

fn argmax(logits: &candle_core::Tensor) -> anyhow::Result<u32> {
    // The token comes back to the host each step, as it does from a serving worker.
    Ok(shardserve::sampling::argmax(&logits.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?))
}

/// Loads the baseline and runs it `runs` times (after one short unmeasured run) on a batch of
/// `batch` copies of `prompt`: one sample per sequence.
pub(super) fn measure_baseline(
    setup: &BaselineSetup,
    prompt: &[u32],
    n: usize,
    batch: usize,
    runs: usize,
) -> anyhow::Result<(Vec<Sample>, f64)> {
    let mut m = load_baseline(setup).with_context(|| format!("loading the baseline {}", setup.files.spec))?;
    baseline_once(&mut m, setup, prompt, 2.min(n), batch)?;
    let start = Instant::now();
    let mut samples = Vec::with_capacity(runs * batch);
    for _ in 0..runs {
        samples.extend(baseline_once(&mut m, setup, prompt, n, batch)?);
    }
    Ok((samples, start.elapsed().as_secs_f64()))
}

/// Greedy generation of `n` tokens for a batch of `batch` copies of `prompt`: prefill in one
/// forward, then one token per sequence per forward.
fn baseline_once(model: &mut Baseline, setup: &BaselineSetup, prompt: &[u32], n: usize, batch: usize) -> anyhow::Result<Vec<Sample>> {
    use candle_core::Tensor;
    let device = &setup.device;
    let mut llama_cache = None;
    match model {
        Baseline::Qwen3(m) => m.clear_kv_cache(),
        Baseline::Llama(_, cfg) => llama_cache = Some(candle_transformers::models::llama::Cache::new(true, setup.dtype, cfg, device)?),
    }
    let mut forward = |ids: Vec<u32>, len: usize, pos: usize| -> anyhow::Result<Vec<u32>> {
        let input = Tensor::from_vec(ids, (batch, len), device)?;
        let logits = match model {
            Baseline::Qwen3(m) => m.forward(&input, pos)?,
            Baseline::Llama(m, _) => m.forward(&input, pos, llama_cache.as_mut().expect("a llama cache"))?,
        };
        // The tokens come back to the host each step, as they do from a serving worker.
        let logits = logits.flatten_to(0)?.reshape((batch, ()))?;
        (0..batch).map(|b| argmax(&logits.get(b)?)).collect()
    };
    let start = Instant::now();
    let mut tokens = forward(prompt.repeat(batch), prompt.len(), 0)?;
    let mut last = Instant::now();
    let mut samples: Vec<Sample> =
        tokens.iter().map(|&t| Sample { ttft: (last - start).as_secs_f64(), token_ids: vec![t], ..Default::default() }).collect();
    for i in 1..n {
        tokens = forward(tokens, 1, prompt.len() + i - 1)?;
        let now = Instant::now();
        for (s, &t) in samples.iter_mut().zip(&tokens) {
            s.itl.push((now - last).as_secs_f64());
            s.token_ids.push(t);
        }
        last = now;
    }
    for s in &mut samples {
        s.tokens = s.token_ids.len();
        s.total = (last - start).as_secs_f64();
    }
    Ok(samples)
}
