//! Multimodal prompts before they reach the engine thread: chat messages rendered and their
//! images read, images preprocessed on a pool of their own (so neither the engine loop nor an
//! HTTP thread decodes a screenshot), `<|image|>` placeholders expanded to each image's token
//! count and checked, M-RoPE positions computed: the engine thread receives a request it only
//! has to run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::Value;

use super::sequence::{PromptImage, PromptImages};
use super::{Engine, Request};
use crate::chat::{prepare_chat, ImageSource, MediaPolicy};
use crate::error::{Error, Result};
use crate::media::{self, ImageProcessorConfig, ProcessedImage, RgbImage};
use crate::model::{mrope, ModelConfig};
use crate::threading;

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

/// A chat rendered through the model's template: its text, token ids (one `<|image|>` per image,
/// not yet expanded) and the images its image parts stand for, read but not yet preprocessed.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedChat {
    /// The template's output (image placeholders as text, never image bytes).
    pub text: String,
    /// `text` tokenized.
    pub prompt: Vec<u32>,
    /// One per image part, in message order.
    pub images: Vec<ImageInput>,
}

/// What preprocessing needs, apart from the engine handle (so a worker never holds the engine).
#[derive(Clone)]
struct Preprocessor {
    cfg: ImageProcessorConfig,
    image_token: u32,
    limit: Option<usize>,
    stats: Arc<super::EngineStats>,
}

impl Preprocessor {
    fn preprocess(&self, image: &ImageInput) -> Result<Arc<ProcessedImage>> {
        let start = Instant::now();
        let out = match image {
            ImageInput::Encoded(bytes) => Arc::new(media::process_image(bytes, &self.cfg)?),
            ImageInput::Rgb(rgb) => Arc::new(media::process_rgb(rgb, &self.cfg)?),
            ImageInput::Processed(p) => return Ok(p.clone()),
        };
        self.stats
            .images_preprocessed
            .fetch_add(1, Ordering::Relaxed);
        self.stats
            .image_preprocess_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Preprocesses `images` in parallel on the current pool, stopping early once `cancelled`
    /// says nobody waits for the result, and expands the placeholders of `prompt`.
    fn expand(
        &self,
        prompt: &[u32],
        images: &[ImageInput],
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Vec<u32>, Vec<Arc<ProcessedImage>>)> {
        check_limit(self.limit, images.len())?;
        let runs = placeholder_runs(prompt, self.image_token);
        if runs.len() != images.len() {
            return Err(count_mismatch(runs.len(), images.len()));
        }
        let processed = images
            .par_iter()
            .enumerate()
            .map(|(i, im)| {
                if cancelled() {
                    return Err(Error::Backend("image preprocessing cancelled".into()));
                }
                self.preprocess(im).map_err(|e| match e {
                    Error::Image(msg) => Error::Image(format!("image {i}: {msg}")),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(prompt.len());
        let mut at = 0;
        for ((start, len), (i, im)) in runs.iter().zip(processed.iter().enumerate()) {
            let n = im.num_tokens(self.cfg.merge_size);
            if *len != 1 && *len != n {
                return Err(Error::InvalidRequest(format!(
                    "image {i} takes {n} placeholder tokens, but its run of <|image|> has {len} (give 1 or {n})"
                )));
            }
            out.extend_from_slice(&prompt[at..*start]);
            out.resize(out.len() + n, self.image_token);
            at = start + len;
        }
        out.extend_from_slice(&prompt[at..]);
        Ok((out, processed))
    }
}

fn check_limit(limit: Option<usize>, n: usize) -> Result<()> {
    match limit {
        Some(max) if n > max => Err(Error::InvalidRequest(format!(
            "at most {max} image(s) may be given in one prompt, got {n}"
        ))),
        _ => Ok(()),
    }
}

impl Engine {
    /// Preprocesses one image as the model's processor does (decode, resize to the pixel budget,
    /// normalise, 2x2-block patches), on the calling thread. An error for a model without a
    /// vision tower.
    pub fn preprocess_image(&self, image: &ImageInput) -> Result<Arc<ProcessedImage>> {
        self.preprocessor()?.preprocess(image)
    }

    fn preprocessor(&self) -> Result<Preprocessor> {
        let cfg = self.image_config()?.clone();
        Ok(Preprocessor {
            cfg,
            image_token: self.image_token()?,
            limit: self.shared.config.multimodal.limit_images_per_prompt,
            stats: self.shared.stats.clone(),
        })
    }

    fn image_config(&self) -> Result<&ImageProcessorConfig> {
        match (&self.shared.model_config.vision, &self.shared.images) {
            (Some(_), Some(cfg)) => Ok(cfg),
            _ => Err(self.no_images()),
        }
    }

    fn no_images(&self) -> Error {
        Error::InvalidRequest(format!(
            "this model ({}) does not take images",
            self.shared.model_config.architecture.name()
        ))
    }

    /// The image preprocessing threads (`multimodal.preprocess_threads` / `preprocess_cores`),
    /// started on first use.
    fn media_pool(&self) -> Result<Arc<rayon::ThreadPool>> {
        let mut pool = self
            .shared
            .media_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pool.as_ref() {
            return Ok(p.clone());
        }
        let m = &self.shared.config.multimodal;
        let threads = match m.preprocess_threads {
            0 => threading::allowed_cores().len().clamp(1, 4),
            n => n,
        };
        let p = Arc::new(threading::build_pool_niced(
            "autoglm-media",
            &m.preprocess_cores,
            threads,
            m.media_nice,
        )?);
        *pool = Some(p.clone());
        Ok(p)
    }

    /// Renders OpenAI-style chat messages through the model's chat template and reads the images
    /// of their image parts (`image_url` data URLs; local files under
    /// `multimodal.allowed_local_media_path`; `{"type": "image"}` parts without a source take the
    /// next of `given`, in order). Content lists reach the template as
    /// `multimodal.content_format` says. Nothing is decoded yet: see [`Engine::expand_images`].
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        given: Vec<ImageInput>,
    ) -> Result<RenderedChat> {
        let m = &self.shared.config.multimodal;
        let chat = prepare_chat(messages, m.content_format)?;
        let given_count = given.len();
        if !chat.images.is_empty() || given_count > 0 {
            self.image_config()?;
            check_limit(m.limit_images_per_prompt, chat.images.len())?;
        }
        let policy = MediaPolicy {
            allowed_local_path: m.allowed_local_media_path.clone(),
        };
        let mut given = given.into_iter();
        let images = chat
            .images
            .into_iter()
            .enumerate()
            .map(|(i, src)| match src {
                ImageSource::Given => given.next().ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "image {i}: a {{\"type\": \"image\"}} part without a source, and only {given_count} image(s) were given beside the messages"
                    ))
                }),
                src => policy.read(src).map(ImageInput::Encoded).map_err(|e| match e {
                    Error::InvalidRequest(msg) => Error::InvalidRequest(format!("image {i}: {msg}")),
                    other => other,
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        if given.next().is_some() {
            return Err(Error::InvalidRequest(format!(
                "{given_count} image(s) were given beside the messages, more than their image parts without a source"
            )));
        }
        let tok = self.tokenizer()?;
        let text = tok.apply_chat_template(&chat.messages, tools, add_generation_prompt)?;
        let prompt = tok.encode(&text, false)?;
        Ok(RenderedChat {
            text,
            prompt,
            images,
        })
    }

    /// Preprocesses `images` (in parallel, on the engine's image threads) and expands each single
    /// `<|image|>` placeholder of `prompt` to its image's token count (a run already of that
    /// count is kept): the prompt and images of a [`Request`]. Blocks the caller until done; see
    /// [`Engine::expand_images_async`] for async callers.
    pub fn expand_images(
        &self,
        prompt: &[u32],
        images: &[ImageInput],
    ) -> Result<(Vec<u32>, Vec<Arc<ProcessedImage>>)> {
        if images.is_empty() && self.shared.model_config.vision.is_none() {
            return Ok((prompt.to_vec(), Vec::new()));
        }
        let pre = self.preprocessor()?;
        if images
            .iter()
            .all(|im| matches!(im, ImageInput::Processed(_)))
        {
            return pre.expand(prompt, images, &|| false);
        }
        self.media_pool()?
            .install(|| pre.expand(prompt, images, &|| false))
    }

    /// [`Engine::expand_images`] without blocking: the work runs on the engine's image threads
    /// and the future resolves when it is done. Dropping the future (a client that went away)
    /// stops the work before its next image.
    pub fn expand_images_async(
        &self,
        prompt: Vec<u32>,
        images: Vec<ImageInput>,
    ) -> impl std::future::Future<Output = Result<(Vec<u32>, Vec<Arc<ProcessedImage>>)>> + Send + 'static
    {
        let (tx, rx) = flume::bounded(1);
        let started = (|| {
            if images.is_empty() && self.shared.model_config.vision.is_none() {
                let _ = tx.send(Ok((prompt, Vec::new())));
                return Ok(());
            }
            let pre = self.preprocessor()?;
            let pool = self.media_pool()?;
            pool.spawn(move || {
                let gone = || tx.is_disconnected();
                if gone() {
                    return;
                }
                let _ = tx.send(pre.expand(&prompt, &images, &gone));
            });
            Ok(())
        })();
        async move {
            started?;
            rx.recv_async()
                .await
                .unwrap_or(Err(Error::Backend("image preprocessing stopped".into())))
        }
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
            cache_salt: None,
        })
    }

    /// Renders chat messages ([`Engine::render_chat`]), preprocesses their images and submits
    /// them: the whole path from OpenAI-style messages to a running request, blocking until the
    /// images are preprocessed.
    pub fn submit_chat(
        &self,
        messages: &Value,
        given: Vec<ImageInput>,
        params: crate::SamplingParams,
    ) -> Result<super::RequestStream> {
        let chat = self.render_chat(messages, None, true, given)?;
        self.submit_with_images(chat.prompt, &chat.images, params)
    }

    fn image_token(&self) -> Result<u32> {
        self.shared
            .model_config
            .vision
            .as_ref()
            .map(|v| v.image_token_id)
            .ok_or_else(|| self.no_images())
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
pub(super) fn prompt_images(
    cfg: &ModelConfig,
    limit: Option<usize>,
    req: &Request,
) -> Result<Option<Arc<PromptImages>>> {
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
    check_limit(limit, req.images.len())?;
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
