//! The sharded model against the references: transformers' own outputs for the tiny Qwen3
//! fixture, and candle-transformers' Qwen3 and Llama on generated checkpoints.

use candle_core::{DType, Device, Tensor};
use shardserve::config::{Architecture, ModelConfig};
use shardserve::model::{KvPool, Shard, StageInput, StageOutput, StageSpec};
use shardserve::tiny::{self, TinySpec};
use shardserve::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    match std::env::var_os("SHARDSERVE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
}

fn load(dir: &Path, spec: Option<StageSpec>) -> Shard {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let spec = spec.unwrap_or_else(|| StageSpec::whole(&cfg));
    Shard::load(&cfg, spec, dir, DType::F32, &Device::Cpu).unwrap()
}

fn logits(out: StageOutput) -> Vec<f32> {
    match out {
        StageOutput::Logits(l) => l.to_vec1().unwrap(),
        StageOutput::Hidden(_) => panic!("the last stage returned hidden states"),
    }
}

fn argmax(v: &[f32]) -> u32 {
    shardserve::sampling::argmax(v)
}

/// Greedy decoding through a chain of stages, as the pipeline runs it.
fn greedy(stages: &[Shard], prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut caches: Vec<KvPool> = stages.iter().map(|s| s.new_pool(64, 16).unwrap()).collect();
    let mut out = Vec::new();
    let mut first_logits = Vec::new();
    let mut feed = prompt.to_vec();
    for step in 0..n {
        let mut input = StageInput::Tokens(&feed);
        let mut result = None;
        for (s, c) in stages.iter().zip(caches.iter_mut()) {
            match s.forward(c, 0, input).unwrap() {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                l @ StageOutput::Logits(_) => {
                    result = Some(logits(l));
                    input = StageInput::Tokens(&[]);
                }
            }
        }
        let l = result.unwrap();
        if step == 0 {
            first_logits = l.clone();
        }
        let t = argmax(&l);
        out.push(t);
        feed = vec![t];
    }
    (out, first_logits)
}

#[test]
fn tiny_qwen3_matches_transformers() {
    let dir = fixtures().join("hf-reference/tiny-qwen3");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("hf-reference/tiny-qwen3.reference.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = load(&dir, None);
    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let new_ids: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
        let want_logits: Vec<f32> = serde_json::from_value(case["last_logits"].clone()).unwrap();
        assert_eq!(tok.encode(prompt).unwrap(), ids, "tokenization of {prompt:?}");
        let (got, first) = greedy(std::slice::from_ref(&model), &ids, new_ids.len());
        assert_eq!(got, new_ids, "greedy tokens for {prompt:?}");
        let max_diff = first.iter().zip(&want_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-3, "last logits of {prompt:?} differ by {max_diff}");
        assert_eq!(tok.decode(&got).unwrap(), case["text"].as_str().unwrap());
    }
}

#[test]
fn pipeline_stages_equal_one_stage() {
    let dir = fixtures().join("hf-reference/tiny-qwen3");
    let whole = load(&dir, None);
    let prompt = [42, 71, 401, 81, 14, 391];
    let (want, _) = greedy(std::slice::from_ref(&whole), &prompt, 12);
    for split in [vec![0..3, 3..6], vec![0..1, 1..4, 4..6], vec![0..2, 2..3, 3..5, 5..6]] {
        let n = split.len();
        let stages: Vec<Shard> = split.into_iter().enumerate().map(|(i, r)| load(&dir, Some(StageSpec::new(r, i, n)))).collect();
        let (got, _) = greedy(&stages, &prompt, 12);
        assert_eq!(got, want, "{n} stages");
    }
}

/// Greedy decoding of many prompts as one batch through a chain of stages: sequence `i` joins
/// at step `i % 3`, so steps mix prefill chunks of up to `chunk` tokens with decode rows.
fn greedy_batched(stages: &[Shard], prompts: &[Vec<u32>], n: usize, chunk: usize) -> Vec<Vec<u32>> {
    use shardserve::model::{BatchInput, BatchOutput, SeqStep};
    let mut pools: Vec<KvPool> = stages.iter().map(|s| s.new_pool(128, 4).unwrap()).collect();
    let ids: Vec<u64> = (0..prompts.len() as u64).map(|i| 1000 + i * 7).collect();
    for p in pools.iter_mut() {
        for &id in &ids {
            p.insert(id);
        }
    }
    let mut fed = vec![0usize; prompts.len()];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut mixed = false;
    for step in 0.. {
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        let mut which = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            if step < i % 3 || out[i].len() == n {
                continue;
            }
            let feed: Vec<u32> =
                if fed[i] < p.len() { p[fed[i]..p.len().min(fed[i] + chunk)].to_vec() } else { vec![*out[i].last().unwrap()] };
            let logits = fed[i] + feed.len() >= p.len();
            seqs.push(SeqStep { id: ids[i], tokens: feed.len(), logits, embed: false });
            fed[i] += feed.len();
            tokens.extend(feed);
            which.push((i, logits));
        }
        if seqs.is_empty() {
            break;
        }
        mixed |= seqs.iter().any(|s| s.tokens > 1) && seqs.iter().any(|s| s.tokens == 1);
        let mut input = BatchInput::Tokens(&tokens);
        let mut logits = None;
        for (s, pool) in stages.iter().zip(pools.iter_mut()) {
            match s.forward_batch(pool, &seqs, input).unwrap() {
                BatchOutput::Hidden(h) => input = BatchInput::Hidden(h),
                BatchOutput::Logits(l) | BatchOutput::Embedded { logits: l, .. } => {
                    logits = Some(l);
                    input = BatchInput::Tokens(&[]);
                }
            }
        }
        let logits = logits.unwrap();
        let mut row = 0;
        for (i, sampled) in which {
            if sampled {
                let l: Vec<f32> = logits.get(row).unwrap().to_vec1().unwrap();
                out[i].push(argmax(&l));
                row += 1;
            }
        }
    }
    assert!(mixed, "no step mixed prefill and decode rows");
    for (pool, s) in pools.iter_mut().zip(stages) {
        let held: usize = ids.iter().map(|&id| pool.len_of(id).unwrap()).sum();
        let want: usize = prompts.iter().map(|p| p.len() + n - 1).sum();
        assert_eq!(held, want, "tokens held on a stage of {:?}", s.spec().layers);
        for &id in &ids {
            assert!(pool.remove(id));
        }
        assert_eq!(pool.blocks_used(), 0);
    }
    out
}

#[test]
fn the_reference_prompts_in_one_batch_give_transformers_tokens() {
    let dir = fixtures().join("hf-reference/tiny-qwen3");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("hf-reference/tiny-qwen3.reference.json")).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| serde_json::from_value(c["input_ids"].clone()).unwrap()).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| serde_json::from_value(c["new_ids"].clone()).unwrap()).collect();
    let n = want[0].len();
    assert!(want.iter().all(|w| w.len() == n));
    let whole = load(&dir, None);
    assert_eq!(greedy_batched(std::slice::from_ref(&whole), &prompts, n, 5), want, "one stage");
    let stages: Vec<Shard> = [0..2, 2..3, 3..6].into_iter().enumerate().map(|(i, r)| load(&dir, Some(StageSpec::new(r, i, 3)))).collect();
    assert_eq!(greedy_batched(&stages, &prompts, n, 3), want, "three stages");
}

#[test]
fn a_full_pool_fails_the_step_before_anything_changes() {
    use shardserve::model::{BatchInput, SeqStep};
    let dir = fixtures().join("hf-reference/tiny-qwen3");
    let whole = load(&dir, None);
    let mut pool = whole.new_pool(2, 4).unwrap();
    pool.insert(1);
    pool.insert(2);
    let seqs = [SeqStep { id: 1, tokens: 5, logits: true, embed: false }, SeqStep { id: 2, tokens: 4, logits: true, embed: false }];
    let err = whole.forward_batch(&mut pool, &seqs, BatchInput::Tokens(&[1, 2, 3, 4, 5, 6, 7, 8, 9])).unwrap_err();
    assert!(matches!(err, shardserve::Error::KvFull { needed: 3, free: 2, total: 2 }), "{err}");
    assert_eq!((pool.blocks_used(), pool.len_of(1), pool.len_of(2)), (0, Some(0), Some(0)));
}

fn write_tiny(arch: Architecture, dtype: DType, shards: usize) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::new(arch);
    spec.dtype = dtype;
    spec.shards = shards;
    spec.seed = 3;
    tiny::write(d.path(), &spec).unwrap();
    d
}

fn max_diff(a: &Tensor, b: &[f32]) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn candle_vb(dir: &Path) -> candle_nn::VarBuilder<'static> {
    let files: Vec<PathBuf> = shardserve::hub::weight_files(dir).unwrap().into_iter().map(|f| dir.join(f)).collect();
    #[allow(unsafe_code)]
    // SAFETY: test checkpoints are not modified while mapped.
    unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
    }
}

/// Compares prefill logits and 6 decode steps' logits with candle-transformers' Qwen3.
fn check_qwen3(dir: &Path) {
    use candle_transformers::models::qwen3;
    let cfg: qwen3::Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut theirs = qwen3::ModelForCausalLM::new(&cfg, candle_vb(dir)).unwrap();
    let ours = load(dir, None);
    let mut cache = ours.new_pool(64, 16).unwrap();
    let mut feed: Vec<u32> = vec![5, 17, 99, 3, 250, 8, 41];
    let mut pos = 0;
    for _ in 0..6 {
        let input = Tensor::new(feed.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let t = theirs.forward(&input, pos).unwrap();
        let o = logits(ours.forward(&mut cache, 0, StageInput::Tokens(&feed)).unwrap());
        let d = max_diff(&t, &o);
        assert!(d < 1e-4, "qwen3 logits differ by {d} at position {pos}");
        pos += feed.len();
        feed = vec![argmax(&o)];
    }
}

fn check_llama(dir: &Path) {
    use candle_transformers::models::llama;
    let lc: llama::LlamaConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = lc.into_config(false);
    let theirs = llama::Llama::load(candle_vb(dir), &cfg).unwrap();
    let mut tcache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let ours = load(dir, None);
    let mut cache = ours.new_pool(64, 16).unwrap();
    let mut feed: Vec<u32> = vec![1, 17, 99, 3, 250, 8, 41];
    let mut pos = 0;
    for _ in 0..6 {
        let input = Tensor::new(feed.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let t = theirs.forward(&input, pos, &mut tcache).unwrap();
        let o = logits(ours.forward(&mut cache, 0, StageInput::Tokens(&feed)).unwrap());
        let d = max_diff(&t, &o);
        assert!(d < 1e-4, "llama logits differ by {d} at position {pos}");
        pos += feed.len();
        feed = vec![argmax(&o)];
    }
}

#[test]
fn qwen3_matches_candle_transformers() {
    check_qwen3(write_tiny(Architecture::Qwen3, DType::F32, 1).path());
}

#[test]
fn qwen3_sharded_bf16_matches_candle_transformers() {
    let d = write_tiny(Architecture::Qwen3, DType::BF16, 2);
    assert!(d.path().join("model-00002-of-00002.safetensors").is_file());
    check_qwen3(d.path());
}

#[test]
fn llama_matches_candle_transformers() {
    check_llama(write_tiny(Architecture::Llama, DType::F32, 1).path());
}

#[test]
fn llama_sharded_bf16_matches_candle_transformers() {
    check_llama(write_tiny(Architecture::Llama, DType::BF16, 2).path());
}

#[test]
fn a_stage_reads_only_its_own_tensors_and_files() {
    let d = write_tiny(Architecture::Llama, DType::F32, 4);
    let cfg = ModelConfig::from_file(&d.path().join("config.json")).unwrap();
    let spec = StageSpec::new(2..3, 1, 3);
    let shard = Shard::load(&cfg, spec, d.path(), DType::F32, &Device::Cpu).unwrap();
    let r = shard.report();
    assert!(!r.tensors.is_empty());
    for name in &r.tensors {
        assert!(name.starts_with("model.layers.2."), "stage 1 read {name}");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    let all: Vec<(String, String)> =
        index["weight_map"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
    let expected: std::collections::BTreeSet<String> =
        all.iter().filter(|(k, _)| k.starts_with("model.layers.2.")).map(|(k, _)| k.clone()).collect();
    assert_eq!(r.tensors, expected);
    let files: std::collections::BTreeSet<String> =
        all.iter().filter(|(k, _)| k.starts_with("model.layers.2.")).map(|(_, f)| f.clone()).collect();
    assert_eq!(r.files, files, "opened files other than those holding layer 2");
    assert!(r.files.len() < 4);
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    let d = write_tiny(Architecture::Qwen3, DType::F32, 1);
    let cfg = ModelConfig::from_file(&d.path().join("config.json")).unwrap();
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    // Truncated file.
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = Shard::load(&cfg, StageSpec::whole(&cfg), d.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    // Garbage header.
    std::fs::write(&st, b"not a safetensors file at all").unwrap();
    let err = Shard::load(&cfg, StageSpec::whole(&cfg), d.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("corrupt"), "{err}");
    // Wrong shape: a config that disagrees with the weights.
    std::fs::write(&st, &bytes).unwrap();
    let mut wrong = cfg.clone();
    wrong.intermediate_size += 1;
    let err = Shard::load(&wrong, StageSpec::whole(&wrong), d.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("shape mismatch") && err.contains("mlp"), "{err}");
    // A missing tensor.
    let mut more = cfg.clone();
    more.num_layers += 1;
    let err = Shard::load(&more, StageSpec::whole(&more), d.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.layers.4"), "{err}");
}

#[test]
fn tiny_llama_tokenizer_adds_bos() {
    let d = write_tiny(Architecture::Llama, DType::F32, 1);
    let tok = Tokenizer::from_file(&d.path().join("tokenizer.json")).unwrap();
    let cfg = ModelConfig::from_file(&d.path().join("config.json")).unwrap();
    let ids = tok.encode("hello world").unwrap();
    assert_eq!(Some(ids[0]), cfg.bos_token_id);
    assert_eq!(tok.decode(&ids).unwrap(), "hello world");
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let dir = fixtures().join("hf-reference/tiny-qwen3");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let text = "Ünïcödé — ☃ and 中文 mixed with ascii 🙂";
    let ids = tok.encode(text).unwrap();
    let mut dec = shardserve::tokenizer::IncrementalDecoder::new(&[]);
    let mut pieces = Vec::new();
    for id in &ids {
        pieces.push(dec.push(&tok, *id).unwrap());
    }
    pieces.push(dec.flush(&tok).unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
}
