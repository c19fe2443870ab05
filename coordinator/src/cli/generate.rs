//! `shardctl generate`: one request to a running cluster, printed as text, a stream or JSON.

use super::{status_error, Target};
use shardserve_proto::v1 as pb;
use std::io::Write;

/// Arguments of `shardctl generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub target: Target,
    /// Model name (default: the only model served).
    #[arg(long, default_value = "")]
    pub model: String,
    /// The prompt.
    #[arg(long, required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A conversation through the model's chat template (the `Chat` RPC): the messages of
    /// --messages, or those of --system and --user.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a JSON file of OpenAI-style messages ([{"role": "user", "content": "..."}]).
    #[arg(long, requires = "chat", conflicts_with_all = ["system", "user"])]
    pub messages: Option<std::path::PathBuf>,
    /// With --chat: a system message.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// With --chat: the user's message.
    #[arg(long, requires = "chat")]
    pub user: Option<String>,
    /// With --chat: template variables as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long, requires = "chat")]
    pub chat_template_kwargs: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, allow_negative_numbers = true)]
    pub max_new_tokens: Option<i32>,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Top-k filtering; 0 = off.
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i32>,
    /// Repetition penalty; 1 = off.
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Random seed: same seed, same tokens.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable, at most 8).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print text as it is generated.
    #[arg(long)]
    pub stream: bool,
    /// Print one JSON document: {"text","token_ids","prompt_token_ids","finish_reason","usage"}.
    #[arg(long)]
    pub json: bool,
    /// Include per-token log-probabilities (in --json output).
    #[arg(long)]
    pub logprobs: bool,
    /// Generate past end-of-sequence tokens, up to --max-new-tokens or a stop string.
    #[arg(long)]
    pub ignore_eos: bool,
    /// With --logprobs: also the N most likely tokens at each position (at most 20).
    #[arg(long, default_value_t = 0, requires = "logprobs")]
    pub top_logprobs: u32,
    /// No end-of-sequence token before N tokens are generated.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: u32,
    /// Share cached prompt blocks only with requests of the same salt.
    #[arg(long)]
    pub cache_salt: Option<String>,
    /// The output is JSON that validates against the JSON Schema in FILE.
    #[arg(long, value_name = "FILE", group = "structured")]
    pub json_schema: Option<std::path::PathBuf>,
    /// The output is any JSON object.
    #[arg(long, group = "structured")]
    pub json_object: bool,
    /// The whole output matches this regex.
    #[arg(long, group = "structured")]
    pub regex: Option<String>,
    /// The output is exactly one of these strings (repeatable).
    #[arg(long, group = "structured")]
    pub choice: Vec<String>,
    /// The output follows the Lark grammar (llguidance's dialect) in FILE.
    #[arg(long, value_name = "FILE", group = "structured")]
    pub grammar: Option<std::path::PathBuf>,
}

impl GenerateArgs {
    /// The structured output asked for, if any.
    fn structured_output(&self) -> anyhow::Result<Option<pb::StructuredOutput>> {
        use pb::structured_output::Kind;
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
        };
        let kind = if let Some(path) = &self.json_schema {
            Kind::JsonSchema(read("--json-schema", path)?)
        } else if let Some(path) = &self.grammar {
            Kind::Grammar(read("--grammar", path)?)
        } else if let Some(r) = &self.regex {
            Kind::Regex(r.clone())
        } else if !self.choice.is_empty() {
            Kind::Choice(pb::Choices { choices: self.choice.clone() })
        } else if self.json_object {
            Kind::JsonObject(true)
        } else {
            return Ok(None);
        };
        Ok(Some(pb::StructuredOutput { kind: Some(kind) }))
    }

    fn request(&self) -> anyhow::Result<pb::GenerateRequest> {
        Ok(pb::GenerateRequest {
            model: self.model.clone(),
            prompt: self.prompt.clone().unwrap_or_default(),
            max_new_tokens: self.max_new_tokens,
            sampling: Some(pb::SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            }),
            stop: self.stop.clone(),
            logprobs: self.logprobs,
            ignore_eos: self.ignore_eos,
            top_logprobs: self.top_logprobs,
            min_tokens: self.min_tokens,
            cache_salt: self.cache_salt.clone().unwrap_or_default(),
            skip_prefix_cache: false,
            structured_output: self.structured_output()?,
        })
    }

    /// The `Chat` request of --chat.
    fn chat_request(&self) -> anyhow::Result<pb::ChatRequest> {
        let messages = match &self.messages {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--messages {}: {e}", path.display()))?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--messages {}: not JSON: {e}", path.display()))?;
                v.to_string()
            }
            None => {
                let Some(user) = &self.user else { anyhow::bail!("--chat needs --messages FILE or --user TEXT") };
                let mut m: Vec<serde_json::Value> = Vec::new();
                if let Some(s) = &self.system {
                    m.push(serde_json::json!({"role": "system", "content": s}));
                }
                m.push(serde_json::json!({"role": "user", "content": user}));
                serde_json::Value::Array(m).to_string()
            }
        };
        Ok(pb::ChatRequest {
            messages_json: messages,
            tools_json: String::new(),
            chat_template_kwargs_json: self.chat_template_kwargs.clone().unwrap_or_default(),
            add_generation_prompt: None,
            generation: Some(pb::GenerateRequest { prompt: String::new(), ..self.request()? }),
            tool_choice_json: String::new(),
        })
    }
}

/// The result of a generation, however it was received.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_token_ids: Vec<u32>,
    pub finish_reason: String,
    pub usage: (u32, u32),
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    pub logprobs: Vec<f32>,
}

impl Generated {
    /// The JSON document `--json` prints.
    pub fn to_json(&self, with_logprobs: bool) -> serde_json::Value {
        let mut v = serde_json::json!({
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.usage.0, "completion_tokens": self.usage.1, "cached_tokens": self.cached_tokens},
        });
        if with_logprobs {
            v["logprobs"] = serde_json::json!(self.logprobs);
        }
        v
    }
}

/// `shardctl generate`.
pub async fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let mut client = super::inference(&a.target).await?;
    let mut out = Generated::default();
    if a.stream || a.chat {
        let mut stream = if a.chat {
            client.chat(a.chat_request()?).await.map_err(status_error)?.into_inner()
        } else {
            client.generate_stream(a.request()?).await.map_err(status_error)?.into_inner()
        };
        let stdout = std::io::stdout();
        while let Some(msg) = stream.message().await.map_err(status_error)? {
            if !a.json && a.stream {
                let mut lock = stdout.lock();
                write!(lock, "{}", msg.text)?;
                lock.flush()?;
            }
            out.text.push_str(&msg.text);
            out.token_ids.extend(msg.token_ids);
            out.logprobs.extend(msg.logprobs);
            if !msg.prompt_token_ids.is_empty() {
                out.prompt_token_ids = msg.prompt_token_ids;
            }
            if !msg.finish_reason.is_empty() {
                out.finish_reason = msg.finish_reason;
            }
            if let Some(u) = msg.usage {
                out.usage = (u.prompt_tokens, u.completion_tokens);
                out.cached_tokens = u.cached_tokens;
            }
        }
        if !a.json {
            if a.stream {
                println!();
            } else {
                println!("{}", out.text);
            }
        }
    } else {
        let r = client.generate(a.request()?).await.map_err(status_error)?.into_inner();
        out = Generated {
            text: r.text,
            token_ids: r.token_ids,
            prompt_token_ids: r.prompt_token_ids,
            finish_reason: r.finish_reason,
            usage: r.usage.map(|u| (u.prompt_tokens, u.completion_tokens)).unwrap_or_default(),
            cached_tokens: r.usage.map_or(0, |u| u.cached_tokens),
            logprobs: r.logprobs,
        };
        if !a.json {
            println!("{}", out.text);
        }
    }
    if a.json {
        println!("{}", out.to_json(a.logprobs));
    }
    Ok(())
}
