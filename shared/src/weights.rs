//! Reads a checkpoint's safetensors files (one file or a sharded index), memory-mapped, taking
//! only the tensors a shard owns and opening only the files that hold them.

use crate::error::{Error, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;

/// Which part of a tensor to read: `Some((dim, range))` keeps only `range` along `dim` (a
/// tensor-parallel rank's slice); `None` reads it whole. Given the name and the shape on disk.
pub type Slicer<'a> = &'a dyn Fn(&str, &[usize]) -> Option<(usize, Range<usize>)>;

/// Reads `model.safetensors.index.json`: tensor name → file name.
pub fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| Error::LoadWeights(format!("{}: malformed index: {e}", path.display())))?;
    for file in index.weight_map.values() {
        if file.contains('/') || file.starts_with('.') {
            return Err(Error::LoadWeights(format!("{}: file name {file:?} leaves the model folder", path.display())));
        }
    }
    Ok(index.weight_map)
}

/// The tensors a shard read, and where from.
#[derive(Debug, Default)]
pub struct LoadedTensors {
    pub tensors: HashMap<String, Tensor>,
    /// The linear weights quantized as they were read (with a quantization).
    pub quantized: crate::quant::QuantizedWeights,
    /// The checkpoint files opened, by name.
    pub files: BTreeSet<String>,
}

impl LoadedTensors {
    /// Bytes held, after conversion.
    pub fn bytes(&self) -> u64 {
        let dense: u64 = self.tensors.values().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
        dense + self.quantized.values().map(|q| q.storage_size_in_bytes() as u64).sum::<u64>()
    }
}

/// Loads every tensor for which `wanted(name)` holds — only the part `slice` names — converted
/// to `dtype` (or kept as on disk when `dtype` is `None`).
pub fn load(dir: &Path, wanted: &dyn Fn(&str) -> bool, slice: Slicer<'_>, dtype: Option<DType>, device: &Device) -> Result<LoadedTensors> {
    load_quantized(dir, wanted, slice, dtype, None, device)
}

/// [`load`], with the linear weights quantized to `quantize` one by one as they are read (the
/// full-precision tensor dropped before the next is read).
pub fn load_quantized(
    dir: &Path,
    wanted: &dyn Fn(&str) -> bool,
    slice: Slicer<'_>,
    dtype: Option<DType>,
    quantize: Option<crate::quant::Quantize>,
    device: &Device,
) -> Result<LoadedTensors> {
    let index = dir.join("model.safetensors.index.json");
    let plan: Vec<(String, Option<Vec<String>>)> = if index.is_file() {
        let map = read_index(&index)?;
        let mut by_file: HashMap<String, Vec<String>> = HashMap::new();
        for (name, file) in map {
            if wanted(&name) {
                by_file.entry(file).or_default().push(name);
            }
        }
        let mut plan: Vec<_> = by_file.into_iter().map(|(f, n)| (f, Some(n))).collect();
        plan.sort_by(|a, b| a.0.cmp(&b.0));
        plan
    } else {
        vec![("model.safetensors".to_string(), None)]
    };
    let mut out = LoadedTensors::default();
    for (file, names) in plan {
        let path = dir.join(&file);
        read_file(&path, &file, names.as_deref(), (wanted, slice), (dtype, quantize), device, &mut out)?;
        out.files.insert(file);
    }
    Ok(out)
}

fn read_file(
    path: &Path,
    file: &str,
    names: Option<&[String]>,
    (wanted, slice): (&dyn Fn(&str) -> bool, Slicer<'_>),
    (dtype, quantize): (Option<DType>, Option<crate::quant::Quantize>),
    device: &Device,
    out: &mut LoadedTensors,
) -> Result<()> {
    if !path.is_file() {
        return Err(Error::LoadWeights(format!("{} does not exist", path.display())));
    }
    let mmap = map_file(path)?;
    let st = mmap.deserialize().map_err(|e| Error::LoadWeights(format!("{file}: corrupt or truncated safetensors file: {e}")))?;
    let names: Vec<String> = match names {
        Some(n) => n.to_vec(),
        None => st.names().into_iter().filter(|n| wanted(n)).map(str::to_string).collect(),
    };
    for name in names {
        let view =
            st.tensor(&name).map_err(|e| Error::LoadWeights(format!("{file}: tensor {name} listed in the index is not there: {e}")))?;
        let t = match slice(&name, view.shape()) {
            None => view.load(device).map_err(|e| e.to_string()),
            Some((dim, range)) => load_slice(&view, dim, range, device),
        }
        .map_err(|e| Error::LoadWeights(format!("{file}: tensor {name}: {e}")))?;
        if let Some(q) = quantize.filter(|_| crate::quant::is_linear_weight(&name)) {
            let qt = q.quantize(&name, &t)?;
            out.quantized.insert(name, std::sync::Arc::new(qt));
            continue;
        }
        let t = match dtype {
            Some(d) if d != t.dtype() => t.to_dtype(d).map_err(|e| Error::LoadWeights(format!("{file}: tensor {name}: {e}")))?,
            _ => t,
        };
        out.tensors.insert(name, t);
    }
    Ok(())
}

/// Reads `range` along `dim` of a tensor, touching only those bytes of the file.
fn load_slice(
    view: &safetensors::tensor::TensorView<'_>,
    dim: usize,
    range: Range<usize>,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    use safetensors::Dtype as D;
    let dtype = match view.dtype() {
        D::F32 => DType::F32,
        D::BF16 => DType::BF16,
        D::F16 => DType::F16,
        other => return Err(format!("cannot slice a {other:?} tensor")),
    };
    let shape = view.shape();
    if dim >= shape.len() || range.start > range.end || range.end > shape[dim] {
        return Err(format!("slice {range:?} of dimension {dim} is outside the shape {shape:?}"));
    }
    let elem = dtype.size_in_bytes();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
    let outer: usize = shape[..dim].iter().product();
    let row = shape[dim] * inner;
    let (off, take) = (range.start * inner, range.len() * inner);
    let data = view.data();
    let mut bytes = Vec::with_capacity(outer * take);
    for o in 0..outer {
        bytes.extend_from_slice(&data[o * row + off..o * row + off + take]);
    }
    let mut sliced = shape.to_vec();
    sliced[dim] = range.len();
    Tensor::from_raw_buffer(&bytes, dtype, &sliced, device).map_err(|e| e.to_string())
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<candle_core::safetensors::MmapedFile> {
    // SAFETY: the mapping is read-only and checkpoint files (Hub blobs, or a model folder) are
    // never rewritten in place while served; the tensors are copied out before the map is
    // dropped.
    unsafe { candle_core::safetensors::MmapedFile::new(path) }.map_err(|e| Error::LoadWeights(format!("{}: {e}", path.display())))
}
