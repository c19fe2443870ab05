//! Fuzz targets: one function per kind of untrusted input shardserve parses, each handing raw
//! bytes to the project's own parsing and checking code. An error is the expected answer to a
//! bad input; a panic (an overflow included), a huge allocation or a hang is a finding.
//!
//! libFuzzer runs them from `libfuzzer/` (see the README's "Fuzzing"); `cargo test` replays
//! every file of `corpus/<target>/` through them, so each input the fuzzers kept stays handled.
//!
//! - [`safetensors`]: a checkpoint's safetensors file, or its index, loaded as a shard.
//! - [`config`]: `config.json` and `generation_config.json`.
//! - [`wire_tensor`]: a peer's hidden states as they arrive (`pb::Tensor`).
//! - [`request`]: a client's `GenerateRequest`, validated.
//! - [`chat`]: a `/tokenize` body: chat messages rendered with the model's template.
//! - [`step`]: `StepRequest`s as a worker receives them.

mod fixture;
#[cfg(test)]
mod seeds;

use candle_core::{DType, Device};
use prost::Message;
use shardserve::collective::TpRank;
use shardserve::config::{GenerationConfig, ModelConfig};
use shardserve::model::{Shard, StageSpec};
use shardserve_proto::v1 as pb;

/// Fails the run when an error as a client receives it is not one line (it goes into a gRPC
/// status). Errors from deeper down may carry more (candle appends a backtrace when
/// RUST_BACKTRACE is set): the service edge keeps their first line, so only what leaves the
/// edge is held to this.
fn one_line(what: &str, message: &str) {
    assert!(!message.contains('\n'), "{what}: an error of several lines: {message:?}");
}

/// A checkpoint file. The first byte chooses what the rest is and which shard reads it:
/// bit 0 clear, the rest is `model.safetensors` (the only weights file); set, it is
/// `model.safetensors.index.json` beside the tiny model's two real files. Bits 1-2 choose the
/// stage (the whole model, the first of two, the middle of three, the last of two); bit 3 makes
/// it tensor-parallel rank (bit 4) of 2, which reads slices of the tensors.
pub fn safetensors(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let model = fixture::model();
    let dir = fixture::scratch().join(if mode & 1 == 0 { "single" } else { "index" });
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    if mode & 1 == 0 {
        std::fs::write(dir.join("model.safetensors"), rest).expect("writing model.safetensors");
    } else {
        for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            if !dir.join(f).exists() {
                std::fs::copy(model.sharded.join(f), dir.join(f)).expect("copying a weights file");
            }
        }
        std::fs::write(dir.join("model.safetensors.index.json"), rest).expect("writing the index");
    }
    let cfg = &model.config;
    let mut spec = match (mode >> 1) & 3 {
        0 => StageSpec::whole(cfg),
        1 => StageSpec::new(0..1, 0, 2),
        2 => StageSpec::new(1..2, 1, 3),
        _ => StageSpec::new(1..2, 1, 2),
    };
    if mode & 8 != 0 {
        spec = spec.with_tp(TpRank { rank: usize::from((mode >> 4) & 1), size: 2 });
    }
    let _ = Shard::load(cfg, spec, &dir, DType::F32, &Device::Cpu);
}

/// A model's config files: the same text read as `config.json` (then laid out as the planner
/// does) and as `generation_config.json`, each by the function the coordinator and workers
/// read them with.
pub fn config(data: &[u8]) {
    let dir = fixture::scratch();
    let (config_path, generation_path) = (dir.join("config.json"), dir.join("generation_config.json"));
    std::fs::write(&config_path, data).expect("writing config.json");
    std::fs::write(&generation_path, data).expect("writing generation_config.json");
    let cfg = ModelConfig::from_file(&config_path);
    let generation = GenerationConfig::from_file(&generation_path);
    if let (Ok(cfg), Ok(generation)) = (&cfg, &generation) {
        let _ = generation.eos_ids(cfg);
        let _ = shardserve::collective::tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, TpRank { rank: 1, size: 2 });
    }
    // The coordinator's preflight reads the same file as a placement shape.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(shape) = shardserve::placement::ModelShape::from_config_json(&v) {
            let _ = shardserve::placement::module_sizes(&shape, 2);
        }
    }
}

/// A wire tensor (`pb::Tensor`, protobuf-encoded) decoded as a stage decodes a peer's hidden
/// states; one that decodes must encode back to the same dtype, shape and bytes.
pub fn wire_tensor(data: &[u8]) {
    let Ok(t) = pb::Tensor::decode(data) else { return };
    if let Ok(x) = shardserve::wire::decode(&t, &Device::Cpu) {
        let back = shardserve::wire::encode(&x).expect("a decoded tensor encodes");
        assert_eq!(back.shape, t.shape, "shape changed in a round trip");
        assert!(back.data == t.data, "bytes changed in a round trip");
        assert_eq!(back.dtype.parse::<shardserve::dtype::Dtype>().ok(), t.dtype.parse().ok(), "dtype changed in a round trip");
    }
}

/// A client's `GenerateRequest` (protobuf-encoded) validated for the tiny model; a request
/// that passes must be one the workers accept and that fits the model's context.
pub fn request(data: &[u8]) {
    let Ok(req) = pb::GenerateRequest::decode(data) else { return };
    let entry = &fixture::coordinator().entry;
    match shardserve_coordinator::validate::validate(entry, &req) {
        Ok(v) => {
            assert!(!v.prompt_ids.is_empty(), "a valid request with no prompt tokens");
            assert!(v.max_new_tokens >= 1, "a valid request that generates nothing");
            assert!(v.prompt_ids.len() + v.max_new_tokens <= entry.max_total_tokens, "a valid request past the context");
            assert!(v.min_tokens <= v.max_new_tokens, "min_tokens past max_new_tokens");
            if let Err(e) = v.sampling.validate() {
                panic!("validation passed sampling parameters the workers refuse: {e}");
            }
            // Its structured output compiles into a grammar the workers run, or is refused.
            use shardserve_coordinator::frontend::structured::{Constraint, Guidance};
            match Constraint::from_proto(req.structured_output.as_ref()) {
                Ok(Some(c)) => {
                    let mut v = v;
                    match shardserve_coordinator::frontend::prepare::constrain(entry, &mut v, &c, &Guidance::default()) {
                        Ok(()) => {
                            let grammar = v.grammar.expect("a constrained request has a grammar");
                            let grammars = entry.grammars().expect("the tiny model's grammars");
                            assert!(grammars.guide_json(&grammar).is_ok(), "a grammar the coordinator compiled does not compile again");
                        }
                        Err(e) => one_line("compiling a structured output", &e.to_string()),
                    }
                }
                Ok(None) => {}
                Err(e) => one_line("reading a structured output", &e.to_string()),
            }
        }
        Err(e) => one_line("validating a request", &e.to_string()),
    }
}

/// A `/tokenize` body (JSON: `messages`, `tools`, `chat_template_kwargs`, ... or a `prompt`)
/// through the coordinator's HTTP API, which renders messages with the model's chat template
/// (Qwen3's) and tokenizes the result. Any answer but a server error is fine.
pub fn chat(data: &[u8]) {
    use tower::ServiceExt;
    let c = fixture::coordinator();
    let req = axum::http::Request::post("/tokenize")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(data.to_vec()))
        .expect("a request");
    let resp = fixture::runtime().block_on(c.router.clone().oneshot(req)).expect("the router answers");
    assert!(!resp.status().is_server_error(), "a client's chat messages got {}", resp.status());
}

/// Steps as workers receive them. The first byte says, bit i for step i, which of the tiny
/// model's two stages takes it (0: the first, which takes tokens; 1: the last, which takes
/// hidden states and samples); the rest is up to 8 length-delimited `StepRequest`s. What the
/// first stage forwards goes on to the last, as the Step stream would send it. Every sequence
/// is freed at the end, so each input starts from freshly loaded stages.
pub fn step(data: &[u8]) {
    let Some((&route, mut rest)) = data.split_first() else { return };
    let workers = fixture::workers();
    for w in workers {
        w.clear_sequences();
    }
    for i in 0..8 {
        if rest.is_empty() {
            break;
        }
        let Ok(req) = pb::StepRequest::decode_length_delimited(&mut rest) else { break };
        let stage = usize::from((route >> i) & 1);
        let ids: Vec<u64> = req.sequences.iter().map(|s| s.seq_id).collect();
        let (results, forward) = workers[stage].run_step(req).expect("a stage is loaded");
        check_results(&ids, &results, forward.is_some());
        if let Some(next) = forward {
            let ids: Vec<u64> = next.sequences.iter().map(|s| s.seq_id).collect();
            let (results, forward) = workers[1].run_step(next).expect("a stage is loaded");
            assert!(forward.is_none(), "the last stage forwarded a step");
            check_results(&ids, &results, false);
        }
    }
    for w in workers {
        w.clear_sequences();
    }
}

/// What a stage answered for the sequences `ids` of a step: results only for sequences it was
/// sent, a result for every one of them unless the step went on to the next stage
/// (`forwarded`), and each error one line with a status code other than OK or INTERNAL.
fn check_results(ids: &[u64], results: &[pb::SequenceResult], forwarded: bool) {
    for r in results {
        assert!(ids.contains(&r.seq_id), "a result for sequence {} that the step does not carry", r.seq_id);
        if !r.error.is_empty() {
            one_line("a sequence's error", &r.error);
            assert_ne!(r.code, 0, "sequence {} failed with code OK: {}", r.seq_id, r.error);
            // A step that fails is malformed (INVALID_ARGUMENT and kin), never this stage's
            // own failure: the tiny model runs any well-formed step.
            assert_ne!(
                tonic::Code::from(r.code),
                tonic::Code::Internal,
                "sequence {}: INTERNAL for a client's step: {}",
                r.seq_id,
                r.error
            );
        }
    }
    if !forwarded {
        // The last stage settles every sequence it was sent.
        for id in ids {
            assert!(results.iter().any(|r| r.seq_id == *id), "sequence {id} got no result");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Runs every file of `corpus/<target>/` through `f`, naming the file that fails.
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for path in files {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(panic) = std::panic::catch_unwind(|| f(&data)) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{}: {why}", path.display());
            }
        }
    }

    #[test]
    fn safetensors_corpus() {
        replay("safetensors", super::safetensors);
    }

    #[test]
    fn config_corpus() {
        replay("config", super::config);
    }

    #[test]
    fn wire_tensor_corpus() {
        replay("wire_tensor", super::wire_tensor);
    }

    #[test]
    fn request_corpus() {
        replay("request", super::request);
    }

    #[test]
    fn chat_corpus() {
        replay("chat", super::chat);
    }

    #[test]
    fn step_corpus() {
        replay("step", super::step);
    }
}
