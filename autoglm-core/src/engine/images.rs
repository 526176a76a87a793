//! Multimodal prompts on the submitting thread: images preprocessed, `<|image|>` placeholders
//! expanded to each image's token count and checked, M-RoPE positions computed, so the engine
//! thread receives a request it only has to run.

use std::sync::Arc;
use std::time::Instant;

use super::sequence::{PromptImage, PromptImages};
use super::{Engine, Request};
use crate::error::{Error, Result};
use crate::media::{self, ImageProcessorConfig, ProcessedImage, RgbImage};
use crate::model::{mrope, ModelConfig};

/// An image of a multimodal prompt, in whatever form the caller has it.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageInput {
    /// An encoded file: PNG, JPEG or WebP.
    Encoded(Vec<u8>),
    /// Decoded RGB pixels.
    Rgb(RgbImage),
    /// Already preprocessed (for instance by [`Engine::preprocess_image`]).
    Processed(Arc<ProcessedImage>),
}

impl Engine {
    /// Preprocesses one image as the model's processor does (decode, resize to the pixel budget,
    /// normalise, 2x2-block patches). An error for a model without a vision tower.
    pub fn preprocess_image(&self, image: &ImageInput) -> Result<Arc<ProcessedImage>> {
        let cfg = self.image_config()?;
        let start = Instant::now();
        let out = match image {
            ImageInput::Encoded(bytes) => Arc::new(media::process_image(bytes, cfg)?),
            ImageInput::Rgb(rgb) => Arc::new(media::process_rgb(rgb, cfg)?),
            ImageInput::Processed(p) => return Ok(p.clone()),
        };
        let s = self.stats();
        s.images_preprocessed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.image_preprocess_ns.fetch_add(
            start.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(out)
    }

    fn image_config(&self) -> Result<&ImageProcessorConfig> {
        match (&self.shared.model_config.vision, &self.shared.images) {
            (Some(_), Some(cfg)) => Ok(cfg),
            _ => Err(Error::InvalidRequest(format!(
                "this model ({}) does not take images",
                self.shared.model_config.architecture.name()
            ))),
        }
    }

    /// Preprocesses `images` and expands each single `<|image|>` placeholder of `prompt` to its
    /// image's token count (a run already of that count is kept): the prompt and images of a
    /// [`Request`].
    pub fn expand_images(
        &self,
        prompt: &[u32],
        images: &[ImageInput],
    ) -> Result<(Vec<u32>, Vec<Arc<ProcessedImage>>)> {
        let cfg = self.image_config()?;
        let image_token = self.image_token()?;
        let processed = images
            .iter()
            .enumerate()
            .map(|(i, im)| {
                self.preprocess_image(im).map_err(|e| match e {
                    Error::Image(msg) => Error::Image(format!("image {i}: {msg}")),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let runs = placeholder_runs(prompt, image_token);
        if runs.len() != processed.len() {
            return Err(count_mismatch(runs.len(), processed.len()));
        }
        let mut out = Vec::with_capacity(prompt.len());
        let mut at = 0;
        for ((start, len), (i, im)) in runs.iter().zip(processed.iter().enumerate()) {
            let n = im.num_tokens(cfg.merge_size);
            if *len != 1 && *len != n {
                return Err(Error::InvalidRequest(format!(
                    "image {i} takes {n} placeholder tokens, but its run of <|image|> has {len} (give 1 or {n})"
                )));
            }
            out.extend_from_slice(&prompt[at..*start]);
            out.resize(out.len() + n, image_token);
            at = start + len;
        }
        out.extend_from_slice(&prompt[at..]);
        Ok((out, processed))
    }

    /// Submits a prompt with images ([`Engine::expand_images`], then
    /// [`Engine::submit_request`]).
    pub fn submit_with_images(
        &self,
        prompt: Vec<u32>,
        images: &[ImageInput],
        params: crate::SamplingParams,
    ) -> Result<super::RequestStream> {
        let (prompt, images) = self.expand_images(&prompt, images)?;
        self.submit_request(Request {
            prompt,
            params,
            priority: 0,
            images,
        })
    }

    fn image_token(&self) -> Result<u32> {
        self.shared
            .model_config
            .vision
            .as_ref()
            .map(|v| v.image_token_id)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "this model ({}) does not take images",
                    self.shared.model_config.architecture.name()
                ))
            })
    }
}

/// `(start, len)` of each run of `token` in `prompt`.
fn placeholder_runs(prompt: &[u32], token: u32) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < prompt.len() {
        if prompt[i] == token {
            let len = prompt[i..].iter().take_while(|&&t| t == token).count();
            runs.push((i, len));
            i += len;
        } else {
            i += 1;
        }
    }
    runs
}

fn count_mismatch(placeholders: usize, images: usize) -> Error {
    Error::InvalidRequest(format!(
        "the prompt has {placeholders} image placeholder(s) (<|image|> runs) but {images} image(s) were given"
    ))
}

/// Checks a request's images against its prompt and lays them out for the engine: `None` for a
/// text-only request.
pub(super) fn prompt_images(cfg: &ModelConfig, req: &Request) -> Result<Option<Arc<PromptImages>>> {
    let Some(vision) = cfg.vision.as_ref() else {
        if !req.images.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "this model ({}) does not take images",
                cfg.architecture.name()
            )));
        }
        return Ok(None);
    };
    let runs = placeholder_runs(&req.prompt, vision.image_token_id);
    if runs.len() != req.images.len() {
        return Err(count_mismatch(runs.len(), req.images.len()));
    }
    if req.images.is_empty() {
        return Ok(None);
    }
    let m = vision.spatial_merge_size;
    let mut images = Vec::with_capacity(runs.len());
    let mut grids = Vec::with_capacity(runs.len());
    for (i, ((start, len), im)) in runs.iter().zip(&req.images).enumerate() {
        let [t, gh, gw] = im.grid_thw;
        let n = im.num_tokens(m);
        if t != 1 || gh % m != 0 || gw % m != 0 || n == 0 {
            return Err(Error::Image(format!(
                "image {i}: grid {:?} is not one frame of whole {m}x{m} blocks",
                im.grid_thw
            )));
        }
        if im.patch_dim() != vision.patch_dim()
            || im.pixel_values.len() != gh * gw * vision.patch_dim()
        {
            return Err(Error::Image(format!(
                "image {i}: {} pixel values for a {gh}x{gw} grid of {} per patch",
                im.pixel_values.len(),
                vision.patch_dim()
            )));
        }
        if *len != n {
            return Err(Error::InvalidRequest(format!(
                "image {i} takes {n} placeholder tokens, but its run of <|image|> has {len}"
            )));
        }
        images.push(PromptImage {
            image: im.clone(),
            offset: *start,
            num_tokens: n,
        });
        grids.push([gh / m, gw / m]);
    }
    let mrope = mrope::mrope_positions(&req.prompt, vision.image_token_id, &grids)?;
    Ok(Some(Arc::new(PromptImages { images, mrope })))
}
