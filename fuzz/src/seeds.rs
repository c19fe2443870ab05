//! The valid inputs each target's corpus started from, so the fuzzers begin from real structure
//! rather than from nothing. `cargo test -p shardserve-fuzz -- --ignored write_seeds` writes
//! them (again) into `corpus/<target>/seed-*`; the fuzzers and `cargo fuzz cmin` take it from
//! there.

use crate::fixture;
use candle_core::{DType, Device, Tensor};
use prost::Message;
use shardserve_proto::v1 as pb;
use std::path::Path;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(rest);
    out
}

/// A safetensors file: the 8-byte little-endian header length, the header, the data.
fn safetensors_bytes(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn safetensors() {
    let model = fixture::model();
    let whole = std::fs::read(model.whole.join("model.safetensors")).unwrap();
    // The tiny model whole, as each stage and tensor-parallel rank reads it.
    write("safetensors", "whole", &with_mode(0b0_0000, &whole));
    write("safetensors", "whole-tp-rank1-last", &with_mode(0b1_1110, &whole));
    // Only what the middle stage of three owns.
    let tensors = candle_core::safetensors::load(model.whole.join("model.safetensors"), &Device::Cpu).unwrap();
    let middle: std::collections::HashMap<String, Tensor> = tensors.into_iter().filter(|(n, _)| n.starts_with("model.layers.1.")).collect();
    let path = fixture::scratch().join("middle.safetensors");
    candle_core::safetensors::save(&middle, &path).unwrap();
    write("safetensors", "middle", &with_mode(0b0_0100, &std::fs::read(&path).unwrap()));
    // The index of the two-file checkpoint.
    let index = std::fs::read(model.sharded.join("model.safetensors.index.json")).unwrap();
    write("safetensors", "index", &with_mode(0b0_0001, &index));
    write("safetensors", "index-first", &with_mode(0b0_0011, &index));
    write("safetensors", "index-tp-rank0-middle", &with_mode(0b0_1101, &index));
    // Small files of one tensor each: the header is most of the input.
    write(
        "safetensors",
        "one-tensor",
        &with_mode(0, &safetensors_bytes(br#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 16])),
    );
    write(
        "safetensors",
        "one-tensor-metadata",
        &with_mode(
            0,
            &safetensors_bytes(
                br#"{"__metadata__":{"format":"pt"},"model.layers.1.input_layernorm.weight":{"dtype":"BF16","shape":[16],"data_offsets":[0,32]}}"#,
                &[0u8; 32],
            ),
        ),
    );
}

fn config() {
    let model = fixture::model();
    write("config", "tiny-config", &std::fs::read(model.whole.join("config.json")).unwrap());
    write("config", "tiny-generation", &std::fs::read(model.whole.join("generation_config.json")).unwrap());
    write(
        "config",
        "llama3",
        br#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,"intermediate_size":192,
"num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":512,
"max_position_embeddings":1024,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"rms_norm_eps":1e-5,
"tie_word_embeddings":false,"attention_bias":false,"mlp_bias":false,"hidden_act":"silu","bos_token_id":1,
"eos_token_id":[2,3],"torch_dtype":"bfloat16"}"#,
    );
    write(
        "config",
        "mistral",
        br#"{"architectures":["MistralForCausalLM"],"hidden_size":64,"intermediate_size":160,"num_hidden_layers":2,
"num_attention_heads":8,"num_key_value_heads":2,"vocab_size":300,"max_position_embeddings":32768,
"sliding_window":4096,"use_sliding_window":true,"rope_theta":10000.0,"dtype":"float16","eos_token_id":2}"#,
    );
    write(
        "config",
        "qwen2",
        br#"{"model_type":"qwen2","hidden_size":32,"intermediate_size":64,"num_hidden_layers":3,"num_attention_heads":4,
"num_key_value_heads":4,"vocab_size":320,"max_position_embeddings":4096,"rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},
"tie_word_embeddings":true,"use_sliding_window":false,"sliding_window":null,"max_window_layers":3}"#,
    );
    write(
        "config",
        "generation-sampling",
        br#"{"bos_token_id":1,"eos_token_id":[2,5],"do_sample":true,"temperature":0.6,"top_p":0.95,"top_k":20,
"repetition_penalty":1.1,"max_new_tokens":256,"transformers_version":"4.51.0"}"#,
    );
}

fn wire_tensor() {
    let t = Tensor::arange(0f32, 32.0, &Device::Cpu).unwrap().reshape((2, 16)).unwrap();
    for (name, d) in [("f32", DType::F32), ("bf16", DType::BF16), ("f16", DType::F16)] {
        let w = shardserve::wire::encode(&t.to_dtype(d).unwrap()).unwrap();
        write("wire_tensor", &format!("rows-{name}"), &w.encode_to_vec());
    }
    let scalar = shardserve::wire::encode(&Tensor::new(1.5f32, &Device::Cpu).unwrap()).unwrap();
    write("wire_tensor", "scalar", &scalar.encode_to_vec());
    let empty = shardserve::wire::encode(&Tensor::zeros((0, 16), DType::F32, &Device::Cpu).unwrap()).unwrap();
    write("wire_tensor", "no-rows", &empty.encode_to_vec());
    let cube = shardserve::wire::encode(&Tensor::ones((1, 3, 4), DType::F16, &Device::Cpu).unwrap()).unwrap();
    write("wire_tensor", "rank3", &cube.encode_to_vec());
}

fn request() {
    let plain = pb::GenerateRequest { model: "tiny".into(), prompt: "Hello world".into(), ..Default::default() };
    write("request", "plain", &plain.encode_to_vec());
    let full = pb::GenerateRequest {
        model: "tiny".into(),
        prompt: "The GNU General Public License is".into(),
        max_new_tokens: Some(16),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(20),
            repetition_penalty: Some(1.1),
            seed: Some(42),
        }),
        stop: vec!["\n".into(), "License".into()],
        logprobs: true,
        ignore_eos: true,
        top_logprobs: 5,
        min_tokens: 2,
        cache_salt: "tenant-a".into(),
        skip_prefix_cache: false,
        structured_output: None,
    };
    write("request", "full", &full.encode_to_vec());
    let schema = r#"{"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}"#;
    let structured = pb::GenerateRequest {
        structured_output: Some(pb::StructuredOutput { kind: Some(pb::structured_output::Kind::JsonSchema(schema.into())) }),
        ..plain
    };
    write("request", "structured", &structured.encode_to_vec());
}

fn chat() {
    let bodies = [
        ("user", r#"{"messages":[{"role":"user","content":"What is the GNU General Public License?"}]}"#),
        (
            "system-thinking-off",
            r#"{"model":"tiny","messages":[{"role":"system","content":"You answer in one sentence."},{"role":"user","content":"Name a license."},{"role":"assistant","content":"The Apache License."},{"role":"user","content":"And another?"}],"chat_template_kwargs":{"enable_thinking":false},"add_generation_prompt":true}"#,
        ),
        (
            "tools",
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"Weather in Paris?"},{"type":"text","text":"In C."}]},{"role":"assistant","content":"","reasoning_content":"A tool.","tool_calls":[{"type":"function","function":{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}}}]},{"role":"tool","content":"21 C"}],"tools":[{"type":"function","function":{"name":"get_weather","description":"The weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["C","F"]}},"required":["city"]}}}],"add_special_tokens":false}"#,
        ),
        ("prompt", r#"{"prompt":"<|im_start|>user\nHello<|im_end|>","add_special_tokens":true}"#),
    ];
    for (name, body) in bodies {
        write("chat", name, body.as_bytes());
    }
}

/// Length-delimited steps behind the routing byte.
fn steps(route: u8, steps: &[pb::StepRequest]) -> Vec<u8> {
    let mut out = vec![route];
    for s in steps {
        s.encode_length_delimited(&mut out).unwrap();
    }
    out
}

fn seq(seq_id: u64, tokens: &[u32], start_pos: u32) -> pb::SequenceStep {
    pb::SequenceStep { seq_id, token_ids: tokens.to_vec(), start_pos, epoch: fixture::EPOCH, ..Default::default() }
}

fn step() {
    let prompt = [1, 87, 85, 264, 201, 57, 74, 273, 223];
    let sampling =
        pb::SamplingParams { temperature: Some(0.8), top_p: Some(0.9), top_k: Some(10), repetition_penalty: Some(1.2), seed: Some(3) };
    // A prefill then two decode steps through both stages, greedy.
    let prefill = pb::StepRequest { step_id: 1, sequences: vec![seq(11, &prompt, 0)], ..Default::default() };
    let decode = |id, pos, tok| pb::StepRequest { step_id: u64::from(pos), sequences: vec![seq(id, &[tok], pos)], ..Default::default() };
    write("step", "prefill-decode", &steps(0, &[prefill.clone(), decode(11, 9, 40), decode(11, 10, 41)]));
    // Two sequences in one step (one sampled with logprobs, one an embedding), then a chunked
    // prefill, then a release.
    let mut a = seq(21, &prompt, 0);
    a.sampling = Some(sampling);
    a.logprobs = true;
    a.top_logprobs = 3;
    a.suppress = vec![2];
    a.request_id = "req-a".into();
    let mut b = seq(22, &prompt[..4], 0);
    b.embed = true;
    let mut chunk = seq(23, &prompt[..5], 0);
    chunk.prefill_only = true;
    let batch = pb::StepRequest { step_id: 2, sequences: vec![a, b], ..Default::default() };
    let chunked = pb::StepRequest { step_id: 3, sequences: vec![chunk], release: vec![22], ..Default::default() };
    let rest = pb::StepRequest { step_id: 4, sequences: vec![seq(23, &prompt[5..], 5)], ..Default::default() };
    let release = pb::StepRequest { step_id: 5, release: vec![21, 23], ..Default::default() };
    write("step", "batch-chunk-release", &steps(0, &[batch, chunked, rest, release]));
    // Hidden states straight to the last stage.
    let h = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().affine(0.01, 0.0).unwrap().reshape((3, 16)).unwrap();
    let hidden = pb::StepRequest {
        step_id: 5,
        sequences: vec![seq(31, &[5, 6, 7], 0)],
        hidden: Some(shardserve::wire::encode(&h).unwrap()),
        ..Default::default()
    };
    let one = pb::StepRequest {
        step_id: 6,
        sequences: vec![seq(31, &[8], 3)],
        hidden: Some(shardserve::wire::encode(&h.narrow(0, 0, 1).unwrap()).unwrap()),
        ..Default::default()
    };
    write("step", "hidden-to-last", &steps(0b11, &[hidden, one]));
    // A long prompt: 300 tokens.
    let long: Vec<u32> = (0..300).map(|i| 3 + (i * 7) % 290).collect();
    write("step", "long-prompt", &steps(0, &[pb::StepRequest { step_id: 7, sequences: vec![seq(41, &long, 0)], ..Default::default() }]));
    // Steps a worker must refuse, one of each kind, so the fuzzer starts from every check.
    let wire =
        |id, t: pb::Tensor| pb::StepRequest { step_id: 8, sequences: vec![seq(id, &[5, 6, 7], 0)], hidden: Some(t), ..Default::default() };
    let good = shardserve::wire::encode(&h).unwrap();
    let wrong_dtype = wire(51, pb::Tensor { dtype: "i64".into(), ..good.clone() });
    let wrong_shape = wire(52, pb::Tensor { shape: vec![3, 8, 2], ..good.clone() });
    let wrong_length = wire(53, pb::Tensor { data: good.data[1..].to_vec(), ..good.clone() });
    let wrong_rows = wire(54, shardserve::wire::encode(&h.narrow(0, 0, 2).unwrap()).unwrap());
    let bf16 = wire(55, shardserve::wire::encode(&h.to_dtype(DType::BF16).unwrap()).unwrap());
    write("step", "malformed-hidden", &steps(0b1_1111, &[wrong_dtype, wrong_shape, wrong_length, wrong_rows, bf16]));
    let past_positions = seq(62, &prompt, 600);
    let unknown = seq(63, &prompt, 4);
    let mut other_epoch = seq(64, &prompt, 0);
    other_epoch.epoch = fixture::EPOCH + 1;
    let outside_vocab = seq(65, &[1, 2, 100_000], 0);
    let bad = |s: pb::SequenceStep| pb::StepRequest { step_id: 9, sequences: vec![s], ..Default::default() };
    let tokens_to_last = bad(seq(66, &prompt, 0));
    let hidden_to_first = pb::StepRequest { hidden: Some(good), ..bad(seq(67, &[5, 6, 7], 0)) };
    write(
        "step",
        "malformed-sequences",
        &steps(0b10_0000, &[bad(past_positions), bad(unknown), bad(other_epoch), bad(outside_vocab), hidden_to_first, tokens_to_last]),
    );
    // One sequence twice in a step, its second occurrence out of the vocabulary.
    let twice = pb::StepRequest { step_id: 10, sequences: vec![seq(69, &prompt, 0), seq(69, &[1, 100_000], 0)], ..Default::default() };
    write("step", "duplicate-sequence", &steps(0, &[twice]));
    // A huge token list: far more tokens than positions or KV blocks.
    let huge: Vec<u32> = (0..6000).map(|i| 3 + (i * 13) % 290).collect();
    write("step", "huge-token-list", &steps(0, &[bad(seq(68, &huge, 0))]));
}

#[test]
#[ignore = "writes the seeds into corpus/; run by hand"]
fn write_seeds() {
    safetensors();
    config();
    wire_tensor();
    request();
    chat();
    step();
}
