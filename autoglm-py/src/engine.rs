//! `Engine`: loads a model and serves requests from any number of Python threads or asyncio
//! tasks.
//!
//! The Python object holds a core [`CoreEngine`] handle. A call parses its prompts while attached,
//! tokenizes and submits them detached, and waits detached (blocking calls) or on the bridge thread
//! (asyncio calls); requests submitted together are batched by the engine. `close()` drops the
//! handle, which stops the engine thread and fails requests in flight with
//! `EngineShutdownError`.

use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use autoglm_core::engine::{Completion, GenerateOutput, Request, RequestId, Usage};
use autoglm_core::sampling::SamplingParams as CoreParams;
use autoglm_core::tokenizer::Tokenizer as CoreTokenizer;
use autoglm_core::{Engine as CoreEngine, EngineConfig, RequestStream as CoreStream};
use futures::future::{select, Either};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::errors::{guard, invalid, new_err, request_err, to_py, Kind, Phase};
use crate::outputs::{request_output, EngineStats, RequestOutput};
use crate::params::per_prompt;
use crate::prompt::{self, parse_many, parse_one, Prompt, Ready, Tokenized};
use crate::stream::{AsyncRequestStream, RequestStream, StreamCore};
use crate::tokenizer::{render, Tokenizer};
use crate::wait::{self, CancelOnDone, CancelSignal};

/// The engine options `Engine(...)` accepts as keywords, besides `device`.
pub(crate) const OPTIONS: [&str; 21] = [
    "block_size",
    "num_blocks",
    "kv_cache_mb",
    "enable_prefix_caching",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "engine_core",
    "compute_cores",
    "num_threads",
    "seed",
    "gpu_memory_utilization",
    "enforce_eager",
    "limit_mm_per_prompt",
    "mm_processor_kwargs",
    "chat_template_content_format",
    "allowed_local_media_path",
    "encoder_cache_mb",
    "media_nice",
    "inline_encoder",
    "log_stats_interval",
];

fn option_err(name: &str, v: &Bound<'_, PyAny>, want: &str) -> PyErr {
    let shown = v.repr().map(|r| r.to_string()).unwrap_or_default();
    invalid(format!("engine option {name} = {shown}: {want}"))
}

fn opt_uint(name: &str, v: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    if v.is_none() {
        return Ok(None);
    }
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(option_err(name, v, "must be an int"));
    }
    v.extract::<usize>()
        .map(Some)
        .map_err(|_| option_err(name, v, "must be an int >= 0"))
}

fn uint(name: &str, v: &Bound<'_, PyAny>, default: usize) -> PyResult<usize> {
    Ok(opt_uint(name, v)?.unwrap_or(default))
}

/// A JSON object option given as a dict or as JSON text (vLLM's command-line spelling).
fn json_option(name: &str, v: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    if let Ok(s) = v.cast::<pyo3::types::PyString>() {
        return serde_json::from_str(s.to_str()?)
            .map_err(|e| option_err(name, v, &format!("not JSON: {e}")));
    }
    if v.cast::<pyo3::types::PyMapping>().is_err() {
        return Err(option_err(name, v, "must be a dict or a JSON object (str)"));
    }
    prompt::to_json(v).map_err(|_| {
        option_err(
            name,
            v,
            "must be a dict of str keys to ints (or a JSON object as a str)",
        )
    })
}

/// The message of a core configuration error, without the field it names (the option's name
/// replaces it).
fn config_msg(e: autoglm_core::Error) -> String {
    match e {
        autoglm_core::Error::InvalidConfig { msg, .. } => msg,
        e => e.to_string(),
    }
}

/// `EngineConfig` from `device` and the keyword options; an unknown or bad option is an
/// `InvalidRequestError` naming it.
pub(crate) fn engine_config(
    device: &str,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<EngineConfig> {
    let mut cfg = EngineConfig {
        device: device.parse().map_err(|e| to_py(e, Phase::Load))?,
        ..EngineConfig::default()
    };
    let Some(options) = options else {
        return Ok(cfg);
    };
    for (k, v) in options.iter() {
        let name: String = k.extract()?;
        let n = name.as_str();
        let (cache, sched, threads) = (&mut cfg.cache, &mut cfg.scheduler, &mut cfg.threading);
        let mm = &mut cfg.multimodal;
        match n {
            "block_size" => cache.block_size = uint(n, &v, cache.block_size)?,
            "num_blocks" => cache.num_blocks = opt_uint(n, &v)?,
            "kv_cache_mb" => {
                let mb = uint(n, &v, cache.memory_bytes >> 20)?;
                cache.memory_bytes = mb
                    .checked_mul(1 << 20)
                    .ok_or_else(|| option_err(n, &v, "is too large"))?;
            }
            "enable_prefix_caching" => {
                if !v.is_none() {
                    cache.enable_prefix_caching = v
                        .extract::<bool>()
                        .map_err(|_| option_err(n, &v, "must be a bool"))?;
                }
            }
            "max_num_seqs" => sched.max_num_seqs = uint(n, &v, sched.max_num_seqs)?,
            "max_num_batched_tokens" => {
                sched.max_num_batched_tokens = uint(n, &v, sched.max_num_batched_tokens)?
            }
            "max_model_len" => sched.max_model_len = opt_uint(n, &v)?,
            "engine_core" => threads.engine_core = opt_uint(n, &v)?,
            "compute_cores" => {
                threads.compute_cores = if v.is_none() {
                    Vec::new()
                } else {
                    v.extract::<Vec<usize>>()
                        .map_err(|_| option_err(n, &v, "must be a list of core ids (ints >= 0)"))?
                }
            }
            "num_threads" => threads.num_threads = opt_uint(n, &v)?,
            "gpu_memory_utilization" => {
                if !v.is_none() {
                    let u = v
                        .extract::<f64>()
                        .ok()
                        .filter(|u| {
                            *u > 0.0 && *u <= 1.0 && !v.is_instance_of::<pyo3::types::PyBool>()
                        })
                        .ok_or_else(|| option_err(n, &v, "must be a number in (0, 1]"))?;
                    cfg.cuda.memory_utilization = u as f32;
                }
            }
            "enforce_eager" => {
                if !v.is_none() {
                    cfg.cuda.graphs = !v
                        .extract::<bool>()
                        .map_err(|_| option_err(n, &v, "must be a bool"))?;
                }
            }
            "limit_mm_per_prompt" if !v.is_none() => mm
                .set_limit_mm_per_prompt(&json_option(n, &v)?)
                .map_err(|e| option_err(n, &v, &config_msg(e)))?,
            "mm_processor_kwargs" if !v.is_none() => mm
                .set_mm_processor_kwargs(&json_option(n, &v)?)
                .map_err(|e| option_err(n, &v, &config_msg(e)))?,
            "chat_template_content_format" if !v.is_none() => {
                let s: String = v
                    .extract()
                    .map_err(|_| option_err(n, &v, "must be \"string\" or \"openai\""))?;
                mm.content_format = s
                    .parse()
                    .map_err(|_| option_err(n, &v, "must be \"string\" or \"openai\""))?;
            }
            "allowed_local_media_path" => {
                mm.allowed_local_media_path = if v.is_none() {
                    None
                } else {
                    let dir: PathBuf = v
                        .extract()
                        .map_err(|_| option_err(n, &v, "must be a path (str or os.PathLike)"))?;
                    if !dir.is_dir() {
                        return Err(option_err(n, &v, "is not a directory"));
                    }
                    Some(dir)
                };
            }
            "encoder_cache_mb" => {
                let mb = uint(n, &v, mm.encoder_cache_bytes >> 20)?;
                mm.encoder_cache_bytes = mb
                    .checked_mul(1 << 20)
                    .ok_or_else(|| option_err(n, &v, "is too large"))?;
            }
            "media_nice" => {
                let nice = uint(n, &v, mm.media_nice as usize)?;
                if nice > 19 {
                    return Err(option_err(n, &v, "must be an int in 0..19"));
                }
                mm.media_nice = nice as i32;
            }
            "inline_encoder" => {
                if !v.is_none() {
                    mm.concurrent_encoder = !v
                        .extract::<bool>()
                        .map_err(|_| option_err(n, &v, "must be a bool"))?;
                }
            }
            "log_stats_interval" => {
                if !v.is_none() {
                    let secs = v
                        .extract::<f64>()
                        .ok()
                        .filter(|s| {
                            *s >= 0.0 && s.is_finite() && !v.is_instance_of::<pyo3::types::PyBool>()
                        })
                        .ok_or_else(|| option_err(n, &v, "must be a number of seconds >= 0"))?;
                    cfg.log_stats_interval =
                        (secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs));
                }
            }
            "limit_mm_per_prompt" | "mm_processor_kwargs" | "chat_template_content_format" => {}
            "seed" => {
                if !v.is_none() {
                    cfg.seed = v
                        .extract::<u64>()
                        .map_err(|_| option_err(n, &v, "must be an int in 0..2**64"))?;
                }
            }
            _ => {
                return Err(invalid(format!(
                    "unknown engine option {name:?} (known: device, {})",
                    OPTIONS.join(", ")
                )))
            }
        }
    }
    let mm = &cfg.multimodal;
    if let (Some(lo), Some(hi)) = (mm.min_pixels, mm.max_pixels) {
        if lo > hi {
            return Err(invalid(format!(
                "engine option mm_processor_kwargs: min_pixels {lo} is above max_pixels {hi}"
            )));
        }
    }
    Ok(cfg)
}

/// A submitted request and what its result needs.
struct Submitted {
    stream: CoreStream,
    prompt: Tokenized,
    n: usize,
    logprobs: bool,
}

/// A finished request.
type Finished = (RequestId, Tokenized, bool, GenerateOutput);

/// Gathers one request's events into its choices (as the core's `collect`, awaiting).
async fn collect(s: Submitted) -> autoglm_core::Result<Finished> {
    let Submitted {
        mut stream,
        prompt,
        n,
        logprobs,
    } = s;
    let mut out = GenerateOutput {
        choices: vec![Completion::default(); n],
        usage: Usage::default(),
    };
    while let Some(ev) = stream.recv_async().await {
        let ev = ev?;
        let c = out.choices.get_mut(ev.index).ok_or_else(|| {
            autoglm_core::Error::Backend(format!("event for choice {} of {n}", ev.index))
        })?;
        c.token_ids.extend_from_slice(&ev.token_ids);
        c.text.push_str(&ev.text);
        c.logprobs.extend(ev.logprobs);
        if ev.finish_reason.is_some() {
            c.finish_reason = ev.finish_reason;
        }
        if let Some(u) = ev.usage {
            // The request's last event.
            out.usage = u;
            break;
        }
    }
    Ok((stream.id(), prompt, logprobs, out))
}

/// Waits for every request; the first error wins (the others are then cancelled by drop).
async fn collect_all(subs: Vec<Submitted>) -> autoglm_core::Result<Vec<Finished>> {
    let mut out = Vec::with_capacity(subs.len());
    for s in subs {
        out.push(collect(s).await?);
    }
    Ok(out)
}

/// Submits prompts ready for the engine.
fn submit_ready(
    engine: &CoreEngine,
    ready: Vec<Ready>,
    params: Vec<CoreParams>,
    priority: i32,
) -> autoglm_core::Result<Vec<Submitted>> {
    ready
        .into_iter()
        .zip(params)
        .map(|(Ready { prompt, images }, params)| {
            let (n, logprobs) = (params.n, params.logprobs.is_some());
            let stream = engine.submit_request(Request {
                prompt: prompt.ids.clone(),
                params,
                priority,
                images,
                cache_salt: None,
            })?;
            Ok(Submitted {
                stream,
                prompt,
                n,
                logprobs,
            })
        })
        .collect()
}

/// Python results: one `RequestOutput`, or a list of them for a list of prompts.
fn results(py: Python<'_>, finished: Vec<Finished>, single: bool) -> PyResult<Bound<'_, PyAny>> {
    let outs = finished
        .into_iter()
        .map(|(id, prompt, logprobs, out)| request_output(py, id, prompt, logprobs, out))
        .collect::<PyResult<Vec<Py<RequestOutput>>>>()?;
    if single {
        if let Some(o) = outs.into_iter().next() {
            return Ok(o.into_bound(py).into_any());
        }
        return Ok(py.None().into_bound(py));
    }
    Ok(PyList::new(py, outs)?.into_any())
}

/// An inference engine over one model directory.
///
/// `Engine(model, *, device="auto", **options)` loads the checkpoint (config.json, safetensors
/// weights, tokenizer) and starts the engine thread. Options: block_size, num_blocks,
/// kv_cache_mb, enable_prefix_caching, max_num_seqs, max_num_batched_tokens, max_model_len,
/// engine_core, compute_cores, num_threads, seed, gpu_memory_utilization (the share of the GPU's
/// free memory the CUDA backend may use for weights and KV cache; default 0.9), enforce_eager
/// (CUDA: launch every kernel of every decode step instead of replaying CUDA graphs).
/// Images (GLM-4.1V models): limit_mm_per_prompt (`{"image": N}`, a dict or JSON text, as vLLM's
/// flag), mm_processor_kwargs (`{"max_pixels": P, "min_pixels": Q}`, or transformers' `{"size":
/// {"longest_edge", "shortest_edge"}}`), chat_template_content_format (`"string"`, the default:
/// each list content becomes one string with the image placeholders first, as Open-AutoGLM's vLLM
/// command renders; `"openai"`: the template places each image part), allowed_local_media_path (a
/// directory: `image_url` parts may name local files under it; none by default),
/// encoder_cache_mb (memory for encoded image features kept for reuse; default 256), media_nice
/// (0..19, default 19: the nice value of the threads that preprocess and, on the CPU, encode
/// images beside the engine's steps, so decoding streams take shared cores first),
/// inline_encoder (run the vision tower on the engine thread between steps instead).
/// log_stats_interval: seconds between the engine's stats records (logger `autoglm.stats`, info;
/// default 10, 0 turns them off).
/// Use it as a context manager, or call `close()`, to stop the engine thread deterministically.
#[pyclass(module = "autoglm", frozen)]
pub(crate) struct Engine {
    /// The core handle; `None` after `close()`. Calls clone it and release the lock at once.
    /// Shared with `generate_async` work waiting for images, which takes a handle only to submit.
    inner: Arc<Mutex<Option<CoreEngine>>>,
    /// The tokenizer (shared with the engine thread), usable after `close()`.
    tokenizer: Option<CoreTokenizer>,
    /// The model directory as given.
    model: PathBuf,
    /// The device the engine runs on, as `Device` displays it.
    device: String,
    /// Longest sequence the engine accepts.
    max_model_len: usize,
    /// The model's configuration.
    model_config: autoglm_core::model::ModelConfig,
}

impl Engine {
    fn handle(&self) -> PyResult<CoreEngine> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| new_err(Kind::Backend, "the engine lock is poisoned"))?;
        guard
            .clone()
            .ok_or_else(|| new_err(Kind::EngineShutdown, "the engine has been closed"))
    }

    /// Renders and tokenizes every prompt, reads and preprocesses its images (all detached) and
    /// submits them; all or none are submitted.
    fn submit(
        &self,
        py: Python<'_>,
        prompts: Vec<Prompt>,
        params: Vec<CoreParams>,
        priority: i32,
    ) -> PyResult<Vec<Submitted>> {
        let engine = self.handle()?;
        let tok = self.tokenizer.as_ref();
        let ready = py
            .detach(|| {
                prompts
                    .into_iter()
                    .map(|p| prompt::prepare(&engine, tok, p)?.expand(&engine))
                    .collect::<autoglm_core::Result<Vec<_>>>()
            })
            .map_err(request_err)?;
        submit_ready(&engine, ready, params, priority).map_err(request_err)
    }

    /// Renders and tokenizes every prompt and reads its images (detached), then starts their
    /// preprocessing on the engine's image threads: the future submits them (all or none) once
    /// every image is ready, so an event loop never waits for a decode or a resize.
    fn submit_later(
        &self,
        py: Python<'_>,
        prompts: Vec<Prompt>,
        params: Vec<CoreParams>,
        priority: i32,
    ) -> PyResult<impl std::future::Future<Output = autoglm_core::Result<Vec<Submitted>>> + Send>
    {
        let engine = self.handle()?;
        let tok = self.tokenizer.as_ref();
        let prepared = py
            .detach(|| {
                prompts
                    .into_iter()
                    .map(|p| prompt::prepare(&engine, tok, p))
                    .collect::<autoglm_core::Result<Vec<_>>>()
            })
            .map_err(request_err)?;
        let expanding: Vec<_> = prepared
            .into_iter()
            .map(|p| p.expand_async(&engine))
            .collect();
        drop(engine);
        // Not a handle: `close()` while images are preprocessed still stops the engine.
        let inner = self.inner.clone();
        Ok(async move {
            let mut ready = Vec::with_capacity(expanding.len());
            for e in expanding {
                ready.push(e.await?);
            }
            let engine = inner
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .ok_or(autoglm_core::Error::EngineShutdown)?;
            submit_ready(&engine, ready, params, priority)
        })
    }

    fn submit_many(
        &self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        priority: i32,
    ) -> PyResult<(Vec<Submitted>, bool)> {
        let (prompts, single) = parse_many(prompts)?;
        let params = per_prompt(params, prompts.len())?;
        Ok((self.submit(py, prompts, params, priority)?, single))
    }

    fn submit_one(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        priority: i32,
    ) -> PyResult<Arc<StreamCore>> {
        let prompt = parse_one(prompt)?;
        let params = per_prompt(params, 1)?;
        let s = self
            .submit(py, vec![prompt], params, priority)?
            .pop()
            .ok_or_else(|| new_err(Kind::Backend, "no request was submitted"))?;
        Ok(StreamCore::new(s.stream, s.prompt, s.logprobs))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Dropping the last handle joins the engine thread: a wait, so not while attached.
        let engine = self.inner.lock().ok().and_then(|mut e| e.take());
        if engine.is_some() {
            Python::attach(|py| py.detach(move || drop(engine)));
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model, *, device = "auto", **options))]
    fn new(
        py: Python<'_>,
        model: PathBuf,
        device: &str,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        guard(|| {
            let config = engine_config(device, options)?;
            crate::refresh_log_levels();
            let engine = py
                .detach(|| CoreEngine::from_dir(&model, config))
                .map_err(|e| to_py(e, Phase::Load))?;
            let tokenizer = engine.tokenizer().ok().cloned();
            Ok(Engine {
                tokenizer,
                device: engine.config().device.to_string(),
                max_model_len: engine.max_model_len(),
                model_config: engine.model_config().clone(),
                inner: Arc::new(Mutex::new(Some(engine))),
                model,
            })
        })
    }

    /// Generates for one prompt or a list of prompts, waiting (with the GIL released) until all
    /// are done. Prompts of a list are submitted together, so the engine batches them.
    ///
    /// `prompts`: a str (text), a list of ints (token ids), a list of `{"role", "content"}` dicts
    /// (chat messages, rendered through the chat template), or a list of those. A message's
    /// `content` may be a list of OpenAI content parts: `{"type": "text", "text": ...}`,
    /// `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`, or
    /// `{"type": "image", "image": X}` with X the encoded file (`bytes`), a path (`str` or
    /// `os.PathLike`, read by the caller's process) or a `PIL.Image.Image`. Images are decoded and
    /// resized on the engine's image threads with the GIL released.
    /// `params`: one `SamplingParams` for all, a list of one per prompt, or `None` (defaults).
    /// Returns a `RequestOutput`, or a list of them for a list of prompts.
    #[pyo3(signature = (prompts, params = None, *, priority = 0))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyAny>>,
        priority: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let (subs, single) = self.submit_many(py, prompts, params, priority)?;
            let finished = wait::block_on(py, collect_all(subs))?.map_err(request_err)?;
            results(py, finished, single)
        })
    }

    /// Replies to one conversation: `messages` is a list of `{"role", "content"}` dicts (content
    /// parts may carry images, as in `generate`), rendered through the chat template with the
    /// assistant's turn opened. Returns a `RequestOutput`; the same as `generate(messages, ...)`,
    /// named as vLLM's `LLM.chat`.
    #[pyo3(signature = (messages, params = None, *, priority = 0))]
    fn chat<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyAny>>,
        priority: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let is_messages = messages
            .cast::<pyo3::types::PyList>()
            .is_ok_and(|l| l.iter().all(|m| m.cast::<pyo3::types::PyDict>().is_ok()));
        if !is_messages {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "chat() takes a list of message dicts ({\"role\": ..., \"content\": ...})",
            ));
        }
        self.generate(py, messages, params, priority)
    }

    /// Submits one prompt and returns a `RequestStream`: an iterator of `CompletionChunk` deltas.
    /// Breaking out of the loop (and dropping the stream) cancels the request.
    #[pyo3(signature = (prompt, params = None, *, priority = 0))]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        priority: i32,
    ) -> PyResult<RequestStream> {
        guard(|| {
            self.submit_one(py, prompt, params, priority)
                .map(RequestStream::new)
        })
    }

    /// `generate` for asyncio: returns an awaitable (an `asyncio.Future`) of the same result.
    /// Cancelling it cancels the requests. Must be called with an event loop running. Images are
    /// preprocessed off the event loop; image files are read, and the template rendered, before
    /// it returns.
    #[pyo3(signature = (prompts, params = None, *, priority = 0))]
    fn generate_async<'py>(
        &self,
        py: Python<'py>,
        prompts: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyAny>>,
        priority: i32,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let event_loop = wait::running_loop(py)?;
            let fut = event_loop.call_method0("create_future")?;
            // Errors surface when awaited, as they would from an `async def`.
            let submitted = parse_many(prompts).and_then(|(prompts, single)| {
                let params = per_prompt(params, prompts.len())?;
                Ok((self.submit_later(py, prompts, params, priority)?, single))
            });
            let (submitted, single) = match submitted {
                Ok(s) => s,
                Err(e) => {
                    wait::set_exception(&fut, e)?;
                    return Ok(fut);
                }
            };
            let signal = CancelSignal::new();
            fut.call_method1(
                "add_done_callback",
                (CancelOnDone {
                    signal: signal.clone(),
                },),
            )?;
            let work = async move {
                let cancelled = pin!(signal.cancelled());
                // Dropped when cancelled: image preprocessing stops, submitted requests cancel.
                let done = pin!(async move { collect_all(submitted.await?).await });
                match select(cancelled, done).await {
                    Either::Left(_) => None,
                    Either::Right((r, _)) => Some(r),
                }
            };
            wait::spawn(
                event_loop.unbind(),
                fut.clone().unbind(),
                work,
                move |py, fut, r| match r {
                    None => Ok(()),
                    Some(Ok(finished)) => wait::set_result(fut, results(py, finished, single)?),
                    Some(Err(e)) => wait::set_exception(fut, request_err(e)),
                },
            )?;
            Ok(fut)
        })
    }

    /// `stream` for asyncio: returns an `AsyncRequestStream` (an async iterator of
    /// `CompletionChunk`). Breaking out of `async for` (and dropping it) cancels the request.
    /// The request is submitted before it returns, so a prompt's images are preprocessed then
    /// (the GIL released; use `generate_async` to keep the event loop free meanwhile).
    #[pyo3(signature = (prompt, params = None, *, priority = 0))]
    fn stream_async(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        priority: i32,
    ) -> PyResult<AsyncRequestStream> {
        guard(|| {
            self.submit_one(py, prompt, params, priority)
                .map(AsyncRequestStream::new)
        })
    }

    /// Renders chat messages with the model's chat template (see `Tokenizer.apply_chat_template`).
    #[pyo3(signature = (messages, tools = None, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        tools: Option<&Bound<'_, PyAny>>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        guard(|| {
            let tok = self.tokenizer.as_ref().ok_or_else(|| {
                new_err(Kind::Tokenizer, "this engine was built without a tokenizer")
            })?;
            render(py, tok, messages, tools, add_generation_prompt)
        })
    }

    /// The model's tokenizer.
    #[getter]
    fn tokenizer(&self) -> PyResult<Tokenizer> {
        guard(|| {
            self.tokenizer
                .clone()
                .map(|inner| Tokenizer { inner })
                .ok_or_else(|| {
                    new_err(Kind::Tokenizer, "this engine was built without a tokenizer")
                })
        })
    }

    /// A snapshot of the engine's live counters.
    fn stats(&self) -> PyResult<EngineStats> {
        guard(|| {
            let engine = self.handle()?;
            let s = engine.stats();
            let r = Ordering::Relaxed;
            Ok(EngineStats {
                waiting: s.waiting.load(r),
                running: s.running.load(r),
                kv_blocks_used: s.kv_blocks_used.load(r),
                kv_blocks_total: s.kv_blocks_total.load(r),
                steps: s.steps.load(r),
                preemptions: s.preemptions.load(r),
                prompt_tokens_computed: s.prompt_tokens_computed.load(r),
                generated_tokens: s.generated_tokens.load(r),
            })
        })
    }

    /// Longest sequence (prompt plus output) the engine accepts.
    #[getter]
    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// The device the model runs on (`"cpu"`, ...).
    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }

    /// The model directory.
    #[getter]
    fn model_path(&self) -> String {
        self.model.display().to_string()
    }

    /// The model's configuration (architecture and shapes) as a dict.
    #[getter]
    fn model_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard(|| {
            let c = &self.model_config;
            let d = PyDict::new(py);
            d.set_item("architecture", c.architecture.name())?;
            d.set_item("hidden_size", c.hidden_size)?;
            d.set_item("intermediate_size", c.intermediate_size)?;
            d.set_item("num_layers", c.num_layers)?;
            d.set_item("num_heads", c.num_heads)?;
            d.set_item("num_kv_heads", c.num_kv_heads)?;
            d.set_item("head_dim", c.head_dim)?;
            d.set_item("vocab_size", c.vocab_size)?;
            d.set_item("max_position_embeddings", c.max_position_embeddings)?;
            d.set_item("rotary_dim", c.rotary_dim)?;
            d.set_item("eos_token_ids", PyList::new(py, &c.eos_token_ids)?)?;
            Ok(d)
        })
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }

    /// Stops the engine: requests in flight fail with `EngineShutdownError`, later calls raise it.
    /// Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        guard(|| {
            let engine = self.inner.lock().ok().and_then(|mut g| g.take());
            // Dropping the last handle joins the engine thread.
            py.detach(move || drop(engine));
            Ok(())
        })
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let model = self.model.display().to_string();
        let model = pyo3::types::PyString::new(py, &model)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or(model);
        format!(
            "Engine(model={model}, device='{}', architecture='{}')",
            self.device,
            self.model_config.architecture.name()
        )
    }
}
