//! vLLM's `/tokenize` and `/detokenize`.

use super::{ApiError, App};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// vLLM's `/tokenize` body: a prompt, or chat messages rendered with the model's template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: String,
    pub prompt: Option<String>,
    pub messages: Option<serde_json::Value>,
    pub add_generation_prompt: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    pub tools: Option<serde_json::Value>,
    pub add_special_tokens: Option<bool>,
}

/// `POST /tokenize`.
pub async fn tokenize(State(app): State<App>, body: Body) -> Response {
    let req: TokenizeRequest = match super::parse_whole(&app, body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (_, model) = match app.models.find(&req.model) {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let ids = match (&req.prompt, &req.messages) {
        (Some(p), None) => {
            let special = req.add_special_tokens.unwrap_or(true);
            model.tokenizer.encode_with(p, special).map_err(|e| ApiError::invalid(format!("prompt: {e}"), Some("prompt".into())))
        }
        (None, Some(messages)) => crate::frontend::chat::render_messages(
            &model,
            messages,
            req.tools.as_ref(),
            req.add_generation_prompt.unwrap_or(true),
            req.chat_template_kwargs.as_ref(),
        )
        .map_err(ApiError::from)
        .and_then(|text| {
            model.tokenizer.encode_with(&text, req.add_special_tokens.unwrap_or(false)).map_err(|e| ApiError::invalid(e.to_string(), None))
        }),
        (Some(_), Some(_)) => Err(ApiError::invalid("give prompt or messages, not both", Some("messages".into()))),
        (None, None) => Err(ApiError::invalid("prompt or messages is required", Some("prompt".into()))),
    };
    match ids {
        Ok(ids) => {
            super::json(StatusCode::OK, &serde_json::json!({"tokens": ids, "count": ids.len(), "max_model_len": model.max_total_tokens}))
        }
        Err(e) => e.into_response(),
    }
}

/// vLLM's `/detokenize` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: String,
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
pub async fn detokenize(State(app): State<App>, body: Body) -> Response {
    let req: DetokenizeRequest = match super::parse_whole(&app, body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (_, model) = match app.models.find(&req.model) {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let vocab = model.tokenizer.vocab_size();
    if let Some(i) = req.tokens.iter().position(|t| *t as usize >= vocab) {
        return ApiError::invalid(
            format!("tokens[{i}]: {} is not in the vocabulary of {vocab} tokens", req.tokens[i]),
            Some("tokens".into()),
        )
        .into_response();
    }
    match model.tokenizer.decode(&req.tokens) {
        Ok(text) => super::json(StatusCode::OK, &serde_json::json!({"prompt": text})),
        Err(e) => ApiError::invalid(e.to_string(), Some("tokens".into())).into_response(),
    }
}
