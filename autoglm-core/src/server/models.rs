//! The models a server serves, chosen by a request's `model` field, loaded and unloaded at run time.
//!
//! Every request holds a [`ModelLease`] until its last byte; unloading removes the name at once (new
//! requests get a 404), waits until the leases are gone, then stops the engine.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

use super::body::{json_response, Body};
use super::error::ApiError;
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
        if name.is_empty() || name.len() > 256 || name.chars().any(|c| c.is_control()) {
            return Err(Error::config(
                "model",
                format!("invalid model name {name:?}"),
            ));
        }
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

    /// Whether `name` is served.
    pub fn contains(&self, name: &str) -> bool {
        self.snapshot().iter().any(|m| m.name == name)
    }

    /// Names of the served models.
    pub fn names(&self) -> Vec<String> {
        self.snapshot().iter().map(|m| m.name.clone()).collect()
    }

    pub(crate) fn snapshot(&self) -> Vec<Arc<ModelEntry>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Leases `name`, or the default (first) model when `None`.
    pub fn lease(&self, name: Option<&str>) -> Option<ModelLease> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let entry = match name {
            Some(n) => models.iter().find(|m| m.name == n),
            None => models.first(),
        };
        entry.cloned().map(ModelLease::new)
    }

    /// Removes `name` from service and waits until no request uses it; returns the entry so the
    /// caller decides where its engine is dropped (dropping joins the engine thread).
    pub async fn unload(&self, name: &str) -> Option<Arc<ModelEntry>> {
        let entry = {
            let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
            let i = models.iter().position(|m| m.name == name)?;
            models.remove(i)
        };
        entry.wait_idle().await;
        Some(entry)
    }
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
pub(crate) fn list(reg: &ModelRegistry) -> Response<Body> {
    let data: Vec<_> = reg
        .snapshot()
        .iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": m.created,
                "owned_by": "autoglm",
                "root": m.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| m.name.clone()),
                "parent": null,
                "max_model_len": m.engine.max_model_len(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
pub(crate) fn get(reg: &ModelRegistry, id: &str) -> Result<Response<Body>, ApiError> {
    let m = reg
        .lease(Some(id))
        .ok_or_else(|| ApiError::model_not_found(id))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "autoglm",
            "max_model_len": m.engine.max_model_len(),
        }),
    ))
}

/// Body of `POST /admin/models`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
    path: PathBuf,
}

/// `POST /admin/models`: loads a checkpoint without a restart.
pub(crate) async fn admin_load(
    reg: Arc<ModelRegistry>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let req: LoadRequest = super::protocol::parse_json(body)?;
    if reg.contains(&req.name) {
        return Err(ApiError::bad_param(
            "name",
            format!("A model named `{}` is already loaded.", req.name),
        )
        .with_code("model_exists"));
    }
    let (name, path) = (req.name.clone(), req.path.clone());
    let loaded = tokio::task::spawn_blocking(move || reg.load(&name, &path))
        .await
        .map_err(|e| ApiError::internal(format!("model loading failed: {e}")))?;
    loaded.map_err(|e| match e {
        Error::Io { .. }
        | Error::Json { .. }
        | Error::Checkpoint { .. }
        | Error::InvalidConfig { .. }
        | Error::UnsupportedArchitecture(_)
        | Error::Tokenizer(_)
        | Error::Template(_) => ApiError::bad_param("path", e.to_string()),
        other => ApiError::internal(other.to_string()),
    })?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"id": req.name, "object": "model", "loaded": true, "root": req.path.display().to_string()}),
    ))
}

/// `DELETE /admin/models/{name}`: stops serving `name` once its running requests finish.
pub(crate) async fn admin_unload(
    reg: &ModelRegistry,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let entry = reg
        .unload(name)
        .await
        .ok_or_else(|| ApiError::model_not_found(name))?;
    // Dropping the last handle joins the engine thread: do it off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(entry)).await;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": name, "object": "model", "deleted": true}),
    ))
}
