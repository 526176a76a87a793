//! Server-wide state and the per-request record that feeds metrics, rate limits and the audit log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::audit::{rfc3339_now, AuditEntry, AuditLog};
use super::auth::{Auth, Principal};
use super::config::ServerConfig;
use super::error::ApiError;
use super::metrics::{Metrics, ModelMetrics};
use super::models::ModelRegistry;
use super::prep::PrepPool;
use super::ratelimit::RateLimiter;
use crate::net::NetStats;

/// Everything a request handler can reach.
pub(crate) struct AppState {
    pub(crate) config: ServerConfig,
    pub(crate) models: Arc<ModelRegistry>,
    pub(crate) metrics: Metrics,
    pub(crate) auth: Auth,
    pub(crate) limiter: RateLimiter,
    pub(crate) audit: Option<AuditLog>,
    /// Tokenizing and template rendering of large requests.
    pub(crate) prep: PrepPool,
    /// Set when shutdown begins: /ready turns 503 (the listeners still accept during the drain
    /// delay).
    pub(crate) shutting_down: AtomicBool,
    /// Set once the listeners stop accepting: new generations are refused.
    pub(crate) draining: AtomicBool,
    /// Turns true when the shutdown grace has run out: running generations end now (a stream
    /// with an error event and `[DONE]`, a non-streamed one with a 503).
    pub(crate) ending: tokio::sync::watch::Sender<bool>,
    /// Choices of generation requests admitted and not yet finished.
    pub(crate) in_flight: AtomicUsize,
    pub(crate) net: OnceLock<Arc<NetStats>>,
    /// Prefix of generated request ids (random per process).
    pub(crate) id_prefix: String,
    pub(crate) id_counter: AtomicUsize,
}

impl AppState {
    /// A fresh request id: 32 hex digits, unique per process and unlikely to repeat across runs.
    pub(crate) fn new_request_id(&self) -> String {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:016x}", self.id_prefix)
    }

    /// Counts a generation's `choices` as in flight, or refuses it when they would go over the
    /// cap or the server is draining.
    pub(crate) fn admit_generation(self: &Arc<Self>, choices: usize) -> Result<InFlight, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::overloaded("The server is shutting down."));
        }
        let max = self.config.limits.max_concurrent_requests;
        let now = self.in_flight.fetch_add(choices, Ordering::AcqRel) + choices;
        let guard = InFlight(self.clone(), choices);
        if now > max {
            return Err(ApiError::overloaded(format!(
                "The server is overloaded ({max} choices in flight at most; this request has {choices}); retry later."
            )));
        }
        Ok(guard)
    }

    /// Refuses (400) a request that would create more choices than one request may.
    pub(crate) fn check_choices(&self, prompts: usize, n: usize) -> Result<usize, ApiError> {
        let max = self.config.limits.max_choices_per_request;
        let choices = prompts.saturating_mul(n);
        if choices > max {
            let (param, what) = if prompts > 1 {
                (
                    "prompt",
                    format!("{prompts} prompts x n = {n} make {choices} choices"),
                )
            } else {
                ("n", format!("n = {n}"))
            };
            return Err(ApiError::bad_param(
                param,
                format!("{what}; a request may create at most {max} (--max-choices-per-request)."),
            ));
        }
        Ok(choices)
    }
}

/// One admitted generation's choices; released on drop.
pub(crate) struct InFlight(Arc<AppState>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// What is known about a request by the time it is answered; written to the audit log (and, for
/// generations, the latency and token metrics) when dropped. A stream carries its record until
/// its last byte (or until the client goes away).
pub(crate) struct Record {
    pub(crate) state: Arc<AppState>,
    pub(crate) id: Arc<str>,
    /// The client's `x-request-id` (checked), kept apart from `id`.
    pub(crate) client_request_id: Option<Arc<str>>,
    pub(crate) method: &'static str,
    pub(crate) route: &'static str,
    pub(crate) principal: Option<Arc<Principal>>,
    pub(crate) start: Instant,
    pub(crate) status: u16,
    pub(crate) model: Option<String>,
    /// The model's own metrics (vLLM's names).
    pub(crate) model_metrics: Option<Arc<ModelMetrics>>,
    /// Choices the request asked the engine for (prompts times n), and those that finished: the
    /// rest count as aborted when the record drops.
    pub(crate) choices: usize,
    pub(crate) choices_finished: usize,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) prompt_text: Option<String>,
    /// Counts as a generation for the latency/token metrics.
    pub(crate) generation: bool,
    pub(crate) in_flight: Option<InFlight>,
    /// Tokens reserved from the principal's token budget; what the request did not use (its
    /// prompt and completion tokens) is given back when the record drops, however it ended.
    pub(crate) reserved_tokens: usize,
    /// Leave out of the audit log (health probes).
    pub(crate) quiet: bool,
    /// The peer's address (`None` on Unix sockets), for the access log.
    pub(crate) client: Option<SocketAddr>,
    /// Moved into a stream: this copy records nothing.
    detached: bool,
}

impl Record {
    pub(crate) fn new(
        state: Arc<AppState>,
        id: Arc<str>,
        method: &'static str,
        route: &'static str,
        start: Instant,
    ) -> Self {
        Record {
            state,
            id,
            client_request_id: None,
            method,
            route,
            principal: None,
            start,
            status: 0,
            model: None,
            model_metrics: None,
            choices: 0,
            choices_finished: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            prompt_text: None,
            generation: false,
            in_flight: None,
            reserved_tokens: 0,
            quiet: false,
            client: None,
            detached: false,
        }
    }

    /// Moves the record into a stream answered with 200; this one goes silent.
    pub(crate) fn detach(&mut self) -> Record {
        self.detached = true;
        Record {
            state: self.state.clone(),
            id: self.id.clone(),
            client_request_id: self.client_request_id.clone(),
            method: self.method,
            route: self.route,
            principal: self.principal.clone(),
            start: self.start,
            status: 200,
            model: self.model.take(),
            model_metrics: self.model_metrics.take(),
            choices: std::mem::take(&mut self.choices),
            choices_finished: std::mem::take(&mut self.choices_finished),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            prompt_text: self.prompt_text.take(),
            generation: self.generation,
            in_flight: self.in_flight.take(),
            reserved_tokens: std::mem::take(&mut self.reserved_tokens),
            quiet: self.quiet,
            client: self.client,
            detached: false,
        }
    }

    /// Whether prompt text should be kept for the audit log.
    pub(crate) fn wants_prompt_text(&self) -> bool {
        self.state.audit.as_ref().is_some_and(|a| a.log_prompts)
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let s = &self.state;
        let latency = self.start.elapsed();
        if let Some(m) = self.model_metrics.as_ref().filter(|_| self.generation) {
            if self.status == 200 {
                m.e2e.observe(latency);
            }
            let unfinished = self.choices.saturating_sub(self.choices_finished);
            if unfinished > 0 {
                m.count_finished(None, unfinished as u64);
            }
        }
        if self.generation && self.status == 200 {
            s.metrics.e2e.observe(latency);
            s.metrics
                .prompt_tokens
                .fetch_add(self.prompt_tokens as u64, Ordering::Relaxed);
        }
        if self.generation {
            s.metrics
                .generation_tokens
                .fetch_add(self.completion_tokens as u64, Ordering::Relaxed);
        }
        if let Some(p) = self.principal.as_ref().filter(|_| self.reserved_tokens > 0) {
            let used = self.prompt_tokens.saturating_add(self.completion_tokens);
            s.limiter.settle_tokens(p, self.reserved_tokens, used);
        }
        if s.config.access_log {
            self.log_access(latency);
        }
        if let Some(audit) = s.audit.as_ref().filter(|_| !self.quiet) {
            audit.record(&AuditEntry {
                time: rfc3339_now(),
                request_id: &self.id,
                client_request_id: self.client_request_id.as_deref(),
                principal: self.principal.as_ref().map(|p| p.name.as_str()),
                credential_id: self.principal.as_ref().map(|p| p.id.as_str()),
                method: self.method,
                route: self.route,
                status: self.status,
                model: self.model.as_deref(),
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                latency_ms: (latency.as_secs_f64() * 1e6).round() / 1e3,
                prompt: self.prompt_text.as_deref(),
            });
        }
    }
}

/// One access-log event at `$level`: tracing fixes an event's level at its call site.
macro_rules! access_event {
    ($level:expr, $rec:expr, $latency_ms:expr) => {
        tracing::event!(
            target: "autoglm::access",
            $level,
            request_id = &*$rec.id,
            client_request_id = $rec.client_request_id.as_deref(),
            principal = $rec.principal.as_ref().map(|p| p.name.as_str()),
            credential_id = $rec.principal.as_ref().map(|p| p.id.as_str()),
            method = $rec.method,
            route = $rec.route,
            status = $rec.status,
            model = $rec.model.as_deref(),
            prompt_tokens = $rec.prompt_tokens,
            completion_tokens = $rec.completion_tokens,
            latency_ms = $latency_ms,
            client = $rec.client.map(tracing::field::display),
            "request"
        )
    };
}

impl Record {
    /// The access log's line (target `autoglm::access`): info, or debug for probes (`/health`,
    /// `/ready`, `/metrics`) so they do not flood it. Never the prompt; the principal by name and
    /// credential id, never the key.
    fn log_access(&self, latency: std::time::Duration) {
        let latency_ms = (latency.as_secs_f64() * 1e6).round() / 1e3;
        if self.quiet || self.route == "/metrics" {
            access_event!(tracing::Level::DEBUG, self, latency_ms);
        } else {
            access_event!(tracing::Level::INFO, self, latency_ms);
        }
    }
}
