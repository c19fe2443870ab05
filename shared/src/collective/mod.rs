//! Collectives of a tensor-parallel group: the ranks of one pipeline stage sum their partial
//! results after every row-parallel layer.
//!
//! - [`Collective`]: the one operation the model needs, an all-reduce (sum) whose result is
//!   bit-identical on every rank.
//! - [`tcp`]: the group's links over TCP — the leader (rank 0) drives its followers with
//!   control messages and reduces their tensors; it is also the all-reduce for CPU workers.
//! - `nccl` (feature `cuda`): the all-reduce on GPUs, over NCCL through cudarc.

use candle_core::Tensor;

pub mod tcp;

#[cfg(feature = "cuda")]
pub mod nccl;

/// An all-reduce over the ranks of one tensor-parallel group.
pub trait Collective: Send + Sync {
    /// This rank, 0-based.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// "tcp" or "nccl".
    fn kind(&self) -> &'static str;
    /// The element-wise sum of `t` over every rank; every rank gets the same values. Fails
    /// (instead of hanging) when a rank is gone or the group's timeout passes; after a failure
    /// the group is broken for good.
    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor>;
}

/// Which slice of the model a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    pub rank: usize,
    pub size: usize,
}

impl Default for TpRank {
    fn default() -> Self {
        TpRank { rank: 0, size: 1 }
    }
}

impl TpRank {
    /// Whether this rank is the group's leader (the one the pipeline talks to).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }
}

/// The heads and MLP columns one rank of a tensor-parallel group holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpSplit {
    /// Query heads, by global index.
    pub heads: std::ops::Range<usize>,
    /// Key/value heads, by global index (one, shared with other ranks, when the model has
    /// fewer key/value heads than the group has ranks).
    pub kv_heads: std::ops::Range<usize>,
    /// Columns of the MLP's inner projection.
    pub intermediate: std::ops::Range<usize>,
}

/// How `size` ranks split a model with `heads` query heads, `kv_heads` key/value heads and an
/// MLP `intermediate` wide; the error says which count does not divide.
pub fn tp_split(heads: usize, kv_heads: usize, intermediate: usize, tp: TpRank) -> Result<TpSplit, String> {
    let n = tp.size;
    if n == 0 || tp.rank >= n {
        return Err(format!("rank {} of a tensor-parallel group of {n} does not exist", tp.rank));
    }
    if !heads.is_multiple_of(n) {
        return Err(format!("--tp {n} does not divide num_attention_heads ({heads})"));
    }
    if !intermediate.is_multiple_of(n) {
        return Err(format!("--tp {n} does not divide intermediate_size ({intermediate})"));
    }
    let kv = if kv_heads.is_multiple_of(n) {
        let per = kv_heads / n;
        tp.rank * per..(tp.rank + 1) * per
    } else if n.is_multiple_of(kv_heads) {
        // Fewer key/value heads than ranks: each is replicated on n / kv_heads ranks.
        let k = tp.rank / (n / kv_heads);
        k..k + 1
    } else {
        return Err(format!("--tp {n} and num_key_value_heads ({kv_heads}) do not divide one another"));
    };
    let (h, i) = (heads / n, intermediate / n);
    Ok(TpSplit { heads: tp.rank * h..(tp.rank + 1) * h, kv_heads: kv, intermediate: tp.rank * i..(tp.rank + 1) * i })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_heads_and_columns_evenly() {
        let s = tp_split(16, 8, 3072, TpRank { rank: 1, size: 2 }).unwrap();
        assert_eq!(s, TpSplit { heads: 8..16, kv_heads: 4..8, intermediate: 1536..3072 });
    }

    #[test]
    fn replicates_kv_heads_when_there_are_fewer_than_ranks() {
        let ranks: Vec<_> = (0..4).map(|r| tp_split(8, 2, 64, TpRank { rank: r, size: 4 }).unwrap().kv_heads).collect();
        assert_eq!(ranks, vec![0..1, 0..1, 1..2, 1..2]);
        // Every rank's query heads belong to the kv head it holds (groups of 4 query heads).
        for r in 0..4 {
            let s = tp_split(8, 2, 64, TpRank { rank: r, size: 4 }).unwrap();
            assert_eq!(s.heads.start / 4, s.kv_heads.start);
        }
    }

    #[test]
    fn counts_that_do_not_divide_are_named() {
        assert!(tp_split(6, 2, 64, TpRank { rank: 0, size: 4 }).unwrap_err().contains("num_attention_heads (6)"));
        assert!(tp_split(8, 8, 66, TpRank { rank: 0, size: 4 }).unwrap_err().contains("intermediate_size (66)"));
        assert!(tp_split(12, 3, 64, TpRank { rank: 0, size: 4 }).unwrap_err().contains("num_key_value_heads (3)"));
    }
}
