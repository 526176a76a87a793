//! The engine: a `Send + Sync` handle in front of one engine thread.
//!
//! [`Engine::submit`] validates a request and hands it to the engine thread, which loops
//! schedule -> forward -> sample -> emit. Each request gets its own channel of
//! [`RequestOutput`] events ([`RequestStream`]); dropping the stream cancels the request and frees
//! its KV blocks. Dropping the last `Engine` handle stops the thread after it fails what is left.

pub mod block_manager;
mod core;
mod encoder;
mod encoder_cache;
mod events;
mod grammar;
mod images;
pub mod scheduler;
pub mod sequence;
mod stats_log;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::Backend;
use crate::config::{Device, EngineConfig, GenerationConfigSource};
use crate::error::{Error, Result};
use crate::media::{ImageProcessorConfig, ProcessedImage};
use crate::memory::{PinnedPool, PoolStats};
use crate::model::{GlmModel, ModelConfig};
use crate::sampling::{FinishReason, SamplingDefaults, SamplingParams, TokenLogprobs};
use crate::tokenizer::Tokenizer;

/// Identifies a request.
pub type RequestId = u64;

pub use images::{ImageInput, RenderedChat};

/// The longest [`Request::cache_salt`] accepted.
pub const MAX_CACHE_SALT_BYTES: usize = 1024;

/// A request: prompt token ids, sampling parameters and a priority.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// How to sample.
    pub params: SamplingParams,
    /// Smaller runs first; default 0.
    pub priority: i32,
    /// The prompt's images, in order (Glm4v). Each stands for one run of `<|image|>` tokens in
    /// `prompt` of exactly its token count ([`Engine::submit_with_images`] expands single
    /// placeholders to that count).
    pub images: Vec<Arc<ProcessedImage>>,
    /// Isolates the request's prefix-cache entries (vLLM's `cache_salt`): requests reuse each
    /// other's cached KV blocks only when their salts are equal (`None` equals `None`). The salt
    /// is mixed, through a hash keyed once per process, into the first block's hash, so every
    /// block of the prompt differs. The server puts the principal in it for
    /// `--prefix-cache-scope principal`.
    pub cache_salt: Option<String>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV blocks were reused from the prefix cache (first scheduling).
    pub cached_prompt_tokens: usize,
}

/// One event of a request's stream: what one choice produced in one engine step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestOutput {
    /// Which choice (0..n).
    pub index: usize,
    /// New token ids.
    pub token_ids: Vec<u32>,
    /// New text (held back while it might be the start of a stop string; never half a character).
    pub text: String,
    /// Logprobs of each new token, when asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// Set on the choice's last event.
    pub finish_reason: Option<FinishReason>,
    /// Set on the request's last event.
    pub usage: Option<Usage>,
}

/// A finished choice, as [`Engine::generate`] returns it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Per-token logprobs, when asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// Why it ended.
    pub finish_reason: Option<FinishReason>,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOutput {
    /// One per choice, by index.
    pub choices: Vec<Completion>,
    /// Token counts.
    pub usage: Usage,
}

/// Live counters of the engine, updated every step.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences waiting.
    pub waiting: AtomicUsize,
    /// Sequences running.
    pub running: AtomicUsize,
    /// KV blocks referenced by sequences.
    pub kv_blocks_used: AtomicUsize,
    /// KV blocks in the pool.
    pub kv_blocks_total: AtomicUsize,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Preemptions so far.
    pub preemptions: AtomicU64,
    /// Prompt tokens computed (excluding prefix-cache hits).
    pub prompt_tokens_computed: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens of sequences scheduled for the first time (what the prefix cache was asked
    /// for).
    pub prefix_cache_queried_tokens: AtomicU64,
    /// Of those, tokens whose KV blocks came from the prefix cache.
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Images run through the vision tower.
    pub images_encoded: AtomicU64,
    /// Image placeholders whose features came from the encoder cache.
    pub encoder_cache_hits: AtomicU64,
    /// Nanoseconds the engine thread spent in the vision tower.
    pub image_encode_ns: AtomicU64,
    /// Sequences held back because their stream's queue is full (its consumer is behind; see
    /// [`RequestStream::set_max_queued`]).
    pub paused: AtomicUsize,
    /// Images preprocessed (decoded, resized, normalised) on submission.
    pub images_preprocessed: AtomicU64,
    /// Nanoseconds spent preprocessing them (on the submitting threads).
    pub image_preprocess_ns: AtomicU64,
    /// Structured-output masks the sampler used.
    pub grammar_masks: AtomicU64,
    /// Nanoseconds the engine thread waited for them (the rest was computed beside the forward
    /// pass, on the grammar thread).
    pub grammar_wait_ns: AtomicU64,
    /// The pinned pool batches are built in; set when the engine thread starts.
    pinned_pool: std::sync::OnceLock<PinnedPool>,
}

impl EngineStats {
    /// Counters of the pinned host-memory pool the engine builds each step's batch in (`None`
    /// before the engine thread has started).
    pub fn pinned_pool(&self) -> Option<PoolStats> {
        self.pinned_pool.get().map(PinnedPool::stats)
    }
}

pub(crate) enum Command {
    Submit(Box<core::NewRequest>),
    Cancel(RequestId),
    /// The request's stream took its full queue: generate for it again.
    Resume(RequestId),
    Shutdown,
}

struct Shared {
    commands: flume::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    stats: Arc<EngineStats>,
    model_config: ModelConfig,
    tokenizer: Option<Arc<Tokenizer>>,
    max_model_len: usize,
    config: EngineConfig,
    backend_name: String,
    /// The image preprocessor (Glm4v models).
    images: Option<ImageProcessorConfig>,
    /// Threads that preprocess images, started on first use.
    media_pool: Mutex<Option<Arc<rayon::ThreadPool>>>,
    /// Structured-output grammars for this tokenizer.
    grammars: grammar::GrammarCompiler,
    /// Defaults of the sampling fields a request leaves unset.
    sampling_defaults: SamplingDefaults,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The engine loop fails what is in flight and returns.
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// Handle to a running engine. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.shared.model_config.architecture)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Stops the engine now, whoever else holds a handle: the engine loop fails what is in flight
    /// (their streams end with [`Error::EngineShutdown`]), frees its model and KV cache and
    /// returns; this joins its thread. Later submissions fail with `EngineShutdown`. Blocking;
    /// idempotent.
    pub fn stop(&self) {
        let _ = self.shared.commands.send(Command::Shutdown);
        let thread = self.shared.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Whether the engine thread has been stopped ([`Engine::stop`]).
    pub fn is_stopped(&self) -> bool {
        self.shared.thread.lock().map_or(true, |t| t.is_none())
    }

    /// Loads a checkpoint directory (config, weights, tokenizer) on the configured device and starts
    /// the engine thread.
    pub fn from_dir(dir: &Path, config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let dir = &crate::hub::resolve_model_dir(dir)?;
        let cuda = match config.device {
            Device::Cpu => None,
            Device::Cuda(n) => Some(CudaBackend::new(cuda_options(n, &config))?),
            Device::Auto => match CudaBackend::new(cuda_options(0, &config)) {
                Ok(b) => Some(b),
                Err(Error::CudaUnavailable(reason)) => {
                    tracing::warn!(
                        target: "autoglm::engine",
                        %reason,
                        "CUDA unavailable; running on the CPU"
                    );
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let o = &config.overrides;
        let mut tokenizer = Tokenizer::from_dir(o.tokenizer.as_deref().unwrap_or(dir))?;
        if let Some(source) = &o.chat_template {
            tokenizer = tokenizer.with_chat_template(source)?;
        }
        let defaults = match &o.generation_config {
            GenerationConfigSource::Auto => {
                SamplingDefaults::from_file(&dir.join("generation_config.json"))?
            }
            GenerationConfigSource::Builtin => SamplingDefaults::default(),
            GenerationConfigSource::Dir(d) => {
                SamplingDefaults::from_file(&d.join("generation_config.json"))?
            }
        };
        let images = ImageProcessorConfig::from_dir(dir)?;
        let engine = match cuda {
            Some(backend) => {
                let model_config = ModelConfig::from_file(&dir.join("config.json"))?;
                backend.check_fits(crate::backend::cuda::weight_bytes(&model_config))?;
                let model = GlmModel::load(dir, &backend)?;
                Engine::new(backend, model, Some(tokenizer), config)
            }
            None => {
                let backend = CpuBackend::new();
                let model = GlmModel::load(dir, &backend)?;
                Engine::new(backend, model, Some(tokenizer), config)
            }
        }?;
        engine
            .with_image_processor(images)?
            .with_sampling_defaults(defaults)
    }

    /// Replaces the defaults of the sampling fields a request leaves unset (by default those of
    /// the checkpoint's `generation_config.json`; see [`GenerationConfigSource`]). The server
    /// applies them; [`Engine::submit`] takes complete [`SamplingParams`] and does not.
    pub fn with_sampling_defaults(self, defaults: SamplingDefaults) -> Result<Engine> {
        defaults.params().validate()?;
        let mut shared = Arc::try_unwrap(self.shared).map_err(|_| {
            Error::config(
                "generation_config",
                "the sampling defaults can only be set before the engine is shared",
            )
        })?;
        shared.sampling_defaults = defaults;
        Ok(Engine {
            shared: Arc::new(shared),
        })
    }

    /// The defaults of the sampling fields a request leaves unset.
    pub fn sampling_defaults(&self) -> &SamplingDefaults {
        &self.shared.sampling_defaults
    }

    /// Replaces the image preprocessing settings (by default `preprocessor_config.json`'s, or
    /// transformers' defaults without one), applying the engine's `multimodal` overrides. Only
    /// meaningful for a model with a vision tower.
    pub fn with_image_processor(self, mut cfg: ImageProcessorConfig) -> Result<Engine> {
        let m = &self.shared.config.multimodal;
        if let Some(v) = m.max_pixels {
            cfg.max_pixels = v;
        }
        if let Some(v) = m.min_pixels {
            cfg.min_pixels = v;
        }
        if let Some(v) = m.max_image_pixels {
            cfg.max_image_pixels = v;
        }
        cfg.validate()?;
        let Some(vision) = self.shared.model_config.vision.as_ref() else {
            return Ok(self);
        };
        if cfg.patch_size != vision.patch_size
            || cfg.merge_size != vision.spatial_merge_size
            || cfg.temporal_patch_size != vision.temporal_patch_size
        {
            return Err(Error::config(
                "preprocessor_config.json",
                format!(
                    "patch {} / merge {} / temporal {} differ from the vision tower's {} / {} / {}",
                    cfg.patch_size,
                    cfg.merge_size,
                    cfg.temporal_patch_size,
                    vision.patch_size,
                    vision.spatial_merge_size,
                    vision.temporal_patch_size
                ),
            ));
        }
        let mut shared = match Arc::try_unwrap(self.shared) {
            Ok(s) => s,
            Err(_) => {
                return Err(Error::config(
                    "multimodal",
                    "the image processor can only be set before the engine is shared",
                ))
            }
        };
        shared.images = Some(cfg);
        Ok(Engine {
            shared: Arc::new(shared),
        })
    }

    /// The image preprocessing settings, for a model that takes images.
    pub fn image_processor(&self) -> Option<&ImageProcessorConfig> {
        self.shared.images.as_ref()
    }

    /// Starts an engine over an already-loaded model. Without a tokenizer, requests are token ids
    /// only and outputs carry no text.
    pub fn new<B: Backend>(
        backend: B,
        model: GlmModel<B>,
        tokenizer: Option<Tokenizer>,
        config: EngineConfig,
    ) -> Result<Engine> {
        config.validate()?;
        let model_config = model.config().clone();
        if let Some(t) = &tokenizer {
            if t.vocab_size() > model_config.vocab_size {
                return Err(Error::config(
                    "vocab_size",
                    format!(
                        "the tokenizer has {} tokens but the model only {}",
                        t.vocab_size(),
                        model_config.vocab_size
                    ),
                ));
            }
        }
        let tokenizer = tokenizer.map(Arc::new);
        let backend_name = backend.name();
        // Record the process's cores before the engine thread pins itself.
        crate::threading::allowed_cores();
        let stats = Arc::new(EngineStats::default());
        let (commands, rx) = flume::unbounded();
        let (ready_tx, ready_rx) = flume::bounded(1);
        let core_config = config.clone();
        let core_stats = stats.clone();
        let core_tokenizer = tokenizer.clone();
        let thread = std::thread::Builder::new()
            .name("autoglm-engine".into())
            .spawn(move || {
                core::run(
                    backend,
                    model,
                    core_tokenizer,
                    core_config,
                    core_stats,
                    rx,
                    ready_tx,
                )
            })
            .map_err(|e| Error::Backend(format!("cannot start the engine thread: {e}")))?;
        let max_model_len = match ready_rx.recv() {
            Ok(Ok(len)) => len,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Backend(
                    "the engine thread stopped during start-up".into(),
                ));
            }
        };
        let grammars =
            grammar::GrammarCompiler::new(tokenizer.as_deref().cloned(), model_config.vocab_size);
        Engine {
            shared: Arc::new(Shared {
                commands,
                thread: Mutex::new(Some(thread)),
                next_id: AtomicU64::new(1),
                stats,
                grammars,
                tokenizer,
                max_model_len,
                images: None,
                sampling_defaults: SamplingDefaults::default(),
                media_pool: Mutex::new(None),
                model_config,
                config,
                backend_name,
            }),
        }
        .with_image_processor(ImageProcessorConfig::default())
    }

    /// The tokenizer; an error for an engine built without one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.shared
            .tokenizer
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("this engine was built without a tokenizer".into()))
    }

    /// The model's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.model_config
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// The backend the model runs on, e.g. "cpu" or "cuda:0" (with `Device::Auto`, what was
    /// chosen).
    pub fn backend_name(&self) -> &str {
        &self.shared.backend_name
    }

    /// Longest sequence (prompt plus output) the engine accepts.
    pub fn max_model_len(&self) -> usize {
        self.shared.max_model_len
    }

    /// Live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Submits a prompt with priority 0.
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestStream> {
        self.submit_request(Request {
            prompt,
            params,
            priority: 0,
            images: Vec::new(),
            cache_salt: None,
        })
    }

    /// Validates and submits a request; its events arrive on the returned stream.
    pub fn submit_request(&self, req: Request) -> Result<RequestStream> {
        self.validate(&req)?;
        let images = images::prompt_images(
            &self.shared.model_config,
            self.shared.config.multimodal.limit_images_per_prompt,
            &req,
        )?;
        // Grammars compile here, on the submitting thread, never on the engine's.
        let grammars = match &req.params.structured {
            Some(c) => {
                let first = self.shared.grammars.matcher(c)?;
                let mut all = Vec::with_capacity(req.params.n);
                for _ in 1..req.params.n {
                    all.push(first.deep_clone());
                }
                all.push(first);
                all
            }
            None => Vec::new(),
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = events::channel();
        let n = req.params.n;
        self.shared
            .commands
            .send(Command::Submit(Box::new(core::NewRequest {
                id,
                req,
                tx,
                images,
                grammars,
            })))
            .map_err(|_| Error::EngineShutdown)?;
        Ok(RequestStream {
            id,
            rx,
            commands: self.shared.commands.clone(),
            choices_left: n,
            closed: false,
        })
    }

    fn validate(&self, req: &Request) -> Result<()> {
        req.params.validate()?;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = self.shared.model_config.vocab_size;
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let max = self.shared.max_model_len;
        if req.prompt.len() >= max {
            return Err(Error::InvalidRequest(format!(
                "the prompt has {} tokens but the context length is {max} (room for at least one generated token is needed)",
                req.prompt.len()
            )));
        }
        if let Some(salt) = &req.cache_salt {
            if salt.is_empty() || salt.len() > MAX_CACHE_SALT_BYTES {
                return Err(Error::InvalidRequest(format!(
                    "cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_BYTES} bytes (got {})",
                    salt.len()
                )));
            }
        }
        if !req.params.stop.is_empty() && self.shared.tokenizer.is_none() {
            return Err(Error::InvalidRequest(
                "stop strings need a tokenizer; this engine has none".into(),
            ));
        }
        Ok(())
    }

    /// Submits and waits for the whole result.
    pub fn generate(&self, prompt: Vec<u32>, params: SamplingParams) -> Result<GenerateOutput> {
        let n = params.n;
        let stream = self.submit(prompt, params)?;
        collect(stream, n)
    }
}

/// The CUDA backend options an engine config asks for, for device `ordinal`.
pub fn cuda_options(ordinal: usize, config: &EngineConfig) -> CudaOptions {
    CudaOptions {
        ordinal,
        memory_utilization: config.cuda.memory_utilization,
        kernel_cache_dir: if config.cuda.kernel_disk_cache {
            crate::backend::cuda::compile::default_cache_dir()
        } else {
            None
        },
        graphs: config.cuda.graphs,
        gemv_max_rows: CudaOptions::default().gemv_max_rows,
    }
}

/// Gathers a stream's events into finished choices.
pub fn collect(stream: RequestStream, n: usize) -> Result<GenerateOutput> {
    let mut out = GenerateOutput {
        choices: vec![Completion::default(); n],
        usage: Usage::default(),
    };
    for ev in stream {
        let ev = ev?;
        let c = &mut out.choices[ev.index];
        c.token_ids.extend_from_slice(&ev.token_ids);
        c.text.push_str(&ev.text);
        c.logprobs.extend(ev.logprobs);
        if ev.finish_reason.is_some() {
            c.finish_reason = ev.finish_reason;
        }
        if let Some(u) = ev.usage {
            out.usage = u;
        }
    }
    Ok(out)
}

/// The events of one request. Iterating blocks; [`RequestStream::recv_async`] awaits, and it is a
/// [`futures_core::Stream`] for any async runtime (it needs none: the engine thread wakes the
/// task). Dropping it before the end cancels the request.
///
/// It is an [`Iterator`] as well, so a `StreamExt` method whose name `Iterator` also has (`next`,
/// `map`, `take`, ...) is called by path, or the stream is handed to something that takes a
/// `Stream`:
///
/// ```no_run
/// # async fn run(engine: autoglm_core::Engine) -> autoglm_core::Result<()> {
/// use futures_util::StreamExt;
/// let mut stream = engine.submit(vec![1, 2, 3], Default::default())?;
/// while let Some(out) = StreamExt::next(&mut stream).await {
///     print!("{}", out?.text);
/// }
/// # Ok(()) }
/// ```
pub struct RequestStream {
    id: RequestId,
    rx: events::EventReceiver,
    commands: flume::Sender<Command>,
    choices_left: usize,
    closed: bool,
}

impl RequestStream {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Wake a waiting receiver only once `k` events are queued (at least 1; 1 is the default):
    /// the first event, each choice's last event and errors still wake it at once, and every
    /// queued event is handed out when asked for. A consumer that writes events out in groups
    /// (the server's `stream_interval`) is then woken once per group instead of once per token.
    pub fn set_stream_interval(&mut self, k: usize) {
        self.rx.set_interval(k);
    }

    /// Bounds the events waiting for this stream to `n` (at least 1; unbounded by default). Once
    /// `n` are queued the engine stops generating for this request, which keeps its KV blocks and
    /// its place, until the stream takes them: a consumer that falls behind (a client that does
    /// not read its socket) holds back its own request, never the engine or anyone else's. At
    /// most `2n` events are held at a time (a queue taken and being handed out, one filling).
    pub fn set_max_queued(&mut self, n: usize) {
        self.rx.set_capacity(n);
    }

    /// Tells the engine to resume the request when the last receive took a full queue.
    fn resume_if_taken_full(&mut self) {
        if self.rx.take_resume() && !self.closed {
            let _ = self.commands.send(Command::Resume(self.id));
        }
    }

    fn on_event(&mut self, ev: Option<Result<RequestOutput>>) -> Option<Result<RequestOutput>> {
        if self.closed {
            return None;
        }
        match ev {
            Some(Ok(out)) => {
                if out.finish_reason.is_some() {
                    self.choices_left = self.choices_left.saturating_sub(1);
                }
                Some(Ok(out))
            }
            Some(Err(e)) => {
                self.closed = true;
                Some(Err(e))
            }
            None => {
                self.closed = true;
                // Closed before every choice finished: the engine stopped under us.
                (self.choices_left > 0).then_some(Err(Error::EngineShutdown))
            }
        }
    }

    /// The next event, blocking; `None` at the end.
    pub fn recv(&mut self) -> Option<Result<RequestOutput>> {
        let ev = self.rx.recv();
        self.resume_if_taken_full();
        self.on_event(ev)
    }

    /// The next event, awaiting; `None` at the end.
    pub async fn recv_async(&mut self) -> Option<Result<RequestOutput>> {
        let ev = std::future::poll_fn(|cx| self.rx.poll_recv(cx)).await;
        self.resume_if_taken_full();
        self.on_event(ev)
    }

    /// The next event if one is queued, without waiting: `Some(Some(ev))`, `Some(None)` at the
    /// end, `None` when nothing is ready yet. A consumer that writes events out in groups takes
    /// the rest of a group this way after awaiting its first event.
    pub fn try_recv(&mut self) -> Option<Option<Result<RequestOutput>>> {
        if self.closed {
            return Some(None);
        }
        let ev = self.rx.try_recv()?;
        self.resume_if_taken_full();
        Some(self.on_event(ev))
    }

    /// Events ready to be received without waiting.
    pub fn queued(&self) -> usize {
        if self.closed {
            0
        } else {
            self.rx.queued()
        }
    }

    /// Cancels the request now (also done on drop).
    pub fn cancel(&mut self) {
        if !self.closed {
            let _ = self.commands.send(Command::Cancel(self.id));
            self.closed = true;
        }
    }
}

impl Iterator for RequestStream {
    type Item = Result<RequestOutput>;
    fn next(&mut self) -> Option<Self::Item> {
        self.recv()
    }
}

impl futures_core::Stream for RequestStream {
    type Item = Result<RequestOutput>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        // `RequestStream` is `Unpin`: nothing in it is pinned.
        let this = self.get_mut();
        if this.closed {
            return std::task::Poll::Ready(None);
        }
        let ev = std::task::ready!(this.rx.poll_recv(cx));
        this.resume_if_taken_full();
        std::task::Poll::Ready(this.on_event(ev))
    }
}

impl futures_core::FusedStream for RequestStream {
    fn is_terminated(&self) -> bool {
        self.closed
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if self.choices_left > 0 {
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}
