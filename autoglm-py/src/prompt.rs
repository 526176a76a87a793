//! Prompts as Python passes them: text, token ids, chat messages, or a list of those.
//!
//! Parsing happens while attached (it reads Python objects); tokenizing and rendering happen later,
//! detached, on plain Rust values.

use autoglm_core::tokenizer::Tokenizer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PySequence, PyString, PyTuple,
};
use serde_json::{Map, Number, Value as Json};

use crate::errors::invalid;

/// One prompt, before tokenization.
#[derive(Debug, Clone)]
pub(crate) enum Prompt {
    /// Text, encoded without added special tokens (as the CLI does).
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
    /// Chat messages (a JSON array), rendered through the model's chat template.
    Chat(Json),
}

/// A prompt after tokenization: what the engine gets, and what the result reports.
#[derive(Debug, Clone)]
pub(crate) struct Tokenized {
    /// The prompt text (the rendered template for chat); `None` for token ids.
    pub(crate) text: Option<String>,
    /// What the engine is given.
    pub(crate) ids: Vec<u32>,
}

const WHAT: &str = "a prompt is a str, a list of token ids, or a list of chat messages \
                    ({\"role\": ..., \"content\": ...} dicts); many prompts are a list of those";

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn is_list_like(obj: &Bound<'_, PyAny>) -> bool {
    obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()
}

/// Parses `prompts`; the flag says whether it was a single prompt (so the caller returns one
/// result rather than a list).
pub(crate) fn parse_many(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<Prompt>, bool)> {
    if is_list_like(obj) {
        let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
        let many = items
            .first()
            .is_some_and(|f| f.is_instance_of::<PyString>() || is_list_like(f));
        if many {
            let prompts = items.iter().map(parse_one).collect::<PyResult<_>>()?;
            return Ok((prompts, false));
        }
    }
    Ok((vec![parse_one(obj)?], true))
}

/// Parses exactly one prompt.
pub(crate) fn parse_one(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Prompt::Text(s.to_str()?.to_owned()));
    }
    if !is_list_like(obj) {
        return Err(PyTypeError::new_err(format!(
            "{WHAT}; got {}",
            type_name(obj)
        )));
    }
    let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
    match items.first() {
        None => Ok(Prompt::Ids(Vec::new())),
        Some(f) if f.is_instance_of::<PyInt>() => items
            .iter()
            .map(token_id)
            .collect::<PyResult<_>>()
            .map(Prompt::Ids),
        Some(f) if f.cast::<PyMapping>().is_ok() => {
            for m in &items {
                if m.cast::<PyMapping>().is_err() {
                    return Err(PyTypeError::new_err(format!(
                        "chat messages must all be dicts; got {}",
                        type_name(m)
                    )));
                }
            }
            Ok(Prompt::Chat(to_json(obj)?))
        }
        Some(f) => Err(PyTypeError::new_err(format!(
            "{WHAT}; got a list of {}",
            type_name(f)
        ))),
    }
}

fn token_id(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "token ids must be ints; got {}",
            type_name(obj)
        )));
    }
    let v: i128 = obj.extract()?;
    u32::try_from(v).map_err(|_| invalid(format!("prompt token id {v} is out of range")))
}

/// Converts JSON-like Python data (dict with str keys, list, tuple, str, int, float, bool, None).
pub(crate) fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<Json> {
    if obj.is_none() {
        return Ok(Json::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Json::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(v) = obj.extract::<i64>() {
            return Ok(Json::from(v));
        }
        let v: u64 = obj.extract()?;
        return Ok(Json::from(v));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        return Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| invalid(format!("{v} cannot be represented in JSON")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Json::String(s.to_str()?.to_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key = k.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "chat message keys must be str; got {}",
                    type_name(&k)
                ))
            })?;
            map.insert(key.to_str()?.to_owned(), to_json(&v)?);
        }
        return Ok(Json::Object(map));
    }
    if let Ok(m) = obj.cast::<PyMapping>() {
        return to_json(&PyDict::from_sequence(&m.items()?.into_any())?.into_any());
    }
    if is_list_like(obj) || obj.cast::<PySequence>().is_ok() {
        let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
        return items
            .iter()
            .map(to_json)
            .collect::<PyResult<_>>()
            .map(Json::Array);
    }
    Err(PyTypeError::new_err(format!(
        "cannot pass a value of type {} to the chat template (use dict, list, str, int, float, \
         bool or None)",
        type_name(obj)
    )))
}

/// Tokenizes one prompt (run detached).
pub(crate) fn tokenize(tok: Option<&Tokenizer>, prompt: Prompt) -> autoglm_core::Result<Tokenized> {
    let need = || {
        tok.ok_or_else(|| {
            autoglm_core::Error::Tokenizer("this engine was built without a tokenizer".into())
        })
    };
    Ok(match prompt {
        Prompt::Ids(ids) => Tokenized { text: None, ids },
        Prompt::Text(text) => Tokenized {
            ids: need()?.encode(&text, false)?,
            text: Some(text),
        },
        Prompt::Chat(messages) => {
            let t = need()?;
            let text = t.apply_chat_template(&messages, None, true)?;
            Tokenized {
                ids: t.encode(&text, false)?,
                text: Some(text),
            }
        }
    })
}
