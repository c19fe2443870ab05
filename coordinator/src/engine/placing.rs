//! Placing the model: the reconcile loop that keeps it placed, planning stages over the fleet
//! (accelerate's rules, cordoned, drained and quarantined workers left out), loading every
//! stage's shard, and noticing when a placement is broken or a better one exists.

use super::*;

impl Engine {
    /// Keeps the placement matching the fleet until shutdown.
    pub(super) async fn reconcile(self: Arc<Self>, shutdown: CancellationToken) {
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
            // Other models' workers are not ours to plan on: those reserved for them, and those
            // their placements still use; a model loaded at run time plans only on its own.
            let key = self.pin_key();
            let (elsewhere, used) = (self.shared.pinned_elsewhere(&key), self.shared.used_elsewhere(&key));
            let mine = self.shared.pinned_to(&key);
            let mut workers: Vec<pb::WorkerInfo> = alive
                .iter()
                .filter(|w| !cordoned.contains(&w.id) && !elsewhere.contains(&w.id) && !used.contains_key(&w.id))
                .filter(|w| !self.is_quarantined(w))
                .filter(|w| !self.pinned || mine.contains(&w.id))
                .cloned()
                .collect();
            if let (Some(set), Some(i)) = (&self.replicas, self.config.replica) {
                // A replica's workers in the layout's rank order: tensor-parallel groups are
                // consecutive workers, formed within one node.
                let order = set.layout().replicas.get(i).cloned().unwrap_or_default();
                workers.sort_by_key(|w| order.iter().position(|id| *id == w.id).unwrap_or(usize::MAX));
            }
            if !self.laid_out() {
                // A replica the layout dropped (a scale down, or before the first layout): it
                // takes no new requests (the router passes it over), finishes those it has,
                // then gives up its placement so its workers can go.
                if matches!(self.model.state(), ServingState::Ready(_)) && self.model.active() == 0 {
                    info!(model = %self.model.name, replica = self.replica(), "replica no longer laid out; its placement is released");
                    self.model.set_state(ServingState::Unavailable("this replica is no longer laid out (scaled down)".into()));
                    self.shared.wake_all();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                    _ = self.broken.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            let state = self.model.state();
            let mut healthy = match &state {
                ServingState::Ready(p) => p.stages.iter().all(|s| s.ranks().all(|(id, addr)| alive.iter().any(|w| p.held_by(w, id, addr)))),
                _ => false,
            };
            // A worker joined: re-plan when the plan over the larger fleet differs, once no
            // request is in flight (loading moves layers between workers under them).
            let mut replan_pending = false;
            let mut move_wanted = false;
            if let (true, ServingState::Ready(p)) = (healthy, &state) {
                let on_cordoned = {
                    let draining = self.draining().await;
                    p.stages.iter().any(|s| s.ranks().any(|(id, _)| draining.contains(id) || elsewhere.contains(id)))
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
            self.moving.send_if_modified(|m| std::mem::replace(m, move_wanted) != move_wanted);
            if !healthy {
                // A planned move (the fleet grew, a drain, another model's reservation) is not a
                // loss; a placement whose workers are gone is.
                let planned = matches!(self.model.state(), ServingState::Unavailable(ref why) if why.starts_with("re-planning"));
                if let (ServingState::Ready(p), false) = (&state, planned) {
                    let gone: Vec<&str> = p
                        .stages
                        .iter()
                        .flat_map(|s| s.ranks())
                        .filter(|(id, _)| !alive.iter().any(|w| w.id == *id))
                        .map(|(id, _)| id)
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
                    self.moving.send_if_modified(|m| std::mem::replace(m, false));
                } else {
                    let _placing = self.placing.lock().await;
                    // A reservation made since `workers` was read takes its workers out of
                    // this plan (it waits for this lock before its model loads).
                    let reserved = self.shared.pinned_elsewhere(&key);
                    workers.retain(|w| !reserved.contains(&w.id));
                    match self.load(&workers).await {
                        Ok(p) => {
                            info!(model = %self.model.name, stages = p.stages.len(), "model ready");
                            self.publish(&p).await;
                            self.model.set_state(ServingState::Ready(Arc::new(p)));
                            self.moving.send_if_modified(|m| std::mem::replace(m, false));
                            // Other models may be waiting for workers this plan let go.
                            self.shared.wake_all();
                            backoff = Duration::from_millis(250);
                        }
                        Err(LoadFailure { why, worker: Some(bad), .. })
                            if self.model.ever_ready.load(Ordering::SeqCst) && workers.len() > 1 =>
                        {
                            // The model loaded before, so the checkpoint is fine: this worker is
                            // what failed (a joiner without the model in its cache, say). Leave it
                            // out for a while and place the model over the others again at once.
                            warn!(model = %self.model.name, worker = %bad, error = %why, "a worker failed to load its shard; left out of plans for {QUARANTINE:?}");
                            let instance = workers.iter().find(|w| w.id == bad).map(|w| w.instance.clone()).unwrap_or_default();
                            self.quarantined.lock().expect("quarantine lock").add(bad, instance, std::time::Instant::now() + QUARANTINE);
                            continue;
                        }
                        Err(LoadFailure { why, permanent, .. }) => {
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
                // Cordons and drains may be set through another coordinator: read etcd again.
                _ = tokio::time::sleep(Duration::from_secs(1)), if self.etcd.is_some() => {}
            }
        }
    }

    /// Whether planning over `workers` now gives other stages than `p`.
    fn differs_from_plan(&self, p: &Placement, workers: &[pb::WorkerInfo]) -> bool {
        if workers.iter().all(|w| p.stages.iter().any(|s| s.uses(&w.id))) {
            return false;
        }
        match self.plan(workers) {
            Ok(plan) => {
                let tp = self.config.tp.max(1);
                let new: Vec<(Vec<&str>, Range<usize>)> = plan
                    .iter()
                    .map(|s| (workers[s.worker * tp..(s.worker + 1) * tp].iter().map(|w| w.id.as_str()).collect(), s.layers.clone()))
                    .collect();
                let old: Vec<(Vec<&str>, Range<usize>)> =
                    p.stages.iter().map(|s| (s.ranks().map(|(id, _)| id).collect(), s.layers.clone())).collect();
                new != old
            }
            Err(_) => false,
        }
    }

    /// Which worker holds which layers: the explicit map, or accelerate's strategy over the
    /// workers' budgets. With tensor parallelism the plan is over groups of `tp` consecutive
    /// workers (`StagePlan::worker` is then a group index; workers past the last whole group
    /// are left out).
    pub fn plan(&self, workers: &[pb::WorkerInfo]) -> Result<Vec<shardserve::placement::cluster::StagePlan>, String> {
        use shardserve::placement::{cluster, Device};
        let m = &self.model;
        let tp = self.config.tp.max(1);
        if tp > 1 {
            shardserve::collective::tp_split(
                m.config.num_heads,
                m.config.num_kv_heads,
                m.config.intermediate_size,
                shardserve::collective::TpRank { rank: 0, size: tp },
            )?;
        }
        let groups = workers.len() / tp;
        if groups == 0 {
            return Err(format!("--tp {tp} needs {tp} workers per stage; the fleet has {}", workers.len()));
        }
        if let Some(map) = &self.config.device_map {
            // With tensor parallelism a map names groups, by index or by their rank-0 worker.
            let ids: Vec<String> = (0..groups).map(|g| workers[g * tp].id.clone()).collect();
            return cluster::from_explicit_map(&m.shape, self.dtype_bytes(workers), map, &ids).map_err(|e| e.to_string());
        }
        let budgets: Vec<cluster::WorkerBudget> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let bytes = match &self.config.max_memory {
                    Some(mm) => mm.iter().find(|(d, _)| *d == Device::Index(i as u32)).map_or(0, |(_, b)| *b),
                    None => self.weight_budget(w),
                };
                cluster::WorkerBudget { id: w.id.clone(), bytes }
            })
            .collect();
        // A group holds 1/tp of each layer on every rank (plus replicated norms and embedding):
        // it offers tp times its smallest rank.
        let budgets: Vec<cluster::WorkerBudget> = budgets
            .chunks(tp)
            .take(groups)
            .map(|g| cluster::WorkerBudget {
                id: g[0].id.clone(),
                bytes: g.iter().map(|b| b.bytes).min().unwrap_or(0).saturating_mul(tp as u64),
            })
            .collect();
        cluster::plan(&m.shape, self.dtype_bytes(workers), &budgets, self.config.strategy).map_err(|e| e.to_string())
    }

    /// Bytes of weights `w` may hold: what is free, less the reserve for KV caches and
    /// activations, less an explicit KV pool.
    pub(super) fn weight_budget(&self, w: &pb::WorkerInfo) -> u64 {
        let free: u64 = w.devices.iter().map(|d| d.free_memory).sum();
        let weights = (free as f64 * (1.0 - self.config.reserve)) as u64;
        weights.saturating_sub(self.config.kv_memory.unwrap_or(0))
    }

    /// Bytes per weight as `workers` will hold them: `--dtype auto` is the checkpoint's dtype on
    /// GPU workers and f32 on CPU ones (the widest, when a fleet has both).
    pub(super) fn dtype_bytes(&self, workers: &[pb::WorkerInfo]) -> u64 {
        let checkpoint = self.model.config.checkpoint_dtype.as_deref();
        workers
            .iter()
            .map(|w| {
                let gpu = w.devices.iter().any(|d| d.name != "cpu");
                self.config.dtype.resolve(checkpoint, gpu).size_in_bytes() as u64
            })
            .max()
            .unwrap_or_else(|| self.config.dtype.resolve(checkpoint, false).size_in_bytes() as u64)
    }

    /// Bytes of KV pool to ask of worker `w`: `--kv-memory`, or half the reserve of its free
    /// memory (the other half is left for activations).
    fn kv_memory_for(&self, w: &pb::WorkerInfo) -> u64 {
        self.config.kv_memory.unwrap_or_else(|| {
            let free: u64 = w.devices.iter().map(|d| d.free_memory).sum();
            (free as f64 * self.config.reserve / 2.0) as u64
        })
    }

    /// Plans over `workers` and loads every stage.
    async fn load(&self, workers: &[pb::WorkerInfo]) -> Result<Placement, LoadFailure> {
        // A plan that cannot be made will not improve by retrying with the same fleet.
        let plan = self.plan(workers).map_err(|why| LoadFailure { why, permanent: true, worker: None })?;
        let epoch = crate::util::random_u64();
        let n = plan.len();
        let tp = self.config.tp.max(1);
        let group_of = |g: usize| &workers[g * tp..(g + 1) * tp];
        let mut calls = Vec::new();
        for (i, stage) in plan.iter().enumerate() {
            let group = group_of(stage.worker);
            let next = plan.get(i + 1).map(|s| &group_of(s.worker)[0]);
            let (next_address, next_worker_id) = next.map(|w| (w.address.clone(), w.id.clone())).unwrap_or_default();
            let tp_group = format!("{epoch:016x}-{i}");
            let tp_workers: Vec<String> = group.iter().map(|w| w.id.clone()).collect();
            for (rank, w) in group.iter().enumerate() {
                if tp > 1 && w.collective_address.is_empty() {
                    return Err(LoadFailure {
                        why: format!("worker {} has no collective address; it cannot join a tensor-parallel group", w.id),
                        permanent: true,
                        worker: Some(w.id.clone()),
                    });
                }
                let range = stage.layers.clone();
                let w = w.clone();
                let req = pb::LoadShardRequest {
                    model: self.config.model.clone(),
                    revision: self.config.revision.clone().unwrap_or_default(),
                    dtype: self.config.dtype.to_string(),
                    stage: i as u32,
                    num_stages: n as u32,
                    layer_start: range.start as u32,
                    layer_end: range.end as u32,
                    next_address: next_address.clone(),
                    next_worker_id: next_worker_id.clone(),
                    epoch,
                    tp_rank: rank as u32,
                    tp_size: tp as u32,
                    tp_group: if tp > 1 { tp_group.clone() } else { String::new() },
                    tp_leader: if tp > 1 { group[0].collective_address.clone() } else { String::new() },
                    tp_workers: if tp > 1 { tp_workers.clone() } else { Vec::new() },
                    random_weights: self.config.random_weights,
                    kv_memory: self.kv_memory_for(&w),
                    kv_block_size: self.config.kv_block_size as u32,
                    quantize: self.config.quantize.map(|q| q.to_string()).unwrap_or_default(),
                    gguf_file: self.config.gguf_file.clone().unwrap_or_default(),
                    dequantize: self.config.dequantize,
                };
                let tls = self.config.tls.clone();
                calls.push(async move {
                    let failed = |why: String, permanent: bool| LoadFailure { why, permanent, worker: Some(w.id.clone()) };
                    let mut client = shardserve::stage::connect(&w.address, tls.as_deref())
                        .await
                        .map_err(|e| failed(format!("worker {}: {}", w.id, e.message()), false))?;
                    let resp = tokio::time::timeout(LOAD_TIMEOUT, client.load_shard(req))
                        .await
                        .map_err(|_| failed(format!("loading stage {i} on worker {} took longer than {LOAD_TIMEOUT:?}", w.id), false))?
                        .map_err(|e| {
                            let permanent =
                                matches!(e.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::InvalidArgument);
                            failed(format!("loading stage {i} on worker {}: {}", w.id, e.message()), permanent)
                        })?
                        .into_inner();
                    Ok::<_, LoadFailure>((
                        i,
                        rank,
                        StageAssignment {
                            worker_id: w.id.clone(),
                            address: w.address.clone(),
                            layers: range.clone(),
                            bytes: resp.bytes,
                            followers: Vec::new(),
                            kv_blocks: resp.kv_blocks as usize,
                            kv_block_size: resp.kv_block_size as usize,
                        },
                    ))
                });
            }
        }
        // The first failure ends the load at once (the ranks of a group would otherwise wait for
        // a peer that is not coming).
        let loaded = futures::future::try_join_all(calls).await?;
        let mut stages: Vec<StageAssignment> = Vec::with_capacity(n);
        for (i, rank, a) in loaded {
            if rank == 0 {
                debug_assert_eq!(stages.len(), i);
                stages.push(a);
            } else {
                // Every rank runs the same steps: the stage holds what its smallest pool holds.
                stages[i].kv_blocks = stages[i].kv_blocks.min(a.kv_blocks);
                stages[i].followers.push((a.worker_id, a.address));
            }
        }
        let mut placement = self.placement_of(stages, epoch).map_err(|why| LoadFailure { why, permanent: true, worker: None })?;
        // The processes the shards were loaded on: one restarted under the same id and address
        // holds nothing, and the placement is broken from the moment it registers again.
        placement.instances = workers
            .iter()
            .filter(|w| !w.instance.is_empty() && placement.stages.iter().any(|s| s.uses(&w.id)))
            .map(|w| (w.id.clone(), w.instance.clone()))
            .collect();
        Ok(placement)
    }

    /// A placement over stages already loaded: the stream into stage 0 and its release client.
    pub(super) fn placement_of(&self, stages: Vec<StageAssignment>, epoch: u64) -> Result<Placement, String> {
        let head = stages.first().ok_or("a placement needs at least one stage")?;
        let tls = self.config.tls.clone();
        let release = shardserve::stage::lazy_client(&head.address, tls.as_deref()).map_err(|e| e.message().to_string())?;
        let first = Arc::new(StageClient::new(head.worker_id.clone(), head.address.clone(), tls));
        Ok(Placement {
            stages,
            epoch,
            first,
            release,
            id: self.next_placement.fetch_add(1, Ordering::Relaxed),
            instances: Default::default(),
        })
    }

    /// Whether worker `w` failed to load a shard lately and is left out of plans. A worker
    /// restarted under the same id is a new process (a new `instance`): it is not.
    pub(super) fn is_quarantined(&self, w: &pb::WorkerInfo) -> bool {
        self.quarantined.lock().expect("quarantine lock").holds(w, std::time::Instant::now())
    }

    /// Marks a placement broken (a stage failed) so it is re-planned.
    pub(super) fn placement_failed(&self, placement: &Placement, why: &str) {
        let current = matches!(self.model.state(), ServingState::Ready(p) if p.id == placement.id);
        if current {
            warn!(model = %self.model.name, reason = %why, "stage failed; re-planning");
            self.model.set_state(ServingState::Unavailable(why.to_string()));
            self.broken.notify_one();
        }
    }
}

/// Why a placement could not be loaded.
struct LoadFailure {
    why: String,
    /// Retrying with the same fleet will fail the same way.
    permanent: bool,
    /// The worker that failed, when one did.
    worker: Option<String>,
}

/// How long a worker that failed to load a shard of a model that loads elsewhere is left out.
const QUARANTINE: Duration = Duration::from_secs(60);

/// Workers left out of plans after failing to load a shard: by id, with the process (its
/// `instance`) that failed and until when. The same id restarted is a new process, planned at
/// once.
#[derive(Default)]
pub(super) struct Quarantine(std::collections::HashMap<String, (String, std::time::Instant)>);

impl Quarantine {
    pub(super) fn add(&mut self, id: String, instance: String, until: std::time::Instant) {
        self.0.insert(id, (instance, until));
    }

    /// Whether `w` is left out at `now` (forgetting those whose time is up).
    pub(super) fn holds(&mut self, w: &pb::WorkerInfo, now: std::time::Instant) -> bool {
        self.0.retain(|_, (_, until)| *until > now);
        // A worker that reports no instance cannot be told apart from its old process.
        self.0.get(&w.id).is_some_and(|(instance, _)| instance.is_empty() || *instance == w.instance)
    }
}

/// Longest a worker may take to load its shard.
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);

#[cfg(test)]
mod quarantine_tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn worker(id: &str, instance: &str) -> pb::WorkerInfo {
        pb::WorkerInfo { id: id.into(), instance: instance.into(), ..Default::default() }
    }

    #[test]
    fn a_failed_worker_is_left_out_until_its_time_is_up_or_it_restarts() {
        let now = Instant::now();
        let mut q = Quarantine::default();
        q.add("w1".into(), "a".into(), now + Duration::from_secs(60));
        assert!(q.holds(&worker("w1", "a"), now));
        assert!(!q.holds(&worker("w2", "a"), now));
        // The same id from a new process is planned on at once.
        assert!(!q.holds(&worker("w1", "b"), now));
        // The old process, after the minute, too.
        assert!(!q.holds(&worker("w1", "a"), now + Duration::from_secs(61)));
        // Without an instance, the id alone decides.
        q.add("w3".into(), String::new(), now + Duration::from_secs(60));
        assert!(q.holds(&worker("w3", "c"), now));
    }
}
