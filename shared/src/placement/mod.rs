//! Device placement planner that reproduces Hugging Face `from_pretrained(..., device_map=...)`.
//!
//! transformers decides where each submodule of a causal LM lives by running accelerate's
//! `get_balanced_memory` and `infer_auto_device_map` on a meta-initialised model. This module
//! rebuilds the module tree of the supported architectures from the config alone and runs a
//! faithful port of that algorithm, so a shard plan computed here matches the one a Python
//! worker would compute key for key, value for value and in the same key order.

pub mod accelerate;
pub mod cluster;
mod parse;
pub mod replicas;
pub mod sizes;

pub use parse::{dtype_bytes, parse_max_memory, parse_size};
#[cfg(test)]
mod tests;

pub use crate::config::Architecture;
pub use accelerate::{balanced_memory, infer_auto_device_map, infer_device_map};
pub use sizes::{module_sizes, ModuleSizes};
use std::fmt;
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors raised while reading configs, parsing memory budgets or planning placement.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// A size string that accelerate's `convert_file_size_to_int` would reject.
    #[error(
        "invalid size {value:?}: use an integer number of bytes or a number with a unit \
         (GiB, MiB, KiB, GB, MB, KB; a trailing lowercase `b` as in `Gb` means bits)"
    )]
    InvalidSize {
        /// The rejected text.
        value: String,
    },
    /// A device name that is neither a GPU index nor `cpu`/`disk`.
    #[error("invalid device {value:?}: expected a GPU index (0, 1, ...), \"cpu\" or \"disk\"")]
    InvalidDevice {
        /// The rejected text.
        value: String,
    },
    /// One `device=size` item of a max-memory string is malformed.
    #[error("invalid max_memory item {item:?}: {reason}")]
    InvalidMaxMemoryItem {
        /// The offending item as written.
        item: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same device was given two budgets.
    #[error("device {device} appears more than once in max_memory")]
    DuplicateDevice {
        /// The repeated device.
        device: Device,
    },
    /// No budget was given at all.
    #[error(
        "max_memory is empty: give at least one budget such as \"0=40GiB,cpu=64GiB\" \
         (probing free GPU memory is not supported)"
    )]
    EmptyMaxMemory,
    /// A dtype name this planner does not know the width of.
    #[error("unsupported dtype {0:?}: expected float32/f32, bfloat16/bf16 or float16/f16")]
    UnsupportedDtype(String),
    /// A dtype width of zero bytes would make every module free.
    #[error("dtype width must be at least one byte")]
    ZeroDtypeWidth,
    /// The config names a model family this planner cannot lay out.
    #[error(
        "unsupported architecture {0:?}: expected model_type qwen3, qwen2, llama or mistral \
         (or architectures Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM)"
    )]
    UnsupportedArchitecture(String),
    /// A config field is missing, has the wrong type or an impossible value.
    #[error("config field `{field}`: {reason}")]
    InvalidConfig {
        /// The JSON key concerned.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A `device_map` strategy name transformers would not accept.
    #[error("unknown device_map strategy {0:?}: expected auto, balanced, balanced_low_0 or sequential")]
    UnknownStrategy(String),
    /// A size computation does not fit in 64 bits.
    #[error("size overflow while computing {0}")]
    Overflow(String),
    /// `balanced_low_0` indexes GPUs as 0..n, so a gap in the indices cannot be balanced.
    #[error("balanced_low_0 needs GPU {index} in max_memory because it assumes GPUs are numbered 0..n without gaps")]
    MissingGpu {
        /// The absent GPU index.
        index: u32,
    },
    /// The planner reached a state accelerate would crash in.
    #[error("placement failed: {0}")]
    Internal(String),
    /// The model needs more memory than the fleet offers.
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    /// An explicit device map that does not describe a pipeline over the fleet.
    #[error("device map: {0}")]
    BadDeviceMap(String),
}

/// A tensor held in a quantization block type rather than the dtype (llama.cpp's Q8_0 is 32
/// weights in 34 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockType {
    /// Weights per block.
    pub weights: u64,
    /// Bytes a block takes.
    pub bytes: u64,
}

/// The config values that determine every parameter and buffer shape of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    /// Which module tree to build.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: u64,
    /// Width of the MLP's inner projection.
    pub intermediate_size: u64,
    /// Number of decoder layers.
    pub num_hidden_layers: u64,
    /// Number of query heads.
    pub num_attention_heads: u64,
    /// Number of key/value heads (equal to the query heads without GQA).
    pub num_key_value_heads: u64,
    /// Width of one attention head.
    pub head_dim: u64,
    /// Number of token embeddings.
    pub vocab_size: u64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Projection biases. For Qwen2 this means q/k/v only (its o_proj never has one); for the
    /// other families it is the config's `attention_bias`, which covers q/k/v/o.
    pub attention_bias: bool,
    /// Biases on gate/up/down projections (only Llama's config can turn these on).
    pub mlp_bias: bool,
    /// The parameters held in a block type, by name (`model.layers.0.mlp.down_proj.weight`):
    /// sized at their blocks' bytes, every other tensor at the dtype's. Empty from a config, as
    /// accelerate sizes a model; the coordinator fills it for a quantized model.
    pub quantized: std::collections::BTreeMap<String, BlockType>,
}

impl ModelShape {
    /// Reads a Hugging Face `config.json` value, filling in the defaults transformers applies.
    pub fn from_config_json(v: &serde_json::Value) -> Result<Self, PlacementError> {
        let obj = v.as_object().ok_or(PlacementError::InvalidConfig { field: "<root>", reason: "config must be a JSON object".into() })?;
        let architecture = detect_architecture(obj)?;

        let hidden_size = required_u64(obj, "hidden_size")?;
        let intermediate_size = required_u64(obj, "intermediate_size")?;
        let num_hidden_layers = required_u64(obj, "num_hidden_layers")?;
        let num_attention_heads = required_u64(obj, "num_attention_heads")?;
        let vocab_size = required_u64(obj, "vocab_size")?;
        for (field, value) in [("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads), ("vocab_size", vocab_size)] {
            if value == 0 {
                return Err(PlacementError::InvalidConfig { field, reason: "must be greater than zero".into() });
            }
        }
        let num_key_value_heads = optional_u64(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = optional_u64(obj, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        for (field, value) in [("num_key_value_heads", num_key_value_heads), ("head_dim", head_dim)] {
            if value == 0 {
                return Err(PlacementError::InvalidConfig { field, reason: "must be greater than zero".into() });
            }
        }
        let tie_word_embeddings = optional_bool(obj, "tie_word_embeddings")?.unwrap_or(false);
        // The modeling code, not the config, decides biases for Qwen2 and Mistral.
        let (attention_bias, mlp_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Mistral => (false, false),
            Architecture::Qwen3 => (optional_bool(obj, "attention_bias")?.unwrap_or(false), false),
            Architecture::Llama => {
                (optional_bool(obj, "attention_bias")?.unwrap_or(false), optional_bool(obj, "mlp_bias")?.unwrap_or(false))
            }
        };
        Ok(ModelShape {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
            quantized: Default::default(),
        })
    }

    /// The shape with every decoder layer's attention and MLP projections held in `block`, as
    /// `--quantize` loads them.
    pub fn with_projections_in(mut self, block: BlockType) -> Result<Self, PlacementError> {
        let tree = sizes::build_tree(&self)?;
        let mut tensors = Vec::new();
        sizes::collect_tensors(&tree.root, "", false, &mut tensors);
        let names: Vec<String> = tensors.into_iter().map(|(n, _)| n).filter(|n| crate::quant::is_linear_weight(n)).collect();
        self.quantized.extend(names.into_iter().map(|n| (n, block)));
        Ok(self)
    }
}

fn detect_architecture(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Architecture, PlacementError> {
    let model_type = match obj.get("model_type") {
        Some(serde_json::Value::String(mt)) => Some(mt.as_str()),
        None | Some(serde_json::Value::Null) => None,
        Some(other) => {
            return Err(PlacementError::InvalidConfig { field: "model_type", reason: format!("expected a string, found {other}") })
        }
    };
    let first = obj.get("architectures").and_then(|a| a.as_array()).and_then(|a| a.first()).and_then(|a| a.as_str());
    Architecture::detect(model_type, first).map_err(|e| match e {
        crate::config::ArchitectureError::Unsupported(name) => PlacementError::UnsupportedArchitecture(name),
        crate::config::ArchitectureError::Missing => {
            PlacementError::InvalidConfig { field: "model_type", reason: "missing, and no `architectures` entry to fall back on".into() }
        }
        e @ crate::config::ArchitectureError::Disagree { .. } => {
            PlacementError::InvalidConfig { field: "architectures", reason: e.to_string() }
        }
    })
}

fn optional_u64(obj: &serde_json::Map<String, serde_json::Value>, field: &'static str) -> Result<Option<u64>, PlacementError> {
    match obj.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| PlacementError::InvalidConfig { field, reason: format!("expected a non-negative integer, found {v}") }),
    }
}

fn required_u64(obj: &serde_json::Map<String, serde_json::Value>, field: &'static str) -> Result<u64, PlacementError> {
    optional_u64(obj, field)?.ok_or(PlacementError::InvalidConfig { field, reason: "missing".into() })
}

fn optional_bool(obj: &serde_json::Map<String, serde_json::Value>, field: &'static str) -> Result<Option<bool>, PlacementError> {
    match obj.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| PlacementError::InvalidConfig { field, reason: format!("expected true or false, found {v}") }),
    }
}

/// Where a module is placed, as accelerate names it.
///
/// The variant order doubles as accelerate's device priority: GPUs by index, then CPU, then disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// An accelerator, by index.
    Index(u32),
    /// Host memory.
    Cpu,
    /// Offloaded to disk.
    Disk,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Index(i) => write!(f, "{i}"),
            Device::Cpu => f.write_str("cpu"),
            Device::Disk => f.write_str("disk"),
        }
    }
}

impl FromStr for Device {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "disk" => Ok(Device::Disk),
            _ if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u32>().map(Device::Index).map_err(|_| PlacementError::InvalidDevice { value: s.to_string() })
            }
            _ => Err(PlacementError::InvalidDevice { value: s.to_string() }),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Device::Index(i) => serializer.serialize_u32(*i),
            Device::Cpu => serializer.serialize_str("cpu"),
            Device::Disk => serializer.serialize_str("disk"),
        }
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DeviceVisitor;
        impl Visitor<'_> for DeviceVisitor {
            type Value = Device;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPU index or \"cpu\"/\"disk\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Device, E> {
                u32::try_from(v).map(Device::Index).map_err(|_| E::custom(format!("GPU index {v} out of range")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Device, E> {
                u32::try_from(v).map(Device::Index).map_err(|_| E::custom(format!("invalid GPU index {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Device, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(DeviceVisitor)
    }
}

/// The `device_map` values transformers accepts as strategy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Balance layers over the GPUs (transformers treats it exactly like `balanced`).
    Auto,
    /// Balance layers over the GPUs.
    Balanced,
    /// Balance over GPUs 1..n and keep GPU 0 as empty as possible (room for `generate`).
    BalancedLow0,
    /// Fill each device to its budget in order.
    Sequential,
}

impl Strategy {
    /// The name as passed to `from_pretrained(device_map=...)`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::Balanced => "balanced",
            Strategy::BalancedLow0 => "balanced_low_0",
            Strategy::Sequential => "sequential",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Strategy::Auto),
            "balanced" => Ok(Strategy::Balanced),
            "balanced_low_0" => Ok(Strategy::BalancedLow0),
            "sequential" => Ok(Strategy::Sequential),
            _ => Err(PlacementError::UnknownStrategy(s.to_string())),
        }
    }
}

/// A device map in accelerate's insertion order: module name (`""` for the whole model) to device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceMap(pub Vec<(String, Device)>);

impl DeviceMap {
    /// The device of an exact key, if present.
    pub fn get(&self, module: &str) -> Option<Device> {
        self.0.iter().find(|(k, _)| k == module).map(|(_, d)| *d)
    }

    /// The device holding a module or parameter, resolved through its nearest mapped ancestor.
    pub fn device_of(&self, name: &str) -> Option<Device> {
        let mut current = name;
        loop {
            if let Some(d) = self.get(current) {
                return Some(d);
            }
            if current.is_empty() {
                return None;
            }
            current = current.rsplit_once('.').map_or("", |(parent, _)| parent);
        }
    }

    /// JSON object text with keys in map order, as `json.dumps` of accelerate's `OrderedDict`.
    pub fn to_json_string(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, d)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            // As Python's json.dumps writes a key (ensure_ascii, its default).
            crate::chat::json_string(k, true, &mut out);
            out.push_str(": ");
            match d {
                Device::Index(idx) => out.push_str(&idx.to_string()),
                Device::Cpu => out.push_str("\"cpu\""),
                Device::Disk => out.push_str("\"disk\""),
            }
        }
        out.push('}');
        out
    }
}

impl Serialize for DeviceMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, d) in &self.0 {
            map.serialize_entry(k, d)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for DeviceMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = DeviceMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object from module names to devices")
            }
            // Reading entries straight off the visitor keeps document order without needing
            // serde_json's `preserve_order` feature.
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<DeviceMap, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, d)) = access.next_entry::<String, Device>()? {
                    entries.push((k, d));
                }
                Ok(DeviceMap(entries))
            }
        }
        deserializer.deserialize_map(MapVisitor)
    }
}
