//! The handlers: OpenAI's request bodies mapped onto the engine's requests, and its response
//! and chunk shapes built from the engine's events.

use super::chat::ChatOutput;
use super::request::{CompletionRequest, Sampling, Stop};
use super::{parse, sse, ApiError, App};
use crate::engine::{Engine, GenEvent, ModelEntry, RequestHandle, ValidRequest};
use crate::error::ServeError;
use crate::frontend::chat::Reading;
use crate::frontend::prepare::{prepare_on, Caller};
use crate::frontend::structured::Guidance;
use crate::service::record;
use crate::validate::PromptKind;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{Stream, StreamExt};
use shardserve_proto::v1 as pb;
use std::sync::Arc;

/// Seconds since the epoch, OpenAI's `created`.
pub fn created() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A request's model, found once: the engine that serves it and its entry.
pub(super) type Found = (Arc<Engine>, Arc<ModelEntry>);

/// A request's prompt text, how it is tokenized, and what a chat adds to its constraint.
struct Prompt<'a> {
    text: &'a str,
    kind: PromptKind,
    guidance: &'a Guidance,
}

/// The engine's request: the gRPC request's validation (the prompt tokenized once, as `kind`
/// says), then the extras.
fn engine_request(
    (engine, model): &Found,
    prompt: &Prompt,
    s: &Sampling,
    logprobs: Logprobs,
    caller: &Caller,
) -> Result<(Arc<Engine>, Arc<ModelEntry>, ValidRequest), ApiError> {
    for (field, v) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(field, " (use repetition_penalty, transformers' penalty)"));
        }
    }
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    let max_new_tokens = match s.max_tokens()? {
        Some(m) => {
            Some(i32::try_from(m).map_err(|_| ApiError::invalid(format!("max_tokens: {m} is too large"), Some("max_tokens".into())))?)
        }
        None => None,
    };
    if s.cache_salt.as_deref() == Some("") {
        return Err(ApiError::invalid("cache_salt must be a non-empty string when given", Some("cache_salt".to_string())));
    }
    let req = pb::GenerateRequest {
        model: model.name.clone(),
        prompt: prompt.text.to_string(),
        cache_salt: s.cache_salt.clone().unwrap_or_default(),
        skip_prefix_cache: false,
        max_new_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
        }),
        stop,
        logprobs: logprobs.on,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        top_logprobs: logprobs.top,
        min_tokens: s.min_tokens.unwrap_or(0),
        structured_output: super::structured::structured_output(s.response_format.as_ref(), s.structured_outputs.as_ref())?,
    };
    let valid = prepare_on(engine, model, &req, prompt.kind, prompt.guidance, caller).map_err(|e| {
        let mut e = field_error(e.into());
        if e.message.starts_with("structured_output") {
            let field = if s.structured_outputs.is_some() { "structured_outputs" } else { "response_format" };
            e.message = e.message.replacen("structured_output", field, 1);
            e.param = Some(field.into());
        }
        e
    })?;
    Ok((engine.clone(), model.clone(), valid))
}

/// Names the OpenAI field behind a validation message that names the gRPC one.
pub(super) fn field_error(mut e: ApiError) -> ApiError {
    if e.status != StatusCode::BAD_REQUEST {
        return e;
    }
    for (grpc, http) in [
        ("sampling.temperature", "temperature"),
        ("sampling.top_p", "top_p"),
        ("sampling.top_k", "top_k"),
        ("sampling.repetition_penalty", "repetition_penalty"),
        ("max_new_tokens", "max_tokens"),
        ("top_logprobs", "top_logprobs"),
        ("min_tokens", "min_tokens"),
    ] {
        if e.message.contains(grpc) {
            e.message = e.message.replace(grpc, http);
            e.param = Some(http.into());
            return e;
        }
    }
    for field in ["stop", "prompt"] {
        if e.message.starts_with(field) {
            e.param = Some(field.into());
        }
    }
    if e.message.starts_with("the rendered prompt") {
        e.param = Some("messages".into());
    }
    e
}

/// One choice's events, then how it ended.
enum Item {
    Event(usize, GenEvent),
    End(usize, Result<(), ServeError>),
}

/// A choice's request as a stream of [`Item`]s; dropping it cancels the request.
fn choice_stream(index: usize, handle: RequestHandle) -> impl Stream<Item = Item> + Send {
    futures::stream::unfold(Some(handle), move |state| async move {
        let mut handle = state?;
        match handle.next().await {
            Some(ev) => Some((Item::Event(index, ev), Some(handle))),
            None => Some((Item::End(index, handle.outcome().await), None)),
        }
    })
}

/// What a request asks of log-probabilities: each token's own, and how many alternatives.
#[derive(Debug, Clone, Copy, Default)]
pub struct Logprobs {
    pub on: bool,
    pub top: u32,
}

/// OpenAI's finish_reason for the engine's.
fn finish_reason(r: &str) -> &'static str {
    match r {
        "length" => "length",
        _ => "stop",
    }
}

/// What kind of response the request wants.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// Submits the `n` choices of a request, validated and tokenized once; the first failure fails
/// them all (the others are cancelled when their handles drop). With a seed, choice i samples
/// with seed + i, so the n choices differ yet repeat; without, each draws its own.
#[allow(clippy::too_many_arguments)]
async fn submit_all(
    found: &Found,
    prompt: &Prompt<'_>,
    s: &Sampling,
    logprobs: Logprobs,
    id: &str,
    max_n: u32,
    caller: &Caller,
) -> Result<(Arc<ModelEntry>, Vec<u32>, Vec<RequestHandle>), ApiError> {
    let n = s.n.unwrap_or(1);
    if n == 0 || n > max_n {
        return Err(ApiError::invalid(format!("n must be in 1..={max_n} (--max-n), got {n}"), Some("n".into())));
    }
    let (engine, entry, valid) = engine_request(found, prompt, s, logprobs, caller)?;
    let mut handles = Vec::new();
    for i in 0..n {
        let mut choice = valid.clone();
        if i > 0 {
            choice.sampling.seed = s.seed.map_or_else(crate::util::random_u64, |seed| seed.wrapping_add(u64::from(i)));
        }
        let handle = engine.submit(&entry, choice, format!("{id}-{i}")).await.map_err(ApiError::from)?;
        handles.push(handle);
    }
    Ok((entry, valid.prompt_ids, handles))
}

/// Serves a generation request: one JSON response, or SSE chunks with `stream`. A chat
/// request's text is read as `output` says.
#[allow(clippy::too_many_arguments)]
async fn generate(
    app: App,
    kind: Kind,
    found: Found,
    prompt: String,
    s: Sampling,
    logprobs: Logprobs,
    stream: bool,
    include_usage: bool,
    output: Option<Reading>,
    caller: Caller,
) -> Response {
    let id = format!("{}{:016x}", if kind == Kind::Chat { "chatcmpl-" } else { "cmpl-" }, crate::util::random_u64());
    let name = found.1.name.clone();
    let span = tracing::info_span!("request", request_id = %id, model = %name, replica = tracing::field::Empty);
    let guidance = output.as_ref().map(|o| o.guidance.clone()).unwrap_or_default();
    let text = Prompt { text: &prompt, kind: if kind == Kind::Chat { PromptKind::Chat } else { PromptKind::Text }, guidance: &guidance };
    let submitted = tracing::Instrument::instrument(submit_all(&found, &text, &s, logprobs, &id, app.limits.max_n, &caller), span);
    let (entry, prompt_ids, handles) = match submitted.await {
        Ok(v) => v,
        Err(e) => {
            record(&name, grpc_code(e.status));
            return e.into_response();
        }
    };
    let tokenizer_model = entry.clone();
    let n = handles.len();
    let items = futures::stream::select_all(handles.into_iter().enumerate().map(|(i, h)| choice_stream(i, h).boxed()));
    let created = created();
    let model_name = entry.name.clone();
    let mut outputs: Vec<ChatOutput> = output.iter().flat_map(|o| (0..n).map(|_| ChatOutput::new(o))).collect();
    if !stream {
        let whole = Whole { n, id: &id, created, model_name: &model_name, prompt_tokens: prompt_ids.len(), name: &name };
        return collect(items, kind, &whole, &tokenizer_model, logprobs, outputs).await;
    }
    // Streaming: a chunk per event; errors as an `error` event; usage last when asked.
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let head: Vec<String> = if kind == Kind::Chat {
        (0..n)
            .map(|i| {
                serde_json::json!({"id": id, "object": object, "created": created, "model": model_name,
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
                .to_string()
            })
            .collect()
    } else {
        Vec::new()
    };
    let prompt_tokens = prompt_ids.len();
    let (id2, model2) = (id.clone(), model_name.clone());
    let mut completion = 0usize;
    let mut cached = 0usize;
    let mut failed = false;
    let mut ended = 0usize;
    let chunk = move |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut chunk = serde_json::json!({"id": id2, "object": object, "created": created, "model": model2, "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk.to_string()
    };
    let body = items.map(move |item| match item {
        Item::Event(i, ev) => {
            completion += ev.token_ids.len();
            if let (0, Some(c)) = (i, ev.cached_tokens) {
                cached = c;
            }
            let lp = logprobs.on.then(|| logprobs_json(kind, &tokenizer_model, &ev));
            match outputs.get_mut(i) {
                Some(output) => {
                    let delta = output.delta(&ev);
                    let finish = ev.finish_reason.map(|r| output.finish_reason(r));
                    // A piece that settles nothing (held as a possible tag) makes no chunk.
                    if delta.as_object().is_some_and(|d| d.is_empty()) && finish.is_none() && lp.is_none() {
                        return Vec::new();
                    }
                    vec![chunk(serde_json::json!([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]), None)]
                }
                None => vec![chunk(
                    serde_json::json!([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason.map(finish_reason)}]),
                    None,
                )],
            }
        }
        Item::End(i, Ok(())) => {
            ended += 1;
            let mut out: Vec<String> = outputs
                .get_mut(i)
                .and_then(ChatOutput::end)
                .map(|delta| chunk(serde_json::json!([{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]), None))
                .into_iter()
                .collect();
            if ended == n && !failed {
                record(&name, tonic::Code::Ok);
                if include_usage {
                    out.push(chunk(serde_json::json!([]), Some(usage(prompt_tokens, completion, cached))));
                }
            }
            out
        }
        Item::End(_, Err(e)) => {
            ended += 1;
            if failed {
                Vec::new()
            } else {
                failed = true;
                record(&name, e.code());
                vec![ApiError::from(e).body().to_string()]
            }
        }
    });
    sse(futures::stream::iter(head).chain(body.flat_map(futures::stream::iter)))
}

fn grpc_code(s: StatusCode) -> tonic::Code {
    match s.as_u16() {
        400 => tonic::Code::InvalidArgument,
        404 => tonic::Code::NotFound,
        429 => tonic::Code::ResourceExhausted,
        503 => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    }
}

/// OpenAI's usage; `cached`: prompt tokens served from the prefix cache (the first choice's,
/// as the prompt is counted once).
fn usage(prompt: usize, completion: usize, cached: usize) -> serde_json::Value {
    serde_json::json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

/// The logprobs of an event's tokens: completions' `{tokens, token_logprobs, ...}` lists, or
/// chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn logprobs_json(kind: Kind, model: &ModelEntry, ev: &GenEvent) -> serde_json::Value {
    let text = |t: u32| model.tokenizer.decode(&[t]).unwrap_or_default();
    let tokens: Vec<String> = ev.token_ids.iter().map(|t| text(*t)).collect();
    let top = |i: usize| ev.top_logprobs.get(i).cloned().unwrap_or_default();
    match kind {
        Kind::Completion => serde_json::json!({
            "tokens": tokens, "token_logprobs": ev.logprobs,
            "top_logprobs": if ev.top_logprobs.is_empty() { serde_json::Value::Null } else {
                (0..tokens.len()).map(|i| top(i).into_iter().map(|(t, lp)| (text(t), serde_json::json!(lp))).collect::<serde_json::Map<_, _>>()).collect()
            },
            "text_offset": null,
        }),
        Kind::Chat => serde_json::json!({
            "content": tokens.iter().zip(&ev.logprobs).enumerate().map(|(i, (t, lp))| serde_json::json!({
                "token": t, "logprob": lp, "bytes": t.as_bytes(),
                "top_logprobs": top(i).into_iter().map(|(id, lp)| { let t = text(id); serde_json::json!({"token": t, "logprob": lp, "bytes": t.as_bytes()}) }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    }
}

/// What a whole response says of itself.
struct Whole<'a> {
    /// Choices.
    n: usize,
    id: &'a str,
    created: u64,
    model_name: &'a str,
    prompt_tokens: usize,
    /// The model's name in metrics.
    name: &'a str,
}

/// Reads every choice to its end and answers with one JSON response; a chat choice's text is
/// read by its `outputs`.
async fn collect(
    mut items: impl Stream<Item = Item> + Unpin,
    kind: Kind,
    whole: &Whole<'_>,
    model: &ModelEntry,
    logprobs: Logprobs,
    mut outputs: Vec<ChatOutput>,
) -> Response {
    let Whole { n, id, created, model_name, prompt_tokens, name } = *whole;
    let mut texts = vec![String::new(); n];
    let mut finish = vec![None; n];
    let mut events: Vec<Vec<GenEvent>> = vec![Vec::new(); n];
    let mut completion = 0usize;
    let mut cached = 0usize;
    while let Some(item) = items.next().await {
        match item {
            Item::Event(i, ev) => {
                completion += ev.token_ids.len();
                if let (0, Some(c)) = (i, ev.cached_tokens) {
                    cached = c;
                }
                match outputs.get_mut(i) {
                    Some(output) => output.push(&ev),
                    None => texts[i].push_str(&ev.text),
                }
                if let Some(r) = ev.finish_reason {
                    finish[i] = Some(r);
                }
                if logprobs.on {
                    events[i].push(ev);
                }
            }
            Item::End(_, Ok(())) => {}
            Item::End(_, Err(e)) => {
                record(name, e.code());
                return ApiError::from(e).into_response();
            }
        }
    }
    record(name, tonic::Code::Ok);
    let merged = |evs: &[GenEvent]| GenEvent {
        token_ids: evs.iter().flat_map(|e| e.token_ids.clone()).collect(),
        logprobs: evs.iter().flat_map(|e| e.logprobs.clone()).collect(),
        top_logprobs: evs.iter().flat_map(|e| e.top_logprobs.clone()).collect(),
        ..Default::default()
    };
    let choices: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let lp = logprobs.on.then(|| logprobs_json(kind, model, &merged(&events[i])));
            match outputs.get_mut(i) {
                None => serde_json::json!({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i].map(finish_reason)}),
                Some(output) => {
                    let message = output.message();
                    serde_json::json!({"index": i, "message": message, "logprobs": lp,
                        "finish_reason": finish[i].map(|r| output.finish_reason(r))})
                }
            }
        })
        .collect();
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    super::json(
        StatusCode::OK,
        &serde_json::json!({"id": id, "object": object, "created": created, "model": model_name, "choices": choices,
            "usage": usage(prompt_tokens, completion, cached)}),
    )
}

/// `POST /v1/completions`.
pub async fn completions(State(app): State<App>, Extension(caller): Extension<Caller>, body: Body) -> Response {
    let (req, sampling): (CompletionRequest, Sampling) = match parse(&app, body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match req.check_unsupported(&sampling).and_then(|()| req.prompt()) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Some(user) = &req.user {
        tracing::debug!(user = %user, "completion request");
    }
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if req.stream_options.is_some() && !req.stream {
        return ApiError::invalid("stream_options: only allowed with stream: true", Some("stream_options".into())).into_response();
    }
    let logprobs = Logprobs { on: req.logprobs.is_some(), top: req.logprobs.unwrap_or(0) };
    let found = match app.models.find(&req.model) {
        Ok(f) => f,
        Err(e) => {
            record(&req.model, e.code());
            return ApiError::from(e).into_response();
        }
    };
    generate(app, Kind::Completion, found, prompt, sampling, logprobs, req.stream, include_usage, None, caller).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<App>, Extension(caller): Extension<Caller>, body: Body) -> Response {
    let (req, sampling): (super::chat::ChatRequest, Sampling) = match parse(&app, body).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (found, prompt, output) = match super::chat::render(&app, &req) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if req.stream_options.is_some() && !req.stream {
        return ApiError::invalid("stream_options: only allowed with stream: true", Some("stream_options".into())).into_response();
    }
    let logprobs = Logprobs { on: req.logprobs.unwrap_or(false), top: req.top_logprobs.unwrap_or(0) };
    generate(app, Kind::Chat, found, prompt, sampling, logprobs, req.stream, include_usage, Some(output), caller).await
}
