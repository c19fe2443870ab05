//! Constrained decoding with llguidance: a grammar (a JSON schema, a regex, a Lark grammar)
//! decides, token by token, which tokens the sampler may pick.
//!
//! - [`Grammars`]: a model's vocabulary as llguidance reads it, built once per model from its
//!   tokenizer; it compiles grammars (the coordinator to refuse a bad one with a clear message,
//!   the sampling rank to run it).
//! - [`Guide`]: one sequence's grammar state on the rank that samples: the mask of allowed
//!   tokens before each sample, advanced by the token sampled.

use crate::tokenizer::Tokenizer;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

pub use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
pub use llguidance::regex_to_lark;

/// Why constrained decoding cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuideError {
    /// The model's tokenizer cannot be mapped to token bytes.
    #[error("the tokenizer cannot be used for constrained decoding: {0}")]
    Tokenizer(String),
    /// The grammar does not compile (a schema feature llguidance lacks, a malformed regex).
    #[error("{0}")]
    Grammar(String),
    /// The grammar is in an error state, or refused a token the mask allowed.
    #[error("the grammar failed: {0}")]
    Failed(String),
}

/// llguidance's view of a tokenizer: every token's bytes (in a trie) and a way to tokenize
/// the literal text a grammar forces.
struct Env {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.tokenizer.encode_with(&String::from_utf8_lossy(s), false).unwrap_or_default()
    }
}

/// A model's vocabulary as llguidance reads it, and the compiler of its grammars.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

impl Grammars {
    /// The grammars of a model whose logits have `vocab_size` entries (ids the tokenizer does
    /// not know are never allowed) and whose sequences end at any of `eos` (allowed once a
    /// grammar is complete).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Result<Self, GuideError> {
        let json = tokenizer.to_json().map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        let vocab = vocab_size.max(words.len());
        words.resize(vocab, Vec::new());
        let Some(&first) = eos.first() else {
            return Err(GuideError::Tokenizer("the model names no end-of-sequence token".into()));
        };
        if let Some(t) = eos.iter().find(|&&t| t as usize >= vocab) {
            return Err(GuideError::Tokenizer(format!("end-of-sequence token {t} is outside the vocabulary ({vocab})")));
        }
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, first), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Env { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A fresh state of `grammar`, or why it does not compile.
    pub fn guide(&self, grammar: &TopLevelGrammar) -> Result<Guide, GuideError> {
        let parser = self.factory.create_parser(grammar.clone()).map_err(|e| GuideError::Grammar(one_line(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuideError::Grammar(one_line(&e)));
        }
        Ok(Guide { matcher })
    }

    /// [`Grammars::guide`] for a grammar in llguidance's JSON form (as steps carry it).
    pub fn guide_json(&self, grammar: &str) -> Result<Guide, GuideError> {
        let grammar: TopLevelGrammar = serde_json::from_str(grammar).map_err(|e| GuideError::Grammar(format!("not a grammar: {e}")))?;
        self.guide(&grammar)
    }

    /// The text of `tokens` as the grammar reads it (for tests and messages).
    pub fn decode(&self, tokens: &[u32]) -> String {
        self.factory.tok_env().tok_trie().decode_str(tokens)
    }
}

/// llguidance's message on one line (a grammar error quotes the lines around its fault).
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" / ")
}

/// The tokens a grammar allows next.
#[derive(Debug, Clone)]
pub struct Mask(SimpleVob);

impl Mask {
    /// Whether `token` may be sampled.
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Sets every logit the mask forbids to -inf.
    pub fn apply(&self, logits: &mut [f32]) {
        let n = logits.len();
        self.0.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        if let Some(rest) = logits.get_mut(self.0.len()..) {
            rest.fill(f32::NEG_INFINITY);
        }
    }

    /// How many tokens it allows.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }
}

/// One sequence's grammar state.
pub struct Guide {
    matcher: Matcher,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Guide {
    /// The tokens allowed next: only the end-of-sequence tokens once the grammar is complete
    /// and cannot go on.
    pub fn mask(&mut self) -> Result<Mask, GuideError> {
        self.matcher.compute_mask_or_eos().map(Mask).map_err(|e| GuideError::Failed(one_line(&e.to_string())))
    }

    /// Advances past `token`, the one sampled.
    pub fn advance(&mut self, token: u32) -> Result<(), GuideError> {
        if self.matcher.is_stopped() {
            // Complete: what follows is an end-of-sequence token, which ends the sequence.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| GuideError::Failed(one_line(&e.to_string())))
    }

    /// Whether the text so far is a complete match.
    pub fn accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests;
