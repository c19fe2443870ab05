//! The kernels on AVX-512 with VNNI: `vpdpbusd` and `vpdpwssd` on 64-byte registers.

use super::Rows;
use std::arch::x86_64::*;

/// `y` (the task's columns of each step row) from the Q8_0 weight rows `w`: the step's rows in groups of up to
/// 8, each multiplied into a pair of weight blocks while it is in a register.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let nb = inp / 32;
    in_groups!(w, nb * 34, y, 8, |g| {
        nb,
        xu = xs.wide[g * inp..].as_ptr(),
        xd = xs.d8[g * nb * 8..].as_ptr(),
        inp,
    }, q8_0_dots);
}

/// The dot products of one Q8_0 weight row (`nb` blocks at `wr`) with `R` rows of the step
/// (bytes plus 128 at `xu`, a row every `inp`; each block's scale 8 times at `xd`, a row
/// every `8 nb`), into `out`. Two blocks a register: the low 8 lanes hold the first's sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_dots<const R: usize>(wr: *const u8, nb: usize, xu: *const u8, xd: *const f32, inp: usize, out: &mut [f32]) {
    let bias = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut b = 0;
    while b < nb {
        let (blk, two) = (wr.add(b * 34), b + 1 < nb);
        // The pair's weights and scales; a last block alone leaves the high lanes zero.
        let (wv, dw, lanes) = if two {
            let wv = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(blk.add(2) as *const __m256i)),
                _mm256_loadu_si256(blk.add(36) as *const __m256i),
            );
            let h = _mm256_set_m128i(_mm_set1_epi16(half(blk.add(34))), _mm_set1_epi16(half(blk)));
            (wv, _mm512_cvtph_ps(h), 0xffffu16)
        } else {
            let wv = _mm512_zextsi256_si512(_mm256_loadu_si256(blk.add(2) as *const __m256i));
            (wv, _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_set1_epi16(half(blk)))), 0x00ff)
        };
        // −128·Σw in each lane: the sums of (x + 128)·w start from it and come out Σx·w.
        let start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, wv));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = xu.add(r * inp + b * 32);
            let xv =
                if two { _mm512_loadu_si512(x as *const __m512i) } else { _mm512_zextsi256_si512(_mm256_loadu_si256(x as *const __m256i)) };
            let sums = _mm512_dpbusd_epi32(start, xv, wv);
            let dx = _mm512_maskz_loadu_ps(lanes, xd.add((r * nb + b) * 8));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw, dx), *acc);
        }
        b += 2;
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*acc);
    }
}

/// `y` (the task's columns of each step row) from the Q4_K weight rows `w`, the step's rows in groups of up to 8 (32
/// registers hold a super-block's unpacked halves and 8 rows' sums).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4k(w: &[u8], inp: usize, xs: &Rows, y: &mut [&mut [f32]]) {
    let nb = inp / 256;
    in_groups!(w, nb * 144, y, 8, |g| {
        nb,
        xq = xs.wide[g * inp..].as_ptr(),
        xd = xs.d[g * nb..].as_ptr(),
        xsum = xs.sums[g * nb * 8..].as_ptr(),
        inp,
    }, q4k_dots);
}

/// As AVX2's `q4k_dots`, on 64 bytes of weights a load: two sub-blocks' low nibbles, then
/// their high ones (the step's bytes at `xq` are in that order), and each sub-block's
/// products times its scale added in one `vpdpwssd`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_dots<const R: usize>(wr: *const u8, nb: usize, xq: *const u8, xd: *const f32, xsum: *const i16, inp: usize, out: &mut [f32]) {
    let m4 = _mm512_set1_epi8(0xF);
    // The 16-bit lanes of each half picked from the 8 scales: low nibbles of the loads
    // j = 0, 1 are sub-blocks 0 and 2, then 4 and 6; high nibbles 1 and 3, then 5 and 7.
    let pick = |a: i16, b: i16| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_set1_epi16(a)), _mm256_set1_epi16(b));
    let picks = [[pick(0, 2), pick(1, 3)], [pick(4, 6), pick(5, 7)]];
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let blk = wr.add(b * 144);
        let d = _mm512_cvtph_ps(_mm256_set1_epi16(half(blk)));
        let dmin = _mm512_cvtph_ps(_mm256_set1_epi16(half(blk.add(2))));
        let ms = super::avx2::scales_mins(blk);
        let scales = _mm512_castsi256_si512(ms);
        let mins = _mm256_extracti128_si256::<1>(ms);
        let qs = blk.add(16);
        let mut sumi = [_mm512_setzero_si512(); R];
        for (j, [lo_pick, hi_pick]) in picks.iter().enumerate() {
            let lo_scale = _mm512_permutexvar_epi16(*lo_pick, scales);
            let hi_scale = _mm512_permutexvar_epi16(*hi_pick, scales);
            let bits = _mm512_loadu_si512(qs.add(64 * j) as *const __m512i);
            let lo = _mm512_and_si512(bits, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4);
            for (r, sumi) in sumi.iter_mut().enumerate() {
                let x = xq.add(r * inp + b * 256 + 128 * j);
                let xl = _mm512_loadu_si512(x as *const __m512i);
                let xh = _mm512_loadu_si512(x.add(64) as *const __m512i);
                *sumi = _mm512_dpwssd_epi32(*sumi, lo_scale, _mm512_maddubs_epi16(lo, xl));
                *sumi = _mm512_dpwssd_epi32(*sumi, hi_scale, _mm512_maddubs_epi16(hi, xh));
            }
        }
        for (r, (acc, sumi)) in acc.iter_mut().zip(sumi).enumerate() {
            let dx = _mm512_set1_ps(*xd.add(r * nb + b));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(d, dx), *acc);
            let sums = _mm_loadu_si128(xsum.add((r * nb + b) * 8) as *const __m128i);
            let m = _mm512_zextsi128_si512(_mm_madd_epi16(mins, sums));
            *acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(dmin, dx), *acc);
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
