//! Shared helpers of the server tests: engines on the fixture model (real CPU or null backend), an
//! in-process server on a loopback port, and small HTTP/1.1 clients (hyper's, and raw bytes for
//! malformed requests).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use autoglm_core::backend::null::{NullBackend, NullWeights};
use autoglm_core::model::{GlmModel, ModelConfig};
use autoglm_core::net::BindAddr;
use autoglm_core::server::{ModelRegistry, Server, ServerConfig, ServerHandle};
use autoglm_core::tokenizer::Tokenizer;
use autoglm_core::{Engine, EngineConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const MODEL: &str = "glm4-tiny";

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4-tiny")
}

pub fn expected() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn engine_config() -> EngineConfig {
    let mut c = EngineConfig::default();
    c.cache.memory_bytes = 64 << 20;
    c.scheduler.max_num_seqs = 256;
    c.threading.num_threads = Some(1);
    c
}

/// The fixture model on the CPU backend.
pub fn cpu_engine() -> Engine {
    Engine::from_dir(&fixture_dir(), engine_config()).unwrap()
}

/// The fixture's shape and tokenizer on the null backend (every token is id 0).
pub fn null_engine(config: EngineConfig) -> Engine {
    let mc = ModelConfig::from_file(&fixture_dir().join("config.json")).unwrap();
    let model = GlmModel::from_source(mc, &NullWeights, &NullBackend).unwrap();
    let tok = Tokenizer::from_dir(&fixture_dir()).unwrap();
    Engine::new(NullBackend, model, Some(tok), config).unwrap()
}

/// A server config on a free loopback port.
pub fn loopback_config() -> ServerConfig {
    let mut c = ServerConfig {
        listen: vec![BindAddr::Tcp(([127, 0, 0, 1], 0).into())],
        shutdown_grace: Some(Duration::from_secs(5)),
        shutdown_drain_delay: None,
        ..Default::default()
    };
    c.socket.acceptors = 2;
    c
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub addrs: Vec<BindAddr>,
    pub handle: ServerHandle,
    pub models: Arc<ModelRegistry>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits for it (bounded).
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server stops in time")
            .unwrap();
    }
}

/// Starts a server on the current runtime.
pub fn start(config: ServerConfig, engines: Vec<(&str, Engine)>) -> TestServer {
    let models = Arc::new(ModelRegistry::new(engine_config()));
    for (name, e) in engines {
        models.add(name, e, None).unwrap();
    }
    let server = Server::bind(config, models.clone()).unwrap();
    let addrs = server.local_addrs();
    let addr = addrs
        .iter()
        .find_map(|a| match a {
            BindAddr::Tcp(sa) => Some(*sa),
            _ => None,
        })
        .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
    let handle = server.handle();
    let task = tokio::spawn(server.run());
    TestServer {
        addr,
        addrs,
        handle,
        models,
        task,
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` object of an OpenAI error, checked for shape.
    pub fn error(&self) -> Value {
        let v = self.json();
        let e = v["error"].clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error lacks `{k}`: {v}");
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        e
    }

    /// The JSON payloads of an SSE body, `[DONE]` checked and dropped.
    pub fn events(&self) -> Vec<Value> {
        sse_events(&self.body)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).unwrap();
    let mut out = Vec::new();
    let mut done = false;
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let data = block
            .strip_prefix("data: ")
            .expect("every event is `data: ...`");
        assert!(!done, "event after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    assert!(done, "stream ends with [DONE]");
    out
}

/// One HTTP/1.1 request on a new connection.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    read_reply(resp).await
}

pub async fn read_reply(resp: hyper::Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .expect("body in time")
        .unwrap()
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    post_with(addr, path, &[], body).await
}

pub async fn post_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(addr, "POST", path, &h, body.to_string()).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, "GET", path, &[], Bytes::new()).await
}

/// Writes raw bytes and reads until the server closes (or `wait` passes).
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of a metric line (first match of `prefix`) in Prometheus text.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix}"))
}

/// Polls until `f` holds (bounded).
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn greedy_case(i: usize) -> (Vec<u32>, Vec<u32>) {
    let e = expected();
    let c = &e["cases"][i];
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    (ids(&c["prompt_token_ids"]), ids(&c["greedy_token_ids"]))
}

/// Sends a streamed `POST /v1/completions` of `body` on `s` and reads the response head (200)
/// byte by byte, leaving the body unread: a client that stops reading after the head.
pub async fn stall_after_head(s: &mut TcpStream, body: &Value) {
    let body = body.to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut byte))
            .await
            .expect("the response head in time")
            .unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
}
