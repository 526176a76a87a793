//! The exception hierarchy and the panic boundary.
//!
//! Every core [`Error`] becomes a subclass of `autoglm.AutoglmError` (polars' `exceptions.rs` is the
//! model). Classes that describe bad input also derive from `ValueError`, and `ServerError` from
//! `OSError`, which `create_exception!` cannot express (one base only), so the classes are built once
//! with `type(name, bases, ns)` when the module is first initialised and kept in a [`PyOnceLock`].
//!
//! Every Python entry point runs inside [`guard`], so a Rust panic reaches Python as an
//! `AutoglmError` rather than pyo3's `PanicException` (a `BaseException` that `except Exception`
//! does not catch).

use std::panic::{catch_unwind, AssertUnwindSafe};

use autoglm_core::Error;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// Which exception class an error maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Base,
    ModelLoad,
    InvalidRequest,
    CudaUnavailable,
    EngineShutdown,
    Tokenizer,
    Template,
    Affinity,
    Backend,
    Server,
}

/// A built-in exception class some classes also derive from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Also {
    Nothing,
    ValueError,
    OSError,
}

/// (kind, Python name, parent kind, built-in second base, docstring), parents before children.
const CLASSES: [(Kind, &str, Option<Kind>, Also, &str); 10] = [
    (
        Kind::Base,
        "AutoglmError",
        None,
        Also::Nothing,
        "Base class of every error autoglm raises.",
    ),
    (
        Kind::ModelLoad,
        "ModelLoadError",
        Some(Kind::Base),
        Also::Nothing,
        "The model directory could not be loaded: a missing or unreadable file, malformed JSON, \
         a truncated or inconsistent checkpoint, an unsupported architecture, or a tokenizer or \
         chat template that does not load. `path` names the file at fault when there is one.",
    ),
    (
        Kind::InvalidRequest,
        "InvalidRequestError",
        Some(Kind::Base),
        Also::ValueError,
        "A request, its sampling parameters or an engine option was rejected (an image that is not \
         a PNG, JPEG or WebP file, is truncated or too large included); the message names the \
         field and the value.",
    ),
    (
        Kind::CudaUnavailable,
        "CudaUnavailableError",
        Some(Kind::Base),
        Also::Nothing,
        "A CUDA device was asked for but none is usable.",
    ),
    (
        Kind::EngineShutdown,
        "EngineShutdownError",
        Some(Kind::Base),
        Also::Nothing,
        "The engine has been closed or its thread has stopped; no more requests are accepted.",
    ),
    (
        Kind::Tokenizer,
        "TokenizerError",
        Some(Kind::Base),
        Also::Nothing,
        "The tokenizer failed to encode or decode.",
    ),
    (
        Kind::Template,
        "TemplateError",
        Some(Kind::Base),
        Also::Nothing,
        "The chat template failed to render these messages (or the model has none).",
    ),
    (
        Kind::Affinity,
        "AffinityError",
        Some(Kind::Base),
        Also::Nothing,
        "Pinning a thread to a CPU core failed.",
    ),
    (
        Kind::Backend,
        "BackendError",
        Some(Kind::Base),
        Also::Nothing,
        "A backend operation failed (out of memory, kernel error), or an internal error.",
    ),
    (
        Kind::Server,
        "ServerError",
        Some(Kind::Base),
        Also::OSError,
        "The HTTP server could not start: an address could not be bound (in use, not permitted), \
         or a TLS, API-key or audit-log file could not be read; or it was used in the wrong state \
         (e.g. `url` before `start()`). Also an `OSError`; `errno` is set when the system gave one.",
    ),
];

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

fn build(py: Python<'_>) -> PyResult<Vec<Py<PyType>>> {
    let type_ = py.get_type::<PyType>();
    let mut built: Vec<Py<PyType>> = Vec::with_capacity(CLASSES.len());
    for (kind, name, parent, also, doc) in CLASSES {
        debug_assert_eq!(kind as usize, built.len());
        let mut bases = vec![match parent {
            Some(p) => built[p as usize].bind(py).clone().into_any(),
            None => py.get_type::<PyException>().into_any(),
        }];
        match also {
            Also::Nothing => {}
            Also::ValueError => bases.push(py.get_type::<PyValueError>().into_any()),
            Also::OSError => bases.push(py.get_type::<PyOSError>().into_any()),
        }
        let ns = PyDict::new(py);
        ns.set_item("__module__", "autoglm")?;
        ns.set_item("__doc__", doc)?;
        if kind == Kind::ModelLoad {
            ns.set_item("path", py.None())?;
        }
        let cls = type_.call1((name, PyTuple::new(py, bases)?, ns))?;
        built.push(cls.cast_into::<PyType>()?.unbind());
    }
    Ok(built)
}

fn class(py: Python<'_>, kind: Kind) -> Bound<'_, PyType> {
    match TYPES.get_or_try_init(py, || build(py)) {
        Ok(types) => types[kind as usize].bind(py).clone(),
        // Only reachable if `type()` itself fails; fall back to a class that always exists.
        Err(_) => py.get_type::<PyException>(),
    }
}

/// Adds the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let types = TYPES.get_or_try_init(py, || build(py))?;
    for ((_, name, ..), cls) in CLASSES.iter().zip(types) {
        m.add(*name, cls.bind(py))?;
    }
    Ok(())
}

/// A new exception of `kind` with `msg`.
pub(crate) fn new_err(kind: Kind, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::attach(|py| PyErr::from_type(class(py, kind), msg))
}

/// `InvalidRequestError(msg)`.
pub(crate) fn invalid(msg: impl Into<String>) -> PyErr {
    new_err(Kind::InvalidRequest, msg)
}

/// When an error happened: some core errors mean "bad model" while loading and "bad input" later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Load,
    Request,
}

/// Fields of `EngineConfig` (the engine options), as `Error::InvalidConfig` names them.
fn is_engine_option(field: &str) -> bool {
    ["cache.", "scheduler.", "threading."]
        .iter()
        .any(|p| field.starts_with(p))
        || field.starts_with("multimodal")
        || [
            "device",
            "seed",
            "limit_mm_per_prompt",
            "mm_processor_kwargs",
            "chat_template_content_format",
        ]
        .contains(&field)
}

/// Maps a core error to its exception.
pub(crate) fn to_py(e: Error, phase: Phase) -> PyErr {
    let msg = e.to_string();
    let (kind, path) = match &e {
        Error::Io { path, .. } | Error::Json { path, .. } | Error::Checkpoint { path, .. } => {
            (Kind::ModelLoad, Some(path.display().to_string()))
        }
        Error::UnsupportedArchitecture(_) => (Kind::ModelLoad, None),
        Error::InvalidConfig { field, .. } if is_engine_option(field) => {
            (Kind::InvalidRequest, None)
        }
        Error::InvalidConfig { .. } | Error::Tokenizer(_) | Error::Template(_)
            if phase == Phase::Load =>
        {
            (Kind::ModelLoad, None)
        }
        // A bad image (not an image, truncated, too large) is bad input.
        Error::InvalidConfig { .. } | Error::InvalidRequest(_) | Error::Image(_) => {
            (Kind::InvalidRequest, None)
        }
        Error::Tokenizer(_) => (Kind::Tokenizer, None),
        Error::Template(_) => (Kind::Template, None),
        Error::CudaUnavailable(_) => (Kind::CudaUnavailable, None),
        Error::EngineShutdown => (Kind::EngineShutdown, None),
        Error::Affinity(_) => (Kind::Affinity, None),
        Error::Backend(_) => (Kind::Backend, None),
        _ => (Kind::Base, None),
    };
    Python::attach(|py| {
        let err = PyErr::from_type(class(py, kind), msg);
        if let Some(path) = path {
            // Best effort: the message names the path as well.
            let _ = err.value(py).setattr("path", path);
        }
        err
    })
}

/// A request-time core error as an exception.
pub(crate) fn request_err(e: Error) -> PyErr {
    to_py(e, Phase::Request)
}

/// The message of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// The exception a caught panic becomes.
pub(crate) fn panic_err(payload: &(dyn std::any::Any + Send)) -> PyErr {
    new_err(
        Kind::Base,
        format!(
            "internal error in autoglm (a Rust panic): {}",
            panic_message(payload)
        ),
    )
}

/// Runs an entry point's body, turning a panic into `AutoglmError`.
pub(crate) fn guard<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(panic_err(&*payload)))
}

/// A core error from starting the server: sockets and files are `ServerError` (an `OSError`, with
/// `errno` when the system gave one), bad settings `InvalidRequestError`.
pub(crate) fn server_err(e: Error) -> PyErr {
    let Error::Io { path, source } = &e else {
        return match e {
            Error::InvalidConfig { .. } | Error::InvalidRequest(_) => {
                new_err(Kind::InvalidRequest, e.to_string())
            }
            Error::Json { .. } | Error::Checkpoint { .. } => new_err(Kind::Server, e.to_string()),
            e => to_py(e, Phase::Request),
        };
    };
    let what = path.display().to_string();
    let msg = match what.strip_prefix("bind ") {
        Some(addr) if source.kind() == std::io::ErrorKind::AddrInUse => format!(
            "cannot listen on {addr}: {source}; is another server using it? (port=0 picks a free \
             port)"
        ),
        Some(addr) => format!("cannot listen on {addr}: {source}"),
        None => e.to_string(),
    };
    Python::attach(|py| match source.raw_os_error() {
        // OSError(errno, strerror): `str()` is "[Errno N] message", so the message drops Rust's
        // " (os error N)".
        Some(n) => {
            let msg = msg.replace(&format!(" (os error {n})"), "");
            PyErr::from_type(class(py, Kind::Server), (n, msg))
        }
        None => PyErr::from_type(class(py, Kind::Server), msg),
    })
}
