//! FP8 checkpoints (projections in F8_E4M3 with a `weight_scale_inv` per block, as Qwen's
//! `*-FP8` checkpoints ship them) through real clusters: dequantized per block at load, they give
//! transformers' greedy tokens for the dequantized weights in one worker, two stages and `--tp 2`
//! (whose slices cut the fixture's 32x48 blocks); `--quantize q8_0` re-quantizes them.

use shardserve_tests::*;
use std::path::PathBuf;

/// The FP8 fixture (made by `shardctl dev tiny-model --fp8 32x48`) and transformers' outputs
/// for it (`tests/python/fp8_reference.py`).
fn fixture() -> (PathBuf, Vec<(String, Vec<u32>)>) {
    let dir = fixtures().join("fp8").join("tiny-qwen3-fp8");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("fp8").join("tiny-qwen3-fp8.reference.json")).unwrap()).unwrap();
    let cases = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["prompt"].as_str().unwrap().to_string(), serde_json::from_value(c["new_ids"].clone()).unwrap()))
        .collect();
    (dir, cases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp8_checkpoint_gives_transformers_tokens_in_every_layout() {
    let (dir, cases) = fixture();
    assert_eq!(cases.len(), 8);
    for (workers, tp) in [(1, 1), (2, 1), (2, 2)] {
        let cluster = Cluster::new(&dir).workers(workers).arg("--tp").arg(&tp.to_string()).arg("--dtype").arg("f32").start();
        let mut c = cluster.client().await;
        for (prompt, want) in &cases {
            let got = generate(&mut c, greedy(prompt, 32)).await.unwrap().token_ids;
            assert_eq!(&got, want, "{workers} worker(s), tp {tp}: {prompt:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp8_checkpoint_requantized_at_load_serves_in_q8_0() {
    let (dir, cases) = fixture();
    let cluster = Cluster::new(&dir).workers(2).arg("--quantize").arg("q8_0").start();
    let mut c = cluster.client().await;
    let mut same = 0;
    for (prompt, want) in &cases {
        let got = generate(&mut c, greedy(prompt, 32)).await.unwrap().token_ids;
        assert_eq!(got.len(), want.len(), "{prompt:?}");
        same += usize::from(&got == want);
    }
    // Re-quantized, the model is not the dequantized one: some case differs somewhere.
    assert!(same < cases.len(), "q8_0 changed no token of any case");
    assert_quantization_shown(&cluster.url, "q8_0");
}

#[test]
fn fp8_weights_without_their_quantization_config_are_refused_by_name() {
    let (dir, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&path, config.to_string()).unwrap();
    let (why, stderr) = match Cluster::new(tmp.path()).try_start() {
        Ok(_) => panic!("FP8 weights were read without their scales"),
        Err(e) => e,
    };
    assert!(stderr.contains("_proj.weight: it is F8_E4M3, but config.json has no fp8 quantization_config"), "{why}\n{stderr}");
}
