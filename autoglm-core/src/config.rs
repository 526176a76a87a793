//! Engine configuration: plain structs with `Default` and `validate()`.

use std::path::PathBuf;

use crate::chat::ContentFormat;
use crate::error::{Error, Result};

/// The paged KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool; `None` sizes the pool from `memory_bytes`.
    pub num_blocks: Option<usize>,
    /// Memory for the KV cache when `num_blocks` is `None`.
    pub memory_bytes: usize,
    /// Reuse cached full blocks of identical prompt prefixes across requests.
    pub enable_prefix_caching: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            block_size: 16,
            num_blocks: None,
            memory_bytes: 512 << 20,
            enable_prefix_caching: true,
        }
    }
}

/// Continuous batching limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens (prefill chunks plus decodes) in one forward pass.
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt plus output); `None` takes the model's `max_position_embeddings`,
    /// capped by what the KV pool holds.
    pub max_model_len: Option<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
        }
    }
}

/// Which cores the engine thread and the compute pool run on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ThreadingConfig {
    /// Core for the engine (scheduling) thread; `None` leaves it unpinned.
    pub engine_core: Option<usize>,
    /// Cores for the compute pool, one thread per entry; empty uses every core this process may run
    /// on, unpinned.
    pub compute_cores: Vec<usize>,
    /// Compute threads when `compute_cores` is empty; `None` is one per allowed core.
    pub num_threads: Option<usize>,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// A CUDA device when one is usable, else the CPU (saying so on stderr).
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device `N`.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::config(
                        "device",
                        format!("{s:?} (expected auto, cpu, cuda or cuda:N)"),
                    )
                }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Options of the CUDA backend (ignored on the CPU).
#[derive(Debug, Clone, PartialEq)]
pub struct CudaConfig {
    /// Fraction of the device's total memory the engine may use for weights, activations and the
    /// KV cache (like vLLM's `gpu_memory_utilization`). With `cache.num_blocks` unset the KV pool
    /// takes what the weights and activations leave of it (and `cache.memory_bytes` is ignored).
    pub memory_utilization: f32,
    /// Cache compiled kernels on disk (`$XDG_CACHE_HOME/autoglm` or `~/.cache/autoglm`) so a
    /// second start skips NVRTC.
    pub kernel_disk_cache: bool,
    /// Replay decode steps from CUDA graphs captured per batch-size bucket; `false` launches
    /// every kernel of every step (vLLM's `--enforce-eager`).
    pub graphs: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            memory_utilization: 0.9,
            kernel_disk_cache: true,
            graphs: true,
        }
    }
}

/// Everything an [`Engine`](crate::Engine) needs besides the model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Where the model runs.
    pub device: Device,
    /// CUDA backend options.
    pub cuda: CudaConfig,
    /// KV cache.
    pub cache: CacheConfig,
    /// Batching.
    pub scheduler: SchedulerConfig,
    /// Thread placement.
    pub threading: ThreadingConfig,
    /// Seed for requests that give none (each request draws its own seed from it).
    pub seed: u64,
    /// Images (Glm4v models).
    pub multimodal: MultiModalConfig,
    /// Tokenizer, chat template and sampling defaults from elsewhere than the checkpoint.
    pub overrides: ModelOverrides,
    /// How often the engine thread logs its throughput, queue and cache usage (an info event at
    /// target `autoglm::stats`, like vLLM's "Avg prompt throughput" line): at most once per
    /// interval, and only when something happened since the last one. `None` turns it off
    /// (vLLM's `--disable-log-stats`). Default 10 s.
    pub log_stats_interval: Option<std::time::Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: Device::default(),
            cuda: CudaConfig::default(),
            cache: CacheConfig::default(),
            scheduler: SchedulerConfig::default(),
            threading: ThreadingConfig::default(),
            seed: 0,
            multimodal: MultiModalConfig::default(),
            log_stats_interval: Some(std::time::Duration::from_secs(10)),
            overrides: ModelOverrides::default(),
        }
    }
}

/// What replaces the checkpoint directory's own tokenizer, chat template or sampling defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelOverrides {
    /// A directory whose tokenizer files (`tokenizer.json`, `tokenizer_config.json`) are used
    /// instead of the model's (vLLM's `--tokenizer`).
    pub tokenizer: Option<PathBuf>,
    /// Jinja source of a chat template used instead of the model's (vLLM's `--chat-template`,
    /// read from its file by the caller).
    pub chat_template: Option<String>,
    /// Where the defaults of unset sampling fields come from (vLLM's `--generation-config`).
    pub generation_config: GenerationConfigSource,
}

/// Where an engine's defaults for the sampling fields a request leaves unset come from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum GenerationConfigSource {
    /// The checkpoint's `generation_config.json` (vLLM's `auto`, the default).
    #[default]
    Auto,
    /// The engine's own defaults, ignoring the file (vLLM's `vllm`).
    Builtin,
    /// The `generation_config.json` in this directory.
    Dir(PathBuf),
}

impl std::str::FromStr for GenerationConfigSource {
    type Err = Error;
    /// `auto`, `vllm` (also `none` and `builtin`) or a directory.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(GenerationConfigSource::Auto),
            "vllm" | "none" | "builtin" => Ok(GenerationConfigSource::Builtin),
            "" => Err(Error::config(
                "generation_config",
                "expected auto, vllm or a directory holding generation_config.json",
            )),
            dir => {
                let p = PathBuf::from(dir);
                if p.is_dir() {
                    Ok(GenerationConfigSource::Dir(p))
                } else {
                    Err(Error::config(
                        "generation_config",
                        format!("{dir:?} is not auto, vllm or a directory"),
                    ))
                }
            }
        }
    }
}

/// How a Glm4v engine takes images.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiModalConfig {
    /// Overrides `preprocessor_config.json`'s pixel budget `size.longest_edge` (counted over the
    /// two frames an image becomes, as transformers counts it); vLLM's `mm_processor_kwargs`.
    pub max_pixels: Option<usize>,
    /// Overrides `size.shortest_edge`.
    pub min_pixels: Option<usize>,
    /// Largest `width * height` an encoded image may declare (checked from its header before
    /// decoding); `None`: the preprocessing default.
    pub max_image_pixels: Option<usize>,
    /// Bytes of encoded image features kept for reuse (keyed by image content); an image is
    /// encoded once while its features stay here.
    pub encoder_cache_bytes: usize,
    /// Most images one prompt may carry (vLLM's `--limit-mm-per-prompt '{"image": N}'`); more is
    /// an invalid request. `None`: only the context length limits them.
    pub limit_images_per_prompt: Option<usize>,
    /// How chat messages' content lists reach the chat template (vLLM's
    /// `--chat-template-content-format`).
    pub content_format: ContentFormat,
    /// Local image files (paths or `file://` URLs in chat messages) are read only from under this
    /// directory, links resolved (vLLM's `--allowed-local-media-path`); `None`: none are read.
    pub allowed_local_media_path: Option<PathBuf>,
    /// Threads that decode and resize images, off the engine thread and the caller's; 0: one per
    /// allowed core, at most 4. Ignored when `preprocess_cores` is given.
    pub preprocess_threads: usize,
    /// Pin one preprocessing thread to each of these cores.
    pub preprocess_cores: Vec<usize>,
    /// On a backend that can ([`crate::backend::Backend::concurrent_handle`]: the CPU), run the
    /// vision tower on threads of its own beside the engine's steps, so decoding streams do not
    /// wait for an image's encode; a sequence's prefill waits only at its first image not yet
    /// encoded. `false`, or a backend that cannot: images are encoded on the engine thread
    /// between steps, within `max_encoder_tokens_per_step`.
    pub concurrent_encoder: bool,
    /// Threads of the concurrent encoder; 0: as many as the compute pool. Ignored when
    /// `encoder_cores` is given.
    pub encoder_threads: usize,
    /// Pin one encoder thread to each of these cores.
    pub encoder_cores: Vec<usize>,
    /// Nice value (0..19) of the threads that preprocess and encode images: above 0, the compute
    /// threads (decode steps) take a shared core first and image work fills the time they leave.
    pub media_nice: i32,
    /// Encoding on the engine thread: at most this many image tokens are encoded before one
    /// step (at least one image; vLLM's `max_num_encoder_input_tokens`); `None`:
    /// `scheduler.max_num_batched_tokens`.
    pub max_encoder_tokens_per_step: Option<usize>,
}

impl Default for MultiModalConfig {
    fn default() -> Self {
        MultiModalConfig {
            max_pixels: None,
            min_pixels: None,
            max_image_pixels: None,
            encoder_cache_bytes: 256 << 20,
            limit_images_per_prompt: None,
            content_format: ContentFormat::default(),
            allowed_local_media_path: None,
            preprocess_threads: 0,
            preprocess_cores: Vec::new(),
            concurrent_encoder: true,
            encoder_threads: 0,
            encoder_cores: Vec::new(),
            media_nice: 19,
            max_encoder_tokens_per_step: None,
        }
    }
}

impl MultiModalConfig {
    /// Applies vLLM's `--limit-mm-per-prompt`: a JSON object of per-modality counts, here
    /// `{"image": N}` (a `video` count of 0 is accepted: this model takes no video).
    pub fn set_limit_mm_per_prompt(&mut self, v: &serde_json::Value) -> Result<()> {
        let field = "limit_mm_per_prompt";
        let obj = v.as_object().ok_or_else(|| {
            Error::config(
                field,
                format!("{v} (expected a JSON object such as {{\"image\": 10}})"),
            )
        })?;
        for (k, n) in obj {
            let n = n.as_u64().ok_or_else(|| {
                Error::config(field, format!("{k:?}: {n} is not a non-negative integer"))
            })?;
            match k.as_str() {
                "image" => self.limit_images_per_prompt = Some(n as usize),
                "video" | "audio" if n == 0 => {}
                other => {
                    return Err(Error::config(
                        field,
                        format!("{other:?}: this engine takes only images"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Applies vLLM's `--mm-processor-kwargs`: `max_pixels` and `min_pixels` (the pixel budget
    /// of `preprocessor_config.json`), or transformers' `size: {"longest_edge", "shortest_edge"}`
    /// for the same two numbers.
    pub fn set_mm_processor_kwargs(&mut self, v: &serde_json::Value) -> Result<()> {
        let field = "mm_processor_kwargs";
        let obj = v.as_object().ok_or_else(|| {
            Error::config(
                field,
                format!("{v} (expected a JSON object such as {{\"max_pixels\": 5000000}})"),
            )
        })?;
        let count = |k: &str, n: &serde_json::Value| -> Result<usize> {
            n.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| Error::config(field, format!("{k}: {n} is not a positive integer")))
        };
        for (k, n) in obj {
            match k.as_str() {
                "max_pixels" => self.max_pixels = Some(count(k, n)?),
                "min_pixels" => self.min_pixels = Some(count(k, n)?),
                "size" => {
                    let size = n.as_object().ok_or_else(|| {
                        Error::config(field, format!("size: {n} (expected an object)"))
                    })?;
                    for (e, n) in size {
                        match e.as_str() {
                            "longest_edge" => {
                                self.max_pixels = Some(count("size.longest_edge", n)?)
                            }
                            "shortest_edge" => {
                                self.min_pixels = Some(count("size.shortest_edge", n)?)
                            }
                            other => {
                                return Err(Error::config(
                                    field,
                                    format!(
                                        "size.{other} is not known (longest_edge, shortest_edge)"
                                    ),
                                ))
                            }
                        }
                    }
                }
                other => {
                    return Err(Error::config(
                        field,
                        format!("{other:?} is not known (max_pixels, min_pixels, size)"),
                    ))
                }
            }
        }
        Ok(())
    }
}

impl EngineConfig {
    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        if self.log_stats_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::config(
                "log_stats_interval",
                "must be positive (None turns the stats log off)",
            ));
        }
        let m = &self.multimodal;
        if m.max_pixels == Some(0) || m.min_pixels == Some(0) || m.max_image_pixels == Some(0) {
            return Err(Error::config(
                "multimodal",
                "max_pixels, min_pixels and max_image_pixels must be positive",
            ));
        }
        if let (Some(lo), Some(hi)) = (m.min_pixels, m.max_pixels) {
            if lo > hi {
                return Err(Error::config(
                    "multimodal.min_pixels",
                    format!("{lo} is above max_pixels {hi}"),
                ));
            }
        }
        if let Some(dir) = &m.allowed_local_media_path {
            if !dir.is_dir() {
                return Err(Error::config(
                    "multimodal.allowed_local_media_path",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        crate::threading::check_cores(&m.preprocess_cores)?;
        crate::threading::check_cores(&m.encoder_cores)?;
        if !(0..=19).contains(&m.media_nice) {
            return Err(Error::config(
                "multimodal.media_nice",
                format!("{} is outside 0..19", m.media_nice),
            ));
        }
        if m.max_encoder_tokens_per_step == Some(0) {
            return Err(Error::config(
                "multimodal.max_encoder_tokens_per_step",
                "must be at least 1",
            ));
        }
        let c = &self.cache;
        if c.block_size == 0 || c.block_size > 1024 {
            return Err(Error::config(
                "cache.block_size",
                format!("{} (must be 1..=1024)", c.block_size),
            ));
        }
        if c.num_blocks == Some(0) {
            return Err(Error::config("cache.num_blocks", "0 (must be positive)"));
        }
        if c.num_blocks.is_none() && c.memory_bytes == 0 {
            return Err(Error::config("cache.memory_bytes", "0 (must be positive)"));
        }
        let s = &self.scheduler;
        if s.max_num_seqs == 0 {
            return Err(Error::config(
                "scheduler.max_num_seqs",
                "0 (must be positive)",
            ));
        }
        if s.max_num_batched_tokens == 0 {
            return Err(Error::config(
                "scheduler.max_num_batched_tokens",
                "0 (must be positive)",
            ));
        }
        if s.max_model_len == Some(0) {
            return Err(Error::config(
                "scheduler.max_model_len",
                "0 (must be positive)",
            ));
        }
        let u = self.cuda.memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(Error::config(
                "cuda.memory_utilization",
                format!("{u} (must be in (0, 1])"),
            ));
        }
        if self.threading.num_threads == Some(0) {
            return Err(Error::config(
                "threading.num_threads",
                "0 (must be positive)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vllm_multimodal_flags_parse_and_bad_values_are_named() {
        let mut m = MultiModalConfig::default();
        m.set_limit_mm_per_prompt(&json!({"image": 10, "video": 0}))
            .unwrap();
        assert_eq!(m.limit_images_per_prompt, Some(10));
        m.set_mm_processor_kwargs(&json!({"max_pixels": 5_000_000, "min_pixels": 3136}))
            .unwrap();
        assert_eq!((m.max_pixels, m.min_pixels), (Some(5_000_000), Some(3136)));
        m.set_mm_processor_kwargs(
            &json!({"size": {"longest_edge": 47_040_000, "shortest_edge": 12544}}),
        )
        .unwrap();
        assert_eq!(
            (m.max_pixels, m.min_pixels),
            (Some(47_040_000), Some(12544))
        );
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let e = err(m.set_limit_mm_per_prompt(&json!({"video": 2})));
        assert!(
            e.contains("limit_mm_per_prompt") && e.contains("video"),
            "{e}"
        );
        let e = err(m.set_limit_mm_per_prompt(&json!({"image": -1})));
        assert!(e.contains("non-negative"), "{e}");
        let e = err(m.set_limit_mm_per_prompt(&json!(3)));
        assert!(e.contains("JSON object"), "{e}");
        let e = err(m.set_mm_processor_kwargs(&json!({"max_pixel": 5})));
        assert!(e.contains("\"max_pixel\" is not known"), "{e}");
        let e = err(m.set_mm_processor_kwargs(&json!({"max_pixels": 0})));
        assert!(e.contains("positive"), "{e}");
        let mut c = EngineConfig::default();
        c.multimodal.allowed_local_media_path = Some("/nonexistent/media".into());
        let e = err(c.validate());
        assert!(e.contains("allowed_local_media_path"), "{e}");
    }
}
