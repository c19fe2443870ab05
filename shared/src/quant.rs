//! Quantization at load: a checkpoint's linear weights (the attention and MLP projections)
//! quantized to one of llama.cpp's block types as each is read, so a worker never holds its
//! share at full precision; the embedding, the norms and lm_head stay as they are.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// A block type to quantize linear weights to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Quantize {
    /// 8-bit, blocks of 32 weights with one f16 scale (8.5 bits a weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit, blocks of 32 with one f16 scale (4.5 bits a weight).
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits a weight).
    #[value(name = "q4_k")]
    Q4K,
}

/// The quantized linear weights of a shard, by tensor name.
pub type QuantizedWeights = HashMap<String, Arc<QTensor>>;

impl Quantize {
    /// Every type, as `--quantize` names them.
    pub const ALL: [Quantize; 3] = [Quantize::Q8_0, Quantize::Q4_0, Quantize::Q4K];

    /// Its name: `q8_0`, `q4_0` or `q4_k`.
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Q8_0 => "q8_0",
            Quantize::Q4_0 => "q4_0",
            Quantize::Q4K => "q4_k",
        }
    }

    /// The type by its name; empty is none.
    pub fn parse(s: &str) -> Result<Option<Self>> {
        if s.is_empty() {
            return Ok(None);
        }
        Quantize::ALL.into_iter().find(|q| q.name() == s).map(Some).ok_or_else(|| {
            let names: Vec<&str> = Quantize::ALL.iter().map(|q| q.name()).collect();
            Error::LoadWeights(format!("unknown quantization {s:?} (one of {})", names.join(", ")))
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4K => GgmlDType::Q4K,
        }
    }

    /// Weights per block: a row's length must be a multiple of it.
    pub fn block(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes a block of [`Quantize::block`] weights takes.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Its blocks, as the planner sizes them.
    pub fn block_type(self) -> crate::placement::BlockType {
        crate::placement::BlockType { weights: self.block() as u64, bytes: self.block_bytes() as u64 }
    }

    /// Checks that `name`, a weight of `shape` (out, in), splits into whole blocks along its
    /// rows: the message names the tensor and the types that fit.
    pub fn check(self, name: &str, shape: &[usize]) -> Result<()> {
        let row = shape.last().copied().unwrap_or(0);
        if row % self.block() == 0 {
            return Ok(());
        }
        let fits: Vec<&str> = Quantize::ALL.iter().filter(|q| row % q.block() == 0).map(|q| q.name()).collect();
        let fits = if fits.is_empty() { "no type does".to_string() } else { format!("{} does", fits.join(" or ")) };
        Err(Error::LoadWeights(format!(
            "{name}: rows of {row} weights do not split into {}'s blocks of {}; {fits}",
            self.name(),
            self.block()
        )))
    }

    /// `t`, the weight `name`, quantized.
    pub fn quantize(self, name: &str, t: &Tensor) -> Result<QTensor> {
        self.check(name, t.dims())?;
        QTensor::quantize(t, self.ggml()).map_err(|e| Error::LoadWeights(format!("quantizing {name} to {}: {e}", self.name())))
    }
}

impl std::fmt::Display for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `name` is a weight quantization applies to: an attention or MLP projection.
pub fn is_linear_weight(name: &str) -> bool {
    const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    name.strip_suffix(".weight").and_then(|n| n.rsplit('.').next()).is_some_and(|p| PROJECTIONS.contains(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_only_projections_are_quantized() {
        for q in Quantize::ALL {
            assert_eq!(Quantize::parse(q.name()).unwrap(), Some(q));
            // The flag's spelling is the worker's.
            assert_eq!(clap::ValueEnum::to_possible_value(&q).unwrap().get_name(), q.name());
        }
        assert_eq!(Quantize::parse("").unwrap(), None);
        assert!(Quantize::parse("q5_k").unwrap_err().to_string().contains("one of q8_0, q4_0, q4_k"));
        assert!(is_linear_weight("model.layers.3.mlp.down_proj.weight"));
        assert!(is_linear_weight("model.layers.0.self_attn.q_proj.weight"));
        assert!(!is_linear_weight("model.layers.0.self_attn.q_proj.bias"));
        assert!(!is_linear_weight("model.embed_tokens.weight") && !is_linear_weight("lm_head.weight"));
        assert!(!is_linear_weight("model.layers.0.input_layernorm.weight"));
    }

    #[test]
    fn a_row_that_cuts_a_block_is_refused_naming_the_types_that_fit() {
        // Qwen3-32B's down_proj at tp 8: 25,600 / 8 = 3,200 columns, not a multiple of 256.
        let e = Quantize::Q4K.check("model.layers.0.mlp.down_proj.weight", &[5120, 3200]).unwrap_err().to_string();
        assert!(e.contains("down_proj") && e.contains("3200") && e.contains("q8_0 or q4_0 does"), "{e}");
        assert!(Quantize::Q8_0.check("x", &[5120, 3200]).is_ok());
        assert!(Quantize::Q8_0.check("x", &[8, 48]).unwrap_err().to_string().contains("no type does"));
        assert_eq!((Quantize::Q8_0.block(), Quantize::Q8_0.block_bytes()), (32, 34));
        assert_eq!((Quantize::Q4K.block(), Quantize::Q4K.block_bytes()), (256, 144));
    }

    #[test]
    fn quantized_weights_keep_their_values_within_the_types_error() {
        let t = Tensor::arange(0f32, 64.0, &candle_core::Device::Cpu).unwrap().affine(1.0 / 32.0, -1.0).unwrap().reshape((2, 32)).unwrap();
        for (q, tolerance) in [(Quantize::Q8_0, 0.01), (Quantize::Q4_0, 0.1)] {
            let back = q.quantize("w", &t).unwrap().dequantize(&candle_core::Device::Cpu).unwrap();
            let err = (back - &t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < tolerance, "{q}: max error {err}");
        }
    }
}
