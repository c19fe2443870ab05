//! The kernels on AVX-512 with VNNI: `vpdpbusd` on 64-byte registers, over the groups
//! `grouped.rs` lays out, a weight row at a time into up to 8 rows of the step. (Two weight
//! rows at a time, each load of the step's bytes going into both, ran 1.3–1.5× faster with
//! the weights in cache, but a serving worker's steps of 8, the weights coming from memory,
//! took 55–85 ms with it against 45–65 without, on a Zen 4. AMX's tiles, on a Xeon that has
//! them, were no faster with the weights coming from memory: see the README.)

use super::grouped::{fetch, fetch_far, q4k, row_bytes, Step, AHEAD, FAR, GROUP, Q8_0_SCALES};
use super::{Blocks, Rows};
use std::arch::x86_64::*;

/// `y` (the task's columns of each step row) from the packed Q8_0 weight rows `w`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let row_bytes = row_bytes(Blocks::Q8_0, inp);
    in_groups!(w, row_bytes, y, 8, |g| { row_bytes, step = Step::of(xs, Blocks::Q8_0, inp, g) }, q8_0_dots);
}

/// The dot products of the packed Q8_0 weight row at `wr` with `R` rows of the step, into
/// `out`. A block's sum starts from −128 times the row's values' sum, which takes off the 128
/// added to each weight.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_dots<const R: usize>(wr: *const u8, row_bytes: usize, step: Step, out: &mut [f32]) {
    let Step { values, scale, start, groups, .. } = step;
    let (scales, ahead, far) = (wr.add(groups * GROUP), wr.wrapping_add(AHEAD * row_bytes), wr.wrapping_add(FAR * row_bytes));
    let mut acc = [_mm512_setzero_ps(); R];
    for g in 0..groups {
        let x = |r: usize| (r * groups + g) * 16;
        for j in 0..8 {
            fetch(ahead.wrapping_add(g * GROUP + 64 * j));
            fetch_far(far.wrapping_add(g * GROUP + 64 * j));
        }
        fetch(ahead.wrapping_add(groups * GROUP + g * Q8_0_SCALES));
        fetch_far(far.wrapping_add(groups * GROUP + g * Q8_0_SCALES));
        // The odd registers' products in sums of their own: one chain of 8 dependent products a
        // row would wait on each (each takes 6 cycles, two can start each cycle).
        let mut sums: [[__m512i; 2]; R] =
            std::array::from_fn(|r| [_mm512_loadu_si512(start.add(x(r)) as *const __m512i), _mm512_setzero_si512()]);
        for j in 0..8 {
            let wv = _mm512_loadu_si512(wr.add(g * GROUP + 64 * j) as *const __m512i);
            for (r, sums) in sums.iter_mut().enumerate() {
                let xv = _mm512_loadu_si512(values.add(x(r) * 32 + 64 * j) as *const __m512i);
                let s = &mut sums[j % 2];
                *s = _mm512_dpbusd_epi32(*s, wv, xv);
            }
        }
        let sums = sums.map(|[even, odd]| _mm512_add_epi32(even, odd));
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(g * Q8_0_SCALES) as *const __m256i));
        for (r, (acc, sums)) in acc.iter_mut().zip(sums).enumerate() {
            let d = _mm512_mul_ps(dw, _mm512_loadu_ps(scale.add(x(r))));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, *acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*acc);
    }
}

/// `y` (the task's columns of each step row) from the packed Q4_K weight rows `w`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4k(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let row_bytes = row_bytes(Blocks::Q4K, inp);
    in_groups!(w, row_bytes, y, 8, |g| { row_bytes, step = Step::of(xs, Blocks::Q4K, inp, g) }, q4k_dots);
}

/// The dot products of the packed Q4_K weight row at `wr` with `R` rows of the step, into
/// `out`: each sub-block is `d·sc·(q·x) − dmin·m·Σx`, times the row's scale.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_dots<const R: usize>(wr: *const u8, row_bytes: usize, step: Step, out: &mut [f32]) {
    let Step { values, scale, sum, groups, .. } = step;
    let (meta, ahead) = (wr.add(groups * GROUP / 2), wr.wrapping_add(AHEAD * row_bytes));
    let m4 = _mm512_set1_epi8(0xF);
    let mut acc = [_mm512_setzero_ps(); R];
    for g in 0..groups {
        let x = |r: usize| (r * groups + g) * 16;
        for l in 0..4 {
            fetch(ahead.wrapping_add(g * GROUP / 2 + 64 * l));
        }
        fetch(ahead.wrapping_add(groups * GROUP / 2 + g * q4k::BYTES));
        // The high nibbles' products in sums of their own, as Q8_0's odd registers'.
        let mut sums = [[_mm512_setzero_si512(); 2]; R];
        for m in 0..4 {
            let bits = _mm512_loadu_si512(wr.add(g * GROUP / 2 + 64 * m) as *const __m512i);
            let lo = _mm512_and_si512(bits, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4);
            for (r, [low, high]) in sums.iter_mut().enumerate() {
                let xs = values.add(x(r) * 32 + 128 * m);
                *low = _mm512_dpbusd_epi32(*low, lo, _mm512_loadu_si512(xs as *const __m512i));
                *high = _mm512_dpbusd_epi32(*high, hi, _mm512_loadu_si512(xs.add(64) as *const __m512i));
            }
        }
        let sums = sums.map(|[low, high]| _mm512_add_epi32(low, high));
        // Each super-block's d and dmin in its 8 lanes, times the sub-blocks' 6-bit values.
        let mg = meta.add(g * q4k::BYTES);
        let pair = |p: *const u8| _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(half(p.add(2))), _mm_set1_epi16(half(p))));
        let bytes = |p: *const u8| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)));
        let sc = _mm512_mul_ps(pair(mg.add(q4k::D)), bytes(mg));
        let mn = _mm512_mul_ps(pair(mg.add(q4k::DMIN)), bytes(mg.add(q4k::MINS)));
        for (r, (acc, sums)) in acc.iter_mut().zip(sums).enumerate() {
            let t = _mm512_fnmadd_ps(mn, _mm512_loadu_ps(sum.add(x(r))), _mm512_mul_ps(_mm512_cvtepi32_ps(sums), sc));
            *acc = _mm512_fmadd_ps(t, _mm512_loadu_ps(scale.add(x(r))), *acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*acc);
    }
}

/// The f16 bits at `p`.
#[inline]
unsafe fn half(p: *const u8) -> i16 {
    i16::from_le_bytes([*p, *p.add(1)])
}
