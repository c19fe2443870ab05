//! GGUF checkpoints (llama.cpp's single-file format), read as transformers reads them with
//! `gguf_file=`: the config from the file's metadata, the tokenizer and chat template from its
//! `tokenizer.*` keys, and the tensors under Hugging Face's names. Each shard reads only the
//! tensors (and tensor-parallel slices) it owns, straight from the mapped file; linear weights
//! stay in their block type unless asked to be dequantized.

mod tokenizer;
mod write;

pub use write::{write_checkpoint, GgufType};

use crate::config::Architecture;
use crate::error::{Error, Result};
use crate::weights::{LoadedTensors, Slicer};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The extension of GGUF files.
pub const EXTENSION: &str = "gguf";

/// Whether `name` names a GGUF file.
pub fn is_gguf_name(name: &str) -> bool {
    Path::new(name).extension().is_some_and(|e| e.eq_ignore_ascii_case(EXTENSION))
}

/// A GGUF file's header: metadata and where each tensor lies.
pub struct Gguf {
    path: PathBuf,
    content: Content,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf").field("path", &self.path).field("tensors", &self.content.tensor_infos.len()).finish_non_exhaustive()
    }
}

/// How llama.cpp names the tensors outside the layers, and Hugging Face's names for them.
const MODEL_TENSORS: &[(&str, &str)] =
    &[("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// How llama.cpp names a layer's tensors, and Hugging Face's names for them.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a GGUF tensor; `None` for tensors the model does not use
/// (`rope_freqs`, which llama.cpp derives from the config anyway).
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let hf = LAYER_TENSORS.iter().find(|(g, _)| *g == base)?.1;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::LoadWeights(format!("{}: not a readable GGUF file: {e}", path.display()))
}

impl Gguf {
    /// Reads the header of the GGUF file at `path` (metadata and tensor index, not the tensors).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| io_error(path, e))?;
        Ok(Gguf { path: path.to_path_buf(), content })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn bad(&self, message: impl Into<String>) -> Error {
        Error::config(self.path.display().to_string(), message)
    }

    /// A metadata string.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.value(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A metadata integer of any width.
    pub fn uint(&self, key: &str) -> Option<u64> {
        self.value(key).and_then(as_uint)
    }

    fn float(&self, key: &str) -> Option<f64> {
        match self.value(key)? {
            Value::F32(v) => Some(f64::from(*v)),
            Value::F64(v) => Some(*v),
            v => as_uint(v).map(|u| u as f64),
        }
    }

    fn array(&self, key: &str) -> Option<&[Value]> {
        match self.value(key)? {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// `general.architecture`, as llama.cpp names it (`qwen3`, `qwen2`, `llama`).
    pub fn arch_name(&self) -> Result<&str> {
        self.string("general.architecture").ok_or_else(|| self.bad("general.architecture is missing"))
    }

    /// The architecture, among those shardserve runs.
    pub fn architecture(&self) -> Result<Architecture> {
        let name = self.arch_name()?;
        match name {
            "qwen3" => Ok(Architecture::Qwen3),
            "qwen2" => Ok(Architecture::Qwen2),
            "llama" => Ok(Architecture::Llama),
            other => Err(self.bad(format!("GGUF architecture {other:?} is not supported (qwen3, qwen2 and llama are)"))),
        }
    }

    /// Each tensor's name on disk, block type and shape (rows first, as Hugging Face's).
    pub fn tensors(&self) -> impl Iterator<Item = (&str, GgmlDType, &[usize])> {
        self.content.tensor_infos.iter().map(|(n, t)| (n.as_str(), t.ggml_dtype, t.shape.dims()))
    }

    fn shape_of(&self, gguf: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(gguf).map(|t| t.shape.dims())
    }

    /// The model's `config.json`, as transformers derives it from the metadata.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        let a = self.arch_name()?;
        let need = |key: &str| self.uint(&format!("{a}.{key}")).ok_or_else(|| self.bad(format!("{a}.{key} is missing")));
        let heads = need("attention.head_count")?;
        if self.shape_of("token_embd.weight").is_none() {
            return Err(self.bad("token_embd.weight is missing"));
        }
        // As transformers: the stated vocab_size, else the tokens listed.
        let listed = self.array("tokenizer.ggml.tokens").map(|t| t.len() as u64);
        let vocab = self.uint(&format!("{a}.vocab_size")).or(listed).ok_or_else(|| self.bad("neither a vocab_size nor a token list"))?;
        let mut c = serde_json::json!({
            "architectures": [arch.hf_name()],
            "model_type": arch.model_type(),
            "hidden_size": need("embedding_length")?,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.uint(&format!("{a}.attention.head_count_kv")).unwrap_or(heads),
            "vocab_size": vocab,
            "max_position_embeddings": need("context_length")?,
            "rope_theta": self.float(&format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
            "rms_norm_eps": self.float(&format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "tie_word_embeddings": self.shape_of("output.weight").is_none(),
            "attention_bias": self.shape_of("blk.0.attn_q.bias").is_some(),
            "hidden_act": "silu",
        });
        // llama.cpp's key width; transformers reads Llama's from the rotary width and takes
        // Qwen3's class default (128, what every Qwen3 has).
        let head_dim = self.uint(&format!("{a}.attention.key_length")).or_else(|| self.uint(&format!("{a}.rope.dimension_count")));
        match (head_dim, arch) {
            (Some(d), _) => c["head_dim"] = d.into(),
            (None, Architecture::Qwen3) => c["head_dim"] = 128.into(),
            _ => {}
        }
        if let Some(id) = self.uint("tokenizer.ggml.bos_token_id") {
            c["bos_token_id"] = id.into();
        }
        if let Some(id) = self.uint("tokenizer.ggml.eos_token_id") {
            c["eos_token_id"] = id.into();
        }
        if let Some(kind) = self.string(&format!("{a}.rope.scaling.type")).filter(|k| *k != "none") {
            return Err(self.bad(format!("{a}.rope.scaling.type {kind:?} is not supported")));
        }
        Ok(c)
    }

    /// The chat template (`tokenizer.chat_template`), if the file carries one.
    pub fn chat_template(&self) -> Option<&str> {
        self.string("tokenizer.chat_template")
    }

    /// The special tokens as template variables (`bos_token`, `eos_token`, ...).
    pub fn special_tokens(&self) -> BTreeMap<String, String> {
        let tokens = self.array("tokenizer.ggml.tokens").unwrap_or(&[]);
        let mut out = BTreeMap::new();
        for (var, key) in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")] {
            let token = self.uint(&format!("tokenizer.ggml.{key}_token_id")).and_then(|id| tokens.get(id as usize));
            if let Some(Value::String(t)) = token {
                out.insert(var.to_string(), t.clone());
            }
        }
        out
    }

    /// The tokenizer, built from `tokenizer.ggml.*` as transformers' GGUF converters build it.
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        tokenizer::build(self).map(crate::tokenizer::Tokenizer::from_tokenizer)
    }

    /// Checks that a tensor-parallel group of `tp` can slice every weight of the file along
    /// whole blocks of its type, naming the first that cannot.
    pub fn check_tp(&self, cfg: &crate::config::ModelConfig, tp: usize) -> Result<()> {
        use crate::collective::TpRank;
        let mut names: Vec<_> = self.content.tensor_infos.iter().filter_map(|(g, info)| Some((hf_name(g)?, g, info))).collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for rank in 0..tp {
            let tp = TpRank { rank, size: tp };
            let split =
                crate::collective::tp_split(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp).map_err(Error::LoadWeights)?;
            let spec = crate::model::StageSpec::whole(cfg).with_tp(tp);
            for (name, gguf, info) in &names {
                let (dims, ty) = (info.shape.dims(), info.ggml_dtype);
                let Some((dim, range)) = spec.slice_of(&split, cfg.head_dim, name, dims) else { continue };
                if dim + 1 == dims.len() && (range.start % ty.block_size() != 0 || range.end % ty.block_size() != 0) {
                    return Err(Error::LoadWeights(format!(
                        "{name} ({gguf}, {ty:?}): --tp {} cuts its rows of {} at {range:?} (rank {rank}), through its blocks of {}; \
                         choose a --tp that splits {} into multiples of {}, or a file of a type with smaller blocks (q8_0's are 32)",
                        tp.size,
                        dims[dim],
                        ty.block_size(),
                        dims[dim],
                        ty.block_size()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The types the linear weights are stored in, the most common first, joined by `+`
    /// (`q4_k+q6_k` for a Q4_K_M file).
    pub fn weight_types(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (gguf, info) in &self.content.tensor_infos {
            if hf_name(gguf).is_some_and(|n| crate::quant::is_linear_weight(&n)) {
                *counts.entry(type_name(info.ggml_dtype)).or_default() += 1;
            }
        }
        let mut types: Vec<(String, usize)> = counts.into_iter().collect();
        types.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        types.into_iter().map(|(t, _)| t).collect::<Vec<_>>().join("+")
    }

    /// Bytes each Hugging Face module's weights take in the file (`model.layers.3`,
    /// `model.embed_tokens`, `model.norm`, `lm_head`), for placement.
    pub fn module_bytes(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (gguf, info) in &self.content.tensor_infos {
            let Some(name) = hf_name(gguf) else { continue };
            let module = match name.strip_prefix("model.layers.") {
                Some(rest) => format!("model.layers.{}", rest.split('.').next().unwrap_or_default()),
                None => name.rsplit_once('.').map(|(m, _)| m.to_string()).unwrap_or(name),
            };
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            *out.entry(module).or_default() += bytes as u64;
        }
        out
    }

    /// The parameters a worker holds in their block types, by Hugging Face name (none with
    /// `dequantize`): what the planner sizes them at.
    pub fn block_types(&self, dequantize: bool) -> BTreeMap<String, crate::placement::BlockType> {
        let held = |(gguf, info): (&String, &candle_core::quantized::gguf_file::TensorInfo)| {
            let name = hf_name(gguf)?;
            let ty = info.ggml_dtype;
            kept_in_blocks(&name, ty, dequantize)
                .then(|| (name, crate::placement::BlockType { weights: ty.block_size() as u64, bytes: ty.type_size() as u64 }))
        };
        self.content.tensor_infos.iter().filter_map(held).collect()
    }

    /// Loads the tensors `wanted` names (by their Hugging Face names), only the part `slice`
    /// gives, mapped from the file: linear weights in a block type stay quantized unless
    /// `dequantize`; everything else is converted to `dtype`.
    pub fn load(
        &self,
        cfg: &crate::config::ModelConfig,
        wanted: &dyn Fn(&str) -> bool,
        slice: Slicer<'_>,
        dtype: DType,
        dequantize: bool,
        device: &Device,
    ) -> Result<LoadedTensors> {
        let file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        // SAFETY: the mapping is read-only and checkpoint files are never rewritten in place
        // while served; the bytes are copied out before the map is dropped.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&self.path, e))?;
        let arch = self.architecture()?;
        let mut out = LoadedTensors::default();
        let mut names: Vec<_> = self.content.tensor_infos.iter().filter_map(|(g, info)| Some((hf_name(g)?, g, info))).collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, gguf, info) in names {
            if !wanted(&name) {
                continue;
            }
            let fail = |e: String| Error::LoadWeights(format!("{}: tensor {gguf} ({name}): {e}", self.path.display()));
            let ty = info.ggml_dtype;
            let dims = info.shape.dims().to_vec();
            let bytes = info.shape.elem_count() / ty.block_size() * ty.type_size();
            let start = usize::try_from(self.content.tensor_data_offset + info.offset).map_err(|e| fail(e.to_string()))?;
            let data =
                map.get(start..start + bytes).ok_or_else(|| fail(format!("its {bytes} bytes at {start} run past the end of the file")))?;
            // llama.cpp interleaves the rotary halves of Llama's q and k rows; transformers
            // undoes it on load, and so does this.
            let heads = match (arch, name.rsplit('.').nth(1)) {
                (Architecture::Llama, Some("q_proj")) => Some(cfg.num_heads),
                (Architecture::Llama, Some("k_proj")) => Some(cfg.num_kv_heads),
                _ => None,
            };
            let unpermuted;
            let data = match heads {
                Some(h) if dims.len() == 2 => {
                    unpermuted = unpermute_rows(data, dims[0], h).map_err(fail)?;
                    &unpermuted[..]
                }
                _ => data,
            };
            let (data, dims) = match slice(&name, &dims) {
                None => (std::borrow::Cow::Borrowed(data), dims),
                Some((dim, range)) => {
                    let (bytes, dims) = slice_blocks(data, ty, &dims, dim, range).map_err(fail)?;
                    (std::borrow::Cow::Owned(bytes), dims)
                }
            };
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(ty, &data, dims, device).map_err(|e| fail(e.to_string()))?;
            drop(data);
            crate::pages::release_mapped(&map[start..start + bytes]);
            if kept_in_blocks(&name, ty, dequantize) {
                out.quantized.insert(name, std::sync::Arc::new(q));
                continue;
            }
            let t = q.dequantize(device).and_then(|t| t.to_dtype(dtype)).map_err(|e| fail(e.to_string()))?;
            out.tensors.insert(name, t);
        }
        out.files.insert(self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        Ok(out)
    }
}

/// Whether the tensor `name` of type `ty` is held in its blocks: a projection in a block type,
/// unless the model is dequantized.
fn kept_in_blocks(name: &str, ty: GgmlDType, dequantize: bool) -> bool {
    let block_type = !matches!(ty, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    block_type && !dequantize && crate::quant::is_linear_weight(name)
}

/// llama.cpp's name of a block type: `q8_0`, `q4_k`, `f16`.
pub fn type_name(t: GgmlDType) -> String {
    let debug = format!("{t:?}").to_ascii_lowercase();
    match debug.strip_suffix('k') {
        Some(base) if base.starts_with('q') => format!("{base}_k"),
        _ => debug,
    }
}

fn as_uint(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// Undoes llama.cpp's permutation of a q or k weight of `rows` rows over `heads` heads: within
/// each head, GGUF row `2j + i` is Hugging Face row `i * half + j`. Rows are moved whole, so
/// this holds for every block type.
fn unpermute_rows(data: &[u8], rows: usize, heads: usize) -> std::result::Result<Vec<u8>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) || !data.len().is_multiple_of(rows) {
        return Err(format!("{rows} rows do not split into {heads} heads of an even size"));
    }
    let (head_dim, row_bytes) = (rows / heads, data.len() / rows);
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let src = h * head_dim + 2 * j + i;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// Takes `range` along `dim` of a tensor of `dims` stored in block type `ty`; along the last
/// dimension (where the blocks lie) the range must fall on whole blocks.
fn slice_blocks(
    data: &[u8],
    ty: GgmlDType,
    dims: &[usize],
    dim: usize,
    range: Range<usize>,
) -> std::result::Result<(Vec<u8>, Vec<usize>), String> {
    let last = dims.len().checked_sub(1).ok_or("a tensor without dimensions")?;
    if dim > last || range.start > range.end || range.end > dims[dim] {
        return Err(format!("slice {range:?} of dimension {dim} is outside the shape {dims:?}"));
    }
    let (block, size) = (ty.block_size(), ty.type_size());
    let row = dims[last] / block * size;
    let (outer, stride, take_from, take) = if dim == last {
        if !range.start.is_multiple_of(block) || !range.end.is_multiple_of(block) {
            return Err(format!("slice {range:?} of rows of {} cuts {ty:?}'s blocks of {block}", dims[last]));
        }
        (dims[..last].iter().product::<usize>(), row, range.start / block * size, range.len() / block * size)
    } else {
        let inner = dims[dim + 1..last].iter().product::<usize>() * row;
        (dims[..dim].iter().product::<usize>(), dims[dim] * inner, range.start * inner, range.len() * inner)
    };
    let mut bytes = Vec::with_capacity(outer * take);
    for o in 0..outer {
        bytes.extend_from_slice(&data[o * stride + take_from..o * stride + take_from + take]);
    }
    let mut sliced = dims.to_vec();
    sliced[dim] = range.len();
    Ok((bytes, sliced))
}

#[cfg(test)]
mod tests;
