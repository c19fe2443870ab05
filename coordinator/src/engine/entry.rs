//! A model the engine serves: where it lives (its placement over the fleet) and whether it can
//! take requests, as a `watch` value the scheduler, new requests and drains wait on.

use shardserve::config::{GenerationConfig, ModelConfig};
use shardserve::dtype::Dtype;
use shardserve::guide::{Grammars, GuideError};
use shardserve::stage::StageClient;
use shardserve::tokenizer::Tokenizer;
use shardserve_proto::v1 as pb;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// One stage of a placement.
#[derive(Debug, Clone)]
pub struct StageAssignment {
    /// The worker that takes the stage's steps (tensor-parallel rank 0).
    pub worker_id: String,
    pub address: String,
    pub layers: Range<usize>,
    /// Weight bytes on the stage's rank 0.
    pub bytes: u64,
    /// Tensor-parallel ranks 1.. of the stage: (worker id, address).
    pub followers: Vec<(String, String)>,
    /// KV blocks of the stage's pool (its smallest rank's), and tokens per block.
    pub kv_blocks: usize,
    pub kv_block_size: usize,
}

impl StageAssignment {
    /// Every worker of the stage, rank 0 first: (id, address).
    pub fn ranks(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.worker_id.as_str(), self.address.as_str()))
            .chain(self.followers.iter().map(|(i, a)| (i.as_str(), a.as_str())))
    }

    /// Whether `id` is one of the stage's workers.
    pub fn uses(&self, id: &str) -> bool {
        self.ranks().any(|(w, _)| w == id)
    }
}

/// Where a model lives, and the stream into its first stage.
pub struct Placement {
    pub stages: Vec<StageAssignment>,
    /// Sent with every load and step, so workers refuse steps meant for another placement.
    pub epoch: u64,
    pub(super) first: Arc<StageClient>,
    pub(super) release: shardserve_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>,
    pub(super) id: u64,
    /// Worker id → the instance of the process its shard was loaded on (where known: a
    /// placement adopted from etcd does not know them).
    pub(super) instances: std::collections::HashMap<String, String>,
}

impl Placement {
    /// KV blocks every stage can hold, and tokens per block: what admission counts against.
    pub fn kv_capacity(&self) -> (usize, usize) {
        let blocks = self.stages.iter().map(|s| s.kv_blocks).min().unwrap_or(0);
        let size = self.stages.first().map_or(1, |s| s.kv_block_size.max(1));
        (blocks, size)
    }

    /// Whether `w` is the process that holds the rank `(id, address)` of this placement: the
    /// same id and address, and the same instance where it is known.
    pub(super) fn held_by(&self, w: &pb::WorkerInfo, id: &str, address: &str) -> bool {
        w.id == id && w.address == address && self.instances.get(id).is_none_or(|i| w.instance.is_empty() || *i == w.instance)
    }
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
    pub generation: GenerationConfig,
    pub tokenizer: Tokenizer,
    /// The model's chat templates (or why it has none usable).
    pub chat: Arc<Result<shardserve::chat::ChatTemplates, shardserve::chat::ChatError>>,
    pub eos: Vec<u32>,
    pub max_total_tokens: usize,
    pub dtype: Dtype,
    /// The block types its projections compute in (`q8_0` quantized at load, `gguf q4_k+q6_k`
    /// as a GGUF file holds them; empty: the compute dtype).
    pub quantization: String,
    /// What others wait on: the scheduler, new requests, drains.
    pub(super) state: watch::Sender<ServingState>,
    /// Sequences admitted and not finished (the scheduler keeps it).
    pub(super) active: AtomicUsize,
    /// Requests waiting for admission.
    pub(super) queued: AtomicUsize,
    pub(super) ever_ready: std::sync::atomic::AtomicBool,
    /// Prompt tokens looked up in the prefix cache and found there (of the requests this
    /// coordinator scheduled or handed to the leader), and blocks the cache holds now (on the
    /// coordinator that schedules the model).
    pub(super) prefix_queries: AtomicU64,
    pub(super) prefix_hits: AtomicU64,
    pub(super) cached_blocks: AtomicUsize,
    /// KV blocks of the placement's pools, and those neither held nor reserved (cached ones
    /// count as free): the load the router weighs.
    pub(super) total_blocks: AtomicUsize,
    pub(super) free_blocks: AtomicUsize,
    /// With replicas: requests routed here and not finished, and the KV blocks they may take
    /// (prompt and new tokens): the load the router counts, current from the moment it routes.
    pub(super) routed_requests: AtomicUsize,
    pub(super) routed_blocks: AtomicUsize,
    /// The model's vocabulary as constrained decoding reads it, built on first use.
    pub(super) grammars: std::sync::OnceLock<Result<Arc<Grammars>, GuideError>>,
}

impl ModelEntry {
    /// The compiler of the model's grammars (built on the first constrained request).
    pub fn grammars(&self) -> Result<Arc<Grammars>, GuideError> {
        self.grammars.get_or_init(|| Grammars::new(&self.tokenizer, self.config.vocab_size, &self.eos).map(Arc::new)).clone()
    }

    /// What `ListModels` and `LoadModel` say of the model.
    pub fn info(&self) -> pb::ModelInfo {
        pb::ModelInfo {
            name: self.name.clone(),
            state: self.state().name().to_string(),
            architecture: self.config.architecture.hf_name().to_string(),
            max_position_embeddings: self.max_total_tokens as u32,
            dtype: self.dtype.to_string(),
            quantize: self.quantization.clone(),
            num_layers: self.config.num_layers as u32,
        }
    }

    /// The current state.
    pub fn state(&self) -> ServingState {
        self.state.borrow().clone()
    }

    /// The state, to wait on.
    pub fn subscribe(&self) -> watch::Receiver<ServingState> {
        self.state.subscribe()
    }

    pub(super) fn set_state(&self, s: ServingState) {
        if matches!(s, ServingState::Ready(_)) {
            self.ever_ready.store(true, Ordering::SeqCst);
        }
        self.state.send_replace(s);
    }

    /// Marks the model as no longer served.
    pub(crate) fn set_unavailable(&self, why: String) {
        self.set_state(ServingState::Unavailable(why));
    }

    /// Not-ready state with the right flavour: loading until first ready, unavailable after.
    pub(super) fn not_ready(&self, why: String) -> ServingState {
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

    /// Sequences admitted and running (or waiting to move to a new placement).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Requests waiting for admission.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Counts one lookup in the prefix cache: `queried` prompt tokens, `hit` of them found.
    pub(crate) fn count_prefix_lookup(&self, queried: usize, hit: usize) {
        self.prefix_queries.fetch_add(queried as u64, Ordering::Relaxed);
        self.prefix_hits.fetch_add(hit as u64, Ordering::Relaxed);
    }

    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.prefix_queries.load(Ordering::Relaxed), self.prefix_hits.load(Ordering::Relaxed))
    }

    /// Blocks the prefix cache holds that no request holds.
    pub fn cached_blocks(&self) -> usize {
        self.cached_blocks.load(Ordering::SeqCst)
    }

    /// KV blocks of the placement's pools, and those neither held nor reserved.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.total_blocks.load(Ordering::SeqCst), self.free_blocks.load(Ordering::SeqCst))
    }
}
