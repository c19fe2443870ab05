//! A chat request's conversation checked as OpenAI's API defines it and rendered with the
//! model's own chat template.

use super::output::{Reasoning, ReasoningParser, ToolCallParser, ToolFormat, THINK_END};
use super::structured::{Constraint, Guidance};
use crate::engine::ModelEntry;

/// A conversation that cannot be rendered: what is wrong, and the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidChat {
    pub message: String,
    pub param: &'static str,
}

/// The roles OpenAI's chat API has.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks `messages` as OpenAI's API defines them — a non-empty list of objects with a known
/// role, and text content — and gives them as a text model's template reads them: a list of
/// text parts becomes one string (the parts joined by newlines, as vLLM does).
pub fn openai_messages(messages: &serde_json::Value) -> Result<serde_json::Value, InvalidChat> {
    let bad = |message: String| InvalidChat { message, param: "messages" };
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

/// `messages` (and `tools`) through `model`'s chat template, as transformers'
/// `apply_chat_template` renders them.
pub fn render_messages(
    model: &ModelEntry,
    messages: &serde_json::Value,
    tools: Option<&serde_json::Value>,
    add_generation_prompt: bool,
    kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<String, InvalidChat> {
    let chat_error = |e: &shardserve::chat::ChatError| InvalidChat { message: e.to_string(), param: e.param() };
    let templates = model.chat.as_ref().as_ref().map_err(chat_error)?;
    let messages = &openai_messages(messages)?;
    let input = shardserve::chat::ChatInput { messages, tools, add_generation_prompt, chat_template_kwargs: kwargs, template: None };
    templates.render(&input).map_err(|e| chat_error(&e))
}

/// How a rendered chat's answer is read and held: the tool-call format (when the request
/// offers tools), where the model reasons, and the calls `tool_choice` demands.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub format: Option<ToolFormat>,
    /// Where the text's reasoning is, for reading it.
    pub reasoning: Reasoning,
    /// The format's markers that are special tokens (detokenizing skips them), by id.
    pub markers: Vec<(u32, &'static str)>,
    /// What holds the answer beyond the request's own constraint.
    pub guidance: Guidance,
}

/// The [`Reading`] of a chat with `tools` offered (none when `tool_choice` is "none"),
/// `tool_choice` and `parallel_tool_calls`, rendered as `prompt` for `model`, with the parsers
/// the server was started with.
pub fn reading(
    model: &ModelEntry,
    prompt: &str,
    tools: Option<&serde_json::Value>,
    (tool_choice, parallel): (Option<&serde_json::Value>, bool),
    parsers: (ToolCallParser, ReasoningParser),
) -> Result<Reading, InvalidChat> {
    let offered = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    let template = model.chat.as_ref().as_ref().ok().and_then(|t| t.source(offered.is_some()));
    let format = offered.and_then(|_| parsers.0.format(template));
    let reasoning = Reasoning::for_prompt(parsers.1.thinks(template), prompt);
    let calls = Constraint::from_tool_choice(tool_choice, tools, format, parallel)
        .map_err(|e| InvalidChat { message: e.to_string(), param: e.field })?;
    // A prompt that closed the block itself (Qwen3's enable_thinking: false) leaves nothing to
    // reason: a constraint holds the text from its first token.
    let held = if prompt.trim_end().ends_with(THINK_END) { Reasoning::Off } else { reasoning };
    let markers = format
        .map(|f| f.markers().iter().filter_map(|m| model.tokenizer.special_token_id(m).map(|id| (id, *m))).collect())
        .unwrap_or_default();
    Ok(Reading { format, reasoning, markers, guidance: Guidance { reasoning: held, calls } })
}
