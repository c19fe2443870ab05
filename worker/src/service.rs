//! The `Worker` gRPC service: loads a shard, runs steps for many sequences over long-lived
//! streams, forwards hidden states to the next stage, samples on the last stage, and frees
//! every sequence's state on release, on error, or when the stream that brought it closes.

mod compute;
mod state;
mod tp;

use compute::compute;
use shardserve::collective::tcp::TcpGroup;
use shardserve::collective::TpRank;
use shardserve::config::ModelConfig;
use shardserve::guide::Grammars;
use shardserve::model::{self, Shard, StageSpec};
use shardserve::stage::StageClient;
use shardserve_proto::v1 as pb;
pub use state::WorkerState;
use state::{kv_blocks, Loaded, SeqState, StageKv, DEFAULT_BLOCK_SIZE, GROUP_WAIT};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tp::{all_reduce, follow};
use tracing::{debug, info, warn};

/// The gRPC face of [`WorkerState`].
pub struct WorkerService {
    state: Arc<WorkerState>,
}

impl WorkerService {
    /// Serves `state`.
    pub fn new(state: Arc<WorkerState>) -> Self {
        WorkerService { state }
    }
}

fn to_status(e: shardserve::Error) -> Status {
    let m = shardserve::brief(&e);
    match e {
        shardserve::Error::ModelNotFound(_) => Status::not_found(m),
        shardserve::Error::Download { .. } => Status::unavailable(m),
        shardserve::Error::Config { .. } | shardserve::Error::LoadWeights(_) | shardserve::Error::Io { .. } => {
            Status::failed_precondition(m)
        }
        _ => Status::internal(m),
    }
}

/// The same failure for each of the sequences `ids`.
fn failed(ids: &[u64], code: tonic::Code, message: &str) -> Vec<pb::SequenceResult> {
    ids.iter().map(|&seq_id| pb::SequenceResult { seq_id, error: message.to_string(), code: code as i32, ..Default::default() }).collect()
}

type StepStream = Pin<Box<dyn futures::Stream<Item = Result<pb::StepResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn load_shard(&self, request: Request<pb::LoadShardRequest>) -> Result<Response<pb::LoadShardResponse>, Status> {
        let req = request.into_inner();
        if req.layer_end <= req.layer_start && req.num_stages > 1 {
            return Err(Status::invalid_argument(format!("layer range {}..{} is empty", req.layer_start, req.layer_end)));
        }
        if req.stage >= req.num_stages.max(1) {
            return Err(Status::invalid_argument(format!("stage {} of {} does not exist", req.stage, req.num_stages)));
        }
        let tp = TpRank { rank: req.tp_rank as usize, size: req.tp_size.max(1) as usize };
        let quantize = shardserve::quant::Quantize::parse(&req.quantize).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if tp.rank >= tp.size {
            return Err(Status::invalid_argument(format!("tensor-parallel rank {} of {} does not exist", tp.rank, tp.size)));
        }
        if tp.size > 1 && (req.tp_group.is_empty() || (!tp.is_leader() && req.tp_leader.is_empty())) {
            return Err(Status::invalid_argument("a tensor-parallel shard needs tp_group, and tp_leader on ranks above 0"));
        }
        let state = self.state.clone();
        // This worker's old group (if any) ends here: its peers stop waiting on it.
        if let Ok(old) = state.current() {
            if let Some(g) = &old.group {
                g.close();
            }
        }
        let device = state.device.clone();
        let r = req.clone();
        let st = state.clone();
        let (shard, group, pool, files, grammars) = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let files = shardserve::hub::resolve_file(&r.model, Some(&r.revision), Some(&r.gguf_file)).map_err(to_status)?;
            let load = || -> Result<Shard, shardserve::Error> {
                let cfg = files.config()?;
                let dtype = model::resolve_dtype(r.dtype.parse()?, &cfg, &device);
                let spec = StageSpec::new(r.layer_start as usize..r.layer_end as usize, r.stage as usize, r.num_stages.max(1) as usize)
                    .with_tp(tp);
                let spec = StageSpec { quantize, dequantize: r.dequantize, ..spec };
                if r.random_weights {
                    return Shard::random(&cfg, spec, dtype, &device, 0);
                }
                Shard::load(&cfg, spec, &files.weights(), dtype, &device)
            };
            let mut shard = load().map_err(to_status)?;
            // The KV pool is allocated now, once: steps never allocate cache memory.
            let block_size = if r.kv_block_size == 0 { DEFAULT_BLOCK_SIZE } else { r.kv_block_size as usize };
            let block_bytes = shard.kv_bytes_per_token() * block_size as u64;
            let blocks = kv_blocks(r.kv_memory, block_bytes, &device, tp.size > 1)
                .map_err(|e| Status::resource_exhausted(format!("worker {}: {e}", st.id)))?;
            let pool = shard.new_pool(blocks, block_size).map_err(to_status)?;
            // The rank that samples builds the model's grammars now, not on the compute thread
            // when the first constrained sequence arrives (hundreds of ms for a large vocabulary,
            // every other sequence's step waiting).
            let grammars = (shard.spec().has_head() && tp.is_leader()).then(|| prebuilt_grammars(&files, shard.config())).flatten();
            if tp.size == 1 {
                return Ok((shard, None, pool, files, grammars));
            }
            let names = r.tp_workers.clone();
            let group = if tp.is_leader() {
                let conns = st.rendezvous.wait(&r.tp_group, tp.size, &names, GROUP_WAIT).map_err(Status::unavailable)?;
                TcpGroup::leader(conns, names, st.collective_timeout)
            } else {
                TcpGroup::follower(&r.tp_leader, st.tls.as_deref(), &r.tp_group, tp.rank, tp.size, names, st.collective_timeout, GROUP_WAIT)
            }
            .map_err(|e| {
                Status::unavailable(format!(
                    "worker {}: forming tensor-parallel group {} (rank {} of {}): {e}",
                    st.id, r.tp_group, tp.rank, tp.size
                ))
            })?;
            let group = Arc::new(group);
            shard.set_group(all_reduce(&st, &group, tp, &device)?);
            Ok((shard, Some(group), pool, files, grammars))
        })
        .await
        .map_err(|e| Status::internal(format!("loading task failed: {e}")))??;
        let report = shard.report().clone();
        let dtype = format!("{:?}", shard.dtype()).to_lowercase();
        let next_name = if req.next_worker_id.is_empty() { format!("stage {}", req.stage + 1) } else { req.next_worker_id.clone() };
        let next =
            (!req.next_address.is_empty()).then(|| Arc::new(StageClient::new(next_name, req.next_address.clone(), state.tls.clone())));
        let (blocks_total, block_size, block_bytes) = (pool.blocks_total(), pool.block_size(), pool.bytes_per_block());
        info!(
            worker = %state.id, model = %req.model, stage = req.stage, layers = ?(req.layer_start..req.layer_end),
            tp_rank = tp.rank, tp_size = tp.size, tensors = report.tensors.len(), bytes = report.bytes,
            kv_blocks = blocks_total, kv_block_size = block_size, "shard loaded"
        );
        let loaded = Arc::new(Loaded {
            epoch: req.epoch,
            shard: Arc::new(shard),
            model: req.model,
            stage: req.stage,
            next: if tp.is_leader() { next } else { None },
            tp,
            group: group.clone(),
            kv: Mutex::new(StageKv { pool, seqs: HashMap::new(), owner: 0 }),
            blocks_used: AtomicUsize::new(0),
            blocks_cached: AtomicUsize::new(0),
            blocks_evicted: Default::default(),
            sequences: AtomicUsize::new(0),
            blocks_total,
            block_size,
            block_bytes,
            files,
            grammars: Mutex::new(grammars),
        });
        loaded.publish(&loaded.kv.lock().expect("kv lock"));
        *state.loaded.write().expect("loaded lock") = Some(loaded.clone());
        if let (Some(group), false) = (group, tp.is_leader()) {
            let st = state.clone();
            std::thread::Builder::new()
                .name("tp-follower".into())
                .spawn(move || follow(st, loaded, group))
                .map_err(|e| Status::internal(format!("starting the follower thread: {e}")))?;
        }
        Ok(Response::new(pb::LoadShardResponse {
            bytes: report.bytes,
            tensors: report.tensors.len() as u32,
            dtype,
            kv_blocks: blocks_total as u32,
            kv_block_size: block_size as u32,
            kv_block_bytes: block_bytes,
        }))
    }

    type StepStream = StepStream;

    async fn step(&self, request: Request<Streaming<pb::StepRequest>>) -> Result<Response<Self::StepStream>, Status> {
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        // Answers carry token ids only (no activations); at most one per step in flight.
        let (tx, rx) = mpsc::unbounded_channel::<Result<pb::StepResponse, Status>>();
        tokio::spawn(async move {
            // Sequences first seen on this stream: freed when it closes, so a vanished caller
            // leaves nothing behind.
            let mut owned: HashSet<u64> = HashSet::new();
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    // On shutdown the stream closes once the steps already taken are answered.
                    _ = state.shutdown.cancelled() => break,
                };
                let req = match next {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %e, "step stream broke");
                        break;
                    }
                };
                let loaded = match state.current().and_then(|l| {
                    if l.tp.is_leader() {
                        Ok(l)
                    } else {
                        Err(Status::failed_precondition(format!(
                            "worker {} is tensor-parallel rank {}; steps go to rank 0",
                            state.id, l.tp.rank
                        )))
                    }
                }) {
                    Ok(l) => l,
                    Err(e) => {
                        let ids: Vec<u64> = req.sequences.iter().map(|s| s.seq_id).collect();
                        let _ = tx.send(Ok(pb::StepResponse {
                            step_id: req.step_id,
                            results: failed(&ids, tonic::Code::Unavailable, e.message()),
                        }));
                        continue;
                    }
                };
                let step_id = req.step_id;
                let ids: Vec<u64> = req.sequences.iter().map(|s| s.seq_id).collect();
                let (st, l) = (state.clone(), loaded.clone());
                let computed = state
                    .compute
                    .run(move || {
                        let started = std::time::Instant::now();
                        let (sequences, rows) = (req.sequences.len(), req.sequences.iter().map(|s| s.token_ids.len()).sum::<usize>());
                        let out = compute(&st, &l, req);
                        if sequences > 0 {
                            let stage = l.stage.to_string();
                            metrics::histogram!("shardserve_step_duration_seconds", "stage" => stage.clone())
                                .record(started.elapsed().as_secs_f64());
                            metrics::histogram!("shardserve_stage_batch_tokens", "stage" => stage).record(rows as f64);
                            tracing::trace!(
                                step = step_id,
                                sequences,
                                rows,
                                compute_us = started.elapsed().as_micros() as u64,
                                "step computed"
                            );
                        }
                        out
                    })
                    .await;
                let computed = match computed {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(worker = %state.id, error = %e, "a step failed to run");
                        state.release(ids.clone()).await;
                        let _ = tx.send(Ok(pb::StepResponse {
                            step_id,
                            results: failed(&ids, tonic::Code::Internal, &format!("worker {}: {e}", state.id)),
                        }));
                        continue;
                    }
                };
                owned.extend(&computed.fresh);
                if owned.len() > 4096 {
                    // Keep only what is still held here, so the set stays small.
                    let kv = loaded.kv.lock().expect("kv lock");
                    owned.retain(|id| kv.pool.contains(*id));
                }
                let mut results = computed.results;
                let Some(forward) = computed.forward else {
                    let _ = tx.send(Ok(pb::StepResponse { step_id, results }));
                    continue;
                };
                let Some(next) = loaded.next.clone() else {
                    let e = "this stage is not the last and has no next stage";
                    results.extend(failed(&forward.sequences.iter().map(|s| s.seq_id).collect::<Vec<_>>(), tonic::Code::Internal, e));
                    let _ = tx.send(Ok(pb::StepResponse { step_id, results }));
                    continue;
                };
                // Queued on the next stage's stream here, in this stream's order (releases
                // included), then answered without waiting, so this stage takes the next step
                // while later stages work on this one.
                let forwarded: Vec<u64> = forward.sequences.iter().map(|s| s.seq_id).collect();
                let pending = next.submit(forward).await;
                let (tx, st, timeout) = (tx.clone(), state.clone(), state.step_timeout);
                tokio::spawn(async move {
                    let answer = match pending {
                        Ok(p) => p.answer(timeout).await,
                        Err(e) => Err(e),
                    };
                    match answer {
                        Ok(resp) => {
                            let gone: Vec<u64> = resp.results.iter().filter(|r| !r.error.is_empty()).map(|r| r.seq_id).collect();
                            st.release(gone).await;
                            results.extend(resp.results);
                        }
                        Err(e) => {
                            st.release(forwarded.clone()).await;
                            results.extend(failed(&forwarded, e.code(), e.message()));
                        }
                    }
                    let _ = tx.send(Ok(pb::StepResponse { step_id, results }));
                });
            }
            let ids: Vec<u64> = owned.into_iter().collect();
            let freed = state.release(ids.clone()).await;
            if freed > 0 {
                debug!(worker = %state.id, freed, "step stream closed; sequences freed");
            }
            if let Ok(l) = state.current() {
                if let Some(next) = &l.next {
                    release_downstream(next.clone(), ids);
                }
            }
        });
        let out = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ids = request.into_inner().seq_ids;
        let released = self.state.release(ids.clone()).await;
        if let Ok(l) = self.state.current() {
            if let Some(next) = &l.next {
                release_downstream(next.clone(), ids);
            }
        }
        Ok(Response::new(pb::ReleaseResponse { released: released as u32 }))
    }

    async fn unload(&self, request: Request<pb::UnloadRequest>) -> Result<Response<pb::UnloadResponse>, Status> {
        let epoch = request.into_inner().epoch;
        let unloaded = match self.state.current() {
            Ok(l) if epoch == 0 || l.epoch == epoch => {
                self.state.unload_if_current(&l);
                if let Some(g) = &l.group {
                    g.close();
                }
                info!(worker = %self.state.id, model = %l.model, "shard unloaded");
                true
            }
            _ => false,
        };
        Ok(Response::new(pb::UnloadResponse { unloaded }))
    }

    async fn stats(&self, _request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let mut resp = pb::StatsResponse::default();
        if let Ok(l) = self.state.current() {
            let spec = l.shard.spec();
            let report = l.shard.report();
            let used = l.blocks_used.load(Ordering::SeqCst);
            resp.sequences = l.sequences.load(Ordering::SeqCst) as u32;
            resp.kv_bytes = used as u64 * l.block_bytes;
            resp.kv_blocks_used = used as u32;
            resp.kv_blocks_cached = l.blocks_cached.load(Ordering::SeqCst) as u32;
            resp.kv_blocks_evicted = l.blocks_evicted.load(Ordering::SeqCst);
            resp.kv_blocks_total = l.blocks_total as u32;
            resp.kv_block_size = l.block_size as u32;
            resp.model = l.model.clone();
            resp.stage = l.stage;
            resp.layer_start = spec.layers.start as u32;
            resp.layer_end = spec.layers.end as u32;
            resp.weight_bytes = report.bytes;
            resp.tensors = report.tensors.iter().cloned().collect();
            resp.files = report.files.iter().cloned().collect();
            resp.tp_rank = l.tp.rank as u32;
            resp.tp_size = l.tp.size as u32;
        }
        Ok(Response::new(resp))
    }
}

/// The grammars of the model in `files` for its end-of-sequence tokens (as generation_config.json
/// or config.json name them, as the coordinator reads them); `None`, logged, when they cannot be
/// built (constrained sequences then say why).
fn prebuilt_grammars(files: &shardserve::hub::ModelFiles, cfg: &ModelConfig) -> Option<(Vec<u32>, Arc<Grammars>)> {
    let build = || -> Result<(Vec<u32>, Arc<Grammars>), String> {
        let eos = files.generation().map_err(|e| e.to_string())?.eos_ids(cfg);
        let tokenizer = files.tokenizer().map_err(|e| e.to_string())?;
        let grammars = Grammars::new(&tokenizer, cfg.vocab_size, &eos).map_err(|e| e.to_string())?;
        Ok((eos, Arc::new(grammars)))
    };
    build().map_err(|e| debug!(error = %e, "no grammars for constrained decoding")).ok()
}

/// Frees sequences on the next stage (and, through it, every later one), best effort.
fn release_downstream(next: Arc<StageClient>, ids: Vec<u64>) {
    if ids.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let call = async {
            let mut c = shardserve::stage::lazy_client(next.address(), next.tls())?;
            c.release(pb::ReleaseRequest { seq_ids: ids }).await
        };
        if let Err(e) =
            tokio::time::timeout(Duration::from_secs(3), call).await.unwrap_or_else(|_| Err(Status::deadline_exceeded("release timed out")))
        {
            debug!(next = %next.address(), error = %e, "release on the next stage failed");
        }
    });
}
