//! The models a coordinator serves: the one it was started with, and those loaded at run time
//! (`shardctl models load`). Each has its own engine; a model loaded at run time plans only on
//! workers reserved for it, taken from the free workers first and then from the coordinator's
//! own model, which moves off them (once no request is in flight) as it does off a drained
//! worker. Unloading a model gives its workers back.

use crate::engine::{Engine, EngineConfig, ModelEntry, ServingState};
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

/// Every model served here.
pub struct Models {
    primary: Arc<Engine>,
    loaded: Mutex<Vec<Loaded>>,
    membership: Arc<dyn Membership>,
    etcd: bool,
    shutdown: CancellationToken,
    /// One load or unload at a time: each looks at which workers are free.
    changing: tokio::sync::Mutex<()>,
}

/// How long an unload waits for the model's requests in flight.
const UNLOAD_WAIT: Duration = Duration::from_secs(30);

impl Models {
    /// The coordinator's own model (`primary`), and none loaded yet.
    pub fn new(primary: Arc<Engine>, membership: Arc<dyn Membership>, etcd: bool, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Models {
            primary,
            loaded: Mutex::new(Vec::new()),
            membership,
            etcd,
            shutdown,
            changing: tokio::sync::Mutex::new(()),
        })
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
        let found = if name.is_empty() {
            all.first()
        } else {
            all.iter().find(|e| e.entry().name == name)
        };
        match found {
            Some(e) => Ok((e.clone(), e.entry().clone())),
            None => Err(ServeError::NotFound(format!(
                "model {name:?} is not served here (served: {})",
                all.iter().map(|e| format!("{:?}", e.entry().name)).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The engine whose placement uses worker `id` (the coordinator's own when none does).
    pub fn engine_using(&self, id: &str) -> Arc<Engine> {
        self.engines()
            .into_iter()
            .find(|e| matches!(e.entry().state(), ServingState::Ready(p) if p.stages.iter().any(|s| s.uses(id))))
            .unwrap_or_else(|| self.primary.clone())
    }

    /// Serves another model on workers reserved for it.
    pub async fn load(&self, req: pb::LoadModelRequest) -> Result<pb::LoadModelResponse, ServeError> {
        if self.etcd {
            return Err(ServeError::Loading(
                "loading models at run time needs embedded membership in this version (with etcd, start a coordinator per model)".into(),
            ));
        }
        if req.model.is_empty() {
            return Err(ServeError::InvalidArgument("model must name a folder or a Hub id".into()));
        }
        let (workers, tp) = (req.workers.max(1) as usize, req.tp.max(1) as usize);
        if !workers.is_multiple_of(tp) {
            return Err(ServeError::InvalidArgument(format!("workers {workers} is not a multiple of tp {tp}")));
        }
        let name = if req.name.is_empty() { req.model.clone() } else { req.name.clone() };
        let _one_at_a_time = self.changing.lock().await;
        if self.engines().iter().any(|e| e.entry().name == name) {
            return Err(ServeError::InvalidArgument(format!("a model named {name:?} is already served")));
        }
        let config = EngineConfig {
            model: req.model.clone(),
            revision: (!req.revision.is_empty()).then(|| req.revision.clone()),
            name: name.clone(),
            dtype: if req.dtype.is_empty() { "auto".into() } else { req.dtype.clone() },
            workers,
            tp,
            random_weights: false,
            max_memory: None,
            device_map: None,
            ..self.primary.config().clone()
        };
        let c = config.clone();
        tokio::task::spawn_blocking(move || crate::engine::preflight(&c))
            .await
            .map_err(|e| ServeError::Internal(format!("checking the model: {e}")))?
            .map_err(|e| ServeError::InvalidArgument(format!("{}: {e:#}", req.model)))?;
        let chosen = self.choose_workers(workers).await?;
        let shared = self.primary.shared().clone();
        shared.pin(&chosen, &name);
        let stop = self.shutdown.child_token();
        let engine = match Engine::start_in(config, self.membership.clone(), None, shared.clone(), true, stop.clone()).await {
            Ok(e) => e,
            Err(e) => {
                shared.unpin(&name);
                return Err(ServeError::InvalidArgument(format!("{}: {e:#}", req.model)));
            }
        };
        info!(model = %name, workers = ?chosen, "model loaded at run time");
        let info = crate::service::model_info(engine.entry());
        self.loaded.lock().expect("models lock").push(Loaded { engine, stop });
        // The coordinator's own model moves off the reserved workers.
        shared.wake_all();
        Ok(pb::LoadModelResponse { model: Some(info), workers: chosen })
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
        let loaded = {
            let mut all = self.loaded.lock().expect("models lock");
            let i = all.iter().position(|l| l.engine.entry().name == name).ok_or_else(|| {
                ServeError::NotFound(format!("model {name:?} is not served here"))
            })?;
            all.remove(i)
        };
        let entry = loaded.engine.entry().clone();
        let deadline = tokio::time::Instant::now() + UNLOAD_WAIT;
        while entry.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loaded.stop.cancel();
        let shared = self.primary.shared().clone();
        let workers = shared.pinned_to(name);
        if let ServingState::Ready(p) = entry.state() {
            let mut ranks: Vec<(String, String)> = Vec::new();
            for st in &p.stages {
                ranks.push((st.worker_id.clone(), st.address.clone()));
                ranks.extend(st.followers.iter().cloned());
            }
            for (id, address) in ranks {
                let call = async {
                    let mut c = shardserve::stage::connect(&address).await?;
                    c.unload(pb::UnloadRequest { epoch: p.epoch }).await
                };
                if let Err(e) = tokio::time::timeout(Duration::from_secs(5), call).await.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("timed out"))) {
                    tracing::debug!(worker = %id, error = %e, "unloading the shard failed");
                }
            }
        }
        entry.set_unavailable(format!("model {name} was unloaded"));
        shared.unpin(name);
        shared.wake_all();
        info!(model = %name, workers = ?workers, "model unloaded");
        Ok(workers)
    }
}
