//! Generation: blocking (`autoglm_engine_generate`), streaming with a callback
//! (`autoglm_engine_generate_stream`) and pulled event by event (`autoglm_request_*`).
//!
//! All three submit to the engine thread and read the request's event channel on the calling
//! thread; the callback runs on the calling thread, between two reads, so a slow callback delays
//! only its own request's reading, never the engine (events queue up meanwhile).

use std::ffi::{c_char, c_int, c_void};

use autoglm_core::engine::{collect, GenerateOutput};
use autoglm_core::{FinishReason, RequestOutput, RequestStream};

use crate::engine::autoglm_engine;
use crate::ffi;
use crate::options::autoglm_sampling_params;
use crate::panic::{boundary, boundary_void};
use crate::status::{autoglm_status, CapiError};

/// Why a completion ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum autoglm_finish_reason {
    /// Not finished: more events follow for this completion.
    None = 0,
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop = 1,
    /// `max_tokens` or the context length was reached.
    Length = 2,
    /// Aborted inside the engine.
    Abort = 3,
}

impl From<Option<FinishReason>> for autoglm_finish_reason {
    fn from(r: Option<FinishReason>) -> Self {
        match r {
            None => autoglm_finish_reason::None,
            Some(FinishReason::Stop) => autoglm_finish_reason::Stop,
            Some(FinishReason::Length) => autoglm_finish_reason::Length,
            Some(FinishReason::Abort) => autoglm_finish_reason::Abort,
        }
    }
}

/// The OpenAI spelling of a finish reason (`"stop"`, `"length"`, `"abort"`), `""` for
/// `AUTOGLM_FINISH_REASON_NONE` and `"unknown"` for a value that is not one.
///
/// Ownership: the returned string is static; do not free it. Leaves `autoglm_last_error`
/// unchanged.
#[no_mangle]
pub extern "C" fn autoglm_finish_reason_str(reason: c_int) -> *const c_char {
    let s = match reason {
        0 => c"",
        1 => c"stop",
        2 => c"length",
        3 => c"abort",
        _ => c"unknown",
    };
    s.as_ptr()
}

/// Token counts of a finished request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct autoglm_usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated, over all completions.
    pub completion_tokens: usize,
    /// Prompt tokens whose KV cache was reused from an earlier request (prefix caching).
    pub cached_prompt_tokens: usize,
}

/// One of the most likely tokens at a position, with its log-probability.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct autoglm_top_logprob {
    /// The token.
    pub token_id: u32,
    /// Its log-probability under the model's distribution (before penalties and temperature).
    pub logprob: f32,
}

/// Log-probabilities of one generated token (when the request set `has_logprobs`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct autoglm_token_logprobs {
    /// The generated token.
    pub token_id: u32,
    /// Its log-probability under the model's distribution (before penalties and temperature).
    pub logprob: f32,
    /// The `params.logprobs` most likely tokens, best first (`top_len` of them; NULL when 0).
    pub top: *const autoglm_top_logprob,
    /// Length of `top`.
    pub top_len: usize,
}

/// What one completion of a request produced in one engine step.
///
/// Ownership: the event and every array and string it points to are owned by the library and
/// valid only during the callback that receives it (`autoglm_engine_generate_stream`) or until
/// the next `autoglm_request_next` / `autoglm_request_free` on its request. Copy what you keep.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct autoglm_event {
    /// Which completion (0 .. n-1) this event belongs to.
    pub index: usize,
    /// The new token ids (`token_ids_len` of them; NULL when 0). May be empty on a completion's
    /// last event.
    pub token_ids: *const u32,
    /// Length of `token_ids`.
    pub token_ids_len: usize,
    /// The new text: `text_len` bytes of UTF-8, never splitting a character, followed by a NUL
    /// byte (so it is also a C string; `text_len` is authoritative if the text itself contains a
    /// NUL). Never NULL; empty when the tokens' text is held back (it might start a stop string,
    /// or be half a character).
    pub text: *const c_char,
    /// Length of `text` in bytes, without the terminating NUL.
    pub text_len: usize,
    /// Log-probabilities of each new token, when the request set `has_logprobs`
    /// (`logprobs_len` of them, same order as `token_ids`; NULL when 0).
    pub logprobs: *const autoglm_token_logprobs,
    /// Length of `logprobs`.
    pub logprobs_len: usize,
    /// `AUTOGLM_FINISH_REASON_NONE` except on this completion's last event.
    pub finish_reason: autoglm_finish_reason,
    /// NULL except on the request's last event (the last of all its completions), where it
    /// points to the request's token counts.
    pub usage: *const autoglm_usage,
}

/// Receives each event of a streaming request, on the thread that called
/// `autoglm_engine_generate_stream`. Return true to go on, false to cancel the request.
/// `ev` is valid only during the call; `user_data` is the pointer given to the streaming call.
/// The callback must not unwind (throw a C++ exception, `longjmp`) into the library.
pub type autoglm_event_callback =
    Option<unsafe extern "C" fn(ev: *const autoglm_event, user_data: *mut c_void) -> bool>;

/// Storage behind the `autoglm_event` handed to C: the event's pointers point into it.
struct EventBuf {
    token_ids: Vec<u32>,
    text: Vec<u8>,
    top: Vec<autoglm_top_logprob>,
    logprobs: Vec<autoglm_token_logprobs>,
    usage: autoglm_usage,
    event: autoglm_event,
}

impl EventBuf {
    fn new() -> Self {
        EventBuf {
            token_ids: Vec::new(),
            text: Vec::new(),
            top: Vec::new(),
            logprobs: Vec::new(),
            usage: autoglm_usage::default(),
            event: autoglm_event {
                index: 0,
                token_ids: std::ptr::null(),
                token_ids_len: 0,
                text: c"".as_ptr(),
                text_len: 0,
                logprobs: std::ptr::null(),
                logprobs_len: 0,
                finish_reason: autoglm_finish_reason::None,
                usage: std::ptr::null(),
            },
        }
    }

    /// Replaces the stored event with `out` and returns it; the pointers stay valid until the
    /// next `fill` or until `self` is dropped.
    fn fill(&mut self, out: RequestOutput) -> &autoglm_event {
        self.token_ids = out.token_ids;
        self.text.clear();
        self.text.extend_from_slice(out.text.as_bytes());
        self.text.push(0);
        self.top.clear();
        self.top.extend(out.logprobs.iter().flat_map(|lp| {
            lp.top
                .iter()
                .map(|&(token_id, logprob)| autoglm_top_logprob { token_id, logprob })
        }));
        // `top` is complete, so pointers into it are stable from here on.
        let mut start = 0;
        self.logprobs.clear();
        for lp in &out.logprobs {
            let top = &self.top[start..start + lp.top.len()];
            start += lp.top.len();
            self.logprobs.push(autoglm_token_logprobs {
                token_id: lp.token_id,
                logprob: lp.logprob,
                top: ffi::slice_ptr(top),
                top_len: top.len(),
            });
        }
        let usage = out.usage.map(|u| {
            self.usage = autoglm_usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cached_prompt_tokens: u.cached_prompt_tokens,
            };
            &raw const self.usage
        });
        self.event = autoglm_event {
            index: out.index,
            token_ids: ffi::slice_ptr(&self.token_ids),
            token_ids_len: self.token_ids.len(),
            text: self.text.as_ptr().cast(),
            text_len: self.text.len() - 1,
            logprobs: ffi::slice_ptr(&self.logprobs),
            logprobs_len: self.logprobs.len(),
            finish_reason: out.finish_reason.into(),
            usage: usage.unwrap_or(std::ptr::null()),
        };
        &self.event
    }
}

/// Checks the arguments and submits the request.
///
/// # Safety
///
/// As the `# Safety` sections of the entry points: each pointer NULL or valid for the call.
unsafe fn submit(
    engine: *const autoglm_engine,
    prompt_token_ids: *const u32,
    prompt_len: usize,
    params: *const autoglm_sampling_params,
) -> Result<(RequestStream, usize), CapiError> {
    // SAFETY: forwarded contract.
    let (engine, prompt, params) = unsafe {
        let engine = ffi::ref_arg(engine, "engine")?;
        let prompt = ffi::slice_arg(prompt_token_ids, prompt_len, "prompt_token_ids")?;
        let params = match ffi::opt_sized_arg(params, "params")? {
            Some(p) => p.to_params()?,
            None => Default::default(),
        };
        (engine, prompt, params)
    };
    let n = params.n;
    Ok((engine.engine.submit(prompt.to_vec(), params)?, n))
}

/// Generates one completion and waits for it.
///
/// * `engine`: borrowed for the call.
/// * `prompt_token_ids`, `prompt_len`: the prompt (at least one token); borrowed for the call.
/// * `params`: NULL for the defaults, else initialised with `autoglm_sampling_params_default()`;
///   `n` must be 1 (use the streaming calls for more). Borrowed for the call.
/// * `out_text`: NULL, or receives the generated text, NUL-terminated UTF-8 (it holds a NUL byte
///   only if the model generated one), owned by the caller and released with
///   `autoglm_string_free`.
/// * `out_token_ids`, `out_token_ids_len`: both NULL, or both receive the generated token ids,
///   owned by the caller and released with `autoglm_token_ids_free`.
/// * `out_finish_reason`, `out_usage`: NULL, or receive why generation ended and the counts.
///
/// Every output is set to NULL / 0 when the call fails. Blocks the calling thread; other threads
/// may generate on the same engine meanwhile (their requests are batched together).
///
/// # Safety
///
/// `engine` is NULL or a live engine handle; `prompt_token_ids` is NULL or points to
/// `prompt_len` ids; `params` is NULL or valid as its fields document; each output is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_generate(
    engine: *const autoglm_engine,
    prompt_token_ids: *const u32,
    prompt_len: usize,
    params: *const autoglm_sampling_params,
    out_text: *mut *mut c_char,
    out_token_ids: *mut *mut u32,
    out_token_ids_len: *mut usize,
    out_finish_reason: *mut autoglm_finish_reason,
    out_usage: *mut autoglm_usage,
) -> autoglm_status {
    boundary("autoglm_engine_generate", || {
        // SAFETY: NULL or writable pointers (see # Safety).
        let outs = unsafe {
            BlockingOutputs::new(
                out_text,
                out_token_ids,
                out_token_ids_len,
                out_finish_reason,
                out_usage,
            )
        }?;
        // SAFETY: the inputs are NULL or valid (see # Safety).
        unsafe {
            check_single(
                params,
                "autoglm_engine_generate_stream or autoglm_request_new",
            )
        }?;
        // SAFETY: as above.
        let (stream, n) = unsafe { submit(engine, prompt_token_ids, prompt_len, params) }?;
        outs.write(collect(stream, n)?)
    })
}

/// The output parameters of a blocking call (`autoglm_engine_generate`, `autoglm_engine_chat`),
/// checked and already set to NULL / 0.
pub(crate) struct BlockingOutputs<'a> {
    text: Option<ffi::Out<'a, *mut c_char>>,
    ids: Option<(ffi::Out<'a, *mut u32>, ffi::Out<'a, usize>)>,
    reason: Option<ffi::Out<'a, autoglm_finish_reason>>,
    usage: Option<ffi::Out<'a, autoglm_usage>>,
}

impl BlockingOutputs<'_> {
    /// Checks the pointers (each NULL or writable; the two id pointers both NULL or both not) and
    /// clears what they point to.
    ///
    /// # Safety
    ///
    /// Each pointer is NULL or writable for the call.
    pub(crate) unsafe fn new(
        out_text: *mut *mut c_char,
        out_token_ids: *mut *mut u32,
        out_token_ids_len: *mut usize,
        out_finish_reason: *mut autoglm_finish_reason,
        out_usage: *mut autoglm_usage,
    ) -> Result<Self, CapiError> {
        // SAFETY: forwarded contract.
        let mut outs = unsafe {
            BlockingOutputs {
                text: ffi::opt_out_arg(out_text, "out_text")?,
                ids: match (
                    ffi::opt_out_arg(out_token_ids, "out_token_ids")?,
                    ffi::opt_out_arg(out_token_ids_len, "out_token_ids_len")?,
                ) {
                    (Some(ids), Some(len)) => Some((ids, len)),
                    (None, None) => None,
                    _ => {
                        return Err(CapiError::invalid_argument(
                            "`out_token_ids` and `out_token_ids_len` must both be NULL or both non-NULL",
                        ))
                    }
                },
                reason: ffi::opt_out_arg(out_finish_reason, "out_finish_reason")?,
                usage: ffi::opt_out_arg(out_usage, "out_usage")?,
            }
        };
        if let Some(t) = &mut outs.text {
            t.write(std::ptr::null_mut());
        }
        if let Some((ids, len)) = &mut outs.ids {
            ids.write(std::ptr::null_mut());
            len.write(0);
        }
        if let Some(r) = &mut outs.reason {
            r.write(autoglm_finish_reason::None);
        }
        if let Some(u) = &mut outs.usage {
            u.write(autoglm_usage::default());
        }
        Ok(outs)
    }

    /// Hands the first completion of `out` to the caller: all or nothing.
    pub(crate) fn write(mut self, out: GenerateOutput) -> Result<(), CapiError> {
        let choice = &out.choices[0];
        // Allocate everything before handing anything out, so a failure leaks nothing.
        let text = self
            .text
            .is_some()
            .then(|| ffi::malloc_str(&choice.text))
            .transpose()?;
        let ids = match self
            .ids
            .is_some()
            .then(|| ffi::malloc_slice(&choice.token_ids))
            .transpose()
        {
            Ok(ids) => ids,
            Err(e) => {
                if let Some(t) = text {
                    // SAFETY: `t` came from malloc_str above and was not handed out.
                    unsafe { ffi::malloc_free(t) };
                }
                return Err(e);
            }
        };
        if let (Some(t), Some(p)) = (&mut self.text, text) {
            t.write(p);
        }
        if let (Some((ids_o, len_o)), Some(p)) = (&mut self.ids, ids) {
            ids_o.write(p);
            len_o.write(choice.token_ids.len());
        }
        if let Some(r) = &mut self.reason {
            r.write(choice.finish_reason.into());
        }
        if let Some(u) = &mut self.usage {
            u.write(autoglm_usage {
                prompt_tokens: out.usage.prompt_tokens,
                completion_tokens: out.usage.completion_tokens,
                cached_prompt_tokens: out.usage.cached_prompt_tokens,
            });
        }
        Ok(())
    }
}

/// A blocking call returns one completion: `params->n` must be 1 (NULL params are). `instead`
/// names the calls to use for more.
///
/// # Safety
///
/// `params` is NULL or points to valid parameters.
pub(crate) unsafe fn check_single(
    params: *const autoglm_sampling_params,
    instead: &str,
) -> Result<(), CapiError> {
    // SAFETY: forwarded contract.
    let n = unsafe { ffi::opt_sized_arg(params, "params") }?.map_or(1, |p| p.n);
    if n != 1 {
        return Err(CapiError::new(
            autoglm_status::InvalidRequest,
            format!("params->n = {n}: this call returns one completion; use {instead} for n > 1"),
        ));
    }
    Ok(())
}

/// Reads `stream` to its end on the calling thread, handing each event to `callback`; a false
/// from the callback (before the last event) cancels the request.
///
/// # Safety
///
/// `callback` is safe to call with an event and `user_data`, and does not unwind.
pub(crate) unsafe fn run_stream(
    mut stream: RequestStream,
    callback: unsafe extern "C" fn(*const autoglm_event, *mut c_void) -> bool,
    user_data: *mut c_void,
) -> Result<(), CapiError> {
    let mut buf = EventBuf::new();
    while let Some(out) = stream.recv() {
        let ev = buf.fill(out?);
        let last = !ev.usage.is_null();
        // SAFETY: `callback` is a valid C function (forwarded contract); `ev` lives in `buf` for
        // the duration of the call.
        if !unsafe { callback(ev, user_data) } && !last {
            stream.cancel();
            return Err(CapiError::new(
                autoglm_status::Cancelled,
                "the callback returned false; the request was cancelled",
            ));
        }
    }
    Ok(())
}

/// The required callback of a streaming call.
pub(crate) fn required_callback(
    callback: autoglm_event_callback,
) -> Result<unsafe extern "C" fn(*const autoglm_event, *mut c_void) -> bool, CapiError> {
    callback.ok_or_else(|| CapiError::invalid_argument("`callback` is NULL"))
}

/// Generates and calls `callback` with each event as it arrives, on the calling thread; returns
/// when the request has finished or `callback` returned false.
///
/// * `engine`, `prompt_token_ids`, `prompt_len`, `params`: as for `autoglm_engine_generate`,
///   except that any `n` is allowed (events of the completions interleave; see `index`).
/// * `callback`: required. Its event is valid only during the call. Returning false cancels the
///   request (its KV cache is freed at once) and this function returns
///   `AUTOGLM_STATUS_CANCELLED`; returning false on the request's last event (the one with
///   `usage`) changes nothing.
/// * `user_data`: passed to `callback` untouched; may be NULL. Owned by the caller.
///
/// Ownership: every argument is borrowed for the call; the events are borrowed from the library
/// for the duration of each callback.
///
/// # Safety
///
/// As `autoglm_engine_generate` for the shared arguments; `callback` is NULL or a function that
/// is safe to call with these arguments and does not unwind.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_generate_stream(
    engine: *const autoglm_engine,
    prompt_token_ids: *const u32,
    prompt_len: usize,
    params: *const autoglm_sampling_params,
    callback: autoglm_event_callback,
    user_data: *mut c_void,
) -> autoglm_status {
    boundary("autoglm_engine_generate_stream", || {
        let callback = required_callback(callback)?;
        // SAFETY: the inputs are NULL or valid (see # Safety).
        let (stream, _) = unsafe { submit(engine, prompt_token_ids, prompt_len, params) }?;
        // SAFETY: `callback` is valid and does not unwind (see # Safety).
        unsafe { run_stream(stream, callback, user_data) }
    })
}

/// A submitted request whose events are pulled one at a time with `autoglm_request_next`
/// (opaque).
///
/// Create with `autoglm_request_new`, release with `autoglm_request_free` (which cancels it if it
/// is still running). A request may outlive its engine: it then ends with
/// `AUTOGLM_STATUS_ENGINE_SHUTDOWN`.
///
/// Thread safety: not thread-safe. Use it from one thread at a time (it may move between
/// threads).
pub struct autoglm_request {
    stream: RequestStream,
    buf: EventBuf,
    done: bool,
}

impl autoglm_request {
    /// A new request handle reading `stream`, for C to own.
    pub(crate) fn new_handle(stream: RequestStream) -> *mut autoglm_request {
        ffi::into_handle(autoglm_request {
            stream,
            buf: EventBuf::new(),
            done: false,
        })
    }
}

// SAFETY: the only non-Send parts are the raw pointers of `buf.event`, which point into `buf`'s
// own heap buffers and move with it; nothing in the request is tied to the thread that made it.
unsafe impl Send for autoglm_request {}

/// Submits a request and returns at once; read its events with `autoglm_request_next`.
///
/// * `engine`, `prompt_token_ids`, `prompt_len`, `params`: as for
///   `autoglm_engine_generate_stream`; all borrowed for the call.
/// * `out_request`: receives the request, owned by the caller and released with
///   `autoglm_request_free`; NULL on failure.
///
/// # Safety
///
/// As `autoglm_engine_generate`; `out_request` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_request_new(
    engine: *const autoglm_engine,
    prompt_token_ids: *const u32,
    prompt_len: usize,
    params: *const autoglm_sampling_params,
    out_request: *mut *mut autoglm_request,
) -> autoglm_status {
    boundary("autoglm_request_new", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, (stream, _)) = unsafe {
            let mut out = ffi::out_arg(out_request, "out_request")?;
            out.write(std::ptr::null_mut());
            (out, submit(engine, prompt_token_ids, prompt_len, params)?)
        };
        out.write(autoglm_request::new_handle(stream));
        Ok(())
    })
}

/// Waits for the request's next event.
///
/// * `request`: owned by the caller; borrowed (mutably) for the call.
/// * `out_event`: receives the event, or NULL once the request has ended (finished or
///   cancelled). The event is owned by the request and valid until the next
///   `autoglm_request_next` or `autoglm_request_free` on it.
///
/// A failure inside the engine ends the request with that status (for example
/// `AUTOGLM_STATUS_BACKEND`); later calls report the end.
///
/// # Safety
///
/// `request` is NULL or a live request handle not used by another thread; `out_event` is NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_request_next(
    request: *mut autoglm_request,
    out_event: *mut *const autoglm_event,
) -> autoglm_status {
    boundary("autoglm_request_next", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, req) = unsafe {
            let mut out = ffi::out_arg(out_event, "out_event")?;
            out.write(std::ptr::null());
            (out, ffi::mut_arg(request, "request")?)
        };
        if req.done {
            return Ok(());
        }
        match req.stream.recv() {
            Some(Ok(ev)) => out.write(req.buf.fill(ev)),
            Some(Err(e)) => {
                req.done = true;
                return Err(e.into());
            }
            None => req.done = true,
        }
        Ok(())
    })
}

/// Cancels the request: the engine stops generating for it and frees its KV cache; the next
/// `autoglm_request_next` reports the end. Cancelling a finished request does nothing.
///
/// Ownership: `request` stays owned by the caller (free it with `autoglm_request_free`); an event
/// from it stays valid until the next `autoglm_request_next` or `autoglm_request_free`.
///
/// # Safety
///
/// `request` is NULL or a live request handle not used by another thread.
#[no_mangle]
pub unsafe extern "C" fn autoglm_request_cancel(request: *mut autoglm_request) -> autoglm_status {
    boundary("autoglm_request_cancel", || {
        // SAFETY: NULL or a valid, unshared handle (see # Safety).
        let req = unsafe { ffi::mut_arg(request, "request") }?;
        req.stream.cancel();
        req.done = true;
        Ok(())
    })
}

/// Frees a request, cancelling it if it is still running. NULL is a no-op.
///
/// Ownership: takes `request` back from the caller, and with it the last event it returned.
///
/// # Safety
///
/// `request` is NULL or a handle from `autoglm_request_new` that has not been freed, and no
/// other call is using it.
#[no_mangle]
pub unsafe extern "C" fn autoglm_request_free(request: *mut autoglm_request) {
    // SAFETY: NULL or a live, unshared handle (see # Safety).
    boundary_void("autoglm_request_free", || unsafe {
        ffi::free_handle(request)
    })
}
