//! # autoglm-core
//!
//! An embeddable inference engine for GLM-family language models: checkpoint loading (safetensors,
//! memory-mapped), a tokenizer with the model's chat template, a continuous-batching engine over a
//! paged KV cache, and backends of fused operations (CPU here; CUDA in `backend::cuda`).
//!
//! ```no_run
//! use autoglm_core::{Engine, EngineConfig, SamplingParams};
//!
//! let engine = Engine::from_dir("path/to/glm-4-9b-chat-hf".as_ref(), EngineConfig::default())?;
//! let params = SamplingParams { max_tokens: 32, ..SamplingParams::greedy() };
//! let prompt = engine.tokenizer()?.encode("Hello", false)?;
//! let stream = engine.submit(prompt, params)?;
//! for event in stream {
//!     print!("{}", event?.text);
//! }
//! # Ok::<(), autoglm_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod hub;
pub mod logs;
pub mod media;
pub mod memory;
pub mod model;
#[cfg(feature = "server")]
pub mod net;
pub mod runner;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod threading;
pub mod tokenizer;

pub use config::{
    CacheConfig, CudaConfig, Device, EngineConfig, GenerationConfigSource, ModelOverrides,
    MultiModalConfig, SchedulerConfig, ThreadingConfig,
};
pub use engine::{Engine, RequestOutput, RequestStream};
pub use error::{Error, Result};
pub use sampling::{FinishReason, SamplingDefaults, SamplingParams, StructuredOutput};
