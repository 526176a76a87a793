//! A prototype "skinny" `x @ W^T` for decode-sized batches (m = 1 .. a few rows).
//!
//! Why it exists: `autoglm_core::backend::cpu::matmul_nt` hands every product to the `gemm`
//! crate. For `m == 1` gemm 0.18 takes its `gemv` path (`gemm-common/src/gemm.rs`,
//! `mixed_gemv_rowmajor`), which ignores the `Parallelism` argument and runs on the calling thread
//! only, so at batch 1 a decode step streams the weights through one core. This module is the
//! alternative the benchmarks compare against: split the weight rows over the current rayon pool,
//! and for each block of four weight rows compute the dot products with every row of `x` (the
//! block stays in L1/L2 between rows of `x`, so the weights are read from memory once).
//!
//! The inner loop uses AVX2 + FMA when the CPU has them (checked at run time) and a portable
//! eight-accumulator loop otherwise. Results match `matmul_nt` up to f32 summation order.

use rayon::prelude::*;

/// Weight rows per block in the inner kernel (four dot products share each load of `x`).
const BLOCK: usize = 4;

/// `dst[m, n] (+)= lhs[m, k] @ rhs^T`, `rhs` being `[n, k]` row-major, with the same contract as
/// `autoglm_core::backend::cpu::matmul_nt` (`accumulate` adds to `dst`, e.g. to start from a bias).
///
/// The work is split over the weight rows on the current rayon pool. Meant for small `m`; for
/// large `m` a blocked GEMM (the `gemm` crate) is faster because it reuses each weight tile from
/// registers rather than from cache.
pub fn matmul_nt_skinny(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, n: usize, k: usize, accumulate: bool) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == n * k, "matmul_nt_skinny: bad sizes");
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // About eight tasks per thread for load balance, each a multiple of BLOCK rows and at least
    // 64 KiB of weights so the scheduling cost stays small next to the memory traffic.
    let min_rows = (16 * 1024 / k.max(1)).max(BLOCK);
    let rows_per_task = n.div_ceil(threads * 8).max(min_rows).div_ceil(BLOCK) * BLOCK;
    if m == 1 {
        // dst is one contiguous row: each task writes its own slice of it.
        dst.par_chunks_mut(rows_per_task).enumerate().for_each(|(t, out)| {
            let j0 = t * rows_per_task;
            rows_kernel(out, 1, lhs, &rhs[j0 * k..(j0 + out.len()) * k], k, accumulate, out.len());
        });
        return;
    }
    // m > 1: each task computes a [rows, m] transposed tile; the tiles are scattered afterwards
    // (m * n writes, small next to the n * k weight reads).
    let mut tmp = vec![0f32; n * m];
    tmp.par_chunks_mut(rows_per_task * m).enumerate().for_each(|(t, out)| {
        let j0 = t * rows_per_task;
        let rows = out.len() / m;
        rows_kernel(out, m, lhs, &rhs[j0 * k..(j0 + rows) * k], k, false, rows);
    });
    for (j, col) in tmp.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            let d = &mut dst[i * n + j];
            *d = if accumulate { *d + v } else { v };
        }
    }
}

/// For `rows` weight rows `w` (`[rows, k]`) and the `m` rows of `x`, writes
/// `out[r * m + i] (+)= x_i . w_r`.
fn rows_kernel(out: &mut [f32], m: usize, x: &[f32], w: &[f32], k: usize, accumulate: bool, rows: usize) {
    debug_assert!(out.len() == rows * m && w.len() == rows * k && x.len() == m * k);
    let mut r = 0;
    while r < rows {
        let nb = BLOCK.min(rows - r);
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; BLOCK];
            if nb == BLOCK {
                acc = dot4(xi, &w[r * k..(r + BLOCK) * k], k);
            } else {
                for (b, a) in acc.iter_mut().enumerate().take(nb) {
                    *a = dot_portable(xi, &w[(r + b) * k..(r + b + 1) * k]);
                }
            }
            for (b, &a) in acc.iter().enumerate().take(nb) {
                let o = &mut out[(r + b) * m + i];
                *o = if accumulate { *o + a } else { a };
            }
        }
        r += nb;
    }
}

/// Dot products of `x` with the four consecutive rows of `w`.
#[inline]
fn dot4(x: &[f32], w: &[f32], k: usize) -> [f32; 4] {
    debug_assert!(x.len() == k && w.len() == 4 * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); `x` has k elements and
            // `w` 4 * k elements (asserted in debug, guaranteed by the callers' slicing).
            return unsafe { avx2::dot4(x.as_ptr(), w.as_ptr(), k) };
        }
    }
    let mut out = [0f32; 4];
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
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Four dot products `x . w[b*k..(b+1)*k]`, two 8-wide FMA chains per row (eight in flight).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` must point to `k` readable f32 and `w` to `4 * k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4(x: *const f32, w: *const f32, k: usize) -> [f32; 4] {
        let (w0, w1, w2, w3) = (w, w.wrapping_add(k), w.wrapping_add(2 * k), w.wrapping_add(3 * k));
        let mut a = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        // SAFETY (whole loop): every offset read is below k for x and below k within each row of w,
        // as the loop bounds check; the caller guarantees those ranges are readable.
        unsafe {
            while i + 16 <= k {
                let x0 = _mm256_loadu_ps(x.add(i));
                let x1 = _mm256_loadu_ps(x.add(i + 8));
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(i)), x0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w1.add(i)), x0, a[1]);
                a[2] = _mm256_fmadd_ps(_mm256_loadu_ps(w2.add(i)), x0, a[2]);
                a[3] = _mm256_fmadd_ps(_mm256_loadu_ps(w3.add(i)), x0, a[3]);
                a[4] = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(i + 8)), x1, a[4]);
                a[5] = _mm256_fmadd_ps(_mm256_loadu_ps(w1.add(i + 8)), x1, a[5]);
                a[6] = _mm256_fmadd_ps(_mm256_loadu_ps(w2.add(i + 8)), x1, a[6]);
                a[7] = _mm256_fmadd_ps(_mm256_loadu_ps(w3.add(i + 8)), x1, a[7]);
                i += 16;
            }
            if i + 8 <= k {
                let x0 = _mm256_loadu_ps(x.add(i));
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(i)), x0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w1.add(i)), x0, a[1]);
                a[2] = _mm256_fmadd_ps(_mm256_loadu_ps(w2.add(i)), x0, a[2]);
                a[3] = _mm256_fmadd_ps(_mm256_loadu_ps(w3.add(i)), x0, a[3]);
                i += 8;
            }
            let mut out = [
                hsum(_mm256_add_ps(a[0], a[4])),
                hsum(_mm256_add_ps(a[1], a[5])),
                hsum(_mm256_add_ps(a[2], a[6])),
                hsum(_mm256_add_ps(a[3], a[7])),
            ];
            while i < k {
                let xv = *x.add(i);
                out[0] += *w0.add(i) * xv;
                out[1] += *w1.add(i) * xv;
                out[2] += *w2.add(i) * xv;
                out[3] += *w3.add(i) * xv;
                i += 1;
            }
            out
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
                out[i * n + j] = (0..k).map(|p| lhs[i * k + p] as f64 * rhs[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5).collect()
    }

    #[test]
    fn matches_reference_and_matmul_nt() {
        for &(m, n, k) in &[(1, 1, 1), (1, 7, 13), (1, 64, 1024), (3, 37, 100), (8, 130, 259), (32, 64, 96), (1, 1000, 24)] {
            let (lhs, rhs) = (data(m * k, 1), data(n * k, 2));
            let want = reference(&lhs, &rhs, m, n, k);
            let mut got = vec![0f32; m * n];
            matmul_nt_skinny(&mut got, &lhs, &rhs, m, n, k, false);
            let mut via_gemm = vec![0f32; m * n];
            autoglm_core::backend::cpu::matmul_nt(&mut via_gemm, &lhs, &rhs, m, n, k, false);
            for ((g, w), r) in got.iter().zip(&want).zip(&via_gemm) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{n}x{k}: {g} vs {w}");
                assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "{m}x{n}x{k}: {g} vs gemm {r}");
            }
            // accumulate adds to what is there
            let mut acc = vec![1f32; m * n];
            matmul_nt_skinny(&mut acc, &lhs, &rhs, m, n, k, true);
            for (a, w) in acc.iter().zip(&want) {
                assert!((a - (w + 1.0)).abs() <= 1e-4 * (2.0 + w.abs()));
            }
        }
    }
}
