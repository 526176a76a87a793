//! The models a server serves, chosen by a request's `model` field, loaded and unloaded at run time.
//!
//! Every request holds a [`ModelLease`] until its last byte. Unloading marks the model draining at
//! once (new requests get a 404, `/v1/models` no longer lists it, `/metrics` shows it with
//! `autoglm_model_draining` 1), waits until the leases are gone, at most the unload timeout, then
//! stops the engine, which ends whatever still runs on it (a client that does not read cannot
//! keep the engine and its memory), and removes the name.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

use super::body::{json_response, Body};
use super::error::ApiError;
use super::metrics::ModelMetrics;
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// One served model.
#[derive(Debug)]
pub struct ModelEntry {
    /// The name requests use.
    pub name: String,
    /// Its engine.
    pub engine: Engine,
    /// Where it was loaded from, if from disk.
    pub path: Option<PathBuf>,
    /// Unix time it was added.
    pub created: u64,
    active: AtomicUsize,
    idle: Notify,
    /// Being unloaded: no new lease, not listed, still in the metrics.
    draining: AtomicBool,
    /// Its request metrics (vLLM's names, with its `model_name`).
    pub(crate) metrics: Arc<ModelMetrics>,
}

/// Keeps a model loaded while a request uses it.
#[derive(Debug)]
pub struct ModelLease(Arc<ModelEntry>);

impl ModelLease {
    fn new(entry: Arc<ModelEntry>) -> Self {
        entry.active.fetch_add(1, Ordering::AcqRel);
        ModelLease(entry)
    }
}

impl std::ops::Deref for ModelLease {
    type Target = ModelEntry;
    fn deref(&self) -> &ModelEntry {
        &self.0
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ModelEntry {
    /// Whether it is being unloaded.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Requests holding a lease on it.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The served models, in the order they were added (the first is the default).
#[derive(Debug)]
pub struct ModelRegistry {
    models: RwLock<Vec<Arc<ModelEntry>>>,
    engine_config: EngineConfig,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ModelRegistry {
    /// An empty registry; `engine_config` is used for models loaded later by path.
    pub fn new(engine_config: EngineConfig) -> Self {
        ModelRegistry {
            models: RwLock::default(),
            engine_config,
        }
    }

    /// Adds a running engine under `name`.
    pub fn add(&self, name: &str, engine: Engine, path: Option<PathBuf>) -> Result<()> {
        check_model_name(name)?;
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        if models.iter().any(|m| m.name == name) {
            return Err(Error::config(
                "model",
                format!("a model named {name:?} is already loaded"),
            ));
        }
        models.push(Arc::new(ModelEntry {
            name: name.to_string(),
            engine,
            path,
            created: unix_now(),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            draining: AtomicBool::new(false),
            metrics: Arc::default(),
        }));
        Ok(())
    }

    /// Loads a checkpoint directory under `name` (blocking: reads the weights).
    pub fn load(&self, name: &str, dir: &Path) -> Result<()> {
        if self.contains(name) {
            return Err(Error::config(
                "model",
                format!("a model named {name:?} is already loaded"),
            ));
        }
        let engine = Engine::from_dir(dir, self.engine_config.clone())?;
        self.add(name, engine, Some(dir.to_owned()))
    }

    /// Whether `name` is loaded (served, or being unloaded).
    pub fn contains(&self, name: &str) -> bool {
        self.snapshot().iter().any(|m| m.name == name)
    }

    /// Names of the served models (not those being unloaded).
    pub fn names(&self) -> Vec<String> {
        self.snapshot()
            .iter()
            .filter(|m| !m.is_draining())
            .map(|m| m.name.clone())
            .collect()
    }

    /// Every loaded model, those being unloaded included.
    pub(crate) fn snapshot(&self) -> Vec<Arc<ModelEntry>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Leases `name`, or the default (first) model when `None`.
    pub fn lease(&self, name: Option<&str>) -> Option<ModelLease> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let mut serving = models.iter().filter(|m| !m.is_draining());
        let entry = match name {
            Some(n) => serving.find(|m| m.name == n),
            None => serving.next(),
        };
        entry.cloned().map(ModelLease::new)
    }

    /// Removes `name` from service and waits until no request uses it; returns the entry so the
    /// caller decides where its engine is dropped (dropping joins the engine thread). `None` when
    /// it is not loaded or already being unloaded. [`unload_within`](Self::unload_within) bounds
    /// the wait.
    pub async fn unload(&self, name: &str) -> Option<Arc<ModelEntry>> {
        match self.unload_within(name, None).await {
            Unload::Done { entry, .. } => Some(entry),
            Unload::NotFound | Unload::AlreadyUnloading => None,
        }
    }

    /// Marks `name` draining (no new lease; still in the metrics) and waits until no request
    /// uses it, at most `timeout` (`None`: without limit); past it the engine is stopped (joining
    /// its thread, off the async workers), which ends the requests left and frees its model and
    /// KV cache even while a client that does not read still holds its lease. Then the name is
    /// removed.
    pub async fn unload_within(&self, name: &str, timeout: Option<Duration>) -> Unload {
        let entry = {
            let models = self.models.write().unwrap_or_else(|e| e.into_inner());
            let Some(m) = models.iter().find(|m| m.name == name) else {
                return Unload::NotFound;
            };
            if m.draining.swap(true, Ordering::AcqRel) {
                return Unload::AlreadyUnloading;
            }
            m.clone()
        };
        let idle = match timeout {
            Some(t) => tokio::time::timeout(t, entry.wait_idle()).await.is_ok(),
            None => {
                entry.wait_idle().await;
                true
            }
        };
        let cancelled = if idle {
            0
        } else {
            let left = entry.active_requests();
            let e = entry.clone();
            let _ = tokio::task::spawn_blocking(move || e.engine.stop()).await;
            left
        };
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models.retain(|m| !Arc::ptr_eq(m, &entry));
        drop(models);
        Unload::Done { entry, cancelled }
    }
}

/// What [`ModelRegistry::unload_within`] did.
#[derive(Debug)]
pub enum Unload {
    /// No model of that name is loaded.
    NotFound,
    /// Another unload of it is under way.
    AlreadyUnloading,
    /// Unloaded; `cancelled` requests were still running at the timeout and were ended by
    /// stopping the engine.
    Done {
        /// The entry, to drop where joining the engine thread is fine.
        entry: Arc<ModelEntry>,
        /// Requests ended by the timeout.
        cancelled: usize,
    },
}

/// Model names are 1-256 characters from `A-Z a-z 0-9 - _ . : @ +` and `/` (Hugging Face ids such
/// as `zai-org/AutoGLM-Phone-9B`), not starting or ending with `/` and without `//`, so that
/// every name reads the same in a URL path (`/admin/models/NAME`) as in a request body.
pub(crate) fn check_model_name(name: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:@+/".contains(c);
    let bad = if name.is_empty() || name.len() > 256 {
        Some("must be 1 to 256 characters")
    } else if !name.chars().all(allowed) {
        Some("may hold only A-Z a-z 0-9 - _ . : @ + /")
    } else if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        Some("must not start or end with / or hold //")
    } else {
        None
    };
    match bad {
        Some(why) => Err(Error::config(
            "model",
            format!("invalid model name {name:?}: a name {why}"),
        )),
        None => Ok(()),
    }
}

/// A model name from a URL path, percent-decoded (`%2F` and `/` alike).
pub(crate) fn name_from_path(raw: &str) -> Result<String, ApiError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(b) = hex else {
                return Err(ApiError::bad_request(format!(
                    "Bad percent-encoding in the model name {raw:?}."
                )));
            };
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request(format!("The model name {raw:?} is not UTF-8.")))
}

/// Leases the model a request names, with the OpenAI 404 when there is none.
pub(crate) fn lease_or_404(
    reg: &ModelRegistry,
    name: Option<&str>,
) -> Result<ModelLease, ApiError> {
    reg.lease(name).ok_or_else(|| match name {
        Some(n) => ApiError::model_not_found(n),
        None => ApiError::not_found("No model is loaded."),
    })
}

/// `GET /v1/models`.
///
/// `root` is the checkpoint directory for callers allowed the admin routes only; others see the
/// model's name there (a server path tells them about the host, not about the model).
pub(crate) fn list(reg: &ModelRegistry, show_paths: bool) -> Response<Body> {
    let data: Vec<_> = reg
        .snapshot()
        .iter()
        .filter(|m| !m.is_draining())
        .map(|m| model_card(m, show_paths))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// A model as `/v1/models` lists it and `/v1/models/{id}` returns it (vLLM's `ModelCard`):
/// `root` is the checkpoint's path for admins, the name for everyone else.
fn model_card(m: &ModelEntry, show_paths: bool) -> serde_json::Value {
    let root = match m.path.as_ref().filter(|_| show_paths) {
        Some(p) => p.display().to_string(),
        None => m.name.clone(),
    };
    json!({
        "id": m.name,
        "object": "model",
        "created": m.created,
        "owned_by": "autoglm",
        "root": root,
        "parent": null,
        "max_model_len": m.engine.max_model_len(),
    })
}

/// `GET /v1/models/{id}`: the same object as its entry in the list.
pub(crate) fn get(
    reg: &ModelRegistry,
    id: &str,
    show_paths: bool,
) -> Result<Response<Body>, ApiError> {
    let m = reg
        .lease(Some(id))
        .ok_or_else(|| ApiError::model_not_found(id))?;
    Ok(json_response(StatusCode::OK, &model_card(&m, show_paths)))
}

/// Body of `POST /admin/models`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
    path: PathBuf,
}

/// `POST /admin/models`: loads a checkpoint without a restart, from a directory under `root`
/// (`--model-root`; without one, loading by path is refused). `path` is taken relative to the
/// root; with links resolved it must stay inside it. Errors say what kind of file is wrong and
/// where under the root, never what a file holds.
pub(crate) async fn admin_load(
    reg: Arc<ModelRegistry>,
    root: Option<&Path>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let req: LoadRequest = super::protocol::parse_json(body)?;
    check_model_name(&req.name).map_err(|e| ApiError::bad_param("name", e.to_string()))?;
    if reg.contains(&req.name) {
        return Err(ApiError::bad_param(
            "name",
            format!("A model named `{}` is already loaded.", req.name),
        )
        .with_code("model_exists"));
    }
    let Some(root) = root else {
        return Err(ApiError::forbidden(
            "Loading models by path is off: start the server with --model-root DIR to allow directories under DIR.",
        ));
    };
    let outside = || {
        ApiError::bad_param(
            "path",
            format!(
                "`{}` is not a directory under the model root.",
                req.path.display()
            ),
        )
    };
    let dir = root.join(&req.path).canonicalize().map_err(|_| outside())?;
    let canonical_root = root.canonicalize().map_err(|_| outside())?;
    if !dir.starts_with(&canonical_root) || !dir.is_dir() {
        return Err(outside());
    }
    let shown = dir
        .strip_prefix(&canonical_root)
        .unwrap_or(&dir)
        .to_path_buf();
    let (name, load_dir) = (req.name.clone(), dir.clone());
    let loaded = tokio::task::spawn_blocking(move || reg.load(&name, &load_dir))
        .await
        .map_err(|e| ApiError::internal(format!("model loading failed: {e}")))?;
    let under = |p: &Path| {
        p.strip_prefix(&canonical_root)
            .unwrap_or(p)
            .display()
            .to_string()
    };
    loaded.map_err(|e| {
        let msg = match &e {
            Error::Io { path, source } => {
                format!("cannot read `{}`: {}", under(path), source.kind())
            }
            Error::Json { path, .. } => {
                format!("`{}` is not valid JSON for this file", under(path))
            }
            Error::Checkpoint { path, .. } => {
                format!("`{}` is not a usable checkpoint file", under(path))
            }
            Error::InvalidConfig { field, .. } => {
                format!("the model configuration has an invalid `{field}`")
            }
            Error::UnsupportedArchitecture(_) => "the architecture is not supported".into(),
            Error::Tokenizer(_) => "the tokenizer files cannot be loaded".into(),
            Error::Template(_) => "the chat template cannot be compiled".into(),
            _ => return ApiError::internal("model loading failed"),
        };
        ApiError::bad_param("path", format!("Cannot load `{}`: {msg}.", shown.display()))
    })?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"id": req.name, "object": "model", "loaded": true, "root": dir.display().to_string()}),
    ))
}

/// `DELETE /admin/models/{name}`: stops serving `name` once its running requests finish, or
/// once `timeout` has passed (then the rest are ended). 202 while another unload of it is under
/// way, 404 once it is gone.
pub(crate) async fn admin_unload(
    reg: &ModelRegistry,
    name: &str,
    timeout: Option<Duration>,
) -> Result<Response<Body>, ApiError> {
    let (entry, cancelled) = match reg.unload_within(name, timeout).await {
        Unload::NotFound => return Err(ApiError::model_not_found(name)),
        Unload::AlreadyUnloading => {
            return Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"id": name, "object": "model", "deleted": false, "unloading": true,
                        "message": format!("The model `{name}` is already being unloaded.")}),
            ))
        }
        Unload::Done { entry, cancelled } => (entry, cancelled),
    };
    // Dropping the last handle joins the engine thread: do it off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(entry)).await;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": name, "object": "model", "deleted": true, "cancelled_requests": cancelled}),
    ))
}
