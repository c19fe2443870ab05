//! `/v1/chat/completions`: the messages rendered with the model's own chat template (as
//! transformers' `apply_chat_template` renders it), then generated like a completion.

use super::api::Found;
use super::request::StreamOptions;
use super::{ApiError, App};
use crate::engine::GenEvent;
use crate::frontend::chat::{reading, render_messages, Reading};
use crate::frontend::reader::{ChatReader, Piece};
use serde::Deserialize;
use serde_json::json;

/// `POST /v1/chat/completions`, less the [`super::request::Sampling`] fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: String,
    pub messages: serde_json::Value,
    pub tools: Option<serde_json::Value>,
    /// "auto", "none", "required" or a named function (the last two enforced by constrained
    /// decoding).
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
    pub parallel_tool_calls: Option<serde_json::Value>,
}

impl ChatRequest {
    fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.logit_bias.as_ref().is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(ApiError::unsupported("logit_bias", ""));
        }
        if self.parallel_tool_calls.as_ref().is_some_and(|v| !v.is_null() && !v.is_boolean()) {
            return Err(ApiError::invalid("parallel_tool_calls: expected a boolean", Some("parallel_tool_calls".into())));
        }
        if self.top_logprobs.is_some() && self.logprobs != Some(true) {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs".into())));
        }
        Ok(())
    }
}

/// The model `req` names (found once), the prompt text of `req` (its messages through the
/// model's chat template), and how the response's text is read and held.
pub(super) fn render(app: &App, req: &ChatRequest) -> Result<(Found, String, Reading), ApiError> {
    req.check_unsupported()?;
    if let Some(user) = &req.user {
        tracing::debug!(user = %user, "chat request");
    }
    let (engine, model) = app.models.find(&req.model).map_err(ApiError::from)?;
    let tools = match &req.tool_choice {
        Some(c) if c.as_str() == Some("none") => None,
        _ => req.tools.as_ref().filter(|t| t.as_array().is_some_and(|a| !a.is_empty())),
    };
    let prompt =
        render_messages(&model, &req.messages, tools, req.add_generation_prompt.unwrap_or(true), req.chat_template_kwargs.as_ref())?;
    let parsers = (app.limits.tool_call_parser, app.limits.reasoning_parser);
    let parallel = req.parallel_tool_calls.as_ref().and_then(|v| v.as_bool()).unwrap_or(true);
    let reading = reading(&model, &prompt, tools, (req.tool_choice.as_ref(), parallel), parsers)?;
    Ok(((engine, model), prompt, reading))
}

/// One choice's text read as it comes, into OpenAI's chat deltas or its whole message.
#[derive(Debug)]
pub struct ChatOutput(ChatReader);

impl ChatOutput {
    pub fn new(reading: &Reading) -> Self {
        ChatOutput(ChatReader::new(reading))
    }

    /// The `delta` of the chunk streamed for `ev` (`{}` when it settles nothing).
    pub fn delta(&mut self, ev: &GenEvent) -> serde_json::Value {
        delta_json(self.0.piece(ev))
    }

    /// The `delta` of what is still held when the choice ended without a last event.
    pub fn end(&mut self) -> Option<serde_json::Value> {
        self.0.end().map(delta_json)
    }

    /// Adds an event's text to a response given whole.
    pub fn push(&mut self, ev: &GenEvent) {
        self.0.push(ev);
    }

    /// The whole `message`: its content (null when it is only calls), reasoning and calls.
    pub fn message(&mut self) -> serde_json::Value {
        let m = self.0.message();
        let mut message = json!({"role": "assistant", "content": m.content});
        if let Some(r) = m.reasoning {
            message["reasoning_content"] = if r.is_empty() { serde_json::Value::Null } else { r.into() };
        }
        if !m.calls.is_empty() {
            let calls: Vec<serde_json::Value> = m
                .calls
                .into_iter()
                .map(|(id, c)| json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            message["tool_calls"] = calls.into();
        }
        message
    }

    /// OpenAI's finish_reason: `tool_calls` when the model stopped after calling tools.
    pub fn finish_reason(&self, engine: &str) -> &'static str {
        match engine {
            "length" => "length",
            _ if self.0.called() => "tool_calls",
            _ => "stop",
        }
    }
}

/// A piece as OpenAI's chat `delta`.
fn delta_json(piece: Piece) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if !piece.reasoning.is_empty() {
        out.insert("reasoning_content".into(), piece.reasoning.into());
    }
    if !piece.content.is_empty() {
        out.insert("content".into(), piece.content.into());
    }
    if !piece.calls.is_empty() {
        let calls = piece
            .calls
            .into_iter()
            .map(|c| match c.id_and_name {
                Some((id, name)) => {
                    json!({"index": c.index, "id": id, "type": "function", "function": {"name": name, "arguments": c.arguments}})
                }
                None => json!({"index": c.index, "function": {"arguments": c.arguments}}),
            })
            .collect::<Vec<_>>();
        out.insert("tool_calls".into(), calls.into());
    }
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::output::{Reasoning, ToolFormat};
    use crate::frontend::structured::Guidance;

    fn event(text: &str, token_ids: Vec<u32>, finish_reason: Option<&'static str>) -> GenEvent {
        GenEvent { text: text.into(), token_ids, finish_reason, ..Default::default() }
    }

    /// `text` as the engine gives it: a few characters an event, the last one finishing.
    fn events(text: &str, finish: &'static str) -> Vec<GenEvent> {
        let chars: Vec<char> = text.chars().collect();
        let pieces: Vec<String> = chars.chunks(3).map(|c| c.iter().collect()).collect();
        let last = pieces.len() - 1;
        pieces.iter().enumerate().map(|(i, p)| event(p, vec![1], (i == last).then_some(finish))).collect()
    }

    fn spec(format: Option<ToolFormat>, reasoning: Reasoning) -> Reading {
        Reading { format, reasoning, markers: Vec::new(), guidance: Guidance::default() }
    }

    /// The chunks' deltas put back together as OpenAI's client does, and the last finish_reason.
    fn stream(spec: &Reading, events: &[GenEvent]) -> (serde_json::Value, &'static str) {
        let mut out = ChatOutput::new(spec);
        let (mut reasoning, mut content) = (String::new(), String::new());
        let mut calls: Vec<serde_json::Value> = Vec::new();
        let mut finish = "";
        for ev in events {
            let delta = out.delta(ev);
            reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
            content.push_str(delta["content"].as_str().unwrap_or_default());
            for c in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = c["index"].as_u64().unwrap() as usize;
                if index == calls.len() {
                    assert!(c["id"].is_string() && c["type"] == "function" && c["function"]["name"].is_string(), "{c}");
                    calls.push(json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}));
                } else {
                    assert!(c.get("id").is_none() && c["function"].get("name").is_none(), "id and name come once: {c}");
                    let args = format!("{}{}", calls[index]["arguments"].as_str().unwrap(), c["function"]["arguments"].as_str().unwrap());
                    calls[index]["arguments"] = args.into();
                }
            }
            if let Some(r) = ev.finish_reason {
                finish = out.finish_reason(r);
            }
        }
        assert!(out.end().is_none(), "the last event settles everything");
        (json!({"reasoning": reasoning, "content": content, "calls": calls}), finish)
    }

    /// The message given whole, in the shape of [`stream`]'s.
    fn whole(spec: &Reading, events: &[GenEvent]) -> (serde_json::Value, serde_json::Value, &'static str) {
        let mut out = ChatOutput::new(spec);
        for ev in events {
            out.push(ev);
        }
        let message = out.message();
        let calls: Vec<serde_json::Value> = message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}))
            .collect();
        let shape = json!({"reasoning": message["reasoning_content"].as_str().unwrap_or_default(),
            "content": message["content"].as_str().unwrap_or_default(), "calls": calls});
        let finish = out.finish_reason(events.last().unwrap().finish_reason.unwrap());
        (message, shape, finish)
    }

    #[test]
    fn a_call_after_reasoning_streams_as_openai_deltas_equal_to_the_whole_message() {
        let text = "<think>\nWeather, so a call.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let spec = spec(Some(ToolFormat::Hermes), Reasoning::Tagged);
        let evs = events(text, "stop");
        let (streamed, finish) = stream(&spec, &evs);
        let (message, shape, whole_finish) = whole(&spec, &evs);
        assert_eq!(streamed, shape);
        assert_eq!((finish, whole_finish), ("tool_calls", "tool_calls"));
        assert_eq!(message["content"], serde_json::Value::Null);
        assert_eq!(message["reasoning_content"], "Weather, so a call.");
        let call = &message["tool_calls"][0];
        assert_eq!((&call["type"], &call["function"]["name"]), (&json!("function"), &json!("get_weather")));
        assert_eq!(call["function"]["arguments"], r#"{"city": "Paris"}"#);
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
    }

    #[test]
    fn a_plain_answer_keeps_its_text_and_finish_reason() {
        let spec = spec(Some(ToolFormat::Hermes), Reasoning::Off);
        let evs = events("Hello there, friend.", "length");
        let (streamed, finish) = stream(&spec, &evs);
        let (message, shape, _) = whole(&spec, &evs);
        assert_eq!(streamed, shape);
        assert_eq!(finish, "length");
        assert_eq!(message, json!({"role": "assistant", "content": "Hello there, friend."}));
    }

    #[test]
    fn markers_skipped_by_detokenizing_are_put_back() {
        // Mistral's [TOOL_CALLS] is a special token: its event's text is empty.
        let spec = Reading {
            format: Some(ToolFormat::Mistral),
            reasoning: Reasoning::Off,
            markers: vec![(9, "[TOOL_CALLS]")],
            guidance: Guidance::default(),
        };
        let mut evs = vec![event("", vec![9], None)];
        evs.extend(events(r#"[{"name": "get_time", "arguments": {}}]"#, "stop"));
        let (message, _, finish) = whole(&spec, &evs);
        assert_eq!(finish, "tool_calls");
        assert_eq!(message["tool_calls"][0]["function"], json!({"name": "get_time", "arguments": "{}"}));
        assert_eq!(message["tool_calls"][0]["id"].as_str().unwrap().len(), 9);
        assert_eq!(stream(&spec, &evs).0["calls"], json!([{"name": "get_time", "arguments": "{}"}]));
    }
}
