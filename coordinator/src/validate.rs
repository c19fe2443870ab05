//! Parses a client's `GenerateRequest` into a [`ValidRequest`], naming the field at fault, with
//! the model's generation_config.json filling what the request leaves unset.

use crate::engine::{ModelEntry, ValidRequest};
use crate::error::ServeError;
use shardserve::sampling::SamplingParams;
use shardserve_proto::v1 as pb;

/// Most stop sequences a request may carry.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop sequence accepted, in bytes.
pub const MAX_STOP_BYTES: usize = 512;
/// Most alternatives per token a request may ask for (`top_logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Longest `cache_salt` accepted, in bytes.
pub const MAX_CACHE_SALT_BYTES: usize = 1024;
/// max_new_tokens when neither the request nor generation_config.json sets it.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 100;

fn invalid(m: String) -> ServeError {
    ServeError::InvalidArgument(m)
}

/// How a request's prompt text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// A completion's prompt: with the special tokens the tokenizer's post-processor adds.
    Text,
    /// A rendered chat template, which wrote its special tokens itself: none added (as
    /// transformers' `apply_chat_template(tokenize=True)`).
    Chat,
}

/// Validates `req` for `model`, its prompt a completion's.
pub fn validate(model: &ModelEntry, req: &pb::GenerateRequest) -> Result<ValidRequest, ServeError> {
    validate_as(model, req, PromptKind::Text)
}

/// Validates `req` for `model`, its prompt tokenized once as `kind` says: the context-length
/// checks run on the very ids the engine gets.
pub fn validate_as(model: &ModelEntry, req: &pb::GenerateRequest, kind: PromptKind) -> Result<ValidRequest, ServeError> {
    if req.prompt.is_empty() {
        return Err(invalid("prompt must not be empty".into()));
    }
    let s = req.sampling.unwrap_or_default();
    let g = &model.generation;
    let sample_by_default = g.do_sample == Some(true);
    let temperature = match s.temperature {
        Some(t) => t,
        None if sample_by_default => g.temperature.unwrap_or(1.0),
        None => 0.0,
    };
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(invalid(format!("sampling.temperature must be finite and >= 0, got {temperature}")));
    }
    let top_p = s.top_p.or(g.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(format!("sampling.top_p must be in (0, 1], got {top_p}")));
    }
    // transformers' GenerationConfig defaults top_k to 50.
    let top_k = s.top_k.or(g.top_k).unwrap_or(50);
    if top_k < 0 {
        return Err(invalid(format!("sampling.top_k must be >= 0 (0 = off), got {top_k}")));
    }
    let repetition_penalty = s.repetition_penalty.or(g.repetition_penalty).unwrap_or(1.0);
    if !repetition_penalty.is_finite() || repetition_penalty <= 0.0 {
        return Err(invalid(format!("sampling.repetition_penalty must be finite and > 0, got {repetition_penalty}")));
    }
    if req.stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!("stop has {} sequences; at most {MAX_STOP_SEQUENCES} are allowed", req.stop.len())));
    }
    if let Some(i) = req.stop.iter().position(String::is_empty) {
        return Err(invalid(format!("stop[{i}] is empty")));
    }
    if let Some(i) = req.stop.iter().position(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!("stop[{i}] is longer than {MAX_STOP_BYTES} bytes")));
    }
    if let Some(m) = req.max_new_tokens {
        if m < 1 {
            return Err(invalid(format!("max_new_tokens must be >= 1, got {m}")));
        }
    }
    let prompt_ids = match kind {
        PromptKind::Text => model.tokenizer.encode(&req.prompt).map_err(|e| invalid(format!("prompt cannot be tokenized: {e}")))?,
        PromptKind::Chat => shardserve::chat::prompt_ids(&model.tokenizer, &req.prompt)
            .map_err(|e| invalid(format!("the rendered prompt cannot be tokenized: {e}")))?,
    };
    if prompt_ids.is_empty() {
        return Err(invalid(match kind {
            PromptKind::Text => "prompt tokenizes to nothing".into(),
            PromptKind::Chat => "the rendered prompt tokenizes to nothing".into(),
        }));
    }
    let limit = model.max_total_tokens;
    if prompt_ids.len() >= limit {
        return Err(invalid(format!(
            "prompt has {} tokens; the model's context is {limit} tokens, leaving no room to generate",
            prompt_ids.len()
        )));
    }
    let max_new_tokens = match req.max_new_tokens {
        Some(m) => {
            let m = m as usize;
            if prompt_ids.len() + m > limit {
                return Err(invalid(format!(
                    "prompt ({} tokens) + max_new_tokens ({m}) exceeds the model's context of {limit} tokens",
                    prompt_ids.len()
                )));
            }
            m
        }
        None => g.max_new_tokens.map_or(DEFAULT_MAX_NEW_TOKENS, |m| m as usize).min(limit - prompt_ids.len()),
    };
    if req.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}", req.top_logprobs)));
    }
    if req.top_logprobs > 0 && !req.logprobs {
        return Err(invalid("top_logprobs needs logprobs".into()));
    }
    if req.cache_salt.len() > MAX_CACHE_SALT_BYTES {
        return Err(invalid(format!("cache_salt is longer than {MAX_CACHE_SALT_BYTES} bytes")));
    }
    if req.min_tokens as usize > max_new_tokens {
        return Err(invalid(format!("min_tokens ({}) exceeds max_new_tokens ({max_new_tokens})", req.min_tokens)));
    }
    let seed = s.seed.unwrap_or_else(crate::util::random_u64);
    let sampling = SamplingParams { temperature, top_k: top_k as usize, top_p, repetition_penalty, seed };
    Ok(ValidRequest {
        prompt_ids,
        max_new_tokens,
        sampling,
        stop: req.stop.clone(),
        logprobs: req.logprobs,
        ignore_eos: req.ignore_eos,
        top_logprobs: req.top_logprobs as usize,
        min_tokens: req.min_tokens as usize,
        embed: None,
        cache_salt: req.cache_salt.clone(),
        tenant: String::new(),
        skip_prefix_cache: req.skip_prefix_cache,
        credential: None,
        grammar: None,
    })
}

/// Validates one input of an embedding request for `model`: a prompt that fits its context.
pub fn validate_embed(model: &ModelEntry, input: &str, index: usize, spec: crate::engine::EmbedSpec) -> Result<ValidRequest, ServeError> {
    if input.is_empty() {
        return Err(invalid(format!("inputs[{index}] must not be empty")));
    }
    let prompt_ids = model.tokenizer.encode(input).map_err(|e| invalid(format!("inputs[{index}] cannot be tokenized: {e}")))?;
    if prompt_ids.is_empty() {
        return Err(invalid(format!("inputs[{index}] tokenizes to nothing")));
    }
    let limit = model.max_total_tokens;
    if prompt_ids.len() > limit {
        return Err(invalid(format!("inputs[{index}] has {} tokens; the model's context is {limit} tokens", prompt_ids.len())));
    }
    Ok(ValidRequest {
        prompt_ids,
        max_new_tokens: 0,
        sampling: SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 1 },
        stop: Vec::new(),
        logprobs: false,
        ignore_eos: false,
        top_logprobs: 0,
        min_tokens: 0,
        embed: Some(spec),
        cache_salt: String::new(),
        tenant: String::new(),
        skip_prefix_cache: false,
        credential: None,
        grammar: None,
    })
}

/// Validates a request another coordinator of the cluster validated and tokenized and now
/// hands to this one (its leader): checked again here, as anything that reaches a port is, with
/// the model's limits as this coordinator knows them.
pub fn validate_relayed(model: &ModelEntry, r: &pb::RelayRequest) -> Result<ValidRequest, ServeError> {
    let mut valid = check_relayed(model.config.vocab_size, model.max_total_tokens, r)?;
    if !r.grammar.is_empty() {
        let grammars = model.grammars().map_err(|e| invalid(format!("grammar: model {} cannot constrain its output: {e}", model.name)))?;
        grammars.guide_json(&r.grammar).map_err(|e| invalid(format!("grammar: {e}")))?;
        valid.grammar = Some(r.grammar.as_str().into());
    }
    Ok(valid)
}

/// [`validate_relayed`] for a model of `vocab` tokens and a context of `limit`.
fn check_relayed(vocab: usize, limit: usize, r: &pb::RelayRequest) -> Result<ValidRequest, ServeError> {
    if r.prompt_ids.is_empty() {
        return Err(invalid("prompt_ids must not be empty".into()));
    }
    if let Some(t) = r.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid(format!("prompt_ids: token {t} is outside the vocabulary ({vocab})")));
    }
    let embed = match r.embed_pooling.as_str() {
        "" => None,
        p => Some(crate::engine::EmbedSpec { pooling: p.parse().map_err(invalid)?, normalize: r.embed_normalize }),
    };
    let max_new_tokens = r.max_new_tokens as usize;
    if embed.is_none() && max_new_tokens < 1 {
        return Err(invalid(format!("max_new_tokens must be >= 1, got {max_new_tokens}")));
    }
    if r.prompt_ids.len() + max_new_tokens > limit {
        return Err(invalid(format!(
            "prompt ({} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit} tokens",
            r.prompt_ids.len()
        )));
    }
    let s = r.sampling.unwrap_or_default();
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(0.0),
        top_k: usize::try_from(s.top_k.unwrap_or(0)).map_err(|_| invalid("sampling.top_k must be >= 0".into()))?,
        top_p: s.top_p.unwrap_or(1.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        seed: s.seed.unwrap_or(0),
    };
    sampling.validate().map_err(|e| invalid(format!("sampling: {e}")))?;
    if r.stop.len() > MAX_STOP_SEQUENCES || r.stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!("stop: at most {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_BYTES} bytes")));
    }
    if r.top_logprobs > MAX_TOP_LOGPROBS || (r.top_logprobs > 0 && !r.logprobs) {
        return Err(invalid(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, and needs logprobs")));
    }
    if r.min_tokens as usize > max_new_tokens {
        return Err(invalid(format!("min_tokens ({}) exceeds max_new_tokens ({max_new_tokens})", r.min_tokens)));
    }
    if r.cache_salt.len() > MAX_CACHE_SALT_BYTES {
        return Err(invalid(format!("cache_salt is longer than {MAX_CACHE_SALT_BYTES} bytes")));
    }
    Ok(ValidRequest {
        prompt_ids: r.prompt_ids.clone(),
        max_new_tokens,
        sampling,
        stop: r.stop.clone(),
        logprobs: r.logprobs,
        ignore_eos: r.ignore_eos,
        top_logprobs: r.top_logprobs as usize,
        min_tokens: r.min_tokens as usize,
        embed,
        cache_salt: r.cache_salt.clone(),
        tenant: String::new(),
        skip_prefix_cache: r.skip_prefix_cache,
        credential: None,
        grammar: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed() -> pb::RelayRequest {
        pb::RelayRequest {
            prompt_ids: vec![1, 2, 3],
            max_new_tokens: 8,
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                top_p: Some(1.0),
                top_k: Some(0),
                repetition_penalty: Some(1.0),
                seed: Some(3),
            }),
            cache_salt: "s".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_relayed_request_is_checked_again_and_keeps_every_field() {
        let v = check_relayed(512, 64, &relayed()).unwrap();
        assert_eq!((v.prompt_ids, v.max_new_tokens, v.sampling.seed, v.cache_salt.as_str()), (vec![1, 2, 3], 8, 3, "s"));
        assert!(v.embed.is_none() && v.credential.is_none() && v.tenant.is_empty());
        let cases: Vec<(pb::RelayRequest, &str)> = vec![
            (pb::RelayRequest { prompt_ids: vec![], ..relayed() }, "prompt_ids must not be empty"),
            (pb::RelayRequest { prompt_ids: vec![1, 600], ..relayed() }, "token 600 is outside the vocabulary (512)"),
            (pb::RelayRequest { max_new_tokens: 0, ..relayed() }, "max_new_tokens must be >= 1"),
            (pb::RelayRequest { max_new_tokens: 62, ..relayed() }, "exceeds the model's context of 64"),
            (
                pb::RelayRequest { sampling: Some(pb::SamplingParams { top_p: Some(2.0), ..relayed().sampling.unwrap() }), ..relayed() },
                "top_p",
            ),
            (pb::RelayRequest { stop: vec![String::new()], ..relayed() }, "stop"),
            (pb::RelayRequest { top_logprobs: 3, ..relayed() }, "needs logprobs"),
            (pb::RelayRequest { min_tokens: 9, ..relayed() }, "min_tokens (9) exceeds"),
            (pb::RelayRequest { embed_pooling: "max".into(), ..relayed() }, "pooling must be"),
            (pb::RelayRequest { cache_salt: "x".repeat(MAX_CACHE_SALT_BYTES + 1), ..relayed() }, "cache_salt is longer"),
        ];
        for (r, want) in cases {
            let e = check_relayed(512, 64, &r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        }
        // An embedding needs no new tokens.
        let e = check_relayed(512, 64, &pb::RelayRequest { max_new_tokens: 0, embed_pooling: "mean".into(), ..relayed() }).unwrap();
        assert_eq!(e.embed.map(|s| s.pooling), Some(crate::engine::Pooling::Mean));
    }
}
