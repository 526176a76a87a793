//! Running an admitted generation: submitting its prompts, reading their events (with latency
//! metrics and the request deadline), and turning them into one JSON answer or an SSE stream.
//!
//! The streamed path allocates one buffer per event and nothing else of its own: the stream state
//! (engine stream, deadline timer, formatter) lives in one boxed `unfold` for the whole request,
//! and each event is serialized once into an exact-size buffer handed to hyper as `Bytes`.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::body::{push_sse_event, SSE_DONE};
use super::config::PrefixCacheScope;
use super::error::ApiError;
use super::models::ModelLease;
use super::ratelimit::Reserve;
use super::state::Record;
use crate::engine::{Request, RequestOutput, RequestStream};
use crate::error::Result;
use crate::media::ProcessedImage;
use crate::sampling::SamplingParams;

/// Token counts in OpenAI's shape.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct UsageOut {
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) total_tokens: usize,
    pub(crate) prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct PromptTokensDetails {
    /// Prompt tokens whose KV blocks came from the prefix cache.
    pub(crate) cached_tokens: usize,
}

/// The events of one request, possibly of several prompts.
enum Events {
    One(RequestStream),
    /// Several prompts: forwarding tasks tag each event with its prompt.
    Many(mpsc::Receiver<(usize, Result<RequestOutput>)>),
}

impl Events {
    async fn next(&mut self) -> Option<(usize, Result<RequestOutput>)> {
        match self {
            Events::One(s) => s.recv_async().await.map(|e| (0, e)),
            Events::Many(rx) => rx.recv().await,
        }
    }

    /// The next event if one is ready: `Some(None)` at the end, `None` when nothing is ready.
    fn try_next(&mut self) -> Option<Option<(usize, Result<RequestOutput>)>> {
        match self {
            Events::One(s) => s.try_recv().map(|e| e.map(|e| (0, e))),
            Events::Many(rx) => match rx.try_recv() {
                Ok(ev) => Some(Some(ev)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
            },
        }
    }

    fn queued(&self) -> usize {
        match self {
            Events::One(s) => s.queued(),
            Events::Many(rx) => rx.len(),
        }
    }
}

/// An event as [`Job::next`] gives it: (choice index, output); `None` at the end.
type NextEvent = Option<Result<(usize, RequestOutput), ApiError>>;

/// An admitted generation.
pub(crate) struct Job {
    events: Events,
    /// Choices per prompt.
    pub(crate) n: usize,
    pub(crate) prompt_lens: Vec<usize>,
    /// Keeps the model loaded until the last byte.
    pub(crate) lease: ModelLease,
    pub(crate) rec: Record,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Turns true when the shutdown grace runs out.
    ending: tokio::sync::watch::Receiver<bool>,
    first_token: bool,
    /// When each choice last produced output (for inter-token latency).
    last: Vec<Option<Instant>>,
    /// When the last awaited event arrived.
    now: Instant,
    pub(crate) completion_tokens: usize,
    /// Prompt tokens each prompt's request found in the prefix cache (from its final usage).
    cached_tokens: Vec<usize>,
}

/// Events queued per choice of a stream (at least twice its stream interval) before the engine
/// holds the request back until they are taken: a few tens of KB per choice of a client that
/// stopped reading. 64 cost 7-10% of the server's throughput at 1,000 streams on the null
/// backend (each stream paused and resumed every 64 tokens); 256 measures as unbounded did
/// (docs/SERVER_BENCHMARKS.md).
const QUEUED_PER_CHOICE: usize = 256;

/// The engine's [`Request::cache_salt`] for a request: with `--prefix-cache-scope principal`
/// the requesting credential and the client's `cache_salt` (each hashed, so the result has a
/// fixed length and neither part can imitate the other); with `global` the client's salt alone.
/// Without authentication every request has the same principal, so the scopes coincide.
fn engine_cache_salt(rec: &Record, client_salt: Option<&str>) -> Option<String> {
    use crate::engine::sequence::cache_salt_hash;
    match rec.state.config.prefix_cache_scope {
        PrefixCacheScope::Global => client_salt.map(str::to_owned),
        PrefixCacheScope::Principal => {
            let who = rec.principal.as_ref().map_or("", |p| p.id.as_str());
            Some(format!(
                "principal:{:016x}:{:016x}",
                cache_salt_hash(who),
                client_salt.map_or(0, cache_salt_hash)
            ))
        }
    }
}

/// Submits one engine request per prompt.
pub(crate) fn submit(
    lease: ModelLease,
    mut rec: Record,
    prompts: Vec<(Vec<u32>, Vec<Arc<ProcessedImage>>)>,
    params: Vec<SamplingParams>,
    cache_salt: Option<&str>,
) -> Result<Job, ApiError> {
    let priority = rec.principal.as_ref().map_or(0, |p| p.priority);
    let cache_salt = engine_cache_salt(&rec, cache_salt);
    let n = params.first().map_or(1, |p| p.n);
    let prompt_lens: Vec<usize> = prompts.iter().map(|(p, _)| p.len()).collect();
    let mut streams = Vec::with_capacity(prompts.len());
    for ((prompt, images), params) in prompts.into_iter().zip(params) {
        let req = Request {
            prompt,
            params,
            priority,
            images,
            cache_salt: cache_salt.clone(),
        };
        match lease.engine.submit_request(req) {
            Ok(mut s) => {
                let interval = rec.state.config.stream_interval;
                s.set_stream_interval(interval);
                // A client that stops reading holds back its own request once this much output
                // waits for it, instead of the server buffering without limit.
                s.set_max_queued(n.saturating_mul(QUEUED_PER_CHOICE.max(2 * interval)));
                streams.push(s)
            }
            Err(e) => {
                let e = ApiError::from(e);
                rec.status = e.status.as_u16();
                return Err(e);
            }
        }
    }
    rec.prompt_tokens = prompt_lens.iter().sum();
    let events = if streams.len() == 1 {
        Events::One(streams.pop().expect("one stream"))
    } else {
        let (tx, rx) = mpsc::channel(64);
        for (i, mut s) in streams.into_iter().enumerate() {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        // The client went away: drop the stream, which cancels the request.
                        _ = tx.closed() => return,
                        ev = s.recv_async() => match ev {
                            Some(ev) => if tx.send((i, ev)).await.is_err() { return },
                            None => return,
                        },
                    }
                }
            });
        }
        Events::Many(rx)
    };
    let deadline = rec
        .state
        .config
        .limits
        .request_timeout
        .map(|t| Box::pin(tokio::time::sleep_until((rec.start + t).into())));
    let ending = rec.state.ending.subscribe();
    rec.choices = n * prompt_lens.len();
    Ok(Job {
        events,
        ending,
        n,
        last: vec![None; n * prompt_lens.len()],
        cached_tokens: vec![0; prompt_lens.len()],
        prompt_lens,
        lease,
        rec,
        deadline,
        now: Instant::now(),
        first_token: true,
        completion_tokens: 0,
    })
}

impl Job {
    /// The next event as (choice index, output); `None` at the end.
    pub(crate) async fn next(&mut self) -> NextEvent {
        let Job {
            events,
            deadline,
            ending,
            ..
        } = self;
        let ev = tokio::select! {
            biased;
            // First, so that a stream whose output keeps coming still ends at the grace's end.
            _ = ending.wait_for(|e| *e) => return Some(Err(ApiError::shutting_down())),
            ev = events.next() => ev,
            _ = async { deadline.as_mut().expect("guarded").await }, if deadline.is_some() => {
                return Some(Err(ApiError::gateway_timeout("The request did not finish within the server's request timeout.")));
            }
        };
        self.now = Instant::now();
        self.account(ev)
    }

    /// The next event if one is ready without waiting (`Some(next)`), else `None`. Its latency
    /// metrics take the time of the last awaited event: both were ready together.
    pub(crate) fn try_next(&mut self) -> Option<NextEvent> {
        let ev = self.events.try_next()?;
        Some(self.account(ev))
    }

    /// Events ready without waiting.
    pub(crate) fn queued(&self) -> usize {
        self.events.queued()
    }

    /// Latency metrics and token counts of an event.
    fn account(&mut self, ev: Option<(usize, Result<RequestOutput>)>) -> NextEvent {
        let (prompt, ev) = ev?;
        let out = match ev {
            Ok(out) => out,
            Err(e) => return Some(Err(e.into())),
        };
        let now = self.now;
        let metrics = &self.rec.state.metrics;
        let model = self.rec.model_metrics.as_deref();
        if self.first_token {
            self.first_token = false;
            metrics.ttft.observe(now - self.rec.start);
            if let Some(m) = model {
                m.ttft.observe(now - self.rec.start);
                let prompt_tokens = self.prompt_lens.iter().sum::<usize>();
                m.prompt_tokens
                    .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
            }
        }
        let index = prompt * self.n + out.index;
        if let Some(slot) = self.last.get_mut(index) {
            if let Some(prev) = slot.replace(now) {
                metrics.itl.observe(now - prev);
                if let Some(m) = model {
                    m.tpot.observe(now - prev);
                }
            }
        }
        if let Some(m) = model {
            m.generation_tokens
                .fetch_add(out.token_ids.len() as u64, Ordering::Relaxed);
            if out.finish_reason.is_some() {
                m.count_finished(out.finish_reason, 1);
            }
        }
        if out.finish_reason.is_some() {
            self.rec.choices_finished += 1;
        }
        self.completion_tokens += out.token_ids.len();
        self.rec.completion_tokens = self.completion_tokens;
        if let (Some(u), Some(c)) = (&out.usage, self.cached_tokens.get_mut(prompt)) {
            *c = u.cached_prompt_tokens;
        }
        Some(Ok((index, out)))
    }

    pub(crate) fn usage(&self) -> UsageOut {
        let prompt_tokens = self.prompt_lens.iter().sum::<usize>();
        UsageOut {
            prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: prompt_tokens + self.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached_tokens.iter().sum(),
            },
        }
    }

    /// Total choices (prompts times n).
    pub(crate) fn num_choices(&self) -> usize {
        self.n * self.prompt_lens.len()
    }
}

/// What differs between chat and completion streams: the JSON of each event.
pub(crate) trait StreamFormat: Send + 'static {
    /// Appends the events sent before the first token (chat: each choice's assistant role).
    fn prelude(&mut self, num_choices: usize, buf: &mut BytesMut);
    /// Appends the event for one output to `buf`; nothing when there is nothing to send (no
    /// text, no logprobs, not the end).
    fn event(&mut self, index: usize, out: &RequestOutput, buf: &mut BytesMut);
    /// The final usage event (`choices: []`).
    fn usage(&mut self, usage: &UsageOut) -> Bytes;
    /// About the bytes of one plain token event, to size a chunk's buffer before rendering.
    fn event_size_hint(&self) -> usize;
}

enum Phase {
    Events,
    Usage,
    Done,
    End,
}

struct SseState<F> {
    job: Job,
    format: F,
    include_usage: bool,
    phase: Phase,
    /// The first event, awaited before the response was answered.
    first: Option<NextEvent>,
    /// Where events are rendered; each chunk is split off it, and its memory is reused once
    /// hyper has written and dropped the chunk.
    buf: BytesMut,
    /// Most token events merged into one chunk.
    batch: usize,
}

/// Ready token events merged into one chunk at most, when the stream interval is smaller.
const MERGE_READY: usize = 16;

/// The SSE body of a job: prelude, one event per output, optional usage, `[DONE]`.
///
/// Resolves once the job's first event is ready, so that the response head, the prelude and
/// the first token go out in one socket write (what a client measures as its time to first
/// token is unchanged; the head waits for it).
///
/// Every token is its own SSE event, rendered once into the stream's buffer. The events that are
/// ready when the stream is polled (up to the stream interval, or 16) go out together as one
/// chunk, so a stream that fell behind catches up with one socket write. With a stream interval
/// `k > 1` the engine wakes the stream once `k` events are queued (the first token and a choice's
/// last one at once): one wake-up and one socket write per `k` tokens.
pub(crate) async fn sse_stream<F: StreamFormat>(
    mut job: Job,
    mut format: F,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    let first = job.next().await;
    let batch = job.rec.state.config.stream_interval.max(MERGE_READY);
    let mut buf = BytesMut::new();
    format.prelude(job.num_choices(), &mut buf);
    let state = SseState {
        job,
        format,
        include_usage,
        phase: Phase::Events,
        first: Some(first),
        buf,
        batch,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            match st.phase {
                Phase::Events => {
                    // Wait for one event, then take the ones already queued behind it, rendered
                    // into a buffer sized for all of them at once (no regrowth while rendering).
                    let mut next = match st.first.take() {
                        Some(first) => first,
                        None => st.job.next().await,
                    };
                    let ready = 1 + st.job.queued().min(st.batch - 1);
                    st.buf.reserve(ready * st.format.event_size_hint());
                    let mut taken = 0;
                    loop {
                        match next {
                            Some(Ok((index, out))) => st.format.event(index, &out, &mut st.buf),
                            Some(Err(e)) => {
                                push_sse_event(&mut st.buf, &e.envelope());
                                st.phase = Phase::Done;
                                break;
                            }
                            None => {
                                st.phase = Phase::Usage;
                                break;
                            }
                        }
                        taken += 1;
                        if taken == st.batch {
                            break;
                        }
                        match st.job.try_next() {
                            Some(ev) => next = ev,
                            None => break,
                        }
                    }
                    if !st.buf.is_empty() {
                        return Some((st.buf.split().freeze(), st));
                    }
                }
                Phase::Usage => {
                    st.phase = Phase::Done;
                    if st.include_usage {
                        let u = st.job.usage();
                        return Some((st.format.usage(&u), st));
                    }
                }
                Phase::Done => {
                    st.phase = Phase::End;
                    return Some((Bytes::from_static(SSE_DONE), st));
                }
                Phase::End => return None,
            }
        }
    })
}

/// What a generation may cost against its principal's token budget, and the request fields
/// that set it (named by the 400 when it can never fit).
pub(crate) struct Cost {
    /// Prompt tokens, over all prompts.
    pub(crate) prompt_tokens: usize,
    /// The most it can cost: each prompt's tokens plus its `max_tokens` for each of its `n`
    /// choices ([`Cost::of`]); `None` when that does not even fit a `usize`.
    pub(crate) tokens: Option<usize>,
    /// The field that bounds the completion (`max_tokens`, `max_completion_tokens`).
    pub(crate) max_param: &'static str,
    /// The field of the prompt (`prompt`, `messages`).
    pub(crate) prompt_param: &'static str,
}

impl Cost {
    /// The cost of prompts of these (length, max_tokens), each with `n` choices.
    pub(crate) fn of(
        prompts: impl IntoIterator<Item = (usize, usize)>,
        n: usize,
        max_param: &'static str,
        prompt_param: &'static str,
    ) -> Cost {
        let mut prompt_tokens = 0usize;
        let mut tokens = Some(0usize);
        for (len, max) in prompts {
            prompt_tokens = prompt_tokens.saturating_add(len);
            tokens = tokens
                .and_then(|t| t.checked_add(len))
                .and_then(|t| t.checked_add(max.checked_mul(n)?));
        }
        Cost {
            prompt_tokens,
            tokens,
            max_param,
            prompt_param,
        }
    }
}

/// Admission control before submitting `choices` sequences: the engine's queue, the in-flight
/// cap, the principal's token budget (the most the request can cost is reserved now and the
/// unused part given back when its record drops). Marks the record as a generation.
pub(crate) fn admit(
    rec: &mut Record,
    lease: &ModelLease,
    cost: Cost,
    choices: usize,
) -> Result<(), ApiError> {
    let state = rec.state.clone();
    if let Some(max) = state.config.limits.max_waiting_requests {
        let waiting = lease
            .engine
            .stats()
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed);
        if waiting >= max || waiting + choices > max {
            return Err(ApiError::overloaded(format!(
                "The model `{}` has {waiting} sequences waiting (at most {max}) and this request adds {choices}; retry later.",
                lease.name
            )));
        }
    }
    if rec.in_flight.is_none() {
        rec.in_flight = Some(state.admit_generation(choices)?);
    }
    if let Some(p) = &rec.principal {
        let tokens = cost.tokens.unwrap_or(usize::MAX);
        match state.limiter.reserve_tokens(p, tokens) {
            Reserve::Unlimited => {}
            Reserve::Reserved => rec.reserved_tokens = tokens,
            Reserve::Wait(secs) => return Err(ApiError::rate_limited("tokens", secs)),
            Reserve::OverCapacity { capacity } => {
                let prompt = cost.prompt_tokens;
                // Only a shorter prompt helps when the prompt alone is too much.
                let param = if prompt as f64 >= capacity {
                    cost.prompt_param
                } else {
                    cost.max_param
                };
                let shown = cost
                    .tokens
                    .map_or("more than 2^64".to_string(), |t| t.to_string());
                return Err(ApiError::bad_param(
                    param,
                    format!(
                        "This request may use up to {shown} tokens ({prompt} in the prompt, plus {} for each of its {choices} choices), but your limit is {capacity} tokens per minute, so it could never be served. Reduce {param}{}.",
                        cost.max_param,
                        if choices > 1 { " or n" } else { "" },
                    ),
                ));
            }
        }
    }
    rec.generation = true;
    Ok(())
}

/// The envelope of every streamed event and of the usage event.
#[derive(serde::Serialize)]
pub(crate) struct Chunk<'a, C: serde::Serialize> {
    pub(crate) id: &'a str,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<&'a UsageOut>,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A plain token event (text only: no logprobs, no ids, not the last) written without serde: the
/// bytes around the text are rendered once per request, each event copies them around the
/// escaped text into an exact-size buffer. Produces the same bytes as serializing the event.
pub(crate) struct EventTemplate {
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":`
    head: Vec<u8>,
    /// Between the index and the text, e.g. `,"text":`.
    mid: &'static [u8],
    /// After the text, through the blank line.
    tail: &'static [u8],
}

impl EventTemplate {
    pub(crate) fn new(
        id: &str,
        object: &str,
        created: u64,
        model: &str,
        mid: &'static [u8],
        tail: &'static [u8],
    ) -> Self {
        let mut head = b"data: {\"id\":".to_vec();
        super::body::push_json_str(&mut head, id);
        head.extend_from_slice(b",\"object\":");
        super::body::push_json_str(&mut head, object);
        head.extend_from_slice(format!(",\"created\":{created},\"model\":").as_bytes());
        super::body::push_json_str(&mut head, model);
        head.extend_from_slice(b",\"choices\":[{\"index\":");
        EventTemplate { head, mid, tail }
    }

    /// The bytes of an event with a short text (a token or two).
    pub(crate) fn size_hint(&self) -> usize {
        self.head.len() + self.mid.len() + self.tail.len() + 16
    }

    /// Appends the event to `buf`.
    pub(crate) fn render(&self, index: usize, text: &str, buf: &mut BytesMut) {
        let len = self.head.len()
            + super::body::digits(index)
            + self.mid.len()
            + super::body::json_str_len(text)
            + self.tail.len();
        buf.reserve(len);
        let start = buf.len();
        buf.put_slice(&self.head);
        super::body::push_decimal(buf, index);
        buf.put_slice(self.mid);
        super::body::push_json_str(buf, text);
        buf.put_slice(self.tail);
        debug_assert_eq!(buf.len() - start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::body::sse_event;

    #[derive(serde::Serialize)]
    struct Plain<'a> {
        index: usize,
        text: &'a str,
        logprobs: Option<()>,
        finish_reason: Option<&'static str>,
    }

    #[test]
    fn template_matches_serde() {
        let t = EventTemplate::new(
            "cmpl-\"x",
            "text_completion",
            17,
            "m\\n",
            b",\"text\":",
            b",\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        );
        for (index, text) in [(0, "a"), (12, "q\"\n\u{1}多")] {
            let choice = Plain {
                index,
                text,
                logprobs: None,
                finish_reason: None,
            };
            let want = sse_event(&Chunk {
                id: "cmpl-\"x",
                object: "text_completion",
                created: 17,
                model: "m\\n",
                choices: std::slice::from_ref(&choice),
                usage: None,
            });
            let mut buf = BytesMut::from(&b"before"[..]);
            t.render(index, text, &mut buf);
            assert_eq!(&buf[..6], b"before");
            assert_eq!(&buf[6..], &want[..]);
        }
    }
}
