//! Python bindings for autoglm: the native module `autoglm._autoglm`, re-exported by the pure
//! Python package `autoglm` (see `python/autoglm/`).
//!
//! Layout: [`engine`] (the `Engine` class: options, submission, waiting), [`stream`] (sync and
//! async iterators of deltas), [`wait`] (detached blocking waits and the asyncio bridge),
//! [`params`] (`SamplingParams`), [`prompt`] (prompt parsing and Python-to-JSON), [`outputs`]
//! (result classes), [`tokenizer`], [`server`] (the OpenAI-compatible HTTP server run in-process),
//! and [`errors`] (the exception hierarchy and the panic boundary every entry point runs inside).
//!
//! Every wait happens detached from the interpreter (`py.detach`), so any number of Python
//! threads can submit and wait at once while the engine batches their requests.
//!
//! Logs: the engine's `tracing` events reach Python's `logging` as records of the loggers
//! `autoglm.model`, `autoglm.engine`, `autoglm.stats`, `autoglm.access`, ... (pyo3-log, installed
//! at import). A record takes the GIL on the thread that emits it (the engine thread, a loader
//! thread), which is safe because no thread waits for those while holding the GIL (every wait
//! is detached). pyo3-log caches each logger's level after its first record, so records below
//! it (Python's default is WARNING) cost no GIL; the cache is cleared whenever an `Engine` or
//! `Server` is created, so levels set before that take effect.

use std::sync::OnceLock;

use pyo3::prelude::*;

mod engine;
mod errors;
mod outputs;
mod params;
mod prompt;
mod server;
mod stream;
mod tokenizer;
mod wait;

/// Panics inside the panic boundary; lets the test suite check that a Rust panic reaches Python
/// as `AutoglmError` rather than `PanicException`.
#[pyfunction]
fn _panic_for_tests(message: &str) -> PyResult<()> {
    errors::guard(|| panic!("{message}"))
}

/// Runs the `autoglm` command (the same clap definition as the Rust binary) on `argv` (the
/// program name first) with the GIL released, and returns its exit status. SIGINT and SIGTERM
/// stop a server gracefully; a panic is status 1, never an exception.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| {
        std::panic::catch_unwind(|| autoglm_cli::run(argv)).unwrap_or_else(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            eprintln!("error: internal error (a bug; please report it): {msg}");
            1
        })
    })
}

/// Clears pyo3-log's cached logger levels (see the module docs).
static LOG_LEVELS: OnceLock<pyo3_log::ResetHandle> = OnceLock::new();

/// Makes the Python loggers' current levels apply to the records emitted from now on.
pub(crate) fn refresh_log_levels() {
    if let Some(h) = LOG_LEVELS.get() {
        h.reset();
    }
}

/// The native part of autoglm; import the `autoglm` package instead.
#[pymodule]
fn _autoglm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Debug and up are offered to Python (trace is never emitted); `install` fails only when this
    // module's `log` logger is already set (a second initialisation), and then that one stays.
    let logger = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels)?
        .filter(log::LevelFilter::Debug);
    if let Ok(handle) = logger.install() {
        let _ = LOG_LEVELS.set(handle);
    }
    errors::register(m)?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<params::SamplingParams>()?;
    m.add_class::<tokenizer::Tokenizer>()?;
    m.add_class::<outputs::RequestOutput>()?;
    m.add_class::<outputs::CompletionOutput>()?;
    m.add_class::<outputs::CompletionChunk>()?;
    m.add_class::<outputs::TokenLogprobs>()?;
    m.add_class::<outputs::Usage>()?;
    m.add_class::<outputs::EngineStats>()?;
    m.add_class::<stream::RequestStream>()?;
    m.add_class::<stream::AsyncRequestStream>()?;
    m.add_class::<server::Server>()?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    // The tiny checkpoint of the source tree this module was built from (it may be gone since).
    m.add(
        "_BUNDLED_MODEL",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/glm4-tiny"),
    )?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    // A test hook and a private path, not part of `from autoglm._autoglm import *`.
    m.index()?.call_method1("remove", ("_panic_for_tests",))?;
    m.index()?.call_method1("remove", ("_BUNDLED_MODEL",))?;
    Ok(())
}
