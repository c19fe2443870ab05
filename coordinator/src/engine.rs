//! The serving engine: for each model, its tokenizer and configs, its placement over the fleet
//! (planned, loaded and re-planned when workers come and go), and the per-request loop that
//! drives steps through the pipeline, detokenizes, and stops on eos, stop strings or length.

use crate::error::ServeError;
use crate::membership::Membership;
use shardserve::config::{GenerationConfig, ModelConfig};
use shardserve::stage::StageClient;
use shardserve::tokenizer::{IncrementalDecoder, StopMatcher, Tokenizer};
use shardserve_proto::v1 as pb;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How the engine serves its model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model as given: a folder or a Hub id.
    pub model: String,
    pub revision: Option<String>,
    /// The name clients use; defaults to `model`.
    pub name: String,
    /// "auto", "f32", "bf16" or "f16".
    pub dtype: String,
    /// Pipeline stages, one worker each.
    pub workers: usize,
    /// Caps prompt + generated tokens below the model's own limit.
    pub max_total_tokens: Option<usize>,
    /// Requests in flight per model before RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Longest one step may take.
    pub step_timeout: Duration,
    /// accelerate's strategy, applied over the workers.
    pub strategy: shardserve::placement::Strategy,
    /// Weight budget per worker, by worker index in join order (accelerate's `max_memory`).
    pub max_memory: Option<Vec<(shardserve::placement::Device, u64)>>,
    /// An explicit map: Hugging Face module names → worker index or id.
    pub device_map: Option<serde_json::Value>,
    /// Share of a worker's free memory kept for KV caches and activations.
    pub reserve: f64,
    /// Longest prompt slice sent in one step; longer prompts are prefilled in chunks.
    pub prefill_chunk: usize,
    /// Times a request may move to a new placement when a stage under it dies (0: it fails
    /// with UNAVAILABLE at once).
    pub migration_limit: usize,
    /// How long a migrating request waits for the new placement.
    pub migration_wait: Duration,
    /// TTL of the lease behind this coordinator's leadership (etcd membership only).
    pub lease_ttl: Duration,
    /// How long a new request waits for the model to be placed again after a stage was lost,
    /// before it gets UNAVAILABLE.
    pub replan_wait: Duration,
}

/// One stage of a placement.
#[derive(Debug, Clone)]
pub struct StageAssignment {
    pub worker_id: String,
    pub address: String,
    pub layers: Range<usize>,
    pub bytes: u64,
}

/// Where a model lives, and the stream into its first stage.
pub struct Placement {
    pub stages: Vec<StageAssignment>,
    /// Sent with every load and step, so workers refuse steps meant for another placement.
    pub epoch: u64,
    first: Arc<StageClient>,
    release: shardserve_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>,
    id: u64,
}

/// Whether a model can take requests.
#[derive(Clone)]
pub enum ServingState {
    Loading(String),
    Ready(Arc<Placement>),
    Unavailable(String),
}

impl ServingState {
    /// "loading", "ready" or "unavailable".
    pub fn name(&self) -> &'static str {
        match self {
            ServingState::Loading(_) => "loading",
            ServingState::Ready(_) => "ready",
            ServingState::Unavailable(_) => "unavailable",
        }
    }
}

/// A model the engine serves.
pub struct ModelEntry {
    pub name: String,
    pub config: ModelConfig,
    pub shape: shardserve::placement::ModelShape,
    pub dtype_bytes: u64,
    pub generation: GenerationConfig,
    pub tokenizer: Tokenizer,
    pub eos: Vec<u32>,
    pub max_total_tokens: usize,
    pub dtype: String,
    state: RwLock<ServingState>,
    active: AtomicUsize,
    ever_ready: std::sync::atomic::AtomicBool,
}

impl ModelEntry {
    /// The current state.
    pub fn state(&self) -> ServingState {
        self.state.read().expect("state lock").clone()
    }

    fn set_state(&self, s: ServingState) {
        if matches!(s, ServingState::Ready(_)) {
            self.ever_ready.store(true, Ordering::SeqCst);
        }
        *self.state.write().expect("state lock") = s;
    }

    /// Not-ready state with the right flavour: loading until first ready, unavailable after.
    fn not_ready(&self, why: String) -> ServingState {
        if self.ever_ready.load(Ordering::SeqCst) {
            ServingState::Unavailable(why)
        } else {
            ServingState::Loading(why)
        }
    }

    /// Whether the model has been served since the coordinator started.
    pub fn was_ready(&self) -> bool {
        self.ever_ready.load(Ordering::SeqCst)
    }

    /// Requests in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: shardserve::sampling::SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: bool,
}

/// Something the request loop produced.
#[derive(Debug, Clone, Default)]
pub struct GenEvent {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Set on the last event.
    pub finish_reason: Option<&'static str>,
}

/// Resolves the model and reads what the coordinator needs of it (config, generation config,
/// tokenizer), so a bad model fails before anything else starts.
pub fn preflight(config: &EngineConfig) -> anyhow::Result<Prepared> {
    let files = shardserve::hub::resolve(&config.model, config.revision.as_deref())?;
    let cfg = ModelConfig::from_file(&files.file("config.json"))?;
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(files.file("config.json"))?)?;
    let shape = shardserve::placement::ModelShape::from_config_json(&raw)?;
    let generation = GenerationConfig::from_file(&files.file("generation_config.json"))?;
    let tokenizer = Tokenizer::from_file(&files.file("tokenizer.json"))?;
    let dtype = shardserve::model::resolve_dtype(&config.dtype, &cfg, &candle_core::Device::Cpu)?;
    if let Some(map) = &config.device_map {
        // Checked against worker indices only here; ids are checked once workers join.
        anyhow::ensure!(map.is_object(), "--device-map must hold a JSON object of module → worker");
    }
    Ok(Prepared {
        files,
        config: cfg,
        shape,
        dtype_bytes: dtype.size_in_bytes() as u64,
        generation,
        tokenizer,
    })
}

/// What [`preflight`] read.
pub struct Prepared {
    pub files: shardserve::hub::ModelFiles,
    pub config: ModelConfig,
    pub shape: shardserve::placement::ModelShape,
    /// Bytes per weight in the compute dtype.
    pub dtype_bytes: u64,
    pub generation: GenerationConfig,
    pub tokenizer: Tokenizer,
}

/// The engine.
pub struct Engine {
    config: EngineConfig,
    /// etcd endpoints and cluster name, when membership lives in etcd.
    etcd: Option<(Vec<String>, String)>,
    /// Mod revision of the placement this engine last wrote to etcd.
    placement_rev: std::sync::Mutex<i64>,
    /// Epoch of the placement last written to etcd (0: none), so a failed write is retried.
    published: AtomicU64,
    /// One etcd connection for the engine's own reads and writes, made on first use.
    etcd_client: tokio::sync::Mutex<Option<shardserve::membership::etcd_client::Client>>,
    model: Arc<ModelEntry>,
    membership: Arc<dyn Membership>,
    broken: Notify,
    /// Set while this coordinator is the one that plans.
    leader: std::sync::atomic::AtomicBool,
    /// Wakes the planner when leadership is won.
    elected: Notify,
    /// Workers left out of plans (mirrored in etcd under `cordoned/` when membership is there).
    cordoned: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Workers being drained: the model moves off them once requests in flight are done.
    evicting: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Set while the model moves off cordoned workers: new requests wait for the new placement
    /// instead of starting on the old one.
    moving: std::sync::atomic::AtomicBool,
    /// Notified whenever a new placement is ready.
    placed: Notify,
    next_seq: AtomicU64,
    next_placement: AtomicU64,
}

impl Engine {
    /// Reads the model's configs and tokenizer (on the coordinator, from the shared cache) and
    /// starts planning as workers join.
    pub async fn start(
        config: EngineConfig,
        membership: Arc<dyn Membership>,
        etcd: Option<(Vec<String>, String)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let c = config.clone();
        let Prepared { files, config: cfg, shape, dtype_bytes, generation, tokenizer } =
            tokio::task::spawn_blocking(move || preflight(&c)).await??;
        let eos = generation.eos_ids(&cfg);
        let max_total_tokens = config.max_total_tokens.map_or(cfg.max_total_tokens, |m| m.min(cfg.max_total_tokens));
        info!(model = %config.name, dir = %files.dir.display(), architecture = cfg.architecture.hf_name(), layers = cfg.num_layers, "model configured");
        let model = Arc::new(ModelEntry {
            name: config.name.clone(),
            eos,
            max_total_tokens,
            dtype: config.dtype.clone(),
            config: cfg,
            shape,
            dtype_bytes,
            generation,
            tokenizer,
            state: RwLock::new(ServingState::Loading(format!("waiting for workers: 0 of {}", config.workers))),
            active: AtomicUsize::new(0),
            ever_ready: Default::default(),
        });
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let etcd_is_none = etcd.is_none();
        let engine = Arc::new(Engine {
            config,
            etcd,
            placement_rev: std::sync::Mutex::new(0),
            published: AtomicU64::new(0),
            etcd_client: tokio::sync::Mutex::new(None),
            model,
            membership,
            broken: Notify::new(),
            leader: std::sync::atomic::AtomicBool::new(etcd_is_none),
            elected: Notify::new(),
            cordoned: Default::default(),
            evicting: Default::default(),
            moving: Default::default(),
            placed: Notify::new(),
            // Ids from a restarted coordinator do not collide with stale ones on workers.
            next_seq: AtomicU64::new(seed & 0x0fff_ffff_ffff_ffff),
            next_placement: AtomicU64::new(1),
        });
        if let Some((endpoints, cluster)) = engine.etcd.clone() {
            // Every coordinator serves; the elected one plans and the others follow its plan.
            let e = engine.clone();
            let value = format!("coordinator pid {}", std::process::id());
            tokio::spawn(shardserve::membership::lead(
                endpoints.clone(),
                cluster.clone(),
                value,
                engine.config.lease_ttl,
                move |leading| {
                    e.leader.store(leading, Ordering::SeqCst);
                    if leading {
                        e.elected.notify_one();
                    }
                },
                shutdown.clone(),
            ));
            tokio::spawn(engine.clone().follow(cluster, shutdown.clone()));
        }
        tokio::spawn(engine.clone().reconcile(shutdown));
        Ok(engine)
    }

    /// The models served.
    pub fn models(&self) -> Vec<Arc<ModelEntry>> {
        vec![self.model.clone()]
    }

    /// The fleet.
    pub fn membership(&self) -> &Arc<dyn Membership> {
        &self.membership
    }

    /// Finds a model by name; empty means the only one.
    pub fn model(&self, name: &str) -> Result<Arc<ModelEntry>, ServeError> {
        if name.is_empty() || name == self.model.name {
            Ok(self.model.clone())
        } else {
            Err(ServeError::NotFound(format!(
                "model {name:?} is not served here (served: {:?})",
                self.model.name
            )))
        }
    }

    /// Keeps the placement matching the fleet until shutdown.
    async fn reconcile(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.membership.changes();
        let mut backoff = Duration::from_millis(250);
        loop {
            if !self.is_leader() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.elected.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            if let ServingState::Ready(p) = self.model.state() {
                if self.etcd.is_some() && self.published.load(Ordering::SeqCst) != p.epoch {
                    self.publish(&p).await;
                }
            }
            let alive = self.membership.workers();
            let cordoned = self.cordoned().await;
            let workers: Vec<pb::WorkerInfo> = alive.iter().filter(|w| !cordoned.contains(&w.id)).cloned().collect();
            let state = self.model.state();
            let mut healthy = match &state {
                ServingState::Ready(p) => p
                    .stages
                    .iter()
                    .all(|s| alive.iter().any(|w| w.id == s.worker_id && w.address == s.address)),
                _ => false,
            };
            // A worker joined: re-plan when the plan over the larger fleet differs, once no
            // request is in flight (loading moves layers between workers under them).
            let mut replan_pending = false;
            let mut move_wanted = false;
            if let (true, ServingState::Ready(p)) = (healthy, &state) {
                let on_cordoned = {
                    let evicting = self.evicting.lock().expect("evict lock");
                    p.stages.iter().any(|s| evicting.contains(&s.worker_id))
                };
                if (on_cordoned && !workers.is_empty()) || self.differs_from_plan(p, &workers) {
                    // Let requests in flight finish on the old placement; new ones wait.
                    move_wanted = true;
                    if self.model.active() == 0 {
                        info!(model = %self.model.name, workers = workers.len(), "the fleet changed; re-planning");
                        self.model.set_state(ServingState::Unavailable("re-planning for a changed fleet".into()));
                        healthy = false;
                    } else {
                        replan_pending = true;
                    }
                }
            }
            // Recomputed on every pass, so a move that is no longer wanted never holds requests.
            self.moving.store(move_wanted, Ordering::SeqCst);
            if !healthy {
                if let ServingState::Ready(p) = &state {
                    let gone: Vec<&str> = p
                        .stages
                        .iter()
                        .filter(|s| !workers.iter().any(|w| w.id == s.worker_id))
                        .map(|s| s.worker_id.as_str())
                        .collect();
                    let why = format!("worker(s) {} left the fleet", gone.join(", "));
                    warn!(model = %self.model.name, reason = %why, "placement lost");
                    self.model.set_state(ServingState::Unavailable(why));
                }
                // `workers` is what the first plan waits for; afterwards the model is re-planned
                // over whatever fleet remains.
                let wanted = if self.model.ever_ready.load(Ordering::SeqCst) { 1 } else { self.config.workers };
                if workers.len() < wanted {
                    let why = format!("waiting for workers: {} of {wanted} registered and not cordoned", workers.len());
                    self.model.set_state(self.model.not_ready(why));
                    self.moving.store(false, Ordering::SeqCst);
                } else {
                    match self.load(&workers).await {
                        Ok(p) => {
                            info!(model = %self.model.name, stages = p.stages.len(), "model ready");
                            self.publish(&p).await;
                            self.model.set_state(ServingState::Ready(Arc::new(p)));
                            self.moving.store(false, Ordering::SeqCst);
                            self.placed.notify_waiters();
                            backoff = Duration::from_millis(250);
                        }
                        Err((why, permanent)) => {
                            warn!(model = %self.model.name, error = %why, "loading failed; will retry");
                            // A broken checkpoint will not fix itself on retry: say so plainly.
                            let state = if permanent { ServingState::Unavailable(why) } else { self.model.not_ready(why) };
                            self.model.set_state(state);
                            // Retry after a while, or at once when the fleet changes.
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                                r = changes.changed() => if r.is_err() { return },
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                _ = self.broken.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)), if replan_pending || self.unpublished() => {}
            }
        }
    }

    /// Whether planning over `workers` now gives other stages than `p`.
    fn differs_from_plan(&self, p: &Placement, workers: &[pb::WorkerInfo]) -> bool {
        if workers.iter().all(|w| p.stages.iter().any(|s| s.worker_id == w.id)) {
            return false;
        }
        match self.plan(workers) {
            Ok(plan) => {
                let new: Vec<(&str, Range<usize>)> = plan.iter().map(|s| (workers[s.worker].id.as_str(), s.layers.clone())).collect();
                let old: Vec<(&str, Range<usize>)> = p.stages.iter().map(|s| (s.worker_id.as_str(), s.layers.clone())).collect();
                new != old
            }
            Err(_) => false,
        }
    }

    /// Writes the placement to etcd (`placements/<model>`) with a revision check, so two
    /// coordinators cannot overwrite each other's plan.
    async fn publish(&self, p: &Placement) {
        let Some((_, cluster)) = &self.etcd else { return };
        if !self.is_leader() {
            // Only the leader's plan goes to etcd; a deposed leader keeps quiet.
            return;
        }
        let key = shardserve::membership::placement_key(cluster, &self.model.name);
        let value = serde_json::json!({
            "model": self.model.name,
            "epoch": p.epoch,
            "stages": p.stages.iter().map(|s| serde_json::json!({
                "worker": s.worker_id, "address": s.address,
                "layers": [s.layers.start, s.layers.end], "bytes": s.bytes,
            })).collect::<Vec<_>>(),
        })
        .to_string();
        let result = async {
            let mut client = self.etcd_client().await.expect("etcd is configured")?;
            let current = client.get(key.as_str(), None).await?;
            let rev = current.kvs().first().map_or(0, |kv| kv.mod_revision());
            let expected = *self.placement_rev.lock().expect("rev lock");
            if expected != rev && expected != 0 {
                warn!(key = %key, "the placement in etcd was changed by someone else; overwriting with the current plan");
            }
            shardserve::membership::put_if_unchanged(&mut client, &key, value, rev).await
        };
        match tokio::time::timeout(Duration::from_secs(5), result).await {
            Ok(Ok(Some(rev))) => {
                *self.placement_rev.lock().expect("rev lock") = rev;
                self.published.store(p.epoch, Ordering::SeqCst);
            }
            Ok(Ok(None)) => warn!(key = %key, "another writer changed the placement first; not overwritten"),
            Ok(Err(e)) => warn!(key = %key, error = %e, "writing the placement to etcd failed"),
            Err(_) => warn!(key = %key, "writing the placement to etcd timed out"),
        }
    }

    /// Which worker holds which layers: the explicit map, or accelerate's strategy over the
    /// workers' budgets.
    pub fn plan(&self, workers: &[pb::WorkerInfo]) -> Result<Vec<shardserve::placement::cluster::StagePlan>, String> {
        use shardserve::placement::{cluster, Device};
        let m = &self.model;
        if let Some(map) = &self.config.device_map {
            let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
            return cluster::from_explicit_map(&m.shape, m.dtype_bytes, map, &ids).map_err(|e| e.to_string());
        }
        let budgets: Vec<cluster::WorkerBudget> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let bytes = match &self.config.max_memory {
                    Some(mm) => mm.iter().find(|(d, _)| *d == Device::Index(i as u32)).map_or(0, |(_, b)| *b),
                    None => {
                        let free: u64 = w.devices.iter().map(|d| d.free_memory).sum();
                        (free as f64 * (1.0 - self.config.reserve)) as u64
                    }
                };
                cluster::WorkerBudget { id: w.id.clone(), bytes }
            })
            .collect();
        cluster::plan(&m.shape, m.dtype_bytes, &budgets, self.config.strategy).map_err(|e| e.to_string())
    }

    /// Plans over `workers` and loads every stage.
    async fn load(&self, workers: &[pb::WorkerInfo]) -> Result<Placement, (String, bool)> {
        // A plan that cannot be made will not improve by retrying with the same fleet.
        let plan = self.plan(workers).map_err(|e| (e, true))?;
        let epoch = new_epoch();
        let n = plan.len();
        let mut calls = Vec::new();
        for (i, stage) in plan.iter().enumerate() {
            let range = stage.layers.clone();
            let w = workers[stage.worker].clone();
            let next = plan.get(i + 1).map(|s| &workers[s.worker]);
            let (next_address, next_worker_id) = next.map(|w| (w.address.clone(), w.id.clone())).unwrap_or_default();
            let req = pb::LoadShardRequest {
                model: self.config.model.clone(),
                revision: self.config.revision.clone().unwrap_or_default(),
                dtype: self.config.dtype.clone(),
                stage: i as u32,
                num_stages: n as u32,
                layer_start: range.start as u32,
                layer_end: range.end as u32,
                next_address,
                next_worker_id,
                epoch,
            };
            calls.push(async move {
                let mut client = shardserve::stage::connect(&w.address)
                    .await
                    .map_err(|e| (format!("worker {}: {}", w.id, e.message()), false))?;
                let resp = tokio::time::timeout(LOAD_TIMEOUT, client.load_shard(req))
                    .await
                    .map_err(|_| (format!("loading stage {i} on worker {} took longer than {LOAD_TIMEOUT:?}", w.id), false))?
                    .map_err(|e| {
                        let permanent = matches!(
                            e.code(),
                            tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::InvalidArgument
                        );
                        (format!("loading stage {i} on worker {}: {}", w.id, e.message()), permanent)
                    })?
                    .into_inner();
                Ok::<_, (String, bool)>(StageAssignment {
                    worker_id: w.id.clone(),
                    address: w.address.clone(),
                    layers: range.clone(),
                    bytes: resp.bytes,
                })
            });
        }
        let stages = futures::future::join_all(calls).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.placement_of(stages, epoch).map_err(|e| (e, true))
    }

    /// A placement over stages already loaded: the stream into stage 0 and its release client.
    fn placement_of(&self, stages: Vec<StageAssignment>, epoch: u64) -> Result<Placement, String> {
        let head = stages.first().ok_or("a placement needs at least one stage")?;
        let first = Arc::new(StageClient::new(head.worker_id.clone(), head.address.clone()));
        let release = shardserve::stage::lazy_client(&head.address).map_err(|e| e.message().to_string())?;
        Ok(Placement {
            stages,
            epoch,
            first,
            release,
            id: self.next_placement.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The engine's etcd client (connecting on first use); `None` without etcd.
    async fn etcd_client(&self) -> Option<Result<shardserve::membership::etcd_client::Client, shardserve::membership::etcd_client::Error>> {
        let (endpoints, _) = self.etcd.as_ref()?;
        let mut cached = self.etcd_client.lock().await;
        if let Some(c) = cached.as_ref() {
            return Some(Ok(c.clone()));
        }
        match shardserve::membership::connect(endpoints).await {
            Ok(c) => {
                *cached = Some(c.clone());
                Some(Ok(c))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Whether the placement being served has not reached etcd yet.
    fn unpublished(&self) -> bool {
        match (&self.etcd, self.model.state()) {
            (Some(_), ServingState::Ready(p)) => self.published.load(Ordering::SeqCst) != p.epoch,
            _ => false,
        }
    }

    /// Whether this coordinator plans (the elected leader, or the only coordinator).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// "leader", "follower" or "standalone".
    pub fn role(&self) -> &'static str {
        match (&self.etcd, self.is_leader()) {
            (None, _) => "standalone",
            (Some(_), true) => "leader",
            (Some(_), false) => "follower",
        }
    }

    /// On a follower: serves whatever placement the leader publishes in etcd.
    async fn follow(self: Arc<Self>, cluster: String, shutdown: CancellationToken) {
        let key = shardserve::membership::placement_key(&cluster, &self.model.name);
        let mut seen = -1i64;
        loop {
            let poll = async {
                let mut client = self.etcd_client().await.expect("etcd is configured")?;
                client.get(key.as_str(), None).await
            };
            match tokio::time::timeout(Duration::from_secs(5), poll).await {
                Ok(Ok(resp)) if !self.is_leader() => {
                    let rev = resp.kvs().first().map_or(0, |kv| kv.mod_revision());
                    // A placement that failed here is adopted afresh (new streams to its
                    // stages), whether or not the leader has published a new one.
                    let failed_here = !matches!(self.model.state(), ServingState::Ready(_));
                    if rev != seen || (failed_here && rev != 0) {
                        seen = rev;
                        match resp.kvs().first().map(|kv| self.adopt(kv.value())) {
                            Some(Ok(p)) => {
                                info!(model = %self.model.name, stages = p.stages.len(), "serving the leader's placement");
                                self.model.set_state(ServingState::Ready(Arc::new(p)));
                            }
                            Some(Err(e)) => warn!(key = %key, error = %e, "unreadable placement in etcd"),
                            None => self.model.set_state(self.model.not_ready("waiting for the leader to place the model".into())),
                        }
                    }
                }
                Ok(Ok(_)) => seen = -1,
                Ok(Err(e)) => debug!(error = %e, "reading the placement failed"),
                Err(_) => debug!("reading the placement timed out"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// A placement read from etcd, as the leader wrote it.
    fn adopt(&self, value: &[u8]) -> Result<Placement, String> {
        let v: serde_json::Value = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        let stages = v["stages"]
            .as_array()
            .ok_or("no stages")?
            .iter()
            .map(|s| {
                let layers = s["layers"].as_array().ok_or("no layers")?;
                let at = |i: usize| layers.get(i).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or("bad layers");
                Ok(StageAssignment {
                    worker_id: s["worker"].as_str().ok_or("no worker")?.to_string(),
                    address: s["address"].as_str().ok_or("no address")?.to_string(),
                    layers: at(0)?..at(1)?,
                    bytes: s["bytes"].as_u64().unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, &str>>()?;
        self.placement_of(stages, v["epoch"].as_u64().unwrap_or(0))
    }

    /// Marks a placement broken (a stage failed) so it is re-planned.
    fn placement_failed(&self, placement: &Placement, why: &str) {
        let current = matches!(self.model.state(), ServingState::Ready(p) if p.id == placement.id);
        if current {
            warn!(model = %self.model.name, reason = %why, "stage failed; re-planning");
            self.model.set_state(ServingState::Unavailable(why.to_string()));
            self.broken.notify_one();
        }
    }

    /// Runs one request to completion, sending events to `out`. Returns when it finished,
    /// failed, or `out` closed (the client went away).
    pub async fn generate(self: &Arc<Self>, model: &Arc<ModelEntry>, req: ValidRequest, out: mpsc::Sender<GenEvent>) -> Result<(), ServeError> {
        // While the model moves off cordoned workers, wait for the new placement (bounded).
        let deadline = tokio::time::Instant::now() + self.config.migration_wait;
        while self.moving.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                _ = self.placed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // After a stage was lost, new requests wait (bounded) for the re-plan.
        let deadline = tokio::time::Instant::now() + self.config.replan_wait;
        while matches!(model.state(), ServingState::Unavailable(_))
            && model.ever_ready.load(Ordering::SeqCst)
            && tokio::time::Instant::now() < deadline
        {
            tokio::select! {
                _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                _ = self.placed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // Counted before the state is read, so a re-plan that waits for no request in flight
        // cannot start between the two.
        let in_flight = model.active.fetch_add(1, Ordering::SeqCst);
        let _active = ActiveGuard(model.clone());
        let mut placement = match model.state() {
            ServingState::Ready(p) => p,
            ServingState::Loading(why) => {
                return Err(ServeError::Loading(format!("model {} is still loading: {why}", model.name)))
            }
            ServingState::Unavailable(why) => {
                return Err(ServeError::Unavailable(format!("model {} has no healthy placement: {why}", model.name)))
            }
        };
        if in_flight >= self.config.max_concurrent_requests {
            return Err(ServeError::Exhausted(format!(
                "model {} already has {in_flight} requests in flight (max_concurrent_requests = {})",
                model.name, self.config.max_concurrent_requests
            )));
        }
        let sampling = pb::SamplingParams {
            temperature: Some(req.sampling.temperature),
            top_p: Some(req.sampling.top_p),
            top_k: Some(req.sampling.top_k as i32),
            repetition_penalty: Some(req.sampling.repetition_penalty),
            seed: Some(req.sampling.seed),
        };
        let mut decoder = IncrementalDecoder::new(&req.prompt_ids);
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut generated = 0usize;
        let mut migrations = 0usize;
        // Everything the sequence holds so far: the prompt, then each generated token. A
        // migrated request prefills all of it on its new placement and carries on.
        let mut context = req.prompt_ids.clone();
        // Long prefills go in chunks, so no step carries more than `prefill_chunk` tokens of
        // hidden states between stages.
        let chunk = self.config.prefill_chunk.max(1);
        'attempt: loop {
            let seq_id = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let _release = ReleaseGuard {
                client: placement.release.clone(),
                seq_id,
            };
            let prefill_len = context.len();
            let mut pos = 0usize;
            let mut feed = context[..prefill_len.min(chunk)].to_vec();
            debug!(model = %model.name, seq_id, prefill = prefill_len, migrations, "sequence started");
            loop {
                let step = pb::StepRequest {
                    step_id: seq_id,
                    sequences: vec![pb::SequenceStep {
                        seq_id,
                        token_ids: feed.clone(),
                        start_pos: pos as u32,
                        sampling: (pos == 0).then_some(sampling),
                        logprobs: req.logprobs,
                        prefill_only: pos + feed.len() < prefill_len,
                        epoch: placement.epoch,
                    }],
                    hidden: None,
                };
                let resp = tokio::select! {
                    r = placement.first.step(step, self.config.step_timeout) => r,
                    _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                };
                let outcome: Result<pb::SequenceResult, (tonic::Code, String)> = match resp {
                    Err(status) => Err((status.code(), status.message().to_string())),
                    Ok(resp) => match resp.results.into_iter().find(|r| r.seq_id == seq_id) {
                        None => return Err(ServeError::Internal(format!("stage answer lacks sequence {seq_id}"))),
                        Some(r) if !r.error.is_empty() => Err((tonic::Code::from_i32(r.code), r.error)),
                        Some(r) => Ok(r),
                    },
                };
                let result = match outcome {
                    Ok(r) => r,
                    Err((code, message)) => {
                        if code == tonic::Code::Unavailable {
                            self.placement_failed(&placement, &message);
                            if migrations < self.config.migration_limit {
                                migrations += 1;
                                warn!(model = %model.name, seq_id, error = %message, migrations, "a stage failed; migrating the request");
                                placement = self.next_placement(model, placement.id, &out).await.map_err(|e| match e {
                                    ServeError::Unavailable(m) => ServeError::Unavailable(format!("{message}; migration failed: {m}")),
                                    other => other,
                                })?;
                                continue 'attempt;
                            }
                        }
                        return Err(ServeError::from_stage(code, message));
                    }
                };
                pos += feed.len();
                if pos < prefill_len {
                    let end = prefill_len.min(pos + chunk);
                    feed = context[pos..end].to_vec();
                    continue;
                }
                generated += 1;
                let token = result.token_id;
                context.push(token);
                let mut event = GenEvent {
                    token_ids: vec![token],
                    logprobs: if req.logprobs { vec![result.logprob] } else { Vec::new() },
                    ..Default::default()
                };
                let tok_err = |e: shardserve::Error| ServeError::Internal(e.to_string());
                if model.eos.contains(&token) {
                    let outcome = stops.push(&decoder.flush(&model.tokenizer).map_err(tok_err)?);
                    event.text = outcome.text;
                    if outcome.stopped {
                        event.finish_reason = Some("stop");
                    } else {
                        event.text += &stops.finish();
                        event.finish_reason = Some("eos");
                    }
                } else {
                    let piece = decoder.push(&model.tokenizer, token).map_err(tok_err)?;
                    let outcome = stops.push(&piece);
                    event.text = outcome.text;
                    if outcome.stopped {
                        event.finish_reason = Some("stop");
                    } else if generated >= req.max_new_tokens {
                        let rest = decoder.flush(&model.tokenizer).map_err(tok_err)?;
                        let outcome = stops.push(&rest);
                        event.text += &outcome.text;
                        if outcome.stopped {
                            event.finish_reason = Some("stop");
                        } else {
                            event.text += &stops.finish();
                            event.finish_reason = Some("length");
                        }
                    }
                }
                let done = event.finish_reason.is_some();
                if out.send(event).await.is_err() {
                    return Err(ServeError::Cancelled("the client went away".into()));
                }
                if done {
                    debug!(model = %model.name, seq_id, generated, migrations, "request finished");
                    return Ok(());
                }
                feed = vec![token];
            }
        }
    }

    /// The workers left out of plans.
    pub async fn cordoned(&self) -> std::collections::BTreeSet<String> {
        if let Some((_, cluster)) = &self.etcd {
            let prefix = format!("{}cordoned/", shardserve::membership::prefix(cluster));
            let read = async {
                let mut c = self.etcd_client().await.expect("etcd is configured")?;
                c.get(prefix.as_str(), Some(shardserve::membership::etcd_client::GetOptions::new().with_prefix())).await
            };
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(3), read).await {
                let set: std::collections::BTreeSet<String> = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).map(String::from))
                    .collect();
                *self.cordoned.lock().expect("cordon lock") = set.clone();
                return set;
            }
        }
        self.cordoned.lock().expect("cordon lock").clone()
    }

    /// Cordons (`on`) or uncordons a worker of the fleet.
    pub async fn cordon(&self, id: &str, on: bool) -> Result<(), ServeError> {
        if on && !self.membership.workers().iter().any(|w| w.id == id) {
            return Err(ServeError::NotFound(format!("worker {id:?} is not in the fleet")));
        }
        if let Some((_, cluster)) = &self.etcd {
            let key = format!("{}cordoned/{id}", shardserve::membership::prefix(cluster));
            let write = async {
                let mut c = self.etcd_client().await.expect("etcd is configured")?;
                if on {
                    c.put(key.as_str(), "1", None).await.map(|_| ())
                } else {
                    c.delete(key.as_str(), None).await.map(|_| ())
                }
            };
            match tokio::time::timeout(Duration::from_secs(5), write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ServeError::Unavailable(format!("etcd: {e}"))),
                Err(_) => return Err(ServeError::Unavailable("etcd did not answer within 5 s".into())),
            }
        }
        {
            let mut set = self.cordoned.lock().expect("cordon lock");
            if on {
                set.insert(id.to_string());
            } else {
                set.remove(id);
            }
        }
        info!(worker = %id, cordoned = on, "cordon changed");
        self.broken.notify_one();
        Ok(())
    }

    /// Cordons a worker, lets requests in flight finish, and waits (bounded) until the
    /// placement no longer uses it.
    pub async fn drain(&self, id: &str, within: Duration) -> Result<Vec<StageAssignment>, ServeError> {
        self.cordon(id, true).await?;
        self.evicting.lock().expect("evict lock").insert(id.to_string());
        self.broken.notify_one();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let ServingState::Ready(p) = self.model.state() {
                if !p.stages.iter().any(|s| s.worker_id == id) {
                    self.evicting.lock().expect("evict lock").remove(id);
                    return Ok(p.stages.clone());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.evicting.lock().expect("evict lock").remove(id);
                return Err(ServeError::DeadlineExceeded(format!(
                    "worker {id} still holds part of the model after {within:?} ({} requests in flight)",
                    self.model.active()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded by `migration_wait`) for a placement other than `old` to be ready.
    async fn next_placement(&self, model: &ModelEntry, old: u64, out: &mpsc::Sender<GenEvent>) -> Result<Arc<Placement>, ServeError> {
        let deadline = tokio::time::Instant::now() + self.config.migration_wait;
        loop {
            if let ServingState::Ready(p) = model.state() {
                if p.id != old {
                    return Ok(p);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServeError::Unavailable(format!(
                    "no new placement within {:?}",
                    self.config.migration_wait
                )));
            }
            tokio::select! {
                _ = out.closed() => return Err(ServeError::Cancelled("the client went away".into())),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// Longest a worker may take to load its shard.
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);

/// A placement id no other load in this cluster will pick.
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish().max(1)
}

struct ActiveGuard(Arc<ModelEntry>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frees the sequence on every stage when the request ends, however it ends (a dropped
/// future included).
struct ReleaseGuard {
    client: shardserve_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>,
    seq_id: u64,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let seq_id = self.seq_id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let call = client.release(pb::ReleaseRequest { seq_ids: vec![seq_id] });
                match tokio::time::timeout(Duration::from_secs(3), call).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => debug!(seq_id, error = %e, "release failed"),
                    Err(_) => debug!(seq_id, "release timed out"),
                }
            });
        }
    }
}
