//! Module sizes from a model's shape alone: the module tree transformers builds for each
//! architecture (parameters and buffers, in registration order), and accelerate's
//! `compute_module_sizes` over it.

use super::*;
use std::collections::{HashMap, HashSet};

/// Byte sizes of every module and tensor, keyed as accelerate's `compute_module_sizes` keys them.
///
/// Entries keep accelerate's insertion order (all parameters in module order, then buffers);
/// lookups of unknown names return 0 just like its `defaultdict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSizes {
    pub(super) entries: Vec<(String, u64)>,
    pub(super) index: HashMap<String, usize>,
    pub(super) leaves: Vec<(String, u64)>,
}

impl ModuleSizes {
    /// Size of a module or tensor; 0 for names that own no counted tensor.
    pub fn get(&self, name: &str) -> u64 {
        self.index.get(name).map_or(0, |&i| self.entries[i].1)
    }

    /// Whole-model size (the `""` entry).
    pub fn total(&self) -> u64 {
        self.get("")
    }

    /// All entries in accelerate's order.
    pub fn entries(&self) -> &[(String, u64)] {
        &self.entries
    }

    /// Modules that directly own tensors, with the bytes they own directly (transformers' leaves).
    pub fn leaves(&self) -> &[(String, u64)] {
        &self.leaves
    }

    fn add(&mut self, name: String, size: u64) -> Result<(), PlacementError> {
        match self.index.get(&name) {
            Some(&i) => {
                let slot = &mut self.entries[i].1;
                *slot = slot.checked_add(size).ok_or_else(|| PlacementError::Overflow(format!("size of {name:?}")))?;
            }
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, size));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ModuleClass {
    CausalLm,
    Backbone,
    Embedding,
    LayerList,
    DecoderLayer,
    Attention,
    Mlp,
    Linear,
    RmsNorm,
    Rotary,
    Activation,
}

#[derive(Debug)]
pub(super) struct TensorSpec {
    pub(super) name: &'static str,
    pub(super) numel: u64,
}

/// A meta-model node: only names, classes and tensor element counts.
#[derive(Debug)]
pub(super) struct ModuleNode {
    pub(super) name: String,
    pub(super) class: ModuleClass,
    pub(super) params: Vec<TensorSpec>,
    /// Always float32 in these architectures (rotary frequencies).
    pub(super) buffers: Vec<TensorSpec>,
    pub(super) children: Vec<ModuleNode>,
}

impl ModuleNode {
    fn new(name: impl Into<String>, class: ModuleClass) -> Self {
        ModuleNode { name: name.into(), class, params: Vec::new(), buffers: Vec::new(), children: Vec::new() }
    }

    pub(super) fn is_no_split(&self) -> bool {
        self.class == ModuleClass::DecoderLayer
    }
}

pub(super) struct ModelTree {
    pub(super) root: ModuleNode,
    /// `(alias, source)`: the alias is the same tensor as the source and is not counted twice.
    pub(super) tied: Vec<(String, String)>,
    /// Parameters held in a block type (the shape's).
    pub(super) quantized: std::collections::BTreeMap<String, BlockType>,
}

pub(super) fn mul(a: u64, b: u64, what: &str) -> Result<u64, PlacementError> {
    a.checked_mul(b).ok_or_else(|| PlacementError::Overflow(what.to_string()))
}

pub(super) fn linear(name: &str, in_features: u64, out_features: u64, bias: bool) -> Result<ModuleNode, PlacementError> {
    let mut node = ModuleNode::new(name, ModuleClass::Linear);
    node.params.push(TensorSpec { name: "weight", numel: mul(in_features, out_features, name)? });
    if bias {
        node.params.push(TensorSpec { name: "bias", numel: out_features });
    }
    Ok(node)
}

pub(super) fn rms_norm(name: &str, dim: u64) -> ModuleNode {
    let mut node = ModuleNode::new(name, ModuleClass::RmsNorm);
    node.params.push(TensorSpec { name: "weight", numel: dim });
    node
}

/// Builds the tree `XForCausalLM(config)` creates, in `named_children` registration order.
pub(super) fn build_tree(shape: &ModelShape) -> Result<ModelTree, PlacementError> {
    let h = shape.hidden_size;
    let q_out = mul(shape.num_attention_heads, shape.head_dim, "q_proj width")?;
    let kv_out = mul(shape.num_key_value_heads, shape.head_dim, "k_proj width")?;
    let qkv_bias = shape.attention_bias;
    let o_bias = shape.attention_bias && shape.architecture != Architecture::Qwen2;

    let mut layers = ModuleNode::new("layers", ModuleClass::LayerList);
    for i in 0..shape.num_hidden_layers {
        let mut attn = ModuleNode::new("self_attn", ModuleClass::Attention);
        attn.children.push(linear("q_proj", h, q_out, qkv_bias)?);
        attn.children.push(linear("k_proj", h, kv_out, qkv_bias)?);
        attn.children.push(linear("v_proj", h, kv_out, qkv_bias)?);
        attn.children.push(linear("o_proj", q_out, h, o_bias)?);
        if shape.architecture == Architecture::Qwen3 {
            attn.children.push(rms_norm("q_norm", shape.head_dim));
            attn.children.push(rms_norm("k_norm", shape.head_dim));
        }
        let mut mlp = ModuleNode::new("mlp", ModuleClass::Mlp);
        mlp.children.push(linear("gate_proj", h, shape.intermediate_size, shape.mlp_bias)?);
        mlp.children.push(linear("up_proj", h, shape.intermediate_size, shape.mlp_bias)?);
        mlp.children.push(linear("down_proj", shape.intermediate_size, h, shape.mlp_bias)?);
        // Parameter-free, but still a child module, so it is part of the tree accelerate walks.
        mlp.children.push(ModuleNode::new("act_fn", ModuleClass::Activation));

        let mut layer = ModuleNode::new(i.to_string(), ModuleClass::DecoderLayer);
        layer.children.push(attn);
        layer.children.push(mlp);
        layer.children.push(rms_norm("input_layernorm", h));
        layer.children.push(rms_norm("post_attention_layernorm", h));
        layers.children.push(layer);
    }

    let mut embed = ModuleNode::new("embed_tokens", ModuleClass::Embedding);
    embed.params.push(TensorSpec { name: "weight", numel: mul(shape.vocab_size, h, "embed_tokens")? });
    // transformers 5 registers the default RoPE frequencies twice (`inv_freq` and
    // `original_inv_freq`), both float32 with ceil(head_dim / 2) entries.
    let freqs = shape.head_dim.div_ceil(2);
    let mut rotary = ModuleNode::new("rotary_emb", ModuleClass::Rotary);
    rotary.buffers.push(TensorSpec { name: "inv_freq", numel: freqs });
    rotary.buffers.push(TensorSpec { name: "original_inv_freq", numel: freqs });

    let mut backbone = ModuleNode::new("model", ModuleClass::Backbone);
    backbone.children.push(embed);
    backbone.children.push(layers);
    backbone.children.push(rms_norm("norm", h));
    backbone.children.push(rotary);

    let mut root = ModuleNode::new("", ModuleClass::CausalLm);
    root.children.push(backbone);
    root.children.push(linear("lm_head", h, shape.vocab_size, false)?);

    let tied =
        if shape.tie_word_embeddings { vec![("lm_head.weight".to_string(), "model.embed_tokens.weight".to_string())] } else { Vec::new() };
    Ok(ModelTree { root, tied, quantized: shape.quantized.clone() })
}

pub(super) fn join_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Visits tensors in `named_parameters()` then `named_buffers()` order.
pub(super) fn collect_tensors<'a>(node: &'a ModuleNode, prefix: &str, buffers: bool, out: &mut Vec<(String, &'a TensorSpec)>) {
    let list = if buffers { &node.buffers } else { &node.params };
    for t in list {
        out.push((join_name(prefix, t.name), t));
    }
    for child in &node.children {
        collect_tensors(child, &join_name(prefix, &child.name), buffers, out);
    }
}

pub(super) fn sizes_of_tree(tree: &ModelTree, dtype_bytes: u64) -> Result<ModuleSizes, PlacementError> {
    if dtype_bytes == 0 {
        return Err(PlacementError::ZeroDtypeWidth);
    }
    let mut sizes = ModuleSizes { entries: Vec::new(), index: HashMap::new(), leaves: Vec::new() };
    let mut leaf_index: HashMap<String, usize> = HashMap::new();
    let aliases: HashSet<&str> = tree.tied.iter().map(|(alias, _)| alias.as_str()).collect();
    // accelerate loads weights as `dtype`, but never widens a tensor: float32 buffers
    // therefore cost min(dtype, 4) bytes per element.
    let buffer_bytes = dtype_bytes.min(4);
    for (buffers, width) in [(false, dtype_bytes), (true, buffer_bytes)] {
        let mut tensors = Vec::new();
        collect_tensors(&tree.root, "", buffers, &mut tensors);
        for (name, t) in tensors {
            if aliases.contains(name.as_str()) {
                continue;
            }
            let size = match tree.quantized.get(&name).filter(|_| !buffers) {
                Some(b) => mul(t.numel.div_ceil(b.weights.max(1)), b.bytes, &name)?,
                None => mul(t.numel, width, &name)?,
            };
            let mut prefix_end = Some(0);
            sizes.add(String::new(), size)?;
            while let Some(start) = prefix_end {
                match name[start..].find('.') {
                    Some(off) => {
                        sizes.add(name[..start + off].to_string(), size)?;
                        prefix_end = Some(start + off + 1);
                    }
                    None => prefix_end = None,
                }
            }
            sizes.add(name.clone(), size)?;
            if let Some((parent, _)) = name.rsplit_once('.') {
                match leaf_index.get(parent) {
                    Some(&i) => {
                        let slot = &mut sizes.leaves[i].1;
                        *slot = slot.checked_add(size).ok_or_else(|| PlacementError::Overflow(format!("size of {parent:?}")))?;
                    }
                    None => {
                        leaf_index.insert(parent.to_string(), sizes.leaves.len());
                        sizes.leaves.push((parent.to_string(), size));
                    }
                }
            }
        }
    }
    Ok(sizes)
}

/// Sizes of every module and tensor of a meta-initialised model loaded as a dtype of
/// `dtype_bytes` bytes, as accelerate's `compute_module_sizes(model, dtype=...)` reports them.
///
/// Tied aliases (`lm_head.weight` with tied embeddings) are counted once, under the embedding.
pub fn module_sizes(shape: &ModelShape, dtype_bytes: u64) -> Result<ModuleSizes, PlacementError> {
    sizes_of_tree(&build_tree(shape)?, dtype_bytes)
}
