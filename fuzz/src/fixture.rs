//! What the targets run against, made once per process: a tiny Qwen3 checkpoint, a coordinator
//! engine serving it (with its HTTP API as a router, called in-process), and two workers each
//! holding one of its two pipeline stages. Everything is seeded, so a target's outcome depends
//! on its input alone.

use shardserve::config::{Architecture, ModelConfig};
use shardserve::tiny::{self, TinySpec};
use shardserve_coordinator::engine::{Engine, EngineConfig, ModelEntry};
use shardserve_proto::v1 as pb;
use shardserve_worker::service::{WorkerService, WorkerState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The Qwen3 chat template, verbatim as Qwen3 checkpoints ship it (Apache-2.0).
const QWEN3_TEMPLATE: &str = include_str!("../data/qwen3.jinja");

/// The placement epoch the workers load at; steps for another one are refused.
pub(crate) const EPOCH: u64 = 7;

/// The tiny model's shape: small enough that a step over hundreds of tokens takes
/// microseconds and its safetensors file is a few kilobytes, big enough to split into two
/// stages and two tensor-parallel ranks. The positions run out (512) where the KV pool does,
/// so a long token list meets both limits.
fn spec() -> TinySpec {
    let mut s = TinySpec::new(Architecture::Qwen3);
    s.hidden_size = 16;
    s.intermediate_size = 32;
    s.num_layers = 2;
    s.num_heads = 4;
    s.num_kv_heads = 2;
    s.head_dim = 8;
    s.vocab_size = 300;
    s.max_position_embeddings = 512;
    s.dtype = candle_core::DType::BF16;
    s
}

/// A folder of this process, removed by the next process that finds it orphaned.
fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir();
        // libFuzzer ends a process with exit(), so nothing of ours runs at its end: sweep the
        // folders of processes that are gone instead.
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("shardserve-fuzz-")) else { continue };
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(format!("shardserve-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz folder");
        dir
    })
}

/// A folder for the calling thread's scratch files (tests run targets on several threads).
pub(crate) fn scratch() -> PathBuf {
    let id = format!("{:?}", std::thread::current().id());
    let dir = process_dir().join(id.trim_start_matches("ThreadId(").trim_end_matches(')'));
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    dir
}

/// The tiny checkpoint: `whole` as one safetensors file with the Qwen3 chat template,
/// `sharded` the same weights as two files and an index.
pub(crate) struct Model {
    pub(crate) whole: PathBuf,
    pub(crate) sharded: PathBuf,
    pub(crate) config: ModelConfig,
}

pub(crate) fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let whole = process_dir().join("model");
        let sharded = process_dir().join("sharded");
        tiny::write(&whole, &spec()).expect("writing the tiny model");
        tiny::write(&sharded, &TinySpec { shards: 2, ..spec() }).expect("writing the sharded tiny model");
        std::fs::write(whole.join("chat_template.jinja"), QWEN3_TEMPLATE).expect("writing the chat template");
        let config = ModelConfig::from_file(&whole.join("config.json")).expect("the tiny config");
        Model { whole, sharded, config }
    })
}

/// One runtime for every async part; its threads live as long as the process.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a tokio runtime"))
}

/// The coordinator's side: the model's entry (what validation reads) and the HTTP API.
pub(crate) struct Coordinator {
    pub(crate) entry: Arc<ModelEntry>,
    pub(crate) router: axum::Router,
}

pub(crate) fn coordinator() -> &'static Coordinator {
    static C: OnceLock<Coordinator> = OnceLock::new();
    C.get_or_init(|| {
        let dir = model().whole.to_str().expect("a UTF-8 temp folder").to_string();
        runtime().block_on(async {
            let stop = CancellationToken::new();
            let fleet = shardserve_coordinator::membership::Embedded::new(Duration::from_secs(10), stop.clone());
            let config = EngineConfig {
                model: dir.clone(),
                revision: None,
                prepared: None,
                name: "tiny".into(),
                dtype: Default::default(),
                quantize: None,
                gguf_file: None,
                dequantize: false,
                workers: 2,
                tp: 1,
                replicas: None,
                router: Default::default(),
                replica: None,
                random_weights: false,
                max_total_tokens: None,
                max_concurrent_requests: 64,
                max_batch_size: 16,
                max_batch_tokens: 1024,
                max_waiting: 64,
                kv_memory: None,
                kv_block_size: 16,
                max_buffered_tokens: 1024,
                step_timeout: Duration::from_secs(10),
                tls: None,
                strategy: shardserve::placement::Strategy::Auto,
                max_memory: None,
                device_map: None,
                reserve: 0.3,
                prefill_chunk: 512,
                migration_limit: 0,
                migration_wait: Duration::from_secs(1),
                lease_ttl: Duration::from_secs(10),
                replan_wait: Duration::from_secs(1),
                prefix_caching: true,
                prefix_cache_scope: Default::default(),
                peers: None,
            };
            let engine = Engine::start(config, fleet.clone(), None, stop.clone()).await.expect("starting the engine");
            let entry = engine.entry().clone();
            let models = shardserve_coordinator::models::Models::new(engine, fleet, None, stop);
            let limits = shardserve_coordinator::http::Limits {
                max_n: 4,
                max_request_bytes: 1 << 20,
                tool_call_parser: Default::default(),
                reasoning_parser: Default::default(),
            };
            let router = shardserve_coordinator::http::router(models, limits, Default::default());
            Coordinator { entry, router }
        })
    })
}

/// The two stages of the tiny model, each on a worker of its own: stage 0 takes tokens,
/// stage 1 hidden states and samples.
pub(crate) fn workers() -> &'static [Arc<WorkerState>; 2] {
    static W: OnceLock<[Arc<WorkerState>; 2]> = OnceLock::new();
    W.get_or_init(|| {
        let dir = model().whole.to_str().expect("a UTF-8 temp folder").to_string();
        let load = |stage: u32| {
            let rendezvous = shardserve_worker::group::Rendezvous::start("127.0.0.1", None).expect("a rendezvous port");
            let state = Arc::new(WorkerState::new(
                format!("fuzz-{stage}"),
                Duration::from_secs(10),
                Duration::from_secs(10),
                rendezvous,
                candle_core::Device::Cpu,
                None,
                CancellationToken::new(),
            ));
            let req = pb::LoadShardRequest {
                model: dir.clone(),
                dtype: "f32".into(),
                stage,
                num_stages: 2,
                layer_start: stage,
                layer_end: stage + 1,
                epoch: EPOCH,
                // 32 blocks of 16 tokens: as many as the model has positions.
                kv_memory: 32 * 16 * shardserve::model::kv::bytes_per_token(1, 2, 8, candle_core::DType::F32),
                kv_block_size: 16,
                ..Default::default()
            };
            let svc = WorkerService::new(state.clone());
            runtime()
                .block_on(<WorkerService as pb::worker_server::Worker>::load_shard(&svc, tonic::Request::new(req)))
                .expect("loading a stage of the tiny model");
            state
        };
        [load(0), load(1)]
    })
}
