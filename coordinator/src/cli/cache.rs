//! `shardctl cache`: the shared Hugging Face cache, filled ahead of the servers (what a
//! Kubernetes Job runs before the coordinator and workers start on a shared volume).

use anyhow::Context;

/// Subcommands of `shardctl cache`.
#[derive(Debug, clap::Subcommand)]
pub enum CacheCommand {
    /// Download a model's files (config, tokenizer, weights) into the Hugging Face cache
    /// (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) from HF_ENDPOINT, and
    /// print its snapshot folder. Safe to run in many processes at once: each file is
    /// downloaded once between them, and a run that was killed is finished by the next.
    Fill(FillArgs),
}

/// Arguments of `shardctl cache fill`.
#[derive(Debug, Clone, clap::Args)]
pub struct FillArgs {
    /// The model: a Hub id (ORG/NAME). A local folder is printed as it is.
    #[arg(long, env = "SHARDSERVE_MODEL")]
    pub model: String,
    /// Hub revision: a branch, tag or commit (default main).
    #[arg(long, env = "SHARDSERVE_REVISION")]
    pub revision: Option<String>,
    /// The GGUF file to fetch, of a repo holding several (one holding a single GGUF file and
    /// no config.json needs none).
    #[arg(long)]
    pub gguf_file: Option<String>,
    /// Print {"model","revision","commit","snapshot"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `shardctl cache`.
pub fn run(c: CacheCommand) -> anyhow::Result<()> {
    match c {
        CacheCommand::Fill(a) => fill(a),
    }
}

fn fill(a: FillArgs) -> anyhow::Result<()> {
    // Download progress goes to stderr; stdout carries only the answer.
    crate::util::init_tracing();
    let files = shardserve::hub::fill(&a.model, a.revision.as_deref(), a.gguf_file.as_deref())
        .with_context(|| format!("filling the cache with {}", a.model))?;
    if a.json {
        let doc = serde_json::json!({
            "model": a.model,
            "revision": a.revision.as_deref().unwrap_or("main"),
            "commit": files.commit,
            "snapshot": files.dir,
        });
        println!("{doc}");
    } else {
        println!("{}", files.dir.display());
    }
    Ok(())
}
