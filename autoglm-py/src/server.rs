//! `Server`: the OpenAI-compatible HTTP server of `autoglm_core::server`, run in-process.
//!
//! `Server(...)` checks every option and builds the `ServerConfig` (bad options raise at once);
//! `start()` loads the models on a loader thread (waited on detached, so Ctrl-C still works), builds
//! a tokio runtime of its own, binds the listeners (so a port in use is raised by `start()` itself)
//! and spawns the server on the runtime. It returns as soon as the sockets listen. Nothing on the
//! runtime's threads touches Python: the server runs whatever the interpreter does, GIL or not.
//!
//! Stopping: `shutdown()` only asks (graceful, or `force=True` to close connections now) and never
//! blocks, so it is safe in a signal handler; `wait()` and `stop()` wait detached and re-attach
//! every 100 ms to run Python's signal handlers. `autoglm.serve` (python/autoglm/_serve.py) builds
//! its SIGINT/SIGTERM handling on exactly this: its handlers call `shutdown()` while the main
//! thread sits in `wait()`. `stop()` shuts the runtime down and stops the engines before it
//! returns, so the port is free and the engine threads are joined afterwards.

use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use autoglm_core::net::{BindAddr, TlsFiles};
use autoglm_core::server::{
    ApiKey, AuditConfig, ModelRegistry, Server as CoreServer, ServerConfig, ServerHandle,
};
use autoglm_core::{Engine as CoreEngine, EngineConfig};
use futures::future::{select, Either};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use tokio::sync::watch;

use crate::engine::{engine_config, OPTIONS as ENGINE_OPTIONS};
use crate::errors::{guard, invalid, new_err, panic_message, server_err, to_py, Kind, Phase};
use crate::wait::{self, CancelSignal};

/// The keyword options of `Server(...)` besides the model ones and the engine options.
const SERVER_OPTIONS: [&str; 34] = [
    "host",
    "port",
    "unix_socket",
    "api_keys",
    "admin_api_keys",
    "api_keys_file",
    "tls_cert",
    "tls_key",
    "requests_per_minute",
    "tokens_per_minute",
    "audit_log",
    "audit_log_prompts",
    "max_connections",
    "max_connections_per_ip",
    "max_concurrent_requests",
    "max_waiting_requests",
    "max_choices_per_request",
    "max_body_bytes",
    "request_timeout",
    "idle_timeout",
    "stream_interval",
    "stream_write_timeout",
    "shutdown_grace",
    "shutdown_drain_delay",
    "unload_timeout",
    "prefix_cache_scope",
    "model_root",
    "allowed_origins",
    "metrics_public",
    "workers",
    "http_cores",
    "reuse_port",
    "config",
    "device",
];

fn option_err(name: &str, v: &Bound<'_, PyAny>, want: &str) -> PyErr {
    let shown = v.repr().map(|r| r.to_string()).unwrap_or_default();
    invalid(format!("server option {name} = {shown}: {want}"))
}

/// An int >= 0, or `None`.
fn opt_count(name: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return Err(option_err(name, v, "must be an int"));
    }
    v.extract::<usize>()
        .map(Some)
        .map_err(|_| option_err(name, v, "must be an int >= 0"))
}

/// A finite number >= 0 (int or float), or `None`.
fn opt_number(name: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    if v.is_instance_of::<PyBool>()
        || !(v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>())
    {
        return Err(option_err(name, v, "must be a number"));
    }
    match v.extract::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
        _ => Err(option_err(name, v, "must be a finite number >= 0")),
    }
}

/// Seconds as a timeout: 0 disables it.
fn timeout(secs: f64) -> Option<Duration> {
    // Too long saturates; the config check then names the option.
    (secs > 0.0).then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// JSON text of JSON-like Python data (paths become strings), through the `json` module.
fn json_text(name: &str, v: &Bound<'_, PyAny>) -> PyResult<String> {
    static DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static FSPATH: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let py = v.py();
    let dumps = DUMPS.import(py, "json", "dumps")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("default", FSPATH.import(py, "os", "fspath")?)?;
    kwargs.set_item("allow_nan", false)?;
    dumps
        .call((v,), Some(&kwargs))
        .and_then(|s| s.extract::<String>())
        .map_err(|e| {
            invalid(format!(
                "server option {name}: not JSON-like data (dicts with str keys, lists, str, \
                 finite numbers, bool, None, paths): {e}"
            ))
        })
}

/// The value of a JSON-like Python object as a deserializable type.
fn from_python<T: serde::de::DeserializeOwned>(name: &str, v: &Bound<'_, PyAny>) -> PyResult<T> {
    let text = json_text(name, v)?;
    serde_json::from_str(&text).map_err(|e| invalid(format!("server option {name}: {e}")))
}

/// A str or a sequence of items.
fn one_or_many<'py>(name: &str, v: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if v.is_instance_of::<PyString>() {
        return Ok(vec![v.clone()]);
    }
    let items = v
        .try_iter()
        .map_err(|_| option_err(name, v, "must be a str or a list of them"))?;
    items.collect()
}

/// API keys given as strings (with `role`), or for `api_keys` also as `{"key", "name", "role",
/// "priority", "limits"}` mappings.
fn add_api_keys(
    name: &str,
    v: Option<&Bound<'_, PyAny>>,
    role: &str,
    out: &mut Vec<ApiKey>,
) -> PyResult<()> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(());
    };
    for (i, item) in one_or_many(name, v)?.iter().enumerate() {
        let key = if let Ok(s) = item.cast::<PyString>() {
            ApiKey {
                key: s.to_str()?.to_owned(),
                name: Some(format!("{role}-key-{i}")),
                role: role.to_owned(),
                priority: 0,
                limits: None,
            }
        } else if role == "user" && item.cast::<PyMapping>().is_ok() {
            from_python(name, item)?
        } else {
            let want = if role == "user" {
                "must be str keys or {\"key\": ..., \"role\": ...} mappings"
            } else {
                "must be a str or a list of them"
            };
            return Err(option_err(name, v, want));
        };
        if key.key.is_empty() {
            return Err(invalid(format!("server option {name}: key {i} is empty")));
        }
        out.push(key);
    }
    Ok(())
}

/// Keys from a TOML file of `[[keys]]` tables, as `examples/serve.rs --api-keys-file` reads
/// (a missing file is a `ServerError` with its errno, a bad one an `InvalidRequestError`).
fn read_api_keys_file(path: &Path) -> PyResult<Vec<ApiKey>> {
    autoglm_core::server::read_api_keys_file(path).map_err(server_err)
}

/// The name a model directory is served under by default: its last component.
fn dir_name(dir: &Path) -> Option<String> {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    name(dir).or_else(|| name(&std::fs::canonicalize(dir).ok()?))
}

fn check_model_name(name: &str) -> PyResult<()> {
    if name.is_empty() || name.len() > 256 || name.chars().any(|c| c.is_control()) {
        return Err(invalid(format!(
            "invalid model name {name:?} (1 to 256 characters, no control characters)"
        )));
    }
    Ok(())
}

/// A listen address from `host` and `port`; `localhost` is 127.0.0.1.
fn tcp_addr(host: &str, port: u16) -> PyResult<BindAddr> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = if h.eq_ignore_ascii_case("localhost") {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        h.parse().map_err(|_| {
            invalid(format!(
                "server option host = {host:?}: not an IP address (e.g. \"127.0.0.1\", \
                 \"0.0.0.0\", \"::1\"; or None for no TCP listener)"
            ))
        })?
    };
    Ok(BindAddr::Tcp((ip, port).into()))
}

/// Loads every model (on the loader thread).
fn load_all(
    specs: &[(String, PathBuf)],
    config: &EngineConfig,
) -> autoglm_core::Result<Vec<(String, CoreEngine, PathBuf)>> {
    specs
        .iter()
        .map(|(name, dir)| {
            CoreEngine::from_dir(dir, config.clone()).map(|e| (name.clone(), e, dir.clone()))
        })
        .collect()
}

/// What the loader thread sends: the engines, or a load error, or a panic's message.
type Loaded = Result<autoglm_core::Result<Vec<(String, CoreEngine, PathBuf)>>, String>;

/// Resolves once the server task has finished (or was dropped).
async fn finished(mut done: watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await;
}

/// A started server.
struct Running {
    rt: tokio::runtime::Runtime,
    handle: ServerHandle,
    abort: tokio::task::AbortHandle,
    done: watch::Receiver<bool>,
    models: Arc<ModelRegistry>,
    addrs: Vec<BindAddr>,
}

impl Running {
    /// Ends the server task (if still running), the runtime, and the engines. Blocking: call
    /// detached.
    fn release(self) {
        self.abort.abort();
        self.rt.shutdown_timeout(Duration::from_secs(1));
        // Most likely the last handle: dropping it joins the engine threads.
        drop(self.models);
    }
}

enum State {
    Idle,
    /// `start()` is loading or binding; cancelling makes it give up.
    Starting(CancelSignal),
    Running(Box<Running>),
    /// Shutting down (graceful or forced); `stop()` releases it.
    Stopping(Box<Running>),
}

/// The OpenAI-compatible HTTP server, run in-process on its own threads.
///
/// `Server(...)` checks the options (a bad one raises `InvalidRequestError`); `start()` loads the
/// models, binds and starts serving, and returns; `stop()` stops gracefully and waits. A context
/// manager: `with autoglm.Server(dir, port=0) as server: ... server.url`. `autoglm.serve(...)`
/// takes the same arguments and blocks until SIGINT/SIGTERM.
///
/// Models: `model` (a directory, served as `served_model_name` or the directory's name) and/or
/// `models` ({name: directory}); the first is the default.
/// Listening: `host` (an IP address; None for no TCP), `port` (0: a free one), `unix_socket`.
/// Access: `api_keys` (str keys with role user, or {"key", "name", "role", "priority",
/// "limits"} mappings), `admin_api_keys`, `api_keys_file` (TOML `[[keys]]`), TLS 1.3 with
/// `tls_cert` and `tls_key` (PEM), `requests_per_minute` and `tokens_per_minute` per caller,
/// `audit_log` (a file, or "-" for stderr) and `audit_log_prompts`.
/// Limits: `max_connections`, `max_connections_per_ip` (from one client address, an IPv6 /64;
/// default half of `max_connections`; more are closed at once), `max_concurrent_requests`
/// (choices in flight: a request counts its prompts times n), `max_waiting_requests`,
/// `max_choices_per_request` (default 128), `max_body_bytes`, `request_timeout` and
/// `idle_timeout` (seconds; 0: none), `shutdown_grace` (seconds open requests get on a graceful
/// stop once the listeners stop accepting; default 30; streams still running then end with an
/// error event of code `server_shutdown` and `[DONE]`), `shutdown_drain_delay` (seconds between
/// a graceful stop's start, when `/ready` turns 503, and the listeners' stop, while new
/// connections are still served; default 0 here, 5 for `autoglm serve`), `unload_timeout` (seconds `DELETE
/// /admin/models/NAME` waits for the model's running requests before it stops its engine,
/// ending them; default 30, 0: forever), `prefix_cache_scope` (`"principal"`, the default: one
/// credential never reuses another's cached prompt blocks; `"global"`: all share), `model_root`
/// (`POST /admin/models` loads only directories under it; without it, not at all),
/// `allowed_origins` (a list of origins browsers may call from, or `["*"]`: their responses carry
/// CORS headers and their preflights are answered; default none, no CORS), `metrics_public`
/// (`/metrics` without a key; default False: the admin role only),
/// `stream_interval` (streamed token events written together; default 1),
/// `stream_write_timeout` (seconds a response's socket may take no byte before the connection is
/// closed and its request cancelled; default 30, 0: none). `tokens_per_minute` reserves a
/// request's prompt plus `max_tokens` for each choice when it is admitted and gives back what it
/// did not use.
/// Threads: `workers` (HTTP threads; default one per core, or per `http_cores` entry),
/// `http_cores` (cores the HTTP threads stay on; with the engine option `engine_core` on
/// another, the engine loop never shares its core with socket work), `reuse_port` (one SO_REUSEPORT socket
/// per worker; off by default, so a port in use fails to bind instead of being shared).
/// `config`: a mapping of `autoglm_core::server::ServerConfig` fields for the rest (JWTs, roles,
/// header limits, socket options, extra `listen` addresses); the keywords given win over it.
/// `device` and the keyword options of `Engine` configure the engines.
#[pyclass(module = "autoglm", frozen)]
pub(crate) struct Server {
    state: Mutex<State>,
    config: ServerConfig,
    engine: EngineConfig,
    specs: Vec<(String, PathBuf)>,
    workers: usize,
    /// Cores the HTTP threads are kept on (empty: wherever the OS runs them).
    http_cores: Vec<usize>,
}

/// What `launch` made: a bound server, not yet running.
struct Launched {
    rt: tokio::runtime::Runtime,
    server: CoreServer,
    models: Arc<ModelRegistry>,
}

/// Drops a runtime and a registry detached (both may wait for threads).
fn discard(py: Python<'_>, rt: Option<tokio::runtime::Runtime>, models: Arc<ModelRegistry>) {
    py.detach(move || {
        if let Some(rt) = rt {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        drop(models);
    });
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn not_running() -> PyErr {
        new_err(
            Kind::Server,
            "the server is not running; call start() first",
        )
    }

    /// Loads the models and binds; `None` when cancelled meanwhile.
    fn launch(&self, py: Python<'_>, cancel: &CancelSignal) -> PyResult<Option<Launched>> {
        let (specs, config) = (self.specs.clone(), self.engine.clone());
        let (tx, rx) = flume::bounded::<Loaded>(1);
        std::thread::Builder::new()
            .name("autoglm-load".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    load_all(&specs, &config)
                }));
                // Nobody listens when start() was cancelled: the engines are dropped here.
                let _ = tx.send(r.map_err(|p| panic_message(&*p)));
            })
            .map_err(|e| {
                new_err(
                    Kind::Backend,
                    format!("cannot start the model loader thread: {e}"),
                )
            })?;
        let loaded = wait::block_on(py, async {
            match select(pin!(rx.recv_async()), pin!(cancel.cancelled())).await {
                Either::Left((r, _)) => Some(r),
                Either::Right(_) => None,
            }
        })?;
        let engines = match loaded {
            None => return Ok(None),
            Some(Ok(Ok(Ok(engines)))) => engines,
            Some(Ok(Ok(Err(e)))) => return Err(to_py(e, Phase::Load)),
            Some(Ok(Err(panic))) => {
                return Err(new_err(
                    Kind::Base,
                    format!("internal error in autoglm (a Rust panic): {panic}"),
                ))
            }
            Some(Err(_)) => {
                return Err(new_err(
                    Kind::Backend,
                    "the model loader thread ended without a result",
                ))
            }
        };
        let models = Arc::new(ModelRegistry::new(self.engine.clone()));
        for (name, engine, dir) in engines {
            if let Err(e) = models.add(&name, engine, Some(dir)) {
                discard(py, None, models);
                return Err(server_err(e));
            }
        }
        let http_cores = self.http_cores.clone();
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.workers)
            .thread_name("autoglm-http")
            .on_thread_start(move || {
                if !http_cores.is_empty() {
                    // Checked when the Server was made; a failure now costs speed only.
                    let _ = autoglm_core::threading::pin_current_thread_to(&http_cores);
                }
            })
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                discard(py, None, models);
                return Err(new_err(
                    Kind::Server,
                    format!("cannot start the server's threads: {e}"),
                ));
            }
        };
        let bound = py.detach(|| {
            let _in_runtime = rt.enter();
            CoreServer::bind(self.config.clone(), models.clone())
        });
        match bound {
            Ok(server) if !cancel.is_cancelled() => Ok(Some(Launched { rt, server, models })),
            Ok(server) => {
                drop(server);
                discard(py, Some(rt), models);
                Ok(None)
            }
            Err(e) => {
                discard(py, Some(rt), models);
                Err(server_err(e))
            }
        }
    }

    /// `BindAddr`s while running or stopping.
    fn addrs(&self) -> Option<Vec<BindAddr>> {
        match &*self.lock() {
            State::Running(r) | State::Stopping(r) => Some(r.addrs.clone()),
            _ => None,
        }
    }

    fn first_tcp(&self) -> PyResult<std::net::SocketAddr> {
        let addrs = self.addrs().ok_or_else(Self::not_running)?;
        addrs
            .iter()
            .find_map(|a| match a {
                BindAddr::Tcp(sa) => Some(*sa),
                BindAddr::Unix(_) => None,
            })
            .ok_or_else(|| new_err(Kind::Server, "the server listens on no TCP address"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let state = std::mem::replace(
            self.state.get_mut().unwrap_or_else(|e| e.into_inner()),
            State::Idle,
        );
        match state {
            // Not stopped: close at once (no grace), detached since it joins threads.
            State::Running(r) | State::Stopping(r) => {
                Python::attach(|py| py.detach(move || r.release()));
            }
            State::Starting(cancel) => cancel.cancel(),
            State::Idle => {}
        }
    }
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (
        model = None,
        *,
        models = None,
        served_model_name = None,
        host = Some("127.0.0.1".to_owned()),
        port = None,
        unix_socket = None,
        api_keys = None,
        admin_api_keys = None,
        api_keys_file = None,
        tls_cert = None,
        tls_key = None,
        requests_per_minute = None,
        tokens_per_minute = None,
        audit_log = None,
        audit_log_prompts = false,
        max_connections = None,
        max_connections_per_ip = None,
        max_concurrent_requests = None,
        max_waiting_requests = None,
        max_choices_per_request = None,
        max_body_bytes = None,
        request_timeout = None,
        idle_timeout = None,
        stream_interval = None,
        stream_write_timeout = None,
        shutdown_grace = None,
        shutdown_drain_delay = None,
        unload_timeout = None,
        prefix_cache_scope = None,
        model_root = None,
        allowed_origins = None,
        metrics_public = None,
        workers = None,
        http_cores = None,
        reuse_port = None,
        config = None,
        device = "auto",
        **options
    ))]
    #[pyo3(
        text_signature = "(model=None, *, models=None, served_model_name=None, \
        host='127.0.0.1', port=8000, unix_socket=None, api_keys=None, admin_api_keys=None, \
        api_keys_file=None, tls_cert=None, tls_key=None, requests_per_minute=None, \
        tokens_per_minute=None, audit_log=None, audit_log_prompts=False, max_connections=None, \
        max_connections_per_ip=None, max_concurrent_requests=None, max_waiting_requests=None, \
        max_choices_per_request=None, max_body_bytes=None, request_timeout=None, \
        idle_timeout=None, stream_interval=None, stream_write_timeout=None, shutdown_grace=None, \
        shutdown_drain_delay=None, unload_timeout=None, prefix_cache_scope=None, \
        model_root=None, allowed_origins=None, metrics_public=None, workers=None, http_cores=None, \
        reuse_port=None, config=None, device='auto', **options)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: Option<PathBuf>,
        models: Option<&Bound<'_, PyAny>>,
        served_model_name: Option<String>,
        host: Option<String>,
        port: Option<&Bound<'_, PyAny>>,
        unix_socket: Option<PathBuf>,
        api_keys: Option<&Bound<'_, PyAny>>,
        admin_api_keys: Option<&Bound<'_, PyAny>>,
        api_keys_file: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        requests_per_minute: Option<&Bound<'_, PyAny>>,
        tokens_per_minute: Option<&Bound<'_, PyAny>>,
        audit_log: Option<PathBuf>,
        audit_log_prompts: bool,
        max_connections: Option<&Bound<'_, PyAny>>,
        max_connections_per_ip: Option<&Bound<'_, PyAny>>,
        max_concurrent_requests: Option<&Bound<'_, PyAny>>,
        max_waiting_requests: Option<&Bound<'_, PyAny>>,
        max_choices_per_request: Option<&Bound<'_, PyAny>>,
        max_body_bytes: Option<&Bound<'_, PyAny>>,
        request_timeout: Option<&Bound<'_, PyAny>>,
        idle_timeout: Option<&Bound<'_, PyAny>>,
        stream_interval: Option<&Bound<'_, PyAny>>,
        stream_write_timeout: Option<&Bound<'_, PyAny>>,
        shutdown_grace: Option<&Bound<'_, PyAny>>,
        shutdown_drain_delay: Option<&Bound<'_, PyAny>>,
        unload_timeout: Option<&Bound<'_, PyAny>>,
        prefix_cache_scope: Option<String>,
        model_root: Option<PathBuf>,
        allowed_origins: Option<Vec<String>>,
        metrics_public: Option<bool>,
        workers: Option<&Bound<'_, PyAny>>,
        http_cores: Option<&Bound<'_, PyAny>>,
        reuse_port: Option<bool>,
        config: Option<&Bound<'_, PyAny>>,
        device: &str,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        guard(|| {
            // Models: `model` (named `served_model_name` or after its directory), then `models`.
            let mut specs: Vec<(String, PathBuf)> = Vec::new();
            if let Some(dir) = model {
                let name = match served_model_name {
                    Some(n) => n,
                    None => dir_name(&dir).ok_or_else(|| {
                        invalid(format!(
                            "cannot name the model at {:?}; pass served_model_name",
                            dir.display().to_string()
                        ))
                    })?,
                };
                specs.push((name, dir));
            } else if served_model_name.is_some() {
                return Err(invalid(
                    "served_model_name names `model`, which is not given (use models={name: dir})",
                ));
            }
            if let Some(m) = models.filter(|m| !m.is_none()) {
                let m = m.cast::<PyMapping>().map_err(|_| {
                    option_err(
                        "models",
                        m,
                        "must be a mapping of model names to directories",
                    )
                })?;
                for item in m.items()?.iter() {
                    let (name, dir): (String, PathBuf) = item.extract().map_err(|_| {
                        option_err(
                            "models",
                            m.as_any(),
                            "must map str names to directories (str or os.PathLike)",
                        )
                    })?;
                    specs.push((name, dir));
                }
            }
            if specs.is_empty() {
                return Err(invalid(
                    "no model to serve: pass model=DIR or models={NAME: DIR, ...}",
                ));
            }
            for (i, (name, _)) in specs.iter().enumerate() {
                check_model_name(name)?;
                if specs[..i].iter().any(|(n, _)| n == name) {
                    return Err(invalid(format!("two models are named {name:?}")));
                }
            }

            // Engine options; a name that is neither kind is a typo worth naming.
            if let Some(options) = options {
                for k in options.keys() {
                    let k: String = k.extract()?;
                    if !ENGINE_OPTIONS.contains(&k.as_str()) {
                        return Err(invalid(format!(
                            "unknown option {k:?} (server options: {}; engine options: {})",
                            SERVER_OPTIONS.join(", "),
                            ENGINE_OPTIONS.join(", ")
                        )));
                    }
                }
            }
            let engine = engine_config(device, options)?;

            // The server configuration: `config`, then the keywords given (not None) over it.
            let (mut c, base) = match config.filter(|c| !c.is_none()) {
                Some(cfg) => {
                    if cfg.cast::<PyMapping>().is_err() {
                        return Err(option_err(
                            "config",
                            cfg,
                            "must be a mapping of ServerConfig fields",
                        ));
                    }
                    let json: serde_json::Value = serde_json::from_str(&json_text("config", cfg)?)
                        .map_err(|e| invalid(format!("server option config: {e}")))?;
                    let c: ServerConfig = serde_json::from_value(json.clone())
                        .map_err(|e| invalid(format!("server option config: {e}")))?;
                    (c, json)
                }
                None => (ServerConfig::default(), serde_json::Value::Null),
            };
            let given = |pointer: &str| base.pointer(pointer).is_some();

            let extra_listen = if given("/listen") {
                std::mem::take(&mut c.listen)
            } else {
                Vec::new()
            };
            c.listen.clear();
            let port = match port.filter(|p| !p.is_none()) {
                None => 8000,
                Some(p) => opt_count("port", Some(p))?
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| option_err("port", p, "must be an int in 0..=65535"))?,
            };
            if let Some(host) = &host {
                c.listen.push(tcp_addr(host, port)?);
            }
            if let Some(path) = unix_socket {
                c.listen.push(BindAddr::Unix(path));
            }
            c.listen.extend(extra_listen);
            if c.listen.is_empty() {
                return Err(invalid(
                    "nothing to listen on: host=None needs unix_socket (or config[\"listen\"])",
                ));
            }

            let http_cores = match http_cores.filter(|v| !v.is_none()) {
                None => Vec::new(),
                Some(v) => {
                    let cores = v.extract::<Vec<usize>>().map_err(|_| {
                        option_err("http_cores", v, "must be a list of core ids (ints >= 0)")
                    })?;
                    autoglm_core::threading::check_cores(&cores)
                        .map_err(|e| option_err("http_cores", v, &e.to_string()))?;
                    cores
                }
            };
            let workers = match opt_count("workers", workers)? {
                Some(0) => {
                    return Err(invalid("server option workers = 0: must be at least 1"));
                }
                Some(n) => n,
                None if !http_cores.is_empty() => http_cores.len(),
                None if given("/socket/acceptors") => c.socket.acceptors.max(1),
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            c.socket.acceptors = workers;
            // Off unless asked: with SO_REUSEPORT a second server on the same port would share
            // it silently instead of failing to bind.
            match reuse_port {
                Some(r) => c.socket.reuse_port = r,
                None if given("/socket/reuse_port") => {}
                None => c.socket.reuse_port = false,
            }

            let auth = &mut c.auth;
            add_api_keys("api_keys", api_keys, "user", &mut auth.api_keys)?;
            add_api_keys(
                "admin_api_keys",
                admin_api_keys,
                "admin",
                &mut auth.api_keys,
            )?;
            if let Some(path) = &api_keys_file {
                auth.api_keys.extend(read_api_keys_file(path)?);
            }
            for (name, v, slot) in [
                (
                    "requests_per_minute",
                    requests_per_minute,
                    &mut auth.default_limits.requests_per_minute,
                ),
                (
                    "tokens_per_minute",
                    tokens_per_minute,
                    &mut auth.default_limits.tokens_per_minute,
                ),
            ] {
                if let (Some(x), Some(obj)) = (opt_number(name, v)?, v) {
                    if x <= 0.0 {
                        return Err(option_err(name, obj, "must be > 0"));
                    }
                    *slot = Some(x);
                }
            }

            match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => c.tls = Some(TlsFiles { cert, key }),
                (None, None) => {}
                _ => return Err(invalid("tls_cert and tls_key go together: pass both")),
            }
            if let Some(path) = audit_log {
                c.audit = Some(AuditConfig {
                    path,
                    log_prompts: audit_log_prompts,
                });
            } else if audit_log_prompts {
                return Err(invalid("audit_log_prompts needs audit_log"));
            }

            if let Some(n) = opt_count("max_connections", max_connections)? {
                c.http.max_connections = n;
            }
            if let Some(n) = opt_count("max_connections_per_ip", max_connections_per_ip)? {
                c.http.max_connections_per_ip = Some(n);
            }
            if let Some(n) = opt_count("max_concurrent_requests", max_concurrent_requests)? {
                c.limits.max_concurrent_requests = n;
            }
            if let Some(n) = opt_count("max_waiting_requests", max_waiting_requests)? {
                c.limits.max_waiting_requests = Some(n);
            }
            if let Some(n) = opt_count("max_choices_per_request", max_choices_per_request)? {
                c.limits.max_choices_per_request = n;
            }
            if let Some(n) = opt_count("max_body_bytes", max_body_bytes)? {
                c.limits.max_body_bytes = n;
            }
            if let Some(s) = opt_number("request_timeout", request_timeout)? {
                c.limits.request_timeout = timeout(s);
            }
            if let Some(s) = opt_number("idle_timeout", idle_timeout)? {
                c.http.idle_timeout = timeout(s);
            }
            if let Some(n) = opt_count("stream_interval", stream_interval)? {
                c.stream_interval = n;
            }
            if let Some(s) = opt_number("stream_write_timeout", stream_write_timeout)? {
                c.stream_write_timeout = timeout(s);
            }
            if let Some(s) = opt_number("shutdown_grace", shutdown_grace)? {
                c.shutdown_grace = Some(timeout(s).unwrap_or_default());
            }
            if let Some(s) = opt_number("shutdown_drain_delay", shutdown_drain_delay)? {
                c.shutdown_drain_delay = timeout(s);
            }
            if let Some(s) = opt_number("unload_timeout", unload_timeout)? {
                c.unload_timeout = timeout(s);
            }
            if let Some(scope) = prefix_cache_scope {
                c.prefix_cache_scope = scope.parse().map_err(server_err)?;
            }
            if let Some(root) = model_root {
                c.model_root = Some(root);
            }
            if let Some(origins) = allowed_origins {
                c.cors.allowed_origins = origins;
            }
            if let Some(public) = metrics_public {
                c.metrics_public = public;
            }
            c.validate().map_err(server_err)?;

            Ok(Server {
                state: Mutex::new(State::Idle),
                config: c,
                engine,
                specs,
                workers,
                http_cores,
            })
        })
    }

    /// Loads the models, binds the listeners and starts serving; returns once the sockets
    /// listen (with `port=0`, `port` and `url` then tell the port the system chose). Waits with
    /// the GIL released. Raises `ModelLoadError` for a model that does not load and `ServerError`
    /// for an address that cannot be bound. Returns the server itself.
    fn start(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        guard(|| {
            crate::refresh_log_levels();
            let py = slf.py();
            let this = slf.get();
            let cancel = CancelSignal::new();
            {
                let mut state = this.lock();
                let busy = match &*state {
                    State::Idle => None,
                    State::Starting(_) => Some("the server is already starting"),
                    State::Running(_) => Some("the server is already running"),
                    State::Stopping(_) => Some("the server is stopping; call stop() first"),
                };
                if let Some(msg) = busy {
                    return Err(new_err(Kind::Server, msg));
                }
                *state = State::Starting(cancel.clone());
            }
            let launched = this.launch(py, &cancel);
            let mut state = this.lock();
            let Ok(Some(Launched { rt, server, models })) = launched else {
                *state = State::Idle;
                return launched.map(|_| slf.clone());
            };
            if cancel.is_cancelled() {
                *state = State::Idle;
                drop(state);
                drop(server);
                discard(py, Some(rt), models);
                return Ok(slf.clone());
            }
            let (done_tx, done_rx) = watch::channel(false);
            let handle = server.handle();
            let addrs = server.local_addrs();
            let task = rt.spawn(async move {
                server.run().await;
                let _ = done_tx.send(true);
            });
            *state = State::Running(Box::new(Running {
                abort: task.abort_handle(),
                rt,
                handle,
                done: done_rx,
                models,
                addrs,
            }));
            drop(state);
            Ok(slf.clone())
        })
    }

    /// Asks the server to stop and returns at once (safe in a signal handler): `/ready` answers
    /// 503 at once, the listeners go on accepting for `shutdown_drain_delay` seconds, then stop
    /// and new generations are refused, and open requests get `shutdown_grace` seconds to finish; with `force=True` it closes every connection now. During
    /// `start()` it makes `start()` give up. `wait()` tells when it is done; `stop()` waits and
    /// releases the threads.
    #[pyo3(signature = (force = false))]
    fn shutdown(&self, force: bool) -> PyResult<()> {
        guard(|| {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, State::Idle) {
                State::Idle => {}
                State::Starting(cancel) => {
                    cancel.cancel();
                    *state = State::Starting(cancel);
                }
                State::Running(r) | State::Stopping(r) => {
                    if force {
                        r.abort.abort();
                    } else {
                        r.handle.shutdown();
                    }
                    *state = State::Stopping(r);
                }
            }
            Ok(())
        })
    }

    /// Stops the server and waits until it has: graceful (open requests get `shutdown_grace`
    /// seconds) unless `force=True`. Afterwards the port is free and the engines are stopped.
    /// Idempotent; safe from another thread while one is in `wait()`. If a signal handler raises
    /// meanwhile (Ctrl-C's `KeyboardInterrupt`), the stop is forced and the exception propagates.
    #[pyo3(signature = (force = false))]
    fn stop(&self, py: Python<'_>, force: bool) -> PyResult<()> {
        guard(|| {
            let (handle, abort, done) = loop {
                let mut state = self.lock();
                match std::mem::replace(&mut *state, State::Idle) {
                    State::Idle => return Ok(()),
                    State::Starting(cancel) => {
                        // Let start() give up, then see what it left.
                        cancel.cancel();
                        *state = State::Starting(cancel);
                        drop(state);
                        py.detach(|| std::thread::sleep(Duration::from_millis(10)));
                        py.check_signals()?;
                    }
                    State::Running(r) | State::Stopping(r) => {
                        let parts = (r.handle.clone(), r.abort.clone(), r.done.clone());
                        *state = State::Stopping(r);
                        break parts;
                    }
                }
            };
            if force {
                abort.abort();
            } else {
                handle.shutdown();
            }
            let waited = wait::block_on(py, finished(done));
            if waited.is_err() {
                abort.abort();
            }
            let stopped = {
                let mut state = self.lock();
                match std::mem::replace(&mut *state, State::Idle) {
                    State::Stopping(r) => Some(r),
                    // Another stop() released it (and maybe someone started it again).
                    other => {
                        *state = other;
                        None
                    }
                }
            };
            if let Some(r) = stopped {
                py.detach(move || r.release());
            }
            waited
        })
    }

    /// Waits (GIL released, signal handlers run) until the server has stopped serving, after
    /// `shutdown()` or `stop()` from elsewhere (a signal handler, another thread). Returns True
    /// once stopped (at once if not running), False if `timeout` seconds passed first.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        guard(|| {
            let deadline = opt_number("timeout", timeout)?
                .map(|s| Instant::now() + Duration::from_secs_f64(s.min(1e9)));
            let done = match &*self.lock() {
                State::Running(r) | State::Stopping(r) => r.done.clone(),
                State::Idle | State::Starting(_) => return Ok(true),
            };
            Ok(wait::block_on_until(py, finished(done), deadline)?.is_some())
        })
    }

    /// Whether the server is serving (started, and neither shut down nor stopped).
    #[getter]
    fn running(&self) -> bool {
        matches!(&*self.lock(), State::Running(_))
    }

    /// `http://HOST:PORT` (or `https://`) of the first TCP listener, with the port actually bound.
    /// Raises `ServerError` when not running or with no TCP listener.
    #[getter]
    fn url(&self) -> PyResult<String> {
        guard(|| {
            let scheme = if self.config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            Ok(format!("{scheme}://{}", self.first_tcp()?))
        })
    }

    /// The port of the first TCP listener (the one chosen for `port=0`).
    #[getter]
    fn port(&self) -> PyResult<u16> {
        guard(|| Ok(self.first_tcp()?.port()))
    }

    /// The addresses listened on (`"127.0.0.1:8000"`, `"unix:/path"`), once started; before,
    /// those configured.
    #[getter]
    fn addresses(&self) -> Vec<String> {
        self.addrs()
            .unwrap_or_else(|| self.config.listen.clone())
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Names of the served models (as requests' `model` field gives them); the first is the
    /// default.
    #[getter]
    fn models(&self) -> Vec<String> {
        match &*self.lock() {
            State::Running(r) | State::Stopping(r) => r.models.names(),
            _ => self.specs.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// Seconds open requests get to finish on a graceful stop.
    #[getter]
    fn shutdown_grace(&self) -> f64 {
        self.config.shutdown_grace.map_or(0.0, |d| d.as_secs_f64())
    }

    /// Seconds a graceful stop keeps accepting (with `/ready` failing) before the listeners stop.
    #[getter]
    fn shutdown_drain_delay(&self) -> f64 {
        self.config
            .shutdown_drain_delay
            .map_or(0.0, |d| d.as_secs_f64())
    }

    /// Starts the server unless it is running.
    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        if slf.get().running() {
            return Ok(slf);
        }
        Server::start(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.stop(py, false)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let models = PyList::new(py, self.models())?.repr()?.to_string();
        let addrs = PyList::new(py, self.addresses())?.repr()?.to_string();
        Ok(format!(
            "Server(models={models}, addresses={addrs}, running={})",
            if self.running() { "True" } else { "False" }
        ))
    }
}
