//! vLLM's `POST /tokenize` and `POST /detokenize`.

use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::body::{json_response, Body};
use super::error::ApiError;
use super::models::{lease_or_404, ModelRegistry};
use super::prep::PrepPool;
use super::protocol::{in_messages, parse_json};

#[derive(Deserialize)]
pub(super) struct TokenizeRequest {
    model: Option<String>,
    pub(super) prompt: Option<String>,
    pub(super) messages: Option<Value>,
    pub(super) add_special_tokens: Option<bool>,
    pub(super) add_generation_prompt: Option<bool>,
    pub(super) tools: Option<Value>,
    return_token_strs: Option<bool>,
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// `{"prompt": ...}` or `{"messages": [...]}` to `{"count", "max_model_len", "tokens", "token_strs"}`.
/// Chat messages may carry images: their placeholders are expanded to the tokens the model sees.
pub(crate) async fn tokenize(
    models: &ModelRegistry,
    prep: &PrepPool,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let mut req: TokenizeRequest = parse_json(body)?;
    let lease = lease_or_404(models, req.model.as_deref())?;
    let tok = lease
        .engine
        .tokenizer()
        .map_err(|_| ApiError::bad_request("This model has no tokenizer."))?;
    let add_special = req.add_special_tokens;
    let tokens = match (req.prompt.take(), req.messages.take()) {
        (Some(p), None) => {
            let tok = tok.clone();
            prep.run_for(body.len(), move || {
                tok.encode(&p, add_special.unwrap_or(true))
            })
            .await??
        }
        (None, Some(messages)) => {
            let tools = req.tools.take().filter(|t| t.is_array());
            let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
            let (engine, tok) = (lease.engine.clone(), tok.clone());
            let (chat, ids) = prep
                .run_for(body.len(), move || {
                    let chat = engine
                        .render_chat(&messages, tools.as_ref(), add_generation_prompt, Vec::new())
                        .map_err(|e| in_messages(e.into()))?;
                    let ids = if add_special.unwrap_or(false) {
                        tok.encode(&chat.text, true)?
                    } else {
                        chat.prompt.clone()
                    };
                    Ok::<_, ApiError>((chat, ids))
                })
                .await??;
            if chat.images.is_empty() {
                ids
            } else {
                lease
                    .engine
                    .expand_images_async(ids, chat.images)
                    .await
                    .map_err(|e| in_messages(e.into()))?
                    .0
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "Give exactly one of `prompt` (a string) and `messages`.",
            ))
        }
    };
    let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&t| tok.id_to_token(t).unwrap_or_default())
            .collect::<Vec<_>>()
    });
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "count": tokens.len(),
            "max_model_len": lease.engine.max_model_len(),
            "tokens": tokens,
            "token_strs": token_strs,
        }),
    ))
}

/// `{"tokens": [...]}` to `{"prompt": text}`.
pub(crate) fn detokenize(models: &ModelRegistry, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let req: DetokenizeRequest = parse_json(body)?;
    let lease = lease_or_404(models, req.model.as_deref())?;
    let tok = lease
        .engine
        .tokenizer()
        .map_err(|_| ApiError::bad_request("This model has no tokenizer."))?;
    let vocab = lease.engine.model_config().vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("Token id {bad} is outside the vocabulary (size {vocab})."),
        ));
    }
    let text = tok.decode(&req.tokens, false)?;
    Ok(json_response(StatusCode::OK, &json!({"prompt": text})))
}
