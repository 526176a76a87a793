//! Status codes, the error type behind them, and the mapping from `autoglm_core::Error`.

use std::ffi::{c_char, c_int};

use autoglm_core::Error;

/// What a fallible call did. `AUTOGLM_STATUS_OK` is 0; on anything else `autoglm_last_error()`
/// says what went wrong. The values are stable; new codes may be added at the end.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum autoglm_status {
    /// Success.
    Ok = 0,
    /// An argument is NULL where a value is required, is not valid UTF-8, or is malformed (bad
    /// JSON, a pointer/length pair that does not agree). The message names the parameter.
    InvalidArgument = 1,
    /// The model directory could not be loaded: a missing or malformed `config.json`, weights or
    /// `tokenizer.json`, an unsupported architecture.
    ModelLoad = 2,
    /// An engine option is out of range or inconsistent (block size 0, an unknown device string, a
    /// KV cache larger than free memory, a core outside the process's CPU set).
    InvalidConfig = 3,
    /// A request was rejected: an empty prompt, a token id outside the vocabulary, a prompt longer
    /// than the context, a sampling parameter out of range, malformed chat messages, an image
    /// that cannot be decoded (or one given to a model that takes none, or more or fewer images
    /// than the messages' image parts). The message names the field, value or image.
    InvalidRequest = 4,
    /// The tokenizer failed to encode or decode.
    Tokenizer = 5,
    /// The chat template failed to render (or the model has none).
    Template = 6,
    /// A CUDA device was asked for but cannot be used (no driver, no device, or no CUDA backend
    /// in this build).
    CudaUnavailable = 7,
    /// The compute backend failed (out of memory, a kernel error) while serving a request.
    Backend = 8,
    /// The engine has stopped and accepts no more requests.
    EngineShutdown = 9,
    /// The request was cancelled by the caller (a streaming callback returned false).
    Cancelled = 10,
    /// A bug in autoglm, such as a caught Rust panic. The message has the details.
    Internal = 11,
}

impl autoglm_status {
    fn name(self) -> &'static std::ffi::CStr {
        match self {
            autoglm_status::Ok => c"OK",
            autoglm_status::InvalidArgument => c"INVALID_ARGUMENT",
            autoglm_status::ModelLoad => c"MODEL_LOAD",
            autoglm_status::InvalidConfig => c"INVALID_CONFIG",
            autoglm_status::InvalidRequest => c"INVALID_REQUEST",
            autoglm_status::Tokenizer => c"TOKENIZER",
            autoglm_status::Template => c"TEMPLATE",
            autoglm_status::CudaUnavailable => c"CUDA_UNAVAILABLE",
            autoglm_status::Backend => c"BACKEND",
            autoglm_status::EngineShutdown => c"ENGINE_SHUTDOWN",
            autoglm_status::Cancelled => c"CANCELLED",
            autoglm_status::Internal => c"INTERNAL",
        }
    }

    const ALL: [autoglm_status; 12] = [
        autoglm_status::Ok,
        autoglm_status::InvalidArgument,
        autoglm_status::ModelLoad,
        autoglm_status::InvalidConfig,
        autoglm_status::InvalidRequest,
        autoglm_status::Tokenizer,
        autoglm_status::Template,
        autoglm_status::CudaUnavailable,
        autoglm_status::Backend,
        autoglm_status::EngineShutdown,
        autoglm_status::Cancelled,
        autoglm_status::Internal,
    ];
}

/// The name of a status code without its prefix (`"INVALID_ARGUMENT"`); `"UNKNOWN"` for a value
/// that is not one. Takes an `int` so that any value is safe to pass.
///
/// Ownership: the returned string is static; do not free it. Leaves `autoglm_last_error`
/// unchanged.
#[no_mangle]
pub extern "C" fn autoglm_status_str(status: c_int) -> *const c_char {
    let name = autoglm_status::ALL
        .iter()
        .find(|s| **s as c_int == status)
        .map_or(c"UNKNOWN", |s| s.name());
    name.as_ptr()
}

/// The library version, e.g. `"0.1.0"`.
///
/// Ownership: the returned string is static; do not free it.
#[no_mangle]
pub extern "C" fn autoglm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A failed call: the status it returns and the message `autoglm_last_error()` will give.
#[derive(Debug)]
pub(crate) struct CapiError {
    pub(crate) status: autoglm_status,
    pub(crate) msg: String,
}

impl CapiError {
    pub(crate) fn new(status: autoglm_status, msg: impl Into<String>) -> Self {
        CapiError {
            status,
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid_argument(msg: impl Into<String>) -> Self {
        CapiError::new(autoglm_status::InvalidArgument, msg)
    }

    /// Maps an error from loading a model or tokenizer directory: everything about the files is
    /// `MODEL_LOAD`; only the engine's own options are `INVALID_CONFIG`.
    pub(crate) fn from_load(e: Error) -> Self {
        let status = match &e {
            Error::InvalidConfig { field, .. }
                if [
                    "cache",
                    "scheduler",
                    "threading",
                    "device",
                    "multimodal",
                    "limit_mm_per_prompt",
                    "mm_processor_kwargs",
                    "chat_template_content_format",
                ]
                .iter()
                .any(|p| field.starts_with(p)) =>
            {
                autoglm_status::InvalidConfig
            }
            Error::InvalidConfig { .. } | Error::Tokenizer(_) | Error::Template(_) => {
                autoglm_status::ModelLoad
            }
            _ => status_of(&e),
        };
        CapiError::new(status, e.to_string())
    }
}

impl From<Error> for CapiError {
    fn from(e: Error) -> Self {
        CapiError::new(status_of(&e), e.to_string())
    }
}

fn status_of(e: &Error) -> autoglm_status {
    match e {
        Error::Io { .. }
        | Error::Json { .. }
        | Error::Checkpoint { .. }
        | Error::UnsupportedArchitecture(_) => autoglm_status::ModelLoad,
        Error::InvalidConfig { .. } | Error::Affinity(_) => autoglm_status::InvalidConfig,
        Error::InvalidRequest(_) | Error::Image(_) => autoglm_status::InvalidRequest,
        Error::Tokenizer(_) => autoglm_status::Tokenizer,
        Error::Template(_) => autoglm_status::Template,
        Error::CudaUnavailable(_) => autoglm_status::CudaUnavailable,
        Error::Backend(_) => autoglm_status::Backend,
        Error::EngineShutdown => autoglm_status::EngineShutdown,
        _ => autoglm_status::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn status_names_cover_every_code() {
        for (i, s) in autoglm_status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "codes are dense and in order");
            // SAFETY: autoglm_status_str returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(autoglm_status_str(i as c_int)) };
            assert_ne!(name.to_str().unwrap(), "UNKNOWN");
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(autoglm_status_str(-1)) };
        assert_eq!(unknown.to_str().unwrap(), "UNKNOWN");
    }

    #[test]
    fn load_errors_split_options_from_files() {
        let e = autoglm_core::EngineConfig {
            cache: autoglm_core::CacheConfig {
                block_size: 0,
                ..Default::default()
            },
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            CapiError::from_load(e).status,
            autoglm_status::InvalidConfig
        );
        let e = autoglm_core::model::ModelConfig::from_json("{}").unwrap_err();
        assert_eq!(CapiError::from_load(e).status, autoglm_status::ModelLoad);
    }
}
