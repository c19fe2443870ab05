//! The coordinator's gRPC services: `Inference` for clients and `Admin` for operators.

use crate::engine::{Engine, ModelEntry, RequestHandle, ServingState, ValidRequest};
use crate::error::ServeError;
use crate::frontend::chat::Reading;
use crate::frontend::prepare::prepare_on;
pub use crate::frontend::prepare::Caller;
use crate::frontend::reader::{CallPiece, ChatReader};
use crate::frontend::structured::Guidance;
use crate::models::Models;
use crate::validate::PromptKind;
use shardserve_proto::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// `Inference` over the [`Models`] served.
pub struct InferenceService(pub Arc<Models>);

fn usage(prompt: usize, completion: usize, cached: usize) -> pb::Usage {
    pb::Usage { prompt_tokens: prompt as u32, completion_tokens: completion as u32, cached_tokens: cached as u32 }
}

pub use crate::engine::REQUEST_ID;

/// The client's request id, or a new one.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(String::from)
        .unwrap_or_else(|| format!("{:016x}", crate::util::random_u64()))
}

fn with_id<T>(mut resp: Response<T>, id: &str) -> Response<T> {
    if let Ok(v) = id.parse() {
        resp.metadata_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Counts a finished request by its outcome (the gRPC code's name, `ok` on success).
pub(crate) fn record(model: &str, code: tonic::Code) {
    let outcome = match code {
        tonic::Code::Ok => "ok",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::NotFound => "not_found",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Cancelled => "cancelled",
        _ => "internal",
    };
    metrics::counter!("shardserve_requests_total", "model" => model.to_string(), "outcome" => outcome).increment(1);
}

/// A call's piece as gRPC carries it.
fn call_piece(c: CallPiece) -> pb::ToolCallPiece {
    let (id, name) = c.id_and_name.unwrap_or_default();
    pb::ToolCallPiece { index: c.index as u32, id, name, arguments: c.arguments }
}

type GenStream = Pin<Box<dyn futures::Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

impl InferenceService {
    /// The name metrics count a request under: its model's, or what it asked for when no
    /// model is served under that name.
    fn name_of(&self, req: &pb::GenerateRequest) -> String {
        self.0.find(&req.model).map_or_else(|_| req.model.clone(), |(_, m)| m.name.clone())
    }

    /// Finds `req`'s model and validates `req` for it, as `caller`'s; its structured output
    /// (or the calls a chat's `guidance` demands) compiled into its grammar.
    pub(crate) fn prepare(
        &self,
        req: &pb::GenerateRequest,
        kind: PromptKind,
        guidance: &Guidance,
        caller: &Caller,
    ) -> Result<(Arc<Engine>, Arc<ModelEntry>, ValidRequest), ServeError> {
        let (engine, model) = self.0.find(&req.model)?;
        let valid = prepare_on(&engine, &model, req, kind, guidance, caller)?;
        Ok((engine, model, valid))
    }

    /// Renders a `Chat` request's conversation with its model's template (the same checks and
    /// rendering as `/v1/chat/completions`) and validates it like a `GenerateRequest` whose
    /// prompt is that text, tokenized without added special tokens.
    fn prepare_chat(
        &self,
        req: &pb::ChatRequest,
        caller: &Caller,
    ) -> Result<(Arc<Engine>, Arc<ModelEntry>, ValidRequest, Reading), ServeError> {
        let mut generate = req.generation.clone().unwrap_or_default();
        if !generate.prompt.is_empty() {
            return Err(ServeError::InvalidArgument("generation.prompt must be empty: the conversation is the prompt".into()));
        }
        let (engine, model) = self.0.find(&generate.model)?;
        let json = |field: &str, text: &str| -> Result<Option<serde_json::Value>, ServeError> {
            if text.trim().is_empty() {
                return Ok(None);
            }
            serde_json::from_str(text).map(Some).map_err(|e| ServeError::InvalidArgument(format!("{field}: not JSON: {e}")))
        };
        let messages = json("messages_json", &req.messages_json)?
            .ok_or_else(|| ServeError::InvalidArgument("messages_json is required: the conversation in JSON".into()))?;
        let tools = json("tools_json", &req.tools_json)?;
        let kwargs = match json("chat_template_kwargs_json", &req.chat_template_kwargs_json)? {
            None => None,
            Some(serde_json::Value::Object(m)) => Some(m),
            Some(_) => return Err(ServeError::InvalidArgument("chat_template_kwargs_json: expected a JSON object".into())),
        };
        let tool_choice = json("tool_choice_json", &req.tool_choice_json)?;
        let offered = match &tool_choice {
            Some(c) if c.as_str() == Some("none") => None,
            _ => tools.as_ref(),
        };
        let text =
            crate::frontend::chat::render_messages(&model, &messages, offered, req.add_generation_prompt.unwrap_or(true), kwargs.as_ref())
                .map_err(|e| ServeError::InvalidArgument(e.message))?;
        let parsers = (Default::default(), Default::default());
        let reading = crate::frontend::chat::reading(&model, &text, offered, (tool_choice.as_ref(), true), parsers)
            .map_err(|e| ServeError::InvalidArgument(e.message))?;
        generate.prompt = text;
        let valid = prepare_on(&engine, &model, &generate, PromptKind::Chat, &reading.guidance, caller)?;
        serving(&model)?;
        Ok((engine, model, valid, reading))
    }

    /// Embeds `inputs` with `model`: each its own sequence in the scheduler (batched with the
    /// other traffic), the pooled vectors of each in order, and the prompt tokens in all.
    pub(crate) async fn embed_all(
        &self,
        model: &str,
        inputs: &[String],
        spec: crate::engine::EmbedSpec,
        id: &str,
        caller: &Caller,
    ) -> Result<(Vec<Vec<Vec<f32>>>, usize), ServeError> {
        if inputs.is_empty() {
            return Err(ServeError::InvalidArgument("inputs must not be empty".into()));
        }
        let (engine, entry) = self.0.find(model)?;
        serving(&entry)?;
        let valid = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let mut v = crate::validate::validate_embed(&entry, text, i, spec)?;
                caller.apply(&mut v, engine.config().prefix_cache_scope);
                Ok(v)
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        let prompt_tokens = valid.iter().map(|v| v.prompt_ids.len()).sum();
        let mut handles = Vec::with_capacity(valid.len());
        for (i, v) in valid.into_iter().enumerate() {
            handles.push(engine.submit(&entry, v, format!("{id}-{i}")).await?);
        }
        let mut out = Vec::with_capacity(handles.len());
        for mut h in handles {
            let mut vectors = Vec::new();
            while let Some(ev) = h.next().await {
                vectors.extend(ev.embedding);
            }
            h.outcome().await?;
            out.push(vectors);
        }
        Ok((out, prompt_tokens))
    }

    /// Validates `req` and hands it to its model's scheduler.
    async fn start(&self, req: &pb::GenerateRequest, id: String, caller: &Caller) -> Result<(RequestHandle, Vec<u32>, String), ServeError> {
        let (engine, model, valid) = self.prepare(req, PromptKind::Text, &Guidance::default(), caller)?;
        let prompt_ids = valid.prompt_ids.clone();
        let handle = engine.submit(&model, valid, id).await?;
        Ok((handle, prompt_ids, model.name.clone()))
    }

    async fn generate_all(
        &self,
        req: pb::GenerateRequest,
        id: String,
        caller: &Caller,
    ) -> (String, Result<pb::GenerateResponse, ServeError>) {
        let (mut handle, prompt_ids, name) = match self.start(&req, id, caller).await {
            Ok(v) => v,
            Err(e) => return (self.name_of(&req), Err(e)),
        };
        let mut resp = pb::GenerateResponse { prompt_token_ids: prompt_ids.clone(), ..Default::default() };
        let mut cached = 0;
        while let Some(ev) = handle.next().await {
            cached = ev.cached_tokens.unwrap_or(cached);
            resp.text.push_str(&ev.text);
            resp.token_ids.extend(ev.token_ids);
            resp.logprobs.extend(ev.logprobs);
            resp.top_logprobs.extend(ev.top_logprobs.iter().map(|t| top_logprobs(t)));
            if let Some(r) = ev.finish_reason {
                resp.finish_reason = r.to_string();
            }
        }
        let result = handle.outcome().await.map(|()| {
            resp.usage = Some(usage(prompt_ids.len(), resp.token_ids.len(), cached));
            resp
        });
        (name, result)
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let id = request_id(&request);
        let caller = Caller::of(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!("request", request_id = %id, model = %req.model, replica = tracing::field::Empty);
        let (name, result) = self.generate_all(req, id.clone(), &caller).instrument(span).await;
        record(&name, result.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok));
        Ok(with_id(Response::new(result?), &id))
    }

    type GenerateStreamStream = GenStream;

    async fn generate_stream(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let id = request_id(&request);
        let caller = Caller::of(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!("request", request_id = %id, model = %req.model, replica = tracing::field::Empty);
        // Refused before the stream opens when the model cannot serve or the request is bad,
        // so the client sees the status itself rather than an empty stream. (A model that
        // served before and is being re-planned is waited for.)
        let precheck = self
            .prepare(&req, PromptKind::Text, &Guidance::default(), &caller)
            .and_then(|(engine, model, valid)| serving(&model).map(|()| (engine, model, valid)));
        let (engine, model, valid) = match precheck {
            Ok(v) => v,
            Err(e) => {
                record(&self.name_of(&req), e.code());
                return Err(e.into());
            }
        };
        Ok(stream(id, model.name.clone(), span, engine, model, valid, None))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let id = request_id(&request);
        let caller = Caller::of(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!("request", request_id = %id, model = %req.model, replica = tracing::field::Empty);
        let name = self.0.find(&req.model).map_or_else(|_| req.model.clone(), |(_, m)| m.name.clone());
        let pooling = req.pooling.parse().map_err(|e: String| Status::invalid_argument(e))?;
        let spec = crate::engine::EmbedSpec { pooling, normalize: req.normalize };
        let result = self.embed_all(&req.model, &req.inputs, spec, &id, &caller).instrument(span).await;
        record(&name, result.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok));
        let (vectors, prompt_tokens) = result?;
        let embeddings = vectors
            .into_iter()
            .map(|rows| pb::Embedding {
                rows: rows.len() as u32,
                dims: rows.first().map_or(0, |r| r.len() as u32),
                values: rows.into_iter().flatten().collect(),
            })
            .collect();
        Ok(with_id(Response::new(pb::EmbedResponse { embeddings, usage: Some(usage(prompt_tokens, 0, 0)) }), &id))
    }

    type ChatStream = GenStream;

    async fn chat(&self, request: Request<pb::ChatRequest>) -> Result<Response<GenStream>, Status> {
        let id = request_id(&request);
        let caller = Caller::of(request.metadata());
        let req = request.into_inner();
        let model = req.generation.as_ref().map(|g| g.model.clone()).unwrap_or_default();
        let span = tracing::info_span!("request", request_id = %id, model = %model, replica = tracing::field::Empty);
        match self.prepare_chat(&req, &caller) {
            Ok((engine, entry, valid, reading)) => {
                Ok(stream(id, entry.name.clone(), span, engine, entry, valid, Some(ChatReader::new(&reading))))
            }
            Err(e) => {
                record(&self.0.find(&model).map_or_else(|_| model.clone(), |(_, m)| m.name.clone()), e.code());
                Err(e.into())
            }
        }
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let (_, model) = self.0.find(&req.model)?;
        let token_ids =
            model.tokenizer.encode(&req.text).map_err(|e| Status::invalid_argument(format!("text cannot be tokenized: {e}")))?;
        let tokens = model.tokenizer.tokens(&req.text).map_err(|e| Status::invalid_argument(format!("text cannot be tokenized: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse { token_ids, tokens }))
    }

    async fn list_models(&self, _request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.0.engines().iter().map(|e| e.entry().info()).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

/// Whether `model` can take a stream now: refused before the stream opens when it cannot, so
/// the client sees the status itself rather than an empty stream. (A model that served before
/// and is being re-planned is waited for.)
fn serving(model: &ModelEntry) -> Result<(), ServeError> {
    match model.state() {
        ServingState::Loading(why) => Err(ServeError::Loading(format!("model {} is still loading: {why}", model.name))),
        ServingState::Unavailable(why) if !model.was_ready() => {
            Err(ServeError::Unavailable(format!("model {} has no healthy placement: {why}", model.name)))
        }
        _ => Ok(()),
    }
}

/// Runs a validated request and streams its events (`GenerateStream`, `Chat`, whose text
/// `reader` also reads); the client going away cancels it.
fn stream(
    id: String,
    name: String,
    span: tracing::Span,
    engine: Arc<Engine>,
    model: Arc<ModelEntry>,
    valid: ValidRequest,
    mut reader: Option<ChatReader>,
) -> Response<GenStream> {
    let (out_tx, out_rx) = mpsc::channel::<Result<pb::GenerateStreamResponse, Status>>(16);
    let request_id = id.clone();
    tokio::spawn(
        async move {
            let prompt_ids = valid.prompt_ids.clone();
            let started = tokio::select! {
                s = engine.submit(&model, valid, request_id) => s.map(|h| (h, prompt_ids)),
                // The client went away while the request waited to start.
                _ = out_tx.closed() => Err(ServeError::Cancelled("the client went away".into())),
            };
            let (mut handle, prompt_ids) = match started {
                Ok(v) => v,
                Err(e) => {
                    record(&name, e.code());
                    let _ = out_tx.send(Err(e.into())).await;
                    return;
                }
            };
            let mut first = true;
            let mut completion = 0usize;
            let mut cached = 0;
            loop {
                let ev = tokio::select! {
                    ev = handle.next() => match ev {
                        Some(ev) => ev,
                        None => break,
                    },
                    // Dropping the handle cancels the request: its sequence leaves at the
                    // next step.
                    _ = out_tx.closed() => {
                        record(&name, tonic::Code::Cancelled);
                        return;
                    }
                };
                completion += ev.token_ids.len();
                cached = ev.cached_tokens.unwrap_or(cached);
                let piece = reader.as_mut().map(|r| r.piece(&ev)).unwrap_or_default();
                let msg = pb::GenerateStreamResponse {
                    content: piece.content,
                    reasoning: piece.reasoning,
                    tool_calls: piece.calls.into_iter().map(call_piece).collect(),
                    text: ev.text,
                    token_ids: ev.token_ids,
                    logprobs: ev.logprobs,
                    top_logprobs: ev.top_logprobs.iter().map(|t| top_logprobs(t)).collect(),
                    finish_reason: ev.finish_reason.unwrap_or_default().to_string(),
                    usage: ev.finish_reason.map(|_| usage(prompt_ids.len(), completion, cached)),
                    prompt_token_ids: if first { prompt_ids.clone() } else { Vec::new() },
                };
                first = false;
                if out_tx.send(Ok(msg)).await.is_err() {
                    record(&name, tonic::Code::Cancelled);
                    return;
                }
            }
            let outcome = handle.outcome().await;
            record(&name, outcome.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok));
            if let Err(e) = outcome {
                if !matches!(e, ServeError::Cancelled(_)) {
                    let _ = out_tx.send(Err(e.into())).await;
                }
            }
        }
        .instrument(span),
    );
    with_id(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))), &id)
}

fn top_logprobs(t: &[(u32, f32)]) -> pb::TopLogprobs {
    pb::TopLogprobs { token_ids: t.iter().map(|(i, _)| *i).collect(), logprobs: t.iter().map(|(_, l)| *l).collect() }
}

/// `Admin` over the [`Models`] served, with the means to start local workers when it has them.
pub struct AdminService {
    pub models: Arc<Models>,
    pub local: Option<crate::scale::LocalWorkers>,
    /// The worker StatefulSet, when the fleet is a Kubernetes one (takes precedence over `local`).
    pub kubernetes: Option<crate::kubernetes::StatefulSetScaler>,
    pub spawned: Arc<crate::scale::Spawned>,
    /// Where this coordinator serves metrics (empty: it does not).
    pub metrics_address: String,
    /// Where it serves the HTTP API (empty: it does not).
    pub http_address: String,
}

/// What `shardctl status` shows of replica `index`, laid out over `workers`.
fn replica_status(index: usize, e: &crate::engine::Engine, workers: Vec<String>) -> pb::ReplicaStatus {
    let m = e.entry();
    let state = m.state();
    let (stages, detail) = match &state {
        ServingState::Ready(p) => (stage_infos(&p.stages), String::new()),
        ServingState::Loading(why) | ServingState::Unavailable(why) => (Vec::new(), why.clone()),
    };
    let (queries, hits) = m.prefix_cache_counts();
    let (total, free) = m.kv_blocks();
    pb::ReplicaStatus {
        index: index as u32,
        state: state.name().to_string(),
        detail,
        stages,
        workers,
        running: m.active() as u32,
        waiting: m.queued() as u32,
        kv_blocks_total: total as u64,
        kv_blocks_free: free as u64,
        prefix_cache_queries: queries,
        prefix_cache_hits: hits,
    }
}

fn stage_infos(stages: &[crate::engine::StageAssignment]) -> Vec<pb::StageInfo> {
    let n = stages.len();
    stages
        .iter()
        .enumerate()
        .map(|(i, s)| pb::StageInfo {
            stage: i as u32,
            worker_id: s.worker_id.clone(),
            address: s.address.clone(),
            layer_start: s.layers.start as u32,
            layer_end: s.layers.end as u32,
            embeddings: i == 0,
            lm_head: i + 1 == n,
            bytes: s.bytes,
            ranks: s.followers.iter().map(|(id, _)| id.clone()).collect(),
            kv_blocks: s.kv_blocks as u32,
            kv_block_size: s.kv_block_size as u32,
        })
        .collect()
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn cluster_status(&self, _request: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let models = self
            .models
            .engines()
            .iter()
            .map(|e| {
                let m = e.entry();
                let state = m.state();
                let (stages, detail) = match &state {
                    ServingState::Ready(p) => (stage_infos(&p.stages), format!("{} requests running, {} waiting", m.active(), m.queued())),
                    ServingState::Loading(why) | ServingState::Unavailable(why) => (Vec::new(), why.clone()),
                };
                let replicas = e.replica_engines();
                let (mut queries, mut hits, mut cached) = (0, 0, 0);
                for r in replicas.iter().flatten() {
                    let (q, h) = r.entry().prefix_cache_counts();
                    queries += q;
                    hits += h;
                    cached += r.entry().cached_blocks();
                }
                let layout = e.replica_layout();
                pb::ModelStatus {
                    model: Some(m.info()),
                    stages,
                    detail,
                    prefix_caching: e.config().prefix_caching,
                    prefix_cache_queries: queries,
                    prefix_cache_hits: hits,
                    kv_blocks_cached: cached as u32,
                    // Every replica laid out (and replica 0 before the first layout), with or
                    // without its engine yet.
                    replicas: match &layout {
                        Some(l) => (0..l.replicas.len().max(1))
                            .filter(|&i| i == 0 || !l.replicas[i].is_empty())
                            .map(|i| {
                                let workers = l.replicas.get(i).cloned().unwrap_or_default();
                                match replicas.get(i).cloned().flatten() {
                                    Some(r) => replica_status(i, &r, workers),
                                    None => pb::ReplicaStatus {
                                        index: i as u32,
                                        state: "loading".into(),
                                        detail: "starting the replica's engine".into(),
                                        workers,
                                        ..Default::default()
                                    },
                                }
                            })
                            .collect(),
                        None => Vec::new(),
                    },
                    spares: layout.map(|l| l.spares).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            models,
            workers: self.models.primary().membership().workers().len() as u32,
            membership: self.models.primary().membership().kind().to_string(),
            role: self.models.primary().role().to_string(),
            metrics_address: self.metrics_address.clone(),
            http_address: self.http_address.clone(),
            downloads: shardserve::hub::downloads()
                .into_iter()
                .map(|d| pb::Download { repo: d.repo, file: d.file, done_bytes: d.done, total_bytes: d.total })
                .collect(),
        }))
    }

    async fn list_workers(&self, _request: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let mut workers = self.models.primary().membership().workers();
        // (worker, stage, replica) of every placement, every replica's included.
        let mut serving: Vec<(String, u32, Option<u32>)> = Vec::new();
        let mut spares: Vec<String> = Vec::new();
        for e in self.models.engines() {
            if let Some(l) = e.replica_layout() {
                spares.extend(l.spares);
            }
            for r in e.replica_engines().into_iter().flatten() {
                let replica = r.config().replica.map(|i| i as u32);
                if let ServingState::Ready(p) = r.entry().state() {
                    for (i, s) in p.stages.iter().enumerate() {
                        serving.extend(s.ranks().map(|(id, _)| (id.to_string(), i as u32, replica)));
                    }
                }
            }
        }
        let cordoned = self.models.primary().cordoned().await;
        for w in &mut workers {
            let found = serving.iter().find(|(id, _, _)| *id == w.id);
            w.stage = found.map(|(_, s, _)| *s);
            w.replica = found.and_then(|(_, _, r)| *r);
            if cordoned.contains(&w.id) {
                w.state = "cordoned".into();
            } else if found.is_some() {
                w.state = "serving".into();
            } else if spares.contains(&w.id) {
                w.state = "spare".into();
            }
        }
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn cordon(&self, request: Request<pb::CordonRequest>) -> Result<Response<pb::CordonResponse>, Status> {
        self.models.primary().cordon(&request.into_inner().worker_id, true).await?;
        Ok(Response::new(pb::CordonResponse {}))
    }

    async fn uncordon(&self, request: Request<pb::CordonRequest>) -> Result<Response<pb::CordonResponse>, Status> {
        self.models.primary().cordon(&request.into_inner().worker_id, false).await?;
        Ok(Response::new(pb::CordonResponse {}))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        let r = request.into_inner();
        let within = std::time::Duration::from_secs(if r.timeout_seconds == 0 { 60 } else { u64::from(r.timeout_seconds) });
        let stages = self.models.engine_using(&r.worker_id).drain(&r.worker_id, within).await?;
        Ok(Response::new(pb::DrainResponse { stages: stage_infos(&stages) }))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Result<Response<pb::ScaleResponse>, Status> {
        let target = request.into_inner().workers as usize;
        let (started, stopped) = match &self.kubernetes {
            Some(set) => crate::scale::scale_statefulset(&self.models, set, target).await?,
            None => crate::scale::scale(&self.models, self.local.as_ref(), &self.spawned, target).await?,
        };
        Ok(Response::new(pb::ScaleResponse { workers: self.models.primary().membership().workers().len() as u32, started, stopped }))
    }

    async fn load_model(&self, request: Request<pb::LoadModelRequest>) -> Result<Response<pb::LoadModelResponse>, Status> {
        Ok(Response::new(self.models.load(request.into_inner()).await?))
    }

    async fn unload_model(&self, request: Request<pb::UnloadModelRequest>) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let workers = self.models.unload(&request.into_inner().name).await?;
        Ok(Response::new(pb::UnloadModelResponse { workers }))
    }
}
