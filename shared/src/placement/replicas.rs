//! Replicas: which workers serve which copy of a model. A replica is `stages × tp` workers,
//! listed in rank order (stage by stage, each stage's `tp` ranks together); a stage's
//! tensor-parallel group lies within one node (NVLink and PCIe there, not the network), while
//! stages may span nodes; replicas spread over nodes, so that losing one node costs as few
//! replicas as it can. Workers in no replica wait as spares.
//!
//! The layout is kept stable as the fleet changes: a replica keeps the workers it has while they
//! are alive, takes spares in place of the ones it lost, and new replicas form from spares only.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A worker as the layout sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub id: String,
    /// The machine it runs on; workers that do not say (older ones) count as one node each.
    pub node: String,
}

/// How many replicas are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Exactly this many, as soon as the fleet holds them.
    Count(usize),
    /// As many as the fleet holds.
    Auto,
}

/// Workers of each replica, in rank order, and the spares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub replicas: Vec<Vec<String>>,
    pub spares: Vec<String>,
}

/// What one replica is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Pipeline stages of a replica.
    pub stages: usize,
    /// Tensor-parallel ranks of each stage.
    pub tp: usize,
}

impl Shape {
    /// Workers a replica takes.
    pub fn workers(&self) -> usize {
        self.stages.max(1) * self.tp.max(1)
    }
}

/// The node of a worker: its own, or (when it names none) one of its own.
fn node_of(s: &Slot) -> String {
    if s.node.is_empty() {
        format!("\u{0}{}", s.id)
    } else {
        s.node.clone()
    }
}

/// Lays out replicas of `shape` over `fleet` (the workers alive and not cordoned), keeping
/// `current` (the replicas as they were, by index) where it can: a replica keeps its alive
/// workers and takes spares in place of lost ones (a tensor-parallel rank from the stage's
/// node), and is dropped, its workers becoming spares, when no spare can complete it. New
/// replicas form from spares up to `wanted`; with `Wanted::Count(n)`, replicas past `n` are
/// dropped, the last first. Replicas keep their index: a dropped one leaves an empty list, so
/// each engine keeps its replica number (trailing empty ones are trimmed).
pub fn layout(fleet: &[Slot], current: &[Vec<String>], shape: Shape, wanted: Wanted) -> Layout {
    let tp = shape.tp.max(1);
    let per = shape.workers();
    let node: HashMap<&str, String> = fleet.iter().map(|s| (s.id.as_str(), node_of(s))).collect();
    let mut free: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in fleet {
        free.entry(node_of(s)).or_default().insert(s.id.clone());
    }
    let take = |free: &mut BTreeMap<String, BTreeSet<String>>, id: &str| {
        if let Some(n) = node.get(id) {
            free.get_mut(n).map(|set| set.remove(id));
        }
    };
    let limit = match wanted {
        Wanted::Count(n) => n,
        Wanted::Auto => usize::MAX,
    };
    let mut replicas: Vec<Vec<String>> = Vec::new();
    // Existing replicas first, in order, keeping what is alive.
    for old in current {
        let formed = replicas.iter().filter(|r| !r.is_empty()).count();
        if formed >= limit || old.is_empty() {
            replicas.push(Vec::new());
            continue;
        }
        // A replica that shrank (it lost workers when no spare was left) has gaps at its end.
        let mut kept: Vec<Option<String>> = old.iter().map(|id| node.contains_key(id.as_str()).then(|| id.clone())).collect();
        kept.resize(per, None);
        for id in kept.iter().flatten() {
            take(&mut free, id);
        }
        replicas.push(old.clone());
        let mut whole = true;
        for stage in 0..shape.stages.max(1) {
            let ranks = &mut kept[stage * tp..(stage + 1) * tp];
            // A lost rank is replaced from the stage's node (where its other ranks are), a
            // whole lost stage from the node with the most free workers that can hold it.
            let home = ranks.iter().flatten().next().and_then(|id| node.get(id.as_str()).cloned());
            let missing = ranks.iter().filter(|r| r.is_none()).count();
            if missing == 0 {
                continue;
            }
            let source = match home {
                Some(h) => free.get(&h).filter(|s| s.len() >= missing).map(|_| h),
                None => free.iter().filter(|(_, s)| s.len() >= tp).max_by_key(|(_, s)| s.len()).map(|(n, _)| n.clone()),
            };
            let Some(source) = source else {
                whole = false;
                break;
            };
            let set = free.get_mut(&source).expect("a node with free workers");
            for r in ranks.iter_mut().filter(|r| r.is_none()) {
                let id = set.pop_first().expect("counted");
                *r = Some(id);
            }
        }
        let r = replicas.len() - 1;
        if whole {
            replicas[r] = kept.into_iter().map(|id| id.expect("every rank filled")).collect();
        } else {
            // No spare completes it: it keeps the workers it has (its engine re-plans over
            // them when the model fits, and waits otherwise), and spares complete it later.
            // Spares taken for its other stages go back.
            for id in kept.iter().flatten().filter(|id| !old.contains(id)) {
                if let Some(n) = node.get(id.as_str()) {
                    free.entry(n.clone()).or_default().insert(id.clone());
                }
            }
            replicas[r] = old.iter().filter(|id| node.contains_key(id.as_str())).cloned().collect();
        }
    }
    // New replicas from the spares, each on as few nodes as it can, spread over the nodes that
    // host the fewest replicas.
    loop {
        let formed = replicas.iter().filter(|r| !r.is_empty()).count();
        if formed >= limit {
            break;
        }
        let groups: usize = free.values().map(|s| s.len() / tp).sum();
        if groups < shape.stages.max(1) {
            break;
        }
        let mut hosted: HashMap<String, usize> = HashMap::new();
        for id in replicas.iter().flatten() {
            if let Some(n) = node.get(id.as_str()) {
                *hosted.entry(n.clone()).or_default() += 1;
            }
        }
        let mut workers = Vec::with_capacity(per);
        let mut stages_left = shape.stages.max(1);
        let mut used_nodes: Vec<String> = Vec::new();
        while stages_left > 0 {
            // Prefer a node that can hold every stage left; then the node hosting the fewest
            // replicas; then the one with the most free groups; then by name.
            let pick = free
                .iter()
                .filter(|(_, s)| s.len() >= tp)
                .filter(|(n, _)| !used_nodes.contains(n))
                .min_by_key(|(n, s)| {
                    let groups = s.len() / tp;
                    (groups < stages_left, hosted.get(*n).copied().unwrap_or(0), std::cmp::Reverse(groups), (*n).clone())
                })
                .map(|(n, _)| n.clone())
                .expect("enough free groups were counted");
            let set = free.get_mut(&pick).expect("picked");
            let n = (set.len() / tp).min(stages_left);
            for _ in 0..n * tp {
                workers.push(set.pop_first().expect("counted"));
            }
            stages_left -= n;
            used_nodes.push(pick);
        }
        match replicas.iter().position(|r| r.is_empty()) {
            Some(i) => replicas[i] = workers,
            None => replicas.push(workers),
        }
    }
    while replicas.last().is_some_and(|r| r.is_empty()) {
        replicas.pop();
    }
    let mut spares: Vec<String> = free.into_values().flatten().collect();
    spares.sort();
    Layout { replicas, spares }
}

/// The fewest workers of `budgets` (bytes each may hold for weights, largest first as
/// accelerate fills them) whose sum holds `bytes` of weights, in whole tensor-parallel groups:
/// how many workers a replica takes when `--replicas auto` asks for as many as fit. `None` when
/// even all of them cannot.
pub fn fewest_workers(bytes: u64, budgets: &[u64], tp: usize) -> Option<usize> {
    let tp = tp.max(1);
    let mut sorted = budgets.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut held = 0u64;
    for (i, b) in sorted.iter().enumerate() {
        held = held.saturating_add(*b);
        let n = i + 1;
        if n % tp == 0 && held >= bytes {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(nodes: &[(&str, usize)]) -> Vec<Slot> {
        let mut out = Vec::new();
        for (n, count) in nodes {
            for i in 0..*count {
                out.push(Slot { id: format!("{n}-w{i}"), node: n.to_string() });
            }
        }
        out
    }

    fn node(id: &str) -> &str {
        id.split('-').next().unwrap()
    }

    #[test]
    fn tp_4_replicas_2_on_two_nodes_of_4_gives_each_replica_one_node() {
        let f = fleet(&[("a", 4), ("b", 4)]);
        let l = layout(&f, &[], Shape { stages: 1, tp: 4 }, Wanted::Count(2));
        assert_eq!(l.replicas.len(), 2);
        assert!(l.spares.is_empty());
        let nodes: Vec<BTreeSet<&str>> = l.replicas.iter().map(|r| r.iter().map(|id| node(id)).collect()).collect();
        assert_eq!(nodes[0].len(), 1, "{l:?}");
        assert_eq!(nodes[1].len(), 1, "{l:?}");
        assert_ne!(nodes[0], nodes[1], "{l:?}");
    }

    #[test]
    fn a_tensor_parallel_group_never_spans_nodes() {
        // 3 workers on each of 2 nodes, tp 2, 2 stages: one replica (a group per node), the
        // odd worker of each node a spare.
        let f = fleet(&[("a", 3), ("b", 3)]);
        let l = layout(&f, &[], Shape { stages: 2, tp: 2 }, Wanted::Auto);
        assert_eq!(l.replicas.len(), 1, "{l:?}");
        let r = &l.replicas[0];
        assert_eq!(node(&r[0]), node(&r[1]));
        assert_eq!(node(&r[2]), node(&r[3]));
        assert_eq!(l.spares.len(), 2);
    }

    #[test]
    fn replicas_spread_over_nodes() {
        // 4 single-worker replicas on 2 nodes of 2: two per node, alternating.
        let f = fleet(&[("a", 2), ("b", 2)]);
        let l = layout(&f, &[], Shape { stages: 1, tp: 1 }, Wanted::Auto);
        assert_eq!(l.replicas.len(), 4);
        let on_a = l.replicas.iter().filter(|r| node(&r[0]) == "a").count();
        assert_eq!(on_a, 2);
        // Two 2-stage replicas on 2 nodes of 2: each on one node, so a node lost costs one.
        let l = layout(&f, &[], Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        for r in &l.replicas {
            assert_eq!(node(&r[0]), node(&r[1]), "{l:?}");
        }
    }

    #[test]
    fn workers_with_no_node_count_as_one_node_each() {
        let f: Vec<Slot> = (0..4).map(|i| Slot { id: format!("w{i}"), node: String::new() }).collect();
        let l = layout(&f, &[], Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        assert_eq!(l.replicas, vec![vec!["w0".to_string(), "w1".into()], vec!["w2".into(), "w3".into()]]);
        // tp 2 cannot be formed within a node of one worker.
        let l = layout(&f, &[], Shape { stages: 1, tp: 2 }, Wanted::Auto);
        assert!(l.replicas.is_empty());
        assert_eq!(l.spares.len(), 4);
    }

    #[test]
    fn the_layout_is_stable_and_heals_from_spares() {
        let f = fleet(&[("a", 5)]);
        let first = layout(&f, &[], Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        assert_eq!(first.spares.len(), 1);
        // The same fleet again: nothing moves.
        assert_eq!(layout(&f, &first.replicas, Shape { stages: 2, tp: 1 }, Wanted::Count(2)), first);
        // A worker of replica 1 is lost: the spare takes its place; replica 0 is untouched.
        let lost = first.replicas[1][0].clone();
        let rest: Vec<Slot> = f.iter().filter(|s| s.id != lost).cloned().collect();
        let healed = layout(&rest, &first.replicas, Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        assert_eq!(healed.replicas[0], first.replicas[0]);
        assert_eq!(healed.replicas[1][1], first.replicas[1][1]);
        assert_eq!(healed.replicas[1][0], first.spares[0]);
        assert!(healed.spares.is_empty());
        // Another loss with no spare left: replica 1 keeps its survivor (its engine re-plans
        // over it); replica 0 is untouched.
        let lost2 = healed.replicas[1][1].clone();
        let rest2: Vec<Slot> = rest.iter().filter(|s| s.id != lost2).cloned().collect();
        let shrunk = layout(&rest2, &healed.replicas, Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        assert_eq!(shrunk.replicas, vec![first.replicas[0].clone(), vec![healed.replicas[1][0].clone()]]);
        assert!(shrunk.spares.is_empty());
        // A worker joins: the shrunk replica is whole again, the joiner in the lost one's place.
        let mut back = rest2.clone();
        back.push(Slot { id: "a-w9".into(), node: "a".into() });
        let whole = layout(&back, &shrunk.replicas, Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        assert_eq!(whole.replicas[1], vec![healed.replicas[1][0].clone(), "a-w9".to_string()]);
        // Every worker of a replica gone: it is dropped, and re-formed from spares.
        let none: Vec<Slot> = f.iter().filter(|s| !first.replicas[1].contains(&s.id)).cloned().collect();
        let dropped = layout(&none, &first.replicas, Shape { stages: 2, tp: 1 }, Wanted::Count(2));
        assert_eq!(dropped.replicas, vec![first.replicas[0].clone()]);
        assert_eq!(dropped.spares, first.spares);
    }

    #[test]
    fn scaling_adds_and_removes_whole_replicas() {
        let shape = Shape { stages: 2, tp: 1 };
        let two = layout(&fleet(&[("a", 4)]), &[], shape, Wanted::Auto);
        assert_eq!(two.replicas.len(), 2);
        // Six workers: a third replica; the first two keep theirs.
        let three = layout(&fleet(&[("a", 6)]), &two.replicas, shape, Wanted::Auto);
        assert_eq!(three.replicas.len(), 3);
        assert_eq!(&three.replicas[..2], &two.replicas[..]);
        // Five: the fifth waits as a spare.
        let five = layout(&fleet(&[("a", 5)]), &two.replicas, shape, Wanted::Auto);
        assert_eq!((five.replicas.len(), five.spares.len()), (2, 1));
        // Asked for one: the last goes, its workers spares.
        let one = layout(&fleet(&[("a", 6)]), &three.replicas, shape, Wanted::Count(1));
        assert_eq!(one.replicas, vec![two.replicas[0].clone()]);
        assert_eq!(one.spares.len(), 4);
        // A dropped replica in the middle keeps the others' indices.
        let mut holes = three.replicas.clone();
        holes[1].clear();
        let l = layout(&fleet(&[("a", 6)]), &holes, shape, Wanted::Count(2));
        assert_eq!(l.replicas[0], three.replicas[0]);
        assert!(l.replicas[1].is_empty());
        assert_eq!(l.replicas[2], three.replicas[2]);
    }

    #[test]
    fn fewest_workers_fills_the_largest_first_in_whole_groups() {
        assert_eq!(fewest_workers(10, &[4, 8, 2], 1), Some(2));
        assert_eq!(fewest_workers(10, &[4, 8, 2], 2), Some(2));
        assert_eq!(fewest_workers(13, &[4, 8, 2], 1), Some(3));
        assert_eq!(fewest_workers(13, &[4, 8, 2], 2), None);
        assert_eq!(fewest_workers(15, &[4, 8, 2], 1), None);
        assert_eq!(fewest_workers(0, &[1], 1), Some(1));
    }
}
