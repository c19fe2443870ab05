//! `shardctl plan --json` against transformers/accelerate's own device maps: keys, values and
//! key order.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use shardserve_tests::*;
use std::time::Duration;

/// JSON that keeps object keys in document order (serde_json's maps sort them).
#[derive(Debug, Clone, PartialEq)]
enum Ordered {
    Object(Vec<(String, Ordered)>),
    Array(Vec<Ordered>),
    Leaf(serde_json::Value),
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::Leaf(serde_json::Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Ordered::Array(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = a.next_entry()? {
                    v.push(kv);
                }
                Ok(Ordered::Object(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Ordered {
    fn get(&self, key: &str) -> Option<&Ordered> {
        match self {
            Ordered::Object(v) => v.iter().find(|(k, _)| k == key).map(|(_, x)| x),
            _ => None,
        }
    }
}

#[test]
fn plan_json_equals_accelerate_on_every_fixture_case() {
    let text = std::fs::read_to_string(fixtures().join("device-maps/public.json")).unwrap();
    let ordered: Ordered = serde_json::from_str(&text).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let Some(Ordered::Array(raw_cases)) = ordered.get("cases") else { panic!("no cases") };
    let cases = doc["cases"].as_array().unwrap();
    let mut checked = 0;
    for (case, raw) in cases.iter().zip(raw_cases) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), case["config"].to_string()).unwrap();
        let max_memory: Vec<String> =
            case["max_memory"].as_object().unwrap().iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap())).collect();
        for strategy in ["auto", "balanced_low_0", "sequential"] {
            let Some(want) = raw.get(strategy) else { continue };
            let out = run_shardctl(
                &[
                    "plan",
                    "--model",
                    dir.path().to_str().unwrap(),
                    "--max-memory",
                    &max_memory.join(","),
                    "--dtype",
                    case["dtype"].as_str().unwrap(),
                    "--strategy",
                    strategy,
                    "--json",
                ],
                &[],
                Duration::from_secs(30),
            );
            assert!(out.status.success(), "{}", out.stderr);
            let got: Ordered = serde_json::from_str(out.stdout.trim()).unwrap();
            assert_eq!(&got, want, "{} / {strategy}", case["model"]);
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} maps checked");
}

#[test]
fn plan_errors_are_one_line_and_name_the_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type":"gpt2","hidden_size":8}"#).unwrap();
    let out = run_shardctl(&["plan", "--model", dir.path().to_str().unwrap(), "--max-memory", "0=1GiB"], &[], Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(out.stderr.contains("gpt2"), "{}", out.stderr);
    let m = reference_model();
    let out = run_shardctl(&["plan", "--model", m.to_str().unwrap(), "--max-memory", "0=lots"], &[], Duration::from_secs(30));
    assert!(!out.status.success() && out.stderr.contains("lots"), "{}", out.stderr);
    let out = run_shardctl(
        &["plan", "--model", m.to_str().unwrap(), "--max-memory", "0=1GiB", "--strategy", "fastest"],
        &[],
        Duration::from_secs(30),
    );
    assert!(!out.status.success() && out.stderr.contains("fastest"), "{}", out.stderr);
}
