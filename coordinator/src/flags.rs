//! Flags the coordinator and `shardctl up` share, declared once: how requests are batched and
//! admitted, how much KV memory each stage holds, and where metrics are served.

use shardserve::placement::parse_size;

/// What a coordinator serves and how: the flags `coordinator` and `shardctl up` share, declared
/// once (each with its environment twin) and passed on by `up` as they were given.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The model: a local folder or a Hugging Face Hub id (ORG/NAME).
    #[arg(long, env = "SHARDSERVE_MODEL")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, env = "SHARDSERVE_REVISION")]
    pub revision: Option<String>,
    /// Name clients use for the model (default: as given by --model).
    #[arg(long, env = "SHARDSERVE_MODEL_NAME")]
    pub name: Option<String>,
    /// Address to serve on (port 0 picks a free one; printed as `listening ADDR`).
    #[arg(long, env = "SHARDSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Address the other coordinators of the cluster reach this one's gRPC port at, when it
    /// leads (default: the bound address, or this host's name and port when it listens on
    /// every interface).
    #[arg(long, env = "SHARDSERVE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Compute dtype: auto (checkpoint's on GPU, f32 on CPU), f32, bf16 or f16.
    #[arg(long, env = "SHARDSERVE_DTYPE", value_enum, default_value_t = shardserve::dtype::Dtype::Auto)]
    pub dtype: shardserve::dtype::Dtype,
    /// Quantize the attention and MLP projections as each worker loads its share (the
    /// embedding, norms and lm_head stay at --dtype).
    #[arg(long, env = "SHARDSERVE_QUANTIZE", value_enum)]
    pub quantize: Option<shardserve::quant::Quantize>,
    /// The GGUF file of the model to serve, for a folder or Hub repo holding several (as
    /// transformers' `gguf_file`); one holding a single GGUF file and no config.json needs none.
    #[arg(long, env = "SHARDSERVE_GGUF_FILE")]
    pub gguf_file: Option<String>,
    /// Dequantize a GGUF checkpoint's weights to --dtype as the workers load them (as
    /// transformers runs a GGUF file), instead of computing with its block types.
    #[arg(long, env = "SHARDSERVE_DEQUANTIZE")]
    pub dequantize: bool,
    /// Workers (pipeline stages) to spread the model over; waits until that many joined.
    #[arg(long, env = "SHARDSERVE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Tensor-parallel ranks per pipeline stage: each stage is a group of this many workers
    /// that split every layer (--workers = stages × --tp).
    #[arg(long, env = "SHARDSERVE_TP", default_value_t = 1)]
    pub tp: usize,
    /// Copies of the model, each its own placement, scheduler and KV pools over --workers /
    /// N workers (stages × --tp), requests routed among them (--router); `auto`: as many as
    /// the fleet holds, each on the fewest workers that fit the model and its KV reserve.
    /// Workers that complete no replica wait as spares. Default: one placement over the fleet.
    #[arg(long, env = "SHARDSERVE_REPLICAS")]
    pub replicas: Option<crate::engine::ReplicaCount>,
    /// How requests are spread over replicas: kv (where the longest prefix of the prompt is
    /// cached, weighed against load), least-loaded or round-robin.
    #[arg(long, env = "SHARDSERVE_ROUTER", value_enum, default_value_t = crate::router::RouterPolicy::Kv)]
    pub router: crate::router::RouterPolicy,
    /// Workers make seeded random weights of the model's shapes instead of reading its
    /// checkpoint (benchmarks of shapes whose weights are not on disk).
    #[arg(long, env = "SHARDSERVE_RANDOM_WEIGHTS")]
    pub random_weights: bool,
    /// Cap on prompt + generated tokens (default: the model's max_position_embeddings).
    #[arg(long, env = "SHARDSERVE_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,
    /// Requests per model (running or waiting) before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SHARDSERVE_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    #[command(flatten)]
    pub batch: crate::flags::BatchArgs,
    #[command(flatten)]
    pub http: crate::flags::HttpArgs,
    #[command(flatten)]
    pub auth: crate::flags::AuthArgs,
    #[command(flatten)]
    pub cluster_tls: shardserve::tls::ClusterTlsArgs,
    /// Seconds a worker's lease lasts without a keep-alive.
    #[arg(long, env = "SHARDSERVE_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl_s: u64,
    /// Seconds one pipeline step may take before the request fails.
    #[arg(long, env = "SHARDSERVE_STEP_TIMEOUT", default_value_t = 300)]
    pub step_timeout_s: u64,
    /// Placement strategy over the workers, as transformers' device_map: auto, balanced,
    /// balanced_low_0 or sequential.
    #[arg(long, env = "SHARDSERVE_STRATEGY", default_value = "auto")]
    pub strategy: String,
    /// Weight budget per worker by index in join order, e.g. 0=2GiB,1=2GiB (default: each
    /// worker's free memory less --kv-reserve).
    #[arg(long, env = "SHARDSERVE_MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// An explicit placement: a JSON file of Hugging Face module names → worker index or id.
    #[arg(long, env = "SHARDSERVE_DEVICE_MAP")]
    pub device_map: Option<std::path::PathBuf>,
    /// Share of each worker's free memory kept for KV caches and activations.
    #[arg(long, env = "SHARDSERVE_KV_RESERVE", default_value_t = 0.1)]
    pub kv_reserve: f64,
    /// Most prompt tokens per pipeline step; longer prompts are prefilled in chunks.
    #[arg(long, env = "SHARDSERVE_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub etcd: shardserve::membership::EtcdArgs,
    /// The cluster's name (its etcd keys live under /shardserve/<cluster>/).
    #[arg(long, env = "SHARDSERVE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Times a request may move to a new placement when a stage under it dies, keeping the
    /// tokens it already has (0: it fails with UNAVAILABLE at once).
    #[arg(long, env = "SHARDSERVE_MIGRATION_LIMIT", default_value_t = 0)]
    pub migration_limit: usize,
    /// Seconds a migrating request waits for the new placement.
    #[arg(long, env = "SHARDSERVE_MIGRATION_WAIT", default_value_t = 60)]
    pub migration_wait_s: u64,
    /// Seconds a new request waits for the model to be placed again after a stage was lost,
    /// before it gets UNAVAILABLE.
    #[arg(long, env = "SHARDSERVE_REPLAN_WAIT", default_value_t = 10)]
    pub replan_wait_s: u64,
}

impl ServeArgs {
    /// The same flags as arguments, for a coordinator started by `shardctl up`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["--model".into(), self.model.clone()];
        let mut opt = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.extend([flag.to_string(), v]);
            }
        };
        opt("--revision", self.revision.clone());
        opt("--name", self.name.clone());
        opt("--max-total-tokens", self.max_total_tokens.map(|m| m.to_string()));
        opt("--max-memory", self.max_memory.clone());
        opt("--device-map", self.device_map.as_ref().map(|p| p.display().to_string()));
        opt("--advertise", self.advertise.clone());
        opt("--replicas", self.replicas.map(|r| r.to_string()));
        opt("--quantize", self.quantize.map(|q| q.to_string()));
        opt("--gguf-file", self.gguf_file.clone());
        if self.dequantize {
            a.push("--dequantize".into());
        }
        for (flag, v) in [
            ("--listen", self.listen.clone()),
            ("--dtype", self.dtype.to_string()),
            ("--workers", self.workers.to_string()),
            ("--tp", self.tp.to_string()),
            ("--router", clap::ValueEnum::to_possible_value(&self.router).expect("a named policy").get_name().to_string()),
            ("--max-concurrent-requests", self.max_concurrent_requests.to_string()),
            ("--lease-ttl-s", self.lease_ttl_s.to_string()),
            ("--step-timeout-s", self.step_timeout_s.to_string()),
            ("--strategy", self.strategy.clone()),
            ("--kv-reserve", self.kv_reserve.to_string()),
            ("--prefill-chunk", self.prefill_chunk.to_string()),
            ("--cluster", self.cluster.clone()),
            ("--migration-limit", self.migration_limit.to_string()),
            ("--migration-wait-s", self.migration_wait_s.to_string()),
            ("--replan-wait-s", self.replan_wait_s.to_string()),
        ] {
            a.extend([flag.to_string(), v]);
        }
        if self.random_weights {
            a.push("--random-weights".into());
        }
        a.extend(self.batch.to_args());
        a.extend(self.http.to_args());
        a.extend(self.auth.to_args());
        a.extend(self.cluster_tls.to_args());
        a.extend(self.etcd.to_args());
        a
    }
}

/// Batching, admission and KV memory.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Most sequences in one step. Each pipeline stage works on a step of its own, so up to
    /// this many times the stages run at once.
    #[arg(long, env = "SHARDSERVE_MAX_BATCH_SIZE", default_value_t = 64)]
    pub max_batch_size: usize,
    /// Most tokens in one step, prefill chunks included.
    #[arg(long, env = "SHARDSERVE_MAX_BATCH_TOKENS", default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Requests waiting for admission before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SHARDSERVE_MAX_WAITING", default_value_t = 512)]
    pub max_waiting: usize,
    /// KV cache each stage (each tensor-parallel rank) preallocates, e.g. 2GiB (default: half
    /// the --kv-reserve share of the worker's free memory). Set aside from the weights' budget.
    #[arg(long, env = "SHARDSERVE_KV_MEMORY")]
    pub kv_memory: Option<String>,
    /// Tokens per KV block.
    #[arg(long, env = "SHARDSERVE_KV_BLOCK_SIZE", default_value_t = 16)]
    pub kv_block_size: usize,
    /// Generated tokens buffered for a client that does not read its stream; past them it is
    /// cancelled with RESOURCE_EXHAUSTED (the others never wait for it).
    #[arg(long, env = "SHARDSERVE_MAX_BUFFERED_TOKENS", default_value_t = 256)]
    pub max_buffered_tokens: usize,
    /// Serve Prometheus metrics on this address (`GET /metrics`; port 0 picks a free one). With
    /// `shardctl up`, every worker serves them too, on a free port of the same host.
    #[arg(long, env = "SHARDSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Reuse the KV blocks of prompt prefixes already computed: a request computes only what
    /// follows its longest cached prefix of whole blocks.
    #[arg(long, env = "SHARDSERVE_PREFIX_CACHING", value_enum, default_value_t = OnOff::On)]
    pub prefix_caching: OnOff,
    /// Who shares cached prefixes: shared (every client; `cache_salt` separates requests) or
    /// per-key (only requests made with the same API key; needs --api-keys-file or
    /// --admin-keys-file).
    #[arg(long, env = "SHARDSERVE_PREFIX_CACHE_SCOPE", value_enum, default_value_t = crate::engine::PrefixCacheScope::Shared)]
    pub prefix_cache_scope: crate::engine::PrefixCacheScope,
}

/// A feature switched on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl std::fmt::Display for OnOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if *self == OnOff::On { "on" } else { "off" })
    }
}

impl BatchArgs {
    /// Checks the values; the KV memory in bytes.
    pub fn validate(&self) -> anyhow::Result<Option<u64>> {
        anyhow::ensure!(self.max_batch_size >= 1, "--max-batch-size must be at least 1");
        anyhow::ensure!(self.max_batch_tokens >= 1, "--max-batch-tokens must be at least 1");
        anyhow::ensure!(self.max_waiting >= 1, "--max-waiting must be at least 1");
        anyhow::ensure!(self.kv_block_size >= 1, "--kv-block-size must be at least 1");
        anyhow::ensure!(self.max_buffered_tokens >= 1, "--max-buffered-tokens must be at least 1");
        self.kv_memory.as_deref().map(|s| parse_size(s).map_err(|e| anyhow::anyhow!("--kv-memory {s}: {e}"))).transpose()
    }

    /// The same flags as arguments, for a coordinator started by `shardctl up`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--max-batch-size".to_string(),
            self.max_batch_size.to_string(),
            "--max-batch-tokens".into(),
            self.max_batch_tokens.to_string(),
            "--max-waiting".into(),
            self.max_waiting.to_string(),
            "--kv-block-size".into(),
            self.kv_block_size.to_string(),
            "--max-buffered-tokens".into(),
            self.max_buffered_tokens.to_string(),
        ];
        if let Some(m) = &self.kv_memory {
            a.extend(["--kv-memory".to_string(), m.clone()]);
        }
        if let Some(m) = &self.metrics_listen {
            a.extend(["--metrics-listen".to_string(), m.clone()]);
        }
        a.extend(["--prefix-caching".to_string(), self.prefix_caching.to_string()]);
        let scope = clap::ValueEnum::to_possible_value(&self.prefix_cache_scope).expect("every scope has a name");
        a.extend(["--prefix-cache-scope".to_string(), scope.get_name().to_string()]);
        a
    }
}

/// Client auth.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// A file of API keys (one per line), required on Inference and the HTTP API when given;
    /// read again whenever it changes.
    #[arg(long, env = "SHARDSERVE_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// A file of admin keys (one per line), required on Admin (and accepted on Inference) when
    /// given; read again whenever it changes.
    #[arg(long, env = "SHARDSERVE_ADMIN_KEYS_FILE")]
    pub admin_keys_file: Option<std::path::PathBuf>,
    /// Do not serve gRPC reflection.
    #[arg(long, env = "SHARDSERVE_NO_REFLECTION")]
    pub no_reflection: bool,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (port 0 picks a free
    /// one, printed as `health ADDR`): for probes that cannot speak TLS (Kubernetes' gRPC
    /// probes) when the gRPC port is served with --tls-cert.
    #[arg(long, env = "SHARDSERVE_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    /// Serve the client ports (gRPC, and HTTP with --http-listen) over TLS with this
    /// certificate chain (PEM), read again whenever it changes. Needs --tls-key.
    #[arg(long, env = "SHARDSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SHARDSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA (PEM) that signed the other coordinators' --tls-cert: a follower hands requests to
    /// the leader over the leader's gRPC port (default: the cluster CA, --cluster-ca).
    #[arg(long, env = "SHARDSERVE_PEER_CA")]
    pub peer_ca: Option<std::path::PathBuf>,
}

impl AuthArgs {
    /// Opens the key files (each must hold a key).
    pub fn load(&self) -> anyhow::Result<crate::auth::Auth> {
        let open = |p: &Option<std::path::PathBuf>| -> anyhow::Result<_> {
            p.as_deref().map(|p| crate::auth::KeyFile::open(p).map(std::sync::Arc::new)).transpose()
        };
        Ok(crate::auth::Auth { api: open(&self.api_keys_file)?, admin: open(&self.admin_keys_file)? })
    }

    /// The same flags as arguments, for a coordinator started by `shardctl up`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(p) = &self.api_keys_file {
            a.extend(["--api-keys-file".to_string(), p.display().to_string()]);
        }
        if let Some(p) = &self.admin_keys_file {
            a.extend(["--admin-keys-file".to_string(), p.display().to_string()]);
        }
        if self.no_reflection {
            a.push("--no-reflection".into());
        }
        if let Some(h) = &self.health_listen {
            a.extend(["--health-listen".to_string(), h.clone()]);
        }
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            a.extend(["--tls-cert".to_string(), c.display().to_string(), "--tls-key".into(), k.display().to_string()]);
        }
        if let Some(p) = &self.peer_ca {
            a.extend(["--peer-ca".to_string(), p.display().to_string()]);
        }
        a
    }

    /// The certificate files to serve the client ports with, when TLS is asked for.
    pub fn tls(&self) -> anyhow::Result<Option<std::sync::Arc<shardserve::tls::CertFiles>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some(shardserve::tls::CertFiles::open(c, k, ("--tls-cert", "--tls-key"))?)),
            _ => Ok(None),
        }
    }

    /// A key `shardctl up` itself presents to the coordinator it started: the first admin key,
    /// else the first API key.
    pub fn own_key(&self) -> anyhow::Result<Option<String>> {
        for p in [&self.admin_keys_file, &self.api_keys_file].into_iter().flatten() {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            if let Some(k) = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')) {
                return Ok(Some(k.to_string()));
            }
        }
        Ok(None)
    }
}

/// The OpenAI-compatible HTTP API.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health, /tokenize, /detokenize) on this address (port 0 picks a free one; printed as
    /// `http ADDR`).
    #[arg(long, env = "SHARDSERVE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Most sequences one HTTP request may ask for (`n`).
    #[arg(long, env = "SHARDSERVE_MAX_N", default_value_t = 16)]
    pub max_n: u32,
    /// Largest HTTP request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "SHARDSERVE_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub max_request_bytes: usize,
    /// How tool calls are read out of a chat response that was offered tools: auto (the format
    /// the model's chat template asks for: Hermes/Qwen `<tool_call>`, Llama 3 JSON or Mistral
    /// `[TOOL_CALLS]`), none (calls stay in the text), or one of those formats for every model.
    #[arg(long, env = "SHARDSERVE_TOOL_CALL_PARSER", value_enum, default_value_t = crate::frontend::output::ToolCallParser::Auto)]
    pub tool_call_parser: crate::frontend::output::ToolCallParser,
    /// Whether a chat response's `<think>...</think>` goes to `reasoning_content`: auto (for
    /// models whose chat template closes such a block, as Qwen3's), none, or think (every model).
    #[arg(long, env = "SHARDSERVE_REASONING_PARSER", value_enum, default_value_t = crate::frontend::output::ReasoningParser::Auto)]
    pub reasoning_parser: crate::frontend::output::ReasoningParser,
}

impl HttpArgs {
    /// The same flags as arguments, for a coordinator started by `shardctl up`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = self.http_listen.iter().flat_map(|a| ["--http-listen".to_string(), a.clone()]).collect();
        a.extend(["--max-n".to_string(), self.max_n.to_string()]);
        a.extend(["--max-request-bytes".to_string(), self.max_request_bytes.to_string()]);
        for (flag, v) in [
            ("--tool-call-parser", clap::ValueEnum::to_possible_value(&self.tool_call_parser)),
            ("--reasoning-parser", clap::ValueEnum::to_possible_value(&self.reasoning_parser)),
        ] {
            a.extend([flag.to_string(), v.expect("a named choice").get_name().to_string()]);
        }
        a
    }

    /// Checks the values.
    pub fn validate(&self) -> anyhow::Result<crate::http::Limits> {
        anyhow::ensure!(self.max_n >= 1, "--max-n must be at least 1");
        anyhow::ensure!(self.max_request_bytes >= 1024, "--max-request-bytes must be at least 1024");
        Ok(crate::http::Limits {
            max_n: self.max_n,
            max_request_bytes: self.max_request_bytes,
            tool_call_parser: self.tool_call_parser,
            reasoning_parser: self.reasoning_parser,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        batch: BatchArgs,
    }

    #[test]
    fn flags_round_trip_through_to_args() {
        let cli = Cli::parse_from(["x", "--max-batch-size", "8", "--kv-memory", "64MiB", "--metrics-listen", "127.0.0.1:0"]);
        assert_eq!(cli.batch.validate().unwrap(), Some(64 << 20));
        let again = Cli::parse_from(std::iter::once("x".to_string()).chain(cli.batch.to_args()));
        assert_eq!(again.batch.max_batch_size, 8);
        assert_eq!(again.batch.kv_memory.as_deref(), Some("64MiB"));
        assert_eq!(again.batch.metrics_listen.as_deref(), Some("127.0.0.1:0"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cli = Cli::parse_from(["x", "--kv-memory", "lots"]);
        assert!(cli.batch.validate().unwrap_err().to_string().contains("--kv-memory lots"));
        let cli = Cli::parse_from(["x", "--max-batch-size", "0"]);
        assert!(cli.batch.validate().unwrap_err().to_string().contains("--max-batch-size"));
    }

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn every_serve_flag_reaches_the_coordinator_up_starts() {
        let given = [
            "x",
            "--model",
            "M",
            "--revision",
            "r1",
            "--name",
            "n",
            "--listen",
            "127.0.0.1:0",
            "--dtype",
            "bf16",
            "--quantize",
            "q4_0",
            "--gguf-file",
            "m-Q8_0.gguf",
            "--dequantize",
            "--workers",
            "4",
            "--tp",
            "2",
            "--random-weights",
            "--max-total-tokens",
            "99",
            "--max-concurrent-requests",
            "7",
            "--lease-ttl-s",
            "3",
            "--step-timeout-s",
            "9",
            "--strategy",
            "balanced",
            "--max-memory",
            "0=1GiB",
            "--device-map",
            "/m.json",
            "--kv-reserve",
            "0.2",
            "--prefill-chunk",
            "64",
            "--etcd",
            "http://e:2379",
            "--cluster",
            "c",
            "--migration-limit",
            "2",
            "--migration-wait-s",
            "5",
            "--replan-wait-s",
            "6",
            "--max-batch-size",
            "8",
            "--http-listen",
            "127.0.0.1:0",
            "--max-n",
            "3",
            "--api-keys-file",
            "/k",
            "--admin-keys-file",
            "/a",
            "--no-reflection",
            "--prefix-caching",
            "off",
            "--prefix-cache-scope",
            "per-key",
            "--advertise",
            "coordinator-1:50051",
            "--peer-ca",
            "/ca.pem",
        ];
        let first = Serve::parse_from(given).serve;
        let again = Serve::parse_from(std::iter::once("x".to_string()).chain(first.to_args())).serve;
        assert_eq!(format!("{first:?}"), format!("{again:?}"));
        assert_eq!((again.workers, again.tp, again.step_timeout_s, again.migration_wait_s), (4, 2, 9, 5));
        assert_eq!(again.name.as_deref(), Some("n"));
        assert!(again.random_weights && again.auth.no_reflection);
        assert_eq!(again.quantize, Some(shardserve::quant::Quantize::Q4_0));
        assert_eq!((again.gguf_file.as_deref(), again.dequantize), (Some("m-Q8_0.gguf"), true));
        assert_eq!(again.batch.prefix_caching, OnOff::Off);
        assert_eq!(again.batch.prefix_cache_scope, crate::engine::PrefixCacheScope::PerKey);
    }
}
