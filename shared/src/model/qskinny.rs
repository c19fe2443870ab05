//! The matmul of a step on quantized weights on a CPU: `y = x · Wᵀ` with `W` `(out, in)` in
//! llama.cpp's Q8_0 or Q4_K blocks and `x` `(rows, in)` in f32.
//!
//! As llama.cpp does, the rows of `x` are quantized to 8 bits in blocks as the weights' (32
//! for Q8_0, 256 for Q4_K, with the same rounding as candle's and llama.cpp's) and the dot
//! products are taken in integers. Unlike candle's CPU `QMatMul`, which takes a dot per row
//! of the step and weight row, each weight register is loaded (and for Q4_K unpacked) once
//! and multiplied into several rows of the step, so a step of 8 rows reads its weights once,
//! not 8 times. Output rows are split over the rayon pool, like the f32 kernel's; a row's
//! result depends only on its own inputs, not on the step it came in with.
//!
//! The weights are repacked at load ([`Weights`], `grouped.rs`) so that each 32-bit lane of a
//! register holds one block's products: a block's integer dot product is whole in its lane
//! after 8 loads of the step's bytes, and a register of blocks is scaled into f32 with one
//! conversion and one multiply-add a row of the step (ggml's layout, a block's 32 bytes in
//! one register, needs a conversion and multiply-add a block). Where the CPU has AVX-512 with VNNI,
//! `vpdpbusd` multiplies 64 byte pairs and adds them into 16 blocks' lanes; on AVX2 (with FMA
//! and F16C) `vpmaddubsw` and `vpmaddwd` do it for 8. Elsewhere, and for other block types,
//! the caller keeps candle's kernel.

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
/// values, for the weights' minimums; laid out as the weights' groups.
type Rows = grouped::Grouped;

/// A block's scale (as the weights' blocks keep it) and the factor its values are multiplied
/// by before rounding, from its largest magnitude `amax` and, for Q4_K, the value that has
/// it, with its sign (`max`).
#[inline(always)]
fn block_scale(blocks: Blocks, amax: f32, max: impl FnOnce() -> f32) -> (f32, f32) {
    match blocks {
        Blocks::Q8_0 => {
            let scale = amax / 127.0;
            (half::f16::from_f32(scale).to_f32(), if scale == 0.0 { 0.0 } else { 1.0 / scale })
        }
        Blocks::Q4K => {
            let max = max();
            if max == 0.0 {
                (0.0, 0.0)
            } else {
                let iscale = -127.0 / max;
                (1.0 / iscale, iscale)
            }
        }
    }
}

/// [`Rows`] value by value: what `rows.rs` computes 8 at a time on x86-64.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn quantize_rows(blocks: Blocks, inp: usize, x: &[f32]) -> Rows {
    let n = blocks.weights();
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / n];
    for ((xb, qb), d) in x.chunks_exact(n).zip(q.chunks_exact_mut(n)).zip(&mut d) {
        // The largest magnitude, over 8 lanes (a maximum in order is a chain of 32 or 256).
        let lanes = xb.chunks_exact(8).fold([0f32; 8], |m, c| std::array::from_fn(|i| m[i].max(c[i].abs())));
        let amax = lanes.into_iter().fold(0f32, f32::max);
        // The value of largest magnitude, with its sign (the first of equals).
        let (scale, id) = block_scale(blocks, amax, || xb.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0));
        *d = scale;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round().clamp(-128.0, 127.0) as i8;
        }
    }
    grouped::group_rows(blocks, inp, &q, &d)
}

/// The instructions this CPU's kernels run, found once.
fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(Isa::best)
}

/// A layer's weights `(out, inp)` as the kernels read them: packed into groups (ggml's bytes
/// rearranged; Q8_0 as many bytes unless a row's groups are odd, Q4_K 296 bytes for 288).
pub(crate) struct Weights {
    blocks: Blocks,
    out: usize,
    inp: usize,
    row_bytes: usize,
    bytes: Lines<u8>,
}

/// `len` plain values (bytes, f32s, i32s) on 64-byte cache lines of their own, the first
/// value at a line's start: the kernels' 64-byte loads, at multiples of 64 bytes into the
/// weights' rows and the step's, never straddle two lines. (A `vpdpbusd` reading a register
/// from memory ran at 0.51 cycles aligned and 1.15–1.39 cycles across two lines, on a Xeon
/// with AVX-512; a `Vec` of bytes or f32s is aligned to 16 bytes at best.)
pub(super) struct Lines<T> {
    lines: Vec<Line>,
    len: usize,
    values: std::marker::PhantomData<T>,
}

/// 64 bytes on a cache line of their own.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl<T: bytemuck::Pod> Lines<T> {
    /// `len` zeros.
    pub(super) fn zeroed(len: usize) -> Self {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        Lines { lines: vec![Line([0; 64]); lines], len, values: std::marker::PhantomData }
    }

    /// `f` of each of `values`.
    pub(super) fn mapped<U: Copy>(values: &[U], f: impl Fn(U) -> T) -> Self {
        let mut lines = Lines::zeroed(values.len());
        lines.iter_mut().zip(values).for_each(|(l, &v)| *l = f(v));
        lines
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Lines<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Lines<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

impl Weights {
    /// The `out` rows of `inp` weights that `ggml` holds in ggml's `blocks`.
    pub(crate) fn new(blocks: Blocks, out: usize, inp: usize, ggml: &[u8]) -> Weights {
        assert!(inp.is_multiple_of(blocks.weights()), "rows of {inp} weights are not whole {blocks:?} blocks");
        let ggml_row = inp / blocks.weights() * blocks.bytes();
        assert_eq!(ggml.len(), out * ggml_row, "weight bytes for {out}x{inp} {blocks:?}");
        let row_bytes = grouped::row_bytes(blocks, inp);
        let mut bytes = Lines::zeroed(out * row_bytes);
        for (row, ggml) in bytes.chunks_exact_mut(row_bytes).zip(ggml.chunks_exact(ggml_row)) {
            grouped::pack_row(blocks, inp, ggml, row);
        }
        Weights { blocks, out, inp, row_bytes, bytes }
    }

    /// The rows' bytes.
    fn rows(&self) -> &[u8] {
        &self.bytes
    }

    /// Output rows.
    pub(crate) fn out(&self) -> usize {
        self.out
    }

    /// Weights a row.
    pub(crate) fn inp(&self) -> usize {
        self.inp
    }

    /// Their block type.
    pub(crate) fn blocks(&self) -> Blocks {
        self.blocks
    }
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
        Input::on(isa(), blocks, inp, x, rows)
    }

    /// [`Input::new`] for `isa`'s kernels.
    fn on(isa: Isa, blocks: Blocks, inp: usize, x: &[f32], rows: usize) -> Input {
        assert!(available(), "the quantized kernel needs AVX2, FMA and F16C");
        assert!(inp.is_multiple_of(blocks.weights()), "rows of {inp} weights are not whole {blocks:?} blocks");
        assert_eq!(x.len(), rows * inp, "input for {rows}x{inp}");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked the CPU features.
        let xs = unsafe { rows::quantize(blocks, inp, x) };
        #[cfg(not(target_arch = "x86_64"))]
        let xs = quantize_rows(blocks, inp, x);
        Input { isa, blocks, inp, rows, xs }
    }

    /// Whether these rows are what `w` reads.
    pub(crate) fn fits(&self, w: &Weights) -> bool {
        self.blocks == w.blocks && self.inp == w.inp
    }
}

/// `y = x · Wᵀ` as `(rows, out)`: `input` is rows of `w`'s input (see [`Input::fits`]).
pub(crate) fn matmul(input: &Input, weights: &Weights) -> Vec<f32> {
    let Input { isa, blocks, inp, rows, ref xs } = *input;
    assert!(input.fits(weights), "{rows}x{inp} {blocks:?} rows against {}x{} {:?} weights", weights.out, weights.inp, weights.blocks);
    let (out, row_bytes, w) = (weights.out, weights.row_bytes, weights.rows());
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
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

mod grouped;

#[cfg(target_arch = "x86_64")]
mod rows;

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
        matmul(&Input::on(isa, blocks, inp, x, rows), &Weights::new(blocks, out, inp, w))
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
            // 544 = 17 blocks of 32: on the VNNI path a group of 16 and one padded with zeros;
            // 11 rows, a group of 8 and one of 3, against each row alone.
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
    fn the_rows_quantized_eight_at_a_time_are_the_values_one_at_a_time() {
        if !available() {
            eprintln!("no AVX2: the kernel is not used on this CPU");
            return;
        }
        for (blocks, inp) in [(Blocks::Q8_0, 544), (Blocks::Q8_0, 1024), (Blocks::Q4K, 768)] {
            let mut x = vec(&Tensor::randn(0f32, 3.0, (5, inp), &Device::Cpu).unwrap());
            // Row 1: its largest magnitude 127, so that the scale is 1 and these halves are
            // ties, rounded away from zero (Q4_K's largest is negative: its scale is then 1).
            let ties = [-127.0, 2.5, -3.5, 0.5, -0.5, 126.5, 1.4999999, -2.5000002];
            x[inp..inp + inp].fill(0.25);
            for b in 0..inp / 256 {
                x[inp + b * 256..][..ties.len()].copy_from_slice(&ties);
            }
            // Row 2 all zeros; row 3 a NaN and an infinity in its first blocks.
            x[2 * inp..3 * inp].fill(0.0);
            (x[3 * inp + 3], x[3 * inp + 40]) = (f32::NAN, f32::INFINITY);
            // SAFETY: `available` checked the CPU features.
            let (want, got) = (quantize_rows(blocks, inp, &x), unsafe { rows::quantize(blocks, inp, &x) });
            assert_eq!(got.values[..], want.values[..], "{blocks:?} {inp}: values");
            let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.scale), bits(&want.scale), "{blocks:?} {inp}: scales");
            assert_eq!((&got.start[..], bits(&got.sum)), (&want.start[..], bits(&want.sum)), "{blocks:?} {inp}: sums");
        }
        // The ties themselves: half away from zero (a block's values 4..8 are a register on).
        let mut x = vec![0f32; 32];
        x[..8].copy_from_slice(&[-127.0, 2.5, -3.5, 0.5, -0.5, 126.5, 1.4999999, -2.5000002]);
        // SAFETY: as above.
        let q = unsafe { rows::quantize(Blocks::Q8_0, 32, &x) };
        assert_eq!([&q.values[..4], &q.values[64..68]].concat(), [-127, 3, -4, 1, -1, 127, 1, -3]);
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
