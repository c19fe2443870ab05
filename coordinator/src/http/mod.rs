//! The OpenAI-compatible HTTP API (`--http-listen`): `/v1/completions`, `/v1/chat/completions`
//! (both streamed as server-sent events with `stream: true`), `/v1/models`, `/health`, and
//! vLLM's `/tokenize` and `/detokenize`. Requests go through the same validation and the same
//! scheduler as the gRPC API; errors come back in OpenAI's JSON shape with the HTTP status of
//! their gRPC code.

mod api;
pub(crate) mod chat;
mod embeddings;
mod error;
mod request;
mod structured;
mod tokens;

pub use error::ApiError;

use crate::models::Models;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bounds on what one HTTP request may ask, and how model output is read for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most sequences per request (`n`).
    pub max_n: u32,
    /// Largest request body, in bytes (413 beyond).
    pub max_request_bytes: usize,
    /// How chat responses' tool calls are read.
    pub tool_call_parser: crate::frontend::output::ToolCallParser,
    /// How chat responses' reasoning is read.
    pub reasoning_parser: crate::frontend::output::ReasoningParser,
}

/// What the handlers share.
#[derive(Clone)]
struct App {
    models: Arc<Models>,
    limits: Limits,
    auth: crate::auth::Auth,
}

/// The API's routes.
pub fn router(models: Arc<Models>, limits: Limits, auth: crate::auth::Auth) -> Router {
    let app = App { models, limits, auth };
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

/// Every route but `/health` needs an API key when the coordinator has them
/// (`Authorization: Bearer KEY`): 401 without a valid one.
async fn authorize(State(app): State<App>, mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let key = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(crate::auth::bearer);
    if req.uri().path() != "/health" {
        if let Err(e) = app.auth.check(crate::auth::Role::Inference, key) {
            let status = if e.code() == tonic::Code::Unavailable { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::UNAUTHORIZED };
            return ApiError { status, message: e.to_string(), param: None }.into_response();
        }
    }
    // Handlers see who asked (for the prefix cache's tenants, and the leader coordinator).
    let caller = crate::service::Caller::with_key(key);
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    models: Arc<Models>,
    limits: Limits,
    auth: crate::auth::Auth,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(models, limits, auth);
    match tls {
        Some(cfg) => {
            let addr = listener.local_addr()?;
            let rx = shardserve::tls::accept(listener, move || Ok(cfg.clone()), "http", shutdown.clone());
            axum::serve(shardserve::tls::TlsListener { rx, addr }, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await,
    }
}

/// The request body, at most `limit` bytes (413 beyond).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the request body is larger than {limit} bytes (--max-request-bytes)"),
        param: None,
    })
}

/// A JSON response.
fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

/// 200 while every model is placed and ready, else 503 with each model's state.
async fn health(State(app): State<App>) -> Response {
    let engines = app.models.engines();
    let states: Vec<serde_json::Value> =
        engines.iter().map(|e| serde_json::json!({ "model": e.entry().name, "state": e.entry().state().name() })).collect();
    let ready = engines.iter().all(|e| matches!(e.entry().state(), crate::engine::ServingState::Ready(_)));
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(status, &serde_json::json!({ "status": if ready { "ok" } else { "unavailable" }, "models": states }))
}

async fn list_models(State(app): State<App>) -> Response {
    let data: Vec<serde_json::Value> = app
        .models
        .engines()
        .iter()
        .map(|e| {
            let m = e.entry();
            serde_json::json!({
                "id": m.name,
                "object": "model",
                "created": api::created(),
                "owned_by": "shardserve",
                "max_model_len": m.max_total_tokens,
            })
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "object": "list", "data": data }))
}

async fn not_found(headers: HeaderMap, uri: axum::http::Uri) -> Response {
    let _ = headers;
    ApiError::not_found(format!("no route {}", uri.path())).into_response()
}

/// The request body as JSON of type `T` (a 413 when too large, a 400 naming the field at
/// fault when not what `T` takes).
async fn parse_whole<T: serde::de::DeserializeOwned>(app: &App, body: Body) -> Result<T, ApiError> {
    let body = read_body(body, app.limits.max_request_bytes).await?;
    if body.is_empty() {
        return Err(ApiError::invalid("the request body is empty: send a JSON object", None));
    }
    with_path(&mut serde_json::Deserializer::from_slice(&body))
}

/// A generation request's body: its sampling fields ([`request::SAMPLING_FIELDS`]) parsed as
/// [`request::Sampling`], the rest as `T`, each naming the field at fault.
async fn parse<T: serde::de::DeserializeOwned>(app: &App, body: Body) -> Result<(T, request::Sampling), ApiError> {
    let mut v: serde_json::Value = parse_whole(app, body).await?;
    let Some(fields) = v.as_object_mut() else {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    };
    let sampling: serde_json::Map<String, serde_json::Value> =
        request::SAMPLING_FIELDS.iter().filter_map(|k| fields.remove(*k).map(|x| (k.to_string(), x))).collect();
    let sampling = with_path(serde_json::Value::Object(sampling))?;
    Ok((with_path(v)?, sampling))
}

/// Deserializes `T`, a 400 naming the path of the field at fault.
fn with_path<'de, T: serde::Deserialize<'de>, D: serde::Deserializer<'de, Error = serde_json::Error>>(de: D) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("the request body is not valid JSON: {inner}"), None)
        } else if path == "." {
            ApiError::invalid(format!("invalid request: {inner}"), None)
        } else {
            ApiError::invalid(format!("{path}: {inner}"), Some(path))
        }
    })
}

/// An SSE body: each item a `data:` event, then `data: [DONE]`.
fn sse(events: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    use futures::StreamExt;
    let body = events
        .map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(format!("data: {e}\n\n"))))
        .chain(futures::stream::once(async { Ok(Bytes::from_static(b"data: [DONE]\n\n")) }));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("a valid response")
}
