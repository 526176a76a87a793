//! The small set of fused operations the GLM model is written against.
//!
//! The model (`model::glm`) calls only these; a backend owns its tensors and KV cache. The CPU
//! backend is the numerical reference (f32 everywhere); other backends are tested against it.

pub mod cpu;
pub mod cuda;
pub mod null;

use crate::error::{Error, Result};
use crate::memory::{HostAllocator, MmapAllocator};
use crate::model::{FillPart, HostTensor};
use crate::runner::ForwardBatch;

/// Shape of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Bytes of one block across all layers, keys and values, at `bytes_per_elem`.
    pub fn block_bytes(&self, bytes_per_elem: usize) -> usize {
        2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * bytes_per_elem
    }
}

/// Attention geometry of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Leading dims of each head rotated by rope (interleaved pairs).
    pub rotary_dim: usize,
    /// Rope base.
    pub rope_theta: f32,
    /// Softmax scale, usually `head_dim^-0.5`.
    pub scale: f32,
}

/// How [`Backend::sample_rows`] turns one row of logits into a token: the host sampler's
/// temperature, top-k, top-p and min-p (`sampling::sample`), with the uniform draw made on the
/// host from the sequence's RNG. Among the kept tokens each is drawn with probability
/// proportional to `exp(logit / temperature)`, as on the host; the token a given draw selects may
/// differ (the device walks the kept tokens in index order), so a seed repeats its output on the
/// same backend only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0: greedy (the first largest logit).
    pub temperature: f32,
    /// Keep the `top_k` largest logits; 0: all.
    pub top_k: usize,
    /// Keep the smallest set of the largest reaching this share of the mass; 1: all.
    pub top_p: f32,
    /// Keep tokens at least this likely relative to the most likely; 0: all.
    pub min_p: f32,
    /// A uniform draw in [0, 1) (unused when greedy).
    pub uniform: f64,
}

impl RowSampling {
    /// The largest logit.
    pub const GREEDY: RowSampling = RowSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        uniform: 0.0,
    };
}

/// Rope inverse frequencies as Hugging Face computes them (in f32).
pub fn rope_inv_freq(rotary_dim: usize, theta: f32) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / rotary_dim as f32))
        .collect()
}

/// One step's forward pass as [`Backend::run_step`] receives it.
pub type ForwardFn<'a, B> =
    dyn FnMut(&ForwardBatch, &mut <B as Backend>::KvCache) -> Result<<B as Backend>::Tensor> + 'a;

/// Fused operations on a device. Activations are `[rows, cols]` matrices, one row per token.
pub trait Backend: Send + Sync + 'static {
    /// A parameter resident on the device.
    type Weight: Send + Sync;
    /// An activation matrix.
    type Tensor: Send;
    /// The paged KV cache of all layers.
    type KvCache: Send;

    /// A short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;
    /// Takes a host tensor onto the device (converting to the backend's storage type).
    fn upload(&self, t: HostTensor) -> Result<Self::Weight>;
    /// Allocates a zeroed KV cache.
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache>;
    /// Rows `ids` of `table`.
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;
    /// `rmsnorm(x) * w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor>;
    /// `residual += x`, then returns `rmsnorm(residual) * w`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `x @ w^T + bias` for `w` of shape `[out, in]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor>;
    /// `silu(gate) * up` where each row of `gate_up` is `[gate | up]`.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rows `rows` of `x`, in order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor>;
    /// Applies rope to the q and k parts of a fused `[q | k | v]` activation, writes k and v into the
    /// cache of `layer` at the batch's slots, and returns causal attention over each sequence's context.
    fn attention(
        &self,
        qkv: &mut Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: &AttentionShape,
    ) -> Result<Self::Tensor>;
    /// Copies an activation to the host, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// Called by the model with the batch before the first op of each forward pass, so a device
    /// backend can copy all of its metadata (ids, positions, slots, block tables, logits rows)
    /// once. The default does nothing.
    fn prepare_batch(&self, batch: &ForwardBatch) -> Result<()> {
        let _ = batch;
        Ok(())
    }

    /// Runs one engine step: `forward` (the model's forward pass) on `batch` and `cache`,
    /// returning the logits of `batch.logits_indices`. A backend may instead replay a recording
    /// of an earlier call of the same shape (the CUDA backend's decode graphs). The default
    /// calls `forward`.
    fn run_step(
        &self,
        batch: &ForwardBatch,
        cache: &mut Self::KvCache,
        forward: &mut ForwardFn<'_, Self>,
    ) -> Result<Self::Tensor> {
        forward(batch, cache)
    }
    /// Where the engine's pinned pool (batch metadata) gets its host memory: page-locked memory
    /// the device can copy from by DMA. By default `mmap`ed, `mlock`ed memory.
    fn host_allocator(&self) -> std::sync::Arc<dyn HostAllocator> {
        std::sync::Arc::new(MmapAllocator::new())
    }

    /// Whether [`Backend::sample_rows`] picks tokens where the logits live: then a step whose
    /// sampled rows need nothing but their token (no logprobs, no penalties) copies no logits to
    /// the host.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// One token per row of `logits`, drawn as `rows` says (one entry per row), into `out`
    /// (cleared first). Called only when [`Backend::samples_on_device`] says so.
    fn sample_rows(
        &self,
        logits: &Self::Tensor,
        rows: &[RowSampling],
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let _ = (logits, rows, out);
        Err(Error::Backend(format!(
            "the {} backend does not sample on the device",
            self.name()
        )))
    }

    /// Builds a weight of `shape` from generator descriptions (dummy weights made on the device),
    /// one per part stacked along the first dimension. `None`: not supported here (the model then
    /// asks the weight source for host data).
    fn generate(&self, shape: &[usize], parts: &[FillPart]) -> Option<Result<Self::Weight>> {
        let _ = (shape, parts);
        None
    }

    /// Bytes per element of the KV cache (4 for f32, 2 for bf16).
    fn kv_cache_elem_bytes(&self) -> usize {
        4
    }

    /// Device memory left for the KV cache and activations once the weights are resident, when
    /// the backend manages its own memory; `None` for host memory (the engine then uses
    /// `cache.memory_bytes`).
    fn kv_cache_budget(&self) -> Result<Option<usize>> {
        Ok(None)
    }
}
