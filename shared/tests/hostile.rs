//! Checkpoint files from outside are parsed without trust: a safetensors header that lies about
//! its length or its offsets, overlapping tensors, a name that is not UTF-8, an index naming a
//! file that is not there, a config that is not JSON — each a one-line error naming the file,
//! never a panic or an allocation the size of the lie.

use candle_core::Device;
use shardserve::weights;
use std::path::Path;

/// A safetensors file: the 8-byte little-endian header length, the header, the data.
fn safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn load_error(dir: &Path) -> String {
    match weights::load(dir, &|_| true, &|_, _| None, None, &Device::Cpu) {
        Ok(t) => panic!("loaded {} tensors from a hostile file", t.tensors.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_safetensors_headers_are_one_line_errors_naming_the_file() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a header length of 2^63", {
            let mut b = (1u64 << 63).to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("a header longer than the file", {
            let mut b = 4096u64.to_le_bytes().to_vec();
            b.extend_from_slice(br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
            b
        }),
        ("offsets past the end of the file", safetensors(br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 8])),
        (
            "overlapping tensors",
            safetensors(
                br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                &[0u8; 24],
            ),
        ),
        (
            "a shape that does not match its bytes",
            safetensors(br#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4]}}"#, &[0u8; 4]),
        ),
        ("a name that is not UTF-8", safetensors(b"{\"\xff\xfe\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", &[0u8; 4])),
        ("a header that is not JSON", safetensors(b"not json at all", &[])),
        ("an empty file", Vec::new()),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let e = load_error(dir.path());
        assert!(e.contains("model.safetensors"), "{what}: {e}");
        assert!(!e.contains('\n'), "{what}: not one line: {e}");
    }
}

#[test]
fn an_index_naming_a_missing_or_escaping_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("model-00001-of-00002.safetensors") && e.contains("does not exist"), "{e}");
    for escaping in ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors"] {
        let index = serde_json::json!({"weight_map": {"model.norm.weight": escaping}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = load_error(dir.path());
        assert!(e.contains("leaves the model folder"), "{escaping}: {e}");
    }
    std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map": "nope"}"#).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("model.safetensors.index.json"), "{e}");
}

#[test]
fn a_config_that_is_not_a_model_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (text, what) in
        [("{", "truncated"), ("[1, 2]", "an array"), (r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": "big"}"#, "a wrong type")]
    {
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        let e = shardserve::config::ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{what}: {e}");
        assert!(!e.contains('\n'), "{what}: {e}");
    }
}
