//! Chat with images through the C ABI: the Glm4v fixture's cases (messages with
//! `{"type": "image"}` parts, images as encoded byte buffers) give transformers' greedy tokens,
//! blocking, streamed and pulled; the multimodal engine options; and the error paths (bad JSON,
//! bad image bytes, images for a text-only model, count mismatches, NULL buffers).

mod common;

use std::ffi::{c_char, c_void};
use std::ptr::{null, null_mut};

use autoglm::*;
use common::*;
use serde_json::{json, Value};

const VISION: &str = "glm4v-tiny";

/// A case's messages with each `image_url` part turned into a sourceless `{"type": "image"}`
/// part, and the bytes of those images, in order.
fn given_images(case: &Value) -> (String, Vec<Vec<u8>>) {
    let mut messages = case["messages"].clone();
    let mut images = Vec::new();
    for m in messages.as_array_mut().unwrap() {
        let Some(parts) = m["content"].as_array_mut() else {
            continue;
        };
        for part in parts {
            if part["type"] == "image_url" {
                let file = part["image_url"]["url"].as_str().unwrap();
                images.push(std::fs::read(fixture(VISION).join(file)).unwrap());
                *part = json!({"type": "image"});
            }
        }
    }
    (messages.to_string(), images)
}

fn buffers(images: &[Vec<u8>]) -> Vec<autoglm_image> {
    images
        .iter()
        .map(|b| autoglm_image {
            data: b.as_ptr(),
            len: b.len(),
        })
        .collect()
}

fn case(name: &str) -> Value {
    expected(VISION)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone()
}

/// An engine on the Glm4v fixture whose content format is the case's.
fn engine_for(case: &Value) -> Engine {
    let format = cstr(case["content_format"].as_str().unwrap());
    Engine::with(VISION, |o| o.chat_template_content_format = format.as_ptr())
}

struct Chat {
    status: autoglm_status,
    ids: Vec<u32>,
    text: Option<String>,
    reason: autoglm_finish_reason,
    usage: autoglm_usage,
}

fn chat(
    e: &Engine,
    messages: &str,
    images: &[autoglm_image],
    params: &autoglm_sampling_params,
) -> Chat {
    let messages = cstr(messages);
    chat_raw(e, messages.as_ptr(), images.as_ptr(), images.len(), params)
}

fn chat_raw(
    e: &Engine,
    messages: *const c_char,
    images: *const autoglm_image,
    images_len: usize,
    params: &autoglm_sampling_params,
) -> Chat {
    let (mut text, mut out_ids, mut len) = (std::ptr::dangling_mut(), std::ptr::dangling_mut(), 7);
    let mut reason = autoglm_finish_reason::Stop;
    let mut usage = autoglm_usage {
        prompt_tokens: 9,
        ..Default::default()
    };
    // SAFETY: all pointers valid for the call (or deliberately NULL with the matching length).
    let status = unsafe {
        autoglm_engine_chat(
            e.0,
            messages,
            null(),
            images,
            images_len,
            params,
            &mut text,
            &mut out_ids,
            &mut len,
            &mut reason,
            &mut usage,
        )
    };
    if status != autoglm_status::Ok {
        assert!(
            text.is_null() && out_ids.is_null() && len == 0,
            "outputs cleared"
        );
        assert_eq!(reason, autoglm_finish_reason::None);
        assert_eq!(usage, autoglm_usage::default());
        return Chat {
            status,
            ids: Vec::new(),
            text: None,
            reason,
            usage,
        };
    }
    // SAFETY: `out_ids` holds `len` ids and `text` is a C string, both ours to free.
    unsafe {
        let ids = std::slice::from_raw_parts(out_ids, len).to_vec();
        let s = std::ffi::CStr::from_ptr(text).to_str().unwrap().to_owned();
        autoglm_token_ids_free(out_ids);
        autoglm_string_free(text);
        Chat {
            status,
            ids,
            text: Some(s),
            reason,
            usage,
        }
    }
}

#[test]
fn chat_with_given_images_matches_the_fixture_cases() {
    for name in [
        "screen_openai",
        "agent_step_string",
        "two_images_interleaved",
        "text_only",
    ] {
        let case = case(name);
        let e = engine_for(&case);
        let (messages, images) = given_images(&case);
        let want = ids(&case["greedy_token_ids"]);
        let out = chat(&e, &messages, &buffers(&images), &greedy(want.len() as u32));
        assert_eq!(out.status, autoglm_status::Ok, "{name}: {}", last_error());
        assert_eq!(out.ids, want, "{name}");
        assert!(out.text.is_some());
        assert_eq!(out.reason, autoglm_finish_reason::Length);
        assert_eq!(
            out.usage.prompt_tokens,
            case["input_ids"].as_array().unwrap().len(),
            "{name}: prompt tokens count the image tokens"
        );
        assert_eq!(out.usage.completion_tokens, want.len());
    }
}

#[test]
fn the_buffers_are_copied_before_the_call_returns() {
    let case = case("screen_openai");
    let e = engine_for(&case);
    let (messages, images) = given_images(&case);
    let want = ids(&case["greedy_token_ids"]);
    let messages = cstr(&messages);
    // Pulled: the request is submitted, then the caller's buffers are overwritten and freed
    // before a single event is read.
    let mut copy = images[0].clone();
    let bufs = [autoglm_image {
        data: copy.as_ptr(),
        len: copy.len(),
    }];
    let mut req = null_mut();
    // SAFETY: valid pointers for the call.
    let s = unsafe {
        autoglm_request_new_chat(
            e.0,
            messages.as_ptr(),
            null(),
            bufs.as_ptr(),
            1,
            &greedy(want.len() as u32),
            &mut req,
        )
    };
    assert_eq!(s, autoglm_status::Ok, "{}", last_error());
    copy.fill(0);
    drop(copy);
    let mut got = Vec::new();
    loop {
        let mut ev = null();
        // SAFETY: a live request; `ev` is read before the next call.
        let s = unsafe { autoglm_request_next(req, &mut ev) };
        assert_eq!(s, autoglm_status::Ok, "{}", last_error());
        if ev.is_null() {
            break;
        }
        // SAFETY: the event's ids hold token_ids_len entries until the next call.
        unsafe {
            let ev = &*ev;
            if ev.token_ids_len > 0 {
                got.extend_from_slice(std::slice::from_raw_parts(ev.token_ids, ev.token_ids_len));
            }
        }
    }
    // SAFETY: freed once.
    unsafe { autoglm_request_free(req) };
    assert_eq!(got, want);
}

struct Streamed {
    tokens: Vec<u32>,
    stop_after: usize,
    prompt_tokens: usize,
}

unsafe extern "C" fn on_event(ev: *const autoglm_event, user_data: *mut c_void) -> bool {
    // SAFETY: the library passes a valid event; user_data is the `Streamed` given below.
    let (ev, st) = unsafe { (&*ev, &mut *user_data.cast::<Streamed>()) };
    // SAFETY: the arrays hold the stated lengths during the callback.
    unsafe {
        if ev.token_ids_len > 0 {
            st.tokens
                .extend_from_slice(std::slice::from_raw_parts(ev.token_ids, ev.token_ids_len));
        }
        if !ev.usage.is_null() {
            st.prompt_tokens = (*ev.usage).prompt_tokens;
        }
    }
    st.stop_after == 0 || st.tokens.len() < st.stop_after
}

#[test]
fn streamed_chat_gives_the_same_tokens_and_can_be_cancelled() {
    let case = case("two_images_interleaved");
    let e = engine_for(&case);
    let (messages, images) = given_images(&case);
    let messages = cstr(&messages);
    let bufs = buffers(&images);
    let want = ids(&case["greedy_token_ids"]);
    for stop_after in [0, 3] {
        let mut st = Streamed {
            tokens: Vec::new(),
            stop_after,
            prompt_tokens: 0,
        };
        // SAFETY: valid pointers; `st` outlives the call.
        let s = unsafe {
            autoglm_engine_chat_stream(
                e.0,
                messages.as_ptr(),
                null(),
                bufs.as_ptr(),
                bufs.len(),
                &greedy(want.len() as u32),
                Some(on_event),
                (&raw mut st).cast(),
            )
        };
        if stop_after == 0 {
            assert_eq!(s, autoglm_status::Ok, "{}", last_error());
            assert_eq!(st.tokens, want);
            assert_eq!(st.prompt_tokens, 47);
        } else {
            assert_err(
                s,
                autoglm_status::Cancelled,
                &["autoglm_engine_chat_stream"],
            );
            assert!(st.tokens.len() >= 3 && st.tokens[..3] == want[..3]);
        }
    }
    // SAFETY: a NULL callback is reported before anything is read.
    let s = unsafe {
        autoglm_engine_chat_stream(
            e.0,
            messages.as_ptr(),
            null(),
            bufs.as_ptr(),
            bufs.len(),
            null(),
            None,
            null_mut(),
        )
    };
    assert_err(s, autoglm_status::InvalidArgument, &["`callback` is NULL"]);
}

#[test]
fn text_only_chat_works_on_a_text_model() {
    let e = Engine::new("glm4-tiny");
    let messages = r#"[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]"#;
    let out = chat(&e, messages, &[], &greedy(8));
    assert_eq!(out.status, autoglm_status::Ok, "{}", last_error());
    // The same as generating from the template's rendering of the string content.
    let tok = {
        let mut t = null_mut();
        // SAFETY: live engine, writable out pointer.
        let s = unsafe { autoglm_engine_tokenizer(e.0, &mut t) };
        assert_eq!(s, autoglm_status::Ok);
        t
    };
    let (mut text, mut prompt, mut len) = (null_mut(), null_mut(), 0);
    // SAFETY: valid pointers; the outputs are freed below.
    let prompt = unsafe {
        let s = autoglm_tokenizer_apply_chat_template_json(
            tok,
            c"[{\"role\": \"user\", \"content\": \"Hello\"}]".as_ptr(),
            null(),
            true,
            &mut text,
        );
        assert_eq!(s, autoglm_status::Ok, "{}", last_error());
        let s = autoglm_tokenizer_encode(tok, text, false, &mut prompt, &mut len);
        assert_eq!(s, autoglm_status::Ok, "{}", last_error());
        let v = std::slice::from_raw_parts(prompt, len).to_vec();
        autoglm_token_ids_free(prompt);
        autoglm_string_free(text);
        autoglm_tokenizer_free(tok);
        v
    };
    let (want, _) = generate(&e, &prompt, &greedy(8));
    assert_eq!(out.ids, want);
    assert_eq!(out.usage.prompt_tokens, prompt.len());
}

#[test]
fn chat_errors_name_the_problem() {
    let case = case("screen_openai");
    let e = engine_for(&case);
    let (messages, images) = given_images(&case);
    let bufs = buffers(&images);
    let p = greedy(2);
    let png = &images[0];

    let out = chat(&e, "[{\"role\": \"user\"", &bufs, &p);
    assert_err(
        out.status,
        autoglm_status::InvalidArgument,
        &["autoglm_engine_chat", "`messages_json` is not valid JSON"],
    );
    let out = chat(&e, "{}", &bufs, &p);
    assert_err(out.status, autoglm_status::InvalidRequest, &["messages"]);
    let out = chat_raw(&e, null(), bufs.as_ptr(), 1, &p);
    assert_err(
        out.status,
        autoglm_status::InvalidArgument,
        &["`messages_json` is NULL"],
    );

    // Bad image bytes: truncated, empty, not an image at all.
    let truncated = [autoglm_image {
        data: png.as_ptr(),
        len: png.len() / 2,
    }];
    let out = chat(&e, &messages, &truncated, &p);
    assert_err(out.status, autoglm_status::InvalidRequest, &["image 0"]);
    let empty = [autoglm_image {
        data: null(),
        len: 0,
    }];
    let out = chat(&e, &messages, &empty, &p);
    assert_err(out.status, autoglm_status::InvalidRequest, &["image 0"]);
    let text = b"hello, not a picture";
    let junk = [autoglm_image {
        data: text.as_ptr(),
        len: text.len(),
    }];
    let out = chat(&e, &messages, &junk, &p);
    assert_err(out.status, autoglm_status::InvalidRequest, &["image 0"]);

    // NULL pointers with a length.
    let out = chat_raw(&e, cstr(&messages).as_ptr(), null(), 1, &p);
    assert_err(
        out.status,
        autoglm_status::InvalidArgument,
        &["`images` is NULL but its length is 1"],
    );
    let null_data = [autoglm_image {
        data: null(),
        len: 10,
    }];
    let out = chat(&e, &messages, &null_data, &p);
    assert_err(
        out.status,
        autoglm_status::InvalidArgument,
        &["`images[0].data` is NULL but its length is 10"],
    );

    // Count mismatches.
    let out = chat(&e, &messages, &[], &p);
    assert_err(
        out.status,
        autoglm_status::InvalidRequest,
        &["image 0", "0 image(s) were given"],
    );
    let two = [bufs[0], bufs[0]];
    let out = chat(&e, &messages, &two, &p);
    assert_err(
        out.status,
        autoglm_status::InvalidRequest,
        &["2 image(s) were given"],
    );

    // One completion only from the blocking call.
    let mut n2 = p;
    n2.n = 2;
    let out = chat(&e, &messages, &bufs, &n2);
    assert_err(
        out.status,
        autoglm_status::InvalidRequest,
        &["params->n = 2", "autoglm_engine_chat_stream"],
    );

    // Remote URLs are not fetched; local files need allowed_local_media_path.
    let remote = r#"[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]"#;
    let out = chat(&e, remote, &[], &p);
    assert_err(out.status, autoglm_status::InvalidRequest, &["remote"]);
    let path = fixture(VISION).join("screen.png");
    let local = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": path.to_str().unwrap()}},
        {"type": "text", "text": "What is on this screen?"}]}])
    .to_string();
    let out = chat(&e, &local, &[], &p);
    assert_err(out.status, autoglm_status::InvalidRequest, &["local files"]);

    // An image for a text-only model.
    let text_model = Engine::new("glm4-tiny");
    let out = chat(&text_model, &messages, &bufs, &p);
    assert_err(
        out.status,
        autoglm_status::InvalidRequest,
        &["does not take images"],
    );
}

#[test]
fn multimodal_engine_options() {
    let case = case("screen_openai");
    let (messages, images) = given_images(&case);
    let bufs = buffers(&images);
    let want = ids(&case["greedy_token_ids"]);

    // A limit of 0 images rejects the request.
    let e = Engine::with(VISION, |o| {
        o.limit_mm_per_prompt = c"{\"image\": 0}".as_ptr()
    });
    let out = chat(&e, &messages, &bufs, &greedy(2));
    assert_err(out.status, autoglm_status::InvalidRequest, &["at most 0"]);
    drop(e);

    // Local files under the allowed directory, in the openai content format.
    let dir = cstr(fixture(VISION).to_str().unwrap());
    let e = Engine::with(VISION, |o| {
        o.limit_mm_per_prompt = c"{\"image\": 1, \"video\": 0}".as_ptr();
        o.allowed_local_media_path = dir.as_ptr();
        o.chat_template_content_format = c"openai".as_ptr();
        o.mm_processor_kwargs =
            c"{\"size\": {\"shortest_edge\": 6272, \"longest_edge\": 18816}}".as_ptr();
    });
    let path = fixture(VISION).join("screen.png");
    let local = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("file://{}", path.display())}},
        {"type": "text", "text": "What is on this screen?"}]}])
    .to_string();
    let out = chat(&e, &local, &[], &greedy(want.len() as u32));
    assert_eq!(out.status, autoglm_status::Ok, "{}", last_error());
    assert_eq!(out.ids, want);
    drop(e);

    // A smaller pixel budget changes the image's token count.
    let e = Engine::with(VISION, |o| {
        o.chat_template_content_format = c"openai".as_ptr();
        o.mm_processor_kwargs = c"{\"max_pixels\": 6272, \"min_pixels\": 3136}".as_ptr();
    });
    let out = chat(&e, &messages, &bufs, &greedy(1));
    assert_eq!(out.status, autoglm_status::Ok, "{}", last_error());
    assert!(out.usage.prompt_tokens < 34, "{}", out.usage.prompt_tokens);
    drop(e);

    // Bad option values.
    let dir = cstr(fixture(VISION).to_str().unwrap());
    let load = |f: &dyn Fn(&mut autoglm_engine_options)| {
        let mut o = autoglm_engine_options_default();
        o.device = c"cpu".as_ptr();
        o.kv_cache_mb = 16;
        f(&mut o);
        let mut e = null_mut();
        // SAFETY: valid strings, options and out pointer.
        let s = unsafe { autoglm_engine_new(dir.as_ptr(), &o, &mut e) };
        // SAFETY: NULL or a live handle.
        unsafe { autoglm_engine_free(e) };
        s
    };
    let s = load(&|o| o.limit_mm_per_prompt = c"{image: 1}".as_ptr());
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["options->limit_mm_per_prompt", "not valid JSON"],
    );
    let s = load(&|o| o.limit_mm_per_prompt = c"{\"video\": 2}".as_ptr());
    assert_err(
        s,
        autoglm_status::InvalidConfig,
        &["limit_mm_per_prompt", "video"],
    );
    let s = load(&|o| o.mm_processor_kwargs = c"{\"max_pixels\": 0}".as_ptr());
    assert_err(
        s,
        autoglm_status::InvalidConfig,
        &["mm_processor_kwargs", "max_pixels"],
    );
    let s = load(&|o| o.mm_processor_kwargs = c"[1]".as_ptr());
    assert_err(s, autoglm_status::InvalidConfig, &["mm_processor_kwargs"]);
    let s = load(&|o| o.chat_template_content_format = c"xml".as_ptr());
    assert_err(
        s,
        autoglm_status::InvalidConfig,
        &["chat_template_content_format", "xml"],
    );
    let s = load(&|o| o.allowed_local_media_path = c"/nonexistent/media".as_ptr());
    assert_err(
        s,
        autoglm_status::InvalidConfig,
        &["allowed_local_media_path", "/nonexistent/media"],
    );
    let s = load(&|o| o.chat_template_content_format = c"op\xffen".as_ptr());
    assert_err(
        s,
        autoglm_status::InvalidArgument,
        &["options->chat_template_content_format", "UTF-8"],
    );
}
