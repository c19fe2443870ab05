//! How the engine serves a model: the settings a coordinator starts each model's engine with.

use super::{Peers, Prepared};
use shardserve::dtype::Dtype;
use std::sync::Arc;
use std::time::Duration;

/// How the engine serves its model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model as given: a folder or a Hub id.
    pub model: String,
    pub revision: Option<String>,
    /// What [`preflight`] read of the model, when it ran before the engine started: a load
    /// reads the model once, and its engine and every replica's take this.
    pub prepared: Option<Arc<Prepared>>,
    /// The name clients use; defaults to `model`.
    pub name: String,
    /// The compute dtype the workers load.
    pub dtype: Dtype,
    /// The type the workers quantize the linear weights to as they load them.
    pub quantize: Option<shardserve::quant::Quantize>,
    /// The GGUF file of the model's folder or repo to serve.
    pub gguf_file: Option<String>,
    /// A GGUF checkpoint's weights dequantized to `dtype` at load.
    pub dequantize: bool,
    /// Workers the first plan waits for (pipeline stages × `tp`).
    pub workers: usize,
    /// Tensor-parallel ranks per stage: consecutive workers form a stage's group.
    pub tp: usize,
    /// Workers make seeded random weights instead of reading the checkpoint (benchmarks).
    pub random_weights: bool,
    /// Caps prompt + generated tokens below the model's own limit.
    pub max_total_tokens: Option<usize>,
    /// Requests in flight per model (running or waiting) before RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Most sequences in one step.
    pub max_batch_size: usize,
    /// Most tokens in one step, prefill chunks included.
    pub max_batch_tokens: usize,
    /// Requests waiting for admission before new ones get RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
    /// KV cache per stage (per rank) in bytes; `None`: half of `reserve` of the worker's free
    /// memory.
    pub kv_memory: Option<u64>,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// Generated tokens buffered for a client that does not read them before it is cancelled.
    pub max_buffered_tokens: usize,
    /// Longest one step may take.
    pub step_timeout: Duration,
    /// The cluster identity presented to workers, when links inside the cluster are mutual TLS.
    pub tls: Option<std::sync::Arc<shardserve::tls::ClusterTls>>,
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
    /// Reuse the KV blocks of prompt prefixes already computed (`--prefix-caching`).
    pub prefix_caching: bool,
    /// Who shares cached prefixes (`--prefix-cache-scope`).
    pub prefix_cache_scope: PrefixCacheScope,
    /// How the other coordinators of the cluster reach this one and it reaches them (with etcd:
    /// followers hand their requests to the leader).
    pub peers: Option<Arc<Peers>>,
    /// Copies of the model to serve, each its own placement, scheduler and KV pools over
    /// `workers` workers (`--replicas`); `None`: one placement over the whole fleet.
    pub replicas: Option<ReplicaCount>,
    /// How requests are spread over replicas (`--router`).
    pub router: crate::router::RouterPolicy,
    /// Which replica this engine serves (set by the replica set, not by flags).
    pub replica: Option<usize>,
}

/// How many replicas of a model to serve (`--replicas N|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCount {
    Count(usize),
    /// As many as the fleet holds, each on the fewest workers that fit the model and its KV.
    Auto,
}

impl std::str::FromStr for ReplicaCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ReplicaCount::Auto),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("--replicas takes a number of at least 1 or `auto`, not {n:?}")),
                Ok(n) => Ok(ReplicaCount::Count(n)),
            },
        }
    }
}

impl std::fmt::Display for ReplicaCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaCount::Count(n) => write!(f, "{n}"),
            ReplicaCount::Auto => f.write_str("auto"),
        }
    }
}

/// Who may reuse a cached prompt prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PrefixCacheScope {
    /// Every client (requests still separate themselves with `cache_salt`).
    #[default]
    Shared,
    /// Only requests made with the same API key: no tenant can hit, or time, another's
    /// prompts. Needs --api-keys-file or --admin-keys-file.
    PerKey,
}
