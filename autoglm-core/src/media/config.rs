//! `preprocessor_config.json` of a Glm4v checkpoint.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// `Glm4vImageProcessor`'s settings, plus the engine's limit on declared image sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// `size.shortest_edge`: the least pixels of the two frames together (12544).
    pub min_pixels: usize,
    /// `size.longest_edge`: the most pixels of the two frames together (9633792).
    pub max_pixels: usize,
    /// Pixels per patch side (14).
    pub patch_size: usize,
    /// Frames per patch (2: an image is repeated).
    pub temporal_patch_size: usize,
    /// Patches per merged token side (2).
    pub merge_size: usize,
    /// Per-channel mean after rescaling (CLIP's).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation after rescaling (CLIP's).
    pub image_std: [f32; 3],
    /// Multiplier taking uint8 to [0, 1] (1/255).
    pub rescale_factor: f32,
    /// Resize to [`super::smart_resize`]'s size.
    pub do_resize: bool,
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Subtract the mean and divide by the standard deviation.
    pub do_normalize: bool,
    /// Convert to RGB (always done: the tower takes three channels).
    pub do_convert_rgb: bool,
    /// Largest `width * height` an encoded image may declare in its header, checked before
    /// decoding (decompression bombs). 50 million by default: a 1440x3200 screen is 4.6 million.
    pub max_image_pixels: usize,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            min_pixels: 12544,
            max_pixels: 9633792,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_55, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
            max_image_pixels: 50_000_000,
        }
    }
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

#[derive(Deserialize)]
struct RawProcessor {
    size: Option<RawSize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    rescale_factor: Option<f32>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    do_convert_rgb: Option<bool>,
    resample: Option<u32>,
}

impl ImageProcessorConfig {
    /// Patch side times merge side (28): resized sides are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Reads `preprocessor_config.json`; keys it lacks take the processor's defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: RawProcessor = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })?;
        let d = ImageProcessorConfig::default();
        if let Some(r) = raw.resample {
            if r != 3 {
                return Err(Error::config(
                    format!("{}: resample", path.display()),
                    format!("{r} is not supported (only 3, bicubic)"),
                ));
            }
        }
        let size = raw.size.as_ref();
        let cfg = ImageProcessorConfig {
            min_pixels: size
                .and_then(|s| s.shortest_edge)
                .or(raw.min_pixels)
                .unwrap_or(d.min_pixels),
            max_pixels: size
                .and_then(|s| s.longest_edge)
                .or(raw.max_pixels)
                .unwrap_or(d.max_pixels),
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            image_mean: raw.image_mean.unwrap_or(d.image_mean),
            image_std: raw.image_std.unwrap_or(d.image_std),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_resize: raw.do_resize.unwrap_or(true),
            do_rescale: raw.do_rescale.unwrap_or(true),
            do_normalize: raw.do_normalize.unwrap_or(true),
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(true),
            max_image_pixels: d.max_image_pixels,
        };
        cfg.validate().map_err(|e| match e {
            Error::InvalidConfig { field, msg } => Error::InvalidConfig {
                field: format!("{}: {field}", path.display()),
                msg,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// `dir/preprocessor_config.json`, or the defaults when there is none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// Checks ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("merge_size", self.merge_size),
            ("size.shortest_edge", self.min_pixels),
            ("size.longest_edge", self.max_pixels),
            ("max_image_pixels", self.max_image_pixels),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if self.min_pixels > self.max_pixels {
            return Err(Error::config(
                "size.shortest_edge",
                format!(
                    "{} is above size.longest_edge {}",
                    self.min_pixels, self.max_pixels
                ),
            ));
        }
        let f = self.factor();
        if self.temporal_patch_size * f * f > self.max_pixels {
            return Err(Error::config(
                "size.longest_edge",
                format!("{} holds no {f}x{f} image", self.max_pixels),
            ));
        }
        if self.image_std.iter().any(|&s| !(s.is_finite() && s != 0.0))
            || self.image_mean.iter().any(|m| !m.is_finite())
            || !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0)
        {
            return Err(Error::config(
                "image_std",
                "image_mean, image_std and rescale_factor must be finite, std and rescale non-zero",
            ));
        }
        Ok(())
    }
}
