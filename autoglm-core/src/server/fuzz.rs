//! Entry points for the fuzz targets in `fuzz/`: each runs one route's work on a request body up
//! to the point where the request would be admitted to the engine (parse, validate, render the
//! chat template, tokenize, expand images, size the context and the cost), and never generates.
//! Not a stable API; the handlers in `chat.rs`, `completions.rs` and `tokenize.rs` are the real
//! thing and these follow the same steps in the same order.
//!
//! Every function returns `Ok` with the prompt's length or `Err` with the client error's JSON
//! (the body the server would send), so a target can also check what a client would read.

use serde_json::Value;

use super::error::ApiError;
use super::generate::Cost;
use super::protocol::{
    check_logprobs, in_messages, parse_json, prompts, resolve_max_tokens, tokenize_prompt,
    ChatRequest, CompletionRequest,
};
use super::tokenize::TokenizeRequest;
use crate::Engine;

/// Outcome of one fuzzed body: the prompt length, or the error body a client would get.
pub type Outcome = Result<usize, String>;

fn client_error(e: ApiError) -> String {
    // The same serialization the server answers with.
    serde_json::to_string(&e.envelope()).unwrap_or_default()
}

/// `POST /v1/chat/completions` up to admission.
pub fn chat_completion(engine: &Engine, body: &[u8]) -> Outcome {
    let run = || -> Result<usize, ApiError> {
        let mut req: ChatRequest = parse_json(body)?;
        check_logprobs("top_logprobs", req.top_logprobs)?;
        let lp = req
            .logprobs
            .unwrap_or(false)
            .then(|| req.top_logprobs.unwrap_or(0));
        let mut params = req.common.params(lp, engine.sampling_defaults())?;
        let messages = req
            .messages
            .take()
            .ok_or_else(|| ApiError::bad_param("messages", "messages is required"))?;
        let tools = req.tools.take().filter(Value::is_array);
        let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
        let chat = engine
            .render_chat(&messages, tools.as_ref(), add_generation_prompt, Vec::new())
            .map_err(|e| in_messages(e.into()))?;
        let (ids, _) = engine
            .expand_images(&chat.prompt, &chat.images)
            .map_err(|e| in_messages(e.into()))?;
        let (field, requested) = match req.max_completion_tokens {
            Some(m) => ("max_completion_tokens", Some(m)),
            None => ("max_tokens", req.common.max_tokens),
        };
        params.max_tokens = resolve_max_tokens(
            field,
            requested,
            ids.len(),
            engine.max_model_len(),
            "messages",
        )?;
        Cost::of(
            [(ids.len(), params.max_tokens)],
            params.n,
            field,
            "messages",
        );
        Ok(ids.len())
    };
    run().map_err(client_error)
}

/// `POST /v1/completions` up to admission.
pub fn completion(engine: &Engine, body: &[u8]) -> Outcome {
    let run = || -> Result<usize, ApiError> {
        let mut req: CompletionRequest = parse_json(body)?;
        check_logprobs("logprobs", req.logprobs)?;
        let base = req
            .common
            .params(req.logprobs, engine.sampling_defaults())?;
        let tok = engine.tokenizer().ok();
        let add_special = req.add_special_tokens.unwrap_or(true);
        let requested = Some(req.common.max_tokens.unwrap_or(16));
        let mut lens = Vec::new();
        for p in prompts(req.prompt.take())? {
            let p = tokenize_prompt(tok, p, add_special)?;
            let max = resolve_max_tokens(
                "max_tokens",
                requested,
                p.len(),
                engine.max_model_len(),
                "prompt",
            )?;
            lens.push((p.len(), max));
        }
        Cost::of(lens.iter().copied(), base.n, "max_tokens", "prompt");
        Ok(lens.iter().map(|l| l.0).sum())
    };
    run().map_err(client_error)
}

/// `POST /tokenize` (a prompt or chat messages), and `POST /detokenize` of the result.
pub fn tokenize(engine: &Engine, body: &[u8]) -> Outcome {
    let run = || -> Result<usize, ApiError> {
        let mut req: TokenizeRequest = parse_json(body)?;
        let tok = engine
            .tokenizer()
            .map_err(|_| ApiError::bad_request("no tokenizer"))?;
        let add_special = req.add_special_tokens;
        let ids = match (req.prompt.take(), req.messages.take()) {
            (Some(p), None) => tok.encode(&p, add_special.unwrap_or(true))?,
            (None, Some(messages)) => {
                let tools = req.tools.take().filter(Value::is_array);
                let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
                let chat = engine
                    .render_chat(&messages, tools.as_ref(), add_generation_prompt, Vec::new())
                    .map_err(|e| in_messages(e.into()))?;
                let ids = if add_special.unwrap_or(false) {
                    tok.encode(&chat.text, true)?
                } else {
                    chat.prompt
                };
                engine
                    .expand_images(&ids, &chat.images)
                    .map_err(|e| in_messages(e.into()))?
                    .0
            }
            _ => return Err(ApiError::bad_request("one of prompt and messages")),
        };
        for &t in &ids {
            tok.id_to_token(t);
        }
        tok.decode(&ids, false)?;
        Ok(ids.len())
    };
    run().map_err(client_error)
}
