//! The vision tower's own operations on the CPU: the bicubic position-table resampling and the
//! 2-D-rope, per-image, unmasked attention.
//!
//! Attention runs one rayon task per (patch, head) over the patches of that patch's image, as the
//! text attention does over a context; no `[N, N]` matrix is kept. An image of N patches costs
//! O(N^2 * width) per layer, which for a full phone screenshot (~13,000 patches) is the tower's
//! largest cost after its GEMMs.

use rayon::prelude::*;

use super::attention::dot;
use super::{CpuTensor, CpuWeight};
use crate::backend::{pos_embed_taps, rope_inv_freq, VisionAttentionShape};
use crate::error::{Error, Result};
use crate::runner::VisionBatch;

fn bad(op: &str, msg: String) -> Error {
    Error::Backend(format!("{op}: {msg}"))
}

pub(super) fn interpolate_pos_embed(
    table: &CpuWeight,
    side: usize,
    batch: &VisionBatch,
) -> Result<CpuTensor> {
    let rows = batch.num_patches();
    batch.check("interpolate_pos_embed", rows)?;
    if table.rows() != side * side {
        return Err(bad(
            "interpolate_pos_embed",
            format!("table of {} rows for a {side}x{side} grid", table.rows()),
        ));
    }
    let width = table.cols();
    let image = batch.image_of_rows();
    let mut out = vec![0f32; rows * width];
    out.par_chunks_mut(width).enumerate().for_each_init(
        || vec![0f32; width],
        |line, (r, o)| {
            let [(yi, yw), (xi, xw)] =
                pos_embed_taps(side, batch.grids[image[r] as usize], batch.patch_hw[r]);
            // As PyTorch does: along x within each of the 4 rows, then along y.
            for (&y, &wy) in yi.iter().zip(&yw) {
                line.fill(0.0);
                for (&x, &wx) in xi.iter().zip(&xw) {
                    let src = &table.data[(y * side + x) * width..(y * side + x + 1) * width];
                    for (l, &v) in line.iter_mut().zip(src) {
                        *l += wx * v;
                    }
                }
                for (o, &l) in o.iter_mut().zip(line.iter()) {
                    *o += wy * l;
                }
            }
        },
    );
    Ok(CpuTensor::new(rows, width, out))
}

/// NeoX-halves rotation of one head: dims `d` and `d + half` turn together, dims of the first
/// quarter of each half by the patch's row, the second quarter by its column.
fn rope_2d(head: &mut [f32], inv_freq: &[f32], hw: [u32; 2]) {
    let half = head.len() / 2;
    let quarter = inv_freq.len();
    for d in 0..half {
        let angle = if d < quarter {
            hw[0] as f32 * inv_freq[d]
        } else {
            hw[1] as f32 * inv_freq[d - quarter]
        };
        let (sin, cos) = angle.sin_cos();
        let (a, b) = (head[d], head[d + half]);
        head[d] = a * cos - b * sin;
        head[d + half] = b * cos + a * sin;
    }
}

pub(super) fn vision_attention(
    qkv: &CpuTensor,
    batch: &VisionBatch,
    s: &VisionAttentionShape,
) -> Result<CpuTensor> {
    let (nh, hd) = (s.num_heads, s.head_dim);
    let w = nh * hd;
    if qkv.cols != 3 * w || hd % 4 != 0 {
        return Err(bad(
            "vision_attention",
            format!("qkv of width {} for {nh} heads of {hd}", qkv.cols),
        ));
    }
    batch.check("vision_attention", qkv.rows)?;
    let inv_freq = rope_inv_freq(hd / 2, s.rope_theta);
    // Rotated q and k, as [rows, w] each; v read in place.
    let mut q = vec![0f32; qkv.rows * w];
    let mut k = vec![0f32; qkv.rows * w];
    q.par_chunks_mut(w)
        .zip(k.par_chunks_mut(w))
        .zip(qkv.data.par_chunks(qkv.cols))
        .zip(batch.patch_hw.par_iter())
        .for_each(|(((q, k), row), &hw)| {
            q.copy_from_slice(&row[..w]);
            k.copy_from_slice(&row[w..2 * w]);
            for h in 0..nh {
                rope_2d(&mut q[h * hd..(h + 1) * hd], &inv_freq, hw);
                rope_2d(&mut k[h * hd..(h + 1) * hd], &inv_freq, hw);
            }
        });
    let image = batch.image_of_rows();
    let cols = qkv.cols;
    let mut out = vec![0f32; qkv.rows * w];
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (t, head) = (idx / nh, idx % nh);
            let img = image[t] as usize;
            let (j0, j1) = (
                batch.cu_seqlens[img] as usize,
                batch.cu_seqlens[img + 1] as usize,
            );
            let off = head * hd;
            let qh = &q[t * w + off..t * w + off + hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in j0..j1 {
                let sc = dot(qh, &k[j * w + off..j * w + off + hd]) * s.scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            for (j, &p) in (j0..j1).zip(scores.iter()) {
                let v = &qkv.data[j * cols + 2 * w + off..j * cols + 2 * w + off + hd];
                let p = p * inv;
                for (o, &v) in o.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        });
    Ok(CpuTensor::new(qkv.rows, w, out))
}
