//! `tokenizer.json` through `tokenizers`, incremental detokenization that never emits half a
//! UTF-8 character, and stop-sequence matching on the text stream.

use crate::error::{Error, Result};
use std::path::Path;

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.inner.get_vocab_size(true)).finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built in memory.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds
    /// (transformers' `add_special_tokens=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner.encode(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Token ids of `text`, with or without the post-processor's special tokens (a rendered
    /// chat template carries its own: transformers tokenizes it with
    /// `add_special_tokens=False`).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner.encode(text, add_special_tokens).map(|e| e.get_ids().to_vec()).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Token strings of `text`.
    pub fn tokens(&self, text: &str) -> Result<Vec<String>> {
        self.inner.encode(text, true).map(|e| e.get_tokens().to_vec()).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token string, if in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of `token` if it is a special token (one decoding skips).
    pub fn special_token_id(&self, token: &str) -> Option<u32> {
        self.inner.get_added_tokens_decoder().into_iter().find(|(_, t)| t.special && t.content == token).map(|(id, _)| id)
    }

    /// Vocabulary size with added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as tokenizer.json writes it.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        serde_json::to_value(&self.inner).map_err(|e| Error::Tokenizer(format!("serializing the tokenizer: {e}")))
    }
}

/// Turns a stream of token ids into a stream of text pieces. Decoding a window of recent tokens
/// (as TGI and vLLM do) keeps word-boundary spaces right, and a piece ending in U+FFFD waits
/// for the bytes that complete it.
#[derive(Debug)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder whose context is the end of the prompt.
    pub fn new(prompt: &[u32]) -> Self {
        let keep = prompt.len().min(5);
        let ids = prompt[prompt.len() - keep..].to_vec();
        IncrementalDecoder { prefix_offset: 0, read_offset: ids.len(), ids }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back at the end of generation (an incomplete character, decoded lossily
    /// as transformers' `decode` would).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(full[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}

/// Watches generated text for stop sequences. Text that could still turn into a stop sequence
/// is held back, so a client never sees part of one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

/// What appending text to a [`StopMatcher`] produced.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to send now.
    pub text: String,
    /// Whether a stop sequence was found (generation ends; it is not part of the text).
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (none empty).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, ..Default::default() }
    }

    /// Appends generated text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        let search_from = self.emitted;
        self.text.push_str(piece);
        let found = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| search_from + i)).min();
        if let Some(at) = found {
            let out = self.text[self.emitted..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return StopOutcome { text: out, stopped: true };
        }
        let hold = self.partial_suffix();
        let upto = self.text.len() - hold;
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        StopOutcome { text: out, stopped: false }
    }

    /// Releases the held-back text when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop sequence.
    fn partial_suffix(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                let prefix = &s[..i];
                if i > best && self.text.ends_with(prefix) && self.text.len() - i >= self.emitted {
                    best = i;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_text_and_hold_back_partials() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(m.push("hello E").text, "hello ");
        assert_eq!(m.push("N").text, "");
        let out = m.push("D and more");
        assert_eq!(out, StopOutcome { text: String::new(), stopped: true });
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("a EN").text, "a ");
        assert_eq!(m.push("x").text, "ENx");
        assert_eq!(m.finish(), "");
        let mut m = StopMatcher::new(vec!["stop".into()]);
        let out = m.push("one two stop three");
        assert_eq!(out, StopOutcome { text: "one two ".into(), stopped: true });
    }

    #[test]
    fn no_stops_passes_text_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc").text, "abc");
        assert_eq!(m.finish(), "");
    }
}
