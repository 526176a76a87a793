//! Command-line pieces shared by the example programs: engine and sampling flags, logging, and
//! the bundled default model.

use std::path::PathBuf;

use autoglm_core::chat::ContentFormat;
use autoglm_core::config::MultiModalConfig;
use autoglm_core::{EngineConfig, Error, SamplingParams};
use clap::{Args, ValueEnum};

/// The tiny GLM-4 checkpoint shipped with the repository (random weights).
pub fn bundled_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4-tiny")
}

/// Resolves `--model`, falling back to the bundled model with a plain warning.
pub fn model_dir(model: Option<PathBuf>) -> PathBuf {
    model.unwrap_or_else(|| {
        eprintln!(
            "note: no --model given; using the bundled tiny GLM-4 model at {}.\n      Its weights are RANDOM: expect gibberish, not language.",
            bundled_model().display()
        );
        bundled_model()
    })
}

/// How [`init_logging`] writes events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level.
    Json,
}

/// The filter [`init_logging`] uses without `RUST_LOG`: `level` for autoglm's own events (a
/// level name), warn for every other crate's. A `level` holding `=` or `,` is taken as a full
/// filter (`RUST_LOG` syntax).
pub fn log_filter(level: &str) -> String {
    if level.contains(['=', ',']) {
        return level.to_string();
    }
    format!("warn,autoglm={level},autoglm_core={level},autoglm_examples={level}")
}

/// Installs the process's `tracing` subscriber, writing to stderr: `RUST_LOG` when set (e.g.
/// `RUST_LOG=autoglm::engine=debug`), else [`log_filter`] of `level` (default `info`). Fails if a
/// subscriber is already installed or the filter does not parse.
pub fn init_logging(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => {
            EnvFilter::try_new(&env).map_err(|e| format!("RUST_LOG={env:?}: {e}"))?
        }
        _ => {
            let spec = log_filter(level.unwrap_or("info"));
            EnvFilter::try_new(&spec).map_err(|e| format!("--log-level {spec:?}: {e}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .try_init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| format!("cannot install the log subscriber: {e}"))
}

/// A comma-separated list of numbers on the command line, e.g. `1,2,3`.
#[derive(Debug, Clone, PartialEq)]
pub struct List<T>(pub Vec<T>);

impl<T: std::str::FromStr> std::str::FromStr for List<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                x.trim()
                    .parse::<T>()
                    .map_err(|_| format!("{x:?} is not a valid number"))
            })
            .collect::<Result<Vec<T>, String>>()
            .map(List)
    }
}

/// Engine flags.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Where to run: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: autoglm_core::Device,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache blocks (default: sized from --kv-cache-mb).
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Memory for the KV cache, in MiB, when --num-blocks is not given (CPU; on CUDA the pool
    /// takes what --gpu-memory-utilization leaves).
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mb: usize,
    /// Disable reuse of cached prompt prefixes.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens per forward pass (prefill chunks plus decodes).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Longest sequence, prompt plus output (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Pin the engine thread to this core.
    #[arg(long)]
    pub engine_core: Option<usize>,
    /// Pin one compute thread to each of these cores, e.g. 0,1.
    #[arg(long)]
    pub compute_cores: Option<List<usize>>,
    /// Compute threads (when --compute-cores is not given).
    #[arg(long)]
    pub threads: Option<usize>,
    /// CUDA: fraction of the device's memory for weights, activations and the KV cache (the KV
    /// pool takes what is left unless --num-blocks is given).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// CUDA: launch every kernel of every decode step instead of replaying CUDA graphs.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Seconds between the engine's stats lines (throughput, queue, KV cache and prefix-cache
    /// use; logged only when something happened).
    #[arg(long, default_value_t = 10.0)]
    pub log_stats_interval: f64,
    /// No periodic stats lines.
    #[arg(long)]
    pub disable_log_stats: bool,
    #[command(flatten)]
    pub multimodal: MultiModalArgs,
}

/// Image flags (Glm4v models), named as vLLM names them.
#[derive(Debug, Clone, Args)]
pub struct MultiModalArgs {
    /// Most items per prompt, as JSON, e.g. '{"image": 10}' (more: an invalid request).
    #[arg(long)]
    pub limit_mm_per_prompt: Option<String>,
    /// Image processor overrides, as JSON: '{"max_pixels": 5000000, "min_pixels": 3136}' (or
    /// transformers' '{"size": {"longest_edge": ..., "shortest_edge": ...}}').
    #[arg(long)]
    pub mm_processor_kwargs: Option<String>,
    /// How list contents reach the chat template: `string` (image placeholders first, each
    /// followed by a newline, then the text; what vLLM renders for Open-AutoGLM's recommended
    /// command) or `openai` (the template places the images).
    #[arg(long, default_value = "string")]
    pub chat_template_content_format: ContentFormat,
    /// Read local image files (paths and file:// URLs in messages) only from under this
    /// directory, links resolved (default: none are read).
    #[arg(long)]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Threads that decode and resize images (default: one per core, at most 4).
    #[arg(long, default_value_t = 0)]
    pub media_threads: usize,
    /// Pin one image thread to each of these cores, e.g. 2,3 (instead of --media-threads).
    #[arg(long)]
    pub media_cores: Option<List<usize>>,
    /// Memory for the features of recently seen images, in MiB.
    #[arg(long, default_value_t = 256)]
    pub encoder_cache_mb: usize,
    /// Threads that run the vision tower beside the engine's steps (CPU; default: as many as
    /// the compute threads).
    #[arg(long, default_value_t = 0)]
    pub encoder_threads: usize,
    /// Pin one vision-tower thread to each of these cores (instead of --encoder-threads).
    #[arg(long)]
    pub encoder_cores: Option<List<usize>>,
    /// Nice value (0..19) of the image threads, so decode steps take shared cores first.
    #[arg(long, default_value_t = 19)]
    pub media_nice: i32,
    /// Run the vision tower on the engine thread between steps even where it could run beside
    /// them (as a GPU backend does).
    #[arg(long)]
    pub inline_encoder: bool,
    /// Encoding between steps: at most this many image tokens before one step (at least one
    /// image; default --max-num-batched-tokens; vLLM's max_num_encoder_input_tokens).
    #[arg(long)]
    pub max_encoder_tokens_per_step: Option<usize>,
}

impl MultiModalArgs {
    /// Applies these flags to `c`.
    pub fn apply(&self, c: &mut MultiModalConfig) -> Result<(), Error> {
        let json = |flag: &str, v: &str| {
            serde_json::from_str::<serde_json::Value>(v)
                .map_err(|e| Error::config(flag, format!("{v:?} is not JSON: {e}")))
        };
        if let Some(v) = &self.limit_mm_per_prompt {
            c.set_limit_mm_per_prompt(&json("limit_mm_per_prompt", v)?)?;
        }
        if let Some(v) = &self.mm_processor_kwargs {
            c.set_mm_processor_kwargs(&json("mm_processor_kwargs", v)?)?;
        }
        c.content_format = self.chat_template_content_format;
        c.allowed_local_media_path = self.allowed_local_media_path.clone();
        c.preprocess_threads = self.media_threads;
        c.preprocess_cores = self.media_cores.clone().map(|l| l.0).unwrap_or_default();
        c.encoder_cache_bytes = self.encoder_cache_mb << 20;
        c.encoder_threads = self.encoder_threads;
        c.encoder_cores = self.encoder_cores.clone().map(|l| l.0).unwrap_or_default();
        c.media_nice = self.media_nice;
        c.concurrent_encoder = !self.inline_encoder;
        c.max_encoder_tokens_per_step = self.max_encoder_tokens_per_step;
        Ok(())
    }
}

impl EngineArgs {
    /// The engine configuration these flags describe; an error names a malformed flag value.
    pub fn config(&self) -> Result<EngineConfig, Error> {
        let mut c = EngineConfig {
            device: self.device,
            ..Default::default()
        };
        c.cache.block_size = self.block_size;
        c.cache.num_blocks = self.num_blocks;
        c.cache.memory_bytes = self.kv_cache_mb << 20;
        c.cache.enable_prefix_caching = !self.no_prefix_caching;
        c.scheduler.max_num_seqs = self.max_num_seqs;
        c.scheduler.max_num_batched_tokens = self.max_num_batched_tokens;
        c.scheduler.max_model_len = self.max_model_len;
        c.threading.engine_core = self.engine_core;
        c.threading.compute_cores = self.compute_cores.clone().map(|l| l.0).unwrap_or_default();
        c.threading.num_threads = self.threads;
        c.cuda.memory_utilization = self.gpu_memory_utilization;
        c.cuda.graphs = !self.enforce_eager;
        c.log_stats_interval = if self.disable_log_stats {
            None
        } else {
            let secs = self.log_stats_interval;
            if !(secs > 0.0 && secs.is_finite()) {
                return Err(Error::config(
                    "log_stats_interval",
                    format!("{secs} (must be a positive number of seconds)"),
                ));
            }
            Some(std::time::Duration::from_secs_f64(secs))
        };
        self.multimodal.apply(&mut c.multimodal)?;
        Ok(c)
    }
}

/// Sampling flags.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below min_p times the best one's probability.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Presence penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Frequency penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Seed of the request's RNG.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable); not included in the output.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Token ids that end generation, e.g. 151329,151336.
    #[arg(long)]
    pub stop_token_ids: Option<List<u32>>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Return the top-N logprobs of each generated token.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
}

impl SamplingArgs {
    /// The sampling parameters these flags describe.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            n: self.n,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop_token_ids: self.stop_token_ids.clone().map(|l| l.0).unwrap_or_default(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            skip_special_tokens: true,
            structured: None,
        }
    }
}

/// The machine a benchmark ran on, for its report: "N cores, CPU model" (the cores this process
/// may run on).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = autoglm_core::threading::allowed_cores().len();
    format!("{cores} cores, {cpu}")
}
