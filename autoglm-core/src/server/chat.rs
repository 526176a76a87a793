//! `POST /v1/chat/completions`: messages rendered through the model's chat template.

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
use super::logprobs::ChatLogprobs;
use super::models::lease_or_404;
use super::protocol::{check_logprobs, in_messages, parse_json, resolve_max_tokens, ChatRequest};
use super::state::Record;
use super::tools;
use crate::engine::RequestOutput;
use crate::tokenizer::Tokenizer;

pub(crate) async fn handle(rec: &mut Record, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let mut req: ChatRequest = parse_json(body)?;
    check_logprobs("top_logprobs", req.top_logprobs)?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    if req.top_logprobs.is_some_and(|k| k > 0) && !want_logprobs {
        return Err(ApiError::bad_param(
            "top_logprobs",
            "top_logprobs requires logprobs to be true.",
        ));
    }
    let Some(messages) = req.messages.take() else {
        return Err(ApiError::bad_param(
            "messages",
            "messages must be a non-empty list of message objects.",
        ));
    };
    if let Some(t) = req.tools.as_ref().filter(|t| !t.is_array() && !t.is_null()) {
        return Err(ApiError::bad_param(
            "tools",
            format!("tools must be a list, not {t}."),
        ));
    }
    let state = rec.state.clone();
    let lease = lease_or_404(&state.models, req.common.model.as_deref())?;
    rec.model = Some(lease.name.clone());
    rec.model_metrics = Some(lease.metrics.clone());
    let lp = want_logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let defaults = lease.engine.sampling_defaults();
    let mut params = req.common.params(lp, defaults)?;
    let (tool_plan, tool_grammar) = tools::plan(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        state.config.tool_call_parser,
        state.config.enable_auto_tool_choice,
    )?;
    if let Some(g) = tool_grammar {
        if params.structured.is_some() {
            return Err(ApiError::bad_param(
                "tool_choice",
                "tool_choice \"required\" or a named function cannot be combined with response_format or another structured-output field.",
            ));
        }
        params.structured = Some(g);
    }
    let choices = state.check_choices(1, params.n)?;
    let tok = lease
        .engine
        .tokenizer()
        .map_err(|_| {
            ApiError::bad_request(
                "This model has no tokenizer; use /v1/completions with token ids.",
            )
        })?
        .clone();
    let tools = req.tools.take().filter(|t| t.is_array());
    let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
    let engine = lease.engine.clone();
    // Template, tokenizer and the images' base64: on the preparation threads for a large body.
    let chat = state
        .prep
        .run_for(body.len(), move || {
            engine.render_chat(&messages, tools.as_ref(), add_generation_prompt, Vec::new())
        })
        .await?
        .map_err(|e| in_messages(e.into()))?;
    if rec.wants_prompt_text() {
        // The rendered prompt: image placeholders, never image bytes.
        rec.prompt_text = Some(truncate_prompt(&chat.text, MAX_PROMPT_BYTES));
    }
    let (ids, images) = if chat.images.is_empty() {
        (chat.prompt, Vec::new())
    } else {
        // Counted as in flight while its images are preprocessed, so a burst of screenshots
        // is bounded by the same cap as generations.
        rec.in_flight = Some(state.admit_generation(choices)?);
        lease
            .engine
            .expand_images_async(chat.prompt, chat.images)
            .await
            .map_err(|e| in_messages(e.into()))?
    };
    let (field, requested) = match req.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", req.common.max_tokens.or(defaults.max_tokens)),
    };
    params.max_tokens = resolve_max_tokens(
        field,
        requested,
        ids.len(),
        lease.engine.max_model_len(),
        "messages",
    )?;
    let cost = Cost::of(
        [(ids.len(), params.max_tokens)],
        params.n,
        field,
        "messages",
    );
    admit(rec, &lease, cost, choices)?;
    let return_ids = req.common.return_token_ids.unwrap_or(false);
    let prompt_ids = if return_ids { ids.clone() } else { Vec::new() };
    let mut job = submit(
        lease,
        rec.detach(),
        vec![(ids, images)],
        vec![params],
        req.common.cache_salt.as_deref(),
    )?;
    let id = format!("chatcmpl-{}", job.rec.id);
    let created = unix_now();
    let params_n = job.num_choices();
    let fmt = ChatFormat {
        plain: EventTemplate::new(
            &id,
            "chat.completion.chunk",
            created,
            &job.lease.name,
            b",\"delta\":{\"content\":",
            b"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        ),
        id,
        created,
        model: job.lease.name.clone(),
        logprobs: want_logprobs,
        tok,
        return_ids,
        tools: (tool_plan != tools::ToolPlan::None).then(|| ToolStream {
            plan: tool_plan.clone(),
            text: vec![String::new(); params_n],
            sent: vec![0; params_n],
            call_id: job.rec.id.to_string(),
        }),
    };
    if req.common.stream() {
        let events = sse_stream(job, fmt, req.common.include_usage()).await;
        return Ok(sse_response(events));
    }
    let n = job.num_choices();
    let mut text = vec![String::new(); n];
    let mut token_ids = vec![Vec::new(); n];
    let mut logprobs: Vec<Option<ChatLogprobs>> = vec![None; n];
    let mut finish = vec![None; n];
    while let Some(ev) = job.next().await {
        let (i, out) = match ev {
            Ok(x) => x,
            Err(e) => {
                job.rec.status = e.status.as_u16();
                return Err(e);
            }
        };
        text[i].push_str(&out.text);
        token_ids[i].extend_from_slice(&out.token_ids);
        if want_logprobs {
            logprobs[i]
                .get_or_insert_with(Default::default)
                .push(Some(&fmt.tok), &out.logprobs);
        }
        finish[i] = out.finish_reason.map(|f| f.as_str()).or(finish[i]);
    }
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let call_id = format!("{}_{i}", job.rec.id);
            let (content, calls) = match &tool_plan {
                tools::ToolPlan::Auto(parser, functions) => {
                    tools::parse_auto(*parser, functions, &text[i], &call_id)
                }
                plan => {
                    let calls = (finish[i] == Some("stop"))
                        .then(|| tools::tool_calls(plan, &text[i], &call_id))
                        .flatten();
                    match calls {
                        Some(c) => (None, Some(c)),
                        None => (Some(std::mem::take(&mut text[i])), None),
                    }
                }
            };
            let (message, finish_reason) = match calls {
                Some(calls) => (
                    json!({"role": "assistant", "content": content, "tool_calls": calls}),
                    Some("tool_calls"),
                ),
                None => (json!({"role": "assistant", "content": content}), finish[i]),
            };
            let mut v = json!({
                "index": i,
                "message": message,
                "logprobs": logprobs[i],
                "finish_reason": finish_reason,
            });
            if return_ids {
                v["token_ids"] = json!(token_ids[i]);
            }
            v
        })
        .collect();
    let mut body = json!({
        "id": fmt.id,
        "object": "chat.completion",
        "created": fmt.created,
        "model": fmt.model,
        "choices": choices,
        "usage": job.usage(),
    });
    if return_ids {
        body["prompt_token_ids"] = json!(prompt_ids);
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// Chat chunks: `{"object": "chat.completion.chunk", "choices": [{"index", "delta", "logprobs",
/// "finish_reason"}]}`, after one `{"role": "assistant"}` delta per choice.
struct ChatFormat {
    /// The common case, written without serde.
    plain: EventTemplate,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    tok: Tokenizer,
    return_ids: bool,
    /// A tool call being generated: its text is held back and sent as `tool_calls` at the end.
    tools: Option<ToolStream>,
}

struct ToolStream {
    plan: tools::ToolPlan,
    text: Vec<String>,
    /// Bytes of `text` already sent as content (`"auto"`).
    sent: Vec<usize>,
    call_id: String,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a Value>,
}

#[derive(Serialize)]
struct StreamChoice<'a> {
    index: usize,
    delta: Delta<'a>,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
}

impl ChatFormat {
    fn envelope<'a>(&'a self, choice: &'a StreamChoice<'a>) -> Chunk<'a, StreamChoice<'a>> {
        Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: std::slice::from_ref(choice),
            usage: None,
        }
    }
}

impl ChatFormat {
    /// A constrained tool call: nothing until the choice ends, then its `tool_calls` delta and
    /// the `tool_calls` finish (or, when it ran out of tokens, the text it got as content).
    fn tool_event(&mut self, index: usize, out: &RequestOutput, buf: &mut BytesMut) {
        if let Some(mut ts) = self.tools.take() {
            self.tool_event_in(&mut ts, index, out, buf);
            self.tools = Some(ts);
        }
    }

    fn tool_event_in(
        &self,
        ts: &mut ToolStream,
        index: usize,
        out: &RequestOutput,
        buf: &mut BytesMut,
    ) {
        let Some(text) = ts.text.get_mut(index) else {
            return;
        };
        text.push_str(&out.text);
        let finish = out.finish_reason.map(|f| f.as_str());
        let call_id = format!("{}_{index}", ts.call_id);
        let mut pending = "";
        let calls = match (&ts.plan, finish) {
            // "auto": text streams as content up to where a call may begin.
            (tools::ToolPlan::Auto(parser, functions), _) => {
                let hold = tools::auto_hold(*parser, functions, text);
                let sent = ts.sent[index];
                let (upto, calls) = match finish {
                    None => (hold, None),
                    Some(_) => match tools::parse_auto(*parser, functions, text, &call_id).1 {
                        Some(c) => (hold, Some(c)),
                        None => (text.len(), None),
                    },
                };
                if upto > sent {
                    let delta = StreamChoice {
                        index,
                        delta: Delta {
                            role: None,
                            content: Some(&text[sent..upto]),
                            tool_calls: None,
                        },
                        logprobs: None,
                        finish_reason: None,
                        token_ids: None,
                    };
                    ts.sent[index] = upto;
                    push_sse_event(buf, &self.envelope(&delta));
                }
                if finish.is_none() {
                    return;
                }
                calls
            }
            (_, None) => return,
            (plan, Some(f)) => {
                let c = (f == "stop")
                    .then(|| tools::tool_calls(plan, text, &call_id))
                    .flatten();
                if c.is_none() {
                    pending = text;
                }
                c
            }
        };
        let finish = finish.unwrap_or("stop");
        let text = pending;
        let calls = calls.map(|mut calls| {
            // Streamed calls carry their position in the list.
            if let Some(list) = calls.as_array_mut() {
                for (i, c) in list.iter_mut().enumerate() {
                    c["index"] = json!(i);
                }
            }
            calls
        });
        let (content, tool_calls, finish_reason) = match &calls {
            Some(c) => (None, Some(c), "tool_calls"),
            None => ((!text.is_empty()).then_some(text), None, finish),
        };
        let delta = StreamChoice {
            index,
            delta: Delta {
                role: None,
                content,
                tool_calls,
            },
            logprobs: None,
            finish_reason: None,
            token_ids: None,
        };
        if content.is_some() || tool_calls.is_some() {
            push_sse_event(buf, &self.envelope(&delta));
        }
        let end = StreamChoice {
            index,
            delta: Delta {
                role: None,
                content: None,
                tool_calls: None,
            },
            logprobs: None,
            finish_reason: Some(finish_reason),
            token_ids: None,
        };
        push_sse_event(buf, &self.envelope(&end));
    }
}

impl StreamFormat for ChatFormat {
    fn prelude(&mut self, num_choices: usize, buf: &mut BytesMut) {
        for index in 0..num_choices {
            push_sse_event(
                buf,
                &self.envelope(&StreamChoice {
                    index,
                    delta: Delta {
                        role: Some("assistant"),
                        content: Some(""),
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                    token_ids: None,
                }),
            );
        }
    }

    fn event(&mut self, index: usize, out: &RequestOutput, buf: &mut BytesMut) {
        if self.tools.is_some() {
            return self.tool_event(index, out, buf);
        }
        let finish_reason = out.finish_reason.map(|f| f.as_str());
        if finish_reason.is_none() && !self.logprobs && !self.return_ids {
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
        let logprobs = self.logprobs.then(|| {
            let mut lp = ChatLogprobs::default();
            lp.push(Some(&self.tok), &out.logprobs);
            lp
        });
        let choice = StreamChoice {
            index,
            delta: Delta {
                role: None,
                content: (!out.text.is_empty() || finish_reason.is_none()).then_some(&out.text[..]),
                tool_calls: None,
            },
            logprobs,
            finish_reason,
            token_ids: self.return_ids.then_some(&out.token_ids[..]),
        };
        push_sse_event(buf, &self.envelope(&choice));
    }

    fn event_size_hint(&self) -> usize {
        self.plain.size_hint()
    }

    fn usage(&mut self, usage: &UsageOut) -> Bytes {
        sse_event(&Chunk::<StreamChoice<'_>> {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(usage),
        })
    }
}
