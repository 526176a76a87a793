//! The [`Backend`] operations of [`CudaBackend`]: shape checks on the host, then kernel launches
//! and cuBLAS calls on the backend's stream. Every size a kernel indexes with is checked here
//! first; a kernel never sees a token id, slot or block outside its buffer.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use super::{
    driver_err, graph, meta, CudaBackend, CudaKvCache, CudaTensor, CudaWeight, DeviceBatch,
    RopeTables, SampleBuffers, WeightData,
};
use crate::backend::{
    rope_inv_freq, AttentionShape, Backend, KvCacheShape, RowSampling, VisionAttentionShape,
};
use crate::error::{Error, Result};
use crate::memory::{HostAllocator, HostVec};
use crate::model::{Fill, FillPart, HostTensor};
use crate::runner::{ForwardBatch, VisionBatch};

/// Ids of KV caches (decode graphs are keyed by the cache they were captured on).
static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Columns per block of the first pass of the two-pass argmax (`argmax_partial`), used for rows
/// at least twice as wide.
const ARGMAX_CHUNK: usize = 4096;
/// Threads per block of the row norms (`rms_norm`, `add_rms_norm`): a row of a 4096-wide model
/// is 4 loads a thread, not 16 (one block per row is all a decode step has).
const NORM_THREADS: u32 = 1024;
/// Threads per block of `gemv_bf16` (a warp per weight row).
const GEMV_THREADS: u32 = 256;
/// Threads per block of the attention kernel.
const ATTN_THREADS: u32 = 128;
/// Threads per block of the query-tiled prefill attention kernel.
const PREFILL_THREADS: u32 = 256;
/// Threads per row of `sample_rows` (SAMPLE_THREADS in sampling.cu, which sizes its scan buffer).
const SAMPLE_THREADS: u32 = 1024;
/// Elements per random-generator chunk (model/random.rs).
const RANDOM_CHUNK: usize = 4096;

pub(super) fn bad(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Backend(format!("{op}: {msg}"))
}

/// A grid-stride launch over `n` elements.
pub(super) fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 65_535 * 8);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn rows_grid(rows: usize) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows).map_err(|_| bad("launch", format!("{rows} rows")))?;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block of NORM_THREADS per row.
fn norm_grid(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        block_dim: (NORM_THREADS, 1, 1),
        ..rows_grid(rows)?
    })
}

pub(super) fn u32_of(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| bad(op, format!("{what} = {v} does not fit in 32 bits")))
}

fn i32_of(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad(op, format!("{what} = {v} does not fit in a cuBLAS int")))
}

/// Shared memory (bytes) of `paged_attention` for group size `g`, head width `d`, tile `tile`
/// (the layout documented in kernels/attention.cu).
/// Dynamic shared memory of `paged_attention_prefill` for `rows` query rows a block (attention.cu).
pub(super) fn prefill_smem_bytes(rows: usize, d: usize, tile: usize) -> usize {
    4 * (2 * rows * d + tile * (d + 1) + rows * tile + 3 * rows)
}

/// Shared memory the prefill kernel may use a block (opted in above the default 48 KiB where the
/// device allows): two blocks still fit on an H100 SM.
pub(super) const PREFILL_SMEM_CAP: usize = 100 << 10;

/// Query tokens per block and KV positions per shared-memory tile of the prefill kernel for `g`
/// query heads per KV head of width `hd` within `cap` bytes of shared memory: as many tokens as
/// fit (at most 128 rows a block), then the widest tile. `None` when one token's rows do not fit.
pub(super) fn prefill_tiling(g: usize, hd: usize, cap: usize) -> Option<(usize, usize)> {
    [8usize, 4, 2, 1]
        .into_iter()
        .filter(|&qt| qt * g <= 128)
        .find_map(|qt| {
            [64usize, 32, 16, 8]
                .into_iter()
                .find(|&t| prefill_smem_bytes(qt * g, hd, t) <= cap)
                .map(|t| (qt, t))
        })
}

pub(super) fn attention_smem_bytes(g: usize, d: usize, tile: usize) -> usize {
    4 * (2 * g * d + tile * (d + 1) + g * tile + 3 * g)
}

impl CudaWeight {
    pub(super) fn bf16(&self, op: &str) -> Result<&CudaSlice<bf16>> {
        match &self.data {
            WeightData::Bf16(d) => Ok(d),
            WeightData::F32(_) => Err(bad(
                op,
                format!("weight {:?} is not a bf16 matrix", self.shape),
            )),
        }
    }
    pub(super) fn f32(&self, op: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            WeightData::F32(d) => Ok(d),
            WeightData::Bf16(_) => Err(bad(
                op,
                format!("weight {:?} is not an f32 vector", self.shape),
            )),
        }
    }
    pub(super) fn rows(&self) -> usize {
        self.shape[0]
    }
    pub(super) fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }
}

impl CudaBackend {
    pub(super) fn tensor(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| bad(what, format!("{rows} x {cols} overflows")))?;
        Ok(CudaTensor {
            rows,
            cols,
            data: self.alloc::<f32>(n, what)?,
            bf16: None,
        })
    }

    /// [`CudaBackend::tensor`] with a bf16 twin, for ops whose output feeds a GEMM.
    pub(super) fn tensor_with_bf16(
        &self,
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        let mut t = self.tensor(rows, cols, what)?;
        t.bf16 = Some(self.alloc::<bf16>(rows * cols, what)?);
        Ok(t)
    }

    /// `y[m, n] = x[m, k] @ w[n, k]^T` with bf16 operands, f32 accumulation and f32 output.
    ///
    /// Row-major `y = x w^T` is column-major `y^T = w x^T`: cuBLAS gets `A = w` (k x n column-
    /// major, transposed), `B = x` (k x m column-major), `C = y` (n x m column-major).
    fn gemm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let op = "linear";
        let (mi, ni, ki) = (
            i32_of(op, "m", m)?,
            i32_of(op, "n", n)?,
            i32_of(op, "k", k)?,
        );
        if x.len() < m * k || w.len() < n * k || y.len() < m * n {
            return Err(bad(op, format!("buffers too small for {m}x{k} @ {n}x{k}")));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if m <= self.options.gemv_max_rows.min(super::GEMV_MAX_ROWS) && k % 8 == 0 {
            let (wp, _s1) = w.device_ptr(&self.stream);
            let (xp, _s2) = x.device_ptr(&self.stream);
            if wp % 16 == 0 && xp % 16 == 0 {
                return self.gemv_bf16(x, w, y, m, n, k);
            }
        }
        self.ctx.bind_to_thread().map_err(driver_err(op))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wp, _s1) = w.device_ptr(&self.stream);
        let (xp, _s2) = x.device_ptr(&self.stream);
        let (yp, _s3) = y.device_ptr_mut(&self.stream);
        // SAFETY: the sizes were checked against the buffers above; all three live on this
        // backend's stream, which the cuBLAS handle is bound to; alpha/beta are f32 as the
        // compute type requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                wp as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                ki,
                xp as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                ki,
                (&beta as *const f32).cast(),
                yp as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| bad(op, format!("cublasGemmEx {m}x{k} @ {n}x{k}: {e}")))
    }

    /// [`Self::gemm_bf16`] for decode batches: `kernels/gemv.cu`, one warp per weight row (the
    /// caller checked m <= GEMV_MAX_ROWS, k % 8 == 0, 16-byte-aligned operands and the sizes).
    fn gemv_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let op = "linear";
        let f = self.function("gemv_bf16")?;
        let (mu, nu, ku) = (
            u32_of(op, "m", m)?,
            u32_of(op, "n", n)?,
            u32_of(op, "k", k)?,
        );
        let warps = GEMV_THREADS / 32;
        let cfg = LaunchConfig {
            grid_dim: (u32_of(op, "blocks", n.div_ceil(warps as usize))?, 1, 1),
            block_dim: (GEMV_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: w holds n x k, x m x k bf16 and y m x n f32 (checked by gemm_bf16); the
        // kernel reads 16-byte chunks of rows k % 8 == 0 wide from 16-byte-aligned bases.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(w)
                .arg(x)
                .arg(y)
                .arg(&mu)
                .arg(&nu)
                .arg(&ku)
                .launch(cfg)
        }
        .map_err(driver_err("gemv_bf16"))?;
        Ok(())
    }

    /// bf16 copy of an activation (the GEMM operand).
    fn to_bf16(&self, x: &CudaTensor) -> Result<CudaSlice<bf16>> {
        let n = x.rows * x.cols;
        let mut out = self.alloc::<bf16>(n, "bf16 activations")?;
        if n > 0 {
            let f = self.function("f32_to_bf16")?;
            let n64 = n as u64;
            // SAFETY: f32_to_bf16(src, dst, n) reads n f32 and writes n bf16; both buffers hold n.
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(&x.data)
                    .arg(&mut out)
                    .arg(&n64)
                    .launch(grid_for(n))
            }
            .map_err(driver_err("f32_to_bf16"))?;
        }
        Ok(out)
    }

    /// The batch metadata slot.
    pub(super) fn lock_batch(
        &self,
        op: &str,
    ) -> Result<std::sync::MutexGuard<'_, Option<DeviceBatch>>> {
        self.batch
            .lock()
            .map_err(|_| bad(op, "batch metadata lock poisoned"))
    }

    /// Packs `batch` into the slot's pinned staging buffer and queues one copy of it to the
    /// device, unless the slot holds it already.
    fn upload_batch<'a>(
        &self,
        slot: &'a mut Option<DeviceBatch>,
        batch: &ForwardBatch,
    ) -> Result<&'a mut DeviceBatch> {
        if slot
            .as_ref()
            .is_some_and(|d| d.uploaded && d.layout.holds(&d.staging, batch))
        {
            return Ok(slot.as_mut().expect("checked"));
        }
        if slot.is_none() {
            *slot = Some(DeviceBatch::new(self, false)?);
        }
        let d = slot.as_mut().expect("just filled");
        d.uploaded = false;
        d.checked = None;
        d.embed_rows = 0;
        if let Some(ev) = &d.copied {
            // The previous copy from the staging buffer must be done before it is rewritten
            // (normally long done: each step ends by reading its results back).
            ev.synchronize()
                .map_err(driver_err("batch metadata copy"))?;
        }
        d.layout = meta::pack(batch, &mut d.staging);
        let n = d.staging.len();
        if d.meta.len() < n {
            if d.graph {
                return Err(bad(
                    "decode graph",
                    format!("{n} metadata words for a buffer of {}", d.meta.len()),
                ));
            }
            d.meta = self.alloc::<u32>(n.next_power_of_two(), "batch metadata")?;
        }
        if n > 0 {
            let err = driver_err("batch metadata copy");
            self.ctx.bind_to_thread().map_err(&err)?;
            // SAFETY: the staging buffer is not written again before the copy is done: an
            // eager batch waits for the event recorded next, a graph's for its last launch.
            unsafe { self.copy_to_device_async(&d.staging, &mut d.meta, "batch metadata copy") }?;
            if !d.graph {
                match &d.copied {
                    Some(ev) => ev.record(&self.stream).map_err(&err)?,
                    None => d.copied = Some(self.stream.record_event(None).map_err(&err)?),
                }
            }
        }
        d.max_context = batch.context_lens.iter().copied().max().unwrap_or(0) as usize;
        d.longest_query = batch
            .query_start
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        d.uploaded = true;
        Ok(d)
    }

    /// The rope tables with the one for `rope_inv_freq(rotary_dim, theta)` among them (made
    /// with a pageable copy the first time; kept for the backend's life, as captured graphs read
    /// them), and its key.
    pub(super) fn rope_table(
        &self,
        rotary_dim: usize,
        theta: f32,
    ) -> Result<(std::sync::MutexGuard<'_, RopeTables>, (usize, u32))> {
        let key = (rotary_dim, theta.to_bits());
        let mut guard = self
            .rope
            .lock()
            .map_err(|_| bad("rope", "rope table lock poisoned"))?;
        if let std::collections::hash_map::Entry::Vacant(e) = guard.entry(key) {
            e.insert(self.upload_slice(&rope_inv_freq(rotary_dim, theta), "rope frequencies")?);
        }
        Ok((guard, key))
    }

    /// The device copy of `host`: the `pick` part of the uploaded batch when that holds exactly
    /// `host` (the usual case: the model passes the batch's own ids and rows), else a fresh
    /// upload into `upload`. Inside a decode graph only the batch's copy will do. `embed_rows`
    /// records the embedding table the ids are read for.
    fn batch_part<'a>(
        &self,
        guard: &'a mut Option<DeviceBatch>,
        pick: fn(&meta::MetaLayout) -> std::ops::Range<usize>,
        host: &[u32],
        upload: &'a mut Option<CudaSlice<u32>>,
        what: &str,
        embed_rows: Option<usize>,
    ) -> Result<cudarc::driver::CudaView<'a, u32>> {
        if let Some(d) = guard.as_mut() {
            let r = pick(&d.layout);
            if d.uploaded && d.staging.get(r.clone()) == Some(host) {
                if let Some(v) = embed_rows {
                    d.embed_rows = v;
                }
                let d: &'a DeviceBatch = d;
                return Ok(d.meta.slice(r));
            }
            if d.graph {
                return Err(bad(
                    what,
                    "inside a decode graph the batch must come from prepare_batch",
                ));
            }
        }
        let dev = upload.insert(self.upload_slice(host, what)?);
        Ok(dev.slice(0..host.len()))
    }

    /// Queues a copy of `src` (page-locked host memory) into the start of `dst`, which must be
    /// at least as long.
    ///
    /// # Safety
    /// `src` must stay alive and unwritten until the stream has done the copy.
    pub(super) unsafe fn copy_to_device_async<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut CudaSlice<T>,
        what: &str,
    ) -> Result<()> {
        let mut dst = dst.slice_mut(0..src.len());
        let (ptr, _record) = dst.device_ptr_mut(&self.stream);
        // SAFETY: dst holds src.len() elements; the caller keeps src as the copy needs.
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(driver_err(what))
    }

    /// Splits of the KV range per (token, KV head): enough blocks to fill the device when few
    /// tokens attend over long contexts (decode), one otherwise.
    fn attention_splits(&self, tokens: usize, kv_heads: usize, max_context: usize) -> usize {
        let blocks = tokens * kv_heads;
        if blocks >= 2 * self.sm_count || max_context < 512 {
            return 1;
        }
        let want = (2 * self.sm_count).div_ceil(blocks.max(1));
        want.min(max_context / 256).clamp(1, 32)
    }

    /// How many blocks share one KV head's query group in the decode attention kernel: the
    /// group is halved while the grid (`blocks` = tokens x KV heads x splits) is under two
    /// blocks per multiprocessor, so a small batch still occupies the GPU (each block then
    /// re-reads its KV head's keys and values, which a short decode context keeps in L2).
    pub(super) fn attention_group_split(&self, blocks: usize, group: usize) -> usize {
        let mut split = 1;
        while group % (2 * split) == 0 && blocks * split < 2 * self.sm_count {
            split *= 2;
        }
        split
    }

    fn generate_part(
        &self,
        out: &mut GeneratedBuffer,
        offset: usize,
        n: usize,
        fill: Fill,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (n64, chunks) = (n as u64, n.div_ceil(RANDOM_CHUNK));
        let cfg = LaunchConfig {
            grid_dim: (u32_of("generate", "chunks", chunks.div_ceil(128))?, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let err = driver_err("generate");
        match (out, fill) {
            (GeneratedBuffer::Bf16(buf), Fill::Uniform { stream, scale }) => {
                let mut view = buf.slice_mut(offset..offset + n);
                let f = self.function("random_uniform_bf16")?;
                // SAFETY: the kernel writes elements [0, n) of the view, which holds n; one thread
                // per 4096-element chunk, ceil(chunks / 128) blocks of 128 threads.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&mut view)
                        .arg(&n64)
                        .arg(&stream)
                        .arg(&scale)
                        .launch(cfg)
                }
                .map_err(err)?;
            }
            (GeneratedBuffer::F32(buf), Fill::Uniform { stream, scale }) => {
                let mut view = buf.slice_mut(offset..offset + n);
                let f = self.function("random_uniform_f32")?;
                // SAFETY: as above, for f32.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&mut view)
                        .arg(&n64)
                        .arg(&stream)
                        .arg(&scale)
                        .launch(cfg)
                }
                .map_err(err)?;
            }
            (GeneratedBuffer::Bf16(buf), Fill::Constant(v)) => {
                let mut view = buf.slice_mut(offset..offset + n);
                let f = self.function("fill_bf16")?;
                // SAFETY: grid-stride over n elements of a view of n.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&mut view)
                        .arg(&n64)
                        .arg(&v)
                        .launch(grid_for(n))
                }
                .map_err(err)?;
            }
            (GeneratedBuffer::F32(buf), Fill::Constant(v)) => {
                let mut view = buf.slice_mut(offset..offset + n);
                let f = self.function("fill_f32")?;
                // SAFETY: grid-stride over n elements of a view of n.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&mut view)
                        .arg(&n64)
                        .arg(&v)
                        .launch(grid_for(n))
                }
                .map_err(err)?;
            }
        }
        Ok(())
    }
}

enum GeneratedBuffer {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

/// The checks of the CPU backend's attention (backend/cpu/attention.rs), which on a GPU guard
/// against out-of-bounds reads and writes.
/// A slot of [`graph::PAD_SLOT`] (a padding token) is allowed: its key and value are not written.
pub(super) fn check_batch(batch: &ForwardBatch, cache: &KvCacheShape) -> Result<()> {
    let op = "attention";
    let t = batch.num_tokens();
    if batch.positions.len() != t || batch.slot_mapping.len() != t {
        return Err(bad(op, "positions/slot_mapping do not match the tokens"));
    }
    if !batch.mrope_positions.is_empty() && batch.mrope_positions.len() != 3 * t {
        return Err(bad(
            op,
            format!(
                "{} M-RoPE positions for {t} tokens (3 a token)",
                batch.mrope_positions.len()
            ),
        ));
    }
    if batch.query_start.len() != batch.num_seqs() + 1
        || batch.query_start.first() != Some(&0)
        || batch.query_start.last().map(|&x| x as usize) != Some(t)
        || batch.query_start.windows(2).any(|w| w[0] > w[1])
    {
        return Err(bad(op, "inconsistent query_start"));
    }
    if batch.block_tables.len() != batch.num_seqs() * batch.max_blocks_per_seq {
        return Err(bad(
            op,
            "block_tables does not have max_blocks_per_seq entries per sequence",
        ));
    }
    let bs = cache.block_size;
    for seq in 0..batch.num_seqs() {
        let ctx = batch.context_lens[seq] as usize;
        let table = batch.block_table(seq);
        let needed = ctx.div_ceil(bs);
        if needed > table.len()
            || table[..needed]
                .iter()
                .any(|&b| b as usize >= cache.num_blocks)
        {
            return Err(bad(
                op,
                format!("sequence {seq}: block table does not cover {ctx} tokens"),
            ));
        }
        let (q0, q1) = (
            batch.query_start[seq] as usize,
            batch.query_start[seq + 1] as usize,
        );
        if batch.positions[q0..q1].iter().any(|&p| p as usize >= ctx) {
            return Err(bad(
                op,
                format!("sequence {seq}: a position lies beyond its context length {ctx}"),
            ));
        }
    }
    let slots = cache.num_blocks * bs;
    if batch
        .slot_mapping
        .iter()
        .any(|&s| s != graph::PAD_SLOT && s as usize >= slots)
    {
        return Err(bad(op, format!("slot outside the cache ({slots} slots)")));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Tensor = CudaTensor;
    type KvCache = CudaKvCache;

    fn name(&self) -> String {
        self.name_with_ordinal()
    }

    fn upload(&self, t: HostTensor) -> Result<CudaWeight> {
        let len: usize = t.shape.iter().product();
        if t.data.len() != len || t.shape.is_empty() || t.shape.len() > 2 {
            return Err(bad(
                "upload",
                format!(
                    "tensor of shape {:?} with {} elements",
                    t.shape,
                    t.data.len()
                ),
            ));
        }
        let what = format!("a weight of shape {:?}", t.shape);
        let data = if t.shape.len() == 2 {
            let mut host = vec![bf16::ZERO; len];
            host.par_chunks_mut(1 << 16)
                .zip(t.data.par_chunks(1 << 16))
                .for_each(|(d, s)| {
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = bf16::from_f32(s);
                    }
                });
            WeightData::Bf16(self.upload_slice(&host, &what)?)
        } else {
            WeightData::F32(self.upload_slice(&t.data, &what)?)
        };
        Ok(CudaWeight {
            shape: t.shape,
            data,
        })
    }

    fn generate(&self, shape: &[usize], parts: &[FillPart]) -> Option<Result<CudaWeight>> {
        let run = || -> Result<CudaWeight> {
            if shape.is_empty()
                || shape.len() > 2
                || parts.iter().map(|p| p.rows).sum::<usize>() != shape[0]
            {
                return Err(bad(
                    "generate",
                    format!("shape {shape:?} for parts {parts:?}"),
                ));
            }
            let cols = shape.get(1).copied().unwrap_or(1);
            let len = shape[0] * cols;
            let what = format!("a generated weight of shape {shape:?}");
            let mut buf = if shape.len() == 2 {
                GeneratedBuffer::Bf16(self.alloc::<bf16>(len, &what)?)
            } else {
                GeneratedBuffer::F32(self.alloc::<f32>(len, &what)?)
            };
            let mut offset = 0;
            for p in parts {
                let n = p.rows * cols;
                self.generate_part(&mut buf, offset, n, p.fill)?;
                offset += n;
            }
            let data = match buf {
                GeneratedBuffer::Bf16(b) => WeightData::Bf16(b),
                GeneratedBuffer::F32(b) => WeightData::F32(b),
            };
            Ok(CudaWeight {
                shape: shape.to_vec(),
                data,
            })
        };
        Some(run())
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache> {
        let per_layer = shape
            .num_blocks
            .checked_mul(shape.block_size * shape.num_kv_heads * shape.head_dim)
            .ok_or_else(|| bad("alloc_kv_cache", format!("{shape:?} overflows")))?;
        let mut k = Vec::with_capacity(shape.num_layers);
        let mut v = Vec::with_capacity(shape.num_layers);
        for layer in 0..shape.num_layers {
            let what = format!(
                "the KV cache of layer {layer} ({} blocks)",
                shape.num_blocks
            );
            // Zeroed so a bug that reads an unwritten slot reads zeros, not NaNs.
            let mut kl = self.alloc::<bf16>(per_layer, &what)?;
            let mut vl = self.alloc::<bf16>(per_layer, &what)?;
            self.stream
                .memset_zeros(&mut kl)
                .map_err(driver_err("KV cache"))?;
            self.stream
                .memset_zeros(&mut vl)
                .map_err(driver_err("KV cache"))?;
            k.push(kl);
            v.push(vl);
        }
        Ok(CudaKvCache {
            shape,
            k,
            v,
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            alive: std::sync::Arc::new(()),
        })
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let (vocab, width) = (table.rows(), table.cols());
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "token id {id} is outside the vocabulary ({vocab})"
            )));
        }
        let mut out = self.tensor(ids.len(), width, "embeddings")?;
        if ids.is_empty() {
            return Ok(out);
        }
        let mut guard = self.lock_batch("embedding")?;
        let mut upload = None;
        let ids_dev = self.batch_part(
            &mut guard,
            |l| l.token_ids.clone(),
            ids,
            &mut upload,
            "token ids",
            Some(vocab),
        )?;
        let (f, w) = (
            self.function("embedding_bf16")?,
            u32_of("embedding", "width", width)?,
        );
        // SAFETY: every id is < vocab (checked), so row id of the vocab x width table exists; the
        // output has ids.len() rows of width.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(table.bf16("embedding")?)
                .arg(&ids_dev)
                .arg(&mut out.data)
                .arg(&w)
                .launch(rows_grid(ids.len())?)
        }
        .map_err(driver_err("embedding"))?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let wd = w.f32("rms_norm")?;
        if wd.len() != x.cols || w.shape.len() != 1 {
            return Err(bad(
                "rms_norm",
                format!("weight {:?} for width {}", w.shape, x.cols),
            ));
        }
        let mut out = self.tensor_with_bf16(x.rows, x.cols, "rms_norm output")?;
        if x.rows == 0 {
            return Ok(out);
        }
        let (f, width) = (
            self.function("rms_norm")?,
            u32_of("rms_norm", "width", x.cols)?,
        );
        // SAFETY: x and out are rows x width; w has width elements.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&x.data)
                .arg(wd)
                .arg(&mut out.data)
                .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                .arg(&width)
                .arg(&eps)
                .launch(norm_grid(x.rows)?)
        }
        .map_err(driver_err("rms_norm"))?;
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        x: &CudaTensor,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        let wd = w.f32("add_rms_norm")?;
        if residual.rows != x.rows || residual.cols != x.cols || wd.len() != x.cols {
            return Err(bad(
                "add_rms_norm",
                format!(
                    "residual {}x{} vs x {}x{} and weight {:?}",
                    residual.rows, residual.cols, x.rows, x.cols, w.shape
                ),
            ));
        }
        let mut out = self.tensor_with_bf16(x.rows, x.cols, "add_rms_norm output")?;
        residual.bf16 = None;
        if x.rows == 0 {
            return Ok(out);
        }
        let (f, width) = (
            self.function("add_rms_norm")?,
            u32_of("add_rms_norm", "width", x.cols)?,
        );
        // SAFETY: residual, x and out are rows x width; w has width elements.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&mut residual.data)
                .arg(&x.data)
                .arg(wd)
                .arg(&mut out.data)
                .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                .arg(&width)
                .arg(&eps)
                .launch(norm_grid(x.rows)?)
        }
        .map_err(driver_err("add_rms_norm"))?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        let (n, k) = (w.rows(), w.cols());
        if w.shape.len() != 2 || x.cols != k {
            return Err(bad(
                "linear",
                format!("input width {} for weight {:?}", x.cols, w.shape),
            ));
        }
        let converted;
        let xb = match &x.bf16 {
            Some(b) => b,
            None => {
                converted = self.to_bf16(x)?;
                &converted
            }
        };
        let mut y = self.tensor(x.rows, n, "linear output")?;
        self.gemm_bf16(xb, w.bf16("linear")?, &mut y.data, x.rows, n, k)?;
        if let Some(b) = bias {
            let bd = b.f32("linear bias")?;
            if bd.len() != n {
                return Err(bad("linear", format!("bias {:?} for {n} outputs", b.shape)));
            }
            if x.rows > 0 {
                let f = self.function("add_bias")?;
                let (rows, cols) = (u32_of("linear", "rows", x.rows)?, u32_of("linear", "n", n)?);
                // SAFETY: y is rows x n; the bias has n elements.
                unsafe {
                    self.stream
                        .launch_builder(f)
                        .arg(&mut y.data)
                        .arg(bd)
                        .arg(&rows)
                        .arg(&cols)
                        .launch(grid_for(x.rows * n))
                }
                .map_err(driver_err("add_bias"))?;
            }
        }
        Ok(y)
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        if gate_up.cols % 2 != 0 {
            return Err(bad("silu_mul", format!("odd width {}", gate_up.cols)));
        }
        let half = gate_up.cols / 2;
        let mut out = self.tensor_with_bf16(gate_up.rows, half, "silu_mul output")?;
        if gate_up.rows == 0 || half == 0 {
            return Ok(out);
        }
        let f = self.function("silu_mul")?;
        let (rows, h) = (
            u32_of("silu_mul", "rows", gate_up.rows)?,
            u32_of("silu_mul", "width", half)?,
        );
        // SAFETY: gate_up is rows x 2*half, out rows x half.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&gate_up.data)
                .arg(&mut out.data)
                .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                .arg(&rows)
                .arg(&h)
                .launch(grid_for(gate_up.rows * half))
        }
        .map_err(driver_err("silu_mul"))?;
        Ok(out)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[u32]) -> Result<CudaTensor> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(bad("gather_rows", format!("row {r} of {}", x.rows)));
        }
        let mut out = self.tensor(rows.len(), x.cols, "gathered rows")?;
        if rows.is_empty() || x.cols == 0 {
            return Ok(out);
        }
        let mut guard = self.lock_batch("gather_rows")?;
        let mut upload = None;
        let rows_dev = self.batch_part(
            &mut guard,
            |l| l.logits_indices.clone(),
            rows,
            &mut upload,
            "row indices",
            None,
        )?;
        let (f, cols) = (
            self.function("gather_rows")?,
            u32_of("gather_rows", "cols", x.cols)?,
        );
        // SAFETY: every row index is < x.rows (checked); out has rows.len() rows of x.cols.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&x.data)
                .arg(&rows_dev)
                .arg(&mut out.data)
                .arg(&cols)
                .launch(rows_grid(rows.len())?)
        }
        .map_err(driver_err("gather_rows"))?;
        Ok(out)
    }

    fn attention(
        &self,
        qkv: &mut CudaTensor,
        cache: &mut CudaKvCache,
        layer: usize,
        batch: &ForwardBatch,
        s: &AttentionShape,
    ) -> Result<CudaTensor> {
        let op = "attention";
        let (nh, nkv, hd) = (s.num_heads, s.num_kv_heads, s.head_dim);
        let width = (nh + 2 * nkv) * hd;
        if qkv.cols != width || qkv.rows != batch.num_tokens() {
            return Err(bad(
                op,
                format!(
                    "qkv is {}x{}, expected {}x{width}",
                    qkv.rows,
                    qkv.cols,
                    batch.num_tokens()
                ),
            ));
        }
        if nkv == 0 || nh % nkv != 0 || s.rotary_dim % 2 != 0 || s.rotary_dim > hd {
            return Err(bad(op, format!("unsupported shape {s:?}")));
        }
        if s.mrope_section.is_some() && batch.mrope_positions.len() != 3 * qkv.rows {
            return Err(bad(
                op,
                format!(
                    "M-RoPE needs 3 positions per token: {} for {} tokens",
                    batch.mrope_positions.len(),
                    qkv.rows
                ),
            ));
        }
        if layer >= cache.k.len() || cache.shape.num_kv_heads != nkv || cache.shape.head_dim != hd {
            return Err(bad(
                op,
                format!(
                    "layer {layer} / shape {s:?} does not match the cache {:?}",
                    cache.shape
                ),
            ));
        }
        let mut out = self.tensor_with_bf16(qkv.rows, nh * hd, "attention output")?;
        qkv.bf16 = None;
        if qkv.rows == 0 {
            return Ok(out);
        }
        let mut guard = self.lock_batch(op)?;
        let db = self.upload_batch(&mut guard, batch)?;
        if db.checked != Some(cache.shape) {
            check_batch(batch, &cache.shape)?;
            db.checked = Some(cache.shape);
        }
        let db: &DeviceBatch = db;
        let (rope, rope_key) = self.rope_table(s.rotary_dim, s.rope_theta)?;
        let inv_freq = rope
            .get(&rope_key)
            .ok_or_else(|| bad(op, "rope table missing"))?;
        let positions = db.meta.slice(db.layout.positions.clone());
        // The rotary positions: 1-D rope turns every frequency by the token's position; M-RoPE
        // frequency i by stream mrope_stream(section, i) of its [t, h, w] (the kernel's sec0 /
        // sec01 bounds). Slots and masks follow `positions` either way.
        let pairs = s.rotary_dim / 2;
        let (rope_pos, rope_stride, sec0, sec01) = match s.mrope_section {
            None => (
                db.meta.slice(db.layout.positions.clone()),
                1usize,
                pairs,
                pairs,
            ),
            Some(sec) => (
                db.meta.slice(db.layout.mrope_positions.clone()),
                3,
                sec[0],
                sec[0].saturating_add(sec[1]),
            ),
        };
        let slot_mapping = db.meta.slice(db.layout.slot_mapping.clone());
        let seq_of_token = db.meta.slice(db.layout.seq_of_token.clone());
        let block_tables = db.meta.slice(db.layout.block_tables.clone());
        let u = |what: &str, v: usize| u32_of(op, what, v);
        let (nh32, nkv32, hd32, rot32) = (
            u("heads", nh)?,
            u("kv heads", nkv)?,
            u("head_dim", hd)?,
            u("rotary_dim", s.rotary_dim)?,
        );

        let (stride32, sec0, sec01) = (
            u("rope stride", rope_stride)?,
            u("mrope section", sec0)?,
            u("mrope section", sec01)?,
        );
        let f = self.function("rope_and_cache_write")?;
        let (kl, vl) = (&mut cache.k[layer], &mut cache.v[layer]);
        // SAFETY: qkv is tokens x width; rope_pos has rope_stride entries per token (positions,
        // or the 3 * tokens M-RoPE positions checked above); slot_mapping has one entry per token
        // and every slot is inside the cache (check_batch); inv_freq has rotary_dim / 2 entries.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&mut qkv.data)
                .arg(&rope_pos)
                .arg(&stride32)
                .arg(&sec0)
                .arg(&sec01)
                .arg(&slot_mapping)
                .arg(inv_freq)
                .arg(kl)
                .arg(vl)
                .arg(&nh32)
                .arg(&nkv32)
                .arg(&hd32)
                .arg(&rot32)
                .launch(LaunchConfig {
                    grid_dim: (u("tokens", qkv.rows)?, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                })
        }
        .map_err(driver_err("rope_and_cache_write"))?;

        let g = nh / nkv;
        let (mbps, bs) = (
            u("max_blocks_per_seq", batch.max_blocks_per_seq)?,
            u("block_size", cache.shape.block_size)?,
        );
        let (kl, vl) = (&cache.k[layer], &cache.v[layer]);
        // Prefill chunks: the query-tiled kernel, each K/V tile serving several query tokens.
        let longest = db.longest_query;
        if let Some((qt, tile)) = prefill_tiling(g, hd, self.prefill_smem_cap)
            .filter(|&(qt, _)| longest >= 2 && longest.div_ceil(qt) <= 65_535)
        {
            let blocks_y = longest.div_ceil(qt);
            let query_start = db.meta.slice(db.layout.query_start.clone());
            let (tile32, qt32) = (tile as u32, qt as u32);
            let smem = prefill_smem_bytes(qt * g, hd, tile) as u32;
            let f = self.function("paged_attention_prefill")?;
            // SAFETY: as paged_attention below (check_batch bounds every table entry and
            // position); query_start has num_seqs + 1 entries ending at the token count; the
            // dynamic shared memory is what the kernel's layout needs for (qt * g, hd, tile) and
            // within what prefill_tiling allows (opted in at start-up).
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(&qkv.data)
                    .arg(kl)
                    .arg(vl)
                    .arg(&positions)
                    .arg(&query_start)
                    .arg(&block_tables)
                    .arg(&mbps)
                    .arg(&bs)
                    .arg(&nh32)
                    .arg(&nkv32)
                    .arg(&hd32)
                    .arg(&s.scale)
                    .arg(&tile32)
                    .arg(&qt32)
                    .arg(&mut out.data)
                    .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                    .launch(LaunchConfig {
                        grid_dim: (
                            u("sequences", batch.num_seqs())?,
                            u("query blocks", blocks_y)?,
                            nkv32,
                        ),
                        block_dim: (PREFILL_THREADS, 1, 1),
                        shared_mem_bytes: smem,
                    })
            }
            .map_err(driver_err("paged_attention_prefill"))?;
            return Ok(out);
        }
        // A graph serves every context its block tables can hold.
        let max_context = if db.graph {
            batch.max_blocks_per_seq * cache.shape.block_size
        } else {
            db.max_context
        };
        let splits = self.attention_splits(qkv.rows, nkv, max_context);
        let group_split = self.attention_group_split(qkv.rows * nkv * splits, g);
        let g = g / group_split;
        let tile = [64usize, 32, 16, 8, 4, 2, 1]
            .into_iter()
            .find(|&t| attention_smem_bytes(g, hd, t) <= (48 << 10).min(self.max_shared_per_block))
            .ok_or_else(|| {
                bad(
                    op,
                    format!(
                        "{g} query heads per KV head of width {hd} do not fit in shared memory"
                    ),
                )
            })?;
        let smem = attention_smem_bytes(g, hd, tile);
        let tokens = u("tokens", qkv.rows)?;
        let parts = if splits > 1 {
            qkv.rows * nh * splits
        } else {
            1
        };
        let mut part_acc = self.alloc::<f32>(
            if splits > 1 { parts * hd } else { 1 },
            "attention partials",
        )?;
        let mut part_m = self.alloc::<f32>(parts, "attention partials")?;
        let mut part_l = self.alloc::<f32>(parts, "attention partials")?;
        let (tile32, splits32, gs32) = (tile as u32, splits as u32, group_split as u32);
        let f = self.function("paged_attention")?;
        // SAFETY: shapes as documented in attention.cu: every block-table entry the kernel reads
        // (positions < context_len, covered by the table) names a block inside the cache
        // (check_batch); seq_of_token < num_seqs; the dynamic shared memory is the size the
        // kernel's layout needs for (g, hd, tile) and within the 48 KiB default limit; the
        // partial buffers hold tokens * heads * splits (* hd) entries when splits > 1.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&qkv.data)
                .arg(kl)
                .arg(vl)
                .arg(&positions)
                .arg(&seq_of_token)
                .arg(&block_tables)
                .arg(&mbps)
                .arg(&bs)
                .arg(&nh32)
                .arg(&nkv32)
                .arg(&hd32)
                .arg(&s.scale)
                .arg(&tile32)
                .arg(&splits32)
                .arg(&gs32)
                .arg(&mut out.data)
                .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                .arg(&mut part_acc)
                .arg(&mut part_m)
                .arg(&mut part_l)
                .launch(LaunchConfig {
                    grid_dim: (tokens, nkv32 * gs32, splits32),
                    block_dim: (ATTN_THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
        }
        .map_err(driver_err("paged_attention"))?;
        if splits > 1 {
            let f = self.function("attention_combine")?;
            // SAFETY: the partials hold tokens * heads * splits states; out is tokens x heads*hd.
            unsafe {
                self.stream
                    .launch_builder(f)
                    .arg(&part_acc)
                    .arg(&part_m)
                    .arg(&part_l)
                    .arg(&mut out.data)
                    .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                    .arg(&nh32)
                    .arg(&hd32)
                    .arg(&splits32)
                    .launch(LaunchConfig {
                        grid_dim: (tokens, nh32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    })
            }
            .map_err(driver_err("attention_combine"))?;
        }
        Ok(out)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let n = x.rows * x.cols;
        let mut host = vec![0f32; n];
        if n > 0 {
            self.count_pageable_copy();
            let view = x.data.slice(0..n);
            self.stream
                .memcpy_dtoh(&view, &mut host)
                .map_err(driver_err("copy to host"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    fn tensor_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        self.tensor_from_host_op(rows, cols, data)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        b: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.layer_norm_op(x, w, b, eps)
    }

    fn gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.gelu_op(x)
    }

    fn group_rows(&self, x: CudaTensor, k: usize) -> Result<CudaTensor> {
        self.group_rows_op(x, k)
    }

    fn copy_rows(
        &self,
        dst: &mut CudaTensor,
        dst_row: usize,
        src: &CudaTensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        self.copy_rows_op(dst, dst_row, src, src_row, n)
    }

    fn interpolate_pos_embed(
        &self,
        table: &CudaWeight,
        side: usize,
        batch: &VisionBatch,
    ) -> Result<CudaTensor> {
        self.interpolate_pos_embed_op(table, side, batch)
    }

    fn vision_attention(
        &self,
        qkv: &CudaTensor,
        batch: &VisionBatch,
        shape: &VisionAttentionShape,
    ) -> Result<CudaTensor> {
        self.vision_attention_op(qkv, batch, shape)
    }

    fn host_allocator(&self) -> std::sync::Arc<dyn HostAllocator> {
        std::sync::Arc::new(super::CudaHostAllocator::new(self.ctx.clone()))
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn prepare_batch(&self, batch: &ForwardBatch) -> Result<()> {
        let mut guard = self.lock_batch("prepare_batch")?;
        self.upload_batch(&mut guard, batch).map(|_| ())
    }

    fn run_step(
        &self,
        batch: &ForwardBatch,
        cache: &mut CudaKvCache,
        forward: &mut crate::backend::ForwardFn<'_, Self>,
    ) -> Result<CudaTensor> {
        self.run_step_graphs(batch, cache, forward)
    }

    fn sample_rows(&self, x: &CudaTensor, rows: &[RowSampling], out: &mut Vec<u32>) -> Result<()> {
        out.clear();
        if rows.len() != x.rows {
            return Err(bad(
                "sample_rows",
                format!(
                    "{} rows of parameters for {} rows of logits",
                    rows.len(),
                    x.rows
                ),
            ));
        }
        if x.rows == 0 {
            return Ok(());
        }
        if x.cols == 0 {
            return Err(bad("sample_rows", "rows of width 0"));
        }
        let cols = u32_of("sample_rows", "cols", x.cols)?;
        let n = x.rows;
        let greedy = rows.iter().all(|r| r.temperature <= 0.0);
        let mut slot = self.sampling.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(SampleBuffers {
                params: HostVec::with_capacity_in(&self.pinned, 0)?,
                ids: HostVec::with_capacity_in(&self.pinned, 0)?,
                dev_params: self.alloc::<f64>(1, "sampling parameters")?,
                dev_ids: self.alloc::<u32>(1, "sampled tokens")?,
            });
        }
        let b = slot.as_mut().expect("just filled");
        if b.dev_ids.len() < n {
            b.dev_ids = self.alloc::<u32>(n.next_power_of_two(), "sampled tokens")?;
        }
        let err = driver_err("sample_rows");
        self.ctx.bind_to_thread().map_err(&err)?;
        if greedy && x.cols >= 2 * ARGMAX_CHUNK {
            // Wide rows (a vocabulary): many blocks per row, then one per row to combine.
            let parts = x.cols.div_ceil(ARGMAX_CHUNK);
            let mut part_v = self.alloc::<f32>(n * parts, "argmax partials")?;
            let mut part_i = self.alloc::<u32>(n * parts, "argmax partials")?;
            let (chunk, parts32) = (ARGMAX_CHUNK as u32, u32_of("sample_rows", "parts", parts)?);
            // SAFETY: grid (parts, rows) with parts * ARGMAX_CHUNK >= cols: block (p, r) reads
            // columns [p * chunk, min(cols, (p + 1) * chunk)) of row r < x.rows and writes entry
            // r * parts + p of the partials, which hold n * parts; blocks of ROW_THREADS (a power
            // of two <= 1024).
            unsafe {
                self.stream
                    .launch_builder(self.function("argmax_partial")?)
                    .arg(&x.data)
                    .arg(&mut part_v)
                    .arg(&mut part_i)
                    .arg(&cols)
                    .arg(&chunk)
                    .launch(LaunchConfig {
                        grid_dim: (parts32, u32_of("sample_rows", "rows", n)?, 1),
                        block_dim: (ROW_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })
            }
            .map_err(&err)?;
            let threads = parts.next_power_of_two().clamp(32, 1024) as u32;
            // SAFETY: one block (a power of two <= 1024 threads) per row reads that row's parts
            // partials; dev_ids has at least n entries.
            unsafe {
                self.stream
                    .launch_builder(self.function("argmax_combine")?)
                    .arg(&part_v)
                    .arg(&part_i)
                    .arg(&mut b.dev_ids)
                    .arg(&parts32)
                    .launch(LaunchConfig {
                        grid_dim: (u32_of("sample_rows", "rows", n)?, 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: 0,
                    })
            }
            .map_err(&err)?;
        } else if greedy {
            // SAFETY: one block of ROW_THREADS (a power of two <= 1024, as the kernel needs) per
            // row of x; dev_ids has at least x.rows entries.
            unsafe {
                self.stream
                    .launch_builder(self.function("argmax_rows")?)
                    .arg(&x.data)
                    .arg(&mut b.dev_ids)
                    .arg(&cols)
                    .launch(rows_grid(n)?)
            }
            .map_err(&err)?;
        } else {
            // The staging buffer was last read by the previous call's copy, which that call
            // waited for (it synchronizes before returning).
            b.params.clear();
            for r in rows {
                b.params.extend_from_slice(&[
                    r.temperature as f64,
                    r.top_k.min(u32::MAX as usize) as f64,
                    r.top_p as f64,
                    r.min_p as f64,
                    r.uniform,
                ]);
            }
            if b.dev_params.len() < b.params.len() {
                b.dev_params =
                    self.alloc::<f64>(b.params.len().next_power_of_two(), "sampling parameters")?;
            }
            // SAFETY: the staging buffer is not touched again before this call synchronizes the
            // stream below.
            unsafe { self.copy_to_device_async(&b.params, &mut b.dev_params, "sample_rows") }?;
            // SAFETY: one block of SAMPLE_THREADS per row; dev_params holds 5 values per row and
            // dev_ids at least one entry per row.
            unsafe {
                self.stream
                    .launch_builder(self.function("sample_rows")?)
                    .arg(&x.data)
                    .arg(&b.dev_params)
                    .arg(&mut b.dev_ids)
                    .arg(&cols)
                    .launch(LaunchConfig {
                        grid_dim: (u32_of("sample_rows", "rows", n)?, 1, 1),
                        block_dim: (SAMPLE_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    })
            }
            .map_err(&err)?;
        }
        b.ids.resize(n, 0);
        {
            let src = b.dev_ids.slice(0..n);
            let (ptr, _record) = src.device_ptr(&self.stream);
            // SAFETY: n u32 from the device into the page-locked (not write-combined) host
            // buffer of n; read only after the synchronization below.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut b.ids[..],
                    ptr,
                    self.stream.cu_stream(),
                )
            }
            .map_err(&err)?;
        }
        self.synchronize()?;
        out.extend_from_slice(&b.ids[..]);
        Ok(())
    }

    fn kv_cache_elem_bytes(&self) -> usize {
        2
    }

    fn kv_cache_budget(&self) -> Result<Option<usize>> {
        self.synchronize()?;
        let (free, total) = self.memory_info()?;
        let keep_free = (total as f64 * (1.0 - self.options.memory_utilization as f64)) as usize;
        Ok(Some(free.saturating_sub(keep_free)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_shared_memory_of_glm4_9b_fits_the_default_limit() {
        // 32 heads over 2 KV heads, head_dim 128, tile 32: 34 KiB.
        assert!(attention_smem_bytes(16, 128, 32) <= 48 << 10);
        assert!(attention_smem_bytes(16, 128, 64) > 48 << 10);
    }

    #[test]
    fn prefill_tiling_of_glm4_9b_serves_several_tokens_a_block() {
        // 16 query heads per KV head, head_dim 128.
        assert_eq!(prefill_tiling(16, 128, PREFILL_SMEM_CAP), Some((4, 32)));
        assert!(prefill_smem_bytes(64, 128, 32) <= PREFILL_SMEM_CAP);
        // Without the opt-in, within the default 48 KiB: two tokens a block.
        assert_eq!(prefill_tiling(16, 128, 48 << 10), Some((2, 16)));
        // A small shape (2 query heads per KV head of width 16): 8 tokens, the widest tile.
        assert_eq!(prefill_tiling(2, 16, 48 << 10), Some((8, 64)));
        // Nothing fits: None, and the paged kernel takes over.
        assert_eq!(prefill_tiling(64, 256, 48 << 10), None);
    }

    #[test]
    fn batch_checks_reject_slots_and_blocks_outside_the_cache() {
        let cache = KvCacheShape {
            num_layers: 1,
            num_blocks: 4,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 8,
        };
        let mut b = ForwardBatch::new(2);
        b.push_seq(&[1, 2, 3, 4, 5], 0, &[0, 1], 4);
        check_batch(&b, &cache).unwrap();
        let mut far = b.clone();
        far.slot_mapping[0] = 16;
        assert!(check_batch(&far, &cache).is_err());
        let mut short = b.clone();
        short.block_tables[1] = 4;
        assert!(check_batch(&short, &cache).is_err());
        let mut late = b;
        late.positions[4] = 5;
        assert!(check_batch(&late, &cache).is_err());
    }
}
