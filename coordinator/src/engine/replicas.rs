//! Replicas of one model (`--replicas`): each a placement of its own (stages × tp workers) with
//! its own scheduler and KV pools, served by an engine of its own. The first replica's engine
//! is the model's engine as the rest of the coordinator sees it; it lays the replicas out over
//! the fleet (`shardserve::placement::replicas`: tensor-parallel groups within a node, replicas
//! spread over nodes, spares for the rest), reserves each replica's workers for its engine, and
//! routes every request to one replica (`crate::router`: by the prefix each replica caches and
//! by load). A worker lost costs only its replica: that replica's engine re-plans (or its
//! requests migrate or fail as with one placement) while the others go on serving.

use super::*;
use crate::router::{PrefixIndex, ReplicaLoad, Router};
use shardserve::placement::replicas::{self as layout, Shape, Slot, Wanted};
use shardserve::prefix::BlockHash;

/// Where each replica's scheduler publishes the blocks it caches, for the router to look up.
pub(crate) type SharedIndex = Arc<std::sync::Mutex<PrefixIndex<BlockHash>>>;

/// The replicas of the model of the engine that holds this.
pub(crate) struct ReplicaSet {
    /// The engines of replicas 1.. (replica 0 is the engine holding the set), by index.
    engines: RwLock<Vec<Option<Arc<Engine>>>>,
    /// Each replica's workers in rank order, as last laid out.
    layout: std::sync::Mutex<layout::Layout>,
    /// How many are wanted now (`--replicas`, changed by `shardctl scale`).
    wanted: std::sync::Mutex<ReplicaCount>,
    pub(crate) index: SharedIndex,
    router: std::sync::Mutex<Router>,
    /// Stops the engines of replicas 1.. (with the coordinator, or when their model goes).
    stop: CancellationToken,
    /// Laid out only over the workers reserved for the model (one loaded at run time), not
    /// over the free fleet.
    reserved: bool,
}

impl ReplicaSet {
    pub(crate) fn new(wanted: ReplicaCount, policy: crate::router::RouterPolicy, stop: CancellationToken, reserved: bool) -> Self {
        ReplicaSet {
            engines: RwLock::new(Vec::new()),
            layout: Default::default(),
            wanted: std::sync::Mutex::new(wanted),
            index: Arc::new(std::sync::Mutex::new(PrefixIndex::new(1))),
            router: std::sync::Mutex::new(Router::new(policy)),
            stop,
            reserved,
        }
    }

    /// The workers of each replica and the spares, as last laid out.
    pub(crate) fn layout(&self) -> layout::Layout {
        self.layout.lock().expect("layout lock").clone()
    }

    /// How many replicas are wanted.
    pub(crate) fn wanted(&self) -> ReplicaCount {
        *self.wanted.lock().expect("wanted lock")
    }

    /// Asks for `n` replicas from now on (`shardctl scale`).
    pub(crate) fn set_wanted(&self, n: ReplicaCount) {
        *self.wanted.lock().expect("wanted lock") = n;
    }
}

/// Workers each replica takes, from `--workers` (all replicas together), `--tp` and
/// `--replicas`: without replicas, all of them; `N`, an Nth of them, in whole tensor-parallel
/// groups; `auto`, found from the fleet (the first replica waits for one group).
pub fn workers_per_replica(workers: usize, tp: usize, replicas: Option<ReplicaCount>) -> Result<usize, String> {
    let tp = tp.max(1);
    match replicas {
        None => Ok(workers),
        Some(ReplicaCount::Auto) => Ok(tp),
        Some(ReplicaCount::Count(n)) => {
            if !workers.is_multiple_of(n) || workers / n == 0 {
                return Err(format!("--workers {workers} cannot be split into --replicas {n} of equal size: give --workers as replicas × workers per replica"));
            }
            let per = workers / n;
            if !per.is_multiple_of(tp) {
                return Err(format!("each of the {n} replicas gets {per} workers, not a multiple of --tp {tp}"));
            }
            Ok(per)
        }
    }
}

/// The key workers are reserved under for replica `i` of `model`.
pub(crate) fn replica_key(model: &str, i: usize) -> String {
    format!("{model}#{i}")
}

/// The model a reservation key is for: `model` for `model#i` (a replica's) and for `model`.
pub(crate) fn base_name(key: &str) -> &str {
    match key.rsplit_once('#') {
        Some((model, i)) if i.parse::<usize>().is_ok() => model,
        _ => key,
    }
}

impl Engine {
    /// The engines of every replica, by index (`None` where a replica has no engine yet);
    /// just this engine when the model has no replicas.
    pub fn replica_engines(self: &Arc<Self>) -> Vec<Option<Arc<Engine>>> {
        match &self.replicas {
            Some(set) if self.config.replica == Some(0) => {
                let mut out = vec![Some(self.clone())];
                out.extend(set.engines.read().expect("replicas lock").iter().skip(1).cloned());
                out
            }
            _ => vec![Some(self.clone())],
        }
    }

    /// The replicas' workers and the spares, as last laid out (`None` without replicas).
    pub fn replica_layout(&self) -> Option<layout::Layout> {
        self.replicas.as_ref().map(|s| s.layout())
    }

    /// With `--replicas N`: how many workers each replica takes, so that `scale --workers W`
    /// asks for W / that many replicas. `None` without replicas or with `auto` (which follows
    /// the fleet by itself).
    pub fn workers_per_replica(&self) -> Option<usize> {
        match self.replicas.as_ref()?.wanted() {
            ReplicaCount::Count(_) => Some(self.config.workers.max(1)),
            ReplicaCount::Auto => None,
        }
    }

    /// Asks for `n` replicas from now on (`shardctl scale`), and lays them out again at once.
    pub fn set_replicas(&self, n: usize) {
        if let Some(set) = &self.replicas {
            if !matches!(set.wanted(), ReplicaCount::Auto) {
                set.set_wanted(ReplicaCount::Count(n.max(1)));
                self.relayout.notify_one();
            }
        }
    }

    /// Whether this engine's replica is laid out over some workers (always, without replicas).
    pub(super) fn laid_out(&self) -> bool {
        match (&self.replicas, self.config.replica) {
            (Some(set), Some(i)) => set.layout().replicas.get(i).is_some_and(|w| !w.is_empty()),
            _ => true,
        }
    }

    /// Workers one replica takes: stages × tp.
    fn replica_shape(&self, fleet: &[pb::WorkerInfo]) -> Option<Shape> {
        let tp = self.config.tp.max(1);
        let per = match self.replicas.as_ref().map(|s| s.wanted()) {
            Some(ReplicaCount::Auto) => {
                // The fewest workers whose budgets hold the weights, as accelerate fills them.
                let sizes = shardserve::placement::sizes::module_sizes(&self.model.shape, self.dtype_bytes(fleet)).ok()?;
                let budgets: Vec<u64> = fleet.iter().map(|w| self.weight_budget(w)).collect();
                layout::fewest_workers(sizes.total(), &budgets, tp)?
            }
            _ => self.config.workers.max(tp),
        };
        Some(Shape { stages: per / tp, tp })
    }

    /// On the leader (or the only coordinator): keeps the replicas laid out over the fleet
    /// until shutdown, starting an engine for each replica as it forms.
    pub(super) async fn lay_out_replicas(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(set) = self.replicas.clone() else { return };
        let mut changes = self.membership.changes();
        loop {
            if self.is_leader() {
                self.apply_layout(&set).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                _ = self.elected.notified() => {}
                _ = self.relayout.notified() => {}
                // Cordons and drains may change without the fleet changing.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Lays the replicas out over the fleet as it is now, reserves their workers and starts the
    /// engines of new replicas.
    async fn apply_layout(self: &Arc<Self>, set: &Arc<ReplicaSet>) {
        let name = self.model.name.clone();
        let cordoned = self.cordoned().await;
        let draining = self.draining().await;
        // Workers of other models are not ours; neither are cordoned or draining ones.
        let others: std::collections::HashSet<String> = {
            let pins = self.shared.pins.lock().expect("pins lock");
            pins.iter().filter(|(_, m)| base_name(m) != name).map(|(w, _)| w.clone()).collect()
        };
        let used: std::collections::HashSet<String> =
            self.shared.used_elsewhere("").into_iter().filter(|(_, key)| base_name(key) != name).map(|(w, _)| w).collect();
        // A model loaded at run time is laid out over the workers reserved for it only.
        let mine: std::collections::HashSet<String> = match set.reserved {
            true => self.shared.reserved_for_model(&name).into_iter().collect(),
            false => Default::default(),
        };
        let fleet: Vec<pb::WorkerInfo> = self
            .membership
            .workers()
            .into_iter()
            .filter(|w| !cordoned.contains(&w.id) && !draining.contains(&w.id) && !others.contains(&w.id) && !used.contains(&w.id))
            .filter(|w| !set.reserved || mine.contains(&w.id))
            .filter(|w| !self.is_quarantined(w))
            .collect();
        let Some(shape) = self.replica_shape(&fleet) else {
            return;
        };
        let wanted = match set.wanted() {
            ReplicaCount::Count(n) => Wanted::Count(n),
            ReplicaCount::Auto => Wanted::Auto,
        };
        let slots: Vec<Slot> = fleet.iter().map(|w| Slot { id: w.id.clone(), node: w.node.clone() }).collect();
        let current = set.layout().replicas;
        let new = layout::layout(&slots, &current, shape, wanted);
        if new == set.layout() && set.engines.read().expect("replicas lock").len() >= new.replicas.len() {
            return;
        }
        info!(model = %name, replicas = new.replicas.iter().filter(|r| !r.is_empty()).count(), spares = new.spares.len(), layout = ?new.replicas, "replicas laid out");
        {
            let mut pins = self.shared.pins.lock().expect("pins lock");
            pins.retain(|_, m| base_name(m) != name);
            for (i, workers) in new.replicas.iter().enumerate() {
                for w in workers {
                    pins.insert(w.clone(), replica_key(&name, i));
                }
            }
            if set.reserved {
                // A model loaded at run time keeps its spares reserved.
                for w in &new.spares {
                    pins.insert(w.clone(), name.clone());
                }
            }
        }
        // Each replica's workers in rank order, for its engine to plan over.
        let count = new.replicas.len().max(1);
        *set.layout.lock().expect("layout lock") = new;
        set.index.lock().expect("index lock").grow(count);
        let missing: Vec<usize> = {
            let engines = set.engines.read().expect("replicas lock");
            (1..count).filter(|&i| engines.get(i).is_none_or(|e| e.is_none())).collect()
        };
        for i in missing {
            let config = EngineConfig { replica: Some(i), ..self.config.clone() };
            match Engine::start_in(
                config,
                self.membership.clone(),
                self.etcd.clone(),
                self.shared.clone(),
                Some(self.clone()),
                set.stop.clone(),
            )
            .await
            {
                Ok(e) => {
                    let mut engines = set.engines.write().expect("replicas lock");
                    if engines.len() <= i {
                        engines.resize(i + 1, None);
                    }
                    engines[i] = Some(e);
                }
                Err(e) => warn!(model = %name, replica = i, error = %e, "cannot start the engine of a replica"),
            }
        }
        self.shared.wake_all();
    }

    /// The replica a request goes to, and what it adds to that replica's load until it ends:
    /// among the replicas serving, the router's pick by the prefix each caches and by load;
    /// while none serves, the first with workers (whose own admission then waits for its
    /// placement, or says why it cannot).
    pub(super) fn route(self: &Arc<Self>, req: &ValidRequest) -> (Arc<Engine>, Option<Routed>) {
        let Some(set) = &self.replicas else { return (self.clone(), None) };
        let engines = self.replica_engines();
        let laid_out = set.layout().replicas;
        // A replica serves when its placement is ready, it is not moving, and it is still laid
        // out (one dropped by a scale down finishes what it has and takes nothing new).
        let serving: Vec<Option<&Arc<Engine>>> = engines
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_ref()
                    .filter(|e| matches!(e.model.state(), ServingState::Ready(_)) && !*e.moving.borrow())
                    .filter(|_| laid_out.get(i).is_some_and(|w| !w.is_empty()))
            })
            .collect();
        let block_size = self.config.kv_block_size.max(1);
        let blocks = (req.prompt_ids.len() + req.max_new_tokens).div_ceil(block_size);
        if serving.iter().all(|e| e.is_none()) {
            let first = (0..engines.len()).find(|&i| laid_out.get(i).is_some_and(|r| !r.is_empty()));
            let target = first.and_then(|i| engines[i].clone()).unwrap_or_else(|| self.clone());
            let routed = Routed::new(&target.model, blocks);
            return (target, Some(routed));
        }
        let chain = match super::scheduler::prefix_root(&self.config, &self.model, req) {
            // Only whole blocks, and never the last token, are ever reused.
            Some(root) => {
                let usable = req.prompt_ids.len().saturating_sub(1) / block_size * block_size;
                shardserve::prefix::chain(&root, &req.prompt_ids[..usable], block_size)
            }
            None => Vec::new(),
        };
        let mut overlaps = set.index.lock().expect("index lock").overlaps(&chain);
        overlaps.resize(engines.len(), 0);
        // One pick at a time, so that each sees the load of the ones before it.
        let mut router = set.router.lock().expect("router lock");
        let loads: Vec<ReplicaLoad> = serving
            .iter()
            .map(|e| match e {
                Some(e) => {
                    let m = &e.model;
                    let (requests, held) = (m.routed_requests.load(Ordering::SeqCst), m.routed_blocks.load(Ordering::SeqCst));
                    let total = m.total_blocks.load(Ordering::SeqCst);
                    let running = m.active().min(requests);
                    ReplicaLoad {
                        waiting: requests - running,
                        running,
                        active_blocks: held,
                        // Cached blocks no request holds count as free.
                        free_blocks: total.saturating_sub(held),
                        available: true,
                    }
                }
                None => ReplicaLoad { waiting: 0, running: 0, active_blocks: 0, free_blocks: 0, available: false },
            })
            .collect();
        let pick = router.pick(blocks, &overlaps, &loads);
        let target = pick.and_then(|i| engines.get(i).cloned().flatten()).unwrap_or_else(|| self.clone());
        let routed = Routed::new(&target.model, blocks);
        drop(router);
        debug!(model = %self.model.name, replica = target.replica(), overlap_blocks = pick.map_or(0, |i| overlaps[i]), "request routed");
        (target, Some(routed))
    }
}

/// What a routed request adds to its replica's load, taken off when it ends.
pub(crate) struct Routed {
    model: Arc<ModelEntry>,
    blocks: usize,
}

impl Routed {
    fn new(model: &Arc<ModelEntry>, blocks: usize) -> Self {
        model.routed_requests.fetch_add(1, Ordering::SeqCst);
        model.routed_blocks.fetch_add(blocks, Ordering::SeqCst);
        Routed { model: model.clone(), blocks }
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.model.routed_requests.fetch_sub(1, Ordering::SeqCst);
        self.model.routed_blocks.fetch_sub(self.blocks, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_split_evenly_into_replicas_of_whole_groups() {
        assert_eq!(workers_per_replica(4, 1, None), Ok(4));
        assert_eq!(workers_per_replica(4, 1, Some(ReplicaCount::Count(2))), Ok(2));
        assert_eq!(workers_per_replica(8, 2, Some(ReplicaCount::Count(2))), Ok(4));
        assert_eq!(workers_per_replica(8, 2, Some(ReplicaCount::Auto)), Ok(2));
        let e = workers_per_replica(5, 1, Some(ReplicaCount::Count(2))).unwrap_err();
        assert!(e.contains("--workers 5") && e.contains("--replicas 2"), "{e}");
        assert!(workers_per_replica(1, 1, Some(ReplicaCount::Count(2))).is_err());
        let e = workers_per_replica(6, 2, Some(ReplicaCount::Count(2))).unwrap_err();
        assert!(e.contains("3 workers") && e.contains("--tp 2"), "{e}");
    }

    #[test]
    fn reservation_keys_name_their_model() {
        assert_eq!(base_name(&replica_key("qwen", 3)), "qwen");
        assert_eq!(base_name("qwen"), "qwen");
        assert_eq!(base_name("a#b"), "a#b");
        assert_eq!(base_name(&replica_key("a#b", 0)), "a#b");
    }

    #[test]
    fn replicas_parse_from_a_number_or_auto() {
        assert_eq!("3".parse::<ReplicaCount>(), Ok(ReplicaCount::Count(3)));
        assert_eq!("auto".parse::<ReplicaCount>(), Ok(ReplicaCount::Auto));
        for bad in ["0", "-1", "two", ""] {
            assert!(bad.parse::<ReplicaCount>().unwrap_err().contains("--replicas"), "{bad}");
        }
    }
}
