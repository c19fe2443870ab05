//! accelerate's planning, ported: module sizes from a model's shape (`compute_module_sizes`),
//! balanced per-device budgets (`get_balanced_memory`), the greedy placement
//! (`infer_auto_device_map`) and the final clean-up (`clean_device_map`).

use super::*;
use std::collections::{HashMap, HashSet};

/// Byte sizes of every module and tensor, keyed as accelerate's `compute_module_sizes` keys them.
///
/// Entries keep accelerate's insertion order (all parameters in module order, then buffers);
/// lookups of unknown names return 0 just like its `defaultdict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSizes {
    entries: Vec<(String, u64)>,
    index: HashMap<String, usize>,
    leaves: Vec<(String, u64)>,
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
                *slot = slot
                    .checked_add(size)
                    .ok_or_else(|| PlacementError::Overflow(format!("size of {name:?}")))?;
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
enum ModuleClass {
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
    name: &'static str,
    numel: u64,
}

/// A meta-model node: only names, classes and tensor element counts.
#[derive(Debug)]
pub(super) struct ModuleNode {
    name: String,
    class: ModuleClass,
    params: Vec<TensorSpec>,
    /// Always float32 in these architectures (rotary frequencies).
    buffers: Vec<TensorSpec>,
    children: Vec<ModuleNode>,
}

impl ModuleNode {
    fn new(name: impl Into<String>, class: ModuleClass) -> Self {
        ModuleNode {
            name: name.into(),
            class,
            params: Vec::new(),
            buffers: Vec::new(),
            children: Vec::new(),
        }
    }

    fn is_no_split(&self) -> bool {
        self.class == ModuleClass::DecoderLayer
    }
}

pub(super) struct ModelTree {
    root: ModuleNode,
    /// `(alias, source)`: the alias is the same tensor as the source and is not counted twice.
    tied: Vec<(String, String)>,
}

pub(super) fn mul(a: u64, b: u64, what: &str) -> Result<u64, PlacementError> {
    a.checked_mul(b)
        .ok_or_else(|| PlacementError::Overflow(what.to_string()))
}

pub(super) fn linear(
    name: &str,
    in_features: u64,
    out_features: u64,
    bias: bool,
) -> Result<ModuleNode, PlacementError> {
    let mut node = ModuleNode::new(name, ModuleClass::Linear);
    node.params.push(TensorSpec {
        name: "weight",
        numel: mul(in_features, out_features, name)?,
    });
    if bias {
        node.params.push(TensorSpec {
            name: "bias",
            numel: out_features,
        });
    }
    Ok(node)
}

pub(super) fn rms_norm(name: &str, dim: u64) -> ModuleNode {
    let mut node = ModuleNode::new(name, ModuleClass::RmsNorm);
    node.params.push(TensorSpec {
        name: "weight",
        numel: dim,
    });
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
        mlp.children.push(linear(
            "gate_proj",
            h,
            shape.intermediate_size,
            shape.mlp_bias,
        )?);
        mlp.children.push(linear(
            "up_proj",
            h,
            shape.intermediate_size,
            shape.mlp_bias,
        )?);
        mlp.children.push(linear(
            "down_proj",
            shape.intermediate_size,
            h,
            shape.mlp_bias,
        )?);
        // Parameter-free, but still a child module, so it is part of the tree accelerate walks.
        mlp.children
            .push(ModuleNode::new("act_fn", ModuleClass::Activation));

        let mut layer = ModuleNode::new(i.to_string(), ModuleClass::DecoderLayer);
        layer.children.push(attn);
        layer.children.push(mlp);
        layer.children.push(rms_norm("input_layernorm", h));
        layer.children.push(rms_norm("post_attention_layernorm", h));
        layers.children.push(layer);
    }

    let mut embed = ModuleNode::new("embed_tokens", ModuleClass::Embedding);
    embed.params.push(TensorSpec {
        name: "weight",
        numel: mul(shape.vocab_size, h, "embed_tokens")?,
    });
    // transformers 5 registers the default RoPE frequencies twice (`inv_freq` and
    // `original_inv_freq`), both float32 with ceil(head_dim / 2) entries.
    let freqs = shape.head_dim.div_ceil(2);
    let mut rotary = ModuleNode::new("rotary_emb", ModuleClass::Rotary);
    rotary.buffers.push(TensorSpec {
        name: "inv_freq",
        numel: freqs,
    });
    rotary.buffers.push(TensorSpec {
        name: "original_inv_freq",
        numel: freqs,
    });

    let mut backbone = ModuleNode::new("model", ModuleClass::Backbone);
    backbone.children.push(embed);
    backbone.children.push(layers);
    backbone.children.push(rms_norm("norm", h));
    backbone.children.push(rotary);

    let mut root = ModuleNode::new("", ModuleClass::CausalLm);
    root.children.push(backbone);
    root.children
        .push(linear("lm_head", h, shape.vocab_size, false)?);

    let tied = if shape.tie_word_embeddings {
        vec![(
            "lm_head.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
        )]
    } else {
        Vec::new()
    };
    Ok(ModelTree { root, tied })
}

pub(super) fn join_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Visits tensors in `named_parameters()` then `named_buffers()` order.
pub(super) fn collect_tensors<'a>(
    node: &'a ModuleNode,
    prefix: &str,
    buffers: bool,
    out: &mut Vec<(String, &'a TensorSpec)>,
) {
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
    let mut sizes = ModuleSizes {
        entries: Vec::new(),
        index: HashMap::new(),
        leaves: Vec::new(),
    };
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
            let size = mul(t.numel, width, &name)?;
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
                        *slot = slot.checked_add(size).ok_or_else(|| {
                            PlacementError::Overflow(format!("size of {parent:?}"))
                        })?;
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

/// Validates budgets and orders them as accelerate's `get_max_memory` does: GPUs by index,
/// then CPU, then disk.
pub(super) fn normalize_max_memory(
    max_memory: &[(Device, u64)],
) -> Result<Vec<(Device, u64)>, PlacementError> {
    if max_memory.is_empty() {
        return Err(PlacementError::EmptyMaxMemory);
    }
    let mut seen = HashSet::new();
    for (d, _) in max_memory {
        if !seen.insert(*d) {
            return Err(PlacementError::DuplicateDevice { device: *d });
        }
    }
    let mut out = max_memory.to_vec();
    out.sort_by_key(|(d, _)| *d);
    Ok(out)
}

pub(super) fn budget_mut(mem: &mut [(Device, u64)], device: Device) -> Option<&mut u64> {
    mem.iter_mut().find(|(d, _)| *d == device).map(|(_, m)| m)
}

pub(super) fn budget(mem: &[(Device, u64)], device: Device) -> Option<u64> {
    mem.iter().find(|(d, _)| *d == device).map(|(_, m)| *m)
}

/// Per-device budgets that transformers' `get_balanced_memory` hands to the placer for
/// `auto`/`balanced` (`low_zero = false`) and `balanced_low_0` (`low_zero = true`).
///
/// Every GPU but the last gets about an equal share of the model plus 1.25 decoder layers of
/// slack; the last keeps its full budget as a safety net. CPU and disk budgets pass through.
pub fn balanced_memory(
    shape: &ModelShape,
    dtype_bytes: u64,
    max_memory: &[(Device, u64)],
    low_zero: bool,
) -> Result<Vec<(Device, u64)>, PlacementError> {
    let tree = build_tree(shape)?;
    let sizes = sizes_of_tree(&tree, dtype_bytes)?;
    balanced_from_sizes(&tree, &sizes, max_memory, low_zero)
}

pub(super) fn balanced_from_sizes(
    tree: &ModelTree,
    sizes: &ModuleSizes,
    max_memory: &[(Device, u64)],
    low_zero: bool,
) -> Result<Vec<(Device, u64)>, PlacementError> {
    let mut mem = normalize_max_memory(max_memory)?;
    let mut gpus: Vec<u32> = mem
        .iter()
        .filter_map(|(d, m)| match d {
            Device::Index(i) if *m > 0 => Some(*i),
            _ => None,
        })
        .collect();
    gpus.sort_unstable();
    let num_devices = gpus.len() as u64;
    if num_devices == 0 {
        return Ok(mem);
    }
    // A single GPU cannot be kept light, so accelerate silently drops low_zero there.
    let low_zero = low_zero && num_devices > 1;
    let total = sizes.total();
    let mut per_gpu = total
        / if low_zero {
            num_devices - 1
        } else {
            num_devices
        };

    let mut no_split = HashSet::new();
    collect_no_split(&tree.root, "", &mut no_split);
    let layer_size = sizes
        .entries()
        .iter()
        .find(|(name, _)| !name.is_empty() && no_split.contains(name.as_str()))
        .map_or(0, |(_, s)| *s);
    let leaves = sizes.leaves();
    let leaf_sum = leaves
        .iter()
        .fold(0u64, |acc, (_, s)| acc.saturating_add(*s));
    // Python computes `int(sum / count)` and `int(1.25 * x)` in floating point; do the same so
    // the truncation lands on the identical byte.
    let mean_leaves = (leaf_sum as f64 / leaves.len().max(1) as f64) as u64;
    let slack = (1.25 * layer_size.max(mean_leaves) as f64) as u64;
    per_gpu = per_gpu
        .checked_add(slack)
        .ok_or_else(|| PlacementError::Overflow("per-GPU budget".into()))?;

    let gpu0 = budget(&mem, Device::Index(0));
    for &idx in &gpus[..gpus.len() - 1] {
        let cap = if low_zero && idx == 0 {
            gpu0.ok_or(PlacementError::MissingGpu { index: 0 })?
        } else {
            per_gpu
        };
        if let Some(m) = budget_mut(&mut mem, Device::Index(idx)) {
            *m = cap.min(*m);
        }
    }
    if low_zero {
        let mut others: u64 = 0;
        // accelerate sums GPUs 1..num_devices by index, which assumes contiguous numbering.
        for i in 1..num_devices {
            let index =
                u32::try_from(i).map_err(|_| PlacementError::Internal("too many GPUs".into()))?;
            let m =
                budget(&mem, Device::Index(index)).ok_or(PlacementError::MissingGpu { index })?;
            others = others.saturating_add(m);
        }
        let min_zero = total.saturating_sub(others);
        let zero = budget_mut(&mut mem, Device::Index(0))
            .ok_or(PlacementError::MissingGpu { index: 0 })?;
        *zero = min_zero.min(*zero);
    }
    Ok(mem)
}

pub(super) fn collect_no_split(node: &ModuleNode, name: &str, out: &mut HashSet<String>) {
    if node.is_no_split() {
        out.insert(name.to_string());
    }
    for child in &node.children {
        collect_no_split(child, &join_name(name, &child.name), out);
    }
}

/// Places the model the way `from_pretrained(device_map=strategy, max_memory=...)` does.
pub fn infer_device_map(
    shape: &ModelShape,
    dtype_bytes: u64,
    max_memory: &[(Device, u64)],
    strategy: Strategy,
) -> Result<DeviceMap, PlacementError> {
    let tree = build_tree(shape)?;
    let sizes = sizes_of_tree(&tree, dtype_bytes)?;
    let budgets = match strategy {
        Strategy::Sequential => normalize_max_memory(max_memory)?,
        Strategy::Auto | Strategy::Balanced => {
            balanced_from_sizes(&tree, &sizes, max_memory, false)?
        }
        Strategy::BalancedLow0 => balanced_from_sizes(&tree, &sizes, max_memory, true)?,
    };
    place(&tree, &sizes, &budgets)
}

/// accelerate's `infer_auto_device_map` with explicit budgets and no balancing step.
pub fn infer_auto_device_map(
    shape: &ModelShape,
    dtype_bytes: u64,
    max_memory: &[(Device, u64)],
) -> Result<DeviceMap, PlacementError> {
    let tree = build_tree(shape)?;
    let sizes = sizes_of_tree(&tree, dtype_bytes)?;
    place(&tree, &sizes, &normalize_max_memory(max_memory)?)
}

#[derive(Clone, Copy)]
enum Item<'a> {
    Module(&'a ModuleNode),
    Tensor,
}

#[derive(Clone)]
pub(super) struct Entry<'a> {
    name: String,
    item: Item<'a>,
}

impl<'a> Entry<'a> {
    fn module(&self) -> Option<&'a ModuleNode> {
        match self.item {
            Item::Module(m) => Some(m),
            Item::Tensor => None,
        }
    }

    fn named_children(&self) -> Vec<Entry<'a>> {
        self.module().map_or_else(Vec::new, |m| {
            m.children
                .iter()
                .map(|c| Entry {
                    name: join_name(&self.name, &c.name),
                    item: Item::Module(c),
                })
                .collect()
        })
    }

    /// Direct parameters followed by children: what accelerate substitutes when splitting.
    fn split(&self) -> Vec<Entry<'a>> {
        let Some(m) = self.module() else {
            return Vec::new();
        };
        m.params
            .iter()
            .map(|p| Entry {
                name: join_name(&self.name, p.name),
                item: Item::Tensor,
            })
            .chain(self.named_children())
            .collect()
    }

    fn indivisible(&self) -> bool {
        self.module()
            .is_none_or(|m| m.children.is_empty() || m.is_no_split())
    }
}

pub(super) fn size_of(sizes: &ModuleSizes, name: &str) -> i128 {
    i128::from(sizes.get(name))
}

/// accelerate's `get_max_layer_size`: the largest unit that can never be split.
pub(super) fn max_layer_size(items: &[Entry<'_>], sizes: &ModuleSizes) -> (i128, Vec<String>) {
    let mut queue: Vec<Entry<'_>> = items.iter().rev().cloned().collect();
    let mut max = 0i128;
    let mut names = Vec::new();
    while let Some(e) = queue.pop() {
        let children = e.named_children();
        if children.is_empty() || e.module().is_some_and(ModuleNode::is_no_split) {
            let s = size_of(sizes, &e.name);
            if s > max {
                max = s;
                names = vec![e.name];
            } else if s == max {
                names.push(e.name);
            }
        } else {
            queue.extend(children.into_iter().rev());
        }
    }
    (max, names)
}

pub(super) fn modules_only<'a>(items: &[Entry<'a>]) -> Vec<Entry<'a>> {
    items
        .iter()
        .filter(|e| e.module().is_some())
        .cloned()
        .collect()
}

pub(super) fn set_device(map: &mut Vec<(String, Device)>, name: &str, device: Device) {
    match map.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = device,
        None => map.push((name.to_string(), device)),
    }
}

/// Port of `infer_auto_device_map`'s greedy walk (without fallback allocation, which
/// transformers does not enable).
pub(super) fn place(
    tree: &ModelTree,
    sizes: &ModuleSizes,
    max_memory: &[(Device, u64)],
) -> Result<DeviceMap, PlacementError> {
    let mut devices: Vec<Device> = max_memory.iter().map(|(d, _)| *d).collect();
    if !devices.contains(&Device::Disk) {
        devices.push(Device::Disk);
    }
    let first_gpu = devices
        .iter()
        .copied()
        .find(|d| matches!(d, Device::Index(_)));
    // These devices keep room to page the largest offloaded layer back in.
    let main_devices: Vec<Device> = match first_gpu {
        Some(g) => vec![g, Device::Cpu],
        None => vec![Device::Cpu],
    };
    let tied_groups: Vec<Vec<String>> = tree
        .tied
        .iter()
        .map(|(a, b)| {
            let mut g = vec![a.clone(), b.clone()];
            g.sort();
            g
        })
        .collect();

    let root_entry = Entry {
        name: String::new(),
        item: Item::Module(&tree.root),
    };
    let mut todo: Vec<Entry<'_>> = root_entry.split();
    todo.extend(tree.root.buffers.iter().map(|b| Entry {
        name: b.name.to_string(),
        item: Item::Tensor,
    }));

    let mut map: Vec<(String, Device)> = Vec::new();
    let mut used: HashMap<Device, i128> = devices.iter().map(|d| (*d, 0)).collect();
    let mut current = 0usize;
    let (mut max_layer, mut max_layer_names) = max_layer_size(&todo, sizes);

    while !todo.is_empty() {
        let entry = todo.remove(0);
        let name = entry.name.clone();
        let dotted = format!("{name}.");
        max_layer_names.retain(|n| *n != name && !n.starts_with(&dotted));
        if max_layer_names.is_empty() {
            (max_layer, max_layer_names) = max_layer_size(&modules_only(&todo), sizes);
        }
        let module_size = size_of(sizes, &name);

        // Substring tests, not prefix tests, exactly as accelerate matches tied names.
        let inside = |k: &str| format!("{k}.").contains(&dotted);
        let tied_params: Vec<String> = tied_groups
            .iter()
            .filter(|g| g.iter().any(|k| inside(k)) && !g.iter().all(|k| inside(k)))
            .flat_map(|g| g.iter().filter(|k| !inside(k)).cloned())
            .collect();

        let device = *devices.get(current).ok_or_else(|| {
            PlacementError::Internal(format!("ran out of devices while placing {name:?}"))
        })?;
        let mut reserved = 0i128;
        let limit = if device == Device::Disk {
            None
        } else {
            let mut m = i128::from(budget(max_memory, device).unwrap_or(0));
            if main_devices.contains(&device) {
                m -= max_layer;
                reserved = max_layer;
            }
            Some(m)
        };

        let mut size_with_ties = module_size;
        let mut tied_entries: Vec<Entry<'_>> = Vec::new();
        for p in &tied_params {
            let holder = todo
                .iter()
                .find(|e| p.starts_with(&format!("{}.", e.name)))
                .ok_or_else(|| {
                    PlacementError::Internal(format!(
                        "tied parameter {p:?} of {name:?} has no pending module"
                    ))
                })?;
            size_with_ties += size_of(sizes, &holder.name) - size_of(sizes, p);
            tied_entries.push(holder.clone());
        }

        let dev_used = used.get(&device).copied().unwrap_or(0);
        let limit = match limit {
            Some(l) if dev_used + size_with_ties > l => l,
            _ => {
                *used.entry(device).or_insert(0) += size_with_ties;
                set_device(&mut map, &name, device);
                for t in &tied_entries {
                    if let Some(pos) = todo.iter().position(|e| e.name == t.name) {
                        todo.remove(pos);
                    }
                    set_device(&mut map, &t.name, device);
                }
                continue;
            }
        };

        if !tied_params.is_empty() && dev_used + module_size <= limit {
            // The module alone fits: try to make its tied partners smaller instead.
            let splittable = tied_entries.iter().find(|t| !t.indivisible());
            if let Some(t) = splittable {
                let pos = todo.iter().position(|e| e.name == t.name).ok_or_else(|| {
                    PlacementError::Internal(format!("tied module {:?} vanished", t.name))
                })?;
                let pieces = t.split();
                let mut next = vec![entry.clone()];
                next.extend(todo[..pos].iter().cloned());
                next.extend(pieces);
                next.extend(todo[pos + 1..].iter().cloned());
                todo = next;
                (max_layer, max_layer_names) = max_layer_size(&modules_only(&todo), sizes);
                continue;
            }
        }

        if dev_used + module_size >= limit && !entry.indivisible() {
            let mut next = entry.split();
            next.append(&mut todo);
            todo = next;
            (max_layer, max_layer_names) = max_layer_size(&modules_only(&todo), sizes);
            continue;
        }

        // Nothing fits here: close this device, keeping the reserve accounted as used.
        *used.entry(device).or_insert(0) += reserved;
        current += 1;
        todo.insert(0, entry);
    }

    clean_device_map(&mut map, "");
    Ok(DeviceMap(map))
}

/// accelerate's `clean_device_map`: a subtree whose keys all share one device collapses into a
/// single key, re-inserted at the end of the map.
pub(super) fn clean_device_map(map: &mut Vec<(String, Device)>, module_name: &str) {
    let prefix = if module_name.is_empty() {
        String::new()
    } else {
        format!("{module_name}.")
    };
    let values: Vec<Device> = map
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, d)| *d)
        .collect();
    if let Some(&first) = values.first() {
        if values.len() > 1 && values.iter().all(|d| *d == first) {
            map.retain(|(k, _)| !k.starts_with(&prefix));
            set_device(map, module_name, first);
        }
    }
    let depth = if module_name.is_empty() {
        1
    } else {
        module_name.split('.').count() + 1
    };
    // Python iterates a set here; the order only matters if two siblings collapse at once,
    // which cannot happen for these trees (at most one sibling per level has several keys).
    let mut children: Vec<String> = Vec::new();
    for (k, _) in map.iter() {
        if k.starts_with(&prefix) && k.len() > module_name.len() {
            let child = k.split('.').take(depth).collect::<Vec<_>>().join(".");
            if !children.contains(&child) {
                children.push(child);
            }
        }
    }
    for child in children {
        clean_device_map(map, &child);
    }
}

