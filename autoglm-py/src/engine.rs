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
use std::sync::Mutex;

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
use crate::prompt::{self, parse_many, parse_one, Prompt, Tokenized};
use crate::stream::{AsyncRequestStream, RequestStream, StreamCore};
use crate::tokenizer::{render, Tokenizer};
use crate::wait::{self, CancelOnDone, CancelSignal};

/// The engine options `Engine(...)` accepts as keywords, besides `device`.
pub(crate) const OPTIONS: [&str; 13] = [
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
/// (CUDA: launch every kernel of every decode step instead of replaying CUDA graphs). Use it as a
/// context manager, or call
/// `close()`, to stop the engine thread deterministically.
#[pyclass(module = "autoglm", frozen)]
pub(crate) struct Engine {
    /// The core handle; `None` after `close()`. Calls clone it and release the lock at once.
    inner: Mutex<Option<CoreEngine>>,
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

    /// Tokenizes (detached) and submits every prompt; all or none are submitted.
    fn submit(
        &self,
        py: Python<'_>,
        prompts: Vec<Prompt>,
        params: Vec<CoreParams>,
        priority: i32,
    ) -> PyResult<Vec<Submitted>> {
        let engine = self.handle()?;
        let tok = self.tokenizer.as_ref();
        let tokenized = py
            .detach(|| {
                prompts
                    .into_iter()
                    .map(|p| prompt::tokenize(tok, p))
                    .collect::<autoglm_core::Result<Vec<_>>>()
            })
            .map_err(request_err)?;
        tokenized
            .into_iter()
            .zip(params)
            .map(|(prompt, params)| {
                let (n, logprobs) = (params.n, params.logprobs.is_some());
                let stream = engine
                    .submit_request(Request {
                        prompt: prompt.ids.clone(),
                        params,
                        priority,
                        images: Vec::new(),
                    })
                    .map_err(request_err)?;
                Ok(Submitted {
                    stream,
                    prompt,
                    n,
                    logprobs,
                })
            })
            .collect()
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
    ) -> PyResult<std::sync::Arc<StreamCore>> {
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
        let engine = self.inner.get_mut().ok().and_then(|e| e.take());
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
            let engine = py
                .detach(|| CoreEngine::from_dir(&model, config))
                .map_err(|e| to_py(e, Phase::Load))?;
            let tokenizer = engine.tokenizer().ok().cloned();
            Ok(Engine {
                tokenizer,
                device: engine.config().device.to_string(),
                max_model_len: engine.max_model_len(),
                model_config: engine.model_config().clone(),
                inner: Mutex::new(Some(engine)),
                model,
            })
        })
    }

    /// Generates for one prompt or a list of prompts, waiting (with the GIL released) until all
    /// are done. Prompts of a list are submitted together, so the engine batches them.
    ///
    /// `prompts`: a str (text), a list of ints (token ids), a list of `{"role", "content"}` dicts
    /// (chat messages, rendered through the chat template), or a list of those.
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
    /// Cancelling it cancels the requests. Must be called with an event loop running.
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
            let (subs, single) = match self.submit_many(py, prompts, params, priority) {
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
                let done = pin!(collect_all(subs));
                match select(cancelled, done).await {
                    // Dropping the streams cancels the requests.
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
