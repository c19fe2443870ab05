//! Flags the coordinator and `shardctl up` share, declared once: how requests are batched and
//! admitted, how much KV memory each stage holds, and where metrics are served.

use shardserve::placement::parse_size;

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
}

impl BatchArgs {
    /// Checks the values; the KV memory in bytes.
    pub fn validate(&self) -> anyhow::Result<Option<u64>> {
        anyhow::ensure!(self.max_batch_size >= 1, "--max-batch-size must be at least 1");
        anyhow::ensure!(self.max_batch_tokens >= 1, "--max-batch-tokens must be at least 1");
        anyhow::ensure!(self.max_waiting >= 1, "--max-waiting must be at least 1");
        anyhow::ensure!(self.kv_block_size >= 1, "--kv-block-size must be at least 1");
        anyhow::ensure!(self.max_buffered_tokens >= 1, "--max-buffered-tokens must be at least 1");
        self.kv_memory
            .as_deref()
            .map(|s| parse_size(s).map_err(|e| anyhow::anyhow!("--kv-memory {s}: {e}")))
            .transpose()
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
        a
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
}

impl HttpArgs {
    /// The same flags as arguments, for a coordinator started by `shardctl up`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = self.http_listen.iter().flat_map(|a| ["--http-listen".to_string(), a.clone()]).collect();
        a.extend(["--max-n".to_string(), self.max_n.to_string()]);
        a.extend(["--max-request-bytes".to_string(), self.max_request_bytes.to_string()]);
        a
    }

    /// Checks the values.
    pub fn validate(&self) -> anyhow::Result<crate::http::Limits> {
        anyhow::ensure!(self.max_n >= 1, "--max-n must be at least 1");
        anyhow::ensure!(self.max_request_bytes >= 1024, "--max-request-bytes must be at least 1024");
        Ok(crate::http::Limits { max_n: self.max_n, max_request_bytes: self.max_request_bytes })
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
}
