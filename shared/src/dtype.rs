//! The one dtype choice of shardserve (`auto`, `f32`, `bf16`, `f16`): parsed once from every
//! flag, request and config that names one, and resolved to the dtype a device computes in.

use crate::error::{Error, Result};
use candle_core::DType;

/// A compute dtype as users name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Dtype {
    /// The checkpoint's own dtype on a GPU; f32 on a CPU, where bf16/f16 matmuls are an order of
    /// magnitude slower.
    #[default]
    Auto,
    #[value(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    F16,
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::Auto => "auto",
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

impl std::str::FromStr for Dtype {
    type Err = Error;

    /// Our names and transformers' (`float32`, `torch.bfloat16`, `half`, …); empty is `auto`.
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim();
        let name = name.strip_prefix("torch.").unwrap_or(name).to_ascii_lowercase();
        match name.as_str() {
            "" | "auto" => Ok(Dtype::Auto),
            "f32" | "float32" | "float" | "fp32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" | "half" | "fp16" => Ok(Dtype::F16),
            _ => Err(Error::config("dtype", format!("unknown dtype {s:?} (expected auto, f32, bf16 or f16)"))),
        }
    }
}

impl From<DType> for Dtype {
    fn from(d: DType) -> Self {
        match d {
            DType::BF16 => Dtype::Bf16,
            DType::F16 => Dtype::F16,
            _ => Dtype::F32,
        }
    }
}

impl Dtype {
    /// The dtype computed in on a GPU (`gpu`) or a CPU, for a checkpoint stored as
    /// `checkpoint` (config.json's `torch_dtype`).
    pub fn resolve(self, checkpoint: Option<&str>, gpu: bool) -> DType {
        match self {
            Dtype::Auto if !gpu => DType::F32,
            Dtype::Auto => match checkpoint.and_then(|c| c.parse::<Dtype>().ok()) {
                Some(Dtype::Bf16) => DType::BF16,
                Some(Dtype::F16) => DType::F16,
                _ => DType::F32,
            },
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }

    /// transformers' name of a dtype (`float32`, `bfloat16`, `float16`), as config.json holds it.
    pub fn hf_name(d: DType) -> Option<&'static str> {
        match d {
            DType::F32 => Some("float32"),
            DType::BF16 => Some("bfloat16"),
            DType::F16 => Some("float16"),
            _ => None,
        }
    }

    /// Our short name of a dtype (`f32`, `bf16`, `f16`).
    pub fn short_name(d: DType) -> Option<&'static str> {
        match d {
            DType::F32 => Some("f32"),
            DType::BF16 => Some("bf16"),
            DType::F16 => Some("f16"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_ours_and_transformers_parse() {
        for (s, d) in [
            ("", Dtype::Auto),
            ("auto", Dtype::Auto),
            ("f32", Dtype::F32),
            ("float32", Dtype::F32),
            ("torch.bfloat16", Dtype::Bf16),
            ("BF16", Dtype::Bf16),
            ("half", Dtype::F16),
            ("float16", Dtype::F16),
        ] {
            assert_eq!(s.parse::<Dtype>().unwrap(), d, "{s:?}");
        }
        let e = "int4".parse::<Dtype>().unwrap_err().to_string();
        assert!(e.contains("int4") && e.contains("auto, f32, bf16 or f16"), "{e}");
    }

    #[test]
    fn auto_is_the_checkpoints_dtype_on_gpus_and_f32_on_cpus() {
        assert_eq!(Dtype::Auto.resolve(Some("bfloat16"), true), DType::BF16);
        assert_eq!(Dtype::Auto.resolve(Some("float16"), true), DType::F16);
        assert_eq!(Dtype::Auto.resolve(None, true), DType::F32);
        assert_eq!(Dtype::Auto.resolve(Some("bfloat16"), false), DType::F32);
        assert_eq!(Dtype::Bf16.resolve(Some("float32"), false), DType::BF16);
    }
}
