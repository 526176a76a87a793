//! Flags shared by the commands: engine, image and sampling options, named as vLLM names them.

use std::path::PathBuf;

use autoglm_core::chat::ContentFormat;
use autoglm_core::config::MultiModalConfig;
use autoglm_core::{EngineConfig, Error, GenerationConfigSource, SamplingParams};
use clap::Args;

/// The tiny GLM-4 checkpoint shipped with the repository (random weights): in the source tree this
/// program was built from, else `tests/fixtures/glm4-tiny` under the current directory.
pub fn bundled_model() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4-tiny");
    let here = PathBuf::from("tests/fixtures/glm4-tiny");
    if !built.join("config.json").is_file() && here.join("config.json").is_file() {
        return here;
    }
    built
}

/// Resolves `--model`, falling back to the bundled model with a plain warning.
pub fn model_dir(model: Option<PathBuf>) -> PathBuf {
    model.unwrap_or_else(|| {
        tracing::warn!(
            "no --model given; using the bundled tiny GLM-4 model at {}. Its weights are RANDOM: expect gibberish, not language.",
            bundled_model().display()
        );
        bundled_model()
    })
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
    /// Disable reuse of cached prompt prefixes (also vLLM's `--no-enable-prefix-caching`).
    #[arg(
        long,
        visible_alias = "no-enable-prefix-caching",
        overrides_with = "enable_prefix_caching"
    )]
    pub no_prefix_caching: bool,
    /// Reuse cached prompt prefixes (the default; vLLM's flag).
    #[arg(long, overrides_with = "no_prefix_caching")]
    pub enable_prefix_caching: bool,
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
    /// No periodic stats lines (vLLM's flag).
    #[arg(long)]
    pub disable_log_stats: bool,
    /// Tokenizer files from this directory instead of the model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A chat template replacing the model's: a Jinja file, or the template itself.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Defaults of the sampling fields a request leaves unset: `auto` (the model's
    /// generation_config.json), `vllm` (the engine's own: temperature 1, no top-k/top-p) or a
    /// directory holding a generation_config.json.
    #[arg(long, default_value = "auto")]
    pub generation_config: String,
    /// The revision (branch, tag or commit) of a Hugging Face model id in the local cache.
    #[arg(long)]
    pub revision: Option<String>,
    /// Accepted for vLLM's command lines: autoglm never runs code from a checkpoint.
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Weights' data type: `auto` (the checkpoint's, bf16 or f16), as vLLM's `--dtype`. Others
    /// are refused (quantization is not built).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Devices one model is split across: 1 (tensor parallelism is not built; run one server per
    /// GPU behind a load balancer).
    #[arg(long, short = 't', default_value_t = 1)]
    pub tensor_parallel_size: usize,
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
    /// Accepted for vLLM's command lines (`data` or `weights`): one device needs no choice.
    #[arg(long, value_parser = ["data", "weights"])]
    pub mm_encoder_tp_mode: Option<String>,
    /// Accepted for vLLM's command lines (`lru` or `shm`): image features are kept in the
    /// encoder cache (--encoder-cache-mb) within the process.
    #[arg(long, value_parser = ["lru", "shm"])]
    pub mm_processor_cache_type: Option<String>,
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
        if self.tensor_parallel_size != 1 {
            return Err(Error::config(
                "--tensor-parallel-size",
                format!(
                    "{}: tensor parallelism is not built; autoglm runs a model on one device (run \
                     one server per GPU behind a load balancer)",
                    self.tensor_parallel_size
                ),
            ));
        }
        if !matches!(self.dtype.as_str(), "auto") {
            return Err(Error::config(
                "--dtype",
                format!(
                    "{:?}: autoglm runs the checkpoint's own bf16/f16 weights; only `auto` is \
                     accepted",
                    self.dtype
                ),
            ));
        }
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
                    "--log-stats-interval",
                    format!("{secs} (must be a positive number of seconds)"),
                ));
            }
            Some(std::time::Duration::from_secs_f64(secs))
        };
        self.multimodal.apply(&mut c.multimodal)?;
        c.overrides.tokenizer = self.tokenizer.clone();
        c.overrides.chat_template = self
            .chat_template
            .as_deref()
            .map(read_chat_template)
            .transpose()?;
        c.overrides.generation_config = self.generation_config.parse::<GenerationConfigSource>()?;
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

/// `--chat-template`: a file's text, or the value itself when it is a template (as vLLM takes it).
fn read_chat_template(v: &str) -> Result<String, Error> {
    let p = std::path::Path::new(v);
    if p.is_file() {
        return std::fs::read_to_string(p).map_err(|e| Error::Io {
            path: p.to_owned(),
            source: e,
        });
    }
    if v.contains("{{") || v.contains("{%") {
        return Ok(v.to_string());
    }
    Err(Error::config(
        "--chat-template",
        format!("{v:?} is neither a file nor a Jinja template"),
    ))
}
