//! The `Worker` gRPC service: loads a shard, runs steps for many sequences over long-lived
//! streams, forwards hidden states to the next stage, samples on the last stage, and frees
//! every sequence's state on release, on error, or when the stream that brought it closes.

mod compute;
mod tp;

use crate::group::{Control, Rendezvous};
use compute::{compute, ComputeThread, Computed};
use tp::{all_reduce, follow};
use candle_core::Device;
use shardserve::collective::tcp::TcpGroup;
use shardserve::collective::TpRank;
use shardserve::config::ModelConfig;
use shardserve::model::{self, KvCache, Shard, StageSpec};
use shardserve::sampling::Sampler;
use shardserve::stage::StageClient;
use shardserve_proto::v1 as pb;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, trace, warn};

/// State of one sequence on this stage.
struct Sequence {
    kv: KvCache,
    /// Last stage only: the sampler and every token of the sequence so far.
    sampler: Option<Sampler>,
    history: Vec<u32>,
}

/// The shard this worker serves.
struct Loaded {
    epoch: u64,
    shard: Arc<Shard>,
    model: String,
    stage: u32,
    next: Option<Arc<StageClient>>,
    tp: TpRank,
    /// The tensor-parallel group: on the leader its links to the followers, on a follower its
    /// link to the leader.
    group: Option<Arc<TcpGroup>>,
}

impl Loaded {
    /// The group this worker leads, if it leads one.
    fn followers(&self) -> Option<&Arc<TcpGroup>> {
        self.group.as_ref().filter(|_| self.tp.is_leader())
    }
}

/// Longest the ranks of a tensor-parallel group wait for each other while loading.
const GROUP_WAIT: Duration = Duration::from_secs(600);

/// Everything a worker holds.
pub struct WorkerState {
    id: String,
    loaded: RwLock<Option<Arc<Loaded>>>,
    sequences: Mutex<HashMap<u64, Arc<Mutex<Sequence>>>>,
    /// Recently released sequence ids: a step that arrives after its release (they race
    /// across stages) must not bring the sequence back.
    released: Mutex<(HashSet<u64>, std::collections::VecDeque<u64>)>,
    step_timeout: Duration,
    /// Longest a collective operation waits on a peer.
    collective_timeout: Duration,
    rendezvous: Arc<Rendezvous>,
    device: Device,
    compute: ComputeThread,
    /// Fires on shutdown: step streams stop taking new steps and close.
    shutdown: tokio_util::sync::CancellationToken,
}

impl WorkerState {
    /// An empty worker.
    pub fn new(
        id: String,
        step_timeout: Duration,
        collective_timeout: Duration,
        rendezvous: Arc<Rendezvous>,
        device: Device,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        WorkerState {
            id,
            loaded: RwLock::new(None),
            sequences: Mutex::new(HashMap::new()),
            released: Mutex::default(),
            step_timeout,
            collective_timeout,
            rendezvous,
            device,
            compute: ComputeThread::start(),
            shutdown,
        }
    }

    /// Drops the shard and every sequence.
    pub fn unload(&self) {
        if let Some(old) = self.loaded.write().expect("loaded lock").take() {
            if let Some(g) = &old.group {
                g.close();
            }
        }
        self.sequences.lock().expect("sequences lock").clear();
    }

    /// Drops `loaded` if it is still the shard served (a newer one is left alone).
    fn unload_if_current(&self, loaded: &Arc<Loaded>) {
        let mut current = self.loaded.write().expect("loaded lock");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, loaded)) {
            *current = None;
            self.sequences.lock().expect("sequences lock").clear();
        }
    }

    fn current(&self) -> Result<Arc<Loaded>, Status> {
        self.loaded
            .read()
            .expect("loaded lock")
            .clone()
            .ok_or_else(|| Status::failed_precondition(format!("worker {} holds no shard", self.id)))
    }

    fn release(&self, ids: &[u64]) -> usize {
        const REMEMBERED: usize = 65_536;
        {
            let mut released = self.released.lock().expect("released lock");
            for &id in ids {
                if released.0.insert(id) {
                    released.1.push_back(id);
                }
            }
            while released.1.len() > REMEMBERED {
                if let Some(old) = released.1.pop_front() {
                    released.0.remove(&old);
                }
            }
        }
        let freed = {
            let mut seqs = self.sequences.lock().expect("sequences lock");
            ids.iter().filter(|id| seqs.remove(id).is_some()).count()
        };
        // Followers mirror the release in the order of the leader's steps: through the compute
        // thread, which is the only one that talks to them.
        if let Some(group) = self.current().ok().and_then(|l| l.followers().cloned()) {
            if !ids.is_empty() {
                let msg = Control::release(ids);
                self.compute.spawn(move || {
                    if let Err(why) = group.send_control(&msg) {
                        debug!(reason = %why, "release not mirrored: the group is broken");
                    }
                });
            }
        }
        freed
    }

    fn was_released(&self, id: u64) -> bool {
        self.released.lock().expect("released lock").0.contains(&id)
    }
}

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

fn error_results(req: &pb::StepRequest, code: tonic::Code, message: &str) -> Vec<pb::SequenceResult> {
    let ids: Vec<u64> = req.sequences.iter().map(|s| s.seq_id).collect();
    failed(&ids, code, message)
}

/// The same failure for each of the sequences `ids`.
fn failed(ids: &[u64], code: tonic::Code, message: &str) -> Vec<pb::SequenceResult> {
    ids.iter()
        .map(|&seq_id| pb::SequenceResult {
            seq_id,
            error: message.to_string(),
            code: code as i32,
            ..Default::default()
        })
        .collect()
}

type StepStream = Pin<Box<dyn futures::Stream<Item = Result<pb::StepResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn load_shard(&self, request: Request<pb::LoadShardRequest>) -> Result<Response<pb::LoadShardResponse>, Status> {
        let req = request.into_inner();
        if req.layer_end <= req.layer_start && req.num_stages > 1 {
            return Err(Status::invalid_argument(format!(
                "layer range {}..{} is empty",
                req.layer_start, req.layer_end
            )));
        }
        if req.stage >= req.num_stages.max(1) {
            return Err(Status::invalid_argument(format!(
                "stage {} of {} does not exist",
                req.stage, req.num_stages
            )));
        }
        let tp = TpRank { rank: req.tp_rank as usize, size: req.tp_size.max(1) as usize };
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
        let (shard, group) = tokio::task::spawn_blocking(move || -> Result<(Shard, Option<Arc<TcpGroup>>), Status> {
            let load = || -> Result<Shard, shardserve::Error> {
                let files = shardserve::hub::resolve(&r.model, Some(&r.revision))?;
                let cfg = ModelConfig::from_file(&files.file("config.json"))?;
                let dtype = model::resolve_dtype(&r.dtype, &cfg, &device)?;
                let spec = StageSpec::new(
                    r.layer_start as usize..r.layer_end as usize,
                    r.stage as usize,
                    r.num_stages.max(1) as usize,
                )
                .with_tp(tp);
                if r.random_weights {
                    return Shard::random(&cfg, spec, dtype, &device, 0);
                }
                Shard::load(&cfg, spec, &files.dir, dtype, &device)
            };
            let mut shard = load().map_err(to_status)?;
            if tp.size == 1 {
                return Ok((shard, None));
            }
            let names = r.tp_workers.clone();
            let group = if tp.is_leader() {
                let conns = st.rendezvous.wait(&r.tp_group, tp.size, &names, GROUP_WAIT).map_err(Status::unavailable)?;
                TcpGroup::leader(conns, names, st.collective_timeout)
            } else {
                TcpGroup::follower(&r.tp_leader, &r.tp_group, tp.rank, tp.size, names, st.collective_timeout, GROUP_WAIT)
            }
            .map_err(|e| {
                Status::unavailable(format!(
                    "worker {}: forming tensor-parallel group {} (rank {} of {}): {e}",
                    st.id, r.tp_group, tp.rank, tp.size
                ))
            })?;
            let group = Arc::new(group);
            shard.set_group(all_reduce(&st, &group, tp, &device)?);
            Ok((shard, Some(group)))
        })
        .await
        .map_err(|e| Status::internal(format!("loading task failed: {e}")))??;
        let report = shard.report().clone();
        let dtype = format!("{:?}", shard.dtype()).to_lowercase();
        let next_name = if req.next_worker_id.is_empty() { format!("stage {}", req.stage + 1) } else { req.next_worker_id.clone() };
        let next = (!req.next_address.is_empty()).then(|| Arc::new(StageClient::new(next_name, req.next_address.clone())));
        info!(
            worker = %state.id, model = %req.model, stage = req.stage, layers = ?(req.layer_start..req.layer_end),
            tp_rank = tp.rank, tp_size = tp.size, tensors = report.tensors.len(), bytes = report.bytes, "shard loaded"
        );
        state.sequences.lock().expect("sequences lock").clear();
        let loaded = Arc::new(Loaded {
            epoch: req.epoch,
            shard: Arc::new(shard),
            model: req.model,
            stage: req.stage,
            next: if tp.is_leader() { next } else { None },
            tp,
            group: group.clone(),
        });
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
        }))
    }

    type StepStream = StepStream;

    async fn step(&self, request: Request<Streaming<pb::StepRequest>>) -> Result<Response<Self::StepStream>, Status> {
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::unbounded_channel::<Result<pb::StepResponse, Status>>();
        tokio::spawn(async move {
            // Sequences first seen on this stream: freed when it closes, so a vanished caller
            // leaves nothing behind.
            let owned: Arc<Mutex<HashSet<u64>>> = Arc::default();
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
                        let _ = tx.send(Ok(pb::StepResponse {
                            step_id: req.step_id,
                            results: error_results(&req, tonic::Code::Unavailable, e.message()),
                        }));
                        continue;
                    }
                };
                let (st, l) = (state.clone(), loaded.clone());
                let (step_id, ids): (u64, Vec<u64>) = (req.step_id, req.sequences.iter().map(|s| s.seq_id).collect());
                let computed = state.compute.run(move || {
                    let mut fresh = Vec::new();
                    let started = std::time::Instant::now();
                    let out = compute(&st, &l, &req, &mut fresh);
                    let tokens: usize = req.sequences.iter().map(|s| s.token_ids.len()).sum();
                    trace!(step = req.step_id, sequences = req.sequences.len(), tokens, compute_us = started.elapsed().as_micros() as u64, "step computed");
                    (req, out, fresh)
                })
                .await;
                let (req, out, fresh) = match computed {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(worker = %state.id, error = %e, "a step failed to run");
                        state.release(&ids);
                        let _ = tx.send(Ok(pb::StepResponse {
                            step_id,
                            results: failed(&ids, tonic::Code::Internal, &format!("worker {}: {e}", state.id)),
                        }));
                        continue;
                    }
                };
                {
                    let mut owned = owned.lock().expect("owned lock");
                    owned.extend(fresh);
                    // Keep only what is still held here, so the set stays small.
                    if owned.len() > 4096 {
                        let live = state.sequences.lock().expect("sequences lock");
                        owned.retain(|id| live.contains_key(id));
                    }
                }
                match out {
                    Ok(Computed::Results(results)) => {
                        let _ = tx.send(Ok(pb::StepResponse { step_id: req.step_id, results }));
                    }
                    Ok(Computed::Forward(hidden)) => {
                        let Some(next) = loaded.next.clone() else {
                            let _ = tx.send(Ok(pb::StepResponse {
                                step_id: req.step_id,
                                results: error_results(&req, tonic::Code::Internal, "this stage is not the last and has no next stage"),
                            }));
                            continue;
                        };
                        let wire = match shardserve::wire::encode(&hidden) {
                            Ok(w) => w,
                            Err(e) => {
                                state.release(&ids);
                                let _ = tx.send(Ok(pb::StepResponse {
                                    step_id: req.step_id,
                                    results: error_results(&req, tonic::Code::Internal, &e.to_string()),
                                }));
                                continue;
                            }
                        };
                        let forward = pb::StepRequest {
                            step_id: req.step_id,
                            sequences: req.sequences.clone(),
                            hidden: Some(wire),
                        };
                        // Forward without waiting, so this stage takes the next step while
                        // later stages work on this one.
                        let (tx, st, timeout) = (tx.clone(), state.clone(), state.step_timeout);
                        tokio::spawn(async move {
                            let resp = match next.step(forward, timeout).await {
                                Ok(r) => r,
                                Err(e) => {
                                    st.release(&ids);
                                    pb::StepResponse {
                                        step_id: req.step_id,
                                        results: error_results(&req, e.code(), e.message()),
                                    }
                                }
                            };
                            for r in &resp.results {
                                if !r.error.is_empty() {
                                    st.release(&[r.seq_id]);
                                }
                            }
                            let _ = tx.send(Ok(resp));
                        });
                    }
                    Err(message) => {
                        state.release(&ids);
                        if let Some(next) = &loaded.next {
                            release_downstream(next.clone(), ids.clone());
                        }
                        let _ = tx.send(Ok(pb::StepResponse {
                            step_id: req.step_id,
                            results: error_results(&req, message.code, &format!("worker {}: {}", state.id, message.text)),
                        }));
                    }
                }
            }
            let ids: Vec<u64> = owned.lock().expect("owned lock").drain().collect();
            let freed = state.release(&ids);
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
        let released = self.state.release(&ids);
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
        let seqs: Vec<Arc<Mutex<Sequence>>> = self.state.sequences.lock().expect("sequences lock").values().cloned().collect();
        let kv_bytes = seqs.iter().map(|s| s.lock().expect("sequence lock").kv.bytes()).sum();
        let mut resp = pb::StatsResponse {
            sequences: seqs.len() as u32,
            kv_bytes,
            ..Default::default()
        };
        if let Ok(l) = self.state.current() {
            let spec = l.shard.spec();
            let report = l.shard.report();
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

/// Frees sequences on the next stage (and, through it, every later one), best effort.
fn release_downstream(next: Arc<StageClient>, ids: Vec<u64>) {
    if ids.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let call = async {
            let mut c = shardserve::stage::lazy_client(next.address())?;
            c.release(pb::ReleaseRequest { seq_ids: ids }).await
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(3), call).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded("release timed out"))
        }) {
            debug!(next = %next.address(), error = %e, "release on the next stage failed");
        }
    });
}
