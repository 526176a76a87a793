//! The tokenizer handle: encode, decode, chat template.

use std::ffi::c_char;
use std::path::Path;

use autoglm_core::tokenizer::Tokenizer;
use serde_json::{json, Value};

use crate::engine::autoglm_engine;
use crate::ffi;
use crate::panic::{boundary, boundary_void};
use crate::status::{autoglm_status, CapiError};

/// A model's tokenizer and chat template (opaque).
///
/// Create with `autoglm_tokenizer_new` (from a model directory, without loading weights) or
/// `autoglm_engine_tokenizer`; release with `autoglm_tokenizer_free`.
///
/// Thread safety: thread-safe, like `autoglm_engine`. `autoglm_tokenizer_free` must not run
/// concurrently with another call on the same handle.
pub struct autoglm_tokenizer {
    tokenizer: Tokenizer,
}

/// One chat message for `autoglm_tokenizer_apply_chat_template`.
///
/// Ownership: owned by the caller, borrowed for the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct autoglm_chat_message {
    /// `"system"`, `"user"`, `"assistant"`, ...: NUL-terminated UTF-8.
    pub role: *const c_char,
    /// The message text: NUL-terminated UTF-8.
    pub content: *const c_char,
}

/// Loads the tokenizer of the model in `model_dir` (`tokenizer.json`, and
/// `tokenizer_config.json` / `generation_config.json` when present) without the weights.
///
/// * `model_dir`: NUL-terminated UTF-8 path; borrowed for the call.
/// * `out_tokenizer`: receives the tokenizer, owned by the caller and released with
///   `autoglm_tokenizer_free`; set to NULL on failure.
///
/// # Safety
///
/// `model_dir` is NULL or a NUL-terminated string; `out_tokenizer` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_new(
    model_dir: *const c_char,
    out_tokenizer: *mut *mut autoglm_tokenizer,
) -> autoglm_status {
    boundary("autoglm_tokenizer_new", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, dir) = unsafe {
            let mut out = ffi::out_arg(out_tokenizer, "out_tokenizer")?;
            out.write(std::ptr::null_mut());
            (out, ffi::str_arg(model_dir, "model_dir")?)
        };
        let tokenizer = Tokenizer::from_dir(Path::new(dir)).map_err(CapiError::from_load)?;
        out.write(ffi::into_handle(autoglm_tokenizer { tokenizer }));
        Ok(())
    })
}

/// The engine's tokenizer as a new handle that shares its state (cheap; no files are read).
///
/// * `engine`: borrowed for the call; the tokenizer may outlive it.
/// * `out_tokenizer`: receives the tokenizer, owned by the caller and released with
///   `autoglm_tokenizer_free`; set to NULL on failure.
///
/// # Safety
///
/// `engine` is NULL or a live engine handle; `out_tokenizer` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_tokenizer(
    engine: *const autoglm_engine,
    out_tokenizer: *mut *mut autoglm_tokenizer,
) -> autoglm_status {
    boundary("autoglm_engine_tokenizer", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, engine) = unsafe {
            let mut out = ffi::out_arg(out_tokenizer, "out_tokenizer")?;
            out.write(std::ptr::null_mut());
            (out, ffi::ref_arg(engine, "engine")?)
        };
        let tokenizer = engine.engine.tokenizer()?.clone();
        out.write(ffi::into_handle(autoglm_tokenizer { tokenizer }));
        Ok(())
    })
}

/// Frees a tokenizer handle. NULL is a no-op.
///
/// Ownership: takes `tokenizer` back from the caller.
///
/// # Safety
///
/// `tokenizer` is NULL or a handle from `autoglm_tokenizer_new` / `autoglm_engine_tokenizer`
/// that has not been freed, and no other call is using it.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_free(tokenizer: *mut autoglm_tokenizer) {
    // SAFETY: NULL or a live, unshared handle (see # Safety).
    boundary_void("autoglm_tokenizer_free", || unsafe {
        ffi::free_handle(tokenizer)
    })
}

/// Encodes `text` to token ids.
///
/// * `tokenizer`: borrowed for the call.
/// * `text`: NUL-terminated UTF-8; borrowed for the call.
/// * `add_special_tokens`: let the tokenizer's post-processor add its special tokens.
/// * `out_ids`, `out_len`: receive the ids (a non-NULL array even when `*out_len` is 0), owned by
///   the caller and released with `autoglm_token_ids_free`; NULL / 0 on failure.
///
/// # Safety
///
/// `tokenizer` is NULL or a live tokenizer handle; `text` is NULL or NUL-terminated; `out_ids`
/// and `out_len` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_encode(
    tokenizer: *const autoglm_tokenizer,
    text: *const c_char,
    add_special_tokens: bool,
    out_ids: *mut *mut u32,
    out_len: *mut usize,
) -> autoglm_status {
    boundary("autoglm_tokenizer_encode", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut ids_out, mut len_out, tok, text) = unsafe {
            let mut ids_out = ffi::out_arg(out_ids, "out_ids")?;
            let mut len_out = ffi::out_arg(out_len, "out_len")?;
            ids_out.write(std::ptr::null_mut());
            len_out.write(0);
            let tok = ffi::ref_arg(tokenizer, "tokenizer")?;
            (ids_out, len_out, tok, ffi::str_arg(text, "text")?)
        };
        let ids = tok.tokenizer.encode(text, add_special_tokens)?;
        ids_out.write(ffi::malloc_slice(&ids)?);
        len_out.write(ids.len());
        Ok(())
    })
}

/// Decodes token ids to text.
///
/// * `tokenizer`: borrowed for the call.
/// * `ids`, `len`: the ids; NULL only with `len` 0; borrowed for the call.
/// * `skip_special_tokens`: leave special tokens (such as `<|user|>`) out of the text.
/// * `out_text`: receives NUL-terminated UTF-8 text, owned by the caller and released with
///   `autoglm_string_free`; NULL on failure.
/// * `out_text_len`: NULL, or receives the text's length in bytes (without the NUL). Use it when
///   the text may contain NUL bytes.
///
/// # Safety
///
/// `tokenizer` is NULL or a live tokenizer handle; `ids` is NULL or points to `len` ids;
/// `out_text` and `out_text_len` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_decode(
    tokenizer: *const autoglm_tokenizer,
    ids: *const u32,
    len: usize,
    skip_special_tokens: bool,
    out_text: *mut *mut c_char,
    out_text_len: *mut usize,
) -> autoglm_status {
    boundary("autoglm_tokenizer_decode", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (out, tok, ids) = unsafe {
            let out = TextOut::new(out_text, out_text_len)?;
            let tok = ffi::ref_arg(tokenizer, "tokenizer")?;
            (out, tok, ffi::slice_arg(ids, len, "ids")?)
        };
        out.write(&tok.tokenizer.decode(ids, skip_special_tokens)?)
    })
}

/// Renders the model's chat template over `messages`, as `transformers`' `apply_chat_template`
/// does (the result is text; encode it with `add_special_tokens` false).
///
/// * `tokenizer`: borrowed for the call.
/// * `messages`, `len`: the conversation; borrowed for the call.
/// * `add_generation_prompt`: end with the tokens that start an assistant turn.
/// * `out_text`: receives NUL-terminated UTF-8 text, owned by the caller and released with
///   `autoglm_string_free`; NULL on failure.
///
/// Returns `AUTOGLM_STATUS_TEMPLATE` when the model has no chat template or rendering fails.
///
/// # Safety
///
/// `tokenizer` is NULL or a live tokenizer handle; `messages` is NULL or points to `len`
/// messages whose strings are NULL or NUL-terminated; `out_text` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_apply_chat_template(
    tokenizer: *const autoglm_tokenizer,
    messages: *const autoglm_chat_message,
    len: usize,
    add_generation_prompt: bool,
    out_text: *mut *mut c_char,
) -> autoglm_status {
    boundary("autoglm_tokenizer_apply_chat_template", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (out, tok, messages) = unsafe {
            let out = TextOut::new(out_text, std::ptr::null_mut())?;
            let tok = ffi::ref_arg(tokenizer, "tokenizer")?;
            (out, tok, ffi::slice_arg(messages, len, "messages")?)
        };
        let mut list = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            // SAFETY: the strings are NULL or NUL-terminated (see # Safety).
            let (role, content) = unsafe {
                (
                    ffi::str_arg(m.role, &format!("messages[{i}].role"))?,
                    ffi::str_arg(m.content, &format!("messages[{i}].content"))?,
                )
            };
            list.push(json!({ "role": role, "content": content }));
        }
        let text =
            tok.tokenizer
                .apply_chat_template(&Value::Array(list), None, add_generation_prompt)?;
        out.write(&text)
    })
}

/// Like `autoglm_tokenizer_apply_chat_template`, with the conversation as JSON so that messages
/// can carry any keys the template reads (`tool_calls`, ...), and optional tools.
///
/// * `tokenizer`: borrowed for the call.
/// * `messages_json`: a JSON array of message objects (`{"role": ..., "content": ...}`),
///   NUL-terminated UTF-8; borrowed for the call.
/// * `tools_json`: NULL, or a JSON array of tool definitions, visible to the template as `tools`.
/// * `out_text`: receives NUL-terminated UTF-8 text, owned by the caller and released with
///   `autoglm_string_free`; NULL on failure.
///
/// Malformed JSON is `AUTOGLM_STATUS_INVALID_ARGUMENT`; JSON that is not an array is
/// `AUTOGLM_STATUS_TEMPLATE`.
///
/// # Safety
///
/// `tokenizer` is NULL or a live tokenizer handle; the strings are NULL or NUL-terminated;
/// `out_text` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_apply_chat_template_json(
    tokenizer: *const autoglm_tokenizer,
    messages_json: *const c_char,
    tools_json: *const c_char,
    add_generation_prompt: bool,
    out_text: *mut *mut c_char,
) -> autoglm_status {
    boundary("autoglm_tokenizer_apply_chat_template_json", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (out, tok, messages, tools) = unsafe {
            let out = TextOut::new(out_text, std::ptr::null_mut())?;
            let tok = ffi::ref_arg(tokenizer, "tokenizer")?;
            let messages = ffi::str_arg(messages_json, "messages_json")?;
            (
                out,
                tok,
                messages,
                ffi::opt_str_arg(tools_json, "tools_json")?,
            )
        };
        let parse = |name: &str, s: &str| {
            serde_json::from_str::<Value>(s).map_err(|e| {
                CapiError::invalid_argument(format!("`{name}` is not valid JSON: {e}"))
            })
        };
        let messages = parse("messages_json", messages)?;
        let tools = tools.map(|t| parse("tools_json", t)).transpose()?;
        let text =
            tok.tokenizer
                .apply_chat_template(&messages, tools.as_ref(), add_generation_prompt)?;
        out.write(&text)
    })
}

/// The vocabulary size, added tokens included.
///
/// Ownership: `tokenizer` is borrowed for the call; `*out_size` receives a plain value (0 on
/// failure).
///
/// # Safety
///
/// `tokenizer` is NULL or a live tokenizer handle; `out_size` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_tokenizer_vocab_size(
    tokenizer: *const autoglm_tokenizer,
    out_size: *mut usize,
) -> autoglm_status {
    boundary("autoglm_tokenizer_vocab_size", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, tok) = unsafe {
            let mut out = ffi::out_arg(out_size, "out_size")?;
            out.write(0);
            (out, ffi::ref_arg(tokenizer, "tokenizer")?)
        };
        out.write(tok.tokenizer.vocab_size());
        Ok(())
    })
}

/// A `char **` (required) and `size_t *` (optional) pair that receives an owned string.
struct TextOut<'a> {
    text: ffi::Out<'a, *mut c_char>,
    len: Option<ffi::Out<'a, usize>>,
}

impl TextOut<'_> {
    /// Checks both pointers and sets them to NULL / 0.
    ///
    /// # Safety
    ///
    /// `text` and `len` are NULL or writable for the call.
    unsafe fn new(text: *mut *mut c_char, len: *mut usize) -> Result<Self, CapiError> {
        // SAFETY: forwarded contract.
        let (mut text, mut len) = unsafe {
            (
                ffi::out_arg(text, "out_text")?,
                ffi::opt_out_arg(len, "out_text_len")?,
            )
        };
        text.write(std::ptr::null_mut());
        if let Some(l) = &mut len {
            l.write(0);
        }
        Ok(TextOut { text, len })
    }

    fn write(mut self, s: &str) -> Result<(), CapiError> {
        self.text.write(ffi::malloc_str(s)?);
        if let Some(l) = &mut self.len {
            l.write(s.len());
        }
        Ok(())
    }
}
