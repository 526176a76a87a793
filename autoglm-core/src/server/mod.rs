//! An OpenAI-compatible HTTP server over one or more engines.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events or
//! not), `GET /v1/models[/{id}]`, vLLM's `POST /tokenize` and `POST /detokenize`, `GET /health`,
//! `GET /ready`, `GET /metrics` (Prometheus text), and for role `admin` `GET|POST /admin/models`
//! and `DELETE /admin/models/{name}` to load and unload models without a restart. Every response
//! carries `x-request-id`: the client's when it sent one of 1 to 128 visible ASCII characters (any
//! other is ignored), else the server's own id. The client's id is only echoed and audited as
//! `client_request_id`; completion ids and the audit `request_id` are always the server's. Errors have OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! A streamed request costs one task wake-up and one buffer per event: the handler's stream is
//! polled by hyper's connection task itself (no forwarding task, no channel), each event is
//! serialized once into an exact-size buffer (see [`body`]) and written with a vectored write. A
//! client that disconnects drops the body, which drops the engine stream, which cancels the request
//! and frees its KV blocks at the engine's next step. A client that stops reading exerts
//! backpressure on its own request only: once a bounded queue of its output waits, the engine holds
//! that request back (never blocking on it), and once its socket has taken nothing for
//! [`ServerConfig::stream_write_timeout`] the connection is closed, which cancels it the same way.
//!
//! ```no_run
//! use std::sync::Arc;
//! use autoglm_core::server::{ModelRegistry, Server, ServerConfig};
//! use autoglm_core::{Engine, EngineConfig};
//!
//! # async fn run() -> autoglm_core::Result<()> {
//! let models = Arc::new(ModelRegistry::new(EngineConfig::default()));
//! models.load("glm-4-9b", "path/to/glm-4-9b-chat-hf".as_ref())?;
//! let server = Server::bind(ServerConfig::default(), models)?;
//! let handle = server.handle();
//! tokio::spawn(async move {
//!     if let Ok(signal) = autoglm_core::net::shutdown_signal() {
//!         signal.await;
//!     }
//!     handle.shutdown();
//! });
//! server.run().await;
//! # Ok(()) }
//! ```

mod audit;
mod auth;
mod body;
mod chat;
mod completions;
mod config;
mod cors;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod generate;
mod logprobs;
mod metrics;
mod models;
mod prep;
mod protocol;
mod ratelimit;
mod router;
mod state;
mod tokenize;
mod tools;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

pub use audit::AuditConfig;
pub use auth::{read_api_keys_file, ApiKey, AuthConfig, JwtConfig, Principal};
pub use body::Body;
pub use config::{
    CorsConfig, Limits, PrefixCacheScope, ServerConfig, ToolCallParser, MAX_STREAM_INTERVAL,
};
pub use models::{ModelEntry, ModelLease, ModelRegistry, Unload};
pub use ratelimit::RateLimits;

use crate::error::Result;
use crate::net::{BindAddr, NetServer};
use router::AppHandler;
use state::AppState;

/// Stops a running [`Server`] gracefully; cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerHandle(Arc<watch::Sender<bool>>);

impl ServerHandle {
    /// Begins graceful shutdown: `/ready` answers 503 at once; the listeners go on accepting for
    /// [`ServerConfig::shutdown_drain_delay`], then stop and new generations are refused; open
    /// requests get [`ServerConfig::shutdown_grace`] to finish, after which a stream still running
    /// ends with an error event (code `server_shutdown`) and `[DONE]`, and a non-streamed request
    /// gets a 503; then the connections close.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A bound server; [`run`](Server::run) serves until [`ServerHandle::shutdown`].
pub struct Server {
    net: NetServer<AppHandler>,
    state: Arc<AppState>,
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Validates the configuration, loads TLS files, opens the audit log and binds the listeners.
    /// Must run inside a tokio runtime.
    pub fn bind(config: ServerConfig, models: Arc<ModelRegistry>) -> Result<Server> {
        config.validate()?;
        if config.raise_nofile_limit {
            // Best effort: without it the connection cap may meet the fd limit first.
            let _ = crate::net::raise_nofile_limit();
        }
        let tls = config
            .tls
            .as_ref()
            .map(crate::net::tls_server_config)
            .transpose()?;
        let auth = auth::Auth::new(&config.auth)?;
        let metrics = metrics::Metrics::default();
        let audit = config
            .audit
            .as_ref()
            .map(|c| audit::AuditLog::open(c, metrics.audit_lines_dropped.clone()))
            .transpose()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (std::process::id() as u64) << 32;
        let state = Arc::new(AppState {
            models,
            metrics,
            auth,
            limiter: ratelimit::RateLimiter::default(),
            audit,
            prep: prep::PrepPool::new(config.prep_threads, &config.prep_cores, config.prep_queue)?,
            shutting_down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            ending: watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            net: OnceLock::new(),
            id_prefix: format!("{:016x}", splitmix(seed)),
            id_counter: AtomicUsize::new(0),
            config,
        });
        let c = &state.config;
        let net = NetServer::bind(
            &c.listen,
            c.socket.clone(),
            c.http.clone(),
            tls,
            AppHandler(state.clone()),
        )?
        .with_write_timeout(c.stream_write_timeout);
        let _ = state.net.set(net.stats());
        Ok(Server {
            net,
            state,
            stop: Arc::new(watch::Sender::new(false)),
        })
    }

    /// The addresses bound, with resolved ports.
    pub fn local_addrs(&self) -> Vec<BindAddr> {
        self.net.local_addrs()
    }

    /// A handle to stop the server.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(self.stop.clone())
    }

    /// The served models.
    pub fn models(&self) -> Arc<ModelRegistry> {
        self.state.models.clone()
    }

    /// Serves until [`ServerHandle::shutdown`], then drains and returns.
    pub async fn run(self) {
        let mut stop = self.stop.subscribe();
        let state = self.state.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
            state.shutting_down.store(true, Ordering::Relaxed);
            // Load balancers see /ready fail and stop sending; meanwhile whatever still arrives
            // is served.
            if let Some(delay) = state.config.shutdown_drain_delay {
                tokio::time::sleep(delay).await;
            }
            state.draining.store(true, Ordering::Relaxed);
        };
        let grace = self
            .state
            .config
            .shutdown_grace
            .unwrap_or(Duration::from_secs(0));
        let state = self.state.clone();
        self.net
            .run_with(shutdown, grace, move || {
                state.ending.send_replace(true);
            })
            .await;
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
