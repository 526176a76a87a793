//! The CPU backend: f32 arithmetic, GEMMs through the `gemm` crate, everything else data-parallel
//! with rayon. It runs on whatever rayon pool is current (the engine installs its pinned pool).
//!
//! This backend is the numerical reference: it must match Hugging Face transformers in float32.

mod attention;
pub mod gemv;
pub mod half;
mod vision;

use rayon::prelude::*;

use super::{AttentionShape, Backend, KvCacheShape, VisionAttentionShape};
use crate::error::{Error, Result};
use crate::model::{F32Data, HalfTensor, HostTensor};
use crate::runner::{ForwardBatch, VisionBatch};

/// Rows per rayon task in element-wise kernels: keeps tasks big enough to amortise scheduling.
const ROWS_PER_TASK: usize = 4;

/// A row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    /// Number of rows (tokens).
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl CpuTensor {
    /// A matrix owning `data`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(rows * cols, data.len());
        CpuTensor { rows, cols, data }
    }
}

/// A weight: a host tensor, possibly still a view of the mapped checkpoint. Matrices that only
/// `linear` and `embedding` read stay in a 16-bit checkpoint's format (`half`; `data` is then
/// empty).
pub struct CpuWeight {
    shape: Vec<usize>,
    data: F32Data,
    half: Option<half::HalfWeight>,
}

impl CpuWeight {
    fn rows(&self) -> usize {
        self.shape[0]
    }
    fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }
    /// Bytes of weight data this weight holds (mapped or owned).
    pub fn bytes(&self) -> usize {
        match &self.half {
            Some(h) => h.bytes(),
            None => 4 * self.data.len(),
        }
    }
    /// Whether it is kept as bf16/f16.
    pub fn is_half(&self) -> bool {
        self.half.is_some()
    }
}

/// The KV cache: per layer, keys and values as `[slots, kv_heads * head_dim]`.
pub struct CpuKvCache {
    shape: KvCacheShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The CPU backend (stateless; threads come from the current rayon pool).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    /// Whether bf16/f16 matrices stay in that format ([`half`]) or are widened to f32 at load.
    keep_half: bool,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    /// A CPU backend; bf16/f16 checkpoints' matrices are computed with as they are stored.
    pub fn new() -> Self {
        CpuBackend { keep_half: true }
    }

    /// A CPU backend that widens every bf16/f16 weight to f32 at load (twice the memory and the
    /// bytes read per decode step; what autoglm did before 16-bit weights were kept).
    pub fn widening() -> Self {
        CpuBackend { keep_half: false }
    }
}

fn shape_err(op: &str, msg: String) -> Error {
    Error::Backend(format!("{op}: {msg}"))
}

/// Products with at most this many rows are "skinny" (decode batches): see [`matmul_nt`].
pub const SKINNY_ROWS: usize = 8;

/// One gemm call: `dst[m, n] (+)= lhs[m, k] @ rhs^T`, with `dst` rows `dst_rs` apart.
pub(super) fn gemm_call(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
    acc: bool,
    par: gemm::Parallelism,
) {
    assert!(
        m == 0 || dst.len() >= (m - 1) * dst_rs + n,
        "gemm_call: dst too small"
    );
    assert!(
        lhs.len() == m * k && rhs.len() == n * k,
        "gemm_call: bad sizes"
    );
    // SAFETY: the asserts bound every index the strides reach: dst element (i, j) is at
    // i * dst_rs + j < dst.len(); lhs (i, l) at i * k + l; rhs viewed as k x n, (l, j) at j * k + l.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst[m, n] = lhs[m, k] @ rhs^T` where `rhs` is `[n, k]` row-major (an nn.Linear weight);
/// `dst` is added to when `accumulate` (used to start from a bias).
///
/// Decode batches (`m <= SKINNY_ROWS`) are memory-bound: the weights must stream through once.
/// They go to the skinny kernel of [`gemv`], which splits the weight rows over the rayon pool so
/// every core streams its share. Larger products go to the `gemm` crate's blocked, parallel
/// kernel ([`matmul_nt_gemm`]).
pub fn matmul_nt(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    if m <= SKINNY_ROWS && n * k >= 1 << 16 {
        gemv::matmul_nt_skinny(dst, lhs, rhs, m, n, k, accumulate);
    } else {
        matmul_nt_gemm(dst, lhs, rhs, m, n, k, accumulate);
    }
}

/// [`matmul_nt`] through the `gemm` crate whatever the shape (parallel over the current rayon pool
/// when the product is big enough).
pub fn matmul_nt_gemm(
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
        "matmul_nt: bad sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_call(dst, n, lhs, rhs, (m, n, k), accumulate, par)
}

fn rms_norm_row(src: &[f32], w: &[f32], eps: f32, dst: &mut [f32]) {
    let ss: f64 = src.iter().map(|&x| (x as f64) * (x as f64)).sum();
    let inv = 1.0 / ((ss / src.len() as f64) as f32 + eps).sqrt();
    for ((d, &x), &g) in dst.iter_mut().zip(src).zip(w) {
        *d = g * (x * inv);
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Tensor = CpuTensor;
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        "cpu".into()
    }

    /// Stateless: every call computes in its own buffers on the calling thread's rayon pool.
    fn concurrent_handle(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn upload(&self, t: HostTensor) -> Result<CpuWeight> {
        Ok(CpuWeight {
            shape: t.shape,
            data: t.data,
            half: None,
        })
    }

    /// 16-bit matrices are computed with as they are (see [`half`]), unless made
    /// [`CpuBackend::widening`].
    fn keeps_half_weights(&self) -> bool {
        self.keep_half
    }

    fn upload_half(&self, parts: Vec<HalfTensor>) -> Result<CpuWeight> {
        let (first, cols) = match parts.first() {
            Some(p) if p.shape.len() == 2 => (p, p.shape[1]),
            _ => return Err(shape_err("upload_half", "expected 2-D parts".into())),
        };
        let kind = first.kind;
        if parts
            .iter()
            .any(|p| p.kind != kind || p.shape.len() != 2 || p.shape[1] != cols)
        {
            return Err(shape_err(
                "upload_half",
                "parts of different formats or widths".into(),
            ));
        }
        let w = half::HalfWeight::new(
            kind,
            cols,
            parts.into_iter().map(|p| (p.shape[0], p.data)).collect(),
        );
        Ok(CpuWeight {
            shape: vec![w.rows, cols],
            data: F32Data::Owned(Vec::new()),
            half: Some(w),
        })
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache> {
        let per_layer = shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim;
        // Zeroed allocations are lazily backed by the OS, so an unused pool costs no memory; the
        // engine checks the total against available memory before calling this.
        let k = (0..shape.num_layers)
            .map(|_| vec![0f32; per_layer])
            .collect();
        let v = (0..shape.num_layers)
            .map(|_| vec![0f32; per_layer])
            .collect();
        Ok(CpuKvCache { shape, k, v })
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> Result<CpuTensor> {
        let (vocab, width) = (table.rows(), table.cols());
        let mut out = vec![0f32; ids.len() * width];
        for (row, &id) in out.chunks_exact_mut(width).zip(ids) {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary ({vocab})"
                )));
            }
            match &table.half {
                Some(h) => h.widen_rows(id, 1, row),
                None => row.copy_from_slice(&table.data[id * width..(id + 1) * width]),
            }
        }
        Ok(CpuTensor::new(ids.len(), width, out))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        if w.data.len() != x.cols {
            return Err(shape_err(
                "rms_norm",
                format!("weight {} for width {}", w.data.len(), x.cols),
            ));
        }
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(d, s)| {
                rms_norm_row(s, &w.data, eps, d);
            });
        Ok(CpuTensor::new(x.rows, x.cols, out))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        if residual.data.len() != x.data.len() || w.data.len() != x.cols {
            return Err(shape_err(
                "add_rms_norm",
                format!(
                    "residual {} vs x {}x{}",
                    residual.data.len(),
                    x.rows,
                    x.cols
                ),
            ));
        }
        let cols = x.cols;
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(cols)
            .zip(residual.data.par_chunks_mut(cols))
            .zip(x.data.par_chunks(cols))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|((d, r), s)| {
                for (r, &s) in r.iter_mut().zip(s) {
                    *r += s;
                }
                rms_norm_row(r, &w.data, eps, d);
            });
        Ok(CpuTensor::new(x.rows, cols, out))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor> {
        let (n, k) = (w.rows(), w.cols());
        if x.cols != k {
            return Err(shape_err(
                "linear",
                format!("input width {} for weight {:?}", x.cols, w.shape),
            ));
        }
        let mut out = vec![0f32; x.rows * n];
        if let Some(b) = bias {
            if b.data.len() != n {
                return Err(shape_err(
                    "linear",
                    format!("bias {} for {n} outputs", b.data.len()),
                ));
            }
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(&b.data);
            }
        }
        match &w.half {
            Some(h) => half::matmul_nt_half(&mut out, &x.data, h, x.rows, bias.is_some()),
            None => matmul_nt(&mut out, &x.data, &w.data, x.rows, n, k, bias.is_some()),
        }
        Ok(CpuTensor::new(x.rows, n, out))
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        let half = gate_up.cols / 2;
        let mut out = vec![0f32; gate_up.rows * half];
        out.par_chunks_mut(half)
            .zip(gate_up.data.par_chunks(gate_up.cols))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(d, s)| {
                let (g, u) = s.split_at(half);
                for ((d, &g), &u) in d.iter_mut().zip(g).zip(u) {
                    *d = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok(CpuTensor::new(gate_up.rows, half, out))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor> {
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            let r = r as usize;
            if r >= x.rows {
                return Err(shape_err("gather_rows", format!("row {r} of {}", x.rows)));
            }
            out.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor::new(rows.len(), x.cols, out))
    }

    fn attention(
        &self,
        qkv: &mut CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: &AttentionShape,
    ) -> Result<CpuTensor> {
        attention::attention(qkv, cache, layer, batch, shape)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn tensor_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(shape_err(
                "tensor_from_host",
                format!("{} values for {rows}x{cols}", data.len()),
            ));
        }
        Ok(CpuTensor::new(rows, cols, data.to_vec()))
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        b: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        if w.data.len() != x.cols || b.data.len() != x.cols {
            return Err(shape_err(
                "layer_norm",
                format!(
                    "weight {} and bias {} for width {}",
                    w.data.len(),
                    b.data.len(),
                    x.cols
                ),
            ));
        }
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(d, s)| {
                let n = s.len() as f64;
                let mean = s.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = s.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let inv = 1.0 / (var as f32 + eps).sqrt();
                let mean = mean as f32;
                for (((d, &v), &g), &b) in d.iter_mut().zip(s).zip(&w.data[..]).zip(&b.data[..]) {
                    *d = (v - mean) * inv * g + b;
                }
            });
        Ok(CpuTensor::new(x.rows, x.cols, out))
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let data = x
            .data
            .par_iter()
            .with_min_len(1024)
            .map(|&v| 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok(CpuTensor::new(x.rows, x.cols, data))
    }

    fn group_rows(&self, x: CpuTensor, k: usize) -> Result<CpuTensor> {
        if k == 0 || x.rows % k != 0 {
            return Err(shape_err(
                "group_rows",
                format!("{} rows do not split into groups of {k}", x.rows),
            ));
        }
        Ok(CpuTensor::new(x.rows / k, x.cols * k, x.data))
    }

    fn copy_rows(
        &self,
        dst: &mut CpuTensor,
        dst_row: usize,
        src: &CpuTensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        if dst.cols != src.cols || dst_row + n > dst.rows || src_row + n > src.rows {
            return Err(shape_err(
                "copy_rows",
                format!(
                    "{n} rows from row {src_row} of {}x{} to row {dst_row} of {}x{}",
                    src.rows, src.cols, dst.rows, dst.cols
                ),
            ));
        }
        let c = dst.cols;
        dst.data[dst_row * c..(dst_row + n) * c]
            .copy_from_slice(&src.data[src_row * c..(src_row + n) * c]);
        Ok(())
    }

    fn interpolate_pos_embed(
        &self,
        table: &CpuWeight,
        side: usize,
        batch: &VisionBatch,
    ) -> Result<CpuTensor> {
        vision::interpolate_pos_embed(table, side, batch)
    }

    fn vision_attention(
        &self,
        qkv: &CpuTensor,
        batch: &VisionBatch,
        shape: &VisionAttentionShape,
    ) -> Result<CpuTensor> {
        vision::vision_attention(qkv, batch, shape)
    }
}

/// The error function, through libm's f64 `erf` (PyTorch's exact GELU to f32 rounding).
fn erf(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}
