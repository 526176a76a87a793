//! Routing, authentication, body limits and per-response bookkeeping (`x-request-id`, request
//! metrics, audit).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::body::{json_response, text_response, Body};
use super::error::ApiError;
use super::metrics::{ModelGauges, NetCounts};
use super::state::{AppState, Record};
use super::{chat, completions, cors, models, tokenize};
use crate::net::{ConnInfo, HttpHandler};

/// The application as the socket layer sees it.
#[derive(Clone)]
pub(crate) struct AppHandler(pub(crate) Arc<AppState>);

const REQUEST_ID: &str = "x-request-id";

impl HttpHandler for AppHandler {
    type Body = Body;

    fn handle(
        self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        handle(self.0, req, conn.peer)
    }

    fn overloaded(&self) -> Response<Body> {
        let mut r = ApiError::overloaded("Too many open connections; retry later.").into_response();
        let id = self.0.new_request_id();
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert(REQUEST_ID, v);
        }
        self.0.metrics.count_request("connection_limit", 503);
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Models,
    Model,
    Tokenize,
    Detokenize,
    Health,
    Ready,
    Metrics,
    AdminModels,
    AdminModel,
}

impl Route {
    /// The route at `path` and the methods it serves.
    fn lookup(path: &str) -> Option<(Route, &'static str)> {
        use Route::*;
        Some(match path {
            "/v1/chat/completions" => (Chat, "POST"),
            "/v1/completions" => (Completions, "POST"),
            "/v1/models" => (Models, "GET"),
            "/tokenize" => (Tokenize, "POST"),
            "/detokenize" => (Detokenize, "POST"),
            "/health" => (Health, "GET"),
            "/ready" => (Ready, "GET"),
            "/metrics" => (Metrics, "GET"),
            "/admin/models" => (AdminModels, "GET, POST"),
            p if p.len() > "/v1/models/".len() && p.starts_with("/v1/models/") => (Model, "GET"),
            p if p.len() > "/admin/models/".len() && p.starts_with("/admin/models/") => {
                (AdminModel, "DELETE")
            }
            _ => return None,
        })
    }

    /// Finds the route, or the 404 / 405 answer.
    fn find(method: &Method, path: &str) -> Result<Route, ApiError> {
        let (route, allow) =
            Route::lookup(path).ok_or_else(|| ApiError::route_not_found(method.as_str(), path))?;
        if allow.split(", ").any(|m| m == method.as_str()) {
            Ok(route)
        } else {
            Err(ApiError::method_not_allowed(method.as_str(), path, allow))
        }
    }

    /// The label in metrics and the audit log.
    fn label(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{id}",
            Route::Tokenize => "/tokenize",
            Route::Detokenize => "/detokenize",
            Route::Health => "/health",
            Route::Ready => "/ready",
            Route::Metrics => "/metrics",
            Route::AdminModels => "/admin/models",
            Route::AdminModel => "/admin/models/{name}",
        }
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// The client's `x-request-id` when it is sane (1..=128 visible ASCII characters); any other is
/// ignored (not echoed, not logged). It is kept beside the request's own id, never as it: ids the
/// server issues (`chatcmpl-…`, `cmpl-…`, the audit `request_id`) are always generated here.
fn client_request_id(h: &HeaderMap) -> Option<String> {
    let v = h.get(REQUEST_ID)?.to_str().ok()?;
    let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| v.to_string())
}

async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    client: Option<std::net::SocketAddr>,
) -> Response<Body> {
    let cors = cors::allowed_origin(&state.config.cors, req.headers());
    if let Some(origin) = &cors {
        // Before authentication: browsers send preflights without credentials.
        if cors::is_preflight(req.method(), req.headers()) {
            if let Some((route, methods)) = Route::lookup(req.uri().path()) {
                state.metrics.count_request(route.label(), 204);
                return cors::preflight(&state.config.cors, origin.clone(), req.headers(), methods);
            }
        }
    }
    let start = Instant::now();
    let id: Arc<str> = state.new_request_id().into();
    let client_id: Option<Arc<str>> = client_request_id(req.headers()).map(Into::into);
    let method = method_label(req.method());
    let route = Route::find(req.method(), req.uri().path());
    let label = route.as_ref().map_or("other", |r| r.label());
    let quiet = matches!(route, Ok(Route::Health | Route::Ready));
    let mut rec = Record::new(state.clone(), id.clone(), method, label, start);
    rec.client_request_id = client_id.clone();
    rec.client = client;
    let mut resp = match route {
        Ok(route) => dispatch(&state, &mut rec, route, req)
            .await
            .unwrap_or_else(ApiError::into_response),
        Err(e) => e.into_response(),
    };
    let status = resp.status().as_u16();
    rec.status = status;
    rec.quiet = quiet;
    let principal = rec.principal.clone();
    drop(rec);
    if let Some(p) = principal {
        state.limiter.write_headers(&p, resp.headers_mut());
    }
    if let Some(origin) = cors {
        cors::decorate(&state.config.cors, origin, resp.headers_mut());
    }
    state.metrics.count_request(label, status);
    // The client's id echoed back when it sent one, else ours.
    if let Ok(v) = HeaderValue::from_str(client_id.as_deref().unwrap_or(&id)) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

async fn dispatch(
    state: &Arc<AppState>,
    rec: &mut Record,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let public = matches!(route, Route::Health | Route::Ready)
        || (route == Route::Metrics && state.config.metrics_public);
    if !public {
        if let Some(p) = state.auth.authenticate(req.headers())? {
            rec.principal = Some(p.clone());
            state.auth.authorize(&p, &path)?;
            state.limiter.admit_request(&p)?;
        }
    }
    match route {
        Route::Health => Ok(Response::new(Body::empty())),
        Route::Ready => ready(state),
        Route::Metrics => Ok(metrics(state)),
        Route::Models | Route::AdminModels if req.method() == Method::GET => {
            Ok(models::list(&state.models, shows_paths(state, rec)))
        }
        Route::Model => models::get(
            &state.models,
            &models::name_from_path(&path["/v1/models/".len()..])?,
            shows_paths(state, rec),
        ),
        Route::AdminModel => {
            let name = models::name_from_path(&path["/admin/models/".len()..])?;
            models::admin_unload(&state.models, &name, state.config.unload_timeout).await
        }
        _ => {
            let body = read_body(state, req).await?;
            match route {
                Route::Chat => chat::handle(rec, &body).await,
                Route::Completions => completions::handle(rec, &body).await,
                Route::Tokenize => tokenize::tokenize(&state.models, &state.prep, &body).await,
                Route::Detokenize => tokenize::detokenize(&state.models, &body),
                _ => {
                    let root = state.config.model_root.as_deref();
                    models::admin_load(state.models.clone(), root, &body).await
                }
            }
        }
    }
}

/// Server paths (a model's `root`) only for callers allowed the admin routes (with auth off
/// nobody is known to be one).
fn shows_paths(state: &AppState, rec: &Record) -> bool {
    rec.principal
        .as_ref()
        .is_some_and(|p| state.auth.authorize(p, "/admin/models").is_ok())
}

/// Reads the body within the size limit (413) and the read timeout (408).
async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = state.config.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let collect = Limited::new(req.into_body(), limit).collect();
    let collected = match state.config.limits.body_read_timeout {
        Some(t) => tokio::time::timeout(t, collect)
            .await
            .map_err(|_| ApiError::timeout("The request body was not received in time."))?,
        None => collect.await,
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "Cannot read the request body: {e}."
        ))),
    }
}

fn ready(state: &AppState) -> Result<Response<Body>, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::overloaded("The server is shutting down."));
    }
    let names = state.models.names();
    if names.is_empty() {
        return Err(ApiError::overloaded("No model is loaded."));
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"status": "ready", "models": names}),
    ))
}

fn metrics(state: &AppState) -> Response<Body> {
    let gauges: Vec<ModelGauges> = state
        .models
        .snapshot()
        .iter()
        .map(|m| {
            let s = m.engine.stats();
            ModelGauges {
                model: m.name.clone(),
                draining: m.is_draining(),
                waiting: s.waiting.load(Ordering::Relaxed),
                running: s.running.load(Ordering::Relaxed),
                paused: s.paused.load(Ordering::Relaxed),
                kv_used: s.kv_blocks_used.load(Ordering::Relaxed),
                kv_total: s.kv_blocks_total.load(Ordering::Relaxed),
                steps: s.steps.load(Ordering::Relaxed),
                preemptions: s.preemptions.load(Ordering::Relaxed),
                engine_generated: s.generated_tokens.load(Ordering::Relaxed),
                images_preprocessed: s.images_preprocessed.load(Ordering::Relaxed),
                image_preprocess_ns: s.image_preprocess_ns.load(Ordering::Relaxed),
                images_encoded: s.images_encoded.load(Ordering::Relaxed),
                image_encode_ns: s.image_encode_ns.load(Ordering::Relaxed),
                encoder_cache_hits: s.encoder_cache_hits.load(Ordering::Relaxed),
                prefix_queried: s.prefix_cache_queried_tokens.load(Ordering::Relaxed),
                prefix_hits: s.prefix_cache_hit_tokens.load(Ordering::Relaxed),
                block_size: m.engine.config().cache.block_size,
                prefix_caching: m.engine.config().cache.enable_prefix_caching,
                requests: m.metrics.clone(),
            }
        })
        .collect();
    let net = state
        .net
        .get()
        .map_or_else(NetCounts::default, |n| NetCounts {
            open: n.open_connections.load(Ordering::Relaxed),
            rejected: n.rejected_connections.load(Ordering::Relaxed),
            rejected_per_address: n.rejected_per_address.load(Ordering::Relaxed),
            header_timeouts: n.header_timeouts.load(Ordering::Relaxed),
            write_timeouts: n.write_timeouts.load(Ordering::Relaxed),
        });
    let text = state
        .metrics
        .render(&gauges, &net, state.in_flight.load(Ordering::Relaxed));
    text_response(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        text,
    )
}
