//! Result objects, shaped like vLLM's: a `RequestOutput` per prompt holding one
//! `CompletionOutput` per choice (`n`), and a `CompletionChunk` per streamed delta.
//!
//! They are immutable snapshots; list attributes are built once, when the object is made.

use autoglm_core::engine::{GenerateOutput, RequestId, Usage as CoreUsage};
use autoglm_core::sampling::{FinishReason, TokenLogprobs as CoreLogprobs};
use autoglm_core::RequestOutput as CoreEvent;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::prompt::Tokenized;

/// Token counts of a request.
#[pyclass(module = "autoglm", frozen, eq, get_all)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Prompt tokens.
    prompt_tokens: usize,
    /// Generated tokens over all choices.
    completion_tokens: usize,
    /// Prompt tokens whose KV blocks were reused from the prefix cache.
    cached_prompt_tokens: usize,
}

#[pymethods]
impl Usage {
    /// `prompt_tokens + completion_tokens`.
    #[getter]
    fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }

    fn __repr__(&self) -> String {
        format!(
            "Usage(prompt_tokens={}, completion_tokens={}, cached_prompt_tokens={})",
            self.prompt_tokens, self.completion_tokens, self.cached_prompt_tokens
        )
    }
}

impl From<CoreUsage> for Usage {
    fn from(u: CoreUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_prompt_tokens: u.cached_prompt_tokens,
        }
    }
}

/// Logprobs of one generated token, under the model's raw distribution.
#[pyclass(module = "autoglm", frozen, get_all)]
pub(crate) struct TokenLogprobs {
    /// The chosen token.
    token_id: u32,
    /// Its logprob.
    logprob: f64,
    /// The most likely tokens as `(token_id, logprob)`, best first (`logprobs` of them).
    top: Py<PyList>,
}

#[pymethods]
impl TokenLogprobs {
    fn __repr__(&self) -> String {
        format!(
            "TokenLogprobs(token_id={}, logprob={})",
            self.token_id, self.logprob
        )
    }
}

fn logprobs_list(
    py: Python<'_>,
    wanted: bool,
    lps: &[CoreLogprobs],
) -> PyResult<Option<Py<PyList>>> {
    if !wanted {
        return Ok(None);
    }
    let items = lps
        .iter()
        .map(|lp| {
            let top: Vec<(u32, f64)> = lp.top.iter().map(|&(t, l)| (t, l as f64)).collect();
            Py::new(
                py,
                TokenLogprobs {
                    token_id: lp.token_id,
                    logprob: lp.logprob as f64,
                    top: PyList::new(py, top)?.unbind(),
                },
            )
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok(Some(PyList::new(py, items)?.unbind()))
}

fn reason(r: Option<FinishReason>) -> Option<&'static str> {
    r.map(FinishReason::as_str)
}

/// Python's `repr` of a str.
fn str_repr(py: Python<'_>, s: &str) -> String {
    pyo3::types::PyString::new(py, s)
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| format!("{s:?}"))
}

/// Python's `repr` of an optional finish reason.
fn reason_repr(r: Option<&str>) -> String {
    r.map_or_else(|| "None".to_owned(), |r| format!("'{r}'"))
}

/// One finished choice of a request.
#[pyclass(module = "autoglm", frozen, get_all)]
pub(crate) struct CompletionOutput {
    /// Which choice (0..n).
    index: usize,
    /// Generated text (stop strings excluded).
    text: String,
    /// Generated token ids.
    token_ids: Py<PyList>,
    /// Per-token logprobs when `SamplingParams.logprobs` was set, else `None`.
    logprobs: Option<Py<PyList>>,
    /// `"stop"`, `"length"` or `"abort"`.
    finish_reason: Option<&'static str>,
}

#[pymethods]
impl CompletionOutput {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "CompletionOutput(index={}, text={}, finish_reason={})",
            self.index,
            str_repr(py, &self.text),
            reason_repr(self.finish_reason)
        )
    }
}

/// The result of one prompt. `text`, `token_ids`, `logprobs` and `finish_reason` are those of
/// the first choice; `outputs` holds every choice when `n > 1`.
#[pyclass(module = "autoglm", frozen, get_all)]
pub(crate) struct RequestOutput {
    /// The engine's id of the request.
    request_id: u64,
    /// The prompt text (for chat messages, the rendered template); `None` for token ids.
    prompt: Option<String>,
    /// The token ids the engine was given.
    prompt_token_ids: Py<PyList>,
    /// One per choice, by index (never empty).
    outputs: Vec<Py<CompletionOutput>>,
    /// Token counts.
    usage: Usage,
}

#[pymethods]
impl RequestOutput {
    /// Text of the first choice.
    #[getter]
    fn text(&self) -> String {
        self.outputs[0].get().text.clone()
    }

    /// Token ids of the first choice.
    #[getter]
    fn token_ids(&self, py: Python<'_>) -> Py<PyList> {
        self.outputs[0].get().token_ids.clone_ref(py)
    }

    /// Logprobs of the first choice (`None` unless asked for).
    #[getter]
    fn logprobs(&self, py: Python<'_>) -> Option<Py<PyList>> {
        self.outputs[0]
            .get()
            .logprobs
            .as_ref()
            .map(|l| l.clone_ref(py))
    }

    /// Finish reason of the first choice.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.outputs[0].get().finish_reason
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let first = self.outputs[0].get();
        format!(
            "RequestOutput(request_id={}, text={}, finish_reason={}, outputs=[{} choice(s)], usage={})",
            self.request_id,
            str_repr(py, &first.text),
            reason_repr(first.finish_reason),
            self.outputs.len(),
            self.usage.__repr__()
        )
    }
}

/// Builds the result of one prompt.
pub(crate) fn request_output(
    py: Python<'_>,
    id: RequestId,
    prompt: Tokenized,
    logprobs: bool,
    out: GenerateOutput,
) -> PyResult<Py<RequestOutput>> {
    let mut outputs: Vec<Py<CompletionOutput>> = out
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            Py::new(
                py,
                CompletionOutput {
                    index,
                    token_ids: PyList::new(py, &c.token_ids)?.unbind(),
                    logprobs: logprobs_list(py, logprobs, &c.logprobs)?,
                    finish_reason: reason(c.finish_reason),
                    text: c.text,
                },
            )
        })
        .collect::<PyResult<_>>()?;
    if outputs.is_empty() {
        // The core validates n >= 1; keep `outputs[0]` (the shortcuts) safe regardless.
        let empty = CompletionOutput {
            index: 0,
            text: String::new(),
            token_ids: PyList::empty(py).unbind(),
            logprobs: None,
            finish_reason: None,
        };
        outputs.push(Py::new(py, empty)?);
    }
    Py::new(
        py,
        RequestOutput {
            request_id: id,
            prompt: prompt.text,
            prompt_token_ids: PyList::new(py, &prompt.ids)?.unbind(),
            outputs,
            usage: out.usage.into(),
        },
    )
}

/// One streamed delta of one choice.
#[pyclass(module = "autoglm", frozen, get_all)]
pub(crate) struct CompletionChunk {
    /// The engine's id of the request.
    request_id: u64,
    /// Which choice (0..n).
    index: usize,
    /// New text (held back while it might be the start of a stop string).
    text: String,
    /// New token ids.
    token_ids: Py<PyList>,
    /// Logprobs of the new tokens when asked for, else `None`.
    logprobs: Option<Py<PyList>>,
    /// Set on the choice's last chunk.
    finish_reason: Option<&'static str>,
    /// Set on the request's last chunk.
    usage: Option<Usage>,
}

#[pymethods]
impl CompletionChunk {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "CompletionChunk(index={}, text={}, finish_reason={})",
            self.index,
            str_repr(py, &self.text),
            reason_repr(self.finish_reason)
        )
    }
}

/// Builds a chunk from a stream event.
pub(crate) fn chunk(
    py: Python<'_>,
    id: RequestId,
    logprobs: bool,
    ev: CoreEvent,
) -> PyResult<Py<CompletionChunk>> {
    Py::new(
        py,
        CompletionChunk {
            request_id: id,
            index: ev.index,
            token_ids: PyList::new(py, &ev.token_ids)?.unbind(),
            logprobs: logprobs_list(py, logprobs, &ev.logprobs)?,
            finish_reason: reason(ev.finish_reason),
            usage: ev.usage.map(Usage::from),
            text: ev.text,
        },
    )
}

/// Live counters of the engine, read when `Engine.stats()` was called.
#[pyclass(module = "autoglm", frozen, get_all)]
pub(crate) struct EngineStats {
    /// Sequences waiting to be scheduled.
    pub(crate) waiting: usize,
    /// Sequences running.
    pub(crate) running: usize,
    /// KV blocks referenced by sequences.
    pub(crate) kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub(crate) kv_blocks_total: usize,
    /// Forward passes run.
    pub(crate) steps: u64,
    /// Preemptions so far.
    pub(crate) preemptions: u64,
    /// Prompt tokens computed (prefix-cache hits excluded).
    pub(crate) prompt_tokens_computed: u64,
    /// Tokens generated.
    pub(crate) generated_tokens: u64,
}

#[pymethods]
impl EngineStats {
    fn __repr__(&self) -> String {
        format!(
            "EngineStats(waiting={}, running={}, kv_blocks_used={}, kv_blocks_total={}, steps={}, \
             preemptions={}, prompt_tokens_computed={}, generated_tokens={})",
            self.waiting,
            self.running,
            self.kv_blocks_used,
            self.kv_blocks_total,
            self.steps,
            self.preemptions,
            self.prompt_tokens_computed,
            self.generated_tokens
        )
    }
}
