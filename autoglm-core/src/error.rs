//! The one error type of autoglm-core.
//!
//! Every fallible operation returns [`Result`]. Variants name the file, field or value at fault so a
//! user can fix the input without reading the source.

use std::path::PathBuf;

/// Errors returned by autoglm-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, read or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A JSON file is malformed or lacks a required field.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// serde_json's description (names the field and line).
        source: serde_json::Error,
    },
    /// A checkpoint file is present but unusable (truncated safetensors, missing tensor, wrong shape).
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// `config.json` names an architecture this engine does not implement.
    #[error("unsupported architecture {0:?} (supported: GlmForCausalLM, Glm4ForCausalLM, Glm4vForConditionalGeneration){hint}", hint = architecture_hint(.0))]
    UnsupportedArchitecture(String),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config `{field}`: {msg}")]
    InvalidConfig {
        /// The field at fault, e.g. `cache.block_size` or `num_key_value_heads`.
        field: String,
        /// Why it was rejected.
        msg: String,
    },
    /// A request (prompt or sampling parameters) was rejected.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// No usable CUDA device: no driver, no device, or a missing library.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// Pinning a thread to a CPU core failed.
    #[error("cpu affinity: {0}")]
    Affinity(String),
    /// A backend operation failed (out of memory, kernel error).
    #[error("backend: {0}")]
    Backend(String),
    /// An image could not be used: not an image, truncated, larger than allowed, a bad size.
    #[error("image: {0}")]
    Image(String),
    /// The engine thread has stopped; no more requests are accepted.
    #[error("the engine has shut down")]
    EngineShutdown,
    /// The pinned host-memory pool would go over its byte limit.
    #[error(
        "pinned memory pool: {requested} bytes (size class {class}) would exceed the limit of \
         {limit} bytes ({in_use} bytes in use, {pinned} pinned)"
    )]
    PinnedMemoryLimit {
        /// Bytes asked for.
        requested: usize,
        /// The size class that request needs.
        class: usize,
        /// The pool's limit.
        limit: usize,
        /// Bytes held by live buffers.
        in_use: usize,
        /// Bytes the pool holds in all (in use and free, after freeing what it could).
        pinned: usize,
    },
}

/// What to use instead of an architecture that is close to a supported one.
fn architecture_hint(name: &str) -> &'static str {
    match name {
        "ChatGLMModel" | "ChatGLMForConditionalGeneration" => {
            ": this is the original THUDM checkpoint layout, which needs trust_remote_code; use \
             its transformers-native `-hf` variant (e.g. zai-org/glm-4-9b-chat-hf), whose \
             config.json says GlmForCausalLM"
        }
        "Glm4MoeForCausalLM" | "Glm4vMoeForConditionalGeneration" => {
            ": the GLM-4.5 mixture-of-experts models are not implemented yet"
        }
        _ => "",
    }
}

impl Error {
    /// An [`Error::InvalidConfig`] naming `field`.
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
