//! The models a coordinator serves: the one it was started with, and those loaded at run time
//! (`shardctl models load`). Each has its own engine; a model loaded at run time plans only on
//! workers reserved for it, taken from the free workers first and then from the coordinator's
//! own model, which moves off them (once no request is in flight) as it does off a drained
//! worker. Unloading a model gives its workers back.
//!
//! With etcd, the models loaded at run time are kept under `models/<name>` (the request and the
//! workers reserved), written by the leader; every coordinator runs an engine for each, which
//! plans while that coordinator leads and otherwise serves the placement the leader publishes.

use crate::engine::{Engine, EngineConfig, ModelEntry, ReplicaCount, ServingState};
use crate::error::ServeError;
use crate::membership::Membership;
use shardserve_proto::v1 as pb;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A model loaded at run time.
struct Loaded {
    engine: Arc<Engine>,
    stop: CancellationToken,
}

/// A model loaded at run time, as kept in etcd.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    model: String,
    revision: String,
    name: String,
    workers: usize,
    tp: usize,
    dtype: String,
    /// The workers reserved for it.
    pinned: Vec<String>,
    /// Replicas over those workers (`--replicas N|auto`); none: one placement over them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replicas: Option<String>,
    /// The GGUF file of a folder or repo holding several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gguf_file: Option<String>,
    /// A GGUF checkpoint's projections dequantized at load.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    dequantize: bool,
}

/// Every model served here.
pub struct Models {
    primary: Arc<Engine>,
    loaded: Mutex<Vec<Loaded>>,
    membership: Arc<dyn Membership>,
    etcd: Option<(shardserve::membership::Etcd, String)>,
    shutdown: CancellationToken,
    /// One load or unload at a time: each looks at which workers are free.
    changing: tokio::sync::Mutex<()>,
}

/// How long an unload waits for the model's requests in flight.
const UNLOAD_WAIT: Duration = Duration::from_secs(30);

impl Models {
    /// The coordinator's own model (`primary`), and none loaded yet.
    pub fn new(
        primary: Arc<Engine>,
        membership: Arc<dyn Membership>,
        etcd: Option<(shardserve::membership::Etcd, String)>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let models =
            Arc::new(Models { primary, loaded: Mutex::new(Vec::new()), membership, etcd, shutdown, changing: tokio::sync::Mutex::new(()) });
        if models.etcd.is_some() {
            tokio::spawn(models.clone().sync());
        }
        models
    }

    fn records_prefix(&self) -> Option<String> {
        self.etcd.as_ref().map(|(_, cluster)| format!("{}models/", shardserve::membership::prefix(cluster)))
    }

    /// The etcd key of the model loaded at run time as `name`.
    fn record_key(&self, name: &str) -> Option<String> {
        self.records_prefix().map(|prefix| format!("{prefix}{}", name.replace('/', "--")))
    }

    /// The records in etcd, by name.
    async fn records(&self) -> Result<Vec<Record>, ServeError> {
        let prefix = self.records_prefix().unwrap_or_default();
        let opts = shardserve::membership::etcd_client::GetOptions::new().with_prefix();
        let resp = self.primary.etcd_call(|mut c| async move { c.get(prefix, Some(opts)).await }).await?;
        Ok(resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect())
    }

    /// With etcd: keeps an engine running for every model loaded at run time by any
    /// coordinator, and none for the unloaded ones.
    async fn sync(self: Arc<Self>) {
        let mut failed: Vec<Record> = Vec::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Ok(records) = self.records().await else { continue };
            let _one_at_a_time = self.changing.lock().await;
            let running: Vec<String> = self.loaded.lock().expect("models lock").iter().map(|l| l.engine.entry().name.clone()).collect();
            for r in &records {
                if !running.contains(&r.name) && !failed.contains(r) {
                    let started = match self.config_of(r) {
                        Ok(config) => match Self::check(config).await {
                            Ok(config) => self.start_engine(r, config).await,
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    };
                    if let Err(e) = started {
                        tracing::warn!(model = %r.name, error = %e.to_string(), "cannot serve a model loaded elsewhere");
                        failed.push(r.clone());
                    }
                }
            }
            for name in running {
                if !records.iter().any(|r| r.name == name) {
                    self.stop_engine(&name, false).await;
                }
            }
        }
    }

    /// The engine configuration of a model loaded at run time.
    fn config_of(&self, r: &Record) -> Result<EngineConfig, ServeError> {
        let replicas = r.replicas.as_deref().map(str::parse::<ReplicaCount>).transpose().map_err(ServeError::InvalidArgument)?;
        let workers = crate::engine::workers_per_replica(r.workers, r.tp, replicas).map_err(ServeError::InvalidArgument)?;
        Ok(EngineConfig {
            model: r.model.clone(),
            revision: (!r.revision.is_empty()).then(|| r.revision.clone()),
            prepared: None,
            name: r.name.clone(),
            // Checked when the record was made.
            dtype: r.dtype.parse().unwrap_or_default(),
            workers,
            tp: r.tp,
            random_weights: false,
            // The primary's file names a file of its own repo: the record says which.
            gguf_file: r.gguf_file.clone(),
            dequantize: r.dequantize,
            max_memory: None,
            device_map: None,
            // Laid out over the workers reserved for it only.
            replicas,
            replica: None,
            ..self.primary.config().clone()
        })
    }

    /// Reads the model's configs and tokenizer, so a bad model fails before anything starts;
    /// the engine takes what was read.
    async fn check(mut config: EngineConfig) -> Result<EngineConfig, ServeError> {
        let c = config.clone();
        let prepared = tokio::task::spawn_blocking(move || crate::engine::preflight(&c))
            .await
            .map_err(|e| ServeError::Internal(format!("checking the model: {e}")))?
            .map_err(|e| ServeError::InvalidArgument(format!("{}: {e:#}", config.model)))?;
        config.prepared = Some(std::sync::Arc::new(prepared));
        Ok(config)
    }

    /// Starts the engine of a model loaded at run time (`config`, already checked), on the
    /// workers reserved for it.
    async fn start_engine(&self, r: &Record, config: EngineConfig) -> Result<Arc<Engine>, ServeError> {
        let shared = self.primary.shared().clone();
        // With replicas, the layout moves these to each replica's key; spares stay here.
        shared.pin(&r.pinned, &r.name);
        // A placement another model began loading before the reservation ends first: the new
        // model then sees it (and waits for it to move off) instead of loading under it.
        shared.settled().await;
        let stop = self.shutdown.child_token();
        let started =
            Engine::start_in(config, self.membership.clone(), self.etcd.clone(), shared.clone(), Some(self.primary.clone()), stop.clone())
                .await;
        let engine = match started {
            Ok(e) => e,
            Err(e) => {
                shared.unpin_model(&r.name);
                return Err(ServeError::InvalidArgument(format!("{}: {e:#}", r.model)));
            }
        };
        info!(model = %r.name, workers = ?r.pinned, "serving a model loaded at run time");
        self.loaded.lock().expect("models lock").push(Loaded { engine: engine.clone(), stop });
        // The coordinator's own model moves off the reserved workers.
        shared.wake_all();
        Ok(engine)
    }

    /// The engine of the model the coordinator was started with.
    pub fn primary(&self) -> &Arc<Engine> {
        &self.primary
    }

    /// Every engine, the coordinator's own first.
    pub fn engines(&self) -> Vec<Arc<Engine>> {
        let mut all = vec![self.primary.clone()];
        all.extend(self.loaded.lock().expect("models lock").iter().map(|l| l.engine.clone()));
        all
    }

    /// The engine serving `name` (empty: the coordinator's own model).
    pub fn find(&self, name: &str) -> Result<(Arc<Engine>, Arc<ModelEntry>), ServeError> {
        let all = self.engines();
        let found = if name.is_empty() { all.first() } else { all.iter().find(|e| e.entry().name == name) };
        match found {
            Some(e) => Ok((e.clone(), e.entry().clone())),
            None => Err(ServeError::NotFound(format!(
                "model {name:?} is not served here (served: {})",
                all.iter().map(|e| format!("{:?}", e.entry().name)).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The engine whose placement uses worker `id` (the coordinator's own when none does):
    /// a replica's, with replicas.
    pub fn engine_using(&self, id: &str) -> Arc<Engine> {
        self.engines()
            .into_iter()
            .flat_map(|e| e.replica_engines().into_iter().flatten())
            .find(|e| matches!(e.entry().state(), ServingState::Ready(p) if p.stages.iter().any(|s| s.uses(id))))
            .unwrap_or_else(|| self.primary.clone())
    }

    /// Serves another model on workers reserved for it.
    pub async fn load(&self, req: pb::LoadModelRequest) -> Result<pb::LoadModelResponse, ServeError> {
        if self.etcd.is_some() && !self.primary.is_leader() {
            return Err(ServeError::Loading(
                "this coordinator is a follower: load models through the leader (shardctl status shows the role)".into(),
            ));
        }
        if req.model.is_empty() {
            return Err(ServeError::InvalidArgument("model must name a folder or a Hub id".into()));
        }
        let (workers, tp) = (req.workers.max(1) as usize, req.tp.max(1) as usize);
        if !workers.is_multiple_of(tp) {
            return Err(ServeError::InvalidArgument(format!("workers {workers} is not a multiple of tp {tp}")));
        }
        let replicas = match req.replicas.as_str() {
            "" => None,
            r => Some(r.parse::<ReplicaCount>().map_err(ServeError::InvalidArgument)?),
        };
        crate::engine::workers_per_replica(workers, tp, replicas).map_err(ServeError::InvalidArgument)?;
        let name = if req.name.is_empty() { req.model.clone() } else { req.name.clone() };
        let _one_at_a_time = self.changing.lock().await;
        if self.engines().iter().any(|e| e.entry().name == name) {
            return Err(ServeError::InvalidArgument(format!("a model named {name:?} is already served")));
        }
        let mut record = Record {
            model: req.model.clone(),
            revision: req.revision.clone(),
            name: name.clone(),
            workers,
            tp,
            dtype: req.dtype.parse::<shardserve::dtype::Dtype>().map_err(|e| ServeError::InvalidArgument(e.to_string()))?.to_string(),
            pinned: Vec::new(),
            replicas: replicas.map(|r| r.to_string()),
            gguf_file: (!req.gguf_file.is_empty()).then(|| req.gguf_file.clone()),
            dequantize: req.dequantize,
        };
        // Checked before any worker is reserved, so a bad model takes nothing.
        let config = Self::check(self.config_of(&record)?).await?;
        record.pinned = self.choose_workers(workers).await?;
        if let Some(key) = self.record_key(&name) {
            // Kept in etcd first: every coordinator (and a future leader) serves it from there.
            let value = serde_json::to_string(&record).map_err(|e| ServeError::Internal(e.to_string()))?;
            self.primary.etcd_call(|mut c| async move { c.put(key, value, None).await }).await?;
        }
        let engine = self.start_engine(&record, config).await?;
        Ok(pb::LoadModelResponse { model: Some(engine.entry().info()), workers: record.pinned })
    }

    /// Picks `n` workers for a new model: free ones first, then from the coordinator's own
    /// model's placement, which keeps at least one stage.
    async fn choose_workers(&self, n: usize) -> Result<Vec<String>, ServeError> {
        let shared = self.primary.shared();
        let cordoned = self.primary.cordoned().await;
        let reserved = shared.pinned_elsewhere("");
        let used = shared.used_elsewhere("");
        let alive = self.membership.workers();
        let usable: Vec<&pb::WorkerInfo> = alive.iter().filter(|w| !cordoned.contains(&w.id) && !reserved.contains(&w.id)).collect();
        let mut chosen: Vec<String> = usable.iter().filter(|w| !used.contains_key(&w.id)).map(|w| w.id.clone()).take(n).collect();
        let primary = &self.primary.entry().name;
        let mut own: Vec<String> = Vec::new();
        if let ServingState::Ready(p) = self.primary.entry().state() {
            for st in &p.stages {
                own.push(st.worker_id.clone());
                own.extend(st.followers.iter().map(|(id, _)| id.clone()));
            }
        }
        let keep = self.primary.config().tp.max(1);
        let takeable = own.len().saturating_sub(keep);
        let free = chosen.len();
        // The last stages' workers first, so the first stages (and their embeddings) stay.
        chosen.extend(own.iter().rev().take(takeable).take(n - chosen.len().min(n)).cloned());
        if chosen.len() < n {
            return Err(ServeError::Exhausted(format!(
                "the model needs {n} worker(s): {free} are free and {takeable} can be taken from {primary:?}, which keeps {keep}; add workers first (shardctl scale --workers N)",
            )));
        }
        chosen.truncate(n);
        Ok(chosen)
    }

    /// Stops serving `name`: new requests get NOT_FOUND at once, those in flight may finish
    /// (bounded), then its workers drop their shards and go back to the other models.
    pub async fn unload(&self, name: &str) -> Result<Vec<String>, ServeError> {
        let _one_at_a_time = self.changing.lock().await;
        if name == self.primary.entry().name {
            return Err(ServeError::InvalidArgument(format!(
                "{name:?} is the model this coordinator was started with; stop the coordinator to stop serving it"
            )));
        }
        if !self.loaded.lock().expect("models lock").iter().any(|l| l.engine.entry().name == name) {
            return Err(ServeError::NotFound(format!("model {name:?} is not served here")));
        }
        if let Some(key) = self.record_key(name) {
            if !self.primary.is_leader() {
                return Err(ServeError::Loading(
                    "this coordinator is a follower: unload models through the leader (shardctl status shows the role)".into(),
                ));
            }
            self.primary.etcd_call(|mut c| async move { c.delete(key, None).await }).await?;
        }
        Ok(self.stop_engine(name, true).await)
    }

    /// Stops serving `name`; `release`: also wait for its requests and have its workers drop
    /// their shards (the coordinator that unloads it does; the others only stop). Returns the
    /// workers it had reserved.
    async fn stop_engine(&self, name: &str, release: bool) -> Vec<String> {
        let loaded = {
            let mut all = self.loaded.lock().expect("models lock");
            match all.iter().position(|l| l.engine.entry().name == name) {
                Some(i) => all.remove(i),
                None => return Vec::new(),
            }
        };
        let entries: Vec<Arc<ModelEntry>> = loaded.engine.replica_engines().into_iter().flatten().map(|e| e.entry().clone()).collect();
        let deadline = tokio::time::Instant::now() + if release { UNLOAD_WAIT } else { Duration::ZERO };
        while entries.iter().any(|e| e.active() > 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every replica's placement (just the one without replicas).
        let placements: Vec<Arc<crate::engine::Placement>> = loaded
            .engine
            .replica_engines()
            .into_iter()
            .flatten()
            .filter_map(|e| match e.entry().state() {
                ServingState::Ready(p) => Some(p),
                _ => None,
            })
            .collect();
        loaded.stop.cancel();
        let shared = self.primary.shared().clone();
        let workers = shared.reserved_for_model(name);
        for p in placements.iter().filter(|_| release) {
            let mut ranks: Vec<(String, String)> = Vec::new();
            for st in &p.stages {
                ranks.push((st.worker_id.clone(), st.address.clone()));
                ranks.extend(st.followers.iter().cloned());
            }
            for (id, address) in ranks {
                let call = async {
                    let mut c = shardserve::stage::connect(&address, self.primary.config().tls.as_deref()).await?;
                    c.unload(pb::UnloadRequest { epoch: p.epoch }).await
                };
                if let Err(e) = tokio::time::timeout(Duration::from_secs(5), call)
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("timed out")))
                {
                    tracing::debug!(worker = %id, error = %e, "unloading the shard failed");
                }
            }
        }
        for e in &entries {
            e.set_unavailable(format!("model {name} was unloaded"));
        }
        shared.unpin_model(name);
        shared.wake_all();
        info!(model = %name, workers = ?workers, "model unloaded");
        workers
    }
}
