//! The Glm4v vision tower (`Glm4vVisionModel`), written once against [`Backend`].
//!
//! Patches (1176 values each, in 2x2 merge-block order) go through: the patch embedding (the
//! Conv3d as one GEMM), RMSNorm, plus the learned position table resampled bicubically to the
//! image's grid; `depth` pre-norm blocks of 2-D-rope attention within each image and a SwiGLU MLP;
//! a final RMSNorm; the 2x2 downsample (the Conv2d as one GEMM over 4 consecutive rows); and the
//! merger (linear, LayerNorm, exact GELU, SwiGLU). Its output rows are text-embedding-space tokens,
//! one per 2x2 block, that replace the `<|image|>` placeholders of the prompt.
//!
//! Cost per image of N patches: about `2 N (1176 h + depth (4 h^2 + 3 h o) + ...)` FLOP for the
//! GEMMs plus `4 N^2 h depth` for attention ([`VisionModel::flops`]).

use super::{load_stacked, HostTensor, Renamed, VisionConfig, WeightSource};
use crate::backend::{Backend, VisionAttentionShape};
use crate::error::{Error, Result};
use crate::runner::VisionBatch;

/// Rows `src_row..src_row + len` of an encoded image's features, to be written over the batch's
/// rows `dst_row..dst_row + len` (its placeholders).
pub struct ImageRows<'a, T> {
    /// The image's features, one row per merged token.
    pub embeds: &'a T,
    /// First feature row used.
    pub src_row: usize,
    /// First batch row replaced.
    pub dst_row: usize,
    /// Rows replaced.
    pub len: usize,
}

struct VisionBlock<B: Backend> {
    norm1: B::Weight,
    qkv: B::Weight,
    proj: B::Weight,
    norm2: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
}

/// A loaded vision tower on backend `B`.
pub struct VisionModel<B: Backend> {
    config: VisionConfig,
    patch_embed: B::Weight,
    patch_bias: B::Weight,
    post_conv_norm: B::Weight,
    pos_table: B::Weight,
    blocks: Vec<VisionBlock<B>>,
    post_norm: B::Weight,
    downsample: B::Weight,
    downsample_bias: B::Weight,
    merger_proj: B::Weight,
    merger_norm: B::Weight,
    merger_norm_bias: B::Weight,
    merger_gate_up: B::Weight,
    merger_down: B::Weight,
    attn: VisionAttentionShape,
}

/// The merger's LayerNorm epsilon (fixed in transformers' code).
const MERGER_LN_EPS: f32 = 1e-5;

impl<B: Backend> VisionModel<B> {
    /// Loads the tower's weights (`model.visual.*` or `visual.*`).
    pub fn from_source(config: &VisionConfig, src: &dyn WeightSource, backend: &B) -> Result<Self> {
        let src = Renamed::new(
            src,
            "visual.patch_embed.proj.weight",
            &[("visual.", "model.visual.")],
        );
        let src: &dyn WeightSource = &src;
        let c = config;
        let (h, o, i) = (c.hidden_size, c.out_hidden_size, c.intermediate_size);
        let m = c.spatial_merge_size * c.spatial_merge_size;
        let load = |parts: &[(String, Vec<usize>)]| load_stacked(src, backend, parts);
        let one = |name: &str, shape: &[usize]| load(&[(format!("visual.{name}"), shape.to_vec())]);
        // A convolution's weight read in its checkpoint shape and used as a linear map of
        // `shape[0] x rest`, its input order permuted by `perm` (new column -> old column).
        let conv = |name: &str, shape: &[usize], perm: Option<&dyn Fn(usize) -> usize>| {
            let name = format!("visual.{name}");
            let rows = shape[0];
            let cols = shape[1..].iter().product::<usize>();
            if let Some(fill) = src.generator(&name) {
                let parts = [super::FillPart { rows, fill }];
                if let Some(w) = backend.generate(&[rows, cols], &parts) {
                    return w;
                }
            }
            let t = src.tensor(&name, shape)?;
            let data = match perm {
                None => t.data.to_vec(),
                Some(p) => {
                    let mut out = vec![0f32; rows * cols];
                    for (dst, srow) in out.chunks_exact_mut(cols).zip(t.data.chunks_exact(cols)) {
                        for (j, d) in dst.iter_mut().enumerate() {
                            *d = srow[p(j)];
                        }
                    }
                    out
                }
            };
            backend.upload(HostTensor::owned(vec![rows, cols], data))
        };
        let (p, t) = (c.patch_size, c.temporal_patch_size);
        let patch_embed = conv(
            "patch_embed.proj.weight",
            &[h, c.in_channels, t, p, p],
            None,
        )?;
        // The Conv2d's input is (channel, kh, kw); four consecutive rows of a 2x2 block side by
        // side are (kh * 2 + kw, channel).
        let perm = |j: usize| (j % h) * m + j / h;
        let downsample = conv(
            "downsample.weight",
            &[o, h, c.spatial_merge_size, c.spatial_merge_size],
            Some(&perm),
        )?;
        let side = c.num_positions_side();
        let mut blocks = Vec::with_capacity(c.depth);
        for b in 0..c.depth {
            let n = |name: &str| format!("visual.blocks.{b}.{name}");
            blocks.push(VisionBlock {
                norm1: load(&[(n("norm1.weight"), vec![h])])?,
                qkv: load(&[(n("attn.qkv.weight"), vec![3 * h, h])])?,
                proj: load(&[(n("attn.proj.weight"), vec![h, h])])?,
                norm2: load(&[(n("norm2.weight"), vec![h])])?,
                gate_up: load(&[
                    (n("mlp.gate_proj.weight"), vec![o, h]),
                    (n("mlp.up_proj.weight"), vec![o, h]),
                ])?,
                down: load(&[(n("mlp.down_proj.weight"), vec![h, o])])?,
            });
        }
        Ok(VisionModel {
            config: c.clone(),
            patch_embed,
            patch_bias: one("patch_embed.proj.bias", &[h])?,
            post_conv_norm: one("post_conv_layernorm.weight", &[h])?,
            pos_table: one("embeddings.position_embedding.weight", &[side * side, h])?,
            blocks,
            post_norm: one("post_layernorm.weight", &[h])?,
            downsample,
            downsample_bias: one("downsample.bias", &[o])?,
            merger_proj: one("merger.proj.weight", &[o, o])?,
            merger_norm: one("merger.post_projection_norm.weight", &[o])?,
            merger_norm_bias: one("merger.post_projection_norm.bias", &[o])?,
            merger_gate_up: load(&[
                ("visual.merger.gate_proj.weight".into(), vec![i, o]),
                ("visual.merger.up_proj.weight".into(), vec![i, o]),
            ])?,
            merger_down: one("merger.down_proj.weight", &[o, i])?,
            attn: VisionAttentionShape {
                num_heads: c.num_heads,
                head_dim: c.head_dim(),
                rope_theta: c.rope_theta,
                scale: (c.head_dim() as f32).powf(-0.5),
            },
        })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The batch metadata of images of patch grids `grids` (`[gh, gw]` each), stacked.
    pub fn batch(&self, grids: &[[usize; 2]]) -> Result<VisionBatch> {
        let m = self.config.spatial_merge_size;
        let mut batch = VisionBatch::default();
        for &[gh, gw] in grids {
            if gh == 0 || gw == 0 || gh % m != 0 || gw % m != 0 {
                return Err(Error::Image(format!(
                    "a grid of {gh}x{gw} patches does not split into {m}x{m} blocks"
                )));
            }
            batch.push_image([gh as u32, gw as u32], &merge_block_positions(gh, gw, m));
        }
        Ok(batch)
    }

    /// Encodes the images of `batch` whose patches are `pixel_values` (`[patches, 1176]`,
    /// row-major): one output row per merged token, in order.
    pub fn encode(
        &self,
        backend: &B,
        pixel_values: &[f32],
        batch: &VisionBatch,
    ) -> Result<B::Tensor> {
        let stages = self.encode_stages(backend, pixel_values, batch, &mut |_, _| Ok(()))?;
        Ok(stages)
    }

    /// [`VisionModel::encode`], handing each named intermediate result to `inspect` (for
    /// comparisons with the reference stage by stage).
    pub fn encode_stages(
        &self,
        backend: &B,
        pixel_values: &[f32],
        batch: &VisionBatch,
        inspect: &mut dyn FnMut(&str, &B::Tensor) -> Result<()>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let n = batch.num_patches();
        let pd = c.patch_dim();
        if pixel_values.len() != n * pd {
            return Err(Error::Image(format!(
                "{} pixel values for {n} patches of {pd}",
                pixel_values.len()
            )));
        }
        let eps = c.rms_norm_eps;
        let x = backend.tensor_from_host(n, pd, pixel_values)?;
        let x = backend.linear(&x, &self.patch_embed, Some(&self.patch_bias))?;
        inspect("vision.patch_embed", &x)?;
        let mut residual = backend.rms_norm(&x, &self.post_conv_norm, eps)?;
        inspect("vision.post_conv_layernorm", &residual)?;
        let pos = backend.interpolate_pos_embed(&self.pos_table, c.num_positions_side(), batch)?;
        inspect("vision.pos_embed_interpolated", &pos)?;
        let first = self.blocks.first().map_or(&self.post_norm, |b| &b.norm1);
        let mut h = backend.add_rms_norm(&mut residual, &pos, first, eps)?;
        inspect("vision.embeddings", &residual)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let qkv = backend.linear(&h, &block.qkv, None)?;
            let a = backend.vision_attention(&qkv, batch, &self.attn)?;
            let a = backend.linear(&a, &block.proj, None)?;
            h = backend.add_rms_norm(&mut residual, &a, &block.norm2, eps)?;
            let gu = backend.linear(&h, &block.gate_up, None)?;
            let act = backend.silu_mul(&gu)?;
            let mlp = backend.linear(&act, &block.down, None)?;
            let next = self.blocks.get(i + 1).map_or(&self.post_norm, |b| &b.norm1);
            h = backend.add_rms_norm(&mut residual, &mlp, next, eps)?;
            inspect(&format!("vision.block.{i}"), &residual)?;
        }
        inspect("vision.post_layernorm", &h)?;
        let m = c.spatial_merge_size * c.spatial_merge_size;
        let grouped = backend.group_rows(h, m)?;
        let d = backend.linear(&grouped, &self.downsample, Some(&self.downsample_bias))?;
        inspect("vision.downsample", &d)?;
        let p = backend.linear(&d, &self.merger_proj, None)?;
        let p = backend.layer_norm(&p, &self.merger_norm, &self.merger_norm_bias, MERGER_LN_EPS)?;
        let p = backend.gelu(&p)?;
        let gu = backend.linear(&p, &self.merger_gate_up, None)?;
        let act = backend.silu_mul(&gu)?;
        let out = backend.linear(&act, &self.merger_down, None)?;
        inspect("vision.merger", &out)?;
        Ok(out)
    }

    /// Floating-point operations of one image of `patches` patches ([`VisionConfig::flops`]).
    pub fn flops(&self, patches: usize) -> f64 {
        self.config.flops(patches)
    }
}

/// `[h, w]` of each patch of a `gh x gw` grid in merge-block order: blocks of `m x m` patches
/// row-major over the grid, the patches of a block row-major within it (the order of
/// `pixel_values` rows).
pub fn merge_block_positions(gh: usize, gw: usize, m: usize) -> Vec<[u32; 2]> {
    let mut out = Vec::with_capacity(gh * gw);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for ih in 0..m {
                for iw in 0..m {
                    out.push([(bh * m + ih) as u32, (bw * m + iw) as u32]);
                }
            }
        }
    }
    out
}
