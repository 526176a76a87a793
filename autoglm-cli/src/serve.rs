//! `autoglm serve`: the OpenAI-compatible server over one or more checkpoints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use autoglm_core::net::{BindAddr, TlsFiles};
use autoglm_core::server::{
    read_api_keys_file, ApiKey, AuditConfig, JwtConfig, ModelRegistry, RateLimits, Server,
    ServerConfig,
};
use autoglm_core::{Engine, Error};
use clap::Args;

use crate::args::{bundled_model, EngineArgs, List};

/// `autoglm serve`: serve models over an OpenAI-compatible HTTP API until SIGINT or SIGTERM.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file of flag values (keys are flag names, `max-num-seqs = 128`); the environment and
    /// the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The model to serve, as `vllm serve MODEL`: a checkpoint directory or a Hugging Face id in
    /// the local cache.
    #[arg(value_name = "MODEL")]
    model_tag: Option<String>,
    /// A checkpoint to serve: DIR, a Hugging Face id (ORG/NAME, from the local cache) or
    /// NAME=DIR (repeatable). Default: the bundled tiny model.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Name of the model given by a lone `--model DIR` (default: the directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Listen on this Unix socket too (or only, with --no-tcp).
    #[arg(long, visible_alias = "unix-socket")]
    uds: Option<PathBuf>,
    /// Extra listen address (host:port, [v6]:port or unix:/path; repeatable).
    #[arg(long = "listen")]
    listen: Vec<String>,
    /// Do not listen on --host/--port.
    #[arg(long)]
    no_tcp: bool,
    /// Certificate chain (PEM) for TLS 1.3.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for TLS 1.3.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// API key with role `user` (repeatable).
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// API key with role `admin` (repeatable).
    #[arg(long = "admin-api-key")]
    admin_api_keys: Vec<String>,
    /// TOML file of `[[keys]]` with key, name, role, priority and limits.
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// Accept HS256 JWTs signed with this secret.
    #[arg(long)]
    jwt_hs256_secret: Option<String>,
    /// Accept HS256 JWTs signed with the secret in this file.
    #[arg(long)]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// Accept RS256 JWTs verified by this PEM public key.
    #[arg(long)]
    jwt_rs256_public_key: Option<PathBuf>,
    /// Required JWT audience (repeatable: any of them).
    #[arg(long = "jwt-audience")]
    jwt_audience: Vec<String>,
    /// Required JWT issuer (repeatable: any of them).
    #[arg(long = "jwt-issuer")]
    jwt_issuer: Vec<String>,
    /// Requests per minute per principal, at least 1 (default: unlimited).
    #[arg(long)]
    requests_per_minute: Option<f64>,
    /// Prompt plus generated tokens per minute per principal, at least 1 (default: unlimited).
    /// A generation reserves its prompt plus max_tokens for each choice when admitted and gets
    /// back what it did not use; one that could cost more than a minute's worth is a 400.
    #[arg(long)]
    tokens_per_minute: Option<f64>,
    /// Append a JSON line per request to this file (`-` for stderr).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Include prompts in the audit log.
    #[arg(long)]
    audit_log_prompts: bool,
    /// Open connections at most (more get a 503).
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Open connections from one client address (IPv6: one /64) at most; more are closed at
    /// once (default: half of --max-connections; behind a proxy, give --max-connections).
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// Generated choices in flight at most, over all requests (a request counts its prompts
    /// times n; more get a 503).
    #[arg(long, default_value_t = 4096)]
    max_concurrent_requests: usize,
    /// Threads that tokenize and render large requests off the HTTP workers (default: one per
    /// HTTP core when pinned, else one per core, at most 4).
    #[arg(long, default_value_t = 0)]
    prep_threads: usize,
    /// Choices one request may create: prompts times n (more: 400).
    #[arg(long, default_value_t = 128)]
    max_choices_per_request: usize,
    /// Refuse generations (503) while an engine has this many sequences waiting.
    #[arg(long)]
    max_waiting_requests: Option<usize>,
    /// Largest request body in bytes (more: 413).
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Largest request head in bytes (more: 431).
    #[arg(long, default_value_t = 64 << 10)]
    max_header_bytes: usize,
    /// Seconds to send a request head (the first one counted from accept, so a socket that
    /// sends nothing is closed after it).
    #[arg(long, default_value_t = 30.0)]
    header_read_timeout: f64,
    /// Seconds a connection may sit idle.
    #[arg(long, default_value_t = 120.0)]
    idle_timeout: f64,
    /// Seconds a generation may take (default: unlimited).
    #[arg(long)]
    request_timeout: Option<f64>,
    /// Streamed token events written to the socket together (1 = each as it is produced; larger
    /// values cost fewer socket writes per token at many streams, delivering tokens in bursts).
    #[arg(long, default_value_t = 1)]
    stream_interval: usize,
    /// Seconds a response's socket may take no byte (a client that stopped reading) before the
    /// connection is closed and its request cancelled (0: wait forever).
    #[arg(long, default_value_t = 30.0)]
    stream_write_timeout: f64,
    /// Seconds open requests get to finish on SIGTERM/SIGINT once the listeners stop accepting
    /// (after --shutdown-drain-delay); streams still running then end with an error event
    /// (code server_shutdown) and [DONE], other requests get a 503.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Which requests may reuse each other's cached prompt blocks: `principal` (one API key or
    /// JWT subject never reuses another's, so no tenant can time another's prompts) or `global`
    /// (all share, as vLLM does). A request's `cache_salt` narrows either.
    #[arg(long, default_value = "principal")]
    prefix_cache_scope: String,
    /// POST /admin/models loads only checkpoint directories under this one (paths relative to
    /// it); without it, loading by path is refused.
    #[arg(long)]
    model_root: Option<PathBuf>,
    /// How tool calls are read out of the model's text for tool_choice "auto": glm45 (GLM-4.5
    /// and later, also glm4_moe / glm47) or glm4 (GLM-4, GLM-4-0414), as vLLM names them.
    #[arg(long)]
    tool_call_parser: Option<String>,
    /// Requests with tools and no tool_choice mean "auto" (needs --tool-call-parser).
    #[arg(long)]
    enable_auto_tool_choice: bool,
    /// Seconds between SIGTERM/SIGINT and the listeners' stop: /ready answers 503 at once while
    /// new connections are still accepted and served, so load balancers take the instance out of
    /// rotation first (a Kubernetes preStop window; 0: stop accepting at once).
    #[arg(long, default_value_t = 5.0)]
    shutdown_drain_delay: f64,
    /// Seconds DELETE /admin/models/NAME waits for the model's running requests before it stops
    /// its engine, ending them and freeing its memory (0: wait forever).
    #[arg(long, default_value_t = 30.0)]
    unload_timeout: f64,
    /// Listen backlog.
    #[arg(long, default_value_t = 1024)]
    backlog: u32,
    /// One SO_REUSEPORT socket per worker instead of one shared listening socket. Off by default:
    /// with it, another process of the same user can bind the same port and silently take a share
    /// of the connections.
    #[arg(long)]
    reuse_port: bool,
    /// TCP keepalive idle seconds (0: off).
    #[arg(long, default_value_t = 60.0)]
    keepalive: f64,
    /// SO_SNDBUF bytes (default: kernel autotuning).
    #[arg(long)]
    send_buffer_size: Option<usize>,
    /// SO_RCVBUF bytes (default: kernel autotuning).
    #[arg(long)]
    recv_buffer_size: Option<usize>,
    /// HTTP worker threads (default: one per core, or one per --http-cores entry).
    #[arg(long)]
    workers: Option<usize>,
    /// Keep the HTTP worker threads on these cores, e.g. 1,2,3 (with --engine-core 0, the engine
    /// loop then never shares its core with socket work).
    #[arg(long)]
    http_cores: Option<List<usize>>,
    /// Leave every thread to the OS scheduler. By default, serving one model on two cores or more
    /// without --engine-core or --http-cores, the engine loop runs on the first core and the
    /// HTTP threads on the others.
    #[arg(long)]
    no_pin: bool,
    /// Origins browsers may call the API from (`https://app.example.com`, or `*`; repeatable, or
    /// vLLM's JSON list `'["*"]'`). Responses to them carry CORS headers and their preflights are
    /// answered. Default: none (no CORS headers).
    #[arg(long = "allowed-origins", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Methods a CORS preflight allows (default `*`: each route's own; or a JSON list).
    #[arg(long = "allowed-methods", value_name = "METHOD")]
    allowed_methods: Vec<String>,
    /// Request headers a CORS preflight allows (default `*`; or a JSON list).
    #[arg(long = "allowed-headers", value_name = "HEADER")]
    allowed_headers: Vec<String>,
    /// Allow credentialed cross-origin requests (Access-Control-Allow-Credentials).
    #[arg(long)]
    allow_credentials: bool,
    /// Serve /metrics to anyone, without a key (default: the admin role only).
    #[arg(long)]
    metrics_public: bool,
    /// No access-log line per request (target `autoglm::access`; vLLM's flag).
    #[arg(long, visible_alias = "disable-uvicorn-access-log")]
    disable_log_requests: bool,
    /// Seed of the engine's random numbers, for requests that give no seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Seconds as a duration (0 or less: none). One too long for a `Duration` saturates, and the
/// server configuration's check names the flag's field.
fn secs(x: f64) -> Option<Duration> {
    (x > 0.0).then(|| Duration::try_from_secs_f64(x).unwrap_or(Duration::MAX))
}

/// Seconds of a flag that must be a non-negative number (0: none); out-of-range large values are
/// left to `ServerConfig::validate`, which names the field.
fn non_negative_secs(flag: &str, x: f64) -> Result<Option<Duration>, Error> {
    if x.is_nan() || x < 0.0 {
        return Err(Error::config(
            flag,
            format!("{x} (must be a number of seconds, 0 or more)"),
        ));
    }
    Ok(secs(x))
}

fn read(path: &PathBuf) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })
}

fn invalid(field: &str, msg: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Values of a repeatable flag, each a plain value or vLLM's JSON list (`'["a", "b"]'`).
fn json_lists(flag: &str, values: &[String]) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for v in values {
        if v.trim_start().starts_with('[') {
            let list: Vec<String> = serde_json::from_str(v)
                .map_err(|e| invalid(flag, format!("{v:?} is not a JSON list of strings: {e}")))?;
            out.extend(list);
        } else {
            out.push(v.clone());
        }
    }
    Ok(out)
}

/// The server configuration the flags describe.
fn server_config(cli: &ServeArgs, workers: usize) -> Result<ServerConfig, Error> {
    let mut c = ServerConfig::default();
    c.listen.clear();
    if !cli.no_tcp {
        let host = cli.host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = host
            .parse()
            .map_err(|_| invalid("host", format!("{:?} is not an IP address", cli.host)))?;
        c.listen.push(BindAddr::Tcp((ip, cli.port).into()));
    }
    if let Some(p) = &cli.uds {
        c.listen.push(BindAddr::Unix(p.clone()));
    }
    for l in &cli.listen {
        c.listen.push(l.parse()?);
    }
    c.socket.backlog = cli.backlog;
    c.socket.reuse_port = cli.reuse_port;
    c.socket.acceptors = workers;
    c.socket.keepalive = secs(cli.keepalive);
    c.socket.send_buffer_size = cli.send_buffer_size;
    c.socket.recv_buffer_size = cli.recv_buffer_size;
    c.http.max_connections = cli.max_connections;
    c.http.max_connections_per_ip = cli.max_connections_per_ip;
    c.http.max_header_bytes = cli.max_header_bytes;
    c.http.header_read_timeout = secs(cli.header_read_timeout);
    c.http.idle_timeout = secs(cli.idle_timeout);
    c.limits.max_body_bytes = cli.max_body_bytes;
    c.limits.request_timeout = cli.request_timeout.and_then(secs);
    c.limits.max_concurrent_requests = cli.max_concurrent_requests;
    c.limits.max_waiting_requests = cli.max_waiting_requests;
    c.limits.max_choices_per_request = cli.max_choices_per_request;
    c.prep_threads = cli.prep_threads;
    c.stream_interval = cli.stream_interval;
    c.stream_write_timeout = secs(cli.stream_write_timeout);
    c.prefix_cache_scope = cli.prefix_cache_scope.parse()?;
    c.model_root = cli.model_root.clone();
    c.tool_call_parser = cli
        .tool_call_parser
        .as_deref()
        .map(str::parse)
        .transpose()?;
    c.enable_auto_tool_choice = cli.enable_auto_tool_choice;
    c.shutdown_grace = Some(secs(cli.shutdown_grace).unwrap_or_default());
    c.shutdown_drain_delay = non_negative_secs("--shutdown-drain-delay", cli.shutdown_drain_delay)?;
    c.unload_timeout = non_negative_secs("--unload-timeout", cli.unload_timeout)?;
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        c.tls = Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    let key = |k: &String, role: &str, i: usize| ApiKey {
        key: k.clone(),
        name: Some(format!("{role}-key-{i}")),
        role: role.into(),
        priority: 0,
        limits: None,
    };
    let auth = &mut c.auth;
    auth.api_keys.extend(
        cli.api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| key(k, "user", i)),
    );
    auth.api_keys.extend(
        cli.admin_api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| key(k, "admin", i)),
    );
    if let Some(path) = &cli.api_keys_file {
        auth.api_keys.extend(read_api_keys_file(path)?);
    }
    let hs256 = match (&cli.jwt_hs256_secret, &cli.jwt_hs256_secret_file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(p)) => Some(read(p)?.trim().to_string()),
        (None, None) => None,
    };
    let rs256 = cli.jwt_rs256_public_key.as_ref().map(read).transpose()?;
    if hs256.is_some() || rs256.is_some() {
        auth.jwt = Some(JwtConfig {
            hs256_secret: hs256,
            rs256_public_key_pem: rs256,
            audience: cli.jwt_audience.clone(),
            issuer: cli.jwt_issuer.clone(),
            role_claim: None,
            leeway_s: 30,
        });
    }
    auth.default_limits = RateLimits {
        requests_per_minute: cli.requests_per_minute,
        tokens_per_minute: cli.tokens_per_minute,
    };
    c.access_log = !cli.disable_log_requests;
    let origins = json_lists("allowed_origins", &cli.allowed_origins)?;
    c.cors.allowed_origins = origins;
    if !cli.allowed_methods.is_empty() {
        c.cors.allowed_methods = json_lists("allowed_methods", &cli.allowed_methods)?;
    }
    if !cli.allowed_headers.is_empty() {
        c.cors.allowed_headers = json_lists("allowed_headers", &cli.allowed_headers)?;
    }
    c.cors.allow_credentials = cli.allow_credentials;
    c.metrics_public = cli.metrics_public;
    if let Some(path) = &cli.audit_log {
        c.audit = Some(AuditConfig {
            path: path.clone(),
            log_prompts: cli.audit_log_prompts,
        });
    }
    Ok(c)
}

/// (name, directory) of each model given (`MODEL` and `--model`), resolved: a Hugging Face id is
/// looked up in the local cache, and what is not a checkpoint directory is an error now, before
/// anything is bound or loaded.
fn model_specs(cli: &ServeArgs) -> Result<Vec<(String, PathBuf)>, Error> {
    let given: Vec<&String> = cli.model_tag.iter().chain(&cli.models).collect();
    if given.is_empty() && !bundled_model().join("config.json").is_file() {
        return Err(invalid(
            "model",
            format!(
                "no model given, and the bundled tiny model was not found (looked in {} and \
                 ./tests/fixtures/glm4-tiny); give one: autoglm serve DIR_OR_HF_ID",
                bundled_model().display()
            ),
        ));
    }
    if given.is_empty() {
        tracing::warn!(
            "no model given; serving the bundled tiny GLM-4 model at {} as `glm4-tiny`. Its weights are RANDOM: expect gibberish, not language.",
            bundled_model().display()
        );
        let name = cli.served_model_name.clone().unwrap_or("glm4-tiny".into());
        return Ok(vec![(name, bundled_model())]);
    }
    let lone = given.len() == 1;
    if !lone && cli.served_model_name.is_some() {
        return Err(invalid(
            "served_model_name",
            "needs a lone model; name several with --model NAME=DIR",
        ));
    }
    let revision = cli.engine.revision.as_deref();
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for spec in given {
        let (name, dir) = match spec.split_once('=') {
            Some((n, d)) if !n.is_empty() && !n.contains('/') => (Some(n.to_string()), d),
            _ => (None, spec.as_str()),
        };
        let given_path = PathBuf::from(dir);
        let resolved = autoglm_core::hub::resolve_model_dir_at(&given_path, revision)?;
        // A Hugging Face id names the model as vLLM names it (the id); a directory by its name.
        let default_name = if resolved != given_path && !given_path.exists() {
            Some(dir.to_string())
        } else {
            resolved
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        };
        let name = name
            .or_else(|| lone.then(|| cli.served_model_name.clone()).flatten())
            .or(default_name)
            .ok_or_else(|| invalid("model", format!("cannot name {spec:?}; use NAME=DIR")))?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(invalid(
                "model",
                format!("two models are named {name:?}; use --model NAME=DIR"),
            ));
        }
        out.push((name, resolved));
    }
    Ok(out)
}

/// Fails, before any model loads, when an address to listen on is taken: a TCP port another
/// socket listens on, or a Unix socket a live server accepts on. (The server binds again once the
/// models are loaded; with --reuse-port a shared port is what was asked for.)
fn check_addresses_free(config: &ServerConfig) -> Result<(), Error> {
    for addr in &config.listen {
        match addr {
            BindAddr::Tcp(sa) if sa.port() != 0 && !config.socket.reuse_port => {
                if let Err(e) = std::net::TcpListener::bind(sa) {
                    let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                        format!(
                            "another process listens there (`ss -ltnp 'sport = :{}'` shows \
                             which); stop it or pick another --port",
                            sa.port()
                        )
                    } else {
                        "check --host and --port".to_string()
                    };
                    return Err(Error::Io {
                        path: sa.to_string().into(),
                        source: std::io::Error::new(
                            e.kind(),
                            format!("cannot listen: {e}; {hint}"),
                        ),
                    });
                }
            }
            BindAddr::Unix(p) if std::os::unix::net::UnixStream::connect(p).is_ok() => {
                return Err(Error::Io {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "a live server accepts on this socket; stop it or pick another --uds",
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn run(cli: ServeArgs) -> Result<(), Error> {
    let specs = model_specs(&cli)?;
    let mut engine_config = cli.engine.config()?;
    engine_config.seed = cli.seed;
    let mut http_cores = cli.http_cores.clone().map(|l| l.0).unwrap_or_default();
    autoglm_core::threading::check_cores(&http_cores)
        .map_err(|e| invalid("http_cores", e.to_string()))?;
    let chosen = cli.engine.engine_core.is_some() || !http_cores.is_empty();
    if !cli.no_pin && !chosen && specs.len() == 1 {
        if let Some((engine, rest)) = autoglm_core::threading::serving_layout() {
            tracing::info!(
                "cores: engine loop on core {engine}, HTTP threads on {rest:?} (--no-pin leaves them to the OS)"
            );
            engine_config.threading.engine_core = Some(engine);
            http_cores = rest;
        }
    }
    let workers = cli
        .workers
        .or((!http_cores.is_empty()).then_some(http_cores.len()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut config = server_config(&cli, workers)?;
    if cli.prep_threads == 0 && !http_cores.is_empty() {
        // Large requests' tokenizing shares the HTTP cores, never the engine loop's.
        config.prep_cores = http_cores.clone();
    }
    config.validate()?;
    check_addresses_free(&config)?;
    let models = Arc::new(ModelRegistry::new(engine_config.clone()));
    for (name, dir) in specs {
        let t0 = std::time::Instant::now();
        let engine = Engine::from_dir(&dir, engine_config.clone())?;
        tracing::info!(
            "loaded `{name}` ({}, {} layers, context {}) from {} on {} in {:.2}s",
            engine.model_config().architecture.name(),
            engine.model_config().num_layers,
            engine.max_model_len(),
            dir.display(),
            engine.backend_name(),
            t0.elapsed().as_secs_f64()
        );
        models.add(&name, engine, Some(dir))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("autoglm-http")
        .on_thread_start(move || {
            if !http_cores.is_empty() {
                // Checked above; a failure here (the mask changed since) costs speed only.
                if let Err(e) = autoglm_core::threading::pin_current_thread_to(&http_cores) {
                    tracing::warn!("{e}");
                }
            }
        })
        .enable_all()
        .build()
        .map_err(|e| invalid("workers", e.to_string()))?;
    rt.block_on(async move {
        let server = Server::bind(config.clone(), models)?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        for a in server.local_addrs() {
            match a {
                BindAddr::Tcp(sa) => tracing::info!("listening on {scheme}://{sa}"),
                BindAddr::Unix(p) => tracing::info!("listening on unix:{} ({scheme})", p.display()),
            }
        }
        let handle = server.handle();
        let io = |e| Error::Io {
            path: "signal handlers".into(),
            source: e,
        };
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(io)?;
        let mut int = signal(SignalKind::interrupt()).map_err(io)?;
        let grace = config.shutdown_grace.unwrap_or_default();
        let drain = config.shutdown_drain_delay.unwrap_or_default();
        let serving = tokio::spawn(server.run());
        let abort = serving.abort_handle();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if first {
                    tracing::info!(
                        "{name}: stopping; /ready fails now, new connections are accepted for \
                         {:.0}s, then open requests get {:.0}s to finish (signal again to stop \
                         at once)",
                        drain.as_secs_f64(),
                        grace.as_secs_f64()
                    );
                    handle.shutdown();
                    first = false;
                } else {
                    tracing::info!("{name}: closing the remaining connections now");
                    abort.abort();
                    break;
                }
            }
        });
        // Cancelled by a second signal: the connections close as the task drops.
        let _ = serving.await;
        tracing::info!("stopped");
        Ok::<(), Error>(())
    })?;
    // Engines stop (their threads join) as the registry drops here.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
