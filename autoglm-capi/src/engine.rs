//! The engine handle.

use std::ffi::c_char;
use std::path::Path;

use autoglm_core::Engine;

use crate::ffi;
use crate::options::autoglm_engine_options;
use crate::panic::{boundary, boundary_void};
use crate::status::{autoglm_status, CapiError};

/// A loaded model with its engine thread (opaque).
///
/// Create with `autoglm_engine_new`, release with `autoglm_engine_free`.
///
/// Thread safety: thread-safe. Any number of threads may call the functions that take a
/// `const autoglm_engine *` at the same time (requests from several threads are batched
/// together). `autoglm_engine_free` must not run concurrently with any other call on the handle.
pub struct autoglm_engine {
    pub(crate) engine: Engine,
}

/// Loads the checkpoint in `model_dir` (`config.json`, `*.safetensors`, `tokenizer.json`, ...)
/// and starts its engine thread.
///
/// * `model_dir`: NUL-terminated UTF-8 path; borrowed for the call.
/// * `options`: NULL for the defaults, else initialise with `autoglm_engine_options_default()`
///   and change fields; borrowed for the call.
/// * `out_engine`: receives the new engine, owned by the caller and released with
///   `autoglm_engine_free`; set to NULL on failure.
///
/// Returns `AUTOGLM_STATUS_MODEL_LOAD` for a missing or bad model directory,
/// `AUTOGLM_STATUS_INVALID_CONFIG` for bad options (`AUTOGLM_STATUS_INVALID_ARGUMENT` for an
/// option that is not valid JSON), `AUTOGLM_STATUS_CUDA_UNAVAILABLE` when a CUDA device is asked
/// for but cannot be used.
///
/// # Safety
///
/// `model_dir` and the strings of `options` (`device`, `limit_mm_per_prompt`, ...) are NULL or
/// NUL-terminated; `options` is NULL or points to an `autoglm_engine_options` whose
/// `compute_cores` holds `num_compute_cores` entries; `out_engine` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_new(
    model_dir: *const c_char,
    options: *const autoglm_engine_options,
    out_engine: *mut *mut autoglm_engine,
) -> autoglm_status {
    boundary("autoglm_engine_new", || {
        // SAFETY: each pointer is NULL or valid as the # Safety section requires.
        let (mut out, dir, options) = unsafe {
            let mut out = ffi::out_arg(out_engine, "out_engine")?;
            out.write(std::ptr::null_mut());
            let dir = ffi::str_arg(model_dir, "model_dir")?;
            (out, dir, ffi::opt_sized_arg(options, "options")?)
        };
        let config = match options {
            // SAFETY: `options` points to valid options (see # Safety).
            Some(o) => unsafe { o.to_config() }?,
            None => Default::default(),
        };
        config.validate().map_err(CapiError::from_load)?;
        let engine = Engine::from_dir(Path::new(dir), config).map_err(CapiError::from_load)?;
        out.write(ffi::into_handle(autoglm_engine { engine }));
        Ok(())
    })
}

/// Stops the engine thread (requests still running end with `AUTOGLM_STATUS_ENGINE_SHUTDOWN`),
/// frees the model and the handle. Blocks until the engine thread has exited. NULL is a no-op.
///
/// Ownership: takes `engine` back from the caller. Tokenizers from `autoglm_engine_tokenizer` and
/// requests from `autoglm_request_new` stay valid and are freed separately.
///
/// # Safety
///
/// `engine` is NULL or a handle from `autoglm_engine_new` that has not been freed, and no other
/// call is using it.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_free(engine: *mut autoglm_engine) {
    // SAFETY: NULL or a live, unshared handle from autoglm_engine_new (see # Safety).
    boundary_void("autoglm_engine_free", || unsafe {
        ffi::free_handle(engine)
    })
}

/// The longest sequence (prompt plus generated tokens) the engine accepts, in tokens.
///
/// Ownership: `engine` is borrowed for the call; `*out_len` receives a plain value (0 on
/// failure).
///
/// # Safety
///
/// `engine` is NULL or a live engine handle; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn autoglm_engine_max_model_len(
    engine: *const autoglm_engine,
    out_len: *mut usize,
) -> autoglm_status {
    boundary("autoglm_engine_max_model_len", || {
        // SAFETY: NULL or valid pointers (see # Safety).
        let (mut out, engine) = unsafe {
            let mut out = ffi::out_arg(out_len, "out_len")?;
            out.write(0);
            (out, ffi::ref_arg(engine, "engine")?)
        };
        out.write(engine.engine.max_model_len());
        Ok(())
    })
}
