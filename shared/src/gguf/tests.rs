use super::*;
use crate::collective::TpRank;
use crate::model::{Shard, StageSpec};
use crate::tiny::{self, TinySpec};

fn tiny_model(arch: Architecture, dir: &Path) -> crate::config::ModelConfig {
    let spec = TinySpec { hidden_size: 64, intermediate_size: 128, ..TinySpec::new(arch) };
    tiny::write(dir, &spec).unwrap();
    crate::config::ModelConfig::from_file(&dir.join("config.json")).unwrap()
}

/// Every loaded tensor, dense or dequantized, as f32 values by name.
fn values(t: &LoadedTensors) -> std::collections::BTreeMap<String, Vec<f32>> {
    let dense = t.tensors.iter().map(|(n, t)| (n.clone(), t.clone()));
    let quantized = t.quantized.iter().map(|(n, q)| (n.clone(), q.dequantize(&Device::Cpu).unwrap()));
    dense.chain(quantized).map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

#[test]
fn an_f32_file_loads_the_checkpoints_own_tensors_in_every_architecture_and_tp_slice() {
    for arch in [Architecture::Qwen3, Architecture::Qwen2, Architecture::Llama] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny_model(arch, tmp.path());
        let file = tmp.path().join("model-f32.gguf");
        write_checkpoint(tmp.path(), &file, GgufType::F32).unwrap();
        let g = Gguf::open(&file).unwrap();
        let mut from_gguf = crate::config::ModelConfig::from_value(&g.config_json().unwrap()).unwrap();
        // GGUF holds the epsilon as an f32, as transformers then reads it.
        assert_eq!(from_gguf.rms_norm_eps, f64::from(cfg.rms_norm_eps as f32), "{arch:?}");
        from_gguf.rms_norm_eps = cfg.rms_norm_eps;
        let checkpoint =
            |c: &crate::config::ModelConfig| format!("{c:?}").replace("checkpoint_dtype: Some(\"float32\")", "checkpoint_dtype: None");
        assert_eq!(checkpoint(&from_gguf), checkpoint(&cfg), "{arch:?}");
        for size in [1, 2] {
            for rank in 0..size {
                let spec = StageSpec::whole(&cfg).with_tp(TpRank { rank, size });
                let split = crate::collective::tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, spec.tp).unwrap();
                let slicer = |n: &str, s: &[usize]| spec.slice_of(&split, cfg.head_dim, n, s);
                let a = g.load(&cfg, &|n| spec.owns(&cfg, n), &slicer, DType::F32, false, &Device::Cpu).unwrap();
                let b = crate::weights::load(tmp.path(), &|n| spec.owns(&cfg, n), &slicer, Some(DType::F32), &Device::Cpu).unwrap();
                assert_eq!(values(&a), values(&b), "{arch:?} rank {rank} of {size}");
            }
        }
    }
}

#[test]
fn a_q8_0_file_holds_the_weights_quantize_at_load_makes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_model(Architecture::Llama, tmp.path());
    let file = tmp.path().join("model-q8_0.gguf");
    write_checkpoint(tmp.path(), &file, GgufType::Q8_0).unwrap();
    let spec = StageSpec::whole(&cfg);
    let from_gguf = Shard::load(&cfg, spec.clone(), &file, DType::F32, &Device::Cpu).unwrap();
    let dense = Shard::load(&cfg, spec.clone(), tmp.path(), DType::F32, &Device::Cpu).unwrap().report().bytes;
    assert!(from_gguf.report().bytes * 10 < dense * 6, "{} of {dense}", from_gguf.report().bytes);
    let quantized = StageSpec { quantize: Some(crate::quant::Quantize::Q8_0), ..spec.clone() };
    let at_load = Shard::load(&cfg, quantized, tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let dequantized = Shard::load(&cfg, StageSpec { dequantize: true, ..spec }, &file, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (1..12).collect();
    let logits = |s: &Shard| {
        let mut pool = s.new_pool(8, 16).unwrap();
        match s.forward(&mut pool, 1, crate::model::StageInput::Tokens(&ids)).unwrap() {
            crate::model::StageOutput::Logits(l) => l.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(logits(&from_gguf), logits(&at_load));
    // Dequantized, the same weights multiply f32 activations (q8_0's matmul quantizes them):
    // close, not bit-equal.
    let (a, b) = (logits(&from_gguf), logits(&dequantized));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(a != b && worst < 0.25, "{worst}");
    assert_eq!(crate::sampling::argmax(&a), crate::sampling::argmax(&b));
}

#[test]
fn a_tp_that_cuts_a_block_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // down_proj's rows of 192 split at tp 2 into whole q8_0 blocks of 32 (96), at tp 4 not (48).
    let spec = TinySpec { hidden_size: 64, intermediate_size: 192, num_heads: 4, num_kv_heads: 4, ..TinySpec::new(Architecture::Llama) };
    tiny::write(tmp.path(), &spec).unwrap();
    let cfg = crate::config::ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
    let file = tmp.path().join("m.gguf");
    write_checkpoint(tmp.path(), &file, GgufType::Q8_0).unwrap();
    let g = Gguf::open(&file).unwrap();
    g.check_tp(&cfg, 2).unwrap();
    let e = g.check_tp(&cfg, 4).unwrap_err().to_string();
    assert!(e.contains("down_proj") && e.contains("--tp 4") && e.contains("blocks of 32"), "{e}");
}

#[test]
fn the_tokenizer_and_template_come_from_the_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(Architecture::Qwen3, tmp.path());
    std::fs::write(tmp.path().join("chat_template.jinja"), "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
        .unwrap();
    let file = tmp.path().join("m.gguf");
    write_checkpoint(tmp.path(), &file, GgufType::F32).unwrap();
    let g = Gguf::open(&file).unwrap();
    let tok = g.tokenizer().unwrap();
    let original = crate::tokenizer::Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    // Words split alike under GPT-2's and Qwen2's patterns; specials are whole tokens.
    let text = "<|im_start|>the cat sat on the mat<|im_end|>";
    assert_eq!(tok.encode(text).unwrap(), original.encode(text).unwrap());
    assert_eq!(tok.decode(&tok.encode("héllo wörld").unwrap()).unwrap(), "héllo wörld");
    // Qwen2's pattern splits numbers digit by digit.
    assert_eq!(tok.tokens("2024").unwrap().len(), 4);
    assert!(g.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(g.special_tokens().get("eos_token").map(String::as_str), Some("<|endoftext|>"));
}

#[test]
fn folders_and_repos_name_their_gguf_file() {
    let l = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(crate::hub::choose_gguf(&l(&["README.md", "m-Q8_0.gguf"]), None).unwrap().as_deref(), Some("m-Q8_0.gguf"));
    assert_eq!(crate::hub::choose_gguf(&l(&["config.json", "m-Q8_0.gguf"]), None).unwrap(), None);
    assert_eq!(crate::hub::choose_gguf(&l(&["config.json", "m.gguf"]), Some("m.gguf")).unwrap().as_deref(), Some("m.gguf"));
    let e = crate::hub::choose_gguf(&l(&["a-Q4_K_M.gguf", "a-Q8_0.gguf"]), None).unwrap_err();
    assert!(e.contains("2 GGUF files (a-Q4_K_M.gguf, a-Q8_0.gguf)") && e.contains("--gguf-file"), "{e}");
    let e = crate::hub::choose_gguf(&l(&["a-Q8_0.gguf"]), Some("b.gguf")).unwrap_err();
    assert!(e.contains("no GGUF file b.gguf (it has a-Q8_0.gguf)"), "{e}");
    assert!(crate::hub::choose_gguf(&l(&["x"]), Some("model.bin")).unwrap_err().contains("does not name a .gguf file"));
}

#[test]
fn block_slices_take_whole_blocks_along_rows_and_whole_rows_across() {
    let t = candle_core::Tensor::arange(0f32, 4.0 * 64.0, &Device::Cpu).unwrap().reshape((4, 64)).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let data = q.data().unwrap();
    let (cols, dims) = slice_blocks(&data, GgmlDType::Q8_0, &[4, 64], 1, 32..64).unwrap();
    assert_eq!(dims, [4, 32]);
    let back = candle_core::quantized::ggml_file::qtensor_from_ggml(GgmlDType::Q8_0, &cols, dims, &Device::Cpu).unwrap();
    let expect = q.dequantize(&Device::Cpu).unwrap().narrow(1, 32, 32).unwrap();
    assert_eq!(back.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap(), expect.to_vec2::<f32>().unwrap());
    let (rows, dims) = slice_blocks(&data, GgmlDType::Q8_0, &[4, 64], 0, 1..3).unwrap();
    assert_eq!((rows.len(), dims), (2 * 2 * 34, vec![2, 64]));
    assert!(slice_blocks(&data, GgmlDType::Q8_0, &[4, 64], 1, 16..48).unwrap_err().contains("cuts"));
}
