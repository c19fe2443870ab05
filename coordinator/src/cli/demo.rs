//! `shardctl demo`: builds a tiny model when none is given, starts a local cluster, generates,
//! and prints the output and tokens/s.

use super::cluster::{LocalCluster, UpArgs};
use super::status_error;
use shardserve::config::Architecture;
use shardserve_proto::v1 as pb;
use std::time::Instant;

/// Arguments of `shardctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// A model (folder or Hub id); default: a tiny random Qwen3-shaped model built on the spot.
    #[arg(long)]
    pub model: Option<String>,
    /// Workers (pipeline stages).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The prompt.
    #[arg(long, default_value = "The quick brown fox")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: i32,
}

/// `shardctl demo`.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp = tempfile_dir()?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let mut spec = shardserve::tiny::TinySpec::new(Architecture::Qwen3);
            // Big enough that tokens/s means something, small enough to build in seconds.
            spec.num_layers = 8;
            spec.hidden_size = 512;
            spec.intermediate_size = 1536;
            spec.num_heads = 8;
            spec.num_kv_heads = 4;
            spec.head_dim = 64;
            spec.vocab_size = 1024;
            spec.init_std = 0.05;
            spec.seed = 7;
            eprintln!("building a tiny Qwen3-shaped model in {}", tmp.display());
            shardserve::tiny::write(&tmp, &spec)?;
            tmp.display().to_string()
        }
    };
    // Every other flag of `up` at its default.
    #[derive(clap::Parser)]
    struct Up {
        #[command(flatten)]
        up: UpArgs,
    }
    let workers = a.workers.to_string();
    let mut up = <Up as clap::Parser>::try_parse_from([
        "up",
        "--model",
        &model,
        "--workers",
        &workers,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])?
    .up;
    up.quiet = true;
    eprintln!("starting a coordinator and {} worker(s)", a.workers);
    let cluster = LocalCluster::start(&up).await?;
    let result = async {
        let mut client = pb::inference_client::InferenceClient::connect(cluster.url.clone()).await?;
        let req = pb::GenerateRequest { prompt: a.prompt.clone(), max_new_tokens: Some(a.max_new_tokens), ..Default::default() };
        let start = Instant::now();
        let mut stream = client.generate_stream(req).await.map_err(status_error)?.into_inner();
        let mut first = None;
        let mut tokens = 0usize;
        let mut text = String::new();
        while let Some(m) = stream.message().await.map_err(status_error)? {
            first.get_or_insert_with(|| start.elapsed());
            tokens += m.token_ids.len();
            text.push_str(&m.text);
        }
        let total = start.elapsed();
        let ttft = first.unwrap_or(total);
        let decode = total.saturating_sub(ttft).as_secs_f64();
        println!("prompt: {}", a.prompt);
        println!("output: {text:?}");
        println!(
            "{tokens} tokens in {:.2} s over {} stage(s): time to first token {:.1} ms, decode {:.1} tokens/s",
            total.as_secs_f64(),
            a.workers,
            ttft.as_secs_f64() * 1e3,
            if decode > 0.0 { (tokens.saturating_sub(1)) as f64 / decode } else { 0.0 }
        );
        // The same over the OpenAI-compatible HTTP API, with the curl line that does it.
        let mut admin = pb::admin_client::AdminClient::connect(cluster.url.clone()).await?;
        let http = admin.cluster_status(pb::ClusterStatusRequest {}).await.map_err(status_error)?.into_inner().http_address;
        let body = serde_json::json!({"prompt": a.prompt, "max_tokens": a.max_new_tokens, "temperature": 0});
        let url = format!("http://{http}/v1/completions");
        println!("over HTTP:");
        println!("  curl -s {url} -H 'Content-Type: application/json' -d '{}'", body.to_string().replace('\'', "'\\''"));
        let answer = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
            let r = ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string())?;
            Ok(serde_json::from_str(&r.into_string()?)?)
        })
        .await??;
        println!("  → {:?} ({})", answer["choices"][0]["text"].as_str().unwrap_or_default(), answer["choices"][0]["finish_reason"]);
        anyhow::Ok(())
    }
    .await;
    cluster.stop().await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("shardserve-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
