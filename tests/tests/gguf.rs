//! GGUF checkpoints through real clusters: a folder holding one GGUF file serves with no other
//! file. Dequantized (`--dtype f32 --dequantize`) it gives transformers' greedy tokens for that
//! file (`gguf_file=`) in one worker and two stages; in its block types it serves in every layout
//! (one worker, two stages, `--tp 2`) exactly as the file runs in one process, and operators see
//! its types. Flags that do not apply to a GGUF file are refused before anything loads.

use candle_core::{DType, Device};
use shardserve::model::{Shard, StageSpec};
use shardserve_tests::*;
use std::path::PathBuf;

/// The GGUF fixtures: a folder holding only the file, and transformers' outputs for it.
fn fixture(name: &str) -> (PathBuf, serde_json::Value) {
    let dir = fixtures().join("gguf").join(name);
    let path = fixtures().join("gguf").join(format!("{name}.reference.json"));
    let doc = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (dir, doc)
}

fn cases(doc: &serde_json::Value) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = |k: &str| serde_json::from_value::<Vec<u32>>(c[k].clone()).unwrap();
            (c["prompt"].as_str().unwrap().to_string(), ids("input_ids"), ids("new_ids"))
        })
        .collect()
}

/// Greedy tokens of the GGUF file in `dir`, run in its block types in this process.
fn in_process(dir: &std::path::Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let files = shardserve::hub::resolve(dir.to_str().unwrap(), None).unwrap();
    let cfg = files.config().unwrap();
    let shard = Shard::load(&cfg, StageSpec::whole(&cfg), &files.weights(), DType::F32, &Device::Cpu).unwrap();
    greedy_in_process(&shard, prompt, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dequantized_gguf_file_gives_transformers_tokens_in_one_worker_and_two_stages() {
    for name in ["tiny-qwen3-gguf", "tiny-llama-gguf"] {
        let (dir, doc) = fixture(name);
        for workers in [1, 2] {
            let cluster = Cluster::new(&dir).workers(workers).arg("--dtype").arg("f32").arg("--dequantize").start();
            let mut c = cluster.client().await;
            for (prompt, _, want) in cases(&doc) {
                let got = generate(&mut c, greedy(&prompt, 32)).await.unwrap().token_ids;
                assert_eq!(got, want, "{name}, {workers} worker(s): {prompt:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_file_serves_in_its_block_types_in_every_layout() {
    let (dir, doc) = fixture("tiny-qwen3-gguf");
    let cases = cases(&doc);
    let want: Vec<Vec<u32>> = cases.iter().map(|(_, ids, _)| in_process(&dir, ids, 24)).collect();
    // In its block types the model is not the dequantized one: some case differs somewhere.
    assert!(cases.iter().zip(&want).any(|((_, _, t), w)| t[..w.len().min(t.len())] != w[..w.len().min(t.len())]), "no token changed");
    for (workers, tp) in [(1, 1), (2, 1), (2, 2)] {
        let cluster = Cluster::new(&dir).workers(workers).arg("--tp").arg(&tp.to_string()).start();
        let mut c = cluster.client().await;
        for ((prompt, _, _), want) in cases.iter().zip(&want) {
            let got = generate(&mut c, greedy(prompt, 24)).await.unwrap().token_ids;
            assert_eq!(&got, want, "{workers} workers, tp {tp}: {prompt:?}");
        }
        if (workers, tp) == (1, 1) {
            assert_quantization_shown(&cluster.url, "gguf q8_0+q4_0");
        }
    }
}

#[test]
fn flags_that_do_not_apply_to_a_gguf_file_are_refused_before_anything_loads() {
    let (dir, _) = fixture("tiny-qwen3-gguf");
    let refused = |b: ClusterBuilder| match b.try_start() {
        Ok(_) => panic!("accepted"),
        Err((why, stderr)) => format!("{why}\n{stderr}"),
    };
    let e = refused(Cluster::new(&dir).arg("--quantize").arg("q8_0"));
    assert!(e.contains("--quantize q8_0 applies to safetensors checkpoints") && e.contains("--dequantize"), "{e}");
    let e = refused(Cluster::new(reference_model()).arg("--dequantize"));
    assert!(e.contains("--dequantize applies to GGUF checkpoints"), "{e}");
    let e = refused(Cluster::new(&dir).arg("--gguf-file").arg("other.gguf"));
    assert!(e.contains("no GGUF file other.gguf"), "{e}");
}

/// The planner sizes a GGUF file's projections at their blocks' bytes, and at the dtype's with
/// `--dequantize`: one worker offering the midpoint of the two sizes holds the file in its block
/// types, and is refused it dequantized, before anything loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_places_a_gguf_file_by_the_bytes_its_workers_hold() {
    use shardserve::placement::{module_sizes, ModelShape};
    let (dir, doc) = fixture("tiny-qwen3-gguf");
    let g = shardserve::gguf::Gguf::open(&dir.join(doc["file"].as_str().unwrap())).unwrap();
    let mut shape = ModelShape::from_config_json(&g.config_json().unwrap()).unwrap();
    let full = module_sizes(&shape, 4).unwrap().total();
    shape.quantized = g.block_types(false);
    let held = module_sizes(&shape, 4).unwrap().total();
    let each = (full + held) / 2;
    let budget = |b: ClusterBuilder| b.arg("--dtype").arg("f32").arg("--max-memory").arg(&format!("0={each}"));
    let cluster = budget(Cluster::new(&dir)).start();
    let got = placement(&cluster).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].bytes <= each, "the stage holds {} bytes, more than its budget of {each}", got[0].bytes);
    drop(cluster);
    let (why, stderr) = match budget(Cluster::new(&dir)).arg("--dequantize").try_start() {
        Ok(_) => panic!("{full} bytes dequantized were placed on a worker of {each}"),
        Err(e) => e,
    };
    assert!(stderr.contains("does not fit"), "{why}\n{stderr}");
}

/// A GGUF file loaded at run time (`models load --gguf-file --dequantize`) from a folder holding
/// two: the named file serves transformers' tokens beside the coordinator's own model, and
/// without `--gguf-file` the load is refused naming both files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_file_loaded_at_run_time_serves_the_file_it_names() {
    let gguf = fixtures().join("gguf");
    let (qwen, llama) = ("tiny-qwen3-Q8_0-Q4_0.gguf", "tiny-llama-Q8_0-Q4_0.gguf");
    let both = tempfile::tempdir().unwrap();
    std::fs::copy(gguf.join("tiny-qwen3-gguf").join(qwen), both.path().join(qwen)).unwrap();
    std::fs::copy(gguf.join("tiny-llama-gguf").join(llama), both.path().join(llama)).unwrap();
    let folder = both.path().to_str().unwrap();
    let cluster = Cluster::new(reference_model()).workers(2).start();

    let out =
        run_shardctl(&["models", "load", folder, "--name", "q", "--coordinator", &cluster.url], &[], std::time::Duration::from_secs(60));
    assert!(!out.status.success() && out.stderr.contains(qwen) && out.stderr.contains(llama), "{}\n{}", out.stdout, out.stderr);

    let args = [
        "models",
        "load",
        folder,
        "--name",
        "q",
        "--gguf-file",
        qwen,
        "--dequantize",
        "--dtype",
        "f32",
        "--json",
        "--coordinator",
        &cluster.url,
    ];
    let out = run_shardctl(&args, &[], std::time::Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.stderr);
    let loaded: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(loaded["model"]["state"], "ready", "{loaded}");
    let mut c = cluster.client().await;
    let (_, doc) = fixture("tiny-qwen3-gguf");
    for (prompt, _, want) in cases(&doc).into_iter().take(3) {
        let mut req = greedy(&prompt, 32);
        req.model = "q".into();
        assert_eq!(generate(&mut c, req).await.unwrap().token_ids, want, "{prompt:?}");
    }
    let case = &reference_cases()[0];
    assert_eq!(generate(&mut c, greedy(&case.prompt, 32)).await.unwrap().token_ids, case.new_ids, "the coordinator's own model");
}
