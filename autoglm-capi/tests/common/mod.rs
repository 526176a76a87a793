//! Helpers shared by the tests that drive the C ABI from Rust, exactly as a C caller would.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::ptr::null_mut;

use autoglm::*;
use serde_json::Value;

pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

pub(crate) fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub(crate) fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub(crate) fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub(crate) fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated, valid until the next status-returning call here.
    unsafe { CStr::from_ptr(autoglm_last_error()) }
        .to_str()
        .unwrap()
        .to_owned()
}

/// Asserts `status` and that the message mentions every one of `words`.
#[track_caller]
pub(crate) fn assert_err(status: autoglm_status, want: autoglm_status, words: &[&str]) {
    let msg = last_error();
    assert_eq!(status, want, "message: {msg}");
    assert!(!msg.is_empty());
    for w in words {
        assert!(msg.contains(w), "{msg:?} does not mention {w:?}");
    }
}

/// An engine handle freed on drop.
pub(crate) struct Engine(pub(crate) *mut autoglm_engine);

impl Engine {
    pub(crate) fn new(name: &str) -> Engine {
        Engine::with(name, |_| {})
    }

    /// An engine on the CPU with the test defaults, then `f` applied to its options.
    pub(crate) fn with(name: &str, f: impl FnOnce(&mut autoglm_engine_options)) -> Engine {
        let dir = cstr(fixture(name).to_str().unwrap());
        let mut opts = autoglm_engine_options_default();
        opts.device = c"cpu".as_ptr();
        opts.kv_cache_mb = 16;
        opts.num_threads = 2;
        f(&mut opts);
        let mut e = null_mut();
        // SAFETY: valid strings, options and out pointer.
        let status = unsafe { autoglm_engine_new(dir.as_ptr(), &opts, &mut e) };
        assert_eq!(status, autoglm_status::Ok, "{}", last_error());
        assert!(!e.is_null());
        Engine(e)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { autoglm_engine_free(self.0) }
    }
}

pub(crate) fn greedy(max_tokens: u32) -> autoglm_sampling_params {
    autoglm_sampling_params {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..autoglm_sampling_params_default()
    }
}

pub(crate) fn generate(
    e: &Engine,
    prompt: &[u32],
    params: &autoglm_sampling_params,
) -> (Vec<u32>, String) {
    let (mut text, mut out_ids, mut len) = (null_mut(), null_mut(), 0);
    let mut reason = autoglm_finish_reason::None;
    let mut usage = autoglm_usage::default();
    // SAFETY: all pointers valid for the call.
    let status = unsafe {
        autoglm_engine_generate(
            e.0,
            prompt.as_ptr(),
            prompt.len(),
            params,
            &mut text,
            &mut out_ids,
            &mut len,
            &mut reason,
            &mut usage,
        )
    };
    assert_eq!(status, autoglm_status::Ok, "{}", last_error());
    assert_eq!(reason, autoglm_finish_reason::Length);
    assert_eq!(usage.prompt_tokens, prompt.len());
    assert_eq!(usage.completion_tokens, len);
    // SAFETY: `out_ids` holds `len` ids and `text` is a C string, both ours to free.
    unsafe {
        let got = std::slice::from_raw_parts(out_ids, len).to_vec();
        let s = CStr::from_ptr(text).to_str().unwrap().to_owned();
        autoglm_token_ids_free(out_ids);
        autoglm_string_free(text);
        (got, s)
    }
}
