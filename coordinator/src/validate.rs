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
/// max_new_tokens when neither the request nor generation_config.json sets it.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 100;

fn invalid(m: String) -> ServeError {
    ServeError::InvalidArgument(m)
}

/// Validates `req` for `model`.
pub fn validate(model: &ModelEntry, req: &pb::GenerateRequest) -> Result<ValidRequest, ServeError> {
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
        return Err(invalid(format!(
            "sampling.repetition_penalty must be finite and > 0, got {repetition_penalty}"
        )));
    }
    if req.stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!(
            "stop has {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
            req.stop.len()
        )));
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
    let prompt_ids = model
        .tokenizer
        .encode(&req.prompt)
        .map_err(|e| invalid(format!("prompt cannot be tokenized: {e}")))?;
    if prompt_ids.is_empty() {
        return Err(invalid("prompt tokenizes to nothing".into()));
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
        None => g
            .max_new_tokens
            .map_or(DEFAULT_MAX_NEW_TOKENS, |m| m as usize)
            .min(limit - prompt_ids.len()),
    };
    if req.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {}", req.top_logprobs)));
    }
    if req.top_logprobs > 0 && !req.logprobs {
        return Err(invalid("top_logprobs needs logprobs".into()));
    }
    if req.min_tokens as usize > max_new_tokens {
        return Err(invalid(format!("min_tokens ({}) exceeds max_new_tokens ({max_new_tokens})", req.min_tokens)));
    }
    let seed = s.seed.unwrap_or_else(crate::random_u64);
    let sampling = SamplingParams {
        temperature,
        top_k: top_k as usize,
        top_p,
        repetition_penalty,
        seed,
    };
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
    })
}

/// Validates one input of an embedding request for `model`: a prompt that fits its context.
pub fn validate_embed(model: &ModelEntry, input: &str, index: usize, spec: crate::engine::EmbedSpec) -> Result<ValidRequest, ServeError> {
    if input.is_empty() {
        return Err(invalid(format!("inputs[{index}] must not be empty")));
    }
    let prompt_ids = model
        .tokenizer
        .encode(input)
        .map_err(|e| invalid(format!("inputs[{index}] cannot be tokenized: {e}")))?;
    if prompt_ids.is_empty() {
        return Err(invalid(format!("inputs[{index}] tokenizes to nothing")));
    }
    let limit = model.max_total_tokens;
    if prompt_ids.len() > limit {
        return Err(invalid(format!(
            "inputs[{index}] has {} tokens; the model's context is {limit} tokens",
            prompt_ids.len()
        )));
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
    })
}
