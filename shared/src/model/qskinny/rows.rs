//! The step's rows quantized on AVX2 straight into the groups' layout (`grouped.rs`): the
//! values `quantize_rows` (`qskinny.rs`, the tests' reference) gives, bit for bit, 8 at a
//! time. Value by value (a scalar conversion each, then a second pass to lay the rows out) 8
//! rows into `down_proj` took 50 µs and a layer's four inputs 116 µs, 3.3 ms of a Q8_0 step of
//! 8 rows that took about 50 ms on two cores, run on one while the other waited; this takes
//! 17 µs and 40 µs (Zen 4).

use super::grouped::{groups, Grouped, GROUP};
use super::{Blocks, Lines};
use std::arch::x86_64::*;

/// `x` `(rows, inp)` in 8 bits for `blocks`' products, laid out as the weights' groups.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize(blocks: Blocks, inp: usize, x: &[f32]) -> Grouped {
    let (rows, gs, n) = (x.len() / inp, groups(inp), blocks.weights());
    let mut values = Lines::zeroed(rows * gs * GROUP);
    let mut scale = Lines::zeroed(rows * gs * 16);
    let mut sum = vec![0i32; rows * gs * 16];
    for (r, row) in x.chunks_exact(inp).enumerate() {
        for (s, xb) in row.chunks_exact(n).enumerate() {
            let (d, id) = block_scale(blocks, xb);
            for (k, values32) in xb.chunks_exact(32).enumerate() {
                let b = s * n / 32 + k;
                let (g, i) = (r * gs + b / 16, b % 16);
                let (q, total) = round32(values32, id);
                // Register `j` of the group holds values `4j..4j+4` of each of its 16 blocks.
                let mut bytes = [0i8; 32];
                _mm256_storeu_si256(bytes.as_mut_ptr().cast(), q);
                let group = &mut values[g * GROUP..][..GROUP];
                for (j, four) in bytes.chunks_exact(4).enumerate() {
                    group[j * 64 + i * 4..][..4].copy_from_slice(four);
                }
                scale[g * 16 + i] = d;
                sum[g * 16 + i] = total;
            }
        }
    }
    Grouped::of_blocks(blocks, values, scale, &sum)
}

/// [`super::block_scale`] of a block, its largest magnitude found 8 values at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_scale(blocks: Blocks, xb: &[f32]) -> (f32, f32) {
    let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
    let mut m = _mm256_setzero_ps();
    for c in xb.chunks_exact(8) {
        // The magnitude first: a NaN there leaves `m` as it was, as `f32::max` does.
        m = _mm256_max_ps(abs(_mm256_loadu_ps(c.as_ptr())), m);
    }
    // Across the lanes (none is NaN: any order gives the same maximum).
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    // The value of largest magnitude, with its sign (the first of equals).
    super::block_scale(blocks, amax, || {
        let target = _mm256_set1_ps(amax);
        xb.chunks_exact(8)
            .find_map(|c| {
                let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs(_mm256_loadu_ps(c.as_ptr())), target));
                (hit != 0).then(|| c[hit.trailing_zeros() as usize])
            })
            .unwrap_or(0.0)
    })
}

/// 32 values times `id`, rounded half away from zero and saturated to a byte (NaN to 0, as
/// `as i8` takes it), in order in a register; and their sum.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round32(x: &[f32], id: f32) -> (__m256i, i32) {
    let id = _mm256_set1_ps(id);
    let eight = |o: usize| {
        let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(o)), id);
        // trunc(v) plus v's sign where the part cut off is half or more: `f32::round`
        // (v − trunc(v) is exact at every magnitude a byte holds).
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let cut = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(v, t));
        let one = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_and_ps(v, _mm256_set1_ps(-0.0)));
        let away = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(cut, _mm256_set1_ps(0.5)), one);
        // NaN (which no comparison orders) to 0.
        let r = _mm256_and_ps(_mm256_add_ps(t, away), _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        // Clamped to a byte before converting (beyond an i32 the conversion would not saturate).
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-128.0)), _mm256_set1_ps(127.0)))
    };
    let (a, b, c, d) = (eight(0), eight(8), eight(16), eight(24));
    let s = _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let total = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
    // Packing works within 128-bit halves: the bytes come out as a0-3 b0-3 c0-3 d0-3 | a4-7
    // b4-7 c4-7 d4-7, put back in order by 32-bit lanes.
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    (_mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), total)
}
