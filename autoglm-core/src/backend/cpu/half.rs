//! Matrices kept in the checkpoint's 16-bit format (bf16 or f16) on the CPU: `x @ W^T` and row
//! gathers widen the weight rows on the fly, block by block, into a per-thread f32 buffer that
//! stays in cache, and run the f32 kernels on it. Widening is exact, so results equal those of
//! the f32 path on the widened weights up to f32 summation order (the numerics contract holds),
//! while each weight byte read from memory is half of what a widened copy costs: decode, which
//! streams every weight once per step, reads half the bytes, and a bf16 checkpoint is mapped, not
//! converted, at load (half the resident memory of widening it).
//!
//! Widening runs AVX2 (+F16C for f16) code when the CPU has it (checked at run time), a portable
//! loop otherwise. (AVX-512 intrinsics and target features need Rust 1.89; the workspace's MSRV is
//! 1.85, and a widening pass that streams from memory gains little from the wider vectors.)

use std::cell::RefCell;

use rayon::prelude::*;

use super::{gemm_call, gemv, SKINNY_ROWS};
use crate::model::{HalfData, HalfKind};

/// A matrix `[rows, cols]` as 16-bit parts stacked along the rows (each part a view of the mapped
/// checkpoint, or owned), e.g. q, k and v of one layer.
pub struct HalfWeight {
    pub(super) kind: HalfKind,
    parts: Vec<(usize, HalfData)>,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl HalfWeight {
    /// Parts of `cols` columns and the given row counts, in order.
    pub(super) fn new(kind: HalfKind, cols: usize, parts: Vec<(usize, HalfData)>) -> Self {
        let rows = parts.iter().map(|p| p.0).sum();
        debug_assert!(parts.iter().all(|(r, d)| r * cols == d.len()));
        HalfWeight {
            kind,
            parts,
            rows,
            cols,
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        2 * self.rows * self.cols
    }

    /// Row `r`'s `cols` elements.
    fn row(&self, r: usize) -> &[u16] {
        let mut base = 0;
        for (rows, data) in &self.parts {
            if r < base + rows {
                return &data[(r - base) * self.cols..(r - base + 1) * self.cols];
            }
            base += rows;
        }
        panic!("row {r} of a {}-row weight", self.rows)
    }

    /// Widens rows `r0 .. r0 + n` into `dst` (`n * cols` values).
    pub(super) fn widen_rows(&self, r0: usize, n: usize, dst: &mut [f32]) {
        let (c, end) = (self.cols, r0 + n);
        assert!(
            dst.len() == n * c && end <= self.rows,
            "widen_rows: bad range"
        );
        let mut base = 0;
        for (rows, data) in &self.parts {
            let (lo, hi) = (r0.max(base), end.min(base + rows));
            if lo < hi {
                widen(
                    self.kind,
                    &data[(lo - base) * c..(hi - base) * c],
                    &mut dst[(lo - r0) * c..(hi - r0) * c],
                );
            }
            base += rows;
        }
    }
}

thread_local! {
    /// Per-thread staging for widened weight rows.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on rows `r0 .. r0 + n` of `w` widened to f32 (a per-thread buffer, reused).
fn with_wide<T>(w: &HalfWeight, r0: usize, n: usize, f: impl FnOnce(&[f32]) -> T) -> T {
    WIDE.with(|buf| {
        let mut buf = buf.borrow_mut();
        let len = n * w.cols;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        w.widen_rows(r0, n, &mut buf[..len]);
        f(&buf[..len])
    })
}

/// Widened rows handled at once by a decode task: 16K values (64 KiB of f32), so the staging
/// buffer stays in L2 between the widening and the dot products.
const DECODE_SUB_ELEMS: usize = 16 * 1024;
/// Widened rows per prefill chunk: 4M values (16 MiB of f32). Each chunk is one parallel GEMM, so
/// `x` is packed once per chunk; the buffer is reused.
const PREFILL_CHUNK_ELEMS: usize = 4 << 20;

/// `dst[m, n] (+)= x[m, k] @ w^T`, as [`super::matmul_nt`] for a 16-bit weight.
pub fn matmul_nt_half(dst: &mut [f32], x: &[f32], w: &HalfWeight, m: usize, accumulate: bool) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        dst.len() == m * n && x.len() == m * k,
        "matmul_nt_half: bad sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if m <= SKINNY_ROWS {
        // Decode: tasks of whole 8-row blocks, a few per thread; inside each, sub-blocks of about
        // 64 KiB of widened weights (in L2) go through the f32 skinny kernel.
        let block = if m == 1 { 8 } else { 4 };
        let rows_per_task = n.div_ceil(threads * 4).max(block).div_ceil(block) * block;
        let sub = (DECODE_SUB_ELEMS / k.max(1)).max(1).div_ceil(block) * block;
        let run = |t: usize, out: &mut [f32], acc: bool| {
            let rows = out.len() / m;
            let mut r = 0;
            while r < rows {
                let nr = sub.min(rows - r);
                with_wide(w, t * rows_per_task + r, nr, |wr| {
                    gemv::rows_kernel(block, &mut out[r * m..(r + nr) * m], m, x, wr, k, acc)
                });
                r += nr;
            }
        };
        if m == 1 {
            #[cfg(target_arch = "x86_64")]
            if let Some(dot8) = x86::fused_dot8(w.kind) {
                // Batch 1: the weight rows widen in registers inside the dot products (no staging
                // buffer), eight rows at a time.
                dst.par_chunks_mut(rows_per_task)
                    .enumerate()
                    .for_each(|(t, out)| {
                        let g0 = t * rows_per_task;
                        for (b, o) in out.chunks_mut(8).enumerate() {
                            let r0 = g0 + 8 * b;
                            if o.len() == 8 {
                                let rows: [&[u16]; 8] = std::array::from_fn(|j| w.row(r0 + j));
                                // SAFETY: fused_dot8 returned this kernel only when the CPU has
                                // the features it needs; x and every row hold k elements.
                                let d = unsafe { dot8(x, &rows) };
                                for (o, d) in o.iter_mut().zip(d) {
                                    *o = if accumulate { *o + d } else { d };
                                }
                            } else {
                                with_wide(w, r0, o.len(), |wr| {
                                    gemv::rows_kernel(1, o, 1, x, wr, k, accumulate)
                                });
                            }
                        }
                    });
                return;
            }
            dst.par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each(|(t, out)| run(t, out, accumulate));
            return;
        }
        let mut tmp = vec![0f32; n * m];
        tmp.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(t, out)| run(t, out, false));
        scatter_transposed(dst, &tmp, m, n, accumulate);
        return;
    }
    // Prefill: chunks of weight rows widened (in parallel) into one buffer, then one parallel
    // GEMM per chunk writing its columns of dst in place: dst[:, j0..j0 + rows] (+)= x @ chunk^T.
    let chunk = (PREFILL_CHUNK_ELEMS / k.max(1)).max(16).min(n);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut wide = vec![0f32; chunk * k];
    let mut j0 = 0;
    while j0 < n {
        let rows = chunk.min(n - j0);
        let buf = &mut wide[..rows * k];
        buf.par_chunks_mut(8 * k).enumerate().for_each(|(i, b)| {
            w.widen_rows(j0 + 8 * i, b.len() / k, b);
        });
        gemm_call(&mut dst[j0..], n, x, buf, (m, rows, k), accumulate, par);
        j0 += rows;
    }
}

/// `dst[i * n + j] (+)= tmp[j * m + i]`.
fn scatter_transposed(dst: &mut [f32], tmp: &[f32], m: usize, n: usize, accumulate: bool) {
    dst.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, d) in row.iter_mut().enumerate() {
            let v = tmp[j * m + i];
            *d = if accumulate { *d + v } else { v };
        }
    });
}

/// `dst[i] = src[i]` widened to f32.
pub fn widen(kind: HalfKind, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match kind {
            HalfKind::Bf16 if has!("avx2") => {
                // SAFETY: the CPU has AVX2 (checked); equal lengths (asserted).
                return unsafe { x86::widen_bf16_avx2(src, dst) };
            }
            HalfKind::F16 if has!("avx2") && has!("f16c") => {
                // SAFETY: the CPU has AVX2 and F16C (checked).
                return unsafe { x86::widen_f16_f16c(src, dst) };
            }
            _ => {}
        }
    }
    widen_portable(kind, src, dst)
}

fn widen_portable(kind: HalfKind, src: &[u16], dst: &mut [f32]) {
    match kind {
        HalfKind::Bf16 => {
            for (d, &b) in dst.iter_mut().zip(src) {
                *d = f32::from_bits((b as u32) << 16);
            }
        }
        HalfKind::F16 => {
            for (d, &b) in dst.iter_mut().zip(src) {
                *d = half::f16::from_bits(b).to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over the accumulator arrays read best here
mod x86 {
    use std::arch::x86_64::*;

    use super::super::gemv::avx2::hsum;
    use crate::model::HalfKind;

    /// Eight dot products `x . row_j` with 16-bit rows widened in registers.
    pub(super) type Dot8 = unsafe fn(&[f32], &[&[u16]; 8]) -> [f32; 8];

    /// The fused batch-1 kernel for `kind` when this CPU has what it needs.
    pub(super) fn fused_dot8(kind: HalfKind) -> Option<Dot8> {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma")) {
            return None;
        }
        match kind {
            HalfKind::Bf16 => Some(dot8_bf16),
            HalfKind::F16 if has!("f16c") => Some(dot8_f16),
            HalfKind::F16 => None,
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; every row must have `x.len()` elements.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot8_bf16(x: &[f32], rows: &[&[u16]; 8]) -> [f32; 8] {
        let k = x.len();
        assert!(rows.iter().all(|r| r.len() == k), "dot8_bf16: row lengths");
        let mut a = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        // SAFETY: (whole block) i + 8 <= k bounds every load of x and of each row.
        unsafe {
            while i + 8 <= k {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                for r in 0..8 {
                    let h = _mm_loadu_si128(rows[r].as_ptr().add(i) as *const __m128i);
                    let w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                    a[r] = _mm256_fmadd_ps(w, xv, a[r]);
                }
                i += 8;
            }
        }
        let mut out = [0f32; 8];
        for r in 0..8 {
            out[r] = hsum(a[r]);
            for j in i..k {
                out[r] += f32::from_bits((rows[r][j] as u32) << 16) * x[j];
            }
        }
        out
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; every row must have `x.len()` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8_f16(x: &[f32], rows: &[&[u16]; 8]) -> [f32; 8] {
        let k = x.len();
        assert!(rows.iter().all(|r| r.len() == k), "dot8_f16: row lengths");
        let mut a = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        // SAFETY: (whole block) i + 8 <= k bounds every load of x and of each row.
        unsafe {
            while i + 8 <= k {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                for r in 0..8 {
                    let h = _mm_loadu_si128(rows[r].as_ptr().add(i) as *const __m128i);
                    a[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(h), xv, a[r]);
                }
                i += 8;
            }
        }
        let mut out = [0f32; 8];
        for r in 0..8 {
            out[r] = hsum(a[r]);
            for j in i..k {
                out[r] += half::f16::from_bits(rows[r][j]).to_f32() * x[j];
            }
        }
        out
    }

    // A plain shift, which LLVM vectorises at the enabled width.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn widen_bf16_avx2(src: &[u16], dst: &mut [f32]) {
        for (d, &b) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((b as u32) << 16);
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen_f16_f16c(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= len of both slices; unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        super::widen_portable(crate::model::HalfKind::F16, &src[n..], &mut dst[n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(kind: HalfKind, xs: &[f32]) -> Vec<u16> {
        xs.iter()
            .map(|&x| match kind {
                HalfKind::Bf16 => half::bf16::from_f32(x).to_bits(),
                HalfKind::F16 => half::f16::from_f32(x).to_bits(),
            })
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every path (the one this CPU takes and the portable one) widens exactly, lengths not a
    /// multiple of the vector width included, infinities and NaN too.
    #[test]
    fn widening_is_exact() {
        let mut xs = data(1003, 1);
        xs[7] = f32::INFINITY;
        xs[8] = f32::NEG_INFINITY;
        xs[9] = 65504.0;
        xs[10] = -0.0;
        for kind in [HalfKind::Bf16, HalfKind::F16] {
            let b = bits(kind, &xs);
            let want: Vec<u32> = b.iter().map(|&v| kind.to_f32(v).to_bits()).collect();
            let (mut d1, mut d2) = (vec![0f32; b.len()], vec![0f32; b.len()]);
            widen(kind, &b, &mut d1);
            widen_portable(kind, &b, &mut d2);
            assert_eq!(
                d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want,
                "{kind:?}"
            );
            assert_eq!(
                d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want,
                "{kind:?}"
            );
        }
    }

    /// The product equals the f32 path on the widened weights (to f32 summation order) for decode
    /// and prefill row counts, with the weight in three parts (q, k, v) whose boundaries fall
    /// inside the tasks and inside the batch-1 kernel's 8-row blocks (the last block partial),
    /// with and without accumulation.
    #[test]
    fn products_equal_the_f32_path_on_the_widened_weights() {
        let parts_rows = [40usize, 7, 13];
        let n: usize = parts_rows.iter().sum();
        // k = 75: the vector loops leave a scalar tail.
        for (kind, k) in [
            (HalfKind::Bf16, 72),
            (HalfKind::F16, 72),
            (HalfKind::Bf16, 75),
            (HalfKind::F16, 75),
        ] {
            let wide = data(n * k, 2);
            let b = bits(kind, &wide);
            let wide: Vec<f32> = b.iter().map(|&v| kind.to_f32(v)).collect();
            let mut parts = Vec::new();
            let mut r = 0;
            for &rows in &parts_rows {
                parts.push((rows, HalfData::Owned(b[r * k..(r + rows) * k].to_vec())));
                r += rows;
            }
            let w = HalfWeight::new(kind, k, parts);
            for m in [1usize, 2, 3, 8, 9, 40] {
                let x = data(m * k, 3 + m as u32);
                for acc in [false, true] {
                    let start = data(m * n, 9);
                    let mut want = if acc { start.clone() } else { vec![0.0; m * n] };
                    super::super::matmul_nt_gemm(&mut want, &x, &wide, m, n, k, acc);
                    let mut got = if acc { start.clone() } else { vec![7.0; m * n] };
                    matmul_nt_half(&mut got, &x, &w, m, acc);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{kind:?} m {m} acc {acc}: element {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
