//! The kernels on AVX2, FMA and F16C: 32 byte products a step, summed by `vpmaddubsw` and
//! `vpmaddwd`.

use super::Rows;
use std::arch::x86_64::*;

/// The f16 at `p`, as f32 in every lane. (Broadcast before converting: an f16 moved into
/// the low lane alone is inserted into whatever register the compiler picks, which ties
/// every block to that register's last writer.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([*p, *p.add(1)])))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}

/// `y` (the task's columns of each step row) from the Q8_0 weight rows `w`: the step's rows in groups of up to 8,
/// each multiplied into a weight block while it is in a register. (Two weight rows at a
/// time, for independent accumulators, measured slower: their blocks do not fit the
/// registers.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let nb = inp / 32;
    in_groups!(w, nb * 34, y, 8, |g| {
        nb,
        xq = xs.q[g * inp..].as_ptr(),
        xd = xs.d[g * nb..].as_ptr(),
        inp,
    }, q8_0_dots);
}

/// The dot products of one Q8_0 weight row (`nb` blocks at `wr`) with `R` rows of the step
/// (bytes at `xq`, a row every `inp`; scales at `xd`, a row every `nb`), into `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dots<const R: usize>(wr: *const u8, nb: usize, xq: *const i8, xd: *const f32, inp: usize, out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = wr.add(b * 34);
        let dw = f16_at(blk);
        let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        // |w| as unsigned bytes, and x carrying w's sign: the products are x·w.
        let aw = _mm256_sign_epi8(wv, wv);
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_si256(xq.add(r * inp + b * 32) as *const __m256i);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
            let scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*xd.add(r * nb + b)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, *acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = hsum(*acc);
    }
}

/// The 6-bit scales (16-bit lanes 0..8) and minimums (8..16) of the 8 sub-blocks of the
/// Q4_K super-block at `blk` (ggml's `get_scale_min_k4`, four at a time).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scales_mins(blk: *const u8) -> __m256i {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([*blk.add(4 + 4 * i), *blk.add(5 + 4 * i), *blk.add(6 + 4 * i), *blk.add(7 + 4 * i)]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let u2n = u1 & KMASK1;
    let u1n = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let u0n = u0 & KMASK1;
    _mm256_cvtepu8_epi16(_mm_set_epi32(u3 as i32, u2n as i32, u1n as i32, u0n as i32))
}

/// `y` (the task's columns of each step row) from the Q4_K weight rows `w`, the step's rows in groups of up to 4
/// (an unpacked super-block takes more registers than a Q8_0 block).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let nb = inp / 256;
    in_groups!(w, nb * 144, y, 4, |g| {
        nb,
        xq = xs.q[g * inp..].as_ptr(),
        xd = xs.d[g * nb..].as_ptr(),
        xsum = xs.sums[g * nb * 8..].as_ptr(),
        inp,
    }, q4k_dots);
}

/// The dot products of one Q4_K weight row with `R` rows of the step (bytes at `xq`, a
/// row every `inp`; a scale per super-block at `xd` and 8 sums per super-block at `xsum`,
/// a row every `nb` super-blocks). Each super-block is `d·Σ sc·(q·x) − dmin·Σ m·(Σx)`
/// over its 8 sub-blocks, summed in integers and scaled once.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_dots<const R: usize>(wr: *const u8, nb: usize, xq: *const i8, xd: *const f32, xsum: *const i16, inp: usize, out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = wr.add(b * 144);
        let (d, dmin) = (f16_at(blk), f16_at(blk.add(2)));
        let ms = scales_mins(blk);
        let mins = _mm256_extracti128_si256(ms, 1);
        let sc = _mm256_extracti128_si256(ms, 0);
        let scales = _mm256_set_m128i(sc, sc);
        let qs = blk.add(16);
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            // Sub-blocks 2j (low nibbles) and 2j+1 (high): their scales in every 16-bit lane.
            let lo_scale = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((((4 * j + 1) << 8) | (4 * j)) as i16));
            let hi_scale = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((((4 * j + 3) << 8) | (4 * j + 2)) as i16));
            let bits = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
            let lo = _mm256_and_si256(bits, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            for (r, sumi) in sumi.iter_mut().enumerate() {
                let x = xq.add(r * inp + b * 256 + 64 * j);
                let xl = _mm256_loadu_si256(x as *const __m256i);
                let xh = _mm256_loadu_si256(x.add(32) as *const __m256i);
                let pl = _mm256_madd_epi16(lo_scale, _mm256_maddubs_epi16(lo, xl));
                let ph = _mm256_madd_epi16(hi_scale, _mm256_maddubs_epi16(hi, xh));
                *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(pl, ph));
            }
        }
        for (r, (acc, sumi)) in acc.iter_mut().zip(sumi).enumerate() {
            let dx = _mm256_broadcast_ss(&*xd.add(r * nb + b));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_mul_ps(d, dx), *acc);
            let sums = _mm_loadu_si128(xsum.add((r * nb + b) * 8) as *const __m128i);
            let m = _mm256_set_m128i(_mm_setzero_si128(), _mm_madd_epi16(mins, sums));
            *acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, dx), *acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = hsum(acc);
    }
}
