//! `Tokenizer`: the model's tokenizer and chat template.

use autoglm_core::tokenizer::Tokenizer as CoreTokenizer;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::{guard, invalid, request_err};
use crate::prompt::to_json;

/// The model's tokenizer (Hugging Face `tokenizer.json`) and chat template.
///
/// Encoding, decoding and rendering run with the GIL released.
#[pyclass(module = "autoglm", frozen)]
pub(crate) struct Tokenizer {
    pub(crate) inner: CoreTokenizer,
}

/// Renders `messages` (and `tools`) through the chat template, detached.
pub(crate) fn render(
    py: Python<'_>,
    tok: &CoreTokenizer,
    messages: &Bound<'_, PyAny>,
    tools: Option<&Bound<'_, PyAny>>,
    add_generation_prompt: bool,
) -> PyResult<String> {
    let messages = to_json(messages)?;
    let tools = tools.filter(|t| !t.is_none()).map(to_json).transpose()?;
    py.detach(|| tok.apply_chat_template(&messages, tools.as_ref(), add_generation_prompt))
        .map_err(request_err)
}

#[pymethods]
impl Tokenizer {
    /// Token ids of `text`; `add_special_tokens` lets the tokenizer's post-processor add its
    /// tokens (the engine encodes text prompts without them).
    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        guard(|| {
            py.detach(|| self.inner.encode(text, add_special_tokens))
                .map_err(request_err)
        })
    }

    /// The text of `token_ids`; `skip_special_tokens` leaves out tokens such as `<|user|>`
    /// (off by default, as in `transformers`).
    #[pyo3(signature = (token_ids, skip_special_tokens = false))]
    fn decode(
        &self,
        py: Python<'_>,
        token_ids: Vec<i64>,
        skip_special_tokens: bool,
    ) -> PyResult<String> {
        guard(|| {
            let ids = token_ids
                .iter()
                .map(|&t| {
                    u32::try_from(t).map_err(|_| invalid(format!("token id {t} is out of range")))
                })
                .collect::<PyResult<Vec<u32>>>()?;
            py.detach(|| self.inner.decode(&ids, skip_special_tokens))
                .map_err(request_err)
        })
    }

    /// Renders chat messages (`{"role": ..., "content": ...}` dicts) with the model's template,
    /// as `transformers`' `apply_chat_template(..., tokenize=False)` does.
    #[pyo3(signature = (messages, tools = None, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        tools: Option<&Bound<'_, PyAny>>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        guard(|| render(py, &self.inner, messages, tools, add_generation_prompt))
    }

    /// The id of a token string, or `None` if it is not in the vocabulary.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, or `None` if the id is not in the vocabulary.
    fn id_to_token(&self, token_id: i64) -> Option<String> {
        u32::try_from(token_id)
            .ok()
            .and_then(|id| self.inner.id_to_token(id))
    }

    /// Vocabulary size, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// The ids that end generation.
    #[getter]
    fn eos_token_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.inner.eos_token_ids())
    }

    /// Whether the model ships a chat template.
    #[getter]
    fn has_chat_template(&self) -> bool {
        self.inner.has_chat_template()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, eos_token_ids={:?})",
            self.inner.vocab_size(),
            self.inner.eos_token_ids()
        )
    }
}
