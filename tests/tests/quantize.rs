//! `--quantize` through real clusters: every layout (one worker, two stages, `--tp 2`) serves the
//! quantized model exactly as it runs in one process, holds the quantized bytes, and a type whose
//! blocks the model's rows would cut is refused before anything loads.

use candle_core::{DType, Device};
use shardserve::config::ModelConfig;
use shardserve::model::{Shard, StageSpec};
use shardserve::quant::Quantize;
use shardserve_tests::*;

/// Greedy tokens of the reference model with its projections quantized to `q`, in this process.
fn in_process(q: Quantize, prompt: &[u32], n: usize) -> Vec<u32> {
    let dir = reference_model();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let shard = Shard::load(&cfg, StageSpec { quantize: Some(q), ..StageSpec::whole(&cfg) }, &dir, DType::F32, &Device::Cpu).unwrap();
    greedy_in_process(&shard, prompt, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layout_serves_the_quantized_model_and_holds_its_bytes() {
    let cases = reference_cases();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| in_process(Quantize::Q8_0, &c.input_ids, 24)).collect();
    // Quantized, the model is not transformers' any more: some case differs somewhere.
    assert!(cases.iter().zip(&want).any(|(c, w)| c.new_ids[..24] != w[..]), "q8_0 changed no token of any case");
    let full = {
        let one = Cluster::new(reference_model()).start();
        placement(&one).await.iter().map(|s| s.bytes).sum::<u64>()
    };
    for (workers, tp) in [(1, 1), (2, 1), (2, 2)] {
        let cluster =
            Cluster::new(reference_model()).workers(workers).arg("--tp").arg(&tp.to_string()).arg("--quantize").arg("q8_0").start();
        let mut c = cluster.client().await;
        for (case, want) in cases.iter().zip(&want) {
            let got = generate(&mut c, greedy(&case.prompt, 24)).await.unwrap().token_ids;
            assert_eq!(&got, want, "{workers} workers, tp {tp}: {:?}", case.prompt);
        }
        let held: u64 = placement(&cluster).await.iter().map(|s| s.bytes).sum();
        assert!(held * 10 < full * 6, "{workers} workers, tp {tp}: {held} bytes held, {full} unquantized");
        if (workers, tp) == (1, 1) {
            assert_quantization_shown(&cluster.url, "q8_0");
        }
    }
}

#[test]
fn a_type_that_cuts_the_models_blocks_is_refused_before_anything_loads() {
    let (why, stderr) = match Cluster::new(reference_model()).arg("--quantize").arg("q4_k").try_start() {
        Ok(_) => panic!("q4_k was accepted for rows of 64 weights"),
        Err(e) => e,
    };
    assert!(stderr.contains("--quantize q4_k") && stderr.contains("q8_0 or q4_0 does"), "{why}\n{stderr}");
}

/// The planner sizes a quantized model at its blocks' bytes: two workers each offering less than
/// the model holds in f32 but more than it holds in q8_0, placed first-fit (`--strategy
/// sequential`): the q8_0 model is one stage on the first worker, the f32 model two stages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_places_a_quantized_model_by_its_quantized_bytes() {
    use shardserve::placement::{module_sizes, ModelShape};
    let raw = serde_json::from_str(&std::fs::read_to_string(reference_model().join("config.json")).unwrap()).unwrap();
    let shape = ModelShape::from_config_json(&raw).unwrap();
    let full = module_sizes(&shape, 4).unwrap().total();
    let q8_0 = module_sizes(&shape.with_projections_in(Quantize::Q8_0.block_type()).unwrap(), 4).unwrap().total();
    let each = (full + q8_0) / 2;
    let max_memory = format!("0={each},1={each}");
    let case = &reference_cases()[0];
    for (quantize, stages) in [(Some("q8_0"), 1), (None, 2)] {
        let mut b = Cluster::new(reference_model()).workers(2).arg("--strategy").arg("sequential").arg("--max-memory").arg(&max_memory);
        if let Some(q) = quantize {
            b = b.arg("--quantize").arg(q);
        }
        let cluster = b.start();
        let got = placement(&cluster).await;
        let layers: Vec<(u32, u32)> = got.iter().map(|s| (s.layer_start, s.layer_end)).collect();
        assert_eq!(got.len(), stages, "--quantize {quantize:?}, two workers of {each} bytes ({full} in f32, {q8_0} in q8_0): {layers:?}");
        if quantize.is_some() {
            assert!(got[0].bytes <= each, "the q8_0 stage holds {} bytes, more than its budget of {each}", got[0].bytes);
        }
        let r = generate(&mut cluster.client().await, greedy(&case.prompt, 8)).await.unwrap();
        assert_eq!(r.token_ids.len(), 8, "{quantize:?}");
    }
}
