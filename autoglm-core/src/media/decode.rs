//! Decoding encoded images to RGB, with the declared size checked before any pixel is decoded.

use std::io::Cursor;

use image::{DynamicImage, ImageReader, Limits};

use crate::error::{Error, Result};

/// Row-major 8-bit RGB pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

/// PIL's `alpha_composite` of a pixel over opaque white, one channel (its integer arithmetic,
/// `PRECISION_BITS` 7, so results equal transformers' `convert_to_rgb` bit for bit).
fn over_white(v: u8, alpha: u8) -> u8 {
    let (v, a) = (v as u32, alpha as u32);
    // outa255 = a * 255 + 255 * (255 - a) = 255 * 255, so coef1 = a << 7.
    let coef1 = a << 7;
    let coef2 = (255 << 7) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

/// Decodes a PNG, JPEG or WebP file to RGB. Transparent images (RGBA, grey with alpha, palettes
/// with transparency) are composited over white as transformers does. A header declaring more
/// than `max_pixels` pixels is refused before decoding.
pub fn decode_image(bytes: &[u8], max_pixels: usize) -> Result<RgbImage> {
    let open = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::Image(format!("cannot read the image: {e}")))
    };
    let reader = open()?;
    let Some(format) = reader.format() else {
        return Err(Error::Image(
            "not a PNG, JPEG or WebP image (unrecognised header)".into(),
        ));
    };
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| Error::Image(format!("{format:?} header: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels as u64 {
        return Err(Error::Image(format!(
            "image declares {w}x{h} pixels, more than the limit of {max_pixels}"
        )));
    }
    if pixels == 0 {
        return Err(Error::Image(format!("image declares {w}x{h} pixels")));
    }
    let mut reader = open()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Room for the decoded image at 16 bits x 4 channels, and the decoder's own buffers.
    limits.max_alloc = Some(pixels * 8 + (64 << 20));
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| Error::Image(format!("cannot decode the {format:?} image: {e}")))?;
    Ok(to_rgb(img))
}

fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.into_rgba8();
        let mut out = vec![0u8; width * height * 3];
        for (o, p) in out.chunks_exact_mut(3).zip(rgba.as_raw().chunks_exact(4)) {
            let a = p[3];
            if a == 255 {
                o.copy_from_slice(&p[..3]);
            } else {
                for (d, &v) in o.iter_mut().zip(&p[..3]) {
                    *d = over_white(v, a);
                }
            }
        }
        out
    } else {
        img.into_rgb8().into_raw()
    };
    RgbImage {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_keeps_opaque_pixels_and_whitens_transparent_ones() {
        assert_eq!(over_white(37, 255), 37);
        assert_eq!(over_white(37, 0), 255);
        assert_eq!(over_white(0, 128), 127);
        // The opaque fast path of `to_rgb` copies: the same as compositing.
        assert!((0..=255).all(|v| over_white(v, 255) == v));
    }
}
