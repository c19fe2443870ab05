//! The matmul of a step on quantized weights on a CPU: `y = x · Wᵀ` with `W` `(out, in)` in
//! llama.cpp's Q8_0 or Q4_K blocks and `x` `(rows, in)` in f32.
//!
//! As llama.cpp does, the rows of `x` are quantized to 8 bits in blocks as the weights' (32
//! for Q8_0, 256 for Q4_K, with the same rounding as candle's and llama.cpp's) and the dot
//! products are taken in integers: `vpmaddubsw` multiplies 32 byte pairs into 16 sums and
//! `vpmaddwd` folds them into 8 (for Q4_K times each sub-block's 6-bit scale, so a
//! super-block of 256 is scaled into f32 once). Unlike candle's CPU `QMatMul`, which takes a
//! dot per row of the step and weight row, each weight block is loaded (and for Q4_K
//! unpacked) once and multiplied into several rows of the step while it is in registers, so a
//! step of 8 rows reads its weights once, not 8 times. Output rows are split over the rayon
//! pool, like the f32 kernel's; a row's result depends only on its own inputs, not on the
//! step it came in with.
//!
//! AVX2 (with FMA and F16C), chosen at run time; elsewhere, and for other block types, the
//! caller keeps candle's kernel. On AVX2 the integer multiply-adds of a step of 8 rows cost
//! about what f32 FMAs would: past a few rows the gain over f32 is the bytes read. Where the
//! CPU has AVX-512 with VNNI, 64 bytes go through each instruction and `vpdpbusd`/`vpdpwssd`
//! fold the multiply and the adds into one: Q8_0 takes its blocks two to a register, Q4_K a
//! pair of sub-blocks' nibbles, and up to 8 rows of the step share each weight load.

#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

/// A block type the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocks {
    /// An f16 scale and 32 signed bytes.
    Q8_0,
    /// Super-blocks of 256: an f16 scale and minimum, 8 sub-blocks of 32 with 6-bit scales
    /// and minimums, 4-bit values.
    Q4K,
}

impl Blocks {
    /// The kernel for weights of type `t`, where this CPU runs it.
    pub(crate) fn of(t: GgmlDType) -> Option<Self> {
        let blocks = match t {
            GgmlDType::Q8_0 => Blocks::Q8_0,
            GgmlDType::Q4K => Blocks::Q4K,
            _ => return None,
        };
        available().then_some(blocks)
    }

    /// Weights in a block: a row's length is a multiple of it.
    pub(crate) fn weights(self) -> usize {
        match self {
            Blocks::Q8_0 => 32,
            Blocks::Q4K => 256,
        }
    }

    /// Bytes of a block.
    fn bytes(self) -> usize {
        match self {
            Blocks::Q8_0 => 34,
            Blocks::Q4K => 144,
        }
    }
}

/// Whether this CPU runs the kernel.
fn available() -> bool {
    // The detection macro caches what it finds.
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The instructions a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// 32 byte products a step, summed by `vpmaddubsw` and `vpmaddwd`.
    Avx2,
    /// AVX-512 with VNNI: `vpdpbusd` multiplies 64 byte pairs and adds them in fours into 16
    /// integers, one instruction for AVX2's three on twice the width.
    Avx512Vnni,
}

impl Isa {
    /// The widest this CPU runs (it runs [`Isa::Avx2`] where [`available`] says so).
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni") {
            return Isa::Avx512Vnni;
        }
        Isa::Avx2
    }
}

/// The rows of the step in 8 bits, in blocks as the weights': for Q8_0 a scale `max|x| / 127`
/// per 32 (kept as an f16, as candle's and llama.cpp's Q8_0 blocks keep it); for Q4_K a
/// scale per 256 (llama.cpp's Q8_K, whose largest value maps to -127) and the sum of each 32
/// values, for the weights' minimums.
/// The VNNI path reads the bytes in `wide` instead: for Q8_0 plus 128 (its instruction
/// multiplies unsigned bytes into signed ones), with each block's scale 8 times in `d8` (the
/// lanes of its sums); for Q4_K in the order its registers take the sub-blocks (0, 2, 1, 3,
/// 4, 6, 5, 7: a 64-byte load of weights holds two sub-blocks' low nibbles, then their high).
struct Rows {
    q: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i16>,
    wide: Vec<u8>,
    d8: Vec<f32>,
}

#[inline(always)]
fn quantize_rows(blocks: Blocks, isa: Isa, x: &[f32]) -> Rows {
    let n = blocks.weights();
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / n];
    for ((xb, qb), d) in x.chunks_exact(n).zip(q.chunks_exact_mut(n)).zip(&mut d) {
        let (scale, id) = match blocks {
            Blocks::Q8_0 => {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                (half::f16::from_f32(scale).to_f32(), if scale == 0.0 { 0.0 } else { 1.0 / scale })
            }
            Blocks::Q4K => {
                // The value of largest magnitude, with its sign (the first of equals).
                let max = xb.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                if max == 0.0 {
                    (0.0, 0.0)
                } else {
                    let iscale = -127.0 / max;
                    (1.0 / iscale, iscale)
                }
            }
        };
        *d = scale;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round().clamp(-128.0, 127.0) as i8;
        }
    }
    let sums = match blocks {
        Blocks::Q8_0 => Vec::new(),
        Blocks::Q4K => q.chunks_exact(32).map(|c| c.iter().map(|&v| i16::from(v)).sum()).collect(),
    };
    let (wide, d8) = match (isa, blocks) {
        (Isa::Avx2, _) => (Vec::new(), Vec::new()),
        (Isa::Avx512Vnni, Blocks::Q8_0) => (q.iter().map(|&v| (v as u8) ^ 0x80).collect(), d.iter().flat_map(|&d| [d; 8]).collect()),
        (Isa::Avx512Vnni, Blocks::Q4K) => {
            let mut wide = Vec::with_capacity(q.len());
            for c in q.chunks_exact(256) {
                for s in [0, 2, 1, 3, 4, 6, 5, 7] {
                    wide.extend(c[s * 32..(s + 1) * 32].iter().map(|&v| v as u8));
                }
            }
            (wide, Vec::new())
        }
    };
    Rows { q, d, sums, wide, d8 }
}

/// [`quantize_rows`] with the instructions the kernel needs, where rounding is one instruction
/// (without them it is a call into libm per value).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_rows_avx2(blocks: Blocks, isa: Isa, x: &[f32]) -> Rows {
    quantize_rows(blocks, isa, x)
}

/// A step's rows `x` `(rows, inp)` quantized for `blocks`' products: made once for all the
/// layers that read the same rows (q, k and v; gate and up).
pub(crate) struct Input {
    isa: Isa,
    blocks: Blocks,
    inp: usize,
    rows: usize,
    xs: Rows,
}

impl Input {
    /// `x` `(rows, inp)` row-major for weights in `blocks`, which comes from [`Blocks::of`]
    /// (it checked the CPU).
    pub(crate) fn new(blocks: Blocks, inp: usize, x: &[f32], rows: usize) -> Input {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        Input::on(*ISA.get_or_init(Isa::best), blocks, inp, x, rows)
    }

    /// [`Input::new`] for `isa`'s kernels.
    fn on(isa: Isa, blocks: Blocks, inp: usize, x: &[f32], rows: usize) -> Input {
        assert!(available(), "the quantized kernel needs AVX2, FMA and F16C");
        assert!(inp.is_multiple_of(blocks.weights()), "rows of {inp} weights are not whole {blocks:?} blocks");
        assert_eq!(x.len(), rows * inp, "input for {rows}x{inp}");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked the CPU features.
        let xs = unsafe { quantize_rows_avx2(blocks, isa, x) };
        #[cfg(not(target_arch = "x86_64"))]
        let xs = quantize_rows(blocks, isa, x);
        Input { isa, blocks, inp, rows, xs }
    }

    /// Whether these rows are what a layer of `inp` weights in `blocks` reads.
    pub(crate) fn fits(&self, blocks: Blocks, inp: usize) -> bool {
        self.blocks == blocks && self.inp == inp
    }
}

/// `y = x · Wᵀ` as `(rows, out)`: `w` is `out` rows of the input's `inp` weights in its blocks.
pub(crate) fn matmul(input: &Input, w: &[u8], out: usize) -> Vec<f32> {
    let Input { isa, blocks, inp, rows, ref xs } = *input;
    let row_bytes = inp / blocks.weights() * blocks.bytes();
    assert_eq!(w.len(), out * row_bytes, "weight bytes for {out}x{inp} {blocks:?}");
    let mut y = vec![0f32; out * rows];
    if rows == 0 || out == 0 {
        return y;
    }
    // A task per block of output rows: enough blocks for every thread, each big enough that a
    // task's overhead is small beside its weights.
    let threads = rayon::current_num_threads().max(1);
    let block = out.div_ceil(threads * 8).max(16);
    super::skinny::column_tiles(&mut y, out, block).into_par_iter().enumerate().for_each(|(b, mut yb)| {
        let first = b * block;
        let n = yb[0].len();
        let yb = yb.as_mut_slice();
        let wb = &w[first * row_bytes..(first + n) * row_bytes];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked the CPU features the functions are compiled for; the
        // slices' lengths were checked above against the shapes they index by.
        unsafe {
            match (isa, blocks) {
                (Isa::Avx512Vnni, Blocks::Q8_0) => avx512::q8_0(wb, inp, xs, yb),
                (Isa::Avx2, Blocks::Q8_0) => avx2::q8_0(wb, inp, xs, yb),
                (Isa::Avx512Vnni, Blocks::Q4K) => avx512::q4k(wb, inp, xs, yb),
                (Isa::Avx2, Blocks::Q4K) => avx2::q4k(wb, inp, xs, yb),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (wb, yb);
    });
    y
}

/// The loop every path's products share: the step's rows in groups of up to `group` (8 or 4),
/// each group over every weight row `w` (of `row_bytes`) of the task, into `y` (the task's
/// columns of each step row); `dots::<R>(weight row, args…, out)` takes a group of `R` rows,
/// its args bound for each group from the group's first row `g` (an arg without a value
/// passes through).
#[cfg(target_arch = "x86_64")]
macro_rules! in_groups {
    ($w:expr, $row_bytes:expr, $y:expr, $group:tt, |$g:ident| { $($arg:ident $(= $value:expr)?),+ $(,)? }, $dots:ident) => {{
        let (n, rows) = ($w.len() / $row_bytes, $y.len());
        let mut $g = 0;
        while $g < rows {
            let take = (rows - $g).min($group);
            $($(let $arg = $value;)?)+
            let mut sums = [0f32; $group];
            for o in 0..n {
                let wr = $w[o * $row_bytes..].as_ptr();
                let out = &mut sums[..take];
                in_groups!(@call $group, take, $dots, (wr, $($arg),+, out));
                for (r, s) in out.iter().enumerate() {
                    $y[$g + r][o] = *s;
                }
            }
            $g += take;
        }
    }};
    (@call 8, $take:expr, $dots:ident, $args:tt) => {
        match $take {
            8 => $dots::<8> $args,
            7 => $dots::<7> $args,
            6 => $dots::<6> $args,
            5 => $dots::<5> $args,
            4 => $dots::<4> $args,
            3 => $dots::<3> $args,
            2 => $dots::<2> $args,
            _ => $dots::<1> $args,
        }
    };
    (@call 4, $take:expr, $dots:ident, $args:tt) => {
        match $take {
            4 => $dots::<4> $args,
            3 => $dots::<3> $args,
            2 => $dots::<2> $args,
            _ => $dots::<1> $args,
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
    unsafe fn q4k_dots<const R: usize>(
        wr: *const u8,
        nb: usize,
        xq: *const i8,
        xd: *const f32,
        xsum: *const i16,
        inp: usize,
        out: &mut [f32],
    ) {
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
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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
                let xv = if two {
                    _mm512_loadu_si512(x as *const __m512i)
                } else {
                    _mm512_zextsi256_si512(_mm256_loadu_si256(x as *const __m256i))
                };
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
    unsafe fn q4k_dots<const R: usize>(
        wr: *const u8,
        nb: usize,
        xq: *const u8,
        xd: *const f32,
        xsum: *const i16,
        inp: usize,
        out: &mut [f32],
    ) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn weights(t: GgmlDType, out: usize, inp: usize) -> (Tensor, QTensor) {
        let w = Tensor::randn(0f32, 0.5, (out, inp), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        (q.dequantize(&Device::Cpu).unwrap(), q)
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The product on `isa`'s kernels.
    fn product(isa: Isa, blocks: Blocks, w: &[u8], out: usize, inp: usize, x: &[f32], rows: usize) -> Vec<f32> {
        matmul(&Input::on(isa, blocks, inp, x, rows), w, out)
    }

    /// Every path this CPU runs: AVX2, and AVX-512 VNNI where it has it.
    fn isas() -> Vec<Isa> {
        let mut isas = vec![Isa::Avx2];
        if Isa::best() != Isa::Avx2 {
            isas.push(Isa::best());
        } else {
            eprintln!("no AVX-512 VNNI: its path is not used on this CPU");
        }
        isas
    }

    #[test]
    fn equals_candles_matmul_for_every_shape_edge() {
        if !available() {
            eprintln!("no AVX2: the kernel is not used on this CPU");
            return;
        }
        // Output rows not a multiple of a task, step rows past a group, a zero row.
        for (t, cases) in [
            (GgmlDType::Q8_0, [(13, 32, 1), (64, 96, 8), (100, 1024, 9), (33, 256, 17), (5, 64, 3)]),
            (GgmlDType::Q4K, [(13, 256, 1), (64, 512, 8), (100, 1024, 9), (33, 256, 5), (5, 768, 3)]),
        ] {
            let blocks = Blocks::of(t).unwrap();
            for ((out, inp, rows), isa) in cases.into_iter().flat_map(|c| isas().into_iter().map(move |i| (c, i))) {
                let (dense, q) = weights(t, out, inp);
                let mut x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).unwrap();
                if rows > 2 {
                    let zero = Tensor::zeros((1, inp), candle_core::DType::F32, &Device::Cpu).unwrap();
                    x = x.slice_assign(&[1..2, 0..inp], &zero).unwrap();
                }
                let got = product(isa, blocks, &q.data().unwrap(), out, inp, &vec(&x), rows);
                let candle = vec(&QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap());
                let exact = vec(&x.matmul(&dense.t().unwrap()).unwrap());
                assert_eq!(got.len(), out * rows);
                for (i, ((g, c), e)) in got.iter().zip(&candle).zip(&exact).enumerate() {
                    // The same integer products as candle's kernel, summed in another order.
                    assert!((g - c).abs() <= 1e-4 * c.abs().max(1.0), "{t:?} {isa:?} {out}x{inp}, {rows} rows: [{i}] {g} vs candle's {c}");
                    // And within 8-bit activations' error of the dequantized weights' product.
                    assert!((g - e).abs() <= 0.02 * (inp as f32).sqrt(), "{t:?} {isa:?} {out}x{inp}, {rows} rows: [{i}] {g} vs exact {e}");
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_result_alone_and_in_any_step() {
        if !available() {
            eprintln!("no AVX2: the kernel is not used on this CPU");
            return;
        }
        for (t, isa) in [GgmlDType::Q8_0, GgmlDType::Q4K].into_iter().flat_map(|t| isas().into_iter().map(move |i| (t, i))) {
            // 544 = 17 blocks of 32: the VNNI path's Q8_0 takes them in pairs and one alone.
            let (out, inp) = (40, if t == GgmlDType::Q8_0 { 544 } else { 512 });
            let (_, q) = weights(t, out, inp);
            let (w, blocks) = (q.data().unwrap(), Blocks::of(t).unwrap());
            let x = vec(&Tensor::randn(0f32, 1.0, (11, inp), &Device::Cpu).unwrap());
            let all = product(isa, blocks, &w, out, inp, &x, 11);
            for r in [0, 3, 7, 8, 10] {
                let alone = product(isa, blocks, &w, out, inp, &x[r * inp..(r + 1) * inp], 1);
                for o in 0..out {
                    assert_eq!(alone[o].to_bits(), all[r * out + o].to_bits(), "{t:?} {isa:?}: row {r}, output {o}");
                }
            }
        }
    }

    #[test]
    fn only_the_types_it_reads() {
        assert_eq!(Blocks::of(GgmlDType::Q8_0).is_some(), available());
        assert_eq!(Blocks::of(GgmlDType::Q4K).is_some(), available());
        for t in [GgmlDType::Q4_0, GgmlDType::Q6K, GgmlDType::F32, GgmlDType::F16] {
            assert_eq!(Blocks::of(t), None, "{t:?}");
        }
    }
}
