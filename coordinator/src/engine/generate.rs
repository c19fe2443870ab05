//! A request's way in: a bounded wait while the model moves or is placed again, the checks
//! against its KV pools and the queue bounds, and the handle the caller reads it through.

use super::scheduler::Submission;
use super::*;
use tokio::sync::oneshot;

/// A request handed to the scheduler: its events as they come, then how it ended. Dropping
/// it cancels the request (its sequence leaves at the next step and its KV is freed).
pub struct RequestHandle {
    /// The request's id (log lines on every process carry it).
    pub id: String,
    events: mpsc::Receiver<GenEvent>,
    done: oneshot::Receiver<Result<(), ServeError>>,
}

impl RequestHandle {
    /// A handle reading `events`, then how the request ended from `done`.
    pub(crate) fn new(id: String, events: mpsc::Receiver<GenEvent>, done: oneshot::Receiver<Result<(), ServeError>>) -> Self {
        RequestHandle { id, events, done }
    }

    /// The next event; `None` once the request ended (then see [`RequestHandle::outcome`]).
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.events.recv().await
    }

    /// How the request ended.
    pub async fn outcome(self) -> Result<(), ServeError> {
        self.done.await.unwrap_or_else(|_| Err(ServeError::Unavailable("the coordinator stopped serving the model".into())))
    }
}

impl Engine {
    /// Hands `req` to the model's scheduler: this coordinator's own, or, on a follower of a
    /// cluster of several coordinators, the leader's (which alone schedules the model). Fails at
    /// once when the model is not serving, when the request could never fit a stage's KV pool,
    /// or when the queue is full.
    pub async fn submit(self: &Arc<Self>, model: &Arc<ModelEntry>, req: ValidRequest, id: String) -> Result<RequestHandle, ServeError> {
        self.submit_to(model, req, id, true).await
    }

    /// Hands `req` to this coordinator's own scheduler (what the leader does with the requests
    /// the others hand it).
    pub(crate) async fn submit_here(
        self: &Arc<Self>,
        model: &Arc<ModelEntry>,
        req: ValidRequest,
        id: String,
    ) -> Result<RequestHandle, ServeError> {
        self.submit_to(model, req, id, false).await
    }

    /// Where requests go when this coordinator does not schedule its models: the leader, once
    /// one is known (waiting for one as long as for a re-plan). `None`: scheduled here.
    async fn leader_elsewhere(&self) -> Result<Option<super::LeaderRecord>, ServeError> {
        let Some(peers) = &self.config.peers else { return Ok(None) };
        if self.etcd.is_none() || self.is_leader() {
            return Ok(None);
        }
        let mut leader = self.shared.leader.subscribe();
        let known = leader.wait_for(|l| l.is_some() || self.is_leader());
        let found = tokio::select! {
            r = tokio::time::timeout(self.config.replan_wait, known) => r.ok().and_then(|r| r.ok().map(|l| l.clone())),
            _ = self.stop.cancelled() => None,
        };
        match found {
            _ if self.is_leader() => Ok(None),
            Some(Some(l)) if l.address == peers.own.address => Ok(None),
            Some(Some(l)) => Ok(Some(l)),
            _ => Err(ServeError::Unavailable(format!(
                "no coordinator leads the cluster (none elected within {:?}); model {} is scheduled by the leader",
                self.config.replan_wait, self.model.name
            ))),
        }
    }

    async fn submit_to(
        self: &Arc<Self>,
        model: &Arc<ModelEntry>,
        req: ValidRequest,
        id: String,
        relay: bool,
    ) -> Result<RequestHandle, ServeError> {
        if self.replicas.is_none() || self.config.replica != Some(0) {
            return self.enqueue(model, req, id, relay, None).await;
        }
        // A model with replicas: the leader routes every request to one of them.
        if relay {
            if let Some(leader) = self.leader_elsewhere().await? {
                let slot = self.requests.clone().try_acquire_owned().map_err(|_| {
                    ServeError::Exhausted(format!(
                        "model {} already has {} requests in flight (max_concurrent_requests = {})",
                        model.name, self.config.max_concurrent_requests, self.config.max_concurrent_requests
                    ))
                })?;
                debug!(model = %model.name, request_id = %id, leader = %leader.address, "request handed to the leader");
                return super::forward::forward(self, model, req, id, leader, slot).await;
            }
        }
        let (target, routed) = self.route(&req);
        // The request's log span names the replica that serves it.
        tracing::Span::current().record("replica", target.replica());
        let entry = target.model.clone();
        target.enqueue(&entry, req, id, false, routed).await
    }

    /// Queues `req` for this engine's scheduler (or, with `relay`, hands it to the leader when
    /// another coordinator leads).
    async fn enqueue(
        self: &Arc<Self>,
        model: &Arc<ModelEntry>,
        req: ValidRequest,
        id: String,
        relay: bool,
        routed: Option<super::replicas::Routed>,
    ) -> Result<RequestHandle, ServeError> {
        // While the model moves off cordoned workers, new requests wait (bounded) for the new
        // placement rather than start on the old one.
        let mut moving = self.moving.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(self.config.migration_wait, moving.wait_for(|m| !*m)) => {}
            _ = self.stop.cancelled() => {}
        }
        // After a stage was lost, new requests wait (bounded) for the re-plan.
        if model.was_ready() {
            let mut state = model.subscribe();
            let placed = state.wait_for(|s| !matches!(s, ServingState::Unavailable(_)));
            tokio::select! {
                _ = tokio::time::timeout(self.config.replan_wait, placed) => {}
                _ = self.stop.cancelled() => {}
            }
        }
        if self.stop.is_cancelled() {
            return Err(ServeError::NotFound(format!("model {:?} is no longer served here", model.name)));
        }
        match model.state() {
            ServingState::Ready(p) => {
                let (blocks, block_size) = p.kv_capacity();
                let tokens = req.prompt_ids.len() + req.max_new_tokens;
                if steps::blocks_for(tokens, block_size) > blocks {
                    return Err(ServeError::TooLargeForKv { tokens, capacity: blocks * block_size });
                }
            }
            ServingState::Loading(why) => return Err(ServeError::Loading(format!("model {} is still loading: {why}", model.name))),
            ServingState::Unavailable(why) => {
                return Err(ServeError::Unavailable(format!("model {} has no healthy placement: {why}", model.name)))
            }
        }
        let _request_slot = self.requests.clone().try_acquire_owned().map_err(|_| {
            ServeError::Exhausted(format!(
                "model {} already has {} requests in flight (max_concurrent_requests = {})",
                model.name, self.config.max_concurrent_requests, self.config.max_concurrent_requests
            ))
        })?;
        if relay {
            if let Some(leader) = self.leader_elsewhere().await? {
                debug!(model = %model.name, request_id = %id, leader = %leader.address, "request handed to the leader");
                return super::forward::forward(self, model, req, id, leader, _request_slot).await;
            }
        }
        let waiting_slot = self
            .waiting
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServeError::QueueFull { model: model.name.clone(), limit: self.config.max_waiting })?;
        let (out, events) = mpsc::channel(self.config.max_buffered_tokens.max(1));
        let (done, done_rx) = oneshot::channel();
        debug!(model = %model.name, request_id = %id, prompt = req.prompt_ids.len(), max_new_tokens = req.max_new_tokens, "request queued");
        let sub = Submission {
            id: id.clone(),
            req,
            out,
            done,
            arrived: tokio::time::Instant::now(),
            _request_slot,
            waiting_slot: Some(waiting_slot),
            _routed: routed,
        };
        self.inbox.send(sub).map_err(|_| ServeError::Unavailable(format!("the coordinator stopped serving model {}", model.name)))?;
        Ok(RequestHandle { id, events, done: done_rx })
    }
}
