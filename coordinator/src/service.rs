//! The coordinator's gRPC services: `Inference` for clients and `Admin` for operators.

use crate::engine::{GenEvent, ServingState};
use crate::models::Models;
use crate::error::ServeError;
use crate::validate::validate;
use shardserve_proto::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::instrument;

/// `Inference` over the [`Models`] served.
pub struct InferenceService(pub Arc<Models>);

fn usage(prompt: usize, completion: usize) -> pb::Usage {
    pb::Usage {
        prompt_tokens: prompt as u32,
        completion_tokens: completion as u32,
    }
}

type GenStream = Pin<Box<dyn futures::Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let req = request.into_inner();
        let (engine, model) = self.0.find(&req.model)?;
        let valid = validate(&model, &req)?;
        let prompt_ids = valid.prompt_ids.clone();
        let (tx, mut rx) = mpsc::channel::<GenEvent>(64);
        let m = model.clone();
        let run = async move { engine.generate(&m, valid, tx).await };
        let collect = async {
            let mut resp = pb::GenerateResponse {
                prompt_token_ids: prompt_ids.clone(),
                ..Default::default()
            };
            while let Some(ev) = rx.recv().await {
                resp.text.push_str(&ev.text);
                resp.token_ids.extend(ev.token_ids);
                resp.logprobs.extend(ev.logprobs);
                if let Some(r) = ev.finish_reason {
                    resp.finish_reason = r.to_string();
                }
            }
            resp
        };
        let (result, mut resp) = tokio::join!(run, collect);
        result?;
        resp.usage = Some(usage(prompt_ids.len(), resp.token_ids.len()));
        Ok(Response::new(resp))
    }

    type GenerateStreamStream = GenStream;

    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn generate_stream(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let req = request.into_inner();
        let (engine, model) = self.0.find(&req.model)?;
        let valid = validate(&model, &req)?;
        // Fail before the stream opens when the model cannot serve, so the client sees the
        // status itself rather than an empty stream.
        // (A model that served before and is being re-planned is waited for by the engine.)
        match model.state() {
            ServingState::Loading(why) => {
                return Err(ServeError::Loading(format!("model {} is still loading: {why}", model.name)).into())
            }
            ServingState::Unavailable(why) if !model.was_ready() => {
                return Err(ServeError::Unavailable(format!("model {} has no healthy placement: {why}", model.name)).into())
            }
            _ => {}
        }
        let prompt_ids = valid.prompt_ids.clone();
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::GenerateStreamResponse, Status>>(16);
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel::<GenEvent>(16);
            let run = engine.generate(&model, valid, tx);
            let out = out_tx.clone();
            // Owns the receiver: when the client goes away this returns, the receiver drops,
            // and the engine sees its output closed and stops.
            let forward = async move {
                let mut first = true;
                let mut completion = 0usize;
                loop {
                    let ev = tokio::select! {
                        ev = rx.recv() => match ev {
                            Some(ev) => ev,
                            None => break,
                        },
                        // The client went away while nothing was produced (prefill, waiting):
                        // returning drops the receiver, which stops the engine.
                        _ = out.closed() => return,
                    };
                    completion += ev.token_ids.len();
                    let msg = pb::GenerateStreamResponse {
                        text: ev.text,
                        token_ids: ev.token_ids,
                        logprobs: ev.logprobs,
                        finish_reason: ev.finish_reason.unwrap_or_default().to_string(),
                        usage: ev.finish_reason.map(|_| usage(prompt_ids.len(), completion)),
                        prompt_token_ids: if first { prompt_ids.clone() } else { Vec::new() },
                    };
                    first = false;
                    if out.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            };
            let (result, ()) = tokio::join!(run, forward);
            if let Err(e) = result {
                if !matches!(e, ServeError::Cancelled(_)) {
                    let _ = out_tx.send(Err(e.into())).await;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let (_, model) = self.0.find(&req.model)?;
        let token_ids = model
            .tokenizer
            .encode(&req.text)
            .map_err(|e| Status::invalid_argument(format!("text cannot be tokenized: {e}")))?;
        let tokens = model
            .tokenizer
            .tokens(&req.text)
            .map_err(|e| Status::invalid_argument(format!("text cannot be tokenized: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse { token_ids, tokens }))
    }

    async fn list_models(&self, _request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.0.engines().iter().map(|e| model_info(e.entry())).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

pub(crate) fn model_info(m: &crate::engine::ModelEntry) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name.clone(),
        state: m.state().name().to_string(),
        architecture: m.config.architecture.hf_name().to_string(),
        max_position_embeddings: m.max_total_tokens as u32,
        dtype: m.dtype.clone(),
        num_layers: m.config.num_layers as u32,
    }
}

/// `Admin` over the [`Models`] served, with the means to start local workers when it has them.
pub struct AdminService {
    pub models: Arc<Models>,
    pub local: Option<crate::scale::LocalWorkers>,
    pub spawned: Arc<crate::scale::Spawned>,
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
                    ServingState::Ready(p) => (stage_infos(&p.stages), format!("{} requests in flight", m.active())),
                    ServingState::Loading(why) | ServingState::Unavailable(why) => (Vec::new(), why.clone()),
                };
                pb::ModelStatus {
                    model: Some(model_info(m)),
                    stages,
                    detail,
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            models,
            workers: self.models.primary().membership().workers().len() as u32,
            membership: self.models.primary().membership().kind().to_string(),
            role: self.models.primary().role().to_string(),
        }))
    }

    async fn list_workers(&self, _request: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let mut workers = self.models.primary().membership().workers();
        let serving: Vec<(String, u32)> = self
            .models
            .engines()
            .iter()
            .filter_map(|e| match e.entry().state() {
                ServingState::Ready(p) => Some(p),
                _ => None,
            })
            .flat_map(|p| {
                p.stages
                    .iter()
                    .enumerate()
                    .flat_map(|(i, s)| s.ranks().map(move |(id, _)| (id.to_string(), i as u32)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let cordoned = self.models.primary().cordoned().await;
        for w in &mut workers {
            w.stage = serving.iter().find(|(id, _)| *id == w.id).map(|(_, s)| *s);
            if cordoned.contains(&w.id) {
                w.state = "cordoned".into();
            } else if serving.iter().any(|(id, _)| *id == w.id) {
                w.state = "serving".into();
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
        let (started, stopped) = crate::scale::scale(&self.models, self.local.as_ref(), &self.spawned, target).await?;
        Ok(Response::new(pb::ScaleResponse {
            workers: self.models.primary().membership().workers().len() as u32,
            started,
            stopped,
        }))
    }

    async fn load_model(&self, request: Request<pb::LoadModelRequest>) -> Result<Response<pb::LoadModelResponse>, Status> {
        Ok(Response::new(self.models.load(request.into_inner()).await?))
    }

    async fn unload_model(&self, request: Request<pb::UnloadModelRequest>) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let workers = self.models.unload(&request.into_inner().name).await?;
        Ok(Response::new(pb::UnloadModelResponse { workers }))
    }
}
