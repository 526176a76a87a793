//! `SamplingParams`: the core's [`core::SamplingParams`] with a keyword constructor and validated
//! attributes.
//!
//! Integers are taken as Python ints and range-checked here, so `n=-1` is an
//! `InvalidRequestError` naming `n` (a `ValueError`) rather than an `OverflowError` from the
//! conversion. Every constructor call and every attribute assignment runs the core's `validate()`;
//! a rejected assignment leaves the object unchanged.

use autoglm_core::sampling as core;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::errors::{guard, invalid, request_err};

/// How a request is sampled and when it stops (mirrors vLLM's `SamplingParams`).
///
/// All arguments are keyword-only; omitted ones take the defaults below. Values are validated
/// on construction and on every assignment; a bad one raises `InvalidRequestError` naming the
/// field.
#[pyclass(module = "autoglm", eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct SamplingParams {
    pub(crate) inner: core::SamplingParams,
}

fn count(field: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| invalid(format!("{field} = {v}: must be >= 0")))
}

fn token_id(field: &str, v: i64) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{field}: token id {v} is out of range")))
}

fn seed(v: i128) -> PyResult<u64> {
    u64::try_from(v).map_err(|_| invalid(format!("seed = {v}: must be in 0..2**64")))
}

/// `structured_outputs`: a dict with one of vLLM's kinds (read through Python's `json`, so any
/// JSON-able mapping works).
fn structured(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<core::StructuredOutput>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let text: String = o
        .py()
        .import("json")?
        .call_method1("dumps", (o,))
        .map_err(|e| invalid(format!("structured_outputs: not JSON-serializable: {e}")))?
        .extract()?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("structured_outputs: {e}")))?;
    core::StructuredOutput::from_vllm(&v).map_err(|m| invalid(format!("structured_outputs: {m}")))
}

/// `stop` may be one string or a list of strings, as in vLLM and the OpenAI API.
fn stop_strings(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    match obj {
        None => Ok(Vec::new()),
        Some(o) if o.is_none() => Ok(Vec::new()),
        Some(o) if o.is_instance_of::<PyString>() => Ok(vec![o.extract()?]),
        Some(o) => o.extract(),
    }
}

fn validated(p: core::SamplingParams) -> PyResult<core::SamplingParams> {
    p.validate().map_err(request_err)?;
    Ok(p)
}

/// The `#[pymethods]` block (pyo3 allows one per class): getter/setter pairs whose setter
/// validates the whole object before committing, then the other methods.
macro_rules! fields {
    (methods { $($methods:tt)* }
     $($get:ident / $set:ident : $ty:ty => |$s:ident, $v:ident| $apply:expr, |$g:ident| $read:expr;)*) => {
        #[pymethods]
        impl SamplingParams {
            $(
                #[getter]
                fn $get(&self) -> $ty {
                    let $g = &self.inner;
                    $read
                }

                #[setter]
                fn $set(&mut self, $v: $ty) -> PyResult<()> {
                    guard(|| {
                        let mut $s = self.inner.clone();
                        $apply;
                        self.inner = validated($s)?;
                        Ok(())
                    })
                }
            )*

            $($methods)*
        }
    };
}

fields! {
    methods {
    #[new]
    #[pyo3(signature = (
        *,
        n = 1,
        max_tokens = 16,
        temperature = 1.0,
        top_k = 0,
        top_p = 1.0,
        min_p = 0.0,
        repetition_penalty = 1.0,
        presence_penalty = 0.0,
        frequency_penalty = 0.0,
        seed = None,
        stop_token_ids = None,
        stop = None,
        ignore_eos = false,
        logprobs = None,
        skip_special_tokens = true,
        structured_outputs = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        n: i64,
        max_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        presence_penalty: f64,
        frequency_penalty: f64,
        seed: Option<i128>,
        stop_token_ids: Option<Vec<i64>>,
        stop: Option<&Bound<'_, PyAny>>,
        ignore_eos: bool,
        logprobs: Option<i64>,
        skip_special_tokens: bool,
        structured_outputs: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        guard(|| {
            let inner = core::SamplingParams {
                n: count("n", n)?,
                max_tokens: count("max_tokens", max_tokens)?,
                temperature: temperature as f32,
                top_k: count("top_k", top_k)?,
                top_p: top_p as f32,
                min_p: min_p as f32,
                repetition_penalty: repetition_penalty as f32,
                presence_penalty: presence_penalty as f32,
                frequency_penalty: frequency_penalty as f32,
                seed: seed.map(self::seed).transpose()?,
                stop_token_ids: stop_token_ids
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| token_id("stop_token_ids", t))
                    .collect::<PyResult<_>>()?,
                stop: stop_strings(stop)?,
                ignore_eos,
                logprobs: logprobs.map(|k| count("logprobs", k)).transpose()?,
                skip_special_tokens,
                structured: structured(structured_outputs)?,
            };
            Ok(SamplingParams {
                inner: validated(inner)?,
            })
        })
    }

    /// The grammar the output must match, as vLLM's `structured_outputs`: `{"json": schema}`,
    /// `{"regex": str}`, `{"choice": [str, ...]}`, `{"grammar": lark}` or `{"json_object": True}`;
    /// `None` leaves the output free.
    #[getter]
    fn structured_outputs<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        guard(|| {
            let Some(c) = &self.inner.structured else {
                return Ok(None);
            };
            let v = match c {
                core::StructuredOutput::JsonObject => serde_json::json!({"json_object": true}),
                other => serde_json::to_value(other).map_err(|e| invalid(e.to_string()))?,
            };
            let json = py.import("json")?;
            Ok(Some(json.call_method1("loads", (v.to_string(),))?))
        })
    }

    #[setter]
    fn set_structured_outputs(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        guard(|| {
            let mut p = self.inner.clone();
            p.structured = structured(value)?;
            self.inner = validated(p)?;
            Ok(())
        })
    }

    /// Strings that end the sequence; not included in the output text.
    #[getter]
    fn stop(&self) -> Vec<String> {
        self.inner.stop.clone()
    }

    #[setter]
    fn set_stop(&mut self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        guard(|| {
            let mut p = self.inner.clone();
            p.stop = stop_strings(value)?;
            self.inner = validated(p)?;
            Ok(())
        })
    }

    /// Greedy decoding (temperature 0); other fields as given.
    #[staticmethod]
    #[pyo3(signature = (**changes))]
    fn greedy(changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        guard(|| {
            let p = SamplingParams {
                inner: core::SamplingParams::greedy(),
            };
            p.with_changes(changes)
        })
    }

    /// A copy with some fields changed, validated.
    #[pyo3(signature = (**changes))]
    fn replace(&self, changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        guard(|| self.with_changes(changes))
    }

    /// The fields as a dict (the same keys as the constructor's arguments).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard(|| {
            let d = PyDict::new(py);
            let p = &self.inner;
            d.set_item("n", p.n)?;
            d.set_item("max_tokens", p.max_tokens)?;
            d.set_item("temperature", p.temperature as f64)?;
            d.set_item("top_k", p.top_k)?;
            d.set_item("top_p", p.top_p as f64)?;
            d.set_item("min_p", p.min_p as f64)?;
            d.set_item("repetition_penalty", p.repetition_penalty as f64)?;
            d.set_item("presence_penalty", p.presence_penalty as f64)?;
            d.set_item("frequency_penalty", p.frequency_penalty as f64)?;
            d.set_item("seed", p.seed)?;
            d.set_item("stop_token_ids", PyList::new(py, &p.stop_token_ids)?)?;
            d.set_item("stop", PyList::new(py, &p.stop)?)?;
            d.set_item("ignore_eos", p.ignore_eos)?;
            d.set_item("logprobs", p.logprobs)?;
            d.set_item("skip_special_tokens", p.skip_special_tokens)?;
            d.set_item("structured_outputs", self.structured_outputs(py)?)?;
            Ok(d)
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        guard(|| {
            let d = self.to_dict(py)?;
            let mut parts = Vec::new();
            for (k, v) in d.iter() {
                parts.push(format!("{}={}", k.str()?, v.repr()?));
            }
            Ok(format!("SamplingParams({})", parts.join(", ")))
        })
    }

    fn __copy__(&self) -> Self {
        self.clone()
    }

    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> Self {
        self.clone()
    }
    }
    n / set_n: i64 => |p, v| p.n = count("n", v)?, |p| p.n as i64;
    max_tokens / set_max_tokens: i64 => |p, v| p.max_tokens = count("max_tokens", v)?, |p| p.max_tokens as i64;
    temperature / set_temperature: f64 => |p, v| p.temperature = v as f32, |p| p.temperature as f64;
    top_k / set_top_k: i64 => |p, v| p.top_k = count("top_k", v)?, |p| p.top_k as i64;
    top_p / set_top_p: f64 => |p, v| p.top_p = v as f32, |p| p.top_p as f64;
    min_p / set_min_p: f64 => |p, v| p.min_p = v as f32, |p| p.min_p as f64;
    repetition_penalty / set_repetition_penalty: f64 => |p, v| p.repetition_penalty = v as f32, |p| p.repetition_penalty as f64;
    presence_penalty / set_presence_penalty: f64 => |p, v| p.presence_penalty = v as f32, |p| p.presence_penalty as f64;
    frequency_penalty / set_frequency_penalty: f64 => |p, v| p.frequency_penalty = v as f32, |p| p.frequency_penalty as f64;
    seed / set_seed: Option<i128> => |p, v| p.seed = v.map(seed).transpose()?, |p| p.seed.map(i128::from);
    stop_token_ids / set_stop_token_ids: Vec<i64> => |p, v| p.stop_token_ids = v.into_iter().map(|t| token_id("stop_token_ids", t)).collect::<PyResult<_>>()?, |p| p.stop_token_ids.iter().map(|&t| t as i64).collect();
    ignore_eos / set_ignore_eos: bool => |p, v| p.ignore_eos = v, |p| p.ignore_eos;
    logprobs / set_logprobs: Option<i64> => |p, v| p.logprobs = v.map(|k| count("logprobs", k)).transpose()?, |p| p.logprobs.map(|k| k as i64);
    skip_special_tokens / set_skip_special_tokens: bool => |p, v| p.skip_special_tokens = v, |p| p.skip_special_tokens;
}

impl SamplingParams {
    fn with_changes(&self, changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let Some(changes) = changes else {
            return Ok(self.clone());
        };
        let py = changes.py();
        let obj = Bound::new(py, self.clone())?;
        for (k, v) in changes.iter() {
            let name: String = k.extract()?;
            if !FIELDS.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "unknown sampling parameter {name:?} (known: {})",
                    FIELDS.join(", ")
                )));
            }
            obj.setattr(name.as_str(), v)?;
        }
        let out = obj.try_borrow()?.clone();
        Ok(out)
    }
}

/// The constructor's keyword arguments.
const FIELDS: [&str; 16] = [
    "n",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop_token_ids",
    "stop",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "structured_outputs",
];

/// The parameters of a call: none (defaults), one for every prompt, or one per prompt.
pub(crate) fn per_prompt(
    params: Option<&Bound<'_, PyAny>>,
    prompts: usize,
) -> PyResult<Vec<core::SamplingParams>> {
    let Some(obj) = params.filter(|p| !p.is_none()) else {
        return Ok(vec![core::SamplingParams::default(); prompts]);
    };
    if let Ok(p) = obj.cast::<SamplingParams>() {
        return Ok(vec![p.try_borrow()?.inner.clone(); prompts]);
    }
    if let Ok(list) = obj.extract::<Vec<Bound<'_, PyAny>>>() {
        if list.len() != prompts {
            return Err(invalid(format!(
                "{} sampling params for {prompts} prompts (give one, or one per prompt)",
                list.len()
            )));
        }
        return list
            .iter()
            .map(|p| {
                let p = p.cast::<SamplingParams>().map_err(|_| not_params(p))?;
                Ok(p.try_borrow()?.inner.clone())
            })
            .collect();
    }
    Err(not_params(obj))
}

fn not_params(obj: &Bound<'_, PyAny>) -> PyErr {
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    pyo3::exceptions::PyTypeError::new_err(format!(
        "params must be a SamplingParams, a list of them, or None; got {ty}"
    ))
}
