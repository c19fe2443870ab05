//! A GGUF file's tokenizer, built from its `tokenizer.ggml.*` metadata as transformers 5 builds
//! it (`integrations/gguf/gguf_tokenizer_mapping.py`): the byte-level BPE
//! (`tokenizer.ggml.model` `gpt2`) of Qwen 2/3 and Llama 3, split by the pattern
//! `tokenizer.ggml.pre` names, control tokens special and user-defined ones added whole.

use super::Gguf;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::{HashMap, HashSet};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Qwen2's split (llama.cpp's `qwen2`).
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (llama.cpp's `llama-bpe`).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split pattern of a `tokenizer.ggml.pre`, among those of the families served here (any
/// other keeps GPT-2's byte-level split, as transformers does).
fn split_of(pre: &str) -> Option<&'static str> {
    match pre {
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => Some(LLAMA3),
        _ => None,
    }
}

/// llama.cpp's token types.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn strings(values: &[Value]) -> Option<Vec<&str>> {
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

fn int(v: &Value) -> Option<i64> {
    match *v {
        Value::I32(x) => Some(x.into()),
        Value::I64(x) => Some(x),
        Value::U32(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U8(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        _ => None,
    }
}

pub(super) fn build(g: &Gguf) -> Result<tokenizers::Tokenizer> {
    let bad = |m: String| Error::Tokenizer(format!("{}: {m}", g.path().display()));
    let model = g.string("tokenizer.ggml.model").ok_or_else(|| bad("tokenizer.ggml.model is missing".into()))?;
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer.ggml.model {model:?} is not supported: only byte-level BPE (\"gpt2\", as Qwen and Llama 3 files carry) is"
        )));
    }
    let tokens = g.array("tokenizer.ggml.tokens").and_then(strings).ok_or_else(|| bad("tokenizer.ggml.tokens is missing".into()))?;
    let merges = g.array("tokenizer.ggml.merges").and_then(strings).ok_or_else(|| bad("tokenizer.ggml.merges is missing".into()))?;
    let types: Vec<i64> = g.array("tokenizer.ggml.token_type").map(|t| t.iter().map(|v| int(v).unwrap_or(1)).collect()).unwrap_or_default();
    // Tokens are spelled in the byte-level alphabet; one that is not is respelled byte by byte.
    let alphabet = bytes_to_unicode();
    let spelled: HashSet<char> = alphabet.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| spelled.contains(&c));
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        let token = if in_alphabet(t) { (*t).to_string() } else { t.bytes().map(|b| alphabet[usize::from(b)]).collect() };
        vocab.insert(token, id as u32);
    }
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| bad(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.iter().map(|(t, i)| (t.clone(), *i)).collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    match g.string("tokenizer.ggml.pre").and_then(split_of) {
        Some(pattern) => {
            let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| bad(e.to_string()))?;
            tk.with_pre_tokenizer(Some(Sequence::new(vec![
                split.into(),
                ByteLevel::default().add_prefix_space(false).use_regex(false).into(),
            ])));
        }
        None => {
            tk.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        }
    }
    tk.with_decoder(Some(ByteLevel::default()));
    // Control tokens are special (one spelled outside the alphabet is a mislabel, skipped);
    // user-defined ones are added text, matched whole.
    let typed = |want: i64| tokens.iter().zip(&types).filter(move |(_, t)| **t == want).map(|(tok, _)| *tok);
    let special: Vec<AddedToken> =
        typed(CONTROL).filter(|t| in_alphabet(t)).map(|t| AddedToken::from(t.to_string(), true).normalized(false)).collect();
    let added: Vec<AddedToken> =
        typed(USER_DEFINED).filter(|t| vocab.contains_key(*t)).map(|t| AddedToken::from(t.to_string(), false).normalized(false)).collect();
    tk.add_special_tokens(&special);
    tk.add_tokens(&added);
    // `tokenizer.ggml.add_bos_token` / `add_eos_token`: the ids around every encoded text.
    let token_of = |key: &str| g.uint(key).and_then(|id| tokens.get(id as usize).map(|t| (t.to_string(), id as u32)));
    let flag = |key: &str| matches!(g.value(key), Some(Value::Bool(true)));
    let bos = token_of("tokenizer.ggml.bos_token_id").filter(|_| flag("tokenizer.ggml.add_bos_token"));
    let eos = token_of("tokenizer.ggml.eos_token_id").filter(|_| flag("tokenizer.ggml.add_eos_token"));
    if bos.is_some() || eos.is_some() {
        let around = |piece: &str| {
            let pre = bos.as_ref().map(|(t, _)| format!("{t} ")).unwrap_or_default();
            let post = eos.as_ref().map(|(t, _)| format!(" {t}")).unwrap_or_default();
            format!("{pre}{piece}{post}")
        };
        let post = TemplateProcessing::builder()
            .try_single(around("$A"))
            .and_then(|b| b.try_pair(format!("{} {}", around("$A"), around("$B:1"))))
            .map_err(|e| bad(e.to_string()))?
            .special_tokens(bos.iter().chain(eos.iter()).cloned().collect::<Vec<_>>())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        tk.with_post_processor(Some(post));
    }
    Ok(tk)
}

/// GPT-2's spelling of bytes (byte-level BPE's alphabet): printable bytes stand for
/// themselves, the others for 256 + their rank among the unprintable.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(code).expect("below the surrogates");
    }
    out
}
