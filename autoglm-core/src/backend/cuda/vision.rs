//! The vision tower's operations on the CUDA backend (kernels/vision.cu): host checks, the
//! vision batch metadata on the device, and the launches. The CPU reference is
//! backend/cpu/vision.rs (and `layer_norm` / `gelu` in backend/cpu/mod.rs).
//!
//! A vision batch's metadata (patch coordinates, image of each row, `cu_seqlens`, grids) is packed
//! into one `u32` buffer and copied to the device once; the tower's position-table resampling and
//! every layer's attention then read that copy (kept while the same batch comes back). Host data
//! (the batch metadata, an image's patches) goes through a page-locked buffer from the backend's
//! pinned pool when it has one to give, else through a counted pageable copy: once per image.

use std::ops::Range;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::ops::{bad, grid_for, prefill_smem_bytes, rows_grid, u32_of};
use super::{driver_err, CudaBackend, CudaTensor, CudaWeight};
use crate::backend::VisionAttentionShape;
use crate::error::Result;
use crate::memory::HostVec;
use crate::runner::VisionBatch;

/// Threads per block of `vision_attention`.
const VISION_THREADS: u32 = 256;
/// Threads per block of `vision_rope`.
const ROPE_THREADS: u32 = 128;

/// The metadata of the last vision batch, on the device.
pub(super) struct VisionMeta {
    /// The batch it holds (compared with the next call's).
    batch: VisionBatch,
    meta: CudaSlice<u32>,
    /// `[h, w]` of each row.
    hw: Range<usize>,
    /// The image of each row.
    img: Range<usize>,
    /// Prefix sums of rows per image.
    cu_seqlens: Range<usize>,
    /// `[gh, gw]` of each image.
    grids: Range<usize>,
    /// Most rows of one image.
    longest: usize,
}

/// Dynamic shared memory of `vision_attention` for `qt` query rows a block, head width `d` and
/// `tile` key/value rows a tile: the layout of `paged_attention_prefill` with `qt` rows.
pub(super) fn vision_smem_bytes(qt: usize, d: usize, tile: usize) -> usize {
    prefill_smem_bytes(qt, d, tile)
}

/// Query rows per block and key/value rows per tile of `vision_attention` for heads of width
/// `d` within `cap` bytes of shared memory: as many query rows as fit (at most 16), then the
/// widest tile. `None` when a single row does not fit.
pub(super) fn vision_tiling(d: usize, cap: usize) -> Option<(usize, usize)> {
    [16usize, 8, 4, 2, 1].into_iter().find_map(|qt| {
        [64usize, 32, 16, 8]
            .into_iter()
            .find(|&t| vision_smem_bytes(qt, d, t) <= cap)
            .map(|t| (qt, t))
    })
}

impl CudaBackend {
    /// A device copy of `host`: through a page-locked staging buffer from the backend's pool
    /// (waited for before the buffer goes back), or, when the pool has none to give, a counted
    /// pageable copy.
    pub(super) fn upload_staged<T: DeviceRepr + bytemuck::Pod>(
        &self,
        host: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.upload_slice(host, what);
        }
        let mut staging = match HostVec::<T>::with_capacity_in(&self.pinned, host.len()) {
            Ok(s) if s.is_pinned() => s,
            _ => return self.upload_slice(host, what),
        };
        let mut dev = self.alloc::<T>(host.len(), what)?;
        staging.extend_from_slice(host);
        self.ctx.bind_to_thread().map_err(driver_err(what))?;
        // SAFETY: `staging` is page-locked and outlives the copy: the stream is synchronized
        // below, before it is dropped (returned to the pool); dev holds host.len() elements.
        unsafe { self.copy_to_device_async(&staging, &mut dev, what) }?;
        self.synchronize()?;
        Ok(dev)
    }

    /// The device metadata of `batch` (uploaded unless the slot holds it already), checked
    /// against `rows` rows.
    fn vision_meta<'a>(
        &self,
        slot: &'a mut Option<VisionMeta>,
        op: &str,
        batch: &VisionBatch,
        rows: usize,
    ) -> Result<&'a VisionMeta> {
        batch.check(op, rows)?;
        if slot.as_ref().is_some_and(|m| m.batch == *batch) {
            return Ok(slot.as_ref().expect("checked"));
        }
        let mut packed = Vec::with_capacity(3 * rows + 3 * batch.grids.len() + 1);
        let mut put = |xs: &mut dyn Iterator<Item = u32>| {
            let start = packed.len();
            packed.extend(xs);
            start..packed.len()
        };
        let hw = put(&mut batch.patch_hw.iter().flatten().copied());
        let img = put(&mut batch.image_of_rows().into_iter());
        let cu_seqlens = put(&mut batch.cu_seqlens.iter().copied());
        let grids = put(&mut batch.grids.iter().flatten().copied());
        let longest = batch
            .cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        let meta = self.upload_staged(&packed, "vision batch metadata")?;
        Ok(slot.insert(VisionMeta {
            batch: batch.clone(),
            meta,
            hw,
            img,
            cu_seqlens,
            grids,
            longest,
        }))
    }

    fn lock_vision(&self, op: &str) -> Result<std::sync::MutexGuard<'_, Option<VisionMeta>>> {
        self.vision
            .lock()
            .map_err(|_| bad(op, "vision metadata lock poisoned"))
    }

    /// `Backend::tensor_from_host`.
    pub(super) fn tensor_from_host_op(
        &self,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> Result<CudaTensor> {
        let op = "tensor_from_host";
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(bad(op, format!("{} values for {rows}x{cols}", data.len())));
        }
        Ok(CudaTensor {
            rows,
            cols,
            data: self.upload_staged(data, "an activation from the host")?,
            bf16: None,
        })
    }

    /// `Backend::layer_norm`.
    pub(super) fn layer_norm_op(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        b: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        let op = "layer_norm";
        let (wd, bd) = (w.f32(op)?, b.f32(op)?);
        if w.shape.len() != 1 || b.shape.len() != 1 || wd.len() != x.cols || bd.len() != x.cols {
            return Err(bad(
                op,
                format!(
                    "weight {:?} and bias {:?} for width {}",
                    w.shape, b.shape, x.cols
                ),
            ));
        }
        let mut out = self.tensor(x.rows, x.cols, "layer_norm output")?;
        if x.rows == 0 || x.cols == 0 {
            return Ok(out);
        }
        let (f, width) = (self.function(op)?, u32_of(op, "width", x.cols)?);
        // SAFETY: x and out are rows x width; w and b have width elements; one block of
        // ROW_THREADS (a multiple of 32, as block_sum needs) per row.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&x.data)
                .arg(wd)
                .arg(bd)
                .arg(&mut out.data)
                .arg(&width)
                .arg(&eps)
                .launch(rows_grid(x.rows)?)
        }
        .map_err(driver_err(op))?;
        Ok(out)
    }

    /// `Backend::gelu` (with the bf16 copy its GEMM consumer reads).
    pub(super) fn gelu_op(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let op = "gelu";
        let mut out = self.tensor_with_bf16(x.rows, x.cols, "gelu output")?;
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(out);
        }
        let (f, n64) = (self.function(op)?, n as u64);
        // SAFETY: grid-stride over the n elements of x, out and its bf16 twin (n each).
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&x.data)
                .arg(&mut out.data)
                .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                .arg(&n64)
                .launch(grid_for(n))
        }
        .map_err(driver_err(op))?;
        Ok(out)
    }

    /// `Backend::group_rows`: a reshape, no copy. A bf16 twin stays: it is the same row-major
    /// buffer rounded, so it is the grouped tensor's twin as well.
    pub(super) fn group_rows_op(&self, x: CudaTensor, k: usize) -> Result<CudaTensor> {
        if k == 0 || x.rows % k != 0 {
            return Err(bad(
                "group_rows",
                format!("{} rows do not split into groups of {k}", x.rows),
            ));
        }
        let cols = x
            .cols
            .checked_mul(k)
            .ok_or_else(|| bad("group_rows", format!("{} x {k} columns", x.cols)))?;
        Ok(CudaTensor {
            rows: x.rows / k,
            cols,
            data: x.data,
            bf16: x.bf16,
        })
    }

    /// `Backend::copy_rows`: device-to-device copies of the f32 rows and, when both tensors
    /// carry one, of the bf16 twin's; otherwise `dst`'s twin (now stale) is dropped.
    pub(super) fn copy_rows_op(
        &self,
        dst: &mut CudaTensor,
        dst_row: usize,
        src: &CudaTensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        let op = "copy_rows";
        let fits = |row: usize, t: &CudaTensor| row.checked_add(n).is_some_and(|e| e <= t.rows);
        if dst.cols != src.cols || !fits(dst_row, dst) || !fits(src_row, src) {
            return Err(bad(
                op,
                format!(
                    "{n} rows from row {src_row} of {}x{} to row {dst_row} of {}x{}",
                    src.rows, src.cols, dst.rows, dst.cols
                ),
            ));
        }
        self.row_copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let c = dst.cols;
        let (s, d) = (
            src_row * c..(src_row + n) * c,
            dst_row * c..(dst_row + n) * c,
        );
        if s.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(
                &src.data.slice(s.clone()),
                &mut dst.data.slice_mut(d.clone()),
            )
            .map_err(driver_err(op))?;
        match (&mut dst.bf16, &src.bf16) {
            (Some(db), Some(sb)) => self
                .stream
                .memcpy_dtod(&sb.slice(s), &mut db.slice_mut(d))
                .map_err(driver_err(op))?,
            (twin, _) => *twin = None,
        }
        Ok(())
    }

    /// `Backend::interpolate_pos_embed`.
    pub(super) fn interpolate_pos_embed_op(
        &self,
        table: &CudaWeight,
        side: usize,
        batch: &VisionBatch,
    ) -> Result<CudaTensor> {
        let op = "interpolate_pos_embed";
        let rows = batch.num_patches();
        let data = table.bf16(op)?;
        if table.shape.len() != 2 || side == 0 || table.rows() != side * side {
            return Err(bad(
                op,
                format!("table of shape {:?} for a {side}x{side} grid", table.shape),
            ));
        }
        let width = table.cols();
        let mut guard = self.lock_vision(op)?;
        let vm = self.vision_meta(&mut guard, op, batch, rows)?;
        let mut out = self.tensor(rows, width, "interpolated position embeddings")?;
        if rows == 0 || width == 0 {
            return Ok(out);
        }
        let (f, side32, width32) = (
            self.function(op)?,
            u32_of(op, "side", side)?,
            u32_of(op, "width", width)?,
        );
        // SAFETY: the metadata holds 2 coordinates and an image index per row and 2 grid sizes
        // per image (packed above from a batch VisionBatch::check accepted: every coordinate
        // inside a non-empty grid); the kernel clamps every tap to 0..side, so it reads rows of
        // the side^2 x width table only; out is rows x width.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(data)
                .arg(&vm.meta.slice(vm.hw.clone()))
                .arg(&vm.meta.slice(vm.img.clone()))
                .arg(&vm.meta.slice(vm.grids.clone()))
                .arg(&side32)
                .arg(&width32)
                .arg(&mut out.data)
                .launch(rows_grid(rows)?)
        }
        .map_err(driver_err(op))?;
        Ok(out)
    }

    /// `Backend::vision_attention`: `vision_rope` into a scratch `[rows, 2 * width]` of rotated q
    /// and k, then `vision_attention` (its output with the bf16 copy the output projection reads).
    pub(super) fn vision_attention_op(
        &self,
        qkv: &CudaTensor,
        batch: &VisionBatch,
        s: &VisionAttentionShape,
    ) -> Result<CudaTensor> {
        let op = "vision_attention";
        let (nh, hd) = (s.num_heads, s.head_dim);
        let w = nh * hd;
        if nh == 0 || hd == 0 || hd % 4 != 0 || qkv.cols != 3 * w {
            return Err(bad(
                op,
                format!("qkv of width {} for {nh} heads of {hd}", qkv.cols),
            ));
        }
        let rows = qkv.rows;
        let mut guard = self.lock_vision(op)?;
        let vm = self.vision_meta(&mut guard, op, batch, rows)?;
        let mut out = self.tensor_with_bf16(rows, w, "vision attention output")?;
        if rows == 0 {
            return Ok(out);
        }
        let (qt, tile) =
            vision_tiling(hd, (48 << 10).min(self.max_shared_per_block)).ok_or_else(|| {
                bad(
                    op,
                    format!("heads of width {hd} do not fit in shared memory"),
                )
            })?;
        let blocks_y = vm.longest.div_ceil(qt);
        if blocks_y > 65_535 || nh > 65_535 {
            return Err(bad(
                op,
                format!("an image of {} patches with {nh} heads", vm.longest),
            ));
        }
        let u = |what: &str, v: usize| u32_of(op, what, v);
        let (nh32, hd32, tile32, qt32) =
            (u("heads", nh)?, u("head_dim", hd)?, tile as u32, qt as u32);
        let mut qk = self.alloc::<f32>(rows * 2 * w, "rotated vision q and k")?;
        let (rope, key) = self.rope_table(hd / 2, s.rope_theta)?;
        let inv_freq = rope
            .get(&key)
            .ok_or_else(|| bad(op, "rope table missing"))?;
        // SAFETY: qkv is rows x 3 * nh * hd, qk rows x 2 * nh * hd; the metadata has 2
        // coordinates per row; inv_freq has hd / 4 entries (rope_inv_freq(hd / 2)).
        unsafe {
            self.stream
                .launch_builder(self.function("vision_rope")?)
                .arg(&qkv.data)
                .arg(&vm.meta.slice(vm.hw.clone()))
                .arg(inv_freq)
                .arg(&mut qk)
                .arg(&nh32)
                .arg(&hd32)
                .launch(LaunchConfig {
                    grid_dim: (u("rows", rows)?, 1, 1),
                    block_dim: (ROPE_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
        }
        .map_err(driver_err("vision_rope"))?;
        drop(rope);
        let smem = vision_smem_bytes(qt, hd, tile) as u32;
        // SAFETY: cu_seqlens holds images + 1 non-decreasing prefix sums ending at rows
        // (VisionBatch::check), so every row a block reads (its image's) is inside qkv, qk and
        // out; the dynamic shared memory is what the kernel's layout needs for (qt, hd, tile),
        // within the 48 KiB default limit.
        unsafe {
            self.stream
                .launch_builder(self.function(op)?)
                .arg(&qkv.data)
                .arg(&qk)
                .arg(&vm.meta.slice(vm.cu_seqlens.clone()))
                .arg(&nh32)
                .arg(&hd32)
                .arg(&s.scale)
                .arg(&tile32)
                .arg(&qt32)
                .arg(&mut out.data)
                .arg(out.bf16.as_mut().expect("made with a bf16 twin"))
                .launch(LaunchConfig {
                    grid_dim: (
                        u("images", batch.grids.len())?,
                        u("query blocks", blocks_y.max(1))?,
                        nh32,
                    ),
                    block_dim: (VISION_THREADS, 1, 1),
                    shared_mem_bytes: smem,
                })
        }
        .map_err(driver_err(op))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vision_tiling_fits_the_default_shared_memory() {
        // The Glm4v tower: heads of 128 (16 query rows, tiles of 32: 34 KiB); the fixture's 16.
        assert_eq!(vision_tiling(128, 48 << 10), Some((16, 32)));
        assert!(vision_smem_bytes(16, 128, 32) <= 48 << 10);
        assert!(vision_smem_bytes(16, 128, 64) > 48 << 10);
        assert_eq!(vision_tiling(16, 48 << 10), Some((16, 64)));
        assert_eq!(vision_tiling(4096, 48 << 10), None);
    }

    fn two_images() -> VisionBatch {
        let mut b = VisionBatch::default();
        b.push_image([2, 2], &[[0, 0], [0, 1], [1, 0], [1, 1]]);
        b.push_image([1, 3], &[[0, 0], [0, 1], [0, 2]]);
        b
    }

    #[test]
    fn vision_batch_checks_guard_the_kernels_indexing() {
        let b = two_images();
        b.check("t", 7).unwrap();
        assert!(b.check("t", 6).is_err(), "row count");
        let mut outside = b.clone();
        outside.patch_hw[5] = [1, 1];
        assert!(outside.check("t", 7).is_err(), "outside its grid");
        let mut unsorted = b.clone();
        unsorted.cu_seqlens[1] = 8;
        assert!(unsorted.check("t", 7).is_err(), "prefix sums");
        let mut short = b;
        short.grids.pop();
        assert!(short.check("t", 7).is_err(), "a grid per image");
    }
}
