//! The small set of fused operations the GLM model is written against.
//!
//! The model (`model::glm`) calls only these; a backend owns its tensors and KV cache. The CPU
//! backend is the numerical reference (f32 everywhere); other backends are tested against it.

pub mod cpu;
pub mod cuda;
pub mod null;

use crate::error::{Error, Result};
use crate::memory::{HostAllocator, MmapAllocator};
use crate::model::{FillPart, HalfTensor, HostTensor};
use crate::runner::{ForwardBatch, VisionBatch};

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
    /// M-RoPE (Glm4v): frequencies `0..s[0]` rotate by the token's temporal position, the next
    /// `s[1]` by its height position and the last `s[2]` by its width position
    /// (`ForwardBatch::mrope_positions`). `None`: every frequency uses `ForwardBatch::positions`.
    pub mrope_section: Option<[usize; 3]>,
}

impl AttentionShape {
    /// Which of the three M-RoPE streams (0 t, 1 h, 2 w) rotates frequency `i`.
    pub fn mrope_stream(section: [usize; 3], i: usize) -> usize {
        if i < section[0] {
            0
        } else if i < section[0] + section[1] {
            1
        } else {
            2
        }
    }
}

/// Attention geometry of the vision tower: `[q | k | v]` rows of `num_heads` heads each, 2-D
/// rotary over the whole head (NeoX halves: the first quarter of each half rotates by the
/// patch's row, the second by its column), no causal mask, attention within each image only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VisionAttentionShape {
    /// Heads (q, k and v alike).
    pub num_heads: usize,
    /// Per-head width (a multiple of 4).
    pub head_dim: usize,
    /// Rotary base.
    pub rope_theta: f32,
    /// Softmax scale, `head_dim^-0.5`.
    pub scale: f32,
}

/// Where each row of [`Backend::interpolate_pos_embed`] samples the learned position table:
/// the bicubic taps (PyTorch's `grid_sample`, `align_corners=False`, border padding, A = -0.75)
/// of a patch at `(h, w)` in a `gh x gw` grid over a `side x side` table.
pub fn pos_embed_taps(side: usize, grid: [u32; 2], hw: [u32; 2]) -> [([usize; 4], [f32; 4]); 2] {
    let axis = |pos: u32, n: u32| -> ([usize; 4], [f32; 4]) {
        // grid_sample unnormalises g = (pos + 0.5) / n * 2 - 1 to x = ((g + 1) * side - 1) / 2.
        let g = (pos as f32 + 0.5) / n as f32 * 2.0 - 1.0;
        let x = ((g + 1.0) * side as f32 - 1.0) / 2.0;
        let x0 = x.floor();
        let t = x - x0;
        let a = -0.75f32;
        let near = |d: f32| ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0;
        let far = |d: f32| ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a;
        let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        let max = side as i64 - 1;
        let idx = [-1i64, 0, 1, 2].map(|k| (x0 as i64 + k).clamp(0, max) as usize);
        (idx, w)
    };
    [axis(hw[0], grid[0]), axis(hw[1], grid[1])]
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
    /// Whether `linear` and `embedding` compute with bf16/f16 weights as the checkpoint stores
    /// them, so the loader offers such matrices through [`Backend::upload_half`] unwidened.
    fn keeps_half_weights(&self) -> bool {
        false
    }
    /// A matrix read only by `linear` and `embedding`, given as 16-bit parts (one format) stacked
    /// along the first dimension. The default widens them to f32 and calls [`Backend::upload`].
    fn upload_half(&self, parts: Vec<HalfTensor>) -> Result<Self::Weight> {
        let mut wide: Vec<HostTensor> = parts.iter().map(HalfTensor::to_f32).collect();
        let t = if wide.len() == 1 {
            wide.pop().expect("one part")
        } else {
            HostTensor::concat_rows(&wide)
        };
        self.upload(t)
    }
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

    /// A `[rows, cols]` activation holding `data` (row-major), e.g. an image's patches.
    fn tensor_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Self::Tensor> {
        let _ = (rows, cols, data);
        Err(self.missing_op("tensor_from_host"))
    }

    /// `(x - mean) / sqrt(var + eps) * w + b` over each row (`nn.LayerNorm`).
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let _ = (x, w, b, eps);
        Err(self.missing_op("layer_norm"))
    }

    /// Exact (erf) GELU of every element.
    fn gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let _ = x;
        Err(self.missing_op("gelu"))
    }

    /// `[rows, cols]` viewed as `[rows / k, k * cols]`: each `k` consecutive rows side by side.
    fn group_rows(&self, x: Self::Tensor, k: usize) -> Result<Self::Tensor> {
        let _ = (x, k);
        Err(self.missing_op("group_rows"))
    }

    /// Overwrites rows `dst_row..dst_row + n` of `dst` with rows `src_row..src_row + n` of `src`
    /// (image features in place of placeholder embeddings).
    fn copy_rows(
        &self,
        dst: &mut Self::Tensor,
        dst_row: usize,
        src: &Self::Tensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        let _ = (dst, dst_row, src, src_row, n);
        Err(self.missing_op("copy_rows"))
    }

    /// The learned `[side * side, width]` position table sampled at each patch of `batch`
    /// ([`pos_embed_taps`]): one row per patch.
    fn interpolate_pos_embed(
        &self,
        table: &Self::Weight,
        side: usize,
        batch: &VisionBatch,
    ) -> Result<Self::Tensor> {
        let _ = (table, side, batch);
        Err(self.missing_op("interpolate_pos_embed"))
    }

    /// The vision tower's attention: 2-D rope on q and k of each `[q | k | v]` row (by the
    /// patch coordinates of `batch`), then softmax attention of every patch over all patches
    /// of its own image (no mask).
    fn vision_attention(
        &self,
        qkv: &Self::Tensor,
        batch: &VisionBatch,
        shape: &VisionAttentionShape,
    ) -> Result<Self::Tensor> {
        let _ = (qkv, batch, shape);
        Err(self.missing_op("vision_attention"))
    }

    /// The error of an operation this backend does not implement.
    fn missing_op(&self, op: &str) -> Error {
        Error::Backend(format!(
            "the {} backend does not implement `{op}` (needed by the vision tower)",
            self.name()
        ))
    }

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

    /// A second handle that may run the vision tower on another thread while this one runs the
    /// engine's steps, on the same weights; `None` (the default) where the two would share one
    /// queue or scratch space (a device stream), and images are encoded between steps instead.
    fn concurrent_handle(&self) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
}
