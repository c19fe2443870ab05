//! Tensors on the wire: raw little-endian bytes with dtype and shape, no compression.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use shardserve_proto::v1 as pb;

fn dtype_name(d: DType) -> Result<&'static str> {
    Dtype::short_name(d).ok_or_else(|| Error::Wire(format!("dtype {d:?} is not sent between stages")))
}

fn dtype_of(name: &str) -> Result<DType> {
    match name.parse::<Dtype>() {
        Ok(Dtype::Auto) | Err(_) => Err(Error::Wire(format!("unknown dtype {name:?}"))),
        Ok(d) => Ok(d.resolve(None, false)),
    }
}

/// Encodes a tensor (any layout) as raw little-endian bytes.
pub fn encode(t: &Tensor) -> Result<pb::Tensor> {
    let dtype = dtype_name(t.dtype())?;
    let flat = t.flatten_all().map_err(Error::Forward)?;
    let data: Vec<u8> = match t.dtype() {
        DType::F32 => flat.to_vec1::<f32>().map_err(Error::Forward)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => flat.to_vec1::<half::bf16>().map_err(Error::Forward)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => flat.to_vec1::<half::f16>().map_err(Error::Forward)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => unreachable!("dtype_name rejected it"),
    };
    Ok(pb::Tensor { dtype: dtype.to_string(), shape: t.dims().iter().map(|&d| d as u64).collect(), data })
}

/// The number of elements of `shape`, `None` when it does not fit in memory's address space.
/// A zero dimension makes the count 0, but the strides of the other dimensions (their product
/// with zeros left out) must fit as well: a peer's shape is checked before anything multiplies
/// it unchecked.
fn elements(shape: &[u64]) -> Option<usize> {
    let (mut n, mut strides) = (1usize, 1usize);
    for &d in shape {
        let d = usize::try_from(d).ok()?;
        n = n.checked_mul(d)?;
        strides = strides.checked_mul(d.max(1))?;
    }
    // Nothing past isize::MAX bytes can be allocated or indexed.
    (strides <= isize::MAX as usize).then_some(n)
}

/// Decodes a wire tensor onto `device`, checking that the bytes match dtype and shape.
pub fn decode(t: &pb::Tensor, device: &Device) -> Result<Tensor> {
    let dtype = dtype_of(&t.dtype)?;
    let too_large = || Error::Wire(format!("shape {:?} is too large for any tensor", t.shape));
    let n = elements(&t.shape).ok_or_else(too_large)?;
    let want = n.checked_mul(dtype.size_in_bytes()).ok_or_else(too_large)?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    if t.data.len() != want {
        return Err(Error::Wire(format!("{} bytes for a {:?} {} tensor that needs {want}", t.data.len(), shape, t.dtype)));
    }
    let b = &t.data;
    let tensor = match dtype {
        DType::F32 => {
            let v: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Tensor::from_vec(v, shape, device)
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect();
            Tensor::from_vec(v, shape, device)
        }
        DType::F16 => {
            let v: Vec<half::f16> = b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
            Tensor::from_vec(v, shape, device)
        }
        _ => unreachable!("dtype_of rejected it"),
    };
    tensor.map_err(Error::Forward)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_dtypes() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((1, 4, 6)).unwrap();
        for d in [DType::F32, DType::BF16, DType::F16] {
            let x = t.to_dtype(d).unwrap();
            let back = decode(&encode(&x).unwrap(), &Device::Cpu).unwrap();
            assert_eq!(back.dims(), &[1, 4, 6]);
            assert_eq!(back.dtype(), d);
            let diff = (back.to_dtype(DType::F32).unwrap() - &t).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn shapes_past_the_address_space_are_rejected() {
        // Found by the wire_tensor fuzzer: the element count (or, past a zero dimension, the
        // strides candle computes) overflowed.
        for shape in [vec![1u64 << 33, 1 << 33], vec![0, 1 << 40, 1 << 40], vec![u64::MAX], vec![1 << 62, 2]] {
            let w = pb::Tensor { dtype: "f32".into(), shape: shape.clone(), data: Vec::new() };
            let e = decode(&w, &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains("too large"), "{shape:?}: {e}");
        }
        let empty = pb::Tensor { dtype: "f16".into(), shape: vec![0, 1 << 20, 16], data: Vec::new() };
        assert_eq!(decode(&empty, &Device::Cpu).unwrap().dims(), &[0, 1 << 20, 16]);
    }

    #[test]
    fn wrong_length_is_rejected() {
        let mut w = encode(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        w.data.pop();
        assert!(decode(&w, &Device::Cpu).unwrap_err().to_string().contains("15 bytes"));
    }
}
