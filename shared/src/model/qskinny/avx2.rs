//! The kernels on AVX2, FMA and F16C, over the groups `grouped.rs` lays out: each 32-byte
//! half of a group's register holds 8 blocks, a 32-bit lane each. Without VNNI the bytes'
//! products take `vpmaddubsw` (unsigned by signed bytes into pairs of 16 bits) and `vpmaddwd`
//! (the pairs into the lane's 32 bits); Q8_0's signed weights go in as their magnitudes with
//! their signs moved onto the step's bytes (`vpsignb`), as llama.cpp's AVX2 code does. Q4_K's
//! pairs are small enough (a nibble times a byte) to be summed in 16 bits over a super-block
//! first, one `vpmaddwd` a super-block instead of one a register of products.

use super::grouped::{fetch, q4k, row_bytes, Step, AHEAD, GROUP, Q8_0_SCALES};
use super::{Blocks, Rows};
use std::arch::x86_64::*;

/// 8 lanes of 4 byte products each into 32 bits: `vpmaddubsw` then `vpmaddwd` by ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}

/// `y` (the task's columns of each step row) from the packed Q8_0 weight rows `w`, the step's
/// rows in groups of up to 8 (their totals do not all fit the 16 registers beside the sums,
/// but are touched once a half group; groups of 4, which fit, measured a fifth slower).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let row_bytes = row_bytes(Blocks::Q8_0, inp);
    in_groups!(w, row_bytes, y, 8, |g| { row_bytes, step = Step::of(xs, Blocks::Q8_0, inp, g) }, q8_0_dots);
}

/// The dot products of the packed Q8_0 weight row at `wr` with `R` rows of the step, into
/// `out`, 8 blocks (half a group) at a time. The weights are stored plus 128 (for VNNI):
/// flipping their top bits gives them back.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dots<const R: usize>(wr: *const u8, row_bytes: usize, step: Step, out: &mut [f32]) {
    let Step { values, scale, groups, .. } = step;
    let (scales, ahead) = (wr.add(groups * GROUP), wr.wrapping_add(AHEAD * row_bytes));
    let top = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        for j in 0..8 {
            fetch(ahead.wrapping_add(g * GROUP + 64 * j));
        }
        fetch(ahead.wrapping_add(groups * GROUP + g * Q8_0_SCALES));
        for h in 0..2 {
            let mut sums = [_mm256_setzero_si256(); R];
            for j in 0..8 {
                let wv = _mm256_xor_si256(_mm256_loadu_si256(wr.add(g * GROUP + 64 * j + 32 * h) as *const __m256i), top);
                let aw = _mm256_abs_epi8(wv);
                for (r, sums) in sums.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(values.add((r * groups + g) * GROUP + 64 * j + 32 * h) as *const __m256i);
                    *sums = _mm256_add_epi32(*sums, dot4(aw, _mm256_sign_epi8(xv, wv)));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(g * Q8_0_SCALES + 16 * h) as *const __m128i));
            for (r, (acc, sums)) in acc.iter_mut().zip(sums).enumerate() {
                let d = _mm256_mul_ps(dw, _mm256_loadu_ps(scale.add((r * groups + g) * 16 + 8 * h)));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, *acc);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = hsum(acc);
    }
}

/// `y` (the task's columns of each step row) from the packed Q4_K weight rows `w`, the step's
/// rows in groups of up to 8.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let row_bytes = row_bytes(Blocks::Q4K, inp);
    in_groups!(w, row_bytes, y, 8, |g| { row_bytes, step = Step::of(xs, Blocks::Q4K, inp, g) }, q4k_dots);
}

/// The dot products of the packed Q4_K weight row at `wr` with `R` rows of the step, into
/// `out`, a super-block (half a group) at a time: each sub-block is `d·sc·(q·x) − dmin·m·Σx`,
/// times the row's scale.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_dots<const R: usize>(wr: *const u8, row_bytes: usize, step: Step, out: &mut [f32]) {
    let Step { values, scale, sum, groups, .. } = step;
    let (meta, ahead) = (wr.add(groups * GROUP / 2), wr.wrapping_add(AHEAD * row_bytes));
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        for l in 0..4 {
            fetch(ahead.wrapping_add(g * GROUP / 2 + 64 * l));
        }
        fetch(ahead.wrapping_add(groups * GROUP / 2 + g * q4k::BYTES));
        for h in 0..2 {
            let mut sums = [_mm256_setzero_si256(); R];
            for m in 0..4 {
                let bits = _mm256_loadu_si256(wr.add(g * GROUP / 2 + 64 * m + 32 * h) as *const __m256i);
                let lo = _mm256_and_si256(bits, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
                for (r, sums) in sums.iter_mut().enumerate() {
                    let x = values.add((r * groups + g) * GROUP + 128 * m + 32 * h);
                    let xl = _mm256_loadu_si256(x as *const __m256i);
                    let xh = _mm256_loadu_si256(x.add(64) as *const __m256i);
                    let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                    *sums = _mm256_add_epi16(*sums, pairs);
                }
            }
            // Widened once a super-block: each 16-bit half of a lane holds 16 products of a
            // nibble (at most 15) and a byte (at most 128 in magnitude), at most 30,720.
            let sums = sums.map(|s| _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
            // The super-block's d and dmin, times its sub-blocks' 6-bit scales and minimums.
            let mg = meta.add(g * q4k::BYTES);
            let f16 = |p: *const u8| _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([*p, *p.add(1)])));
            let bytes = |p: *const u8| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            let sc = _mm256_mul_ps(f16(mg.add(q4k::D + 2 * h)), bytes(mg.add(8 * h)));
            let mn = _mm256_mul_ps(f16(mg.add(q4k::DMIN + 2 * h)), bytes(mg.add(q4k::MINS + 8 * h)));
            for (r, (acc, sums)) in acc.iter_mut().zip(sums).enumerate() {
                let at = (r * groups + g) * 16 + 8 * h;
                let t = _mm256_fnmadd_ps(mn, _mm256_loadu_ps(sum.add(at)), _mm256_mul_ps(_mm256_cvtepi32_ps(sums), sc));
                *acc = _mm256_fmadd_ps(t, _mm256_loadu_ps(scale.add(at)), *acc);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = hsum(acc);
    }
}
