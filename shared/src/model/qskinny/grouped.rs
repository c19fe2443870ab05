//! The layout of the AVX-512 VNNI kernels (`avx512.rs`): weights repacked at load so that
//! each 32-bit lane of a register belongs to one block, and the step's rows alike.
//!
//! A group is 16 blocks of 32 weights (Q8_0) or 16 sub-blocks of 32 (two Q4_K super-blocks),
//! 512 weights in all. Its weights are stored as 8 registers' worth, register `j`'s lane `i`
//! holding weights `4j..4j+4` of block `i`; the step's rows are laid out alike
//! ([`group_rows`]). Eight `vpdpbusd` then leave each block's whole integer dot product in its
//! own lane, and the group is scaled into f32 with one conversion and one multiply-add a row,
//! where a layout of whole blocks in a register needs a reduction or a conversion per pair of
//! blocks. Blocks past the end of a row are padded with zeros (weights, scales and inputs), so
//! a row of any whole number of blocks works.

use super::{Blocks, Lines};

/// Weights in a group.
pub(super) const GROUP: usize = 512;

/// Groups in a row of `inp` weights.
pub(super) fn groups(inp: usize) -> usize {
    inp.div_ceil(GROUP)
}

/// Bytes of a Q8_0 group's scales (16 f16s), after the row's values.
pub(super) const Q8_0_SCALES: usize = 32;

/// Where a Q4_K group's scales (after the row's values) hold what: the 16 sub-blocks' 6-bit
/// scales a byte each from 0, their minimums from [`MINS`](q4k::MINS), the two
/// super-blocks' f16 `d` from [`D`](q4k::D) and f16 `dmin` from [`DMIN`](q4k::DMIN).
pub(super) mod q4k {
    pub(in crate::model::qskinny) const MINS: usize = 16;
    pub(in crate::model::qskinny) const D: usize = 32;
    pub(in crate::model::qskinny) const DMIN: usize = 36;
    /// Bytes of a group's scales.
    pub(in crate::model::qskinny) const BYTES: usize = 40;
}

/// Bytes of a packed row: each group's weights, then each group's scales.
pub(super) fn row_bytes(blocks: Blocks, inp: usize) -> usize {
    match blocks {
        // A byte a weight and 16 f16 scales a group, the row padded to whole 64-byte lines
        // (as ggml's, 34 bytes a block, unless the row has an odd number of groups).
        Blocks::Q8_0 => (groups(inp) * (GROUP + Q8_0_SCALES)).next_multiple_of(64),
        // 4-bit values two a byte; 16 6-bit scales and 16 minimums a byte each, and each
        // super-block's f16 scale and minimum (296 bytes for ggml's 288).
        Blocks::Q4K => groups(inp) * (GROUP / 2 + q4k::BYTES),
    }
}

/// ggml's blocks of one row (`inp` weights) packed into groups in `row` ([`row_bytes`]
/// long). Q8_0 weights are stored plus 128 (the instruction multiplies unsigned bytes into
/// signed ones; the step's sums take the 128s off), Q4_K's values as they are (unsigned
/// already); blocks past the row's end are zero.
pub(super) fn pack_row(blocks: Blocks, inp: usize, ggml: &[u8], row: &mut [u8]) {
    assert_eq!(row.len(), row_bytes(blocks, inp));
    row.fill(0);
    let gs = groups(inp);
    match blocks {
        Blocks::Q8_0 => {
            let (values, scales) = row.split_at_mut(gs * GROUP);
            values.fill(128);
            for (b, blk) in ggml.chunks_exact(34).enumerate() {
                let (g, i) = (b / 16, b % 16);
                scales[g * Q8_0_SCALES + 2 * i..][..2].copy_from_slice(&blk[..2]);
                for (k, &q) in blk[2..].iter().enumerate() {
                    values[g * GROUP + (k / 4) * 64 + i * 4 + k % 4] = q ^ 0x80;
                }
            }
        }
        Blocks::Q4K => {
            let (values, scales) = row.split_at_mut(gs * GROUP / 2);
            for (s, blk) in ggml.chunks_exact(144).enumerate() {
                let (g, half) = (s / 2, s % 2);
                let meta = &mut scales[g * q4k::BYTES..][..q4k::BYTES];
                meta[q4k::D + 2 * half..][..2].copy_from_slice(&blk[..2]);
                meta[q4k::DMIN + 2 * half..][..2].copy_from_slice(&blk[2..4]);
                let q = &blk[4..16];
                for j in 0..8 {
                    // ggml's get_scale_min_k4.
                    let (sc, m) = if j < 4 {
                        (q[j] & 63, q[j + 4] & 63)
                    } else {
                        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
                    };
                    meta[8 * half + j] = sc;
                    meta[q4k::MINS + 8 * half + j] = m;
                }
                let qs = &blk[16..];
                for sub in 0..8 {
                    let i = 8 * half + sub;
                    // Value k of the sub-block: the low nibbles of 32 bytes hold an even
                    // sub-block, their high nibbles the next.
                    let value = |k: usize| (qs[32 * (sub / 2) + k] >> (4 * (sub % 2))) & 0xF;
                    for m in 0..4 {
                        for p in 0..4 {
                            values[g * 256 + m * 64 + i * 4 + p] = value(8 * m + p) | (value(8 * m + 4 + p) << 4);
                        }
                    }
                }
            }
        }
    }
}

/// The step's rows in the groups' layout: register `j` of a group holds values `4j..4j+4` of
/// each of its 16 blocks, the blocks past a row's end zero. (On x86-64 `rows.rs` quantizes
/// straight into it.)
#[cfg(any(test, not(target_arch = "x86_64")))]
pub(super) fn group_rows(blocks: Blocks, inp: usize, q: &[i8], d: &[f32]) -> Grouped {
    let (rows, gs) = (q.len() / inp, groups(inp));
    let mut values = Lines::zeroed(rows * gs * GROUP);
    let mut scale = Lines::zeroed(rows * gs * 16);
    let mut sum = vec![0i32; rows * gs * 16];
    for r in 0..rows {
        for (b, block) in q[r * inp..(r + 1) * inp].chunks_exact(32).enumerate() {
            let (g, i) = (r * gs + b / 16, b % 16);
            let group = &mut values[g * GROUP..][..GROUP];
            for (j, four) in block.chunks_exact(4).enumerate() {
                group[j * 64 + i * 4..][..4].copy_from_slice(four);
            }
            scale[g * 16 + i] = match blocks {
                Blocks::Q8_0 => d[r * inp / 32 + b],
                Blocks::Q4K => d[r * inp / 256 + b / 8],
            };
            sum[g * 16 + i] = block.iter().map(|&v| i32::from(v)).sum();
        }
    }
    Grouped::of_blocks(blocks, values, scale, &sum)
}

/// The step's rows in the groups' layout, each array on lines of its own (a group's 16
/// lanes are one line).
pub(super) struct Grouped {
    /// The rows' bytes, a group's 16 blocks interleaved four bytes at a time.
    pub(super) values: Lines<i8>,
    /// Each block's scale (Q4_K: its super-block's), 16 a group.
    pub(super) scale: Lines<f32>,
    /// Q8_0: each block's sum times −128, where its dot product with weights stored plus 128 starts.
    pub(super) start: Lines<i32>,
    /// Q4_K: each sub-block's sum, for the weights' minimums.
    pub(super) sum: Lines<f32>,
}

impl Grouped {
    /// The rows laid out in `values`, with each block's scale and the sum of its values, 16
    /// a group: what each kernel starts a block from.
    pub(super) fn of_blocks(blocks: Blocks, values: Lines<i8>, scale: Lines<f32>, sum: &[i32]) -> Grouped {
        match blocks {
            Blocks::Q8_0 => Grouped { values, scale, start: Lines::mapped(sum, |s| -128 * s), sum: Lines::zeroed(0) },
            Blocks::Q4K => Grouped { values, scale, start: Lines::zeroed(0), sum: Lines::mapped(sum, |s| s as f32) },
        }
    }
}

/// Where a group of the step's rows starts in [`Grouped`]' arrays: the `g`th row's.
#[derive(Clone, Copy)]
pub(super) struct Step {
    pub(super) values: *const i8,
    pub(super) scale: *const f32,
    pub(super) sum: *const f32,
    pub(super) start: *const i32,
    pub(super) groups: usize,
}

impl Step {
    /// The step's rows from `g`, for weights in `blocks`.
    pub(super) fn of(x: &Grouped, blocks: Blocks, inp: usize, g: usize) -> Step {
        let gs = groups(inp);
        let at = |v: usize| g * gs * v;
        Step {
            values: x.values[at(GROUP)..].as_ptr(),
            scale: x.scale[at(16)..].as_ptr(),
            sum: if blocks == Blocks::Q4K { x.sum[at(16)..].as_ptr() } else { std::ptr::null() },
            start: if blocks == Blocks::Q8_0 { x.start[at(16)..].as_ptr() } else { std::ptr::null() },
            groups: gs,
        }
    }
}

/// How many weight rows ahead of the one it multiplies a kernel asks for the cache lines of
/// the group it is on: the weights come from memory once a step, and the products of a step
/// of 8 rows take long enough that without it the core waits for each line in turn (reads
/// and products took about as long as each alone, added).
pub(super) const AHEAD: usize = 4;

/// Asks for the line at `p` (a weight row `AHEAD` ahead, which may be past the task's last).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) unsafe fn fetch(p: *const u8) {
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
}

/// How many weight rows ahead the AVX-512 Q8_0 kernel also asks for its lines into L2 only
/// ([`fetch_far`]): reads into L1 are few at a time (its line fill buffers), so a deeper
/// stream of requests through L2 keeps more of the weights' lines on their way at once. On a
/// 2-core Intel Xeon with AMX, Q8_0 at concurrency 8 decoded at 1.97×–2.12× of f32 (median
/// 2.09×) over eight runs with it and 1.89×–2.00× (median 1.98×) over five without; Q4_K's
/// kernel, which waits on its arithmetic there, gained nothing (README, GGUF files).
pub(super) const FAR: usize = 32;

/// Asks for the line at `p` (a weight row `FAR` ahead, which may be past the task's last) into
/// L2, not L1.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) unsafe fn fetch_far(p: *const u8) {
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T2 }>(p.cast());
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Weight `k` of a packed row, as f32: read back through the layout alone.
    fn unpacked(blocks: Blocks, inp: usize, row: &[u8], k: usize) -> f32 {
        let gs = groups(inp);
        let (g, i, at) = (k / GROUP, (k % GROUP) / 32, k % 32);
        let f16 = |p: &[u8]| half::f16::from_le_bytes([p[0], p[1]]).to_f32();
        match blocks {
            Blocks::Q8_0 => {
                let q = (row[g * GROUP + (at / 4) * 64 + i * 4 + at % 4] ^ 0x80) as i8;
                f16(&row[gs * GROUP + g * Q8_0_SCALES + 2 * i..]) * f32::from(q)
            }
            Blocks::Q4K => {
                let byte = row[g * 256 + (at / 8) * 64 + i * 4 + at % 4];
                let q = if at % 8 < 4 { byte & 0xF } else { byte >> 4 };
                let meta = &row[gs * 256 + g * q4k::BYTES..];
                let (d, dmin) = (f16(&meta[q4k::D + 2 * (i / 8)..]), f16(&meta[q4k::DMIN + 2 * (i / 8)..]));
                d * f32::from(meta[i]) * f32::from(q) - dmin * f32::from(meta[q4k::MINS + i])
            }
        }
    }

    #[test]
    fn a_packed_row_holds_ggmls_weights() {
        // One group and a part, Q8_0's rows padded to whole lines; an odd number of Q4_K
        // super-blocks leaves half a group empty.
        for (t, blocks, inp) in
            [(GgmlDType::Q8_0, Blocks::Q8_0, 544), (GgmlDType::Q8_0, Blocks::Q8_0, 1024), (GgmlDType::Q4K, Blocks::Q4K, 768)]
        {
            let w = Tensor::randn(0f32, 0.5, (3, inp), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, t).unwrap();
            let dense: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let ggml = q.data().unwrap();
            let n = row_bytes(blocks, inp);
            assert!(blocks == Blocks::Q4K || n.is_multiple_of(64), "{blocks:?} row of {n} bytes");
            for (r, ggml) in ggml.chunks_exact(ggml.len() / 3).enumerate() {
                let mut row = vec![0xAA; n];
                pack_row(blocks, inp, ggml, &mut row);
                for k in 0..groups(inp) * GROUP {
                    let want = if k < inp { dense[r * inp + k] } else { 0.0 };
                    let got = unpacked(blocks, inp, &row, k);
                    assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{blocks:?} {inp}: row {r}, weight {k}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn the_step_s_rows_in_groups() {
        // Two rows of 17 Q8_0 blocks: each value where its weight is, zero past the end.
        let inp = 544;
        let q: Vec<i8> = (0..2 * inp).map(|v| (v % 251) as i8).collect();
        let d: Vec<f32> = (0..2 * inp / 32).map(|b| b as f32 + 0.5).collect();
        let g = group_rows(Blocks::Q8_0, inp, &q, &d);
        assert_eq!(g.values.len(), 2 * 2 * GROUP);
        for r in 0..2 {
            for k in 0..2 * GROUP {
                let (gi, i, at) = (r * 2 + k / GROUP, (k % GROUP) / 32, k % 32);
                let want = if k < inp { q[r * inp + k] } else { 0 };
                assert_eq!(g.values[gi * GROUP + (at / 4) * 64 + i * 4 + at % 4], want, "row {r}, value {k}");
            }
            for b in 0..32 {
                let lane = (r * 2 + b / 16) * 16 + b % 16;
                let (scale, start) = if b < 17 {
                    (d[r * 17 + b], -128 * q[r * inp + b * 32..][..32].iter().map(|&v| i32::from(v)).sum::<i32>())
                } else {
                    (0.0, 0)
                };
                assert_eq!((g.scale[lane], g.start[lane]), (scale, start), "row {r}, block {b}");
            }
        }
        assert!(g.sum.is_empty());
        // Q4_K: a super-block's scale in each of its sub-blocks' lanes, and their sums.
        let (q, d) = (vec![3i8; 256], vec![0.25f32]);
        let g = group_rows(Blocks::Q4K, 256, &q, &d);
        assert_eq!(g.scale[..], [[0.25; 8], [0.0; 8]].concat());
        assert_eq!(g.sum[..], [[96.0; 8], [0.0; 8]].concat());
        assert!(g.start.is_empty());
    }
}
