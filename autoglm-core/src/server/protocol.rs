//! Request bodies of the OpenAI API (plus vLLM's sampling extensions) and their translation into
//! prompt token ids and [`SamplingParams`].
//!
//! Unknown fields are ignored, as OpenAI-compatible servers do; a known field of the wrong type is a
//! 400 naming it. `stop` and `prompt` accept every shape OpenAI does and are checked by hand so the
//! error says what was expected.

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::error::ApiError;
use crate::sampling::{SamplingDefaults, SamplingParams, StructuredOutput, MAX_LOGPROBS};
use crate::tokenizer::Tokenizer;

/// Parses a JSON body, with distinct errors for bad UTF-8, bad JSON and wrong types.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "The request body is not valid UTF-8 (invalid byte at offset {}).",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "The request body is empty; a JSON object is expected.",
        ));
    }
    let not_json = |e: serde_json::Error| {
        ApiError::bad_request(format!("The request body is not valid JSON: {e}."))
    };
    // A struct would also deserialize from a JSON array; only an object is a request.
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return Err(
            match serde_json::from_str::<serde::de::IgnoredAny>(trimmed) {
                Err(e) => not_json(e),
                Ok(_) => ApiError::bad_request("The request body must be a JSON object."),
            },
        );
    }
    // One pass straight into the request type; syntax errors and type errors told apart.
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request(format!("Invalid request: {e}."))
        }
        _ => not_json(e),
    })
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: Option<bool>,
}

/// Fields shared by chat and completions.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Common {
    pub(crate) model: Option<String>,
    pub(crate) n: Option<usize>,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f32>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) repetition_penalty: Option<f32>,
    pub(crate) seed: Option<u64>,
    pub(crate) stop: Option<Value>,
    pub(crate) stop_token_ids: Option<Vec<u32>>,
    pub(crate) ignore_eos: Option<bool>,
    pub(crate) skip_special_tokens: Option<bool>,
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    /// vLLM extension: return prompt and generated token ids.
    pub(crate) return_token_ids: Option<bool>,
    pub(crate) best_of: Option<usize>,
    pub(crate) logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's prefix-cache isolation: only requests with the same salt (within the server's
    /// `prefix_cache_scope`) reuse each other's cached prompt blocks.
    pub(crate) cache_salt: Option<String>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    pub(crate) response_format: Option<Value>,
    /// vLLM's structured-output fields: `structured_outputs` and the older `guided_*`.
    pub(crate) structured_outputs: Option<Value>,
    pub(crate) guided_json: Option<Value>,
    pub(crate) guided_regex: Option<Value>,
    pub(crate) guided_choice: Option<Value>,
    pub(crate) guided_grammar: Option<Value>,
    /// vLLM fields not built yet: a 400 naming them, never silently ignored.
    pub(crate) min_tokens: Option<Value>,
    pub(crate) include_stop_str_in_output: Option<Value>,
    pub(crate) prompt_logprobs: Option<Value>,
    pub(crate) chat_template_kwargs: Option<Value>,
    pub(crate) continue_final_message: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    #[serde(flatten)]
    pub(crate) common: Common,
    pub(crate) prompt: Option<PromptField>,
    pub(crate) logprobs: Option<usize>,
    pub(crate) echo: Option<bool>,
    pub(crate) suffix: Option<String>,
    pub(crate) add_special_tokens: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(flatten)]
    pub(crate) common: Common,
    pub(crate) messages: Option<Value>,
    pub(crate) max_completion_tokens: Option<usize>,
    pub(crate) logprobs: Option<bool>,
    pub(crate) top_logprobs: Option<usize>,
    pub(crate) tools: Option<Value>,
    pub(crate) tool_choice: Option<Value>,
    pub(crate) add_generation_prompt: Option<bool>,
}

impl Common {
    pub(crate) fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// Sampling parameters, except `max_tokens` (resolved against the context by
    /// [`resolve_max_tokens`]).
    /// Fields the request leaves unset take the model's `defaults` (its `generation_config.json`),
    /// then the engine's own.
    pub(crate) fn params(
        &self,
        logprobs: Option<usize>,
        defaults: &SamplingDefaults,
    ) -> Result<SamplingParams, ApiError> {
        if let Some(salt) = &self.cache_salt {
            let max = crate::engine::MAX_CACHE_SALT_BYTES;
            if salt.is_empty() || salt.len() > max {
                return Err(ApiError::bad_param(
                    "cache_salt",
                    format!(
                        "cache_salt must be a non-empty string of at most {max} bytes (got {})",
                        salt.len()
                    ),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad_param(
                "logit_bias",
                "logit_bias is not supported.",
            ));
        }
        let n = self.n.unwrap_or(1);
        if let Some(b) = self.best_of {
            if b != n {
                return Err(ApiError::bad_param(
                    "best_of",
                    "best_of other than n is not supported.",
                ));
            }
        }
        let top_k = match self.top_k {
            None => defaults.top_k.unwrap_or(0),
            Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::bad_param(
                    "top_k",
                    format!("top_k must be -1 (disabled) or at least 1, got {k}."),
                ))
            }
        };
        self.refuse_unbuilt()?;
        let structured = self.structured_output()?;
        let d = defaults.params();
        let p = SamplingParams {
            n,
            max_tokens: 1,
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k,
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            stop: stop_list(self.stop.as_ref())?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            structured,
        };
        p.validate().map_err(|e| {
            let msg = e.to_string();
            let field = msg
                .trim_start_matches("invalid request: ")
                .split(' ')
                .next()
                .unwrap_or("")
                .to_string();
            ApiError::bad_param(
                &field,
                msg.trim_start_matches("invalid request: ").to_string(),
            )
        })?;
        Ok(p)
    }
}

impl Common {
    /// Fields vLLM has and this server does not yet: refused by name when they would change
    /// anything (their neutral values pass).
    fn refuse_unbuilt(&self) -> Result<(), ApiError> {
        let neutral = |v: &Option<Value>, ok: &[Value]| match v {
            None | Some(Value::Null) => true,
            Some(v) => ok.contains(v),
        };
        let zero = [Value::from(0)];
        let falsy = [Value::Bool(false)];
        let empty = [Value::Object(Default::default())];
        for (field, ok) in [
            ("min_tokens", neutral(&self.min_tokens, &zero)),
            (
                "include_stop_str_in_output",
                neutral(&self.include_stop_str_in_output, &falsy),
            ),
            ("prompt_logprobs", neutral(&self.prompt_logprobs, &[])),
            (
                "chat_template_kwargs",
                neutral(&self.chat_template_kwargs, &empty),
            ),
            (
                "continue_final_message",
                neutral(&self.continue_final_message, &falsy),
            ),
        ] {
            if !ok {
                return Err(ApiError::bad_param(
                    field,
                    format!("{field} is not supported yet."),
                ));
            }
        }
        Ok(())
    }

    /// The structured-output constraint, from whichever one of `response_format`,
    /// `structured_outputs` and `guided_*` the request set.
    fn structured_output(&self) -> Result<Option<StructuredOutput>, ApiError> {
        let mut found: Vec<(&'static str, StructuredOutput)> = Vec::new();
        if let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) {
            if let Some(c) = response_format(rf)? {
                found.push(("response_format", c));
            }
        }
        let guided = [
            ("guided_json", "json", &self.guided_json),
            ("guided_regex", "regex", &self.guided_regex),
            ("guided_choice", "choice", &self.guided_choice),
            ("guided_grammar", "grammar", &self.guided_grammar),
        ];
        for (field, kind, v) in guided {
            if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
                found.push((field, constraint(field, kind, v)?));
            }
        }
        if let Some(so) = self.structured_outputs.as_ref().filter(|v| !v.is_null()) {
            let c = StructuredOutput::from_vllm(so)
                .map_err(|m| ApiError::bad_param("structured_outputs", format!("{m}.")))?;
            found.extend(c.map(|c| ("structured_outputs", c)));
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|f| f.1)),
            _ => Err(ApiError::bad_param(
                found[1].0,
                format!(
                    "only one structured-output constraint may be given; got {}.",
                    found.iter().map(|f| f.0).collect::<Vec<_>>().join(" and ")
                ),
            )),
        }
    }
}

/// OpenAI's `response_format`.
fn response_format(rf: &Value) -> Result<Option<StructuredOutput>, ApiError> {
    let bad = |m: String| ApiError::bad_param("response_format", m);
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(StructuredOutput::JsonObject)),
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| {
                    bad(
                        "response_format.json_schema.schema is required for type json_schema."
                            .into(),
                    )
                })?;
            constraint("response_format", "json", schema).map(Some)
        }
        _ => Err(bad(format!(
            "response_format.type must be text, json_object or json_schema, got {}.",
            rf.get("type").unwrap_or(&Value::Null)
        ))),
    }
}

/// One constraint of kind `kind`, a 400 naming `field` when it is malformed.
fn constraint(field: &str, kind: &str, v: &Value) -> Result<StructuredOutput, ApiError> {
    StructuredOutput::from_field(kind, v)
        .map_err(|m| ApiError::bad_param(field, format!("{field}: {m}.")))
}

fn stop_list(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    use crate::sampling::{MAX_STOP_BYTES, MAX_STOP_STRINGS};
    let bad = || ApiError::bad_param("stop", "stop must be a string or a list of strings.");
    let stops: Vec<String> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() > MAX_STOP_STRINGS => {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "stop may hold at most {MAX_STOP_STRINGS} strings, got {}.",
                    items.len()
                ),
            ))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(String::from).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if let Some(s) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_param(
            "stop",
            format!(
                "each stop string may be at most {MAX_STOP_BYTES} bytes, got one of {}.",
                s.len()
            ),
        ));
    }
    Ok(stops)
}

/// Checks `logprobs` (0..=20).
pub(crate) fn check_logprobs(field: &str, n: Option<usize>) -> Result<(), ApiError> {
    match n {
        Some(k) if k > MAX_LOGPROBS => Err(ApiError::bad_param(
            field,
            format!("{field} must be at most {MAX_LOGPROBS}, got {k}."),
        )),
        _ => Ok(()),
    }
}

/// The output budget of a request: `requested` (at least 1), or what the context leaves; a 400 in
/// vLLM's words when prompt plus output does not fit.
pub(crate) fn resolve_max_tokens(
    field: &str,
    requested: Option<usize>,
    prompt_len: usize,
    max_model_len: usize,
    what: &str,
) -> Result<usize, ApiError> {
    if requested == Some(0) {
        return Err(ApiError::bad_param(
            field,
            format!("{field} must be at least 1, got 0."),
        ));
    }
    match requested {
        // Saturating: a max_tokens near 2^64 is too long, not a wrap-around.
        Some(m) if prompt_len.saturating_add(m) > max_model_len => Err(ApiError::bad_param(
            what,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                prompt_len.saturating_add(m)
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
        None if prompt_len >= max_model_len => Err(ApiError::bad_param(
            what,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your messages resulted in {prompt_len} tokens. Please reduce the length of the messages."
            ),
        )
        .with_code("context_length_exceeded")),
        None => Ok(max_model_len - prompt_len),
    }
}

/// One prompt of a completion request, before tokenization.
#[derive(Debug)]
pub(crate) enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptInput {
    /// As the client sent it (for the audit log).
    pub(crate) fn to_json(&self) -> Value {
        match self {
            PromptInput::Text(s) => Value::from(s.as_str()),
            PromptInput::Ids(ids) => Value::from(ids.as_slice()),
        }
    }
}

/// `prompt` as sent, parsed straight into strings and token ids: a token array costs 4 bytes a
/// token here, where a `serde_json::Value` cost 30-odd (an 8 MB array of ids peaked at 36x its
/// size). Any other shape is `Invalid`, its rest skipped, so that [`prompts`] can name the field.
#[derive(Debug)]
pub(crate) enum PromptField {
    Inputs(Vec<PromptInput>),
    Empty,
    Invalid,
}

/// One element of a `prompt` list.
enum PromptItem {
    Id(u32),
    Text(String),
    Ids(Vec<u32>),
    Other,
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Visits one JSON value as a `prompt` shape; `Other` for every shape not listed.
macro_rules! other_shapes {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            skip_map(map)?;
            Ok($other)
        }
    };
}

/// A token id, or `None` for anything else.
struct TokenId(Option<u32>);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TokenId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token id")
            }
            fn visit_u64<E: de::Error>(self, t: u64) -> Result<TokenId, E> {
                Ok(TokenId(u32::try_from(t).ok()))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<TokenId, E> {
                Ok(TokenId(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<TokenId, A::Error> {
                skip_seq(seq)?;
                Ok(TokenId(None))
            }
            other_shapes!(TokenId(None));
        }
        d.deserialize_any(V)
    }
}

/// Token ids until the end of the list, or `None` (the rest skipped) at the first non-id.
fn token_ids<'de, A: SeqAccess<'de>>(
    mut seq: A,
    mut ids: Vec<u32>,
) -> Result<Option<Vec<u32>>, A::Error> {
    while let Some(TokenId(t)) = seq.next_element()? {
        match t {
            Some(t) => ids.push(t),
            None => {
                skip_seq(seq)?;
                return Ok(None);
            }
        }
    }
    Ok(Some(ids))
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, a token id or a list of token ids")
            }
            fn visit_u64<E: de::Error>(self, t: u64) -> Result<PromptItem, E> {
                Ok(u32::try_from(t).map_or(PromptItem::Other, PromptItem::Id))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(s.to_owned()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptItem, A::Error> {
                Ok(token_ids(seq, Vec::new())?.map_or(PromptItem::Other, PromptItem::Ids))
            }
            other_shapes!(PromptItem::Other);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PromptField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a prompt")
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PromptField, E> {
                Ok(PromptField::Invalid)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PromptField, E> {
                Ok(PromptField::Inputs(vec![PromptInput::Text(s.to_owned())]))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<PromptField, E> {
                Ok(PromptField::Inputs(vec![PromptInput::Text(s)]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptField, A::Error> {
                let inputs = match seq.next_element::<PromptItem>()? {
                    None => return Ok(PromptField::Empty),
                    Some(PromptItem::Id(t)) => match token_ids(seq, vec![t])? {
                        Some(ids) => vec![PromptInput::Ids(ids)],
                        None => return Ok(PromptField::Invalid),
                    },
                    Some(PromptItem::Other) => {
                        skip_seq(seq)?;
                        return Ok(PromptField::Invalid);
                    }
                    // A list of strings or a list of token-id lists: every item like the first.
                    Some(first) => {
                        let texts = matches!(first, PromptItem::Text(_));
                        let mut out = Vec::new();
                        let mut item = Some(first);
                        while let Some(it) = item {
                            match it {
                                PromptItem::Text(s) if texts => out.push(PromptInput::Text(s)),
                                PromptItem::Ids(ids) if !texts => out.push(PromptInput::Ids(ids)),
                                _ => {
                                    skip_seq(seq)?;
                                    return Ok(PromptField::Invalid);
                                }
                            }
                            item = seq.next_element()?;
                        }
                        out
                    }
                };
                Ok(PromptField::Inputs(inputs))
            }
            other_shapes!(PromptField::Invalid);
        }
        d.deserialize_any(V)
    }
}

/// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
pub(crate) fn prompts(v: Option<PromptField>) -> Result<Vec<PromptInput>, ApiError> {
    match v {
        None => Err(ApiError::bad_param("prompt", "prompt is required.")),
        Some(PromptField::Empty) => Err(ApiError::bad_param("prompt", "prompt must not be empty.")),
        Some(PromptField::Invalid) => Err(ApiError::bad_param(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids.",
        )),
        Some(PromptField::Inputs(inputs)) => Ok(inputs),
    }
}

/// A 400 about the chat messages names `messages` as its parameter.
pub(crate) fn in_messages(e: ApiError) -> ApiError {
    if e.status == http::StatusCode::BAD_REQUEST && e.param.is_none() {
        e.with_param("messages")
    } else {
        e
    }
}

/// Token ids of a completion prompt.
pub(crate) fn tokenize_prompt(
    tok: Option<&Tokenizer>,
    p: PromptInput,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    match p {
        PromptInput::Ids(ids) => Ok(ids),
        PromptInput::Text(t) => {
            let tok = tok.ok_or_else(|| {
                ApiError::bad_param("prompt", "This model has no tokenizer; send token ids.")
            })?;
            Ok(tok.encode(&t, add_special_tokens)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(json: &str) -> String {
        #[derive(Deserialize)]
        struct B {
            prompt: Option<PromptField>,
        }
        let b: B = serde_json::from_str(json).expect("valid JSON");
        match prompts(b.prompt) {
            Ok(inputs) => inputs
                .iter()
                .map(|i| i.to_json().to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            Err(e) => format!("error: {}", e.message),
        }
    }

    #[test]
    fn prompts_of_every_shape_parse_and_the_rest_are_named() {
        assert_eq!(shape(r#"{"prompt": "hi"}"#), r#""hi""#);
        assert_eq!(shape(r#"{"prompt": ["a", "b"]}"#), r#""a" | "b""#);
        assert_eq!(shape(r#"{"prompt": [1, 2, 3]}"#), "[1,2,3]");
        assert_eq!(shape(r#"{"prompt": [[1], [2, 3]]}"#), "[1] | [2,3]");
        assert_eq!(shape(r#"{"prompt": [[]]}"#), "[]");
        assert!(shape(r#"{"prompt": []}"#).contains("must not be empty"));
        assert!(shape(r#"{}"#).contains("is required"));
        assert!(shape(r#"{"prompt": null}"#).contains("is required"));
        for bad in [
            r#"{"prompt": 5}"#,
            r#"{"prompt": true}"#,
            r#"{"prompt": {"a": [1]}}"#,
            r#"{"prompt": [1, "x"]}"#,
            r#"{"prompt": ["x", 1]}"#,
            r#"{"prompt": [[1], "x"]}"#,
            r#"{"prompt": ["x", [1]]}"#,
            r#"{"prompt": [1, -2]}"#,
            r#"{"prompt": [1.5]}"#,
            r#"{"prompt": [4294967296]}"#,
            r#"{"prompt": [[1, [2]]]}"#,
            r#"{"prompt": [{"a": 1}, 2]}"#,
        ] {
            assert!(
                shape(bad).contains("prompt must be"),
                "{bad}: {}",
                shape(bad)
            );
        }
        // What follows an invalid prompt is still read.
        #[derive(Deserialize)]
        struct B {
            prompt: Option<PromptField>,
            n: usize,
        }
        let b: B =
            serde_json::from_str(r#"{"prompt": [1, [2, {"x": [3]}], "y"], "n": 4}"#).unwrap();
        assert!(matches!(b.prompt, Some(PromptField::Invalid)));
        assert_eq!(b.n, 4);
    }
}
