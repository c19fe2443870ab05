//! The planner against transformers/accelerate's own device maps, and its edge cases.

use super::accelerate::*;
use super::sizes::*;
use super::*;
use serde::de::{MapAccess, Visitor};
use serde::Deserializer;

/// Absolute fixture location for the dev crate; `SHARDSERVE_FIXTURES` (the fixtures
/// directory) overrides it.
const FIXTURE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/device-maps/public.json");

fn fixture_text() -> String {
    let path = match std::env::var("SHARDSERVE_FIXTURES") {
        Ok(dir) => std::path::Path::new(&dir).join("device-maps/public.json"),
        Err(_) => std::path::PathBuf::from(FIXTURE_PATH),
    };
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// An object read in document order (serde_json's `Value` would sort the keys).
#[derive(Debug)]
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Ordered<V>, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = a.next_entry::<String, V>()? {
                    out.push(kv);
                }
                Ok(Ordered(out))
            }
        }
        deserializer.deserialize_map(OrderedVisitor(std::marker::PhantomData))
    }
}

/// One fixture case. Maps are read straight from the text so their key order survives.
#[derive(Deserialize)]
struct Case {
    model: String,
    config: serde_json::Value,
    dtype: String,
    max_memory: Ordered<String>,
    no_split_module_classes: Vec<String>,
    auto: Option<DeviceMap>,
    balanced: Option<DeviceMap>,
    balanced_low_0: Option<DeviceMap>,
    sequential: Option<DeviceMap>,
    auto_balanced_memory: Option<Ordered<u64>>,
    balanced_balanced_memory: Option<Ordered<u64>>,
    balanced_low_0_balanced_memory: Option<Ordered<u64>>,
    sequential_balanced_memory: Option<Ordered<u64>>,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct FixtureKeys {
    cases: Vec<Ordered<de::IgnoredAny>>,
}

#[test]
fn fixtures_match_accelerate_for_every_case_and_strategy() {
    let text = fixture_text();
    // Fail loudly if the fixture grows a key this test would silently ignore.
    let keys: FixtureKeys = serde_json::from_str(&text).expect("fixture JSON");
    let known = [
        "model",
        "config",
        "dtype",
        "max_memory",
        "no_split_module_classes",
        "auto",
        "balanced",
        "balanced_low_0",
        "sequential",
        "auto_balanced_memory",
        "balanced_balanced_memory",
        "balanced_low_0_balanced_memory",
        "sequential_balanced_memory",
    ];
    for Ordered(case) in &keys.cases {
        for (k, _) in case {
            assert!(known.contains(&k.as_str()), "unexpected fixture key {k:?}");
        }
    }
    let fixture: Fixture = serde_json::from_str(&text).expect("fixture JSON");
    assert!(!fixture.cases.is_empty(), "fixture has no cases");

    let mut failures = Vec::new();
    let mut checked = 0;
    for case in fixture.cases {
        let model = &case.model;
        let shape = ModelShape::from_config_json(&case.config).expect("fixture config parses");
        let dtype = dtype_bytes(&case.dtype).expect("fixture dtype");
        assert_eq!(case.no_split_module_classes, vec![shape.architecture.decoder_layer_class().to_string()], "{model}");
        // Go through the textual form a CLI would take, exercising parse_max_memory.
        let spec = case.max_memory.0.iter().map(|(d, s)| format!("{d}={s}")).collect::<Vec<_>>().join(",");
        let max_memory = parse_max_memory(&spec).expect("fixture max_memory parses");

        assert!(case.auto.is_some() && case.balanced_low_0.is_some() && case.sequential.is_some(), "{model}");
        assert!(case.sequential_balanced_memory.is_none(), "{model}: sequential is never balanced");
        let expectations = [
            (Strategy::Auto, case.auto, case.auto_balanced_memory),
            (Strategy::Balanced, case.balanced, case.balanced_balanced_memory),
            (Strategy::BalancedLow0, case.balanced_low_0, case.balanced_low_0_balanced_memory),
            (Strategy::Sequential, case.sequential, None),
        ];
        for (strategy, expected_map, expected_budgets) in expectations {
            if let Some(expected) = expected_map {
                checked += 1;
                match infer_device_map(&shape, dtype, &max_memory, strategy) {
                    Ok(got) if got == expected => {
                        let reparsed: DeviceMap = serde_json::from_str(&got.to_json_string()).expect("own JSON parses");
                        assert_eq!(reparsed, expected, "{model} {strategy}: to_json_string round trip");
                    }
                    Ok(got) => failures.push(format!(
                        "{model} {strategy}: map differs\n  got      {}\n  expected {}",
                        got.to_json_string(),
                        expected.to_json_string()
                    )),
                    Err(e) => failures.push(format!("{model} {strategy}: error {e}")),
                }
            }
            if let Some(Ordered(expected)) = expected_budgets {
                checked += 1;
                let expected: Vec<(Device, u64)> = expected.into_iter().map(|(d, m)| (d.parse().expect("device"), m)).collect();
                let low_zero = strategy == Strategy::BalancedLow0;
                match balanced_memory(&shape, dtype, &max_memory, low_zero) {
                    Ok(got) if got == expected => {}
                    other => failures.push(format!("{model} {strategy} budgets: got {other:?}, expected {expected:?}")),
                }
            }
        }
        // `balanced` is absent from the fixture; transformers runs it exactly like `auto`.
        assert_eq!(
            infer_device_map(&shape, dtype, &max_memory, Strategy::Balanced).unwrap(),
            infer_device_map(&shape, dtype, &max_memory, Strategy::Auto).unwrap(),
            "{model}"
        );
    }
    assert!(failures.is_empty(), "{} of {checked} fixture checks wrong:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{checked} fixture checks (device maps and balanced budgets) matched");
}

fn qwen3_0_6b() -> ModelShape {
    ModelShape::from_config_json(&serde_json::json!({
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": true
    }))
    .unwrap()
}

#[test]
fn parse_size_matches_convert_file_size_to_int() {
    let cases: &[(&str, u64)] = &[
        ("1MiB", 1 << 20),
        ("40GiB", 40 << 30),
        ("40gib", 40 << 30),
        ("1KiB", 1024),
        ("0.5GiB", 1 << 29),
        ("1.5GB", 1_500_000_000),
        ("5GB", 5_000_000_000),
        ("5gB", 5_000_000_000),
        ("8Gb", 1_000_000_000),
        ("8gb", 1_000_000_000),
        ("1KB", 1000),
        ("10Mb", 1_250_000),
        ("1e3MB", 1_000_000_000),
        (" 2 GiB", 2 << 30),
        ("1_0MB", 10_000_000),
        ("0GiB", 0),
        ("1024", 1024),
        ("1.0000000001KB", 1000),
    ];
    for (text, want) in cases {
        assert_eq!(parse_size(text).unwrap(), *want, "{text}");
    }
    for bad in ["", "GiB", "abc", "5TB", "5B", "-1GiB", "-0.5MB", "nanGB", "infGiB", "1__0MB", "_1MB", "1e30GiB", "1.5"] {
        let err = parse_size(bad).unwrap_err();
        assert!(err.to_string().contains(&format!("{bad:?}")), "{bad}: {err}");
    }
}

#[test]
fn parse_max_memory_reports_the_bad_item() {
    assert_eq!(
        parse_max_memory("1=8GiB, 0 = 8GiB,cpu=64GiB").unwrap(),
        vec![(Device::Index(1), 8 << 30), (Device::Index(0), 8 << 30), (Device::Cpu, 64 << 30)]
    );
    let err = parse_max_memory("0=8GiB,gpu1=8GiB").unwrap_err();
    assert!(err.to_string().contains("\"gpu1=8GiB\""), "{err}");
    let err = parse_max_memory("0=8GiB,1:8GiB").unwrap_err();
    assert!(err.to_string().contains("\"1:8GiB\""), "{err}");
    let err = parse_max_memory("0=lots").unwrap_err();
    assert!(err.to_string().contains("\"0=lots\""), "{err}");
    assert!(matches!(parse_max_memory("0=1GiB,0=2GiB"), Err(PlacementError::DuplicateDevice { device: Device::Index(0) })));
    assert!(matches!(parse_max_memory("  "), Err(PlacementError::EmptyMaxMemory)));
    assert!(matches!(parse_max_memory("0=1GiB,"), Err(PlacementError::InvalidMaxMemoryItem { .. })));
    assert!(matches!(parse_max_memory("-1=1GiB"), Err(PlacementError::InvalidMaxMemoryItem { .. })));
}

#[test]
fn dtype_names() {
    assert_eq!(dtype_bytes("float32").unwrap(), 4);
    assert_eq!(dtype_bytes("f32").unwrap(), 4);
    assert_eq!(dtype_bytes("torch.bfloat16").unwrap(), 2);
    assert_eq!(dtype_bytes("bf16").unwrap(), 2);
    assert_eq!(dtype_bytes("float16").unwrap(), 2);
    assert_eq!(dtype_bytes("f16").unwrap(), 2);
    let err = dtype_bytes("int4").unwrap_err();
    assert!(err.to_string().contains("\"int4\""));
}

#[test]
fn strategy_and_device_parsing() {
    for s in ["auto", "balanced", "balanced_low_0", "sequential"] {
        assert_eq!(s.parse::<Strategy>().unwrap().to_string(), s);
    }
    assert!(matches!("Auto".parse::<Strategy>(), Err(PlacementError::UnknownStrategy(_))));
    assert_eq!("3".parse::<Device>().unwrap(), Device::Index(3));
    assert_eq!("cpu".parse::<Device>().unwrap().to_string(), "cpu");
    assert!("cuda:0".parse::<Device>().is_err());
    assert!("+1".parse::<Device>().is_err());
    assert!("99999999999".parse::<Device>().is_err());
    let map: DeviceMap = serde_json::from_str(r#"{"b": 1, "a": "cpu", "c": "disk"}"#).unwrap();
    assert_eq!(map.to_json_string(), r#"{"b": 1, "a": "cpu", "c": "disk"}"#);
    assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"b":1,"a":"cpu","c":"disk"}"#);
    assert!(serde_json::from_str::<DeviceMap>(r#"{"a": "gpu"}"#).is_err());
    assert!(serde_json::from_str::<DeviceMap>(r#"{"a": -1}"#).is_err());
    assert_eq!(map.device_of("a.weight"), Some(Device::Cpu));
    assert_eq!(map.device_of("z"), None);
}

#[test]
fn config_defaults_and_errors() {
    let shape = ModelShape::from_config_json(&serde_json::json!({
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000, "head_dim": null
    }))
    .unwrap();
    assert_eq!(shape.architecture, Architecture::Mistral);
    assert_eq!(shape.num_key_value_heads, 32);
    assert_eq!(shape.head_dim, 128);
    assert!(!shape.tie_word_embeddings && !shape.attention_bias);

    let qwen2 = ModelShape::from_config_json(&serde_json::json!({
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": true
    }))
    .unwrap();
    assert!(qwen2.attention_bias);
    let sizes = module_sizes(&qwen2, 2).unwrap();
    assert_eq!(sizes.get("model.layers.0.self_attn.q_proj"), (896 * 896 + 896) * 2);
    assert_eq!(sizes.get("model.layers.0.self_attn.k_proj.bias"), 128 * 2);
    assert_eq!(sizes.get("model.layers.0.self_attn.o_proj"), 896 * 896 * 2);

    let err = ModelShape::from_config_json(&serde_json::json!({"model_type": "gpt2"})).unwrap_err();
    assert!(err.to_string().contains("gpt2"));
    let err = ModelShape::from_config_json(&serde_json::json!({"model_type": "llama"})).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    let err = ModelShape::from_config_json(&serde_json::json!({
        "model_type": "llama", "hidden_size": "big", "intermediate_size": 1,
        "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 1
    }))
    .unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    let err = ModelShape::from_config_json(&serde_json::json!({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 1,
        "num_hidden_layers": 1, "num_attention_heads": 0, "vocab_size": 1
    }))
    .unwrap_err();
    assert!(err.to_string().contains("num_attention_heads"), "{err}");
    assert!(ModelShape::from_config_json(&serde_json::json!([])).is_err());
    assert!(ModelShape::from_config_json(&serde_json::json!({"hidden_size": 1})).is_err());
}

#[test]
fn sizes_count_ties_once_and_buffers_in_float32() {
    let shape = qwen3_0_6b();
    let sizes = module_sizes(&shape, 2).unwrap();
    // Equals budget(0) + budget(1) from the fixture's balanced_low_0 case.
    assert_eq!(sizes.total(), 1_192_100_096);
    assert_eq!(sizes.get("lm_head"), 0);
    assert_eq!(sizes.get("model.rotary_emb"), 2 * 64 * 2);
    assert_eq!(sizes.get("model.layers.0.self_attn.q_norm.weight"), 256);
    assert_eq!(sizes.entries()[0].0, "");
    assert_eq!(sizes.entries().last().unwrap().0, "model.rotary_emb.original_inv_freq");
    let f32_sizes = module_sizes(&shape, 4).unwrap();
    assert_eq!(f32_sizes.get("model.rotary_emb"), 2 * 64 * 4);
    let untied = ModelShape { tie_word_embeddings: false, ..shape };
    assert_eq!(module_sizes(&untied, 2).unwrap().get("lm_head"), 151_936 * 1024 * 2);
    assert!(matches!(module_sizes(&untied, 0), Err(PlacementError::ZeroDtypeWidth)));
    let huge = ModelShape { vocab_size: u64::MAX, ..untied };
    assert!(matches!(module_sizes(&huge, 2), Err(PlacementError::Overflow(_))));
}

#[test]
fn small_models_collapse_to_the_root() {
    let shape = qwen3_0_6b();
    let one_gpu = parse_max_memory("0=80GiB").unwrap();
    for s in [Strategy::Auto, Strategy::BalancedLow0, Strategy::Sequential] {
        let map = infer_device_map(&shape, 2, &one_gpu, s).unwrap();
        assert_eq!(map.0, vec![(String::new(), Device::Index(0))], "{s}");
    }
    let cpu = parse_max_memory("cpu=64GiB").unwrap();
    let map = infer_device_map(&shape, 2, &cpu, Strategy::Auto).unwrap();
    assert_eq!(map.to_json_string(), r#"{"": "cpu"}"#);
    assert!(matches!(infer_device_map(&shape, 2, &[], Strategy::Auto), Err(PlacementError::EmptyMaxMemory)));
    assert!(matches!(
        balanced_memory(&shape, 2, &[(Device::Cpu, 1), (Device::Cpu, 2)], false),
        Err(PlacementError::DuplicateDevice { .. })
    ));
    let nothing = parse_max_memory("0=0,cpu=0").unwrap();
    let map = infer_device_map(&shape, 2, &nothing, Strategy::Sequential).unwrap();
    assert_eq!(map.to_json_string(), r#"{"": "disk"}"#);
}

#[test]
fn balanced_low_0_requires_contiguous_gpus() {
    let shape = qwen3_0_6b();
    let gappy = parse_max_memory("0=1GiB,2=1GiB").unwrap();
    assert!(matches!(balanced_memory(&shape, 2, &gappy, true), Err(PlacementError::MissingGpu { index: 1 })));
    // Without GPU 0, low_zero is meaningless and accelerate would fail on `max_memory[0]`.
    let no_zero = parse_max_memory("1=1GiB,2=1GiB").unwrap();
    assert!(balanced_memory(&shape, 2, &no_zero, true).is_err());
    // Balancing only trims GPUs before the last; the budgets come back sorted.
    let b = balanced_memory(&shape, 2, &parse_max_memory("cpu=1GiB,1=1GiB,0=1GiB").unwrap(), false).unwrap();
    assert_eq!(b[0].0, Device::Index(0));
    assert_eq!(b[1], (Device::Index(1), 1 << 30));
    assert_eq!(b[2], (Device::Cpu, 1 << 30));
}

#[test]
fn clean_moves_collapsed_subtrees_to_the_end() {
    let mut map: Vec<(String, Device)> = vec![
        ("model.embed_tokens".into(), Device::Index(0)),
        ("model.layers.0".into(), Device::Index(1)),
        ("model.layers.1".into(), Device::Index(1)),
        ("model.norm".into(), Device::Index(0)),
        ("lm_head".into(), Device::Index(0)),
    ];
    clean_device_map(&mut map, "");
    let keys: Vec<&str> = map.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["model.embed_tokens", "model.norm", "lm_head", "model.layers"]);
}

#[test]
fn projections_held_in_a_block_type_are_sized_and_placed_at_its_bytes() {
    let shape = qwen3_0_6b();
    let q8 = shape.clone().with_projections_in(BlockType { weights: 32, bytes: 34 }).unwrap();
    assert_eq!(q8.quantized.len(), 28 * 7, "seven projections in each of 28 layers");
    let (full, sizes) = (module_sizes(&shape, 4).unwrap(), module_sizes(&q8, 4).unwrap());
    // A layer: q 1024→2048, k and v 1024→1024, o 2048→1024, gate, up and down 1024↔3072; the
    // norms (two of 1024, q_norm and k_norm of 128) stay at the dtype.
    let proj: u64 = 1024 * 2048 * 2 + 1024 * 1024 * 2 + 1024 * 3072 * 3;
    let norms = (1024 * 2 + 128 * 2) * 4;
    assert_eq!(full.get("model.layers.0"), proj * 4 + norms);
    assert_eq!(sizes.get("model.layers.0"), proj / 32 * 34 + norms);
    assert_eq!(sizes.get("model.layers.27.mlp.down_proj.weight"), 1024 * 3072 / 32 * 34);
    assert_eq!(sizes.get("model.embed_tokens"), full.get("model.embed_tokens"), "the embedding stays at the dtype");
    assert_eq!(sizes.total(), full.total() - 28 * (proj * 4 - proj / 32 * 34));
    // Two workers each offering the midpoint: the quantized model fits on the first alone, the
    // f32 one does not.
    let each = (sizes.total() + full.total()) / 2;
    let workers: Vec<cluster::WorkerBudget> =
        ["a", "b"].iter().map(|id| cluster::WorkerBudget { id: id.to_string(), bytes: each }).collect();
    let plan = cluster::plan(&q8, 4, &workers, Strategy::Sequential).unwrap();
    assert_eq!(plan.iter().map(|s| (s.worker, s.layers.clone())).collect::<Vec<_>>(), [(0, 0..28)]);
    assert_eq!(plan[0].bytes, sizes.total());
    assert_eq!(cluster::plan(&shape, 4, &workers, Strategy::Sequential).unwrap().len(), 2);
}
