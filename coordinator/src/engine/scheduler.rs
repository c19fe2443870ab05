//! The scheduler of one model: continuous batching over the pipeline.
//!
//! Requests wait in a FIFO queue (bounded by `max_waiting`) and are admitted, in order, while every
//! stage's KV pool can hold them: each reserves blocks for its prompt + max_new_tokens up front (as
//! TGI does), less the blocks of its longest cached prefix, which it shares instead of computing
//! ([`super::blocks`]), so a running sequence never runs out of KV memory and nothing is ever
//! preempted. The scheduler names every block, so all stages and ranks hold a sequence under the
//! same ids, and a block is published to the cache once every stage wrote it. Each step is built
//! from the running set — decode rows first, then prefill chunks, within `max_batch_size` sequences
//! and `max_batch_tokens` rows — and as many steps are in flight as the pipeline has stages (each
//! taking an even share of the ready sequences), so every stage computes at once. A sequence that
//! finishes, is cancelled or fails leaves at the next step: its id rides in that step's `release`
//! list, which every stage applies before it runs the step, so its blocks are free before anyone
//! else's tokens need them. When a stage dies, every sequence of the batch moves to the next
//! placement (up to `migration_limit` times, re-prefilling what it has) or fails with UNAVAILABLE.
//! A client that does not read its stream is cancelled once `max_buffered_tokens` events wait for
//! it, never holding up the others. A step's answer is taken in by `results.rs`.

mod results;

use super::blocks::{Blocks, SeqBlocks};
use super::*;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

/// How often waiting requests and sequences waiting for a placement are checked for their
/// deadlines and for clients that went away.
const TICK: Duration = Duration::from_millis(100);

/// A request handed to the scheduler.
pub(super) struct Submission {
    pub(super) id: String,
    pub(super) req: ValidRequest,
    pub(super) out: mpsc::Sender<GenEvent>,
    pub(super) done: oneshot::Sender<Result<(), ServeError>>,
    pub(super) arrived: Instant,
    /// Its place among `max_concurrent_requests`, held until it ends.
    pub(super) _request_slot: OwnedSemaphorePermit,
    /// Its place in the queue, given back when it is admitted.
    pub(super) waiting_slot: Option<OwnedSemaphorePermit>,
    /// With replicas: what it adds to its replica's load as the router counts it, until it ends.
    pub(super) _routed: Option<super::replicas::Routed>,
}

/// A sequence admitted and not finished.
struct Running {
    sub: Submission,
    /// Its id on the stages (a new one each time it moves to another placement).
    seq_id: u64,
    /// The placement its KV lives on; `None` while it waits for one (moving).
    placement: Option<u64>,
    parked_since: Option<Instant>,
    /// The prompt, then every generated token.
    context: Vec<u32>,
    /// Tokens of `context` the stages hold.
    fed: usize,
    /// Tokens it started from on its placement (a cached prefix: its first step starts there).
    start: usize,
    /// Rows of it in the step in flight (0: none in flight).
    sending: usize,
    /// Its KV blocks on its placement, and those reserved for it, as of scheduler term `term`.
    kv: SeqBlocks,
    term: u64,
    /// Prompt tokens that came from the prefix cache when it was admitted, until reported with
    /// its first event.
    cached_tokens: Option<usize>,
    generated: usize,
    migrations: usize,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    last_token: Option<Instant>,
    /// An embedding request's final-norm hidden states so far (positions × hidden, row-major).
    hidden: Vec<f32>,
}

/// A step's answer (or failure), with what it carried.
struct StepDone {
    placement: Arc<Placement>,
    /// (seq id, rows) of every sequence in the step.
    sent: Vec<(u64, usize)>,
    result: Result<pb::StepResponse, tonic::Status>,
}

struct Scheduler {
    engine: Arc<Engine>,
    waiting: VecDeque<Submission>,
    running: Vec<Running>,
    in_flight: FuturesUnordered<BoxFuture<'static, StepDone>>,
    /// Sequences to free on the current placement, sent with the next step.
    releases: Vec<u64>,
    /// The placement steps go to (the model's, while it is ready).
    placement: Option<Arc<Placement>>,
    /// The KV blocks of `placement` (held, reserved, cached).
    blocks: Blocks,
    /// The term this scheduler's steps carry (see [`Engine::term`]): when it changes, the pools
    /// are another scheduler's since, and what this one knew of them is dropped.
    term: u64,
    /// Since when the model has had no placement.
    unready_since: Option<Instant>,
}

/// Runs the scheduler of `engine`'s model until `shutdown`.
pub(super) async fn run(engine: Arc<Engine>, mut inbox: mpsc::UnboundedReceiver<Submission>, shutdown: CancellationToken) {
    let mut state = engine.model.subscribe();
    let mut moving = engine.moving.subscribe();
    let mut s = Scheduler {
        engine,
        waiting: VecDeque::new(),
        running: Vec::new(),
        in_flight: FuturesUnordered::new(),
        releases: Vec::new(),
        placement: None,
        blocks: Blocks::new(0, 1, false),
        term: 0,
        unready_since: Some(Instant::now()),
    };
    s.on_state();
    loop {
        s.on_term();
        s.admit();
        s.dispatch().await;
        s.publish();
        let tick = !s.waiting.is_empty() || s.running.iter().any(|r| r.placement.is_none());
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let why = format!("model {} is no longer served here (unloaded, or the coordinator is stopping)", s.model().name);
                s.stop(&why);
                return;
            }
            Some(done) = s.in_flight.next(), if !s.in_flight.is_empty() => s.on_step(done),
            sub = inbox.recv() => match sub {
                Some(sub) => {
                    // Everything that arrived together is admitted together.
                    s.waiting.push_back(sub);
                    while let Ok(more) = inbox.try_recv() {
                        s.waiting.push_back(more);
                    }
                }
                None => return,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                s.on_state();
            }
            changed = moving.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(TICK), if tick => s.expire(),
        }
    }
}

impl Scheduler {
    fn config(&self) -> &EngineConfig {
        &self.engine.config
    }

    fn model(&self) -> &Arc<ModelEntry> {
        &self.engine.model
    }

    fn find(&self, seq_id: u64) -> Option<usize> {
        self.running.iter().position(|r| r.seq_id == seq_id)
    }

    fn new_seq_id(&self) -> u64 {
        self.engine.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Follows the model's state: a new placement takes the steps (with pools of its own, whose
    /// blocks start empty); without one, nothing is sent and the sequences on the old one move
    /// (or fail).
    fn on_state(&mut self) {
        let state = self.model().state();
        let current = self.placement.as_ref().map(|p| p.id);
        match state {
            ServingState::Ready(p) if Some(p.id) == current => {}
            ServingState::Ready(p) => {
                let (blocks, block_size) = p.kv_capacity();
                self.blocks = self.new_blocks(blocks, block_size);
                let old = self.placement.replace(p);
                self.releases.clear();
                self.unready_since = None;
                self.displace_all(old, "the model was placed again");
            }
            ServingState::Loading(why) | ServingState::Unavailable(why) => {
                self.unready_since.get_or_insert_with(Instant::now);
                if let Some(old) = self.placement.take() {
                    self.blocks = self.new_blocks(0, 1);
                    self.releases.clear();
                    self.displace_all(Some(old), &why);
                }
            }
        }
    }

    /// Follows the engine's term: once another scheduler has owned the pools, nothing this one
    /// knew of them holds (the stages dropped it all when the other took them), so its
    /// sequences start over on them, with pools it sees as empty.
    fn on_term(&mut self) {
        let term = self.engine.term();
        if term == self.term {
            return;
        }
        self.term = term;
        if let Some(p) = self.placement.clone() {
            let (blocks, block_size) = p.kv_capacity();
            self.blocks = self.new_blocks(blocks, block_size);
            self.releases.clear();
            // Those in flight follow when their step returns.
            let here: Vec<u64> = self.running.iter().filter(|r| r.sending == 0 && r.placement.is_some()).map(|r| r.seq_id).collect();
            for seq_id in here {
                self.displace(seq_id, None, "this coordinator took over scheduling the model", false);
            }
        }
    }

    /// Moves (or fails) every sequence not in flight whose KV lives on a placement other than
    /// the current one; those in flight follow when their step returns.
    fn displace_all(&mut self, old: Option<Arc<Placement>>, why: &str) {
        let current = self.placement.as_ref().map(|p| p.id);
        let stale: Vec<u64> =
            self.running.iter().filter(|r| r.sending == 0 && r.placement.is_some() && r.placement != current).map(|r| r.seq_id).collect();
        for seq_id in stale {
            self.displace(seq_id, old.as_ref(), why, true);
        }
    }

    /// Moves sequence `seq_id` off its placement: it waits for the next one (and then prefills
    /// all it has again), or fails with UNAVAILABLE when it may not move any more (`counted`:
    /// the move counts against `migration_limit`).
    fn displace(&mut self, seq_id: u64, old: Option<&Arc<Placement>>, why: &str, counted: bool) {
        let Some(i) = self.find(seq_id) else { return };
        if let Some(p) = old {
            release_on(p, vec![seq_id]);
        }
        if counted && self.running[i].migrations >= self.config().migration_limit {
            self.fail(i, ServeError::Unavailable(why.to_string()));
            return;
        }
        let new_id = self.new_seq_id();
        let current = self.placement.as_ref().map(|p| p.id);
        let r = &mut self.running[i];
        let kv = std::mem::take(&mut r.kv);
        if r.placement.is_some() && r.placement == current && r.term == self.term {
            // Its blocks here are free again (the stages free it with the next step).
            self.blocks.release(kv);
            self.releases.push(seq_id);
        }
        let r = &mut self.running[i];
        r.migrations += usize::from(counted);
        warn!(model = %self.engine.model.name, request_id = %r.sub.id, error = %why, migrations = r.migrations, "a stage failed; the request moves to the next placement");
        r.placement = None;
        r.parked_since = Some(Instant::now());
        r.seq_id = new_id;
        r.fed = 0;
        r.start = 0;
        r.hidden.clear();
        r.sending = 0;
    }

    fn prefix_root(&self, req: &ValidRequest) -> Option<shardserve::prefix::BlockHash> {
        prefix_root(self.config(), self.model(), req)
    }

    /// Empty bookkeeping for pools of `total` blocks of `block_size` tokens (a new placement, a
    /// new term), published to the router's index when the model has replicas.
    fn new_blocks(&self, total: usize, block_size: usize) -> Blocks {
        let b = Blocks::new(total, block_size, self.config().prefix_caching && total > 0);
        match (&self.engine.replicas, self.config().replica) {
            (Some(set), Some(i)) => b.publishing_to(set.index.clone(), i),
            _ => b,
        }
    }

    /// Admits what fits, in order: sequences moving to this placement first, then the queue.
    /// Each starts from the longest prefix of its context that the cache holds (an embedding
    /// needs every position's hidden states and computes them all).
    fn admit(&mut self) {
        let Some(p) = self.placement.clone() else { return };
        if *self.engine.moving.borrow() {
            return;
        }
        let capacity = self.blocks.total();
        let block_size = self.blocks.block_size();
        let max_running = self.config().max_batch_size.saturating_mul(p.stages.len());
        for i in 0..self.running.len() {
            if self.running[i].placement.is_some() {
                continue;
            }
            let r = &self.running[i];
            let root = self.prefix_root(&r.sub.req);
            let total = r.context.len() + r.sub.req.max_new_tokens - r.generated;
            let lookup = r.sub.req.embed.is_none();
            let Some(kv) = self.blocks.admit(root, lookup, &r.context, total) else { return };
            let r = &mut self.running[i];
            r.start = kv.cached_tokens(block_size);
            r.fed = r.start;
            r.kv = kv;
            r.term = self.term;
            r.placement = Some(p.id);
            r.parked_since = None;
        }
        while let Some(front) = self.waiting.front() {
            if front.out.is_closed() {
                let sub = self.waiting.pop_front().expect("front");
                let _ = sub.done.send(Err(ServeError::Cancelled("the client went away".into())));
                continue;
            }
            if self.running.len() >= max_running {
                return;
            }
            let tokens = front.req.prompt_ids.len() + front.req.max_new_tokens;
            if steps::blocks_for(tokens, block_size) > capacity {
                let sub = self.waiting.pop_front().expect("front");
                let _ = sub.done.send(Err(ServeError::TooLargeForKv { tokens, capacity: capacity * block_size }));
                continue;
            }
            let root = self.prefix_root(&front.req);
            let lookup = front.req.embed.is_none();
            let Some(kv) = self.blocks.admit(root, lookup, &front.req.prompt_ids, tokens) else { return };
            let mut sub = self.waiting.pop_front().expect("front");
            sub.waiting_slot = None;
            let cached = kv.cached_tokens(block_size);
            let labels = self.engine.metric_labels();
            metrics::histogram!("shardserve_queue_duration_seconds", &labels).record(sub.arrived.elapsed().as_secs_f64());
            metrics::counter!("shardserve_prompt_tokens_total", &labels).increment(sub.req.prompt_ids.len() as u64);
            if root.is_some() && lookup {
                // As vLLM counts them: prompt tokens looked up, and those found.
                metrics::counter!("shardserve_prefix_cache_queries_total", &labels).increment(sub.req.prompt_ids.len() as u64);
                metrics::counter!("shardserve_prefix_cache_hits_total", &labels).increment(cached as u64);
                self.model().count_prefix_lookup(sub.req.prompt_ids.len(), cached);
            }
            debug!(model = %self.model().name, request_id = %sub.id, cached, blocks = kv.table.len(), "request admitted");
            let seq_id = self.new_seq_id();
            self.running.push(Running {
                seq_id,
                placement: Some(p.id),
                parked_since: None,
                context: sub.req.prompt_ids.clone(),
                fed: cached,
                start: cached,
                sending: 0,
                kv,
                term: self.term,
                cached_tokens: Some(cached),
                generated: 0,
                migrations: 0,
                decoder: IncrementalDecoder::new(&sub.req.prompt_ids),
                stops: StopMatcher::new(sub.req.stop.clone()),
                last_token: None,
                hidden: Vec::new(),
                sub,
            });
        }
    }

    /// Sends steps while fewer are in flight than the pipeline has stages.
    async fn dispatch(&mut self) {
        let Some(p) = self.placement.clone() else { return };
        let depth = p.stages.len();
        // Clients that went away leave now.
        let gone: Vec<usize> =
            (0..self.running.len()).rev().filter(|&i| self.running[i].sending == 0 && self.running[i].sub.out.is_closed()).collect();
        for i in gone {
            self.fail(i, ServeError::Cancelled("the client went away".into()));
        }
        while self.in_flight.len() < depth {
            let ready: Vec<usize> = (0..self.running.len())
                .filter(|&i| {
                    let r = &self.running[i];
                    r.sending == 0 && r.placement == Some(p.id) && r.term == self.term && r.fed < r.context.len()
                })
                .collect();
            let here = self.running.iter().filter(|r| r.placement == Some(p.id)).count();
            let take = steps::micro_batch(ready.len(), here, depth, self.in_flight.len(), self.config().max_batch_size);
            if take == 0 && self.releases.is_empty() {
                return;
            }
            let remaining: Vec<usize> = ready.iter().map(|&i| self.running[i].context.len() - self.running[i].fed).collect();
            let rows = steps::plan(&remaining, take, self.config().max_batch_tokens, self.config().prefill_chunk);
            if rows.is_empty() && self.releases.is_empty() {
                return;
            }
            let mut sequences = Vec::with_capacity(rows.len());
            let mut sent = Vec::with_capacity(rows.len());
            let mut starved = Vec::new();
            for (k, n) in rows {
                let r = &mut self.running[ready[k]];
                let Some(blocks) = self.blocks.grow(&mut r.kv, r.fed + n) else {
                    starved.push(r.seq_id);
                    continue;
                };
                let first = r.fed == r.start;
                let req = &r.sub.req;
                let cached = if first { r.kv.cached } else { 0 };
                sequences.push(pb::SequenceStep {
                    seq_id: r.seq_id,
                    token_ids: r.context[r.fed..r.fed + n].to_vec(),
                    start_pos: r.fed as u32,
                    sampling: first.then(|| sampling_params(&req.sampling)),
                    logprobs: req.logprobs,
                    prefill_only: r.fed + n < r.context.len(),
                    epoch: p.epoch,
                    request_id: if first { r.sub.id.clone() } else { String::new() },
                    embed: req.embed.is_some(),
                    top_logprobs: req.top_logprobs as u32,
                    suppress: if r.generated < req.min_tokens { self.engine.model.eos.clone() } else { Vec::new() },
                    blocks,
                    cached_blocks: r.kv.table[..cached].to_vec(),
                    cached_ids: if first { r.context[..r.start].to_vec() } else { Vec::new() },
                    prefix_root: match (first, r.kv.root()) {
                        (true, Some(root)) => root.to_vec(),
                        _ => Vec::new(),
                    },
                    grammar: req.grammar.as_ref().filter(|_| first).map(|g| pb::Grammar {
                        llguidance: g.to_string(),
                        eos: self.engine.model.eos.clone(),
                        // A sequence moved to a new placement brings what it generated so far.
                        generated: r.context[req.prompt_ids.len()..].to_vec(),
                    }),
                });
                r.sending = n;
                sent.push((r.seq_id, n));
            }
            for seq_id in starved {
                // Admission reserved every block a sequence can need: this is a bug.
                if let Some(i) = self.find(seq_id) {
                    self.fail(i, ServeError::Internal(format!("sequence {seq_id} outgrew the KV blocks reserved for it")));
                }
            }
            if !sent.is_empty() {
                let labels = self.engine.metric_labels();
                metrics::histogram!("shardserve_batch_size", &labels).record(sent.len() as f64);
                metrics::histogram!("shardserve_batch_tokens", &labels).record(sent.iter().map(|(_, n)| *n).sum::<usize>() as f64);
            }
            let step =
                pb::StepRequest { step_id: 0, sequences, hidden: None, release: std::mem::take(&mut self.releases), owner: self.term };
            let timeout = self.config().step_timeout;
            // Queued here, in order: a step's releases reach every stage before the steps sent
            // after it.
            let pending = p.first.submit(step).await;
            let placement = p.clone();
            self.in_flight.push(Box::pin(async move {
                let result = match pending {
                    Ok(pending) => pending.answer(timeout).await,
                    Err(e) => Err(e),
                };
                StepDone { placement, sent, result }
            }));
        }
    }

    /// Fails waiting requests whose model has had no placement for longer than `replan_wait`,
    /// sequences that waited for a new placement longer than `migration_wait`, and drops
    /// requests whose clients went away.
    fn expire(&mut self) {
        let now = Instant::now();
        let replan_wait = self.config().replan_wait;
        let unready = self.unready_since;
        let why = match self.model().state() {
            ServingState::Loading(w) | ServingState::Unavailable(w) => w,
            ServingState::Ready(_) => String::new(),
        };
        let name = self.model().name.clone();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            if w.out.is_closed() {
                let _ = w.done.send(Err(ServeError::Cancelled("the client went away".into())));
            } else if unready.is_some_and(|since| now.duration_since(since.max(w.arrived)) > replan_wait) {
                let _ = w.done.send(Err(ServeError::Unavailable(format!("model {name} has no healthy placement: {why}"))));
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        let limit = self.config().migration_wait;
        let stale: Vec<usize> = (0..self.running.len())
            .rev()
            .filter(|&i| self.running[i].parked_since.is_some_and(|t| now.duration_since(t) > limit))
            .collect();
        for i in stale {
            self.fail(i, ServeError::Unavailable(format!("no new placement within {limit:?}")));
        }
    }

    /// Fails everything (shutdown).
    fn stop(&mut self, why: &str) {
        while !self.running.is_empty() {
            self.fail(self.running.len() - 1, ServeError::Unavailable(why.to_string()));
        }
        for w in self.waiting.drain(..) {
            let _ = w.done.send(Err(ServeError::Unavailable(why.to_string())));
        }
    }

    /// The gauges others watch: requests running and waiting.
    fn publish(&self) {
        let model = self.model();
        model.active.store(self.running.len(), Ordering::SeqCst);
        model.queued.store(self.waiting.len(), Ordering::SeqCst);
        let labels = self.engine.metric_labels();
        metrics::gauge!("shardserve_running_sequences", &labels).set(self.running.len() as f64);
        metrics::gauge!("shardserve_queue_depth", &labels).set(self.waiting.len() as f64);
        model.cached_blocks.store(self.blocks.cached(), Ordering::SeqCst);
        model.total_blocks.store(self.blocks.total(), Ordering::SeqCst);
        model.free_blocks.store(self.blocks.available(), Ordering::SeqCst);
        if self.placement.is_some() {
            metrics::gauge!("shardserve_kv_blocks_reserved", &labels).set(self.blocks.reserved() as f64);
            metrics::gauge!("shardserve_kv_blocks_capacity", &labels).set(self.blocks.total() as f64);
            metrics::gauge!("shardserve_prefix_cache_blocks", &labels).set(self.blocks.cached() as f64);
        }
    }
}

/// The root of `req`'s block-hash chain: everything besides its tokens that changes its keys
/// and values (the model, its revision and dtype), and who may share them (the tenant and the
/// request's cache_salt). `None` when its blocks are never shared.
pub(super) fn prefix_root(c: &EngineConfig, model: &ModelEntry, req: &ValidRequest) -> Option<shardserve::prefix::BlockHash> {
    if !c.prefix_caching || req.skip_prefix_cache {
        return None;
    }
    let dtype = model.dtype.to_string();
    Some(shardserve::prefix::root(&[
        c.model.as_bytes(),
        c.revision.as_deref().unwrap_or("").as_bytes(),
        dtype.as_bytes(),
        req.tenant.as_bytes(),
        req.cache_salt.as_bytes(),
    ]))
}

fn sampling_params(s: &shardserve::sampling::SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: Some(s.temperature),
        top_p: Some(s.top_p),
        top_k: Some(s.top_k as i32),
        repetition_penalty: Some(s.repetition_penalty),
        seed: Some(s.seed),
    }
}

/// Frees `ids` on a placement no longer stepped on, best effort (its stages may be gone).
fn release_on(p: &Placement, ids: Vec<u64>) {
    let mut client = p.release.clone();
    tokio::spawn(async move {
        let call = client.release(pb::ReleaseRequest { seq_ids: ids });
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(3), call).await {
            debug!(error = %e, "release on the old placement failed");
        }
    });
}
