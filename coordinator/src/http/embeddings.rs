//! `/v1/embeddings`: each input's final-norm hidden states through the pipeline, pooled, as
//! OpenAI's API shapes them (float lists or base64).

use super::api::field_error;
use super::request::kind_of;
use super::{ApiError, App};
use crate::service::{record, Caller, InferenceService};
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    #[serde(default)]
    pub model: String,
    /// A string or a list of strings.
    pub input: serde_json::Value,
    /// "float" (default) or "base64" (each vector's little-endian f32 bytes, as OpenAI's client
    /// asks by default).
    pub encoding_format: Option<String>,
    pub dimensions: Option<serde_json::Value>,
    pub user: Option<String>,
    /// "last" (default), "mean" or "none" (every position: a list of vectors per input).
    pub pooling: Option<String>,
    /// Unit L2 norm (default true, as OpenAI's embeddings are).
    pub normalize: Option<bool>,
}

/// `POST /v1/embeddings`: the final-norm hidden states of each input, pooled.
pub async fn embeddings(State(app): State<App>, Extension(caller): Extension<Caller>, body: Body) -> Response {
    let req: EmbeddingsRequest = match super::parse_whole(&app, body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let inputs: Vec<String> = match &req.input {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) if !a.is_empty() && a.iter().all(|v| v.is_string()) => {
            a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect()
        }
        serde_json::Value::Array(a) if a.is_empty() => {
            return ApiError::invalid("input must not be empty", Some("input".into())).into_response()
        }
        serde_json::Value::Array(_) => return ApiError::unsupported("input", " as token ids: send text").into_response(),
        other => {
            return ApiError::invalid(
                format!("input: expected a string or a list of strings, got {}", kind_of(other)),
                Some("input".into()),
            )
            .into_response()
        }
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return ApiError::invalid(
                format!("encoding_format: {other:?} is neither \"float\" nor \"base64\""),
                Some("encoding_format".into()),
            )
            .into_response()
        }
    };
    if req.dimensions.as_ref().is_some_and(|d| !d.is_null()) {
        return ApiError::unsupported("dimensions", "").into_response();
    }
    let pooling: crate::engine::Pooling = match req.pooling.as_deref().unwrap_or("last").parse() {
        Ok(p) => p,
        Err(e) => return ApiError::invalid(e, Some("pooling".into())).into_response(),
    };
    if base64 && pooling == crate::engine::Pooling::None {
        return ApiError::invalid(
            "encoding_format \"base64\" gives one vector per input: use \"float\" with pooling \"none\"",
            Some("encoding_format".into()),
        )
        .into_response();
    }
    if let Some(user) = &req.user {
        tracing::debug!(user = %user, "embeddings request");
    }
    let spec = crate::engine::EmbedSpec { pooling, normalize: req.normalize.unwrap_or(true) };
    let svc = InferenceService(app.models.clone());
    let id = format!("embd-{:016x}", crate::util::random_u64());
    let name = svc.0.find(&req.model).map_or_else(|_| req.model.clone(), |(_, m)| m.name.clone());
    let span = tracing::info_span!("request", request_id = %id, model = %req.model, replica = tracing::field::Empty);
    let result = tracing::Instrument::instrument(svc.embed_all(&req.model, &inputs, spec, &id, &caller), span).await;
    record(&name, result.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok));
    let (vectors, prompt_tokens) = match result {
        Ok(v) => v,
        Err(e) => return field_error(ApiError::from(e)).into_response(),
    };
    let data: Vec<serde_json::Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, rows)| {
            let embedding = match pooling {
                crate::engine::Pooling::None => serde_json::json!(rows),
                _ if base64 => {
                    use base64::Engine as _;
                    let bytes: Vec<u8> = rows.into_iter().flatten().flat_map(f32::to_le_bytes).collect();
                    serde_json::json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
                _ => serde_json::json!(rows.into_iter().next().unwrap_or_default()),
            };
            serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    super::json(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
    )
}
