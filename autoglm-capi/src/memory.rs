//! Freeing the strings and arrays the library hands out (allocated by `ffi`).

use std::ffi::c_char;

use crate::{ffi, panic};

/// Frees a string returned by this library (`autoglm_engine_generate`,
/// `autoglm_tokenizer_decode`, `autoglm_tokenizer_apply_chat_template`, ...). NULL is a no-op.
///
/// Ownership: takes `s` back from the caller. Leaves `autoglm_last_error` unchanged.
///
/// # Safety
///
/// `s` is NULL or a string returned by this library that has not been freed yet.
#[no_mangle]
pub unsafe extern "C" fn autoglm_string_free(s: *mut c_char) {
    // SAFETY: the caller passes NULL or a live string this library allocated (see # Safety).
    panic::boundary_void("autoglm_string_free", || unsafe { ffi::malloc_free(s) })
}

/// Frees a token-id array returned by this library (`autoglm_engine_generate`,
/// `autoglm_tokenizer_encode`). NULL is a no-op.
///
/// Ownership: takes `ids` back from the caller. Leaves `autoglm_last_error` unchanged.
///
/// # Safety
///
/// `ids` is NULL or an array returned by this library that has not been freed yet.
#[no_mangle]
pub unsafe extern "C" fn autoglm_token_ids_free(ids: *mut u32) {
    // SAFETY: the caller passes NULL or a live array this library allocated (see # Safety).
    panic::boundary_void("autoglm_token_ids_free", || unsafe {
        ffi::malloc_free(ids)
    })
}
