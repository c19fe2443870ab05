//! OpenAI's request bodies as both generation endpoints read them: the sampling and length
//! fields they share (with vLLM's extras), and `/v1/completions`' own.

use super::ApiError;
use serde::Deserialize;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields both endpoints share, with vLLM's extras: taken out of the
/// body by name ([`SAMPLING_FIELDS`]) and parsed apart from the endpoint's own fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    /// Chat's newer name for max_tokens.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub n: Option<u32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's: mixed into the prefix cache's block hashes, so only requests with the same salt
    /// share cached prompt blocks.
    pub cache_salt: Option<String>,
    /// OpenAI's structured output: `{"type": "json_schema", ...}` or `{"type": "json_object"}`.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's: `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`.
    pub structured_outputs: Option<serde_json::Value>,
}

/// The fields of [`Sampling`], as they are named in a request body.
pub const SAMPLING_FIELDS: [&str; 16] = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "ignore_eos",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "cache_salt",
    "response_format",
    "structured_outputs",
];

impl Sampling {
    /// max_completion_tokens, else max_tokens; both only when they agree.
    pub(super) fn max_tokens(&self) -> Result<Option<u32>, ApiError> {
        match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                Err(ApiError::invalid("max_tokens and max_completion_tokens disagree: give one", Some("max_completion_tokens".into())))
            }
            (a, b) => Ok(b.or(a)),
        }
    }
}

/// `POST /v1/completions`, less the [`Sampling`] fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: String,
    pub prompt: serde_json::Value,
    /// Completions' logprobs: each token's own log-probability, and this many alternatives.
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    // OpenAI fields this server does not support: named in a 400 when set.
    pub echo: Option<serde_json::Value>,
    pub suffix: Option<serde_json::Value>,
    pub best_of: Option<serde_json::Value>,
    pub logit_bias: Option<serde_json::Value>,
}

impl CompletionRequest {
    /// The prompt: a string, or a list holding one string.
    pub(super) fn prompt(&self) -> Result<String, ApiError> {
        match &self.prompt {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(a[0].as_str().unwrap_or_default().to_string()),
            serde_json::Value::Array(a) if a.iter().all(|v| v.is_string()) => Err(ApiError::unsupported(
                "prompt",
                " as a list of several prompts: send one request per prompt (use n for several completions of one)",
            )),
            serde_json::Value::Array(_) => Err(ApiError::unsupported("prompt", " as token ids: send text")),
            other => Err(ApiError::invalid(format!("prompt: expected a string, got {}", kind_of(other)), Some("prompt".into()))),
        }
    }

    pub(super) fn check_unsupported(&self, s: &Sampling) -> Result<(), ApiError> {
        if self.echo.as_ref().is_some_and(|v| v != &serde_json::Value::Bool(false)) {
            return Err(ApiError::unsupported("echo", ""));
        }
        if self.suffix.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported("suffix", ""));
        }
        if let Some(b) = &self.best_of {
            if !b.is_null() && b.as_u64() != Some(u64::from(s.n.unwrap_or(1))) {
                return Err(ApiError::unsupported("best_of", " (other than equal to n)"));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(ApiError::unsupported("logit_bias", ""));
        }
        Ok(())
    }
}

pub(super) fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampling_field_is_taken_out_of_the_body_by_name() {
        let body: serde_json::Map<String, serde_json::Value> = SAMPLING_FIELDS
            .iter()
            .map(|k| {
                let v = match *k {
                    "stop" => serde_json::json!(["a"]),
                    "ignore_eos" => serde_json::json!(true),
                    "cache_salt" => serde_json::json!("s"),
                    "temperature" | "top_p" | "repetition_penalty" | "presence_penalty" | "frequency_penalty" => serde_json::json!(0.5),
                    _ => serde_json::json!(3),
                };
                (k.to_string(), v)
            })
            .collect();
        let s: Sampling = serde_json::from_value(serde_json::Value::Object(body)).expect("SAMPLING_FIELDS names Sampling's fields");
        assert_eq!((s.max_tokens, s.n, s.top_k, s.ignore_eos), (Some(3), Some(3), Some(3), Some(true)));
        assert_eq!(s.cache_salt.as_deref(), Some("s"));
        assert_eq!(s.max_tokens().unwrap(), Some(3));
        let disagree = Sampling { max_tokens: Some(3), max_completion_tokens: Some(4), ..Default::default() };
        assert_eq!(disagree.max_tokens().unwrap_err().param.as_deref(), Some("max_completion_tokens"));
    }

    #[test]
    fn a_list_of_prompts_or_token_ids_is_refused_by_name() {
        let req = |prompt: serde_json::Value| CompletionRequest {
            model: String::new(),
            prompt,
            logprobs: None,
            stream: false,
            stream_options: None,
            user: None,
            echo: None,
            suffix: None,
            best_of: None,
            logit_bias: None,
        };
        assert_eq!(req(serde_json::json!(["one"])).prompt().unwrap(), "one");
        assert!(req(serde_json::json!(["a", "b"])).prompt().unwrap_err().message.contains("several prompts"));
        assert!(req(serde_json::json!([1, 2])).prompt().unwrap_err().message.contains("token ids"));
        assert_eq!(req(serde_json::json!(7)).prompt().unwrap_err().message, "prompt: expected a string, got a number");
    }
}
