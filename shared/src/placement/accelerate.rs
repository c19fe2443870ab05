//! accelerate's planning, ported: balanced per-device budgets (`get_balanced_memory`), the
//! greedy placement (`infer_auto_device_map`) and the final clean-up (`clean_device_map`).

use super::sizes::*;
use super::*;
use std::collections::{HashMap, HashSet};

/// Validates budgets and orders them as accelerate's `get_max_memory` does: GPUs by index,
/// then CPU, then disk.
pub(super) fn normalize_max_memory(max_memory: &[(Device, u64)]) -> Result<Vec<(Device, u64)>, PlacementError> {
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
    let mut per_gpu = total / if low_zero { num_devices - 1 } else { num_devices };

    let mut no_split = HashSet::new();
    collect_no_split(&tree.root, "", &mut no_split);
    let layer_size = sizes.entries().iter().find(|(name, _)| !name.is_empty() && no_split.contains(name.as_str())).map_or(0, |(_, s)| *s);
    let leaves = sizes.leaves();
    let leaf_sum = leaves.iter().fold(0u64, |acc, (_, s)| acc.saturating_add(*s));
    // Python computes `int(sum / count)` and `int(1.25 * x)` in floating point; do the same so
    // the truncation lands on the identical byte.
    let mean_leaves = (leaf_sum as f64 / leaves.len().max(1) as f64) as u64;
    let slack = (1.25 * layer_size.max(mean_leaves) as f64) as u64;
    per_gpu = per_gpu.checked_add(slack).ok_or_else(|| PlacementError::Overflow("per-GPU budget".into()))?;

    let gpu0 = budget(&mem, Device::Index(0));
    for &idx in &gpus[..gpus.len() - 1] {
        let cap = if low_zero && idx == 0 { gpu0.ok_or(PlacementError::MissingGpu { index: 0 })? } else { per_gpu };
        if let Some(m) = budget_mut(&mut mem, Device::Index(idx)) {
            *m = cap.min(*m);
        }
    }
    if low_zero {
        let mut others: u64 = 0;
        // accelerate sums GPUs 1..num_devices by index, which assumes contiguous numbering.
        for i in 1..num_devices {
            let index = u32::try_from(i).map_err(|_| PlacementError::Internal("too many GPUs".into()))?;
            let m = budget(&mem, Device::Index(index)).ok_or(PlacementError::MissingGpu { index })?;
            others = others.saturating_add(m);
        }
        let min_zero = total.saturating_sub(others);
        let zero = budget_mut(&mut mem, Device::Index(0)).ok_or(PlacementError::MissingGpu { index: 0 })?;
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
        Strategy::Auto | Strategy::Balanced => balanced_from_sizes(&tree, &sizes, max_memory, false)?,
        Strategy::BalancedLow0 => balanced_from_sizes(&tree, &sizes, max_memory, true)?,
    };
    place(&tree, &sizes, &budgets)
}

/// accelerate's `infer_auto_device_map` with explicit budgets and no balancing step.
pub fn infer_auto_device_map(shape: &ModelShape, dtype_bytes: u64, max_memory: &[(Device, u64)]) -> Result<DeviceMap, PlacementError> {
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
            m.children.iter().map(|c| Entry { name: join_name(&self.name, &c.name), item: Item::Module(c) }).collect()
        })
    }

    /// Direct parameters followed by children: what accelerate substitutes when splitting.
    fn split(&self) -> Vec<Entry<'a>> {
        let Some(m) = self.module() else {
            return Vec::new();
        };
        m.params.iter().map(|p| Entry { name: join_name(&self.name, p.name), item: Item::Tensor }).chain(self.named_children()).collect()
    }

    fn indivisible(&self) -> bool {
        self.module().is_none_or(|m| m.children.is_empty() || m.is_no_split())
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
    items.iter().filter(|e| e.module().is_some()).cloned().collect()
}

pub(super) fn set_device(map: &mut Vec<(String, Device)>, name: &str, device: Device) {
    match map.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = device,
        None => map.push((name.to_string(), device)),
    }
}

/// Port of `infer_auto_device_map`'s greedy walk (without fallback allocation, which
/// transformers does not enable).
pub(super) fn place(tree: &ModelTree, sizes: &ModuleSizes, max_memory: &[(Device, u64)]) -> Result<DeviceMap, PlacementError> {
    let mut devices: Vec<Device> = max_memory.iter().map(|(d, _)| *d).collect();
    if !devices.contains(&Device::Disk) {
        devices.push(Device::Disk);
    }
    let first_gpu = devices.iter().copied().find(|d| matches!(d, Device::Index(_)));
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

    let root_entry = Entry { name: String::new(), item: Item::Module(&tree.root) };
    let mut todo: Vec<Entry<'_>> = root_entry.split();
    todo.extend(tree.root.buffers.iter().map(|b| Entry { name: b.name.to_string(), item: Item::Tensor }));

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

        let device = *devices.get(current).ok_or_else(|| PlacementError::Internal(format!("ran out of devices while placing {name:?}")))?;
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
                .ok_or_else(|| PlacementError::Internal(format!("tied parameter {p:?} of {name:?} has no pending module")))?;
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
                let pos = todo
                    .iter()
                    .position(|e| e.name == t.name)
                    .ok_or_else(|| PlacementError::Internal(format!("tied module {:?} vanished", t.name)))?;
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
    let prefix = if module_name.is_empty() { String::new() } else { format!("{module_name}.") };
    let values: Vec<Device> = map.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, d)| *d).collect();
    if let Some(&first) = values.first() {
        if values.len() > 1 && values.iter().all(|d| *d == first) {
            map.retain(|(k, _)| !k.starts_with(&prefix));
            set_device(map, module_name, first);
        }
    }
    let depth = if module_name.is_empty() { 1 } else { module_name.split('.').count() + 1 };
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
