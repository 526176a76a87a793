//! `POST /v1/completions`: text or token-id prompts (one or many), streamed or not.

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use super::audit::{truncate_prompt, MAX_PROMPT_BYTES};
use super::body::{json_response, push_sse_event, sse_event, sse_response, Body};
use super::error::ApiError;
use super::generate::{
    admit, sse_stream, submit, unix_now, Chunk, Cost, EventTemplate, StreamFormat, UsageOut,
};
use super::logprobs::CompletionLogprobs;
use super::models::lease_or_404;
use super::protocol::{
    check_logprobs, parse_json, prompts, resolve_max_tokens, tokenize_prompt, CompletionRequest,
    PromptField, PromptInput,
};
use super::state::Record;
use crate::engine::RequestOutput;
use crate::tokenizer::Tokenizer;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

pub(crate) async fn handle(rec: &mut Record, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let mut req: CompletionRequest = parse_json(body)?;
    if req.echo == Some(true) {
        return Err(ApiError::bad_param("echo", "echo is not supported."));
    }
    if req.suffix.is_some() {
        return Err(ApiError::bad_param("suffix", "suffix is not supported."));
    }
    check_logprobs("logprobs", req.logprobs)?;
    let state = rec.state.clone();
    let lease = lease_or_404(&state.models, req.common.model.as_deref())?;
    rec.model = Some(lease.name.clone());
    rec.model_metrics = Some(lease.metrics.clone());
    let defaults = lease.engine.sampling_defaults();
    let base = req.common.params(req.logprobs, defaults)?;
    let skip_special_tokens = base.skip_special_tokens;
    if rec.wants_prompt_text() {
        rec.prompt_text = match &req.prompt {
            Some(PromptField::Inputs(inputs)) => Some(match &inputs[..] {
                [PromptInput::Text(s)] => truncate_prompt(s, MAX_PROMPT_BYTES),
                _ => truncate_prompt(
                    &Value::from(inputs.iter().map(PromptInput::to_json).collect::<Vec<_>>())
                        .to_string(),
                    MAX_PROMPT_BYTES,
                ),
            }),
            _ => None,
        };
    }
    let tok = lease.engine.tokenizer().ok().cloned();
    let add_special = req.add_special_tokens.unwrap_or(true);
    let max_len = lease.engine.max_model_len();
    let requested = Some(
        req.common
            .max_tokens
            .or(defaults.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS),
    );
    let inputs = prompts(req.prompt.take())?;
    // Before any tokenizing: a small body must not be able to queue unbounded work.
    let choices = state.check_choices(inputs.len(), base.n)?;
    let prep_tok = tok.clone();
    let (ids, params) = state
        .prep
        .run_for(body.len(), move || {
            let mut ids = Vec::with_capacity(inputs.len());
            let mut params = Vec::with_capacity(inputs.len());
            for p in inputs {
                let p = tokenize_prompt(prep_tok.as_ref(), p, add_special)?;
                let mut sp = base.clone();
                sp.max_tokens =
                    resolve_max_tokens("max_tokens", requested, p.len(), max_len, "prompt")?;
                ids.push(p);
                params.push(sp);
            }
            Ok::<_, ApiError>((ids, params))
        })
        .await??;
    let cost = Cost::of(
        ids.iter()
            .zip(&params)
            .map(|(p, sp)| (p.len(), sp.max_tokens)),
        params.first().map_or(1, |sp| sp.n),
        "max_tokens",
        "prompt",
    );
    admit(rec, &lease, cost, choices)?;
    let return_ids = req.common.return_token_ids.unwrap_or(false);
    let prompt_ids = if return_ids { ids.clone() } else { Vec::new() };
    let mut job = submit(
        lease,
        rec.detach(),
        ids.into_iter().map(|p| (p, Vec::new())).collect(),
        params,
        req.common.cache_salt.as_deref(),
    )?;
    let id = format!("cmpl-{}", job.rec.id);
    let created = unix_now();
    let mut fmt = CompletionFormat {
        plain: EventTemplate::new(
            &id,
            "text_completion",
            created,
            &job.lease.name,
            b",\"text\":",
            b",\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        ),
        id,
        created,
        model: job.lease.name.clone(),
        logprobs: req.logprobs.is_some().then(|| tok.clone()),
        offsets: vec![0; job.num_choices()],
        skip_special_tokens,
        n: job.n,
        prompt_ids,
        prompt_sent: vec![!return_ids; job.num_choices()],
        return_ids,
    };
    if req.common.stream() {
        let events = sse_stream(job, fmt, req.common.include_usage()).await;
        return Ok(sse_response(events));
    }
    let mut choices: Vec<ChoiceAcc> = (0..job.num_choices())
        .map(|_| ChoiceAcc::default())
        .collect();
    while let Some(ev) = job.next().await {
        let (i, out) = match ev {
            Ok(x) => x,
            Err(e) => {
                job.rec.status = e.status.as_u16();
                return Err(e);
            }
        };
        let c = &mut choices[i];
        c.text.push_str(&out.text);
        c.token_ids.extend_from_slice(&out.token_ids);
        if let Some(tok) = &fmt.logprobs {
            c.logprobs.get_or_insert_with(Default::default).push(
                tok.as_ref(),
                &out.logprobs,
                &mut fmt.offsets[i],
                fmt.skip_special_tokens,
            );
        }
        c.finish = out.finish_reason.map(|f| f.as_str()).or(c.finish);
    }
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "index": i,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish,
            });
            if return_ids {
                v["token_ids"] = json!(c.token_ids);
                v["prompt_token_ids"] = json!(fmt.prompt_ids[i / fmt.n]);
            }
            v
        })
        .collect();
    let body = json!({
        "id": fmt.id,
        "object": "text_completion",
        "created": fmt.created,
        "model": fmt.model,
        "choices": choices,
        "usage": job.usage(),
    });
    Ok(json_response(StatusCode::OK, &body))
}

#[derive(Default)]
struct ChoiceAcc {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Option<CompletionLogprobs>,
    finish: Option<&'static str>,
}

/// Completion chunks: `{"object": "text_completion", "choices": [{"index", "text", "logprobs",
/// "finish_reason"}]}`.
struct CompletionFormat {
    /// The common case, written without serde.
    plain: EventTemplate,
    id: String,
    created: u64,
    model: String,
    /// `Some` when logprobs were asked for (with the tokenizer, if any).
    logprobs: Option<Option<Tokenizer>>,
    /// Text offset of each choice, for logprobs.
    offsets: Vec<usize>,
    /// Whether special tokens are left out of the text (and so of the offsets).
    skip_special_tokens: bool,
    n: usize,
    return_ids: bool,
    prompt_ids: Vec<Vec<u32>>,
    /// Whether each choice's first chunk (which carries the prompt ids) went out.
    prompt_sent: Vec<bool>,
}

#[derive(Serialize)]
struct StreamChoice<'a> {
    index: usize,
    text: &'a str,
    logprobs: Option<CompletionLogprobs>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<&'a [u32]>,
}

impl StreamFormat for CompletionFormat {
    fn prelude(&mut self, _num_choices: usize, _buf: &mut BytesMut) {}

    fn event(&mut self, index: usize, out: &RequestOutput, buf: &mut BytesMut) {
        let finish_reason = out.finish_reason.map(|f| f.as_str());
        if finish_reason.is_none() && self.logprobs.is_none() && !self.return_ids {
            if !out.text.is_empty() {
                self.plain.render(index, &out.text, buf);
            }
            return;
        }
        if out.text.is_empty()
            && finish_reason.is_none()
            && out.logprobs.is_empty()
            && !self.return_ids
        {
            return;
        }
        let logprobs = self.logprobs.as_ref().map(|tok| {
            let mut lp = CompletionLogprobs::default();
            lp.push(
                tok.as_ref(),
                &out.logprobs,
                &mut self.offsets[index],
                self.skip_special_tokens,
            );
            lp
        });
        let first = !std::mem::replace(&mut self.prompt_sent[index], true);
        let choice = StreamChoice {
            index,
            text: &out.text,
            logprobs,
            finish_reason,
            token_ids: self.return_ids.then_some(&out.token_ids[..]),
            prompt_token_ids: first.then(|| &self.prompt_ids[index / self.n][..]),
        };
        push_sse_event(
            buf,
            &Chunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: std::slice::from_ref(&choice),
                usage: None,
            },
        );
    }

    fn event_size_hint(&self) -> usize {
        self.plain.size_hint()
    }

    fn usage(&mut self, usage: &UsageOut) -> Bytes {
        sse_event(&Chunk::<StreamChoice<'_>> {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(usage),
        })
    }
}
