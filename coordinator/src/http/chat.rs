//! `/v1/chat/completions`: the messages rendered with the model's own chat template (as
//! transformers' `apply_chat_template` renders it), then generated like a completion.

use super::api::StreamOptions;
use super::{ApiError, App};
use crate::engine::ModelEntry;
use serde::Deserialize;

/// `POST /v1/chat/completions`, less the [`super::api::Sampling`] fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: String,
    pub messages: serde_json::Value,
    pub tools: Option<serde_json::Value>,
    /// Only "auto" and "none" (the template decides how tools are offered; nothing forces a
    /// call).
    pub tool_choice: Option<serde_json::Value>,
    /// Template variables, e.g. `{"enable_thinking": false}`.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    pub add_generation_prompt: Option<bool>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    // OpenAI fields this server does not support: named in a 400 when set.
    pub logit_bias: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<serde_json::Value>,
}

impl ChatRequest {
    fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.logit_bias.as_ref().is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(ApiError::unsupported("logit_bias", ""));
        }
        if let Some(f) = &self.response_format {
            if !f.is_null() && f.get("type").and_then(|t| t.as_str()) != Some("text") {
                return Err(ApiError::unsupported("response_format", " (other than {\"type\": \"text\"})"));
            }
        }
        if let Some(c) = &self.tool_choice {
            if !matches!(c.as_str(), Some("auto" | "none")) && !c.is_null() {
                return Err(ApiError::unsupported("tool_choice", " (other than \"auto\" or \"none\")"));
            }
        }
        if self.parallel_tool_calls.as_ref().is_some_and(|v| !v.is_null() && v != &serde_json::Value::Bool(true)) {
            return Err(ApiError::unsupported("parallel_tool_calls", " (other than true)"));
        }
        if self.top_logprobs.is_some() && self.logprobs != Some(true) {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs".into())));
        }
        Ok(())
    }
}

/// The prompt text of `req`: its messages through its model's chat template.
pub(super) fn render(app: &App, req: &ChatRequest) -> Result<String, ApiError> {
    req.check_unsupported()?;
    if let Some(user) = &req.user {
        tracing::debug!(user = %user, "chat request");
    }
    let (_, model) = app.models.find(&req.model).map_err(ApiError::from)?;
    let tools = match &req.tool_choice {
        Some(c) if c.as_str() == Some("none") => None,
        _ => req.tools.as_ref(),
    };
    render_messages(&model, &req.messages, tools, req.add_generation_prompt.unwrap_or(true), req.chat_template_kwargs.as_ref())
}

/// The roles OpenAI's chat API has.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks `messages` as OpenAI's API defines them — a non-empty list of objects with a known
/// role, and text content — and gives them as a text model's template reads them: a list of
/// text parts becomes one string (the parts joined by newlines, as vLLM does).
pub fn openai_messages(messages: &serde_json::Value) -> Result<serde_json::Value, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("messages".into()));
    let list = messages.as_array().ok_or_else(|| bad("messages: expected an array of messages".into()))?;
    if list.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let mut m = m.as_object().cloned().ok_or_else(|| bad(format!("messages[{i}]: expected an object")))?;
        match m.get("role").and_then(|r| r.as_str()) {
            Some(r) if ROLES.contains(&r) => {}
            Some(r) => return Err(bad(format!("messages[{i}].role: unknown role {r:?} (one of {})", ROLES.join(", ")))),
            None => return Err(bad(format!("messages[{i}].role: missing, or not a string"))),
        }
        if let Some(serde_json::Value::Array(parts)) = m.get("content") {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(|t| t.as_str()) {
                    Some("text") => texts.push(
                        p.get("text")
                            .and_then(|t| t.as_str())
                            .ok_or_else(|| bad(format!("messages[{i}].content[{j}].text: missing, or not a string")))?
                            .to_string(),
                    ),
                    Some(t) => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}].type: {t} parts are not supported (this model reads text only)"
                        )))
                    }
                    None => return Err(bad(format!("messages[{i}].content[{j}].type: missing, or not a string"))),
                }
            }
            m.insert("content".into(), serde_json::Value::String(texts.join("\n")));
        } else if let Some(c) = m.get("content") {
            if !c.is_string() && !c.is_null() {
                return Err(bad(format!("messages[{i}].content: expected a string or a list of text parts")));
            }
        }
        out.push(serde_json::Value::Object(m));
    }
    Ok(serde_json::Value::Array(out))
}

/// `messages` (and `tools`) through `model`'s chat template.
pub fn render_messages(
    model: &ModelEntry,
    messages: &serde_json::Value,
    tools: Option<&serde_json::Value>,
    add_generation_prompt: bool,
    kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<String, ApiError> {
    let chat_error = |e: &shardserve::chat::ChatError| ApiError::invalid(e.to_string(), Some(e.param().to_string()));
    let templates = model.chat.as_ref().map_err(chat_error)?;
    let messages = &openai_messages(messages)?;
    let input = shardserve::chat::ChatInput { messages, tools, add_generation_prompt, chat_template_kwargs: kwargs, template: None };
    templates.render(&input).map_err(|e| chat_error(&e))
}
