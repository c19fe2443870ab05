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
    load_quantized(dir, wanted, slice, dtype, None, None, device)
}

/// [`load`], with the linear weights quantized to `quantize` one by one as they are read (the
/// full-precision tensor dropped before the next is read). An FP8 checkpoint's weights
/// (`F8_E4M3`, `fp8_block` its `weight_block_size`) are dequantized as they are read, each
/// block times its `weight_scale_inv`, before anything else.
pub fn load_quantized(
    dir: &Path,
    wanted: &dyn Fn(&str) -> bool,
    slice: Slicer<'_>,
    dtype: Option<DType>,
    quantize: Option<crate::quant::Quantize>,
    fp8_block: Option<[usize; 2]>,
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
    // The scales first (one f32 a block): a weight's may be in another file of the index.
    let mut scales = HashMap::new();
    if fp8_block.is_some() {
        for (file, names) in &plan {
            let path = dir.join(file);
            let mmap = map_file(&path)?;
            let st = mmap.deserialize().map_err(|e| Error::LoadWeights(format!("{file}: corrupt or truncated safetensors file: {e}")))?;
            let names: Vec<String> = match names {
                Some(n) => n.clone(),
                None => st.names().into_iter().map(str::to_string).collect(),
            };
            for name in names.into_iter().filter(|n| n.ends_with(FP8_SCALE) && wanted(n)) {
                let fail = |e: String| Error::LoadWeights(format!("{file}: tensor {name}: {e}"));
                let t = st.tensor(&name).map_err(|e| fail(e.to_string()))?.load(&Device::Cpu).map_err(|e| fail(e.to_string()))?;
                scales.insert(name.clone(), t.to_dtype(DType::F32).map_err(|e| fail(e.to_string()))?);
            }
        }
    }
    let mut out = LoadedTensors::default();
    for (file, names) in plan {
        let path = dir.join(&file);
        let fp8 = fp8_block.map(|b| (b, &scales));
        read_file(&path, &file, names.as_deref(), (wanted, slice), (dtype, quantize), fp8, device, &mut out)?;
        out.files.insert(file);
    }
    Ok(out)
}

/// The suffix of an FP8 weight's scales: `…q_proj.weight` is scaled by `…q_proj.weight_scale_inv`.
const FP8_SCALE: &str = "_scale_inv";

/// An FP8 checkpoint's `weight_block_size` and the scales read, by name.
type Fp8<'a> = ([usize; 2], &'a HashMap<String, Tensor>);

#[allow(clippy::too_many_arguments)]
fn read_file(
    path: &Path,
    file: &str,
    names: Option<&[String]>,
    (wanted, slice): (&dyn Fn(&str) -> bool, Slicer<'_>),
    (dtype, quantize): (Option<DType>, Option<crate::quant::Quantize>),
    fp8: Option<Fp8<'_>>,
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
        if fp8.is_some() && name.ends_with(FP8_SCALE) {
            continue;
        }
        let view =
            st.tensor(&name).map_err(|e| Error::LoadWeights(format!("{file}: tensor {name} listed in the index is not there: {e}")))?;
        let sliced = slice(&name, view.shape());
        let t = if view.dtype() == safetensors::Dtype::F8_E4M3 {
            dequantize_fp8(&view, &name, sliced, fp8, device)
        } else {
            match sliced {
                None => view.load(device).map_err(|e| e.to_string()),
                Some((dim, range)) => load_slice(&view, dim, range, device),
            }
        }
        .map_err(|e| Error::LoadWeights(format!("{file}: tensor {name}: {e}")))?;
        crate::pages::release_mapped(view.data());
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

/// The FP8 weight `name` (its part `sliced`) in f32: each element times its block's scale, as
/// transformers' `finegrained_fp8` dequantizes (blocks at the edges may be partial).
fn dequantize_fp8(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    sliced: Option<(usize, Range<usize>)>,
    fp8: Option<Fp8<'_>>,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let ([bo, bi], scales) = fp8.ok_or("it is F8_E4M3, but config.json has no fp8 quantization_config")?;
    let scale =
        scales.get(&format!("{name}{FP8_SCALE}")).ok_or_else(|| format!("its scales, {name}{FP8_SCALE}, are not in the checkpoint"))?;
    let &[rows, cols] = view.shape() else { return Err(format!("an F8_E4M3 tensor of shape {:?} is not a 2-D weight", view.shape())) };
    let blocks = [rows.div_ceil(bo), cols.div_ceil(bi)];
    if scale.dims() != blocks {
        return Err(format!("its scales are {:?}; blocks of {bo}x{bi} over {rows}x{cols} need {blocks:?}", scale.dims()));
    }
    let (r0, c0) = match &sliced {
        Some((0, r)) => (r.start, 0),
        Some((1, r)) => (0, r.start),
        _ => (0, 0),
    };
    let cpu = Device::Cpu;
    let w = match sliced {
        None => view.load(&cpu).map_err(|e| e.to_string())?,
        Some((dim, range)) => load_slice(view, dim, range, &cpu)?,
    };
    let (h, width) = w.dims2().map_err(|e| e.to_string())?;
    let mut v = w.to_dtype(DType::F32).and_then(|w| w.flatten_all()?.to_vec1::<f32>()).map_err(|e| e.to_string())?;
    let s = scale.to_vec2::<f32>().map_err(|e| e.to_string())?;
    for (r, row) in v.chunks_mut(width).enumerate() {
        let s = &s[(r + r0) / bo];
        for (c, x) in row.iter_mut().enumerate() {
            *x *= s[(c + c0) / bi];
        }
    }
    debug_assert_eq!(v.len(), h * width);
    Tensor::from_vec(v, (h, width), device).map_err(|e| e.to_string())
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
        D::F8_E4M3 => DType::F8E4M3,
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
