//! The library shardserve's coordinator and workers share.
//!
//! - [`chat`]: chat templates found and rendered as transformers' `apply_chat_template` does.
//! - [`hub`]: resolve a model (a folder or a Hub id) through the Hugging Face cache.
//! - [`collective`]: the all-reduce of a tensor-parallel group (TCP; NCCL with `cuda`).
//! - [`config`]: `config.json` and `generation_config.json`, HF field names and defaults.
//! - [`dtype`]: the one dtype choice (`auto`, `f32`, `bf16`, `f16`) and how it resolves.
//! - [`device`]: `cpu` / `cuda:N` device names, and a GPU's free memory.
//! - [`weights`]: memory-mapped safetensors, reading only the tensors a shard owns.
//! - [`model`]: the sharded decoder (a layer range, plus embedding / head at the ends), batched
//!   steps over a paged KV pool.
//! - [`sampling`]: next-token choice with transformers' semantics.
//! - [`tokenizer`]: tokenizer.json, incremental detokenization, stop sequences.
//! - [`stage`]: the multiplexed client of a stage's Step stream.
//! - [`membership`]: the fleet in etcd: registration with leases, the watched view.
//! - [`wire`]: tensors between stages as raw little-endian bytes.
//! - [`placement`]: which worker holds which layers.
//! - [`prefix`]: content addresses of KV blocks (hash chains), for prefix caching.
//! - [`telemetry`]: Prometheus metrics and their `/metrics` endpoint.
//! - [`tiny`]: tiny random checkpoints in the exact HF layout, for tests and demos.
//! - [`tls`]: TLS on the client ports and mutual TLS on every link inside the cluster.

pub mod chat;
pub mod collective;
pub mod config;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod guide;
pub mod hub;
pub mod membership;
pub mod model;
mod pages;
pub mod placement;
pub mod prefix;
pub mod quant;
pub mod sampling;
pub mod stage;
pub mod telemetry;
pub mod tiny;
pub mod tls;
pub mod tokenizer;
pub mod weights;
pub mod wire;

pub use error::{brief, Error, Result};
