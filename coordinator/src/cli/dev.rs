//! `shardctl dev`: developer tools — tiny random checkpoints in the exact HF layout.

use anyhow::bail;
use shardserve::config::Architecture;
use shardserve::dtype::Dtype;
use shardserve::tiny::{self, TinySpec};
use std::path::PathBuf;

/// Developer tools.
#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Write a random-weight checkpoint (config, safetensors, trained BPE tokenizer).
    TinyModel(TinyModelArgs),
    /// Run a checkpoint on the CPU and on another device and compare logits and greedy tokens
    /// (one JSON line).
    CheckDevice(CheckDeviceArgs),
    /// Create an NCCL communicator on a GPU and time an all-reduce (one JSON line; a build
    /// with --features cuda).
    CheckNccl(CheckNcclArgs),
    /// Make a certificate authority and a server, a client and a node certificate signed by it
    /// (for tests, Compose and Kubernetes Secrets): ca.pem, ca.key, server.pem, server.key,
    /// client.pem, client.key, and node.pem, node.key for the cluster's own links
    /// (--cluster-cert, --cluster-key).
    Certs(CertsArgs),
    /// Simulate a model's replicas serving a request trace (Mooncake JSONL or synthetic) and
    /// compare routing policies: TTFT, throughput and prefix cache hits.
    SimulateRouter(super::simulate::SimulateArgs),
}

/// Arguments of `shardctl dev certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// The folder to write the files into (made if missing; existing files are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Names the server certificate is valid for: DNS names or IP addresses, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
    /// Days the certificates are valid, from now.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// Arguments of `shardctl dev check-device`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckDeviceArgs {
    /// The checkpoint (a folder or Hub id).
    #[arg(long)]
    pub model: String,
    /// The device compared with the CPU: cuda or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Prompt to run.
    #[arg(long, default_value = "The quick brown fox jumps over the lazy dog")]
    pub prompt: String,
    /// Greedy tokens compared after the prompt.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
}

/// Arguments of `shardctl dev check-nccl`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckNcclArgs {
    /// The GPU: cuda or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Elements (f32) of the tensor all-reduced.
    #[arg(long, default_value_t = 1 << 22)]
    pub elements: usize,
}

/// Arguments of `shardctl dev tiny-model`.
#[derive(Debug, Clone, clap::Args)]
pub struct TinyModelArgs {
    /// Architecture: qwen3 or llama.
    #[arg(long, default_value = "qwen3")]
    pub arch: String,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype on disk.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Number of safetensors files (more than 1 writes a sharded index).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Decoder layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP intermediate size.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (GQA).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension (Qwen3 decouples it from hidden / heads).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Target vocabulary size of the trained tokenizer.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// max_position_embeddings.
    #[arg(long)]
    pub max_position_embeddings: Option<usize>,
    /// Tie lm_head to the embedding (true/false; default: qwen3 true, llama false).
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// config.json's vocab_size, when larger than the trained tokenizer's (a real model's
    /// embedding shape, e.g. 151936 for Qwen3).
    #[arg(long)]
    pub config_vocab: Option<usize>,
    /// Write only config and tokenizer files, no weights (for `up --random-weights`).
    #[arg(long)]
    pub no_weights: bool,
    /// Write the model as one GGUF file, `model-TYPE.gguf`, its projections in this type
    /// (the folder then holds only that file, as a GGUF repo does).
    #[arg(long, value_enum, conflicts_with_all = ["no_weights", "shards"])]
    pub gguf: Option<shardserve::gguf::GgufType>,
    /// Write the projections in FP8 (E4M3) with a scale per block of ROWSxCOLS, as Qwen's FP8
    /// checkpoints ship them (`--fp8 128x128`).
    #[arg(long, value_name = "ROWSxCOLS", value_parser = parse_block, conflicts_with_all = ["no_weights", "gguf"])]
    pub fp8: Option<[usize; 2]>,
}

/// `128x128`: a block of rows and columns, each at least 1.
fn parse_block(s: &str) -> Result<[usize; 2], String> {
    let parse = |n: &str| n.trim().parse::<usize>().ok().filter(|n| *n > 0);
    match s.split_once(['x', 'X']).map(|(r, c)| (parse(r), parse(c))) {
        Some((Some(r), Some(c))) => Ok([r, c]),
        _ => Err(format!("{s:?} is not a block of ROWSxCOLS, each at least 1 (e.g. 128x128)")),
    }
}

impl TryFrom<&TinyModelArgs> for TinySpec {
    type Error = anyhow::Error;

    fn try_from(a: &TinyModelArgs) -> anyhow::Result<Self> {
        let arch = match a.arch.as_str() {
            "qwen3" => Architecture::Qwen3,
            "llama" => Architecture::Llama,
            other => bail!("--arch {other:?}: expected qwen3 or llama"),
        };
        let mut s = TinySpec::new(arch);
        s.dtype = match a.dtype {
            Dtype::Auto => bail!("--dtype: name the dtype on disk (f32, bf16 or f16)"),
            d => d.resolve(None, false),
        };
        if a.shards == 0 {
            bail!("--shards must be at least 1");
        }
        s.shards = a.shards;
        s.seed = a.seed;
        s.weights = !a.no_weights;
        s.config_vocab = a.config_vocab;
        s.fp8_block = a.fp8;
        if let Some(v) = a.layers {
            s.num_layers = v;
        }
        if let Some(v) = a.hidden {
            s.hidden_size = v;
            if a.head_dim.is_none() && arch == Architecture::Llama {
                s.head_dim = v / a.heads.unwrap_or(s.num_heads).max(1);
            }
        }
        if let Some(v) = a.intermediate {
            s.intermediate_size = v;
        }
        if let Some(v) = a.heads {
            s.num_heads = v;
            if a.head_dim.is_none() && arch == Architecture::Llama {
                s.head_dim = s.hidden_size / v.max(1);
            }
        }
        if let Some(v) = a.kv_heads {
            s.num_kv_heads = v;
        }
        if let Some(v) = a.head_dim {
            s.head_dim = v;
        }
        if let Some(v) = a.vocab {
            if v < 300 {
                bail!("--vocab {v}: a byte-level BPE needs at least 300 tokens (256 bytes + specials + merges)");
            }
            s.vocab_size = v;
        }
        if let Some(v) = a.max_position_embeddings {
            s.max_position_embeddings = v;
        }
        if let Some(v) = a.tie_embeddings {
            s.tie_word_embeddings = v;
        }
        for (name, v) in [
            ("layers", s.num_layers),
            ("hidden", s.hidden_size),
            ("intermediate", s.intermediate_size),
            ("heads", s.num_heads),
            ("kv-heads", s.num_kv_heads),
            ("head-dim", s.head_dim),
            ("max-position-embeddings", s.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("--{name} must be at least 1");
            }
        }
        Ok(s)
    }
}

/// `shardctl dev ...`.
pub fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::TinyModel(a) => {
            let spec = TinySpec::try_from(&a)?;
            if let Some(ty) = a.gguf {
                let tmp = tempfile::tempdir()?;
                tiny::write(tmp.path(), &spec)?;
                std::fs::create_dir_all(&a.out)?;
                let name = format!("model-{}.gguf", clap::ValueEnum::to_possible_value(&ty).expect("named").get_name());
                shardserve::gguf::write_checkpoint(tmp.path(), &a.out.join(&name), ty)?;
                println!("wrote {} ({} {} layers)", a.out.join(name).display(), a.arch, spec.num_layers);
                return Ok(());
            }
            tiny::write(&a.out, &spec)?;
            println!("wrote {} ({} {} layers, {:?}, {} file(s))", a.out.display(), a.arch, spec.num_layers, spec.dtype, spec.shards);
            Ok(())
        }
        DevCommand::CheckDevice(a) => check_device(&a),
        DevCommand::CheckNccl(a) => check_nccl(&a),
        DevCommand::Certs(a) => certs(&a),
        DevCommand::SimulateRouter(a) => super::simulate::run(a),
    }
}

/// `shardctl dev certs`: an ECDSA P-256 CA, and a server (serverAuth, the --hosts as subject
/// alternative names), a client (clientAuth) and a node certificate (both: what each process of
/// the cluster presents on its links, `--cluster-cert`) it signs.
fn certs(a: &CertsArgs) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    anyhow::ensure!(!a.hosts.iter().any(|h| h.trim().is_empty()), "--hosts: an empty name");
    anyhow::ensure!(a.days >= 1, "--days must be at least 1");
    let now = time::OffsetDateTime::now_utc();
    let valid = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::days(i64::from(a.days));
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "shardserve cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    valid(&mut ca);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: &[ExtendedKeyUsagePurpose]| -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usage.to_vec();
        valid(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let hosts: Vec<String> = a.hosts.iter().map(|h| h.trim().to_string()).collect();
    let (server, server_key) = leaf(hosts.clone(), &hosts[0], &[ExtendedKeyUsagePurpose::ServerAuth])?;
    let (client, client_key) = leaf(vec!["shardserve-client".into()], "shardserve-client", &[ExtendedKeyUsagePurpose::ClientAuth])?;
    let both = [ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let (node, node_key) = leaf(hosts.clone(), "shardserve-node", &both)?;
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    for (name, text, private) in [
        ("ca.pem", &ca_pem, false),
        ("ca.key", &ca_key_pem, true),
        ("server.pem", &server, false),
        ("server.key", &server_key, true),
        ("client.pem", &client, false),
        ("client.key", &client_key, true),
        ("node.pem", &node, false),
        ("node.key", &node_key, true),
    ] {
        let path = a.out.join(name);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        // Private keys are readable by their owner only.
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, if private { 0o600 } else { 0o644 });
        let mut f = opts.open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        if private {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
    }
    println!(
        "wrote {}: ca.pem ca.key server.pem server.key (for {}) client.pem client.key node.pem node.key, valid {} days",
        a.out.display(),
        hosts.join(", "),
        a.days
    );
    Ok(())
}

/// Greedy decoding of `n` tokens on one whole-model shard: (tokens, logits after the prompt).
fn greedy(shard: &shardserve::model::Shard, prompt: &[u32], n: usize) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
    use shardserve::model::{StageInput, StageOutput};
    let mut cache = shard.new_pool(64, 16)?;
    let (mut tokens, mut first) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    for _ in 0..n {
        let logits: Vec<f32> = match shard.forward(&mut cache, 0, StageInput::Tokens(&feed))? {
            StageOutput::Logits(l) => l.to_vec1()?,
            StageOutput::Hidden(_) => bail!("a whole-model shard returned hidden states"),
        };
        if first.is_empty() {
            first = logits.clone();
        }
        let t = shardserve::sampling::argmax(&logits);
        tokens.push(t);
        feed = vec![t];
    }
    Ok((tokens, first))
}

fn check_device(a: &CheckDeviceArgs) -> anyhow::Result<()> {
    use shardserve::model::{Shard, StageSpec};
    let files = shardserve::hub::resolve(&a.model, None)?;
    let cfg = files.config()?;
    let tok = files.tokenizer()?;
    let prompt = tok.encode(&a.prompt)?;
    let device = shardserve::device::parse_device(&a.device)?;
    let dtype = candle_core::DType::F32;
    let cpu = Shard::load(&cfg, StageSpec::whole(&cfg), &files.weights(), dtype, &candle_core::Device::Cpu)?;
    let other = Shard::load(&cfg, StageSpec::whole(&cfg), &files.weights(), dtype, &device)?;
    let (want, want_logits) = greedy(&cpu, &prompt, a.tokens)?;
    let (got, got_logits) = greedy(&other, &prompt, a.tokens)?;
    let diff = want_logits.iter().zip(&got_logits).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let ok = got == want && diff < 1e-3;
    println!(
        "{}",
        serde_json::json!({
            "check": "cpu_vs_device_logits", "device": a.device, "model": a.model, "dtype": "f32",
            "max_abs_logit_diff": diff, "tokens_equal": got == want, "tokens": a.tokens, "ok": ok,
        })
    );
    if !ok {
        bail!("{} disagrees with the CPU: logits differ by up to {diff}, tokens {got:?} vs {want:?}", a.device);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn check_nccl(a: &CheckNcclArgs) -> anyhow::Result<()> {
    use shardserve::collective::{nccl, Collective};
    let device = shardserve::device::parse_device(&a.device)?;
    let started = std::time::Instant::now();
    let id = nccl::unique_id()?;
    let comm = nccl::NcclCollective::init(&device, 0, 1, &id, std::time::Duration::from_secs(60))?;
    let init_ms = started.elapsed().as_secs_f64() * 1e3;
    let x = candle_core::Tensor::arange(0f32, a.elements as f32, &device)?;
    let y = comm.all_reduce_sum(&x)?;
    let equal = y.to_vec1::<f32>()? == x.to_vec1::<f32>()?;
    let rounds = 20;
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        comm.all_reduce_sum(&x)?;
    }
    device.synchronize()?;
    let us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "{}",
        serde_json::json!({
            "check": "nccl_all_reduce", "device": a.device, "ranks": 1, "elements": a.elements,
            "init_ms": init_ms, "us_per_all_reduce": us, "ok": equal,
        })
    );
    if !equal {
        bail!("a 1-rank all-reduce changed its input");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check_nccl(_a: &CheckNcclArgs) -> anyhow::Result<()> {
    bail!("{}", shardserve::device::NO_CUDA)
}

#[cfg(test)]
mod tests {
    use super::parse_block;

    #[test]
    fn an_fp8_block_is_rows_by_columns() {
        assert_eq!(parse_block("128x128"), Ok([128, 128]));
        assert_eq!(parse_block("32X48"), Ok([32, 48]));
        for bad in ["128", "0x128", "x", "ax1", "1x-2"] {
            assert!(parse_block(bad).unwrap_err().contains("ROWSxCOLS"), "{bad}");
        }
    }
}
