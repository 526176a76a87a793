//! The "skinny" `x @ W^T` for decode-sized batches (m = 1 .. 8 rows), used by [`super::matmul_nt`].
//!
//! Decode products are memory-bound: every weight must stream from memory once per step, and the
//! work is a handful of dot products per weight row. The `gemm` crate serves them poorly: at
//! `m == 1` its gemv path runs on the calling thread only, and at `m` of a few rows its blocked
//! kernel (tuned for large products) is several times slower than the weight stream allows
//! (`docs/BENCHMARKS.md`, "decode GEMMs"). So the weight rows are split over the current rayon
//! pool; for each block of `R` weight rows (`R` memory streams in flight) the kernel computes the
//! dot products with every row of `x`, two rows of `x` at a time when `m > 1` (the block stays in
//! L1/L2 between rows of `x`, so the weights are read from memory once).
//!
//! The inner loop uses AVX2 + FMA when the CPU has them (checked at run time) and a portable
//! eight-accumulator loop otherwise. Results match the gemm path up to f32 summation order.

use rayon::prelude::*;

/// Tuning knobs of [`matmul_nt_skinny_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyParams {
    /// Weight rows per block of the inner kernel: 1, 2, 4 or 8 (each row is one memory stream; the
    /// dot products of a block share each load of `x`).
    pub rows_per_block: usize,
    /// Rayon tasks per thread (load balance against scheduling cost).
    pub tasks_per_thread: usize,
}

impl SkinnyParams {
    /// The defaults by batch rows: eight rows per block at `m == 1` (eight memory streams per
    /// thread), four at `m > 1` (where the kernel pairs rows of `x`, 4 x 2 accumulators).
    pub fn for_rows(m: usize) -> Self {
        SkinnyParams {
            rows_per_block: if m == 1 { 8 } else { 4 },
            tasks_per_thread: 4,
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs^T`, `rhs` being `[n, k]` row-major, with the same contract as
/// [`super::matmul_nt`] (`accumulate` adds to `dst`, e.g. to start from a bias).
///
/// The work is split over the weight rows on the current rayon pool. Meant for small `m`; for
/// large `m` a blocked GEMM (the `gemm` crate) is faster because it reuses each weight tile from
/// registers rather than from cache.
pub fn matmul_nt_skinny(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    matmul_nt_skinny_with(
        SkinnyParams::for_rows(m),
        dst,
        lhs,
        rhs,
        m,
        n,
        k,
        accumulate,
    );
}

/// [`matmul_nt_skinny`] with explicit tuning.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_skinny_with(
    p: SkinnyParams,
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    assert!(
        dst.len() == m * n && lhs.len() == m * k && rhs.len() == n * k,
        "matmul_nt_skinny: bad sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let block = match p.rows_per_block {
        1 | 2 | 4 | 8 => p.rows_per_block,
        _ => 8,
    };
    let threads = rayon::current_num_threads();
    // Tasks of a multiple of `block` rows and at least 64 KiB of weights, so the scheduling cost
    // stays small next to the memory traffic.
    let min_rows = (16 * 1024 / k.max(1)).max(block);
    let rows_per_task = n
        .div_ceil(threads * p.tasks_per_thread.max(1))
        .max(min_rows)
        .div_ceil(block)
        * block;
    if m == 1 {
        // dst is one contiguous row: each task writes its own slice of it.
        dst.par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(t, out)| {
                let j0 = t * rows_per_task;
                let w = &rhs[j0 * k..(j0 + out.len()) * k];
                rows_kernel(block, out, 1, lhs, w, k, accumulate);
            });
        return;
    }
    // m > 1: each task computes a [rows, m] transposed tile; the tiles are scattered afterwards
    // (m * n writes, small next to the n * k weight reads).
    let mut tmp = vec![0f32; n * m];
    tmp.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let j0 = t * rows_per_task;
            let w = &rhs[j0 * k..(j0 + out.len() / m) * k];
            rows_kernel(block, out, m, lhs, w, k, false);
        });
    for (j, col) in tmp.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            let d = &mut dst[i * n + j];
            *d = if accumulate { *d + v } else { v };
        }
    }
}

/// For the weight rows `w` (`[rows, k]`) and the `m` rows of `x`: `out[r * m + i] (+)= x_i . w_r`
/// (for `m == 1`, `out[r]`), `block` (1, 2, 4 or 8) weight rows at a time.
pub(super) fn rows_kernel(
    block: usize,
    out: &mut [f32],
    m: usize,
    x: &[f32],
    w: &[f32],
    k: usize,
    acc: bool,
) {
    match block {
        1 => rows_kernel_r::<1>(out, m, x, w, k, acc),
        2 => rows_kernel_r::<2>(out, m, x, w, k, acc),
        4 => rows_kernel_r::<4>(out, m, x, w, k, acc),
        _ => rows_kernel_r::<8>(out, m, x, w, k, acc),
    }
}

/// For the weight rows `w` (`[rows, k]`) and the `m` rows of `x`, writes
/// `out[r * m + i] (+)= x_i . w_r`, `R` weight rows at a time.
fn rows_kernel_r<const R: usize>(
    out: &mut [f32],
    m: usize,
    x: &[f32],
    w: &[f32],
    k: usize,
    accumulate: bool,
) {
    let rows = w.len() / k;
    debug_assert!(out.len() == rows * m && w.len() == rows * k && x.len() == m * k);
    let mut r = 0;
    while r < rows {
        let nb = R.min(rows - r);
        let mut i = 0;
        while i < m {
            let xi = &x[i * k..(i + 1) * k];
            // Two rows of x per pass when there are two left: each weight load feeds two FMAs,
            // halving the re-reads of the block from cache.
            if nb == R && i + 1 < m && R <= 4 {
                let xj = &x[(i + 1) * k..(i + 2) * k];
                let (a0, a1) = dot_rows_x2::<R>(xi, xj, &w[r * k..(r + R) * k], k);
                for b in 0..R {
                    let o = &mut out[(r + b) * m + i];
                    *o = if accumulate { *o + a0[b] } else { a0[b] };
                    let o = &mut out[(r + b) * m + i + 1];
                    *o = if accumulate { *o + a1[b] } else { a1[b] };
                }
                i += 2;
                continue;
            }
            let mut acc = [0f32; R];
            if nb == R {
                acc = dot_rows::<R>(xi, &w[r * k..(r + R) * k], k);
            } else {
                for (b, a) in acc.iter_mut().enumerate().take(nb) {
                    *a = dot_portable(xi, &w[(r + b) * k..(r + b + 1) * k]);
                }
            }
            for (b, &a) in acc.iter().enumerate().take(nb) {
                let o = &mut out[(r + b) * m + i];
                *o = if accumulate { *o + a } else { a };
            }
            i += 1;
        }
        r += nb;
    }
}

/// Dot products of `x0` and of `x1` with the `R` consecutive rows of `w`.
#[inline]
fn dot_rows_x2<const R: usize>(
    x0: &[f32],
    x1: &[f32],
    w: &[f32],
    k: usize,
) -> ([f32; R], [f32; R]) {
    assert!(x0.len() == k && x1.len() == k && w.len() == R * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); `x0` and `x1` have k
            // elements and `w` R * k elements (asserted above).
            return unsafe { avx2::dot_rows_x2::<R>(x0.as_ptr(), x1.as_ptr(), w.as_ptr(), k) };
        }
    }
    let (mut a, mut b) = ([0f32; R], [0f32; R]);
    for r in 0..R {
        a[r] = dot_portable(x0, &w[r * k..(r + 1) * k]);
        b[r] = dot_portable(x1, &w[r * k..(r + 1) * k]);
    }
    (a, b)
}

/// Dot products of `x` with the `R` consecutive rows of `w`.
#[inline]
fn dot_rows<const R: usize>(x: &[f32], w: &[f32], k: usize) -> [f32; R] {
    assert!(x.len() == k && w.len() == R * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); `x` has k elements and
            // `w` R * k elements (asserted above).
            return unsafe { avx2::dot_rows::<R>(x.as_ptr(), w.as_ptr(), k) };
        }
    }
    let mut out = [0f32; R];
    for (b, o) in out.iter_mut().enumerate() {
        *o = dot_portable(x, &w[b * k..(b + 1) * k]);
    }
    out
}

/// Dot product with eight independent accumulators (vectorised by the compiler at the baseline ISA).
#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over the accumulator arrays read best here
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::backend::cpu) fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `R` dot products `x . w[b*k..(b+1)*k]`. With `R <= 4` the loop is unrolled twice so at
    /// least eight FMA chains are in flight; with `R == 8` the eight rows give them.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` must point to `k` readable f32 and `w` to `R * k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows<const R: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
    ) -> [f32; R] {
        let mut a = [_mm256_setzero_ps(); R];
        let mut b = [_mm256_setzero_ps(); R];
        let mut i = 0;
        // SAFETY: (whole block) every offset read is below k for x and below k within each of the
        // R rows of w, as the loop bounds check; the caller guarantees those ranges are readable.
        unsafe {
            if R <= 4 {
                while i + 16 <= k {
                    let x0 = _mm256_loadu_ps(x.add(i));
                    let x1 = _mm256_loadu_ps(x.add(i + 8));
                    for r in 0..R {
                        let row = w.add(r * k + i);
                        a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row), x0, a[r]);
                        b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8)), x1, b[r]);
                    }
                    i += 16;
                }
            }
            while i + 8 <= k {
                let x0 = _mm256_loadu_ps(x.add(i));
                for r in 0..R {
                    a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(r * k + i)), x0, a[r]);
                }
                i += 8;
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(a[r], b[r]));
            }
            while i < k {
                let xv = *x.add(i);
                for (r, o) in out.iter_mut().enumerate() {
                    *o += *w.add(r * k + i) * xv;
                }
                i += 1;
            }
            out
        }
    }
    /// `R` dot products with each of `x0` and `x1`: each weight vector loaded once feeds two FMA
    /// chains (`2 * R` accumulators; meant for `R <= 4`).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x0`, `x1` must point to `k` readable f32 and `w` to `R * k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_x2<const R: usize>(
        x0: *const f32,
        x1: *const f32,
        w: *const f32,
        k: usize,
    ) -> ([f32; R], [f32; R]) {
        let mut a = [_mm256_setzero_ps(); R];
        let mut b = [_mm256_setzero_ps(); R];
        let mut i = 0;
        // SAFETY: (whole block) offsets stay below k in x0, x1 and each of the R rows of w.
        unsafe {
            while i + 8 <= k {
                let (u, v) = (_mm256_loadu_ps(x0.add(i)), _mm256_loadu_ps(x1.add(i)));
                for r in 0..R {
                    let wv = _mm256_loadu_ps(w.add(r * k + i));
                    a[r] = _mm256_fmadd_ps(wv, u, a[r]);
                    b[r] = _mm256_fmadd_ps(wv, v, b[r]);
                }
                i += 8;
            }
            let (mut oa, mut ob) = ([0f32; R], [0f32; R]);
            for r in 0..R {
                oa[r] = hsum(a[r]);
                ob[r] = hsum(b[r]);
            }
            while i < k {
                let (u, v) = (*x0.add(i), *x1.add(i));
                for r in 0..R {
                    let wv = *w.add(r * k + i);
                    oa[r] += wv * u;
                    ob[r] += wv * v;
                }
                i += 1;
            }
            (oa, ob)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(lhs: &[f32], rhs: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| lhs[i * k + p] as f64 * rhs[j * k + p] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    #[test]
    fn matches_reference_and_matmul_nt() {
        let shapes = [
            (1, 1, 1),
            (1, 7, 13),
            (1, 64, 1024),
            (3, 37, 100),
            (8, 130, 259),
            (32, 64, 96),
            (1, 1000, 24),
            (2, 333, 40),
        ];
        for rows_per_block in [1, 2, 4, 8] {
            for tasks_per_thread in [1, 4] {
                let p = SkinnyParams {
                    rows_per_block,
                    tasks_per_thread,
                };
                for &(m, n, k) in &shapes {
                    let (lhs, rhs) = (data(m * k, 1), data(n * k, 2));
                    let want = reference(&lhs, &rhs, m, n, k);
                    let mut got = vec![0f32; m * n];
                    matmul_nt_skinny_with(p, &mut got, &lhs, &rhs, m, n, k, false);
                    let mut via_gemm = vec![0f32; m * n];
                    super::super::matmul_nt_gemm(&mut via_gemm, &lhs, &rhs, m, n, k, false);
                    for ((g, w), r) in got.iter().zip(&want).zip(&via_gemm) {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{p:?} {m}x{n}x{k}: {g} vs {w}"
                        );
                        assert!(
                            (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                            "{p:?} {m}x{n}x{k}: {g} vs gemm {r}"
                        );
                    }
                    // accumulate adds to what is there
                    let mut acc = vec![1f32; m * n];
                    matmul_nt_skinny_with(p, &mut acc, &lhs, &rhs, m, n, k, true);
                    for (a, w) in acc.iter().zip(&want) {
                        assert!((a - (w + 1.0)).abs() <= 1e-4 * (2.0 + w.abs()));
                    }
                }
            }
        }
    }
}
