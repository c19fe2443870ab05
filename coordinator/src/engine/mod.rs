//! The serving engine: for each model, its tokenizer and configs, its placement over the fleet
//! (planned, loaded and re-planned when workers come and go), and its scheduler, which admits
//! requests while every stage's KV pool can hold them and runs them all as batched steps through
//! the pipeline (as many steps in flight as the pipeline has stages), detokenizing and stopping
//! each on eos, stop strings or length.

use crate::error::ServeError;
use crate::membership::Membership;
use replicas::base_name;
use shardserve::config::{GenerationConfig, ModelConfig};
use shardserve::stage::StageClient;
use shardserve::tokenizer::{IncrementalDecoder, StopMatcher, Tokenizer};
use shardserve_proto::v1 as pb;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod blocks;
mod config;
mod embed;
mod entry;
pub use embed::{EmbedSpec, Pooling};
mod forward;
pub(crate) use forward::to_event;
pub use forward::{Credential, LeaderRecord, Peers, REQUEST_ID};
mod generate;
mod ha;
mod ops;
mod placing;
mod replicas;
mod scheduler;
mod steps;

pub use config::{EngineConfig, PrefixCacheScope, ReplicaCount};
pub use entry::{ModelEntry, Placement, ServingState, StageAssignment};
pub use generate::RequestHandle;
pub use replicas::workers_per_replica;

/// A request that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: shardserve::sampling::SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// Generate past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// With logprobs: how many most likely alternatives to give per token.
    pub top_logprobs: usize,
    /// No end-of-sequence token before this many are generated.
    pub min_tokens: usize,
    /// An embedding request: nothing is generated; the final-norm hidden states of the prompt
    /// come back pooled.
    pub embed: Option<EmbedSpec>,
    /// Mixed into the prefix cache's block hashes: only requests with the same salt (and the
    /// same tenant) share cached blocks.
    pub cache_salt: String,
    /// Whose prompts it may share (`--prefix-cache-scope per-key`: its API key's digest, in
    /// hex; empty when every client shares).
    pub tenant: String,
    /// Computes its whole prompt and publishes nothing, as with prefix caching off.
    pub skip_prefix_cache: bool,
    /// The caller's API key, passed on when the request is handed to the leader coordinator.
    pub credential: Option<Credential>,
    /// Constrained decoding: the grammar (llguidance's, in JSON) every sampled token follows.
    pub grammar: Option<Arc<str>>,
}

/// Something the request loop produced.
#[derive(Debug, Clone, Default)]
pub struct GenEvent {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Set on the last event.
    pub finish_reason: Option<&'static str>,
    /// An embedding request's pooled vectors (its one event).
    pub embedding: Vec<Vec<f32>>,
    /// With top_logprobs: for each token, the most likely (token, log-probability) pairs.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// On the first event: prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: Option<usize>,
}

/// Resolves the model and reads what the coordinator needs of it (config, generation config,
/// tokenizer), so a bad model fails before anything else starts.
pub fn preflight(config: &EngineConfig) -> anyhow::Result<Prepared> {
    let files = shardserve::hub::resolve_file(&config.model, config.revision.as_deref(), config.gguf_file.as_deref())?;
    let raw = files.config_json()?;
    let cfg = files.config()?;
    let mut shape = shardserve::placement::ModelShape::from_config_json(&raw)?;
    let generation = files.generation()?;
    let tokenizer = files.tokenizer()?;
    // A model without a usable template still serves completions; chat says why it cannot.
    let chat = files.chat_templates(config.name.clone());
    if let Err(e) = &chat {
        tracing::warn!(model = %config.name, error = %e, "the model's chat template cannot be used");
    }
    if config.tp > 1 {
        let tp = shardserve::collective::TpRank { rank: 0, size: config.tp };
        shardserve::collective::tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config.model))?;
    }
    let quantization = match files.gguf()? {
        Some(g) => {
            if let Some(q) = config.quantize {
                anyhow::bail!(
                    "{}: --quantize {q} applies to safetensors checkpoints; {} is already quantized (--dequantize runs it at --dtype)",
                    config.model,
                    g.path().display()
                );
            }
            g.check_tp(&cfg, config.tp).map_err(|e| anyhow::anyhow!("{}: {e}", config.model))?;
            // The planner sizes the projections as the workers will hold them.
            shape.quantized = g.block_types(config.dequantize);
            if config.dequantize {
                String::new()
            } else {
                format!("gguf {}", g.weight_types())
            }
        }
        None => {
            anyhow::ensure!(!config.dequantize, "{}: --dequantize applies to GGUF checkpoints; this one is safetensors", config.model);
            if let Some(q) = config.quantize {
                shardserve::model::check_quantizable(&cfg, config.tp, q)
                    .map_err(|e| anyhow::anyhow!("{}: --quantize {q}: {e}", config.model))?;
                shape = shape.with_projections_in(q.block_type())?;
            }
            config.quantize.map(|q| q.to_string()).unwrap_or_default()
        }
    };
    if let Some(map) = &config.device_map {
        // Checked against worker indices only here; ids are checked once workers join.
        anyhow::ensure!(map.is_object(), "--device-map must hold a JSON object of module → worker");
    }
    Ok(Prepared { files, config: cfg, shape, generation, tokenizer, chat: Arc::new(chat), quantization })
}

/// What [`preflight`] read.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub files: shardserve::hub::ModelFiles,
    pub config: ModelConfig,
    pub shape: shardserve::placement::ModelShape,
    pub generation: GenerationConfig,
    pub tokenizer: Tokenizer,
    pub chat: Arc<Result<shardserve::chat::ChatTemplates, shardserve::chat::ChatError>>,
    /// What the model's projections compute in (see [`ModelEntry::quantization`]).
    pub quantization: String,
}

/// What the engines of one coordinator (one per model) share.
#[derive(Default)]
pub struct Shared {
    /// Workers left out of plans (mirrored in etcd under `cordoned/` when membership is there).
    cordoned: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Workers reserved for a model loaded at run time: worker id → model name.
    pins: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Every engine, so each sees the workers the others use.
    engines: RwLock<Vec<std::sync::Weak<Engine>>>,
    /// The coordinator that leads the cluster (as its election value names it), while known.
    leader: watch::Sender<Option<LeaderRecord>>,
}

impl Shared {
    /// The engines still alive.
    fn engines(&self) -> Vec<Arc<Engine>> {
        self.engines.read().expect("engines lock").iter().filter_map(|e| e.upgrade()).collect()
    }

    /// Wakes every engine's planner (the fleet they may use changed).
    pub fn wake_all(&self) {
        for e in self.engines() {
            e.broken.notify_one();
        }
    }

    /// Waits until no engine is loading a placement it planned before now: after a
    /// reservation, every placement still on a reserved worker is one the engines publish
    /// (and move off), never a load that lands on the worker after its new model's.
    pub async fn settled(&self) {
        for e in self.engines() {
            drop(e.placing.lock().await);
        }
    }

    /// Reserves `ids` for `model`.
    pub fn pin(&self, ids: &[String], model: &str) {
        let mut pins = self.pins.lock().expect("pins lock");
        for id in ids {
            pins.insert(id.clone(), model.to_string());
        }
    }

    /// Frees every worker reserved for `model` or for any of its replicas.
    pub fn unpin_model(&self, model: &str) {
        self.pins.lock().expect("pins lock").retain(|_, m| base_name(m) != model);
    }

    /// Workers reserved for `model` or for any of its replicas.
    pub fn reserved_for_model(&self, model: &str) -> Vec<String> {
        self.pins.lock().expect("pins lock").iter().filter(|(_, m)| base_name(m) == model).map(|(w, _)| w.clone()).collect()
    }

    /// Workers reserved for models other than `model`.
    pub fn pinned_elsewhere(&self, model: &str) -> std::collections::HashSet<String> {
        self.pins.lock().expect("pins lock").iter().filter(|(_, m)| *m != model).map(|(w, _)| w.clone()).collect()
    }

    /// Workers reserved for `model`.
    pub fn pinned_to(&self, model: &str) -> Vec<String> {
        self.pins.lock().expect("pins lock").iter().filter(|(_, m)| *m == model).map(|(w, _)| w.clone()).collect()
    }

    /// Workers that the placements of models other than `model` use, by model (by the key their
    /// workers are reserved under: with replicas, the name and the replica's index).
    pub fn used_elsewhere(&self, model: &str) -> std::collections::HashMap<String, String> {
        let mut out = std::collections::HashMap::new();
        for e in self.engines() {
            let key = e.pin_key();
            if key == model {
                continue;
            }
            if let ServingState::Ready(p) = e.model.state() {
                for st in &p.stages {
                    for (id, _) in st.ranks() {
                        out.insert(id.to_string(), key.clone());
                    }
                }
            }
        }
        out
    }
}

/// The engine.
pub struct Engine {
    config: EngineConfig,
    /// etcd endpoints and cluster name, when membership lives in etcd.
    etcd: Option<(shardserve::membership::Etcd, String)>,
    /// Mod revision of the placement this engine last wrote to etcd.
    placement_rev: std::sync::Mutex<i64>,
    /// Epoch of the placement last written to etcd (0: none), so a failed write is retried.
    published: AtomicU64,
    /// One etcd connection for the engine's own reads and writes, made on first use.
    etcd_client: tokio::sync::Mutex<Option<shardserve::membership::etcd_client::Client>>,
    model: Arc<ModelEntry>,
    membership: Arc<dyn Membership>,
    broken: Notify,
    /// Held by the planner from choosing its workers' final set to publishing the placement
    /// it loaded, so a reservation can wait out a load that began before it.
    placing: tokio::sync::Mutex<()>,
    /// Set while this coordinator is the one that plans.
    leader: std::sync::atomic::AtomicBool,
    /// The term of this coordinator's latest leadership (its election revision; 0 without
    /// etcd): its steps carry it, and the stages refuse steps of older terms.
    term: AtomicU64,
    /// Wakes the planner when leadership is won.
    elected: Notify,
    /// Shared with the other models' engines: cordons, reservations, who uses which worker.
    shared: Arc<Shared>,
    /// Workers that failed to load a shard, left out of plans for a while.
    quarantined: std::sync::Mutex<placing::Quarantine>,
    /// Plans only over workers reserved for this model (a model loaded at run time).
    pinned: bool,
    /// Workers being drained: the model moves off them once requests in flight are done
    /// (mirrors `draining/` in etcd).
    evicting: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Set while the model moves off cordoned workers: new requests wait for the new placement
    /// instead of starting on the old one.
    moving: watch::Sender<bool>,
    /// Requests for the scheduler (bounded by `waiting` and `requests`).
    inbox: mpsc::UnboundedSender<scheduler::Submission>,
    /// Free places in the waiting queue (`max_waiting`).
    waiting: Arc<tokio::sync::Semaphore>,
    /// Free places for requests running or waiting (`max_concurrent_requests`).
    requests: Arc<tokio::sync::Semaphore>,
    next_seq: AtomicU64,
    next_placement: AtomicU64,
    /// Fires when the engine stops (shutdown, or its model unloaded).
    stop: CancellationToken,
    /// The model's replicas, when it has them (every replica's engine shares the set; the
    /// first replica's lays them out and routes requests).
    replicas: Option<Arc<replicas::ReplicaSet>>,
    /// Wakes the replica layout (a scale changed how many are wanted).
    relayout: Notify,
}

impl Engine {
    /// Reads the model's configs and tokenizer (on the coordinator, from the shared cache) and
    /// starts planning as workers join.
    pub async fn start(
        config: EngineConfig,
        membership: Arc<dyn Membership>,
        etcd: Option<(shardserve::membership::Etcd, String)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        Self::start_in(config, membership, etcd, Arc::default(), None, shutdown).await
    }

    /// Starts an engine that shares cordons and workers with others through `shared`. With
    /// `primary` (a model loaded at run time) it plans only over the workers reserved for its
    /// model, and with etcd it leads exactly when the coordinator's own engine does.
    ///
    /// Boxed because a model's first replica starts the others through it.
    pub fn start_in(
        config: EngineConfig,
        membership: Arc<dyn Membership>,
        etcd: Option<(shardserve::membership::Etcd, String)>,
        shared: Arc<Shared>,
        primary: Option<Arc<Engine>>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Arc<Self>>> + Send>> {
        Box::pin(Self::start_boxed(config, membership, etcd, shared, primary, shutdown))
    }

    async fn start_boxed(
        config: EngineConfig,
        membership: Arc<dyn Membership>,
        etcd: Option<(shardserve::membership::Etcd, String)>,
        shared: Arc<Shared>,
        primary: Option<Arc<Engine>>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let replica_set = match (&config.replicas, &primary) {
            (Some(_), Some(p)) if config.replica.is_some() => p.replicas.clone(),
            // The model's own set: a model loaded at run time (`primary` given) is laid out
            // over the workers reserved for it.
            (Some(n), p) if config.replica.is_none() => {
                Some(Arc::new(replicas::ReplicaSet::new(*n, config.router, shutdown.child_token(), p.is_some())))
            }
            _ => None,
        };
        let mut config = config;
        if config.replicas.is_some() && config.replica.is_none() {
            config.replica = Some(0);
        }
        // A replica plans only over the workers the layout reserved for it.
        let pinned = primary.is_some() || config.replica.is_some();
        let prepared = match config.prepared.clone() {
            Some(p) => p,
            None => {
                let c = config.clone();
                let p = Arc::new(tokio::task::spawn_blocking(move || preflight(&c)).await??);
                config.prepared = Some(p.clone());
                p
            }
        };
        let Prepared { files, config: cfg, shape, generation, tokenizer, chat, quantization } = (*prepared).clone();
        let eos = generation.eos_ids(&cfg);
        let max_total_tokens = config.max_total_tokens.map_or(cfg.max_total_tokens, |m| m.min(cfg.max_total_tokens));
        info!(model = %config.name, dir = %files.dir.display(), architecture = cfg.architecture.hf_name(), layers = cfg.num_layers, "model configured");
        let model = Arc::new(ModelEntry {
            name: config.name.clone(),
            eos,
            max_total_tokens,
            dtype: config.dtype,
            quantization,
            config: cfg,
            shape,
            generation,
            tokenizer,
            chat,
            state: watch::Sender::new(ServingState::Loading(format!("waiting for workers: 0 of {}", config.workers))),
            active: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            ever_ready: Default::default(),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            cached_blocks: AtomicUsize::new(0),
            total_blocks: AtomicUsize::new(0),
            free_blocks: AtomicUsize::new(0),
            routed_requests: AtomicUsize::new(0),
            routed_blocks: AtomicUsize::new(0),
            grammars: Default::default(),
        });
        // Built now, off the request path: the first constrained request would otherwise wait
        // for it (hundreds of ms for a large vocabulary) on a runtime thread.
        let prebuild = model.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = prebuild.grammars() {
                debug!(model = %prebuild.name, error = %e, "no grammars for constrained decoding");
            }
        });
        let seed = crate::util::random_u64();
        let etcd_is_none = etcd.is_none();
        let (inbox, submissions) = mpsc::unbounded_channel();
        let (waiting, requests) = (config.max_waiting, config.max_concurrent_requests);
        let engine = Arc::new(Engine {
            config,
            etcd,
            placement_rev: std::sync::Mutex::new(0),
            published: AtomicU64::new(0),
            etcd_client: tokio::sync::Mutex::new(None),
            model,
            membership,
            broken: Notify::new(),
            placing: tokio::sync::Mutex::new(()),
            leader: std::sync::atomic::AtomicBool::new(etcd_is_none),
            term: AtomicU64::new(0),
            elected: Notify::new(),
            shared: shared.clone(),
            quarantined: Default::default(),
            pinned,
            evicting: Default::default(),
            moving: watch::Sender::new(false),
            inbox,
            waiting: Arc::new(tokio::sync::Semaphore::new(waiting)),
            requests: Arc::new(tokio::sync::Semaphore::new(requests)),
            // Ids from a restarted coordinator do not collide with stale ones on workers.
            next_seq: AtomicU64::new(seed & 0x0fff_ffff_ffff_ffff),
            next_placement: AtomicU64::new(1),
            stop: shutdown.clone(),
            replicas: replica_set,
            relayout: Notify::new(),
        });
        shared.engines.write().expect("engines lock").push(Arc::downgrade(&engine));
        if let (Some((_, cluster)), Some(primary)) = (engine.etcd.clone(), primary) {
            // One election per coordinator: this model's engine follows the primary's role.
            let (e, stop) = (Arc::downgrade(&engine), shutdown.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let Some(e) = e.upgrade() else { return };
                    let leading = primary.is_leader();
                    e.term.store(primary.term(), Ordering::SeqCst);
                    if e.leader.swap(leading, Ordering::SeqCst) != leading && leading {
                        e.elected.notify_one();
                    }
                    drop(e);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            });
            tokio::spawn(engine.clone().follow(cluster, shutdown.clone()));
        } else if let Some((etcd, cluster)) = engine.etcd.clone() {
            // Every coordinator serves; the elected one plans and the others follow its plan.
            let e = engine.clone();
            let value = match &engine.config.peers {
                Some(p) => p.record(),
                None => format!("coordinator pid {}", std::process::id()),
            };
            tokio::spawn(shardserve::membership::lead(
                etcd.clone(),
                cluster.clone(),
                value,
                engine.config.lease_ttl,
                move |term| {
                    if let Some(t) = term {
                        e.term.store(t, Ordering::SeqCst);
                    }
                    e.leader.store(term.is_some(), Ordering::SeqCst);
                    if term.is_some() {
                        e.elected.notify_one();
                    }
                },
                shutdown.clone(),
            ));
            tokio::spawn(engine.clone().follow(cluster, shutdown.clone()));
        }
        tokio::spawn(scheduler::run(engine.clone(), submissions, shutdown.clone()));
        if engine.config.replica == Some(0) {
            tokio::spawn(engine.clone().lay_out_replicas(shutdown.clone()));
        }
        tokio::spawn(engine.clone().reconcile(shutdown));
        Ok(engine)
    }

    /// The model this engine serves.
    pub fn entry(&self) -> &Arc<ModelEntry> {
        &self.model
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// What it shares with the other models' engines.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
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
            Err(ServeError::NotFound(format!("model {name:?} is not served here (served: {:?})", self.model.name)))
        }
    }

    /// The key its workers are reserved under: the model's name, or with replicas the name
    /// and the replica's index.
    pub(crate) fn pin_key(&self) -> String {
        match self.config.replica {
            Some(i) => replicas::replica_key(&self.model.name, i),
            None => self.model.name.clone(),
        }
    }

    /// The labels of this engine's metrics: the model, and with replicas the replica.
    pub(crate) fn metric_labels(&self) -> Vec<(&'static str, String)> {
        let mut labels = vec![("model", self.model.name.clone())];
        if let Some(i) = self.config.replica {
            labels.push(("replica", i.to_string()));
        }
        labels
    }

    /// Which replica of its model this engine serves (0 without replicas).
    pub fn replica(&self) -> usize {
        self.config.replica.unwrap_or(0)
    }

    /// Whether this coordinator plans (the elected leader, or the only coordinator).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The term this coordinator schedules under (see the field).
    pub(crate) fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// "leader", "follower" or "standalone".
    pub fn role(&self) -> &'static str {
        match (&self.etcd, self.is_leader()) {
            (None, _) => "standalone",
            (Some(_), true) => "leader",
            (Some(_), false) => "follower",
        }
    }
}
