//! Generation through the C ABI against the fixtures' greedy continuations: blocking, streamed
//! with a callback (and cancelled by it), pulled event by event, from several threads.

mod common;

use std::ffi::c_void;
use std::ptr::{null, null_mut};

use autoglm::*;
use common::*;

#[test]
fn blocking_generate_matches_the_fixtures() {
    for name in ["glm4-tiny", "glm-tiny-bf16"] {
        let e = Engine::new(name);
        let case = &expected(name)["cases"][0];
        let (got, _) = generate(&e, &ids(&case["prompt_token_ids"]), &greedy(24));
        assert_eq!(got, ids(&case["greedy_token_ids"]), "{name}");
    }
}

#[derive(Default)]
struct Seen {
    tokens: Vec<u32>,
    text: String,
    events: usize,
    stop_after: usize,
    usage: Option<autoglm_usage>,
    finish: Vec<autoglm_finish_reason>,
    logprobs: Vec<(u32, usize)>,
}

unsafe extern "C" fn on_event(ev: *const autoglm_event, user_data: *mut c_void) -> bool {
    // SAFETY: the library passes a valid event; user_data is the `Seen` given below.
    let (ev, seen) = unsafe { (&*ev, &mut *user_data.cast::<Seen>()) };
    // SAFETY: the event's arrays hold the stated lengths for the duration of the callback.
    unsafe {
        if ev.token_ids_len > 0 {
            let t = std::slice::from_raw_parts(ev.token_ids, ev.token_ids_len);
            seen.tokens.extend_from_slice(t);
        }
        let text = std::slice::from_raw_parts(ev.text.cast::<u8>(), ev.text_len + 1);
        assert_eq!(text[ev.text_len], 0, "text is NUL-terminated");
        seen.text
            .push_str(std::str::from_utf8(&text[..ev.text_len]).unwrap());
        for i in 0..ev.logprobs_len {
            let lp = &*ev.logprobs.add(i);
            seen.logprobs.push((lp.token_id, lp.top_len));
        }
        if !ev.usage.is_null() {
            seen.usage = Some(*ev.usage);
        }
    }
    seen.finish.push(ev.finish_reason);
    seen.events += 1;
    seen.stop_after == 0 || seen.tokens.len() < seen.stop_after
}

fn stream(
    e: &Engine,
    prompt: &[u32],
    params: &autoglm_sampling_params,
    stop_after: usize,
) -> (autoglm_status, Seen) {
    let mut seen = Seen {
        stop_after,
        ..Default::default()
    };
    // SAFETY: valid pointers; `seen` outlives the call.
    let status = unsafe {
        autoglm_engine_generate_stream(
            e.0,
            prompt.as_ptr(),
            prompt.len(),
            params,
            Some(on_event),
            (&raw mut seen).cast(),
        )
    };
    (status, seen)
}

#[test]
fn streaming_matches_blocking_and_cancels() {
    let e = Engine::new("glm4-tiny");
    let case = &expected("glm4-tiny")["cases"][0];
    let prompt = ids(&case["prompt_token_ids"]);
    let want = ids(&case["greedy_token_ids"]);

    let mut params = greedy(24);
    params.has_logprobs = true;
    params.logprobs = 3;
    let (status, seen) = stream(&e, &prompt, &params, 0);
    assert_eq!(status, autoglm_status::Ok, "{}", last_error());
    assert_eq!(seen.tokens, want);
    let usage = seen.usage.expect("usage on the last event");
    assert_eq!(usage.completion_tokens, 24);
    assert_eq!(seen.finish.last(), Some(&autoglm_finish_reason::Length));
    assert_eq!(seen.logprobs.len(), 24);
    assert!(seen.logprobs.iter().all(|&(_, top)| top == 3));
    assert_eq!(generate(&e, &prompt, &greedy(24)).1, seen.text);

    let (status, seen) = stream(&e, &prompt, &greedy(24), 3);
    assert_err(
        status,
        autoglm_status::Cancelled,
        &["callback returned false"],
    );
    assert_eq!(seen.tokens, want[..3]);
    assert!(seen.usage.is_none());

    // The engine serves requests after a cancellation.
    assert_eq!(generate(&e, &prompt, &greedy(24)).0, want);
}

#[test]
fn pulled_events_and_n_completions() {
    let e = Engine::new("glm4-tiny");
    let case = &expected("glm4-tiny")["cases"][0];
    let prompt = ids(&case["prompt_token_ids"]);
    let want = ids(&case["greedy_token_ids"]);
    let mut params = greedy(24);
    params.n = 2;
    let mut req = null_mut();
    // SAFETY: valid pointers.
    let status =
        unsafe { autoglm_request_new(e.0, prompt.as_ptr(), prompt.len(), &params, &mut req) };
    assert_eq!(status, autoglm_status::Ok, "{}", last_error());
    let mut per_choice = vec![Vec::new(); 2];
    loop {
        let mut ev: *const autoglm_event = null();
        // SAFETY: a live request and a valid out pointer.
        let status = unsafe { autoglm_request_next(req, &mut ev) };
        assert_eq!(status, autoglm_status::Ok);
        if ev.is_null() {
            break;
        }
        // SAFETY: the event is valid until the next call on the request.
        let ev = unsafe { &*ev };
        if ev.token_ids_len > 0 {
            // SAFETY: `token_ids_len` ids.
            let t = unsafe { std::slice::from_raw_parts(ev.token_ids, ev.token_ids_len) };
            per_choice[ev.index].extend_from_slice(t);
        }
    }
    assert_eq!(per_choice, vec![want.clone(), want.clone()]);
    // SAFETY: a live request, then freed once.
    unsafe { autoglm_request_free(req) };

    // Cancelled before reading: the end comes at once (or after what was already queued).
    let mut req = null_mut();
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(
            autoglm_request_new(e.0, prompt.as_ptr(), prompt.len(), &greedy(24), &mut req),
            autoglm_status::Ok
        );
        assert_eq!(autoglm_request_cancel(req), autoglm_status::Ok);
        let mut ev: *const autoglm_event = null();
        assert_eq!(autoglm_request_next(req, &mut ev), autoglm_status::Ok);
        assert!(ev.is_null());
        autoglm_request_free(req);
        // A request dropped mid-stream is cancelled by the free.
        assert_eq!(
            autoglm_request_new(e.0, prompt.as_ptr(), prompt.len(), &greedy(24), &mut req),
            autoglm_status::Ok
        );
        assert_eq!(autoglm_request_next(req, &mut ev), autoglm_status::Ok);
        assert!(!ev.is_null());
        autoglm_request_free(req);
    }
}

#[test]
fn engines_serve_several_threads() {
    let e = Engine::new("glm4-tiny");
    let case = &expected("glm4-tiny")["cases"][0];
    let prompt = ids(&case["prompt_token_ids"]);
    let want = ids(&case["greedy_token_ids"]);
    struct Shared(*const autoglm_engine);
    // SAFETY: autoglm_engine is documented thread-safe; the handle outlives the scope.
    unsafe impl Sync for Shared {}
    let shared = Shared(e.0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let engine = &shared;
                let (mut ids_out, mut len) = (null_mut(), 0);
                // SAFETY: valid pointers; the engine is shared read-only.
                let status = unsafe {
                    autoglm_engine_generate(
                        engine.0,
                        prompt.as_ptr(),
                        prompt.len(),
                        &greedy(24),
                        null_mut(),
                        &mut ids_out,
                        &mut len,
                        null_mut(),
                        null_mut(),
                    )
                };
                assert_eq!(status, autoglm_status::Ok, "{}", last_error());
                // SAFETY: `len` ids, ours to free.
                unsafe {
                    assert_eq!(std::slice::from_raw_parts(ids_out, len), want);
                    autoglm_token_ids_free(ids_out);
                }
            });
        }
    });
}

#[test]
fn handles_are_as_thread_safe_as_documented() {
    fn thread_safe<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    thread_safe::<autoglm_engine>();
    thread_safe::<autoglm_tokenizer>();
    movable::<autoglm_request>();
}
