//! Image preprocessing for Glm4v (AutoGLM-Phone-9B), as transformers 5's default
//! `Glm4vImageProcessor` (its torchvision backend) does it: pure functions with no backend.
//!
//! decode ([`decode_image`]: PNG, JPEG, WebP through the `image` crate; RGBA and palette images
//! alpha-composited over white as PIL's `alpha_composite` does) -> [`smart_resize`] (factor 28,
//! the pixel budget counted over the two frames an image becomes) -> bicubic resize of the uint8
//! image ([`resize`]: PyTorch's antialiased separable uint8 kernel, which torchvision uses for
//! uint8 bicubic input) -> rescale and normalise (fused, as transformers fuses them) -> patches
//! in 2x2 merge-block order ([`patchify`]). A header that declares more pixels than
//! [`ImageProcessorConfig::max_image_pixels`] is refused before anything is decoded.

mod config;
mod decode;
mod resize;

pub use config::ImageProcessorConfig;
pub use decode::{decode_image, RgbImage};
pub use resize::resize;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// An image as the vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[1, h' / patch, w' / patch]`.
    pub grid_thw: [usize; 3],
    /// `grid_t * grid_h * grid_w` rows of [`ProcessedImage::patch_dim`] values, in merge-block
    /// order.
    pub pixel_values: Vec<f32>,
    /// Height and width as decoded.
    pub original_hw: (usize, usize),
    /// Height and width after [`smart_resize`].
    pub resized_hw: (usize, usize),
    /// A hash of what the model sees (the resized pixels, their size and the normalisation),
    /// keyed per process: the encoder cache and the KV prefix cache tell images apart by it.
    pub content_hash: u64,
}

impl ProcessedImage {
    /// Patch rows.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Values per patch row (3 x 2 x 14 x 14 = 1176).
    pub fn patch_dim(&self) -> usize {
        self.pixel_values.len() / self.num_patches().max(1)
    }

    /// Tokens the image becomes: one per `merge_size x merge_size` patches.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// Python's `round` (half to even) of a non-negative value.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// The `(height, width)` an image is resized to: multiples of `factor` (patch x merge) near the
/// original, scaled down when two frames of it exceed `max_pixels` and up when they fall short
/// of `min_pixels` (transformers' `smart_resize` with `num_frames = temporal_patch_size`).
pub fn smart_resize(
    height: usize,
    width: usize,
    cfg: &ImageProcessorConfig,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(Error::Image(format!(
            "image of {width}x{height} pixels is empty"
        )));
    }
    let factor = cfg.factor() as f64;
    let t = cfg.temporal_patch_size as f64;
    let (mut h, mut w) = (height as f64, width as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Image(format!(
            "image of {width}x{height} pixels: aspect ratio above 200"
        )));
    }
    if h < factor || w < factor {
        let s = (factor / h).max(factor / w);
        h = (h * s).trunc();
        w = (w * s).trunc();
    }
    let mut hb = round_half_even(h / factor) * factor;
    let mut wb = round_half_even(w / factor) * factor;
    if t * hb * wb > cfg.max_pixels as f64 {
        let beta = (t * h * w / cfg.max_pixels as f64).sqrt();
        hb = factor.max((h / beta / factor).floor() * factor);
        wb = factor.max((w / beta / factor).floor() * factor);
    } else if t * hb * wb < cfg.min_pixels as f64 {
        let beta = (cfg.min_pixels as f64 / (t * h * w)).sqrt();
        hb = (h * beta / factor).ceil() * factor;
        wb = (w * beta / factor).ceil() * factor;
    }
    Ok((hb as usize, wb as usize))
}

/// Decodes, resizes, normalises and patchifies an encoded image.
pub fn process_image(bytes: &[u8], cfg: &ImageProcessorConfig) -> Result<ProcessedImage> {
    let rgb = decode_image(bytes, cfg.max_image_pixels)?;
    process_rgb(&rgb, cfg)
}

/// [`process_image`] from decoded RGB pixels.
pub fn process_rgb(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<ProcessedImage> {
    cfg.validate()?;
    if img.data.len() != img.width * img.height * 3 {
        return Err(Error::Image(format!(
            "{} bytes for a {}x{} RGB image",
            img.data.len(),
            img.width,
            img.height
        )));
    }
    let (h, w) = if cfg.do_resize {
        smart_resize(img.height, img.width, cfg)?
    } else {
        (img.height, img.width)
    };
    let f = cfg.factor();
    if h % f != 0 || w % f != 0 {
        return Err(Error::Image(format!(
            "{w}x{h} pixels are not a multiple of {f} (do_resize is off)"
        )));
    }
    let resized;
    let pixels = if (h, w) == (img.height, img.width) {
        img
    } else {
        resized = resize(img, h, w);
        &resized
    };
    let (pixel_values, content_hash) = rayon::join(
        || patchify(pixels, cfg),
        || {
            let mut hasher = blake3::Hasher::new_keyed(hash_key());
            hasher.update(&pixels.data);
            hasher.update(&(h as u64).to_le_bytes());
            hasher.update(&(w as u64).to_le_bytes());
            for v in cfg.image_mean.iter().chain(&cfg.image_std) {
                hasher.update(&v.to_bits().to_le_bytes());
            }
            hasher.update(&cfg.rescale_factor.to_bits().to_le_bytes());
            let digest = hasher.finalize();
            u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"))
        },
    );
    Ok(ProcessedImage {
        grid_thw: [1, h / cfg.patch_size, w / cfg.patch_size],
        pixel_values,
        original_hw: (img.height, img.width),
        resized_hw: (h, w),
        content_hash,
    })
}

/// The key of the content hash (keyed BLAKE3, several GB/s: a screenshot's 7.9 MB of pixels
/// in about a millisecond), drawn once per process from the OS's randomness (through std's
/// `RandomState`), so that images crafted to collide cannot be prepared in advance.
fn hash_key() -> &'static [u8; 32] {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let mut key = [0u8; 32];
        for (i, k) in key.chunks_exact_mut(8).enumerate() {
            k.copy_from_slice(&state.hash_one(i).to_le_bytes());
        }
        key
    })
}

/// `(h, w)` patch coordinates of each `pixel_values` row of a `grid_thw` grid, in merge-block
/// order (blocks row-major, the patches of a block row-major).
pub fn patch_positions(grid_thw: [usize; 3], merge_size: usize) -> Vec<(u32, u32)> {
    crate::model::vision::merge_block_positions(grid_thw[1], grid_thw[2], merge_size)
        .into_iter()
        .map(|[h, w]| (h, w))
        .collect()
}

/// Normalised patches of an image whose sides are multiples of `patch * merge`: row `r` is the
/// `r`-th patch in merge-block order, its values `(channel, frame, y, x)` with the frame
/// repeated `temporal_patch_size` times.
pub fn patchify(img: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (img.height / p, img.width / p);
    let dim = 3 * t * p * p;
    // transformers fuses rescale and normalise: (x - mean / r) / (std / r), in f32.
    let lut: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            let (mean, std) = if cfg.do_normalize {
                (cfg.image_mean[c], cfg.image_std[c])
            } else {
                (0.0, 1.0)
            };
            let r = if cfg.do_rescale {
                cfg.rescale_factor
            } else {
                1.0
            };
            // Python computes `1.0 / rescale_factor` in f64; torch rounds it to f32 (255.0
            // exactly, where 1.0f32 / (1/255)f32 is 254.99998) before the f32 products.
            let inv = (1.0 / r as f64) as f32;
            let (mean, std) = (mean * inv, std * inv);
            let mut l = [0f32; 256];
            for (v, o) in l.iter_mut().enumerate() {
                *o = if cfg.do_normalize {
                    (v as f32 - mean) / std
                } else {
                    v as f32 * r
                };
            }
            l
        })
        .collect();
    let mut out = zeroed_large(gh * gw * dim);
    let blocks_w = gw / m;
    let plane = t * p * p;
    out.par_chunks_mut(dim).enumerate().for_each(|(row, o)| {
        let (block, inner) = (row / (m * m), row % (m * m));
        let ph = (block / blocks_w) * m + inner / m;
        let pw = (block % blocks_w) * m + inner % m;
        for (c, (lut, o)) in lut.iter().zip(o.chunks_exact_mut(plane)).enumerate() {
            // The first frame from the pixels, the others (the same image) copied from it.
            let (first, others) = o.split_at_mut(p * p);
            for (y, d) in first.chunks_exact_mut(p).enumerate() {
                let src = &img.data[((ph * p + y) * img.width + pw * p) * 3..][..p * 3];
                for (d, px) in d.iter_mut().zip(src.chunks_exact(3)) {
                    *d = lut[px[c] as usize];
                }
            }
            for frame in others.chunks_exact_mut(p * p) {
                frame.copy_from_slice(first);
            }
        }
    });
    out
}

/// A zeroed `Vec` for the tens of megabytes of one image's patches, written once: on Linux
/// the range is advised for transparent huge pages, so that filling 63 MB (a screenshot's
/// `pixel_values`) takes a few dozen page faults rather than ~15,000 (about half the
/// patchify time with 4 KiB pages). The memory comes fresh and zeroed from the allocator either
/// way; the advice changes only how it is paged.
fn zeroed_large(n: usize) -> Vec<f32> {
    let v = vec![0f32; n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (ptr, len) = (v.as_ptr() as usize, std::mem::size_of_val(&v[..]));
        let start = ptr.next_multiple_of(HUGE);
        let end = (ptr + len) & !(HUGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside `v`'s allocation; MADV_HUGEPAGE changes how
            // those pages are backed, never their contents, and its failure (no THP support)
            // is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(h: usize, w: usize, max: usize) -> (usize, usize, usize) {
        let cfg = ImageProcessorConfig {
            max_pixels: max,
            ..Default::default()
        };
        let (rh, rw) = smart_resize(h, w, &cfg).unwrap();
        (rh, rw, rh / 28 * (rw / 28))
    }

    /// GLM4V.md's table of phone screens (height x width).
    #[test]
    fn smart_resize_gives_the_known_screen_sizes() {
        assert_eq!(tokens(2400, 1080, 9633792), (2408, 1092, 3354));
        assert_eq!(tokens(2400, 1080, 5_000_000), (2352, 1036, 3108));
        assert_eq!(tokens(2340, 1080, 9633792).2, 3276);
        assert_eq!(tokens(2340, 1080, 5_000_000).2, 3154);
        assert_eq!(tokens(2532, 1170, 9633792).2, 3780);
        assert_eq!(tokens(3200, 1440, 9633792).2, 5814);
        assert_eq!(tokens(3200, 1440, 5_000_000).2, 3108);
        // Python rounds 70 / 28 = 2.5 to 2 (half to even).
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        let cfg = ImageProcessorConfig::default();
        let e = smart_resize(10, 3000, &cfg).unwrap_err().to_string();
        assert!(e.contains("aspect ratio"), "{e}");
    }

    /// Each row of pixel_values comes from the patch merge-block order says.
    #[test]
    fn patches_are_in_merge_block_order() {
        let cfg = ImageProcessorConfig {
            do_normalize: false,
            do_rescale: false,
            ..Default::default()
        };
        // 4 x 6 patches; every pixel holds its patch's index in row-major order.
        let (gh, gw) = (4, 6);
        let mut data = vec![0u8; gh * 14 * gw * 14 * 3];
        for y in 0..gh * 14 {
            for x in 0..gw * 14 {
                let v = ((y / 14) * gw + x / 14) as u8;
                data[(y * gw * 14 + x) * 3..][..3].copy_from_slice(&[v, v, v]);
            }
        }
        let img = RgbImage {
            width: gw * 14,
            height: gh * 14,
            data,
        };
        let pv = patchify(&img, &cfg);
        let pos = patch_positions([1, gh, gw], 2);
        for (row, (h, w)) in pv.chunks(1176).zip(pos) {
            let want = (h as usize * gw + w as usize) as f32;
            assert!(row.iter().all(|&v| v == want), "row of patch ({h}, {w})");
        }
        assert_eq!(
            &patch_positions([1, 4, 6], 2)[..5],
            &[(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]
        );
    }
}
