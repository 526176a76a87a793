//! Plain option structs that C owns: engine options and sampling parameters, each with an
//! `autoglm_*_default()` initialiser (llama.cpp's `llama_context_default_params`).
//!
//! Always start from the `_default()` value and change fields: zero-initialising the struct
//! yourself gives invalid values (a `top_p` of 0, for one), and a `struct_size` of 0, which is
//! refused.
//!
//! ABI evolution: each struct begins with `size_t struct_size`, which `_default()` sets to the
//! size of the layout the caller was compiled against. New fields are only appended; the library
//! reads the fields the caller's size covers and gives the others their defaults, so a program
//! built against an older `autoglm.h` keeps working with a newer library without a rebuild
//! ([`ffi::opt_sized_arg`]). The first published layouts are the minimum: for
//! `autoglm_engine_options`, up to `seed` (the multimodal strings came later); for
//! `autoglm_sampling_params`, up to `skip_special_tokens`.

use std::ffi::c_char;
use std::path::PathBuf;

use autoglm_core::{
    CacheConfig, EngineConfig, MultiModalConfig, SamplingParams, SchedulerConfig, ThreadingConfig,
};
use serde_json::Value;

use crate::ffi;
use crate::panic::boundary_value;
use crate::status::CapiError;

/// Options of `autoglm_engine_new` besides the model directory.
///
/// Ownership: owned by the caller; the library reads it (and what its pointers point to) only
/// during `autoglm_engine_new` and keeps no pointer into it. Thread safety: plain data.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct autoglm_engine_options {
    /// `sizeof(autoglm_engine_options)` as the caller was compiled: set by
    /// `autoglm_engine_options_default()`; leave it. The library reads only the fields it covers
    /// (older callers pass a smaller size); 0 or less than the first published layout is
    /// `AUTOGLM_STATUS_INVALID_ARGUMENT`.
    pub struct_size: usize,
    /// `"auto"` (a CUDA device when one is usable, else the CPU), `"cpu"`, `"cuda"` or
    /// `"cuda:N"`. NULL means `"auto"`. Default NULL.
    pub device: *const c_char,
    /// Tokens per KV-cache block, 1..=1024. Default 16.
    pub block_size: u32,
    /// KV-cache blocks; 0 sizes the pool from `kv_cache_mb`. Default 0.
    pub num_blocks: u32,
    /// KV-cache memory in MiB when `num_blocks` is 0. Default 512.
    pub kv_cache_mb: u64,
    /// Reuse the KV blocks of identical prompt prefixes across requests. Default true.
    pub enable_prefix_caching: bool,
    /// Sequences running at once. Default 64.
    pub max_num_seqs: u32,
    /// Tokens (prefill chunks plus decodes) in one forward pass. Default 2048.
    pub max_num_batched_tokens: u32,
    /// Longest sequence (prompt plus output); 0 takes the model's `max_position_embeddings`,
    /// capped by what the KV cache holds. Default 0.
    pub max_model_len: u32,
    /// Compute threads when `num_compute_cores` is 0; 0 is one per core this process may run on.
    /// Default 0.
    pub num_threads: u32,
    /// Core to pin the engine (scheduling) thread to; -1 leaves it unpinned. Default -1.
    pub engine_core: i32,
    /// Cores to pin the compute threads to, one thread per entry (`num_compute_cores` of them);
    /// NULL / 0 leaves them unpinned. Default NULL / 0.
    pub compute_cores: *const u32,
    /// Length of `compute_cores`.
    pub num_compute_cores: usize,
    /// Seed for requests that set no seed of their own. Default 0.
    pub seed: u64,
    /// Most images one prompt may carry, as vLLM's `--limit-mm-per-prompt`: a JSON object such
    /// as `{"image": 4}` (NUL-terminated UTF-8; a `"video"` count of 0 is accepted). More is
    /// `AUTOGLM_STATUS_INVALID_REQUEST`. NULL: only the context length limits them. Default NULL.
    pub limit_mm_per_prompt: *const c_char,
    /// Image preprocessing overrides, as vLLM's `--mm-processor-kwargs`: a JSON object with
    /// `max_pixels` / `min_pixels`, or transformers' `{"size": {"longest_edge": ..,
    /// "shortest_edge": ..}}` (the pixel budget of `preprocessor_config.json`). NULL: the
    /// model's `preprocessor_config.json`. Default NULL.
    pub mm_processor_kwargs: *const c_char,
    /// How the content lists of chat messages reach the chat template, as vLLM's
    /// `--chat-template-content-format`: `"string"` (each list becomes one string: an image
    /// placeholder and a newline per image, then the text parts joined by newlines; what
    /// Open-AutoGLM's server runs with) or `"openai"` (the list itself, image parts as
    /// `{"type": "image"}`). NULL means `"string"`. Default NULL.
    pub chat_template_content_format: *const c_char,
    /// Directory under which chat messages may name local image files (paths or `file://`
    /// URLs in `image_url` parts), links resolved; as vLLM's `--allowed-local-media-path`. NULL:
    /// no local files are read. Default NULL.
    pub allowed_local_media_path: *const c_char,
}

/// The default engine options (see each field).
///
/// Ownership: returned by value; nothing to free.
#[no_mangle]
pub extern "C" fn autoglm_engine_options_default() -> autoglm_engine_options {
    let d = EngineConfig::default();
    let fallback = autoglm_engine_options {
        struct_size: std::mem::size_of::<autoglm_engine_options>(),
        device: std::ptr::null(),
        block_size: 16,
        num_blocks: 0,
        kv_cache_mb: 512,
        enable_prefix_caching: true,
        max_num_seqs: 64,
        max_num_batched_tokens: 2048,
        max_model_len: 0,
        num_threads: 0,
        engine_core: -1,
        compute_cores: std::ptr::null(),
        num_compute_cores: 0,
        seed: 0,
        limit_mm_per_prompt: std::ptr::null(),
        mm_processor_kwargs: std::ptr::null(),
        chat_template_content_format: std::ptr::null(),
        allowed_local_media_path: std::ptr::null(),
    };
    boundary_value("autoglm_engine_options_default", fallback, || {
        autoglm_engine_options {
            block_size: narrow(d.cache.block_size),
            num_blocks: d.cache.num_blocks.map_or(0, narrow),
            kv_cache_mb: (d.cache.memory_bytes >> 20) as u64,
            enable_prefix_caching: d.cache.enable_prefix_caching,
            max_num_seqs: narrow(d.scheduler.max_num_seqs),
            max_num_batched_tokens: narrow(d.scheduler.max_num_batched_tokens),
            max_model_len: d.scheduler.max_model_len.map_or(0, narrow),
            num_threads: d.threading.num_threads.map_or(0, narrow),
            seed: d.seed,
            ..fallback
        }
    })
}

/// The end offset of each named field of `$t`, in order.
macro_rules! field_ends {
    ($t:ty: $($f:ident),+ $(,)?) => {
        vec![$(std::mem::offset_of!($t, $f) + ffi::field_size(|o: &$t| &o.$f)),+]
    };
}

impl ffi::SizedStruct for autoglm_engine_options {
    const INIT: &'static str = "autoglm_engine_options_default()";
    fn defaults() -> Self {
        autoglm_engine_options_default()
    }
    fn field_ends() -> Vec<usize> {
        field_ends!(autoglm_engine_options: struct_size, device, block_size, num_blocks,
            kv_cache_mb, enable_prefix_caching, max_num_seqs, max_num_batched_tokens,
            max_model_len, num_threads, engine_core, compute_cores, num_compute_cores, seed,
            limit_mm_per_prompt, mm_processor_kwargs, chat_template_content_format,
            allowed_local_media_path)
    }
    fn min_size() -> usize {
        // The first C API (7e4a811) ended at `seed`.
        std::mem::offset_of!(autoglm_engine_options, seed) + std::mem::size_of::<u64>()
    }
}

impl ffi::SizedStruct for autoglm_sampling_params {
    const INIT: &'static str = "autoglm_sampling_params_default()";
    fn defaults() -> Self {
        autoglm_sampling_params_default()
    }
    fn field_ends() -> Vec<usize> {
        field_ends!(autoglm_sampling_params: struct_size, n, max_tokens, temperature, top_k,
            top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, has_seed, seed,
            stop_token_ids, stop_token_ids_len, stop, stop_len, ignore_eos, has_logprobs,
            logprobs, skip_special_tokens)
    }
    fn min_size() -> usize {
        std::mem::offset_of!(autoglm_sampling_params, skip_special_tokens) + 1
    }
}

fn narrow(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn nonzero(v: u32) -> Option<usize> {
    (v != 0).then_some(v as usize)
}

impl autoglm_engine_options {
    /// The core's config. Range checks beyond what the C types allow are `EngineConfig::validate`'s.
    ///
    /// # Safety
    ///
    /// `device`, `compute_cores` and the multimodal strings are NULL or valid as documented on
    /// the fields.
    pub(crate) unsafe fn to_config(self) -> Result<EngineConfig, CapiError> {
        // SAFETY: forwarded contract on `device`.
        let device = match unsafe { ffi::opt_str_arg(self.device, "options->device") }? {
            Some(s) => s.parse().map_err(CapiError::from_load)?,
            None => Default::default(),
        };
        // SAFETY: forwarded contract on `compute_cores`.
        let cores = unsafe {
            ffi::slice_arg(
                self.compute_cores,
                self.num_compute_cores,
                "options->compute_cores",
            )
        }?;
        let engine_core = match self.engine_core {
            -1 => None,
            c => Some(usize::try_from(c).map_err(|_| {
                CapiError::invalid_argument(format!(
                    "`options->engine_core` is {c} (must be -1 or a core number)"
                ))
            })?),
        };
        let memory_bytes = usize::try_from(self.kv_cache_mb)
            .ok()
            .and_then(|mb| mb.checked_mul(1 << 20))
            .ok_or_else(|| {
                CapiError::invalid_argument(format!(
                    "`options->kv_cache_mb` is {} (too large)",
                    self.kv_cache_mb
                ))
            })?;
        // SAFETY: forwarded contract on the multimodal strings.
        let multimodal = unsafe { self.multimodal() }?;
        Ok(EngineConfig {
            device,
            cache: CacheConfig {
                block_size: self.block_size as usize,
                num_blocks: nonzero(self.num_blocks),
                memory_bytes,
                enable_prefix_caching: self.enable_prefix_caching,
            },
            scheduler: SchedulerConfig {
                max_num_seqs: self.max_num_seqs as usize,
                max_num_batched_tokens: self.max_num_batched_tokens as usize,
                max_model_len: nonzero(self.max_model_len),
            },
            threading: ThreadingConfig {
                engine_core,
                compute_cores: cores.iter().map(|&c| c as usize).collect(),
                num_threads: nonzero(self.num_threads),
            },
            seed: self.seed,
            multimodal,
            ..EngineConfig::default()
        })
    }

    /// The multimodal part of the config: malformed JSON is `AUTOGLM_STATUS_INVALID_ARGUMENT`,
    /// a value the core rejects `AUTOGLM_STATUS_INVALID_CONFIG`.
    ///
    /// # Safety
    ///
    /// The four multimodal strings are NULL or NUL-terminated.
    unsafe fn multimodal(self) -> Result<MultiModalConfig, CapiError> {
        let mut m = MultiModalConfig::default();
        let json = |p: *const c_char, name: &str| -> Result<Option<Value>, CapiError> {
            // SAFETY: forwarded contract.
            let Some(s) = (unsafe { ffi::opt_str_arg(p, name) })? else {
                return Ok(None);
            };
            serde_json::from_str(s).map(Some).map_err(|e| {
                CapiError::invalid_argument(format!("`{name}` is not valid JSON: {e}"))
            })
        };
        if let Some(v) = json(self.limit_mm_per_prompt, "options->limit_mm_per_prompt")? {
            m.set_limit_mm_per_prompt(&v)
                .map_err(CapiError::from_load)?;
        }
        if let Some(v) = json(self.mm_processor_kwargs, "options->mm_processor_kwargs")? {
            m.set_mm_processor_kwargs(&v)
                .map_err(CapiError::from_load)?;
        }
        // SAFETY: forwarded contract.
        let (format, media) = unsafe {
            (
                ffi::opt_str_arg(
                    self.chat_template_content_format,
                    "options->chat_template_content_format",
                )?,
                ffi::opt_str_arg(
                    self.allowed_local_media_path,
                    "options->allowed_local_media_path",
                )?,
            )
        };
        if let Some(f) = format {
            m.content_format = f.parse().map_err(CapiError::from_load)?;
        }
        m.allowed_local_media_path = media.map(PathBuf::from);
        Ok(m)
    }
}

/// How a request is sampled and when it stops. The engine checks the ranges when the request is
/// submitted and rejects values outside them with `AUTOGLM_STATUS_INVALID_REQUEST`.
///
/// Ownership: owned by the caller; the library reads it (and the arrays and strings it points to)
/// only during the call it is passed to and copies what it keeps. Thread safety: plain data; one
/// value may be passed to calls on several threads at once.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct autoglm_sampling_params {
    /// `sizeof(autoglm_sampling_params)` as the caller was compiled: set by
    /// `autoglm_sampling_params_default()`; leave it. The library reads only the fields it
    /// covers; 0 or less than the first published layout is `AUTOGLM_STATUS_INVALID_ARGUMENT`.
    pub struct_size: usize,
    /// Independent completions of the prompt, 1..=128. Default 1.
    pub n: u32,
    /// Most tokens to generate per completion, at least 1. Default 16.
    pub max_tokens: u32,
    /// Softmax temperature, >= 0; 0 is greedy decoding. Default 1.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all. Default 0.
    pub top_k: u32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities reach `top_p`, in (0, 1].
    /// Default 1.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in [0, 1]. Default 0.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already in prompt or output, > 0;
    /// 1 is off. Default 1.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated, in [-2, 2]. Default 0.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated, in [-2, 2]. Default 0.
    pub frequency_penalty: f32,
    /// Whether `seed` is used; when false the engine draws a seed. Default false.
    pub has_seed: bool,
    /// Seed of this request's random number generator (with `has_seed`): the same seed, prompt
    /// and parameters give the same tokens whatever else the engine is running. Default 0.
    pub seed: u64,
    /// Token ids that end a completion (they are kept in the token ids, not in the text).
    /// `stop_token_ids_len` of them; NULL / 0 for none. Default NULL / 0.
    pub stop_token_ids: *const u32,
    /// Length of `stop_token_ids`.
    pub stop_token_ids_len: usize,
    /// Strings that end a completion (left out of the text): `stop_len` non-NULL, non-empty,
    /// NUL-terminated UTF-8 strings; NULL / 0 for none. Default NULL / 0.
    pub stop: *const *const c_char,
    /// Length of `stop`.
    pub stop_len: usize,
    /// Keep generating past the model's end-of-sequence tokens. Default false.
    pub ignore_eos: bool,
    /// Whether to return log-probabilities of each generated token (streaming events only).
    /// Default false.
    pub has_logprobs: bool,
    /// With `has_logprobs`: how many of the most likely alternatives to return with each token,
    /// 0..=`AUTOGLM_MAX_LOGPROBS`. Default 0.
    pub logprobs: u32,
    /// Leave special tokens (such as `<|user|>`) out of the text. Default true.
    pub skip_special_tokens: bool,
}

/// Largest `autoglm_sampling_params.logprobs`.
pub const AUTOGLM_MAX_LOGPROBS: u32 = 20;
const _: () = assert!(AUTOGLM_MAX_LOGPROBS as usize == autoglm_core::sampling::MAX_LOGPROBS);

/// The default sampling parameters (see each field): temperature 1, at most 16 tokens.
///
/// Ownership: returned by value; nothing to free.
#[no_mangle]
pub extern "C" fn autoglm_sampling_params_default() -> autoglm_sampling_params {
    let fallback = autoglm_sampling_params {
        struct_size: std::mem::size_of::<autoglm_sampling_params>(),
        n: 1,
        max_tokens: 16,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        has_seed: false,
        seed: 0,
        stop_token_ids: std::ptr::null(),
        stop_token_ids_len: 0,
        stop: std::ptr::null(),
        stop_len: 0,
        ignore_eos: false,
        has_logprobs: false,
        logprobs: 0,
        skip_special_tokens: true,
    };
    boundary_value("autoglm_sampling_params_default", fallback, || {
        let d = SamplingParams::default();
        autoglm_sampling_params {
            n: narrow(d.n),
            max_tokens: narrow(d.max_tokens),
            temperature: d.temperature,
            top_k: narrow(d.top_k),
            top_p: d.top_p,
            min_p: d.min_p,
            repetition_penalty: d.repetition_penalty,
            presence_penalty: d.presence_penalty,
            frequency_penalty: d.frequency_penalty,
            has_seed: d.seed.is_some(),
            seed: d.seed.unwrap_or(0),
            ignore_eos: d.ignore_eos,
            has_logprobs: d.logprobs.is_some(),
            logprobs: d.logprobs.map_or(0, narrow),
            skip_special_tokens: d.skip_special_tokens,
            ..fallback
        }
    })
}

impl autoglm_sampling_params {
    /// The core's parameters. Value ranges are checked by the engine on submit; this checks the
    /// pointers and strings.
    ///
    /// # Safety
    ///
    /// `stop_token_ids` and `stop` are NULL or valid as documented on the fields.
    pub(crate) unsafe fn to_params(self) -> Result<SamplingParams, CapiError> {
        // SAFETY: forwarded contract on `stop_token_ids`.
        let stop_token_ids = unsafe {
            ffi::slice_arg(
                self.stop_token_ids,
                self.stop_token_ids_len,
                "params->stop_token_ids",
            )
        }?;
        // SAFETY: forwarded contract on `stop`.
        let stop_ptrs = unsafe { ffi::slice_arg(self.stop, self.stop_len, "params->stop") }?;
        let stop = stop_ptrs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                // SAFETY: each entry is a NUL-terminated string by the field's contract; NULL is
                // reported by str_arg.
                unsafe { ffi::str_arg(p, &format!("params->stop[{i}]")) }.map(str::to_owned)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SamplingParams {
            n: self.n as usize,
            max_tokens: self.max_tokens as usize,
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.has_seed.then_some(self.seed),
            stop_token_ids: stop_token_ids.to_vec(),
            stop,
            ignore_eos: self.ignore_eos,
            logprobs: self.has_logprobs.then_some(self.logprobs as usize),
            skip_special_tokens: self.skip_special_tokens,
            // Structured output from C: not in the options struct yet (docs/C_API.md).
            structured: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_to_the_core_defaults() {
        let o = autoglm_engine_options_default();
        // SAFETY: the default options hold no pointers.
        let c = unsafe { o.to_config() }.unwrap();
        assert_eq!(c, EngineConfig::default());
        let p = autoglm_sampling_params_default();
        // SAFETY: the default params hold no pointers.
        assert_eq!(unsafe { p.to_params() }.unwrap(), SamplingParams::default());
    }

    #[test]
    fn field_ends_cover_every_field_in_order() {
        use ffi::SizedStruct;
        for (ends, size, min) in [
            (
                autoglm_engine_options::field_ends(),
                std::mem::size_of::<autoglm_engine_options>(),
                autoglm_engine_options::min_size(),
            ),
            (
                autoglm_sampling_params::field_ends(),
                std::mem::size_of::<autoglm_sampling_params>(),
                autoglm_sampling_params::min_size(),
            ),
        ] {
            assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
            // The last field ends within the struct, past at most its tail padding.
            let last = *ends.last().unwrap();
            assert!(last <= size && size - last < 8, "{last} {size}");
            assert!(ends.contains(&min));
        }
    }
}
