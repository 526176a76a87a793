//! Chat with images: `autoglm_engine_chat` (blocking), `autoglm_engine_chat_stream` (callback)
//! and `autoglm_request_new_chat` (pulled), the chat counterparts of the three generate calls.
//!
//! The conversation comes as OpenAI-style JSON messages; images come as encoded file bytes beside
//! it, one per `{"type": "image"}` part without a source, in order (transformers' processor
//! convention), or inline in the messages as `data:` URLs. The calling thread renders the chat
//! template and copies the image bytes; the engine's image threads decode and preprocess them
//! before the request is submitted, so the call has finished with every buffer when it returns.

use std::ffi::{c_char, c_void};

use autoglm_core::engine::{collect, ImageInput};
use autoglm_core::RequestStream;
use serde_json::Value;

use crate::engine::autoglm_engine;
use crate::ffi;
use crate::generate::{
    autoglm_event_callback, autoglm_finish_reason, autoglm_request, autoglm_usage, check_single,
    required_callback, run_stream, BlockingOutputs,
};
use crate::options::autoglm_sampling_params;
use crate::panic::boundary;
use crate::status::{autoglm_status, CapiError};

/// One encoded image for the chat calls: the bytes of a PNG, JPEG or WebP file, as read from
/// disk or received (not decoded pixels).
///
/// Ownership: owned by the caller. `data` is borrowed for the duration of the call it is passed
/// to and only then: the library copies the `len` bytes before that call returns and keeps no
/// pointer into them, so the buffer may be freed or reused as soon as the call returns (for
/// `autoglm_request_new_chat` too, before its events are read). Thread safety: plain data.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct autoglm_image {
    /// The file's bytes (`len` of them); NULL only when `len` is 0 (which is then an image that
    /// fails to decode).
    pub data: *const u8,
    /// Length of `data` in bytes.
    pub len: usize,
}

/// Checks the arguments, renders the chat, preprocesses its images and submits the request.
///
/// # Safety
///
/// As the `# Safety` sections of the entry points: each pointer NULL or valid for the call.
unsafe fn submit_chat(
    engine: *const autoglm_engine,
    messages_json: *const c_char,
    tools_json: *const c_char,
    images: *const autoglm_image,
    images_len: usize,
    params: *const autoglm_sampling_params,
) -> Result<(RequestStream, usize), CapiError> {
    // SAFETY: forwarded contract.
    let (engine, messages, tools, bufs, params) = unsafe {
        let engine = ffi::ref_arg(engine, "engine")?;
        let messages = ffi::str_arg(messages_json, "messages_json")?;
        let tools = ffi::opt_str_arg(tools_json, "tools_json")?;
        let bufs = ffi::slice_arg(images, images_len, "images")?;
        let params = match ffi::opt_sized_arg(params, "params")? {
            Some(p) => p.to_params()?,
            None => Default::default(),
        };
        (engine, messages, tools, bufs, params)
    };
    let parse = |name: &str, s: &str| {
        serde_json::from_str::<Value>(s)
            .map_err(|e| CapiError::invalid_argument(format!("`{name}` is not valid JSON: {e}")))
    };
    let messages = parse("messages_json", messages)?;
    let tools = tools.map(|t| parse("tools_json", t)).transpose()?;
    let given = bufs
        .iter()
        .enumerate()
        .map(|(i, im)| {
            // SAFETY: each entry's `data` is NULL or holds `len` bytes (forwarded contract).
            let bytes = unsafe { ffi::slice_arg(im.data, im.len, &format!("images[{i}].data")) }?;
            Ok(ImageInput::Encoded(bytes.to_vec()))
        })
        .collect::<Result<Vec<_>, CapiError>>()?;
    let n = params.n;
    let chat = engine
        .engine
        .render_chat(&messages, tools.as_ref(), true, given)?;
    let stream = engine
        .engine
        .submit_with_images(chat.prompt, &chat.images, params)?;
    Ok((stream, n))
}

/// Chats: renders `messages_json` through the model's chat template (with the tokens that start
/// the assistant's turn), preprocesses its images, generates one completion and waits for it.
///
/// * `engine`: borrowed for the call.
/// * `messages_json`: the conversation, a JSON array of OpenAI-style messages, NUL-terminated
///   UTF-8; borrowed for the call. A message's `content` is a string or a list of parts:
///   `{"type": "text", "text": "..."}`, `{"type": "image"}` (takes the next of `images`, in
///   order), or `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
///   (a local path or `file://` URL only under `options->allowed_local_media_path`; no remote
///   URLs). How lists reach the template is `options->chat_template_content_format`.
/// * `tools_json`: NULL, or a JSON array of tool definitions, visible to the template as `tools`.
/// * `images`, `images_len`: the images of the `{"type": "image"}` parts, one each, in order;
///   NULL only with `images_len` 0. The array and every buffer it points to are borrowed for the
///   call only: the bytes are copied before the call returns (see `autoglm_image`).
/// * `params`, `out_text`, `out_token_ids`, `out_token_ids_len`, `out_finish_reason`,
///   `out_usage`: as for `autoglm_engine_generate` (`n` must be 1; the outputs are owned by the
///   caller and released with `autoglm_string_free` / `autoglm_token_ids_free`; all set to
///   NULL / 0 on failure). `out_usage->prompt_tokens` counts each image's tokens.
///
/// Malformed JSON, or a NULL buffer with a non-zero length, is `AUTOGLM_STATUS_INVALID_ARGUMENT`;
/// bytes that are not a decodable image, images for a model that takes none (a text-only GLM),
/// more or fewer images than the messages' sourceless image parts, more than
/// `options->limit_mm_per_prompt`, or malformed messages are `AUTOGLM_STATUS_INVALID_REQUEST`,
/// the message naming the image by its index; a template failure is `AUTOGLM_STATUS_TEMPLATE`.
/// Text-only conversations work with any model.
///
/// Blocks the calling thread (image preprocessing runs on the engine's image threads meanwhile);
/// other threads may use the engine at the same time.
///
/// # Safety
///
/// `engine` is NULL or a live engine handle; the strings are NULL or NUL-terminated; `images`
/// is NULL or points to `images_len` entries whose `data` is NULL or points to `len` bytes;
/// `params` is NULL or valid as its fields document; each output is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_chat(
    engine: *const autoglm_engine,
    messages_json: *const c_char,
    tools_json: *const c_char,
    images: *const autoglm_image,
    images_len: usize,
    params: *const autoglm_sampling_params,
    out_text: *mut *mut c_char,
    out_token_ids: *mut *mut u32,
    out_token_ids_len: *mut usize,
    out_finish_reason: *mut autoglm_finish_reason,
    out_usage: *mut autoglm_usage,
) -> autoglm_status {
    boundary("autoglm_engine_chat", || {
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
                "autoglm_engine_chat_stream or autoglm_request_new_chat",
            )
        }?;
        // SAFETY: as above.
        let (stream, n) = unsafe {
            submit_chat(
                engine,
                messages_json,
                tools_json,
                images,
                images_len,
                params,
            )
        }?;
        outs.write(collect(stream, n)?)
    })
}

/// Chats and calls `callback` with each event as it arrives, on the calling thread; returns when
/// the request has finished or `callback` returned false.
///
/// * `engine`, `messages_json`, `tools_json`, `images`, `images_len`, `params`: as for
///   `autoglm_engine_chat`, except that any `n` is allowed. The image buffers are copied before
///   the first event, so they may be released from inside the callback.
/// * `callback`, `user_data`: as for `autoglm_engine_generate_stream` (false cancels the request
///   and this function returns `AUTOGLM_STATUS_CANCELLED`).
///
/// Ownership: every argument is borrowed for the call; the events are borrowed from the library
/// for the duration of each callback.
///
/// # Safety
///
/// As `autoglm_engine_chat` for the shared arguments; `callback` is NULL or a function that is
/// safe to call with these arguments and does not unwind.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_chat_stream(
    engine: *const autoglm_engine,
    messages_json: *const c_char,
    tools_json: *const c_char,
    images: *const autoglm_image,
    images_len: usize,
    params: *const autoglm_sampling_params,
    callback: autoglm_event_callback,
    user_data: *mut c_void,
) -> autoglm_status {
    boundary("autoglm_engine_chat_stream", || {
        let callback = required_callback(callback)?;
        // SAFETY: the inputs are NULL or valid (see # Safety).
        let (stream, _) = unsafe {
            submit_chat(
                engine,
                messages_json,
                tools_json,
                images,
                images_len,
                params,
            )
        }?;
        // SAFETY: `callback` is valid and does not unwind (see # Safety).
        unsafe { run_stream(stream, callback, user_data) }
    })
}

/// Renders the chat, preprocesses its images, submits the request and returns; read its events
/// with `autoglm_request_next`. Blocks only until the images are preprocessed.
///
/// * `engine`, `messages_json`, `tools_json`, `images`, `images_len`, `params`: as for
///   `autoglm_engine_chat_stream`; all borrowed for the call (the image bytes are copied before
///   it returns).
/// * `out_request`: receives the request, owned by the caller and released with
///   `autoglm_request_free`; NULL on failure.
///
/// # Safety
///
/// As `autoglm_engine_chat`; `out_request` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_request_new_chat(
    engine: *const autoglm_engine,
    messages_json: *const c_char,
    tools_json: *const c_char,
    images: *const autoglm_image,
    images_len: usize,
    params: *const autoglm_sampling_params,
    out_request: *mut *mut autoglm_request,
) -> autoglm_status {
    boundary("autoglm_request_new_chat", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, (stream, _)) = unsafe {
            let mut out = ffi::out_arg(out_request, "out_request")?;
            out.write(std::ptr::null_mut());
            (
                out,
                submit_chat(
                    engine,
                    messages_json,
                    tools_json,
                    images,
                    images_len,
                    params,
                )?,
            )
        };
        out.write(autoglm_request::new_handle(stream));
        Ok(())
    })
}
