//! Tensor parallelism in one process: ranks on threads, joined by the TCP collective, give the
//! logits and greedy tokens of the whole model, and each rank reads only its slices.

use candle_core::{DType, Device};
use shardserve::collective::TpRank;
use shardserve::config::{Architecture, ModelConfig};
use shardserve::model::{Shard, StageInput, StageOutput, StageSpec};
use shardserve::tiny::{self, TinySpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;
use common::TpStage;

fn fixture() -> PathBuf {
    match std::env::var_os("SHARDSERVE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
    .join("hf-reference/tiny-qwen3")
}

fn load(dir: &Path, spec: StageSpec) -> Shard {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Shard::load(&cfg, spec, dir, DType::F32, &Device::Cpu).unwrap()
}

fn whole(dir: &Path) -> StageSpec {
    StageSpec::whole(&ModelConfig::from_file(&dir.join("config.json")).unwrap())
}

/// Greedy decoding of `n` tokens; returns the tokens and the logits of every step.
fn greedy(run: &mut dyn FnMut(&[u32], usize) -> Vec<f32>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut tokens, mut all) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let l = run(&feed, pos);
        pos += feed.len();
        let t = shardserve::sampling::argmax(&l);
        tokens.push(t);
        all.push(l);
        feed = vec![t];
    }
    (tokens, all)
}

fn check(dir: &Path, tp: usize) {
    let prompt = [42u32, 71, 401, 81, 14, 391];
    let single = load(dir, whole(dir));
    let mut cache = single.new_pool(64, 16).unwrap();
    let (want, want_logits) = greedy(
        &mut |t, _| match single.forward(&mut cache, 0, StageInput::Tokens(t)).unwrap() {
            StageOutput::Logits(l) => l.to_vec1().unwrap(),
            StageOutput::Hidden(_) => unreachable!(),
        },
        &prompt,
        10,
    );
    let d = dir.to_path_buf();
    let mut stage = TpStage::new(whole(dir), tp, Arc::new(move |spec| load(&d, spec)));
    let (got, got_logits) = greedy(&mut |t, _| stage.step(t), &prompt, 10);
    assert_eq!(got, want, "tp={tp}");
    for (a, b) in got_logits.iter().zip(&want_logits) {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "tp={tp}: logits differ by {d}");
    }
    let leader_bytes = stage.leader.report().bytes;
    let followers = stage.finish();
    // Each rank reads its slice of every layer: a follower (no lm_head) holds less than
    // 1/tp of the layers plus the embedding.
    let full = single.report().bytes;
    for f in &followers {
        assert!(f.report().bytes < full / tp as u64 + full / 2, "{} of {full}", f.report().bytes);
        assert!(!f.report().tensors.iter().any(|t| t.starts_with("model.norm") || t.starts_with("lm_head")));
    }
    assert!(leader_bytes < full, "{leader_bytes} of {full}");
}

#[test]
fn tp2_and_tp4_equal_one_rank_on_the_transformers_fixture() {
    check(&fixture(), 2);
    // 4 ranks over 2 key/value heads: each kv head is replicated on two ranks.
    check(&fixture(), 4);
}

#[test]
fn tp2_equals_one_rank_for_llama_and_qwen2_with_biases() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let d = tempfile::tempdir().unwrap();
        let mut spec = TinySpec::new(arch);
        spec.seed = 5;
        spec.shards = 2;
        tiny::write(d.path(), &spec).unwrap();
        check(d.path(), 2);
    }
}

#[test]
fn a_rank_reads_only_its_rows_and_columns() {
    let dir = fixture();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let spec = StageSpec::new(0..3, 0, 2).with_tp(TpRank { rank: 1, size: 2 });
    let split = shardserve::collective::tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, spec.tp).unwrap();
    let d = cfg.head_dim;
    let slice = |name: &str, shape: &[usize]| spec.slice_of(&split, d, name, shape);
    assert_eq!(slice("model.layers.0.self_attn.q_proj.weight", &[4 * d, 64]), Some((0, 2 * d..4 * d)));
    assert_eq!(slice("model.layers.0.self_attn.k_proj.weight", &[2 * d, 64]), Some((0, d..2 * d)));
    assert_eq!(slice("model.layers.0.self_attn.o_proj.weight", &[64, 4 * d]), Some((1, 2 * d..4 * d)));
    assert_eq!(slice("model.layers.0.mlp.up_proj.weight", &[192, 64]), Some((0, 96..192)));
    assert_eq!(slice("model.layers.0.mlp.down_proj.weight", &[64, 192]), Some((1, 96..192)));
    assert_eq!(slice("model.layers.0.input_layernorm.weight", &[64]), None);
    assert_eq!(slice("model.embed_tokens.weight", &[512, 64]), None);
    let shard = load(&dir, spec);
    let full = load(&dir, StageSpec::new(0..3, 0, 2));
    // The embedding and the norms are whole; the rest of the three layers is halved.
    let embed = 512 * 64 * 4;
    let norms_per_layer = (2 * 64 + 2 * d as u64) * 4;
    assert_eq!(shard.report().bytes - embed, (full.report().bytes - embed - 3 * norms_per_layer) / 2 + 3 * norms_per_layer);
}

#[test]
fn a_tp_size_that_does_not_divide_the_heads_is_a_clear_error() {
    let dir = fixture();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let err = Shard::load(&cfg, whole(&dir).with_tp(TpRank { rank: 0, size: 3 }), &dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("num_attention_heads (4)"), "{err}");
}
