//! The matmul of a decode step on a CPU: the few rows of a step through a linear layer,
//! `y = x · Wᵀ` with `x` `(rows, in)` and `W` `(out, in)` row-major, for up to [`MAX_ROWS`] rows.
//!
//! A decode step reads every weight of the stage, and that read is its cost: each weight is
//! brought in from memory once and multiplied into every row of the step while it is in
//! cache — a block of four weight rows stays in L1 while the step's rows pass over it two at a
//! time with eight accumulators in registers (four at a time with sixteen on AVX-512, which has
//! 32 registers). Explicit SIMD (AVX2/FMA or AVX-512 where the CPU has it, chosen at run time by
//! `pulp`, which gemm uses too). Measured on a 2-core AVX2 machine, a
//! Qwen3-0.6B-shaped stage on one core: 8 rows in 190 ms through gemm, ~50 ms this way.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// Most rows this kernel takes; larger steps (prefills) go to gemm, which blocks for them.
pub(crate) const MAX_ROWS: usize = 32;

/// Weight rows in flight together (their `in`-long rows stay in L1).
const R: usize = 4;

/// `y = x · Wᵀ` as `(rows, out)`: `w` is `(out, inp)`, `x` is `(rows, inp)`, both row-major.
pub(crate) fn matmul(w: &[f32], out: usize, inp: usize, x: &[f32], rows: usize) -> Vec<f32> {
    debug_assert_eq!(w.len(), out * inp);
    debug_assert_eq!(x.len(), rows * inp);
    let mut y = vec![0f32; out * rows];
    if rows == 0 || out == 0 {
        return y;
    }
    // A task per block of output rows: enough blocks for every thread, each big enough that a
    // task's overhead is small beside its weights.
    let threads = rayon::current_num_threads().max(1);
    let block = (out.div_ceil(threads * 8)).next_multiple_of(R).max(R * 4);
    column_tiles(&mut y, out, block).into_par_iter().enumerate().for_each(|(b, mut yb)| {
        let first = b * block;
        let n = yb[0].len();
        let wb = &w[first * inp..(first + n) * inp];
        Arch::new().dispatch(Block { w: wb, inp, x, y: &mut yb });
    });
    y
}

/// `y` `(rows, out)` row-major cut into the tasks' tiles: tile `b` holds, for each row, its
/// columns `b * block..(b + 1) * block` (fewer in the last). Each task writes its outputs in
/// place, so the product needs no transposing after. (Written `(out, rows)` and transposed,
/// candle's element-by-element strided copy took a tenth of a decode step of 8 rows, and a
/// transpose by hand on one thread a twentieth, the other core idle meanwhile.)
pub(crate) fn column_tiles(y: &mut [f32], out: usize, block: usize) -> Vec<Vec<&mut [f32]>> {
    debug_assert!(out > 0 && block > 0 && y.len().is_multiple_of(out));
    let mut tiles: Vec<Vec<&mut [f32]>> = (0..out.div_ceil(block)).map(|_| Vec::new()).collect();
    for row in y.chunks_mut(out) {
        for (tile, cols) in tiles.iter_mut().zip(row.chunks_mut(block)) {
            tile.push(cols);
        }
    }
    tiles
}

/// One task: its columns of `y` (a slice of `n` a step row) from the weight rows `w` `(n, inp)`.
struct Block<'a, 'y> {
    w: &'a [f32],
    inp: usize,
    x: &'a [f32],
    y: &'a mut [&'y mut [f32]],
}

impl WithSimd for Block<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Block { w, inp, x, y } = self;
        let (n, rows) = (w.len() / inp, y.len());
        // Step rows a pass over a weight block takes: 4 where there are 32 vector registers
        // (AVX-512: 16 accumulators), 2 where there are 16 (AVX2: 8).
        let wide = std::mem::size_of::<S::f32s>() >= 64;
        let mut o = 0;
        while o + R <= n {
            let ws: [&[f32]; R] = std::array::from_fn(|r| &w[(o + r) * inp..(o + r + 1) * inp]);
            let mut t = 0;
            if wide {
                while t + 4 <= rows {
                    t = pass::<S, 4>(simd, ws, x, inp, t, o, y);
                }
            }
            while t + 2 <= rows {
                t = pass::<S, 2>(simd, ws, x, inp, t, o, y);
            }
            if t < rows {
                pass::<S, 1>(simd, ws, x, inp, t, o, y);
            }
            o += R;
        }
        for o in o..n {
            let wr = &w[o * inp..(o + 1) * inp];
            for (t, yt) in y.iter_mut().enumerate() {
                yt[o] = dots::<S, 1, 1>(simd, [wr], [&x[t * inp..(t + 1) * inp]])[0][0];
            }
        }
    }
}

/// The step's rows `t..t + X` against the weight rows `ws` (output rows `o..o + R`), into `y`;
/// the next row to take.
#[inline(always)]
fn pass<S: Simd, const X: usize>(simd: S, ws: [&[f32]; R], x: &[f32], inp: usize, t: usize, o: usize, y: &mut [&mut [f32]]) -> usize {
    debug_assert!(t + X <= y.len());
    let xs: [&[f32]; X] = std::array::from_fn(|c| &x[(t + c) * inp..(t + c + 1) * inp]);
    let sums = dots::<S, R, X>(simd, ws, xs);
    for (r, sums) in sums.iter().enumerate() {
        for (c, s) in sums.iter().enumerate() {
            y[t + c][o + r] = *s;
        }
    }
    t + X
}

/// Every dot product of the weight rows `ws` with the step rows `xs`, `[weight row][step row]`.
#[inline(always)]
fn dots<S: Simd, const W: usize, const X: usize>(simd: S, ws: [&[f32]; W], xs: [&[f32]; X]) -> [[f32; X]; W] {
    let wv: [(&[S::f32s], &[f32]); W] = ws.map(S::as_simd_f32s);
    let xv: [(&[S::f32s], &[f32]); X] = xs.map(S::as_simd_f32s);
    let len = wv[0].0.len();
    // Every row as long as the first, so the loop below indexes without bounds checks.
    let wh: [&[S::f32s]; W] = wv.map(|(h, _)| &h[..len]);
    let xh: [&[S::f32s]; X] = xv.map(|(h, _)| &h[..len]);
    let mut acc = [[simd.splat_f32s(0.0); X]; W];
    for i in 0..len {
        let xi: [S::f32s; X] = std::array::from_fn(|c| xh[c][i]);
        for r in 0..W {
            let wi = wh[r][i];
            for c in 0..X {
                acc[r][c] = simd.mul_add_f32s(wi, xi[c], acc[r][c]);
            }
        }
    }
    let mut out = [[0f32; X]; W];
    for r in 0..W {
        for c in 0..X {
            let tail: f32 = wv[r].1.iter().zip(xv[c].1).map(|(a, b)| a * b).sum();
            out[r][c] = simd.reduce_sum_f32s(acc[r][c]) + tail;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_tiles_cut_every_row_alike() {
        let (rows, out, block) = (3, 10, 4);
        let mut y: Vec<f32> = (0..rows * out).map(|i| i as f32).collect();
        let tiles = column_tiles(&mut y, out, block);
        assert_eq!(tiles.len(), 3);
        for (b, tile) in tiles.iter().enumerate() {
            assert_eq!(tile.len(), rows);
            for (t, cols) in tile.iter().enumerate() {
                let want: Vec<f32> = (b * block..((b + 1) * block).min(out)).map(|o| (t * out + o) as f32).collect();
                assert_eq!(cols.to_vec(), want, "tile {b}, row {t}");
            }
        }
    }

    #[test]
    fn equals_the_plain_product_for_every_shape_edge() {
        // Output rows not a multiple of 4, odd step rows, an input not a multiple of 8.
        for (out, inp, rows) in [(13, 37, 3), (64, 128, 8), (5, 8, 1), (130, 1000, 7), (4, 3, 2), (300, 64, 9), (3, 8, 0)] {
            let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
            let got = matmul(&w, out, inp, &x, rows);
            assert_eq!(got.len(), out * rows);
            for o in 0..out {
                for t in 0..rows {
                    let want: f32 = (0..inp).map(|i| w[o * inp + i] * x[t * inp + i]).sum();
                    let g = got[t * out + o];
                    assert!((g - want).abs() <= 1e-3 * want.abs().max(1.0), "{out}x{inp}, {rows} rows: [{o}][{t}] {g} vs {want}");
                }
            }
        }
    }
}
