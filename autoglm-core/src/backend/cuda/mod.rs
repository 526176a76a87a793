//! The CUDA backend: bf16 weights, cuBLAS GEMMs, NVRTC-compiled kernels.
//!
//! Always compiled: cudarc opens `libcuda`, `libnvrtc` and `libcublas` at run time, so a build
//! needs no CUDA toolkit and a binary runs on a machine without a driver. [`CudaBackend::new`]
//! probes for each library and the device before touching them (cudarc panics when a library is
//! missing) and turns what is missing into [`Error::CudaUnavailable`].
//!
//! Numerics: weight matrices (and the embedding table) are stored as bf16, converted on upload;
//! norm weights and biases stay f32. The residual stream, norms, rope, softmax and every
//! accumulation are f32; activations are rounded to bf16 for each GEMM (`cublasGemmEx`: bf16 A/B,
//! f32 compute, f32 out), written alongside the f32 output by the op that makes them (norms,
//! silu_mul, attention) or, for other inputs, by a conversion kernel. The KV cache is bf16.
//!
//! Execution: one stream, event tracking off (all work is ordered on that stream), activations
//! allocated from the driver's stream-ordered pool (kept across steps by a release threshold).
//! Batch metadata (token ids, positions, slots, block tables, logits rows) is packed into pinned
//! memory and copied once per forward pass (`Backend::prepare_batch`), then read by every op.
//! Decode steps of up to 256 sequences are replayed from CUDA graphs captured per batch-size bucket
//! (graph.rs; `CudaOptions::graphs`). Attention: decode steps use `paged_attention` (GQA groups,
//! split-K over long contexts), batches with prefill chunks `paged_attention_prefill` (several
//! query tokens a block, so each staged K/V tile serves them all). M-RoPE (Glm4v) rotates by the
//! batch's `[t, h, w]` positions, packed with the rest of the metadata (graphs included). The
//! vision tower's ops (vision.rs, kernels/vision.cu): LayerNorm, exact GELU, the bicubic
//! position-table resampling, and 2-D-rope attention within each image (query-tiled like the
//! prefill kernel, f32 throughout). Not yet here: attention on tensor cores.
//!
//! Nothing in this module has run on a GPU yet (see docs/BENCHMARKS.md and `tests/cuda_fixtures.rs`).
//! Every kernel has run on the CPU, though, under a small emulation of CUDA C++
//! (`tests/emu`, `tests/cuda_kernels_emulated.rs`), against the CPU backend and the host sampler.

pub mod compile;
mod graph;
mod host;
mod meta;
mod ops;
mod vision;

pub use host::CudaHostAllocator;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use half::bf16;

use super::KvCacheShape;
use crate::error::{Error, Result};
use crate::memory::{HostVec, PinnedPool, PinnedPoolConfig};
use crate::model::ModelConfig;

/// Bytes of the fixed cuBLAS workspace (NVIDIA's recommendation for Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// How to build a [`CudaBackend`].
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Fraction of the device's total memory the engine may use (weights, activations, KV cache),
    /// like vLLM's `gpu_memory_utilization`.
    pub memory_utilization: f32,
    /// Directory of the compiled-kernel cache; `None` keeps compiled kernels in memory only.
    pub kernel_cache_dir: Option<PathBuf>,
    /// Replay decode steps from CUDA graphs (captured on first use per batch-size bucket);
    /// `false` launches every kernel of every step (vLLM's `--enforce-eager`).
    pub graphs: bool,
    /// Products of at most this many rows (decode batches) go to the skinny GEMV kernel
    /// (`kernels/gemv.cu`, at most [`GEMV_MAX_ROWS`]) instead of cuBLAS; 0 (the default) sends
    /// every product to cuBLAS. On an H200 (docs/BENCHMARKS.md section 6) the kernel's first
    /// version made a 9B batch-1 step 15.8 ms against cuBLAS's 10.9; the version with deeper
    /// loads is not measured on a GPU yet, so it stays opt-in (`e2e --cuda-gemv-max-rows 8`).
    pub gemv_max_rows: usize,
}

/// The most rows `kernels/gemv.cu` takes (its `GEMV_MAX_ROWS`).
pub const GEMV_MAX_ROWS: usize = 8;

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            memory_utilization: 0.9,
            kernel_cache_dir: compile::default_cache_dir(),
            graphs: true,
            gemv_max_rows: 0,
        }
    }
}

/// An f32 activation matrix on the device, row-major.
pub struct CudaTensor {
    /// Rows (tokens).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    data: CudaSlice<f32>,
    /// The same values rounded to bf16, when the op that made the tensor wrote them (the GEMM
    /// operand of `linear`); dropped by ops that change the tensor in place.
    bf16: Option<CudaSlice<bf16>>,
}

enum WeightData {
    /// Matrices: the GEMM operand type.
    Bf16(CudaSlice<bf16>),
    /// Vectors (norm weights, biases): kept exact.
    F32(CudaSlice<f32>),
}

/// A parameter on the device: 2-D tensors as bf16, 1-D as f32.
pub struct CudaWeight {
    shape: Vec<usize>,
    data: WeightData,
}

/// The paged KV cache: per layer, bf16 keys and values as `[slots, kv_heads * head_dim]`.
pub struct CudaKvCache {
    shape: KvCacheShape,
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
    /// Unique per cache: the key of the graphs captured on it.
    id: u64,
    /// Graphs captured on this cache hold a `Weak` of it and are dropped once it is gone.
    alive: Arc<()>,
}

/// The metadata of one batch on the device, read by every op of a forward pass. Its buffers
/// outlive the batch: the next batch is packed into the same pinned staging buffer and copied
/// into the same device buffer (grown when too small; never, for a graph's).
struct DeviceBatch {
    /// The packed metadata in page-locked memory (from the backend's pinned pool).
    staging: HostVec<u32>,
    layout: meta::MetaLayout,
    /// Whether `meta` holds what `staging` holds (false while a new batch is being uploaded).
    uploaded: bool,
    /// Recorded after the last copy from `staging`: it must complete before the staging buffer
    /// is packed again.
    copied: Option<CudaEvent>,
    /// The packed metadata on the device; at least as long as `staging`.
    meta: CudaSlice<u32>,
    /// Largest context length in the batch.
    max_context: usize,
    /// Most query tokens of one sequence in the batch (1 for a decode step).
    longest_query: usize,
    /// The KV-cache shape the batch was checked against (`check_batch`), if any yet.
    checked: Option<KvCacheShape>,
    /// Owned by a decode graph: buffers at fixed addresses, no events (the graph orders its
    /// launches), attention split for the longest context the block tables can hold.
    graph: bool,
    /// Rows of the embedding table the ids were last read for (0: not read from here).
    embed_rows: usize,
}

impl DeviceBatch {
    fn new(backend: &CudaBackend, graph: bool) -> Result<DeviceBatch> {
        Ok(DeviceBatch {
            staging: HostVec::with_capacity_in(&backend.pinned, 0)?,
            layout: meta::MetaLayout::default(),
            uploaded: false,
            copied: None,
            meta: backend.alloc::<u32>(1, "batch metadata")?,
            max_context: 0,
            longest_query: 0,
            checked: None,
            graph,
            embed_rows: 0,
        })
    }
}

/// What `sample_rows` moves between host and device, kept across steps: the per-row parameters
/// (staged in page-locked memory, copied asynchronously) and the sampled tokens (copied back into
/// page-locked memory that is not write-combined, so the host reads it at full speed).
struct SampleBuffers {
    params: HostVec<f64>,
    ids: HostVec<u32>,
    dev_params: CudaSlice<f64>,
    dev_ids: CudaSlice<u32>,
}

/// Rope inverse frequencies by the (rotary_dim, theta bits) they were made for.
type RopeTables = HashMap<(usize, u32), CudaSlice<f32>>;

/// A CUDA device with its stream, cuBLAS handle and compiled kernels.
pub struct CudaBackend {
    /// First, so captured graphs are destroyed before the modules and buffers they use.
    graphs: Mutex<graph::Graphs>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Kept alive for cuBLAS (registered with `cublasSetWorkspace_v2`).
    _workspace: CudaSlice<u8>,
    functions: HashMap<&'static str, CudaFunction>,
    options: CudaOptions,
    /// Compute capability as `major * 10 + minor`.
    arch: u32,
    sm_count: usize,
    max_shared_per_block: usize,
    /// Dynamic shared memory `paged_attention_prefill` may use (opted in at start-up).
    prefill_smem_cap: usize,
    device_name: String,
    /// Page-locked host buffers (`cuMemHostAlloc`) for what is copied to the device.
    pinned: PinnedPool,
    batch: Mutex<Option<DeviceBatch>>,
    rope: Mutex<RopeTables>,
    sampling: Mutex<Option<SampleBuffers>>,
    /// The last vision batch's metadata on the device (vision.rs).
    vision: Mutex<Option<vision::VisionMeta>>,
    /// `Backend::copy_rows` calls so far: a decode step that made one is not captured (graph.rs).
    row_copies: std::sync::atomic::AtomicU64,
    /// Copies between the device and pageable host memory so far (weights, logits for logprobs,
    /// ops called outside a forward pass): a steady decode step makes none.
    pageable_copies: std::sync::atomic::AtomicU64,
}

fn unavailable(what: impl std::fmt::Display) -> Error {
    Error::CudaUnavailable(what.to_string())
}

fn driver_err(op: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("{op}: {e}"))
}

/// Checks that the driver, device `ordinal`, NVRTC and cuBLAS can all be used, without any call
/// that could panic. Returns the number of devices.
pub fn probe(ordinal: usize) -> Result<usize> {
    probe_libraries(ordinal).map_err(|e| match e {
        Error::CudaUnavailable(reason) => unavailable(format!("cuda:{ordinal}: {reason}")),
        other => other,
    })
}

fn probe_libraries(ordinal: usize) -> Result<usize> {
    // SAFETY: only tries to dlopen the candidate names of libcuda; nothing is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "the NVIDIA driver library (libcuda.so) was not found: no driver is installed or it \
             is not on the library path",
        ));
    }
    cudarc::driver::result::init().map_err(|e| unavailable(format!("cuInit failed: {e}")))?;
    let count = CudaContext::device_count()
        .map_err(|e| unavailable(format!("cannot count CUDA devices: {e}")))?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err(unavailable("the driver reports no CUDA device"));
    }
    if ordinal >= count {
        return Err(unavailable(format!(
            "the driver reports {count} device(s) (cuda:0..cuda:{})",
            count - 1
        )));
    }
    if !compile::nvrtc_available() {
        return Err(unavailable(
            "libnvrtc (libnvrtc.so.13) was not found: install the CUDA toolkit or \
             `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH",
        ));
    }
    // SAFETY: only tries to dlopen the candidate names of libcublas.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable(
            "libcublas (libcublas.so.13) was not found: install the CUDA toolkit or \
             `pip install nvidia-cublas` and add its lib directory to LD_LIBRARY_PATH",
        ));
    }
    Ok(count)
}

/// Bytes the model's weights take on this backend (bf16 matrices, f32 vectors).
pub fn weight_bytes(c: &ModelConfig) -> usize {
    let (h, hd, f, v) = (c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let matrices = (q + 2 * kv) * h + h * q + 2 * f * h + h * f;
    let mut vectors = 2 * h + if c.has_post_norms() { 2 * h } else { 0 };
    if c.attention_bias {
        vectors += q + 2 * kv;
    }
    let lm_head = if c.tie_word_embeddings { 0 } else { v * h };
    c.num_layers * (2 * matrices + 4 * vectors) + 2 * (v * h + lm_head) + 4 * h
}

impl CudaBackend {
    /// Opens device `options.ordinal`, compiles (or loads cached) kernels and sets up cuBLAS.
    /// Anything missing (driver, device, library) is [`Error::CudaUnavailable`], never a panic.
    pub fn new(options: CudaOptions) -> Result<CudaBackend> {
        if !(options.memory_utilization > 0.0 && options.memory_utilization <= 1.0) {
            return Err(Error::config(
                "cuda.memory_utilization",
                format!("{} (must be in (0, 1])", options.memory_utilization),
            ));
        }
        probe(options.ordinal)?;
        // A symbol missing from an old driver or library still panics inside cudarc: contain it.
        match std::panic::catch_unwind(|| Self::open(options)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(unavailable(format!(
                    "the CUDA libraries failed while starting: {msg}"
                )))
            }
        }
    }

    fn open(options: CudaOptions) -> Result<CudaBackend> {
        let n = options.ordinal;
        let ctx = CudaContext::new(n).map_err(|e| unavailable(format!("cuda:{n}: {e}")))?;
        // SAFETY: called before any allocation or stream exists; this backend orders all its
        // work on one stream and synchronizes before reading results.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("cuda:{n}: cannot create a stream: {e}")))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| unavailable(format!("cuda:{n}: compute capability: {e}")))?;
        if major < 8 {
            return Err(unavailable(format!(
                "cuda:{n} has compute capability {major}.{minor}; bf16 kernels need 8.0 or newer"
            )));
        }
        let arch = (major * 10 + minor) as u32;
        let attr = |a| ctx.attribute(a).map(|v| v.max(0) as usize);
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(1);
        let max_shared_per_block =
            attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK).unwrap_or(48 << 10);
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        keep_pool_memory(&ctx);

        let mut functions = HashMap::new();
        let cache_dir = options.kernel_cache_dir.as_deref();
        for m in compile::MODULES {
            let load = |bin: Vec<u8>| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin));
            let (bin, origin) = compile::cubin(m, arch, cache_dir)?;
            let module = match load(bin) {
                Ok(module) => module,
                Err(e) if origin != compile::CubinOrigin::Compiled => {
                    // A stale or damaged cached cubin: compile afresh once.
                    tracing::warn!(
                        target: "autoglm::cuda",
                        module = m.name,
                        error = %e,
                        "cached kernels rejected; recompiling"
                    );
                    compile::evict(m, arch, cache_dir);
                    let (bin, _) = compile::cubin(m, arch, cache_dir)?;
                    load(bin).map_err(driver_err(m.name))?
                }
                Err(e) => return Err(driver_err(m.name)(e)),
            };
            for f in m.functions {
                let func = module
                    .load_function(f)
                    .map_err(|e| Error::Backend(format!("{}: kernel {f}: {e}", m.name)))?;
                functions.insert(*f, func);
            }
        }

        // The prefill kernel may use more than the default 48 KiB of shared memory where the
        // device lets a block opt in.
        let optin = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).unwrap_or(0);
        let mut prefill_smem_cap = (48 << 10).min(max_shared_per_block);
        let cap = optin.min(ops::PREFILL_SMEM_CAP);
        if cap > prefill_smem_cap {
            let set = functions.get("paged_attention_prefill").map(|f| {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cap as i32,
                )
            });
            if let Some(Ok(())) = set {
                prefill_smem_cap = cap;
            }
        }

        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| unavailable(format!("cuda:{n}: cuBLAS: {e}")))?;
        // SAFETY: uninitialised scratch memory is what a cuBLAS workspace is.
        let workspace = unsafe { stream.alloc::<u8>(CUBLAS_WORKSPACE_BYTES) }
            .map_err(driver_err("cuBLAS workspace"))?;
        {
            let (ptr, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both are fields of the backend,
            // and the handle is dropped first as it is declared earlier).
            let status = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            };
            status
                .result()
                .map_err(|e| Error::Backend(format!("cublasSetWorkspace: {e}")))?;
        }
        let pinned = PinnedPool::new(
            Arc::new(host::CudaHostAllocator::new(ctx.clone())),
            PinnedPoolConfig::default(),
        )?;
        let graphs = Mutex::new(graph::Graphs::new(options.graphs));
        Ok(CudaBackend {
            pageable_copies: Default::default(),
            graphs,
            pinned,
            ctx,
            stream,
            blas,
            _workspace: workspace,
            functions,
            options,
            arch,
            sm_count,
            max_shared_per_block,
            prefill_smem_cap,
            device_name,
            batch: Mutex::new(None),
            rope: Mutex::new(HashMap::new()),
            sampling: Mutex::new(None),
            vision: Mutex::new(None),
            row_copies: Default::default(),
        })
    }

    /// The device's name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Compute capability as `major * 10 + minor` (90 for Hopper).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))
    }

    /// Checks that `model_bytes` of weights fit in the memory this engine may use; the error
    /// names both sizes.
    pub fn check_fits(&self, model_bytes: usize) -> Result<()> {
        let (free, total) = self.memory_info()?;
        let allowed = (total as f64 * self.options.memory_utilization as f64) as usize;
        let usable = free.min(allowed);
        if model_bytes > usable {
            return Err(Error::Backend(format!(
                "the model's weights need {} MiB on {} but only {} MiB can be used \
                 ({} MiB free of {} MiB, memory utilization {})",
                model_bytes >> 20,
                self.name_with_ordinal(),
                usable >> 20,
                free >> 20,
                total >> 20,
                self.options.memory_utilization
            )));
        }
        Ok(())
    }

    fn name_with_ordinal(&self) -> String {
        format!("cuda:{}", self.options.ordinal)
    }

    /// Device-to-device copy bandwidth in bytes (read plus written) per second: the best of
    /// `runs` copies of `bytes` after one warm-up copy. The roofline's bandwidth.
    pub fn copy_bandwidth(&self, bytes: usize, runs: usize) -> Result<f64> {
        let n = (bytes / 4).max(1);
        let src = self.alloc::<f32>(n, "the bandwidth probe")?;
        let mut dst = self.alloc::<f32>(n, "the bandwidth probe")?;
        let mut best = 0f64;
        for i in 0..=runs {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver_err("bandwidth probe"))?;
            self.synchronize()?;
            if i > 0 {
                best = best.max(2.0 * (n * 4) as f64 / t.elapsed().as_secs_f64());
            }
        }
        Ok(best)
    }

    /// Copies made between the device and pageable host memory since the backend started. The
    /// batch metadata, sampling parameters and sampled ids move through pinned buffers instead,
    /// so a decode step without logprobs adds nothing here.
    pub fn pageable_copies(&self) -> u64 {
        self.pageable_copies
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn row_copies(&self) -> u64 {
        self.row_copies.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_pageable_copy(&self) {
        self.pageable_copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| Error::Backend(format!("kernel {name} is not loaded")))
    }

    /// An uninitialised device buffer of `len` elements (at least one: zero-size allocations are
    /// invalid in CUDA). The error names the size.
    fn alloc<T: cudarc::driver::DeviceRepr>(&self, len: usize, what: &str) -> Result<CudaSlice<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: every caller writes the buffer (kernel output, copy target) before reading it.
        unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(|e| {
            Error::Backend(format!(
                "cannot allocate {} MiB ({bytes} bytes) on {} for {what}: {e}",
                bytes >> 20,
                self.name_with_ordinal()
            ))
        })
    }

    fn upload_slice<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let mut dev = self.alloc::<T>(host.len(), what)?;
        if !host.is_empty() {
            self.count_pageable_copy();
            self.stream
                .memcpy_htod(host, &mut dev)
                .map_err(driver_err(what))?;
        }
        Ok(dev)
    }
}

/// Lets the stream-ordered allocator keep freed memory instead of returning it to the driver at
/// every synchronization (the default threshold is 0), so per-step activations are cheap.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a live out-parameter; the device handle comes from a live context.
    let got = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if got != sys::CUresult::CUDA_SUCCESS || pool.is_null() {
        return;
    }
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the attribute takes a pointer to a u64, which `threshold` is.
    let _ = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glm4_9b() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/glm4-tiny/config.json");
        let mut c = ModelConfig::from_file(&dir).unwrap();
        c.hidden_size = 4096;
        c.num_layers = 40;
        c.num_heads = 32;
        c.num_kv_heads = 2;
        c.head_dim = 128;
        c.intermediate_size = 13696;
        c.vocab_size = 151552;
        c.tie_word_embeddings = false;
        c
    }

    #[test]
    fn weight_bytes_of_a_9b_model_are_about_19_gb() {
        let b = weight_bytes(&glm4_9b()) as f64;
        // GLM-4-9B has 9.4e9 parameters: 18.8 GB in bf16.
        assert!((18.0e9..19.5e9).contains(&b), "{b}");
    }

    /// On a machine without a driver the probe reports why, and nothing panics.
    #[test]
    fn probe_without_a_gpu_reports_a_reason() {
        match probe(0) {
            Ok(n) => assert!(n > 0),
            Err(Error::CudaUnavailable(reason)) => assert!(!reason.is_empty()),
            Err(e) => panic!("unexpected error {e}"),
        }
        match probe(1 << 20) {
            Err(Error::CudaUnavailable(reason)) => assert!(!reason.is_empty()),
            other => panic!("cuda:{} cannot exist: {other:?}", 1 << 20),
        }
    }
}
