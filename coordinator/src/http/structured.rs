//! OpenAI's `response_format` and vLLM's `structured_outputs`, read into the gRPC
//! `StructuredOutput` both protocols share.

use super::ApiError;
use pb::structured_output::Kind;
use shardserve_proto::v1 as pb;

fn bad(param: &str, message: String) -> ApiError {
    ApiError::invalid(message, Some(param.into()))
}

/// The constraint `response_format` or `structured_outputs` asks for (at most one of them).
pub fn structured_output(
    response_format: Option<&serde_json::Value>,
    structured_outputs: Option<&serde_json::Value>,
) -> Result<Option<pb::StructuredOutput>, ApiError> {
    let format = response_format.filter(|v| !v.is_null()).map(of_response_format).transpose()?.flatten();
    let vllm = structured_outputs.filter(|v| !v.is_null()).map(of_structured_outputs).transpose()?;
    match (format, vllm) {
        (Some(_), Some(_)) => Err(bad("structured_outputs", "give response_format or structured_outputs, not both".into())),
        (kind, other) => Ok(kind.or(other).map(|kind| pb::StructuredOutput { kind: Some(kind) })),
    }
}

/// OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
/// "strict"}}`.
fn of_response_format(v: &serde_json::Value) -> Result<Option<Kind>, ApiError> {
    const P: &str = "response_format";
    let o = v.as_object().ok_or_else(|| bad(P, format!("{P}: expected an object, got {}", super::request::kind_of(v))))?;
    match o.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Kind::JsonObject(true))),
        Some("json_schema") => {
            let schema = o
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad(P, format!("{P}.json_schema.schema is required with type json_schema")))?;
            Ok(Some(Kind::JsonSchema(schema.to_string())))
        }
        Some(other) => Err(bad(P, format!("{P}.type: {other:?} is not one of \"text\", \"json_object\", \"json_schema\""))),
        None => Err(bad(P, format!("{P}.type is required"))),
    }
}

/// vLLM's `{"json": schema, "regex": ..., "choice": [...], "grammar": ..., "json_object": true}`,
/// one of them.
fn of_structured_outputs(v: &serde_json::Value) -> Result<Kind, ApiError> {
    const P: &str = "structured_outputs";
    let o = v.as_object().ok_or_else(|| bad(P, format!("{P}: expected an object, got {}", super::request::kind_of(v))))?;
    let set: Vec<(&String, &serde_json::Value)> = o.iter().filter(|(_, v)| !v.is_null() && **v != serde_json::Value::Bool(false)).collect();
    let [(key, value)] = set.as_slice() else {
        return Err(bad(P, format!("{P}: give exactly one of json, regex, choice, grammar, json_object (got {})", set.len())));
    };
    let text = |what: &str| {
        value
            .as_str()
            .map(String::from)
            .ok_or_else(|| bad(P, format!("{P}.{key}: expected {what}, got {}", super::request::kind_of(value))))
    };
    match key.as_str() {
        "json" => Ok(Kind::JsonSchema(match value {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        })),
        "regex" => Ok(Kind::Regex(text("a string")?)),
        "grammar" => Ok(Kind::Grammar(text("a string")?)),
        "json_object" => Ok(Kind::JsonObject(true)),
        "choice" => {
            let list = value.as_array().ok_or_else(|| bad(P, format!("{P}.choice: expected a list of strings")))?;
            let choices = list
                .iter()
                .map(|c| c.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(P, format!("{P}.choice: expected a list of strings")))?;
            Ok(Kind::Choice(pb::Choices { choices }))
        }
        other => Err(bad(P, format!("{P}.{other} is not supported (json, regex, choice, grammar, json_object are)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kind(rf: Option<serde_json::Value>, so: Option<serde_json::Value>) -> Result<Option<Kind>, ApiError> {
        structured_output(rf.as_ref(), so.as_ref()).map(|s| s.and_then(|s| s.kind))
    }

    #[test]
    fn openai_and_vllm_shapes_map_onto_one_constraint() {
        let schema = json!({"type": "object"});
        let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}});
        assert_eq!(kind(Some(rf), None).unwrap(), Some(Kind::JsonSchema(schema.to_string())));
        assert_eq!(kind(Some(json!({"type": "json_object"})), None).unwrap(), Some(Kind::JsonObject(true)));
        assert_eq!(kind(Some(json!({"type": "text"})), None).unwrap(), None);
        assert_eq!(kind(None, Some(json!({"json": schema}))).unwrap(), Some(Kind::JsonSchema(schema.to_string())));
        assert_eq!(
            kind(None, Some(json!({"json": "{\"type\": \"string\"}"}))).unwrap(),
            Some(Kind::JsonSchema("{\"type\": \"string\"}".into()))
        );
        assert_eq!(kind(None, Some(json!({"regex": "a+", "json": null}))).unwrap(), Some(Kind::Regex("a+".into())));
        assert_eq!(
            kind(None, Some(json!({"choice": ["a", "b"]}))).unwrap(),
            Some(Kind::Choice(pb::Choices { choices: vec!["a".into(), "b".into()] }))
        );
        assert_eq!(kind(None, Some(json!({"grammar": "start: \"x\""}))).unwrap(), Some(Kind::Grammar("start: \"x\"".into())));
        assert_eq!(kind(None, None).unwrap(), None);
    }

    #[test]
    fn every_bad_shape_gets_a_400_naming_its_field() {
        let cases = [
            (Some(json!({"type": "json_schema"})), None, "response_format", "json_schema.schema is required"),
            (Some(json!({"type": "xml"})), None, "response_format", "\"xml\" is not one of"),
            (Some(json!("json")), None, "response_format", "expected an object, got a string"),
            (None, Some(json!({"regex": "a", "choice": ["b"]})), "structured_outputs", "exactly one"),
            (None, Some(json!({"choice": [1]})), "structured_outputs", "list of strings"),
            (None, Some(json!({"structural_tag": "x"})), "structured_outputs", "structural_tag is not supported"),
            (None, Some(json!({"regex": 3})), "structured_outputs", "regex: expected a string, got a number"),
            (Some(json!({"type": "json_object"})), Some(json!({"regex": "a"})), "structured_outputs", "not both"),
        ];
        for (rf, so, param, message) in cases {
            let e = kind(rf, so).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
            assert!(e.message.contains(message), "{} lacks {message}", e.message);
        }
    }
}
