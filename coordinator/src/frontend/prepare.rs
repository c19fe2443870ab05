//! A request prepared for the engine, whichever protocol brought it: validated for the model
//! found once, its prompt tokenized once, its constraint compiled into its grammar, marked as
//! its caller's. The gRPC service and the HTTP handlers only translate into and out of it.

use super::structured::{Constraint, Guidance, InvalidConstraint};
use crate::engine::{Engine, ModelEntry, ValidRequest};
use crate::error::ServeError;
use crate::validate::{validate_as, PromptKind};
use shardserve_proto::v1 as pb;

/// Who made a request, as far as prefix caching and the leader coordinator care: the API key
/// it presented (already checked by the port's interceptor).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    key: Option<crate::engine::Credential>,
}

impl Caller {
    /// The caller of a gRPC request.
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> Self {
        let key = metadata.get("authorization").and_then(|v| v.to_str().ok()).and_then(crate::auth::bearer);
        Caller::with_key(key)
    }

    /// A caller presenting `key` (`Authorization: Bearer KEY`; `None`: no key).
    pub fn with_key(key: Option<&str>) -> Self {
        Caller { key: key.filter(|k| !k.is_empty()).map(|k| crate::engine::Credential(k.to_string())) }
    }

    /// Marks `valid` as this caller's: with `per-key` scope its prefix-cache tenant is its
    /// key's digest (so no other key's requests share its cached blocks), and the key goes
    /// with it to the leader coordinator.
    pub fn apply(&self, valid: &mut ValidRequest, scope: crate::engine::PrefixCacheScope) {
        valid.tenant = match (&self.key, scope) {
            (Some(k), crate::engine::PrefixCacheScope::PerKey) => {
                use sha2::Digest;
                sha2::Sha256::digest(k.0.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
            }
            _ => String::new(),
        };
        valid.credential = self.key.clone();
    }
}

/// Validates `req` for `model` (found already; `req.model` is not read), served by `engine`,
/// as `caller`'s: its prompt tokenized once as `kind` says, its structured output (or the
/// calls a chat's `guidance` demands) compiled into its grammar.
pub fn prepare_on(
    engine: &Engine,
    model: &ModelEntry,
    req: &pb::GenerateRequest,
    kind: PromptKind,
    guidance: &Guidance,
    caller: &Caller,
) -> Result<ValidRequest, ServeError> {
    let mut valid = validate_as(model, req, kind)?;
    let invalid = |e: InvalidConstraint| ServeError::InvalidArgument(e.to_string());
    let asked = Constraint::from_proto(req.structured_output.as_ref()).map_err(invalid)?;
    if let Some(c) = guidance.constraint(asked).map_err(invalid)? {
        constrain(model, &mut valid, &c, guidance)?;
    }
    caller.apply(&mut valid, engine.config().prefix_cache_scope);
    Ok(valid)
}

/// Compiles `constraint` for `model` into `valid`: the answer after any reasoning follows it.
/// A grammar that does not compile (a schema feature llguidance lacks, say) is refused,
/// naming `field` and the feature.
pub fn constrain(model: &ModelEntry, valid: &mut ValidRequest, constraint: &Constraint, guidance: &Guidance) -> Result<(), ServeError> {
    let field = constraint.field();
    if valid.ignore_eos {
        return Err(ServeError::InvalidArgument(format!(
            "{field} cannot be combined with ignore_eos: the end of a complete answer ends the sequence"
        )));
    }
    let grammar = constraint.grammar(guidance.reasoning, &model.tokenizer);
    let grammars = model
        .grammars()
        .map_err(|e| ServeError::InvalidArgument(format!("{field}: model {} cannot constrain its output: {e}", model.name)))?;
    grammars.guide(&grammar).map_err(|e| ServeError::InvalidArgument(format!("{field}: {e}")))?;
    let json = serde_json::to_string(&grammar).map_err(|e| ServeError::Internal(format!("writing the grammar: {e}")))?;
    valid.grammar = Some(json.into());
    Ok(())
}
