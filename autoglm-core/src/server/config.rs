//! Server configuration: plain structs with `Default` and `validate()`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::audit::AuditConfig;
use super::auth::AuthConfig;
use super::ratelimit::RateLimits;
use crate::error::{Error, Result};
use crate::net::listener::secs_opt;
use crate::net::{BindAddr, HttpOptions, SocketOptions, TlsFiles};

/// Largest [`ServerConfig::stream_interval`].
pub const MAX_STREAM_INTERVAL: usize = 256;

/// Request limits of the API layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body; larger ones get a 413. The default, 32 MiB, takes a chat with
    /// several full-resolution phone screenshots (a 1080x2400 PNG is 1-4 MB as base64).
    pub max_body_bytes: usize,
    /// Time to receive a request body; slower clients get a 408.
    #[serde(with = "secs_opt")]
    pub body_read_timeout: Option<Duration>,
    /// Longest a generation may run (streamed or not), from arrival; `None` is unlimited. Past it
    /// a non-streamed request gets a 504 and a stream ends with an error event; either way the
    /// request is cancelled.
    #[serde(with = "secs_opt")]
    pub request_timeout: Option<Duration>,
    /// Generated choices (sequences) in flight at most, over all requests: a request counts
    /// its prompts times `n`; one that would go over gets a 503.
    pub max_concurrent_requests: usize,
    /// Refuse new generations (503) when a model's engine has this many sequences waiting, or
    /// would with the request's choices added.
    pub max_waiting_requests: Option<usize>,
    /// Choices one request may create (prompts times `n`); more is a 400. Bounds the work one
    /// small body can queue.
    pub max_choices_per_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 20,
            body_read_timeout: Some(Duration::from_secs(30)),
            request_timeout: None,
            max_concurrent_requests: 4096,
            max_waiting_requests: None,
            max_choices_per_request: 128,
        }
    }
}

/// The longest timeout or grace period a configuration may give.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything [`Server::bind`](super::Server::bind) needs besides the models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on.
    pub listen: Vec<BindAddr>,
    /// Socket options.
    pub socket: SocketOptions,
    /// HTTP limits and timeouts.
    pub http: HttpOptions,
    /// Serve TLS 1.3 on every listener.
    pub tls: Option<TlsFiles>,
    /// API limits.
    pub limits: Limits,
    /// Keys, JWTs, roles and rate limits.
    pub auth: AuthConfig,
    /// Audit log.
    pub audit: Option<AuditConfig>,
    /// One `tracing` event per answered request at target `autoglm::access` (id, principal,
    /// method, route, status, tokens, latency, client address; never the prompt): info, debug
    /// for `/health`, `/ready` and `/metrics`. `false` turns it off (vLLM's
    /// `--disable-log-requests`). Default on.
    pub access_log: bool,
    /// On shutdown, how long open requests may take to finish once the listeners have stopped
    /// accepting (after `shutdown_drain_delay`). A stream still running then ends with an error
    /// event (code `server_shutdown`) and `[DONE]`, a non-streamed request gets a 503; the
    /// process is done within `shutdown_drain_delay + shutdown_grace` and about 2 s.
    #[serde(with = "secs_opt")]
    pub shutdown_grace: Option<Duration>,
    /// On shutdown, `/ready` answers 503 at once, but the listeners go on accepting (and serving)
    /// for this long before they stop, so that load balancers see the failing probe and take the
    /// instance out of rotation first (the preStop window of a Kubernetes rollout). `None` (the
    /// default for an embedded server, whose host decides when it stops) or 0: stop accepting at
    /// once. `examples/serve` and `autoglm serve`, processes behind load balancers, use 5 s.
    #[serde(with = "secs_opt")]
    pub shutdown_drain_delay: Option<Duration>,
    /// `DELETE /admin/models/{name}` waits this long at most for the model's running requests
    /// to finish; then its engine is stopped, which ends them (a stream gets an error event, or
    /// nothing if its client does not read) and frees the model's memory. `None` waits forever.
    #[serde(with = "secs_opt")]
    pub unload_timeout: Option<Duration>,
    /// Raise the open-file limit to its hard maximum at start.
    pub raise_nofile_limit: bool,
    /// Threads that tokenize prompts and render chat templates for large requests, off the
    /// HTTP workers; 0: one per allowed core, at most 4. Ignored when `prep_cores` is given.
    pub prep_threads: usize,
    /// Pin one of those threads to each of these cores (the HTTP cores, in a pinned layout).
    pub prep_cores: Vec<usize>,
    /// Requests being prepared or waiting for one of those threads at most; more wait for a slot
    /// without holding a thread.
    pub prep_queue: usize,
    /// Streamed token events written to the socket together (1 to 256; like vLLM's and SGLang's
    /// `--stream-interval`). Every token stays its own SSE event; with `k > 1` a stream's events
    /// are held until `k` are ready (the first token, a choice's last one and the end are sent at
    /// once), so a connection costs one socket write per `k` tokens instead of one per token, at
    /// the price of burstier delivery. 1 (the default) writes each event as it is produced.
    pub stream_interval: usize,
    /// A response (streamed or not) whose socket takes no byte for this long is abandoned: the
    /// connection is closed and its request cancelled, which frees its place under
    /// `max_concurrent_requests`, its model lease and its KV blocks. Meanwhile a stream whose
    /// client does not read holds back only its own request (a bounded queue of its output
    /// waits; the engine goes on with the others). `None` waits forever.
    #[serde(with = "secs_opt")]
    pub stream_write_timeout: Option<Duration>,
    /// Which requests may reuse each other's cached prompt blocks (see [`PrefixCacheScope`]).
    pub prefix_cache_scope: PrefixCacheScope,
    /// `POST /admin/models` loads only directories under this one (`--model-root`); `None`
    /// refuses loading by path.
    pub model_root: Option<std::path::PathBuf>,
    /// How tool calls are read out of the model's text for `tool_choice: "auto"`
    /// (`--tool-call-parser`); `None` refuses `"auto"`.
    pub tool_call_parser: Option<ToolCallParser>,
    /// `tools` without a `tool_choice` mean `"auto"` (`--enable-auto-tool-choice`; needs a
    /// parser). Without it they mean `"none"`: the tools reach the template, calls stay text.
    pub enable_auto_tool_choice: bool,
    /// Cross-origin requests from browsers (vLLM's `--allowed-origins` and friends). Off (no
    /// CORS header on any response) unless origins are given.
    pub cors: CorsConfig,
    /// `/metrics` answers anyone, without a key (`--metrics-public`), for a Prometheus that
    /// scrapes without credentials on a private network. Off: only the `admin` role (or a role
    /// granted `/metrics`) reads it when authentication is on.
    pub metrics_public: bool,
}

/// Cross-origin resource sharing, as vLLM configures it (FastAPI's `CORSMiddleware`). A request
/// whose `Origin` is allowed gets `Access-Control-Allow-Origin: <its origin>` and `Vary: Origin`
/// on its response (streams too); a preflight (`OPTIONS` with `Access-Control-Request-Method`)
/// from an allowed origin to an API route is answered 204 before authentication, since browsers
/// send preflights without credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed (`https://app.example.com`), or `*` for any; empty turns CORS off.
    pub allowed_origins: Vec<String>,
    /// Methods a preflight allows; `*` (the default) allows every method a route serves.
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight allows; `*` (the default) allows those the preflight asks for
    /// plus `authorization`, `content-type` and `x-request-id` (a literal `*` would not cover
    /// `Authorization` in browsers).
    pub allowed_headers: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` (cookies, client certificates).
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer (`Access-Control-Max-Age`), in seconds.
    pub max_age_s: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allowed_methods: vec!["*".into()],
            allowed_headers: vec!["*".into()],
            allow_credentials: false,
            max_age_s: 600,
        }
    }
}

impl CorsConfig {
    /// Whether CORS is on.
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }

    /// Whether `origin` may read responses.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    fn validate(&self) -> Result<()> {
        // Each ends up in a header value: it must be one.
        for (field, list) in [
            ("cors.allowed_origins", &self.allowed_origins),
            ("cors.allowed_methods", &self.allowed_methods),
            ("cors.allowed_headers", &self.allowed_headers),
        ] {
            let bad = |v: &String| v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic());
            if let Some(v) = list.iter().find(|v| bad(v)) {
                return Err(Error::config(
                    field,
                    format!("{v:?} (must be non-empty visible ASCII, without spaces)"),
                ));
            }
        }
        if self.allowed_origins.iter().any(|o| o.ends_with('/')) {
            return Err(Error::config(
                "cors.allowed_origins",
                "an origin has no path or trailing slash (`https://app.example.com`)",
            ));
        }
        Ok(())
    }
}

/// The model's own tool-call format (vLLM's `--tool-call-parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolCallParser {
    /// GLM-4.5 and later (`glm45`, vLLM's `glm4_moe` / `glm47`): `<tool_call>NAME
    /// <arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`.
    Glm45,
    /// GLM-4 (`glm-4-9b-chat`, GLM-4-0414): the reply starts with the function's name on its own
    /// line, then its arguments as a JSON object.
    Glm4,
}

impl std::str::FromStr for ToolCallParser {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "glm45" | "glm4_moe" | "glm47" => Ok(ToolCallParser::Glm45),
            "glm4" => Ok(ToolCallParser::Glm4),
            _ => Err(Error::config(
                "tool_call_parser",
                format!("{s:?} is not a known parser (glm45, glm4_moe, glm47, glm4)"),
            )),
        }
    }
}

/// How far the prefix cache is shared (`--prefix-cache-scope`). A reused prefix answers much
/// sooner than a computed one, so whoever can send prompts can probe, by timing, whether a
/// prompt prefix was sent recently. Requests with a `cache_salt` share only with requests of the
/// same salt in either scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixCacheScope {
    /// One principal (API key or JWT issuer + subject) never reuses another's blocks: no
    /// cross-tenant timing probe (the default). Without authentication all requests are one
    /// principal and share, as in `global`.
    #[default]
    Principal,
    /// Every request may reuse every other's blocks (vLLM's behaviour): the most reuse, e.g. of a
    /// system prompt common to all tenants, for deployments whose clients trust each other.
    Global,
}

impl std::str::FromStr for PrefixCacheScope {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "principal" => Ok(PrefixCacheScope::Principal),
            "global" => Ok(PrefixCacheScope::Global),
            _ => Err(Error::config(
                "prefix_cache_scope",
                format!("{s:?} is neither \"principal\" nor \"global\""),
            )),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![BindAddr::Tcp(([127, 0, 0, 1], 8000).into())],
            socket: SocketOptions::default(),
            http: HttpOptions::default(),
            tls: None,
            limits: Limits::default(),
            auth: AuthConfig::default(),
            audit: None,
            access_log: true,
            shutdown_grace: Some(Duration::from_secs(30)),
            shutdown_drain_delay: None,
            unload_timeout: Some(Duration::from_secs(30)),
            prep_threads: 0,
            prep_cores: Vec::new(),
            prep_queue: 64,
            raise_nofile_limit: true,
            stream_interval: 1,
            stream_write_timeout: Some(Duration::from_secs(30)),
            prefix_cache_scope: PrefixCacheScope::default(),
            model_root: None,
            tool_call_parser: None,
            enable_auto_tool_choice: false,
            cors: CorsConfig::default(),
            metrics_public: false,
        }
    }
}

impl ServerConfig {
    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        if self.listen.is_empty() {
            return Err(Error::config("listen", "no address to listen on"));
        }
        if self.enable_auto_tool_choice && self.tool_call_parser.is_none() {
            return Err(Error::config(
                "enable_auto_tool_choice",
                "needs a tool_call_parser (--tool-call-parser glm45 or glm4)",
            ));
        }
        for (field, d) in [
            ("limits.body_read_timeout", self.limits.body_read_timeout),
            ("limits.request_timeout", self.limits.request_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("shutdown_drain_delay", self.shutdown_drain_delay),
            ("unload_timeout", self.unload_timeout),
            ("stream_write_timeout", self.stream_write_timeout),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.idle_timeout", self.http.idle_timeout),
            (
                "http.tls_handshake_timeout",
                self.http.tls_handshake_timeout,
            ),
            (
                "http.http2_keepalive_interval",
                self.http.http2_keepalive_interval,
            ),
            ("socket.keepalive", self.socket.keepalive),
        ] {
            // Deadlines are instants: a duration past any clock's range would overflow them.
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(Error::config(
                    field,
                    format!(
                        "{:.0} s (at most {} s, a year)",
                        d.unwrap_or_default().as_secs_f64(),
                        MAX_DURATION.as_secs()
                    ),
                ));
            }
        }
        if self.socket.acceptors == 0 {
            return Err(Error::config("socket.acceptors", "0 (must be positive)"));
        }
        if self.http.max_connections == 0 {
            return Err(Error::config(
                "http.max_connections",
                "0 (must be positive)",
            ));
        }
        if self.http.max_connections_per_ip == Some(0) {
            return Err(Error::config(
                "http.max_connections_per_ip",
                "0 (must be positive; leave it unset for half of http.max_connections)",
            ));
        }
        if self.limits.max_body_bytes == 0 {
            return Err(Error::config(
                "limits.max_body_bytes",
                "0 (must be positive)",
            ));
        }
        crate::threading::check_cores(&self.prep_cores)?;
        if self.prep_queue == 0 {
            return Err(Error::config("prep_queue", "0 (must be positive)"));
        }
        if self.limits.max_choices_per_request == 0 {
            return Err(Error::config(
                "limits.max_choices_per_request",
                "0 (must be positive)",
            ));
        }
        if self.limits.max_concurrent_requests == 0 {
            return Err(Error::config(
                "limits.max_concurrent_requests",
                "0 (must be positive)",
            ));
        }
        if !(1..=MAX_STREAM_INTERVAL).contains(&self.stream_interval) {
            return Err(Error::config(
                "stream_interval",
                format!(
                    "{} (must be 1 to {MAX_STREAM_INTERVAL})",
                    self.stream_interval
                ),
            ));
        }
        self.cors.validate()?;
        check_rate_limits("auth.default_limits", &self.auth.default_limits)?;
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            if let Some(l) = &k.limits {
                check_rate_limits(&format!("auth.api_keys[{i}].limits"), l)?;
            }
        }
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            let known =
                k.role == "admin" || k.role == "user" || self.auth.roles.contains_key(&k.role);
            if !known {
                return Err(Error::config(
                    "auth.api_keys",
                    format!("key {i} has role {:?}, which is not defined", k.role),
                ));
            }
        }
        // Names identify keys (`key:<name>` keys their rate-limit buckets and audit lines), so
        // they must be unique across every source of keys; an unnamed key is `key-N`.
        let names = self.auth.api_keys.iter().enumerate();
        let names = names.map(|(i, k)| (i, k.display_name(i)));
        if let Some((first, i, name)) = super::auth::first_duplicate(names) {
            return Err(Error::config(
                "auth.api_keys",
                format!(
                    "keys {first} and {i} are both named {name:?} (names must be unique; an \
                     unnamed key is named key-N, N its index)"
                ),
            ));
        }
        Ok(())
    }
}

/// Rates are per minute and at least 1: a bucket holds one minute's worth, so a smaller rate
/// could never hold the one request (or the two tokens) the least request needs. Unlimited is
/// `None` (no flag), not 0.
fn check_rate_limits(at: &str, l: &RateLimits) -> Result<()> {
    for (name, v) in [
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
    ] {
        if let Some(x) = v.filter(|x| !(x.is_finite() && *x >= 1.0)) {
            return Err(Error::config(
                format!("{at}.{name}"),
                format!("{x} (must be a finite number of at least 1; leave it unset for no limit)"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_past_a_year_are_refused_by_name() {
        let mut c = ServerConfig::default();
        c.limits.request_timeout = Some(Duration::from_secs_f64(1e19));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.request_timeout"), "{e}");
        c.limits.request_timeout = Some(MAX_DURATION);
        c.http.idle_timeout = Some(Duration::MAX);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("http.idle_timeout"), "{e}");
        c.http.idle_timeout = None;
        c.validate().unwrap();
    }

    #[test]
    fn rate_limits_below_one_a_minute_are_refused_by_name() {
        use crate::server::ApiKey;
        for bad in [0.0, -1.0, 0.5, f64::NAN, f64::INFINITY] {
            let mut c = ServerConfig::default();
            c.auth.default_limits.requests_per_minute = Some(bad);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("auth.default_limits.requests_per_minute"), "{e}");
            let mut c = ServerConfig::default();
            c.auth.api_keys.push(ApiKey {
                key: "k".into(),
                name: None,
                role: "user".into(),
                priority: 0,
                limits: Some(RateLimits {
                    requests_per_minute: Some(10.0),
                    tokens_per_minute: Some(bad),
                }),
            });
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("auth.api_keys[0].limits.tokens_per_minute"),
                "{e}"
            );
        }
        let mut c = ServerConfig::default();
        c.auth.default_limits.tokens_per_minute = Some(1.0);
        c.auth.default_limits.requests_per_minute = Some(1e9);
        c.validate().unwrap();
    }

    #[test]
    fn connection_and_write_limits_are_checked_by_name() {
        let mut c = ServerConfig::default();
        c.http.max_connections_per_ip = Some(0);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("http.max_connections_per_ip"), "{e}");
        c.http.max_connections_per_ip = None;
        assert_eq!(c.http.per_ip_cap(), 5000);
        c.stream_write_timeout = Some(Duration::MAX);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("stream_write_timeout"), "{e}");
        c.stream_write_timeout = None;
        c.validate().unwrap();
    }

    #[test]
    fn cors_lists_are_checked_by_name() {
        let mut c = ServerConfig::default();
        assert!(!c.cors.enabled());
        c.cors.allowed_origins = vec!["https://a.example".into()];
        c.validate().unwrap();
        assert!(c.cors.allows_origin("https://A.example"));
        assert!(!c.cors.allows_origin("https://b.example"));
        c.cors.allowed_origins.push("https://b.example/".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cors.allowed_origins"), "{e}");
        c.cors.allowed_origins = vec!["*".into()];
        assert!(c.cors.allows_origin("http://localhost:3000"));
        c.cors.allowed_headers = vec!["x y".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cors.allowed_headers"), "{e}");
    }

    #[test]
    fn shutdown_and_unload_durations_are_checked_by_name() {
        let mut c = ServerConfig::default();
        assert_eq!(c.shutdown_drain_delay, None);
        c.shutdown_drain_delay = Some(Duration::from_secs_f64(1e10));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("shutdown_drain_delay"), "{e}");
        c.shutdown_drain_delay = Some(Duration::ZERO);
        c.validate().unwrap();
        assert_eq!(c.unload_timeout, Some(Duration::from_secs(30)));
        c.unload_timeout = Some(Duration::MAX);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("unload_timeout"), "{e}");
        c.unload_timeout = None;
        c.validate().unwrap();
    }
}
