//! Soak benchmark of the HTTP server: mixed streaming load with disconnects, slow readers and
//! bad requests for many minutes, while the server's memory, file descriptors and KV-cache
//! blocks are sampled, to show they stay flat after warm-up and that no well-behaved request is
//! lost.
//!
//! ```text
//! cargo build --release -p autoglm-cli -p autoglm-examples --example soak
//! target/release/examples/soak --duration 600 --csv docs/soak.csv
//! benches/python/plot_soak.py docs/soak.csv docs/soak.png
//! ```
//!
//! The server is `autoglm serve` as its own process (`target/release/autoglm`, or
//! `--serve-bin`), so its RSS and fd count are its own: it serves the glm4v-tiny fixture (random
//! weights) on a free loopback port, with a small KV pool (`--kv-cache-mb`) so blocks in use are
//! a visible share of it; its stderr goes to `--server-log`. `--concurrency` client tasks (one
//! tokio runtime, hyper HTTP/1.1, loopback) each send requests back to back for `--duration`
//! seconds, drawing each request's kind at random:
//! - `stream`: a streaming chat completion, read to `[DONE]`;
//! - `plain`: a non-streaming chat or text completion;
//! - `image`: a streaming chat with a small PNG screenshot as a data URL (a new image each time,
//!   as a phone agent sends one per step);
//! - `disconnect`: a long streaming request whose connection is dropped after a few events;
//! - `slow`: a streaming request read one frame per `--slow-read-ms`, to `[DONE]`;
//! - `bad`: a malformed request (invalid JSON, unknown model, negative `max_tokens`, 65 stop
//!   strings, an oversized stop string, a broken data URL, wrong types, an unknown route, a wrong
//!   method) that must get a 4xx;
//! - `raw`: a raw TCP connection that sends bytes that are not HTTP (must get a 4xx) or half a
//!   request head and then hangs up (nothing to check but that the server forgets it).
//!
//! Well-behaved requests (`stream`, `plain`, `image`, `slow`) keep their connection alive across
//! requests; the others use a connection of their own. Every `--interval` seconds the server's
//! VmRSS (`/proc/PID/status`), open fds (`/proc/PID/fd`) and, from `GET /metrics`, KV blocks used
//! and in the pool, running and waiting sequences and open connections are appended to `--csv`.
//! At the end the load stops, the server is given a few seconds to go idle and sampled once more,
//! and a summary is printed: per kind, requests sent, ok, expected errors (4xx for bad ones) and
//! unexpected failures (any 5xx, connection error, error event or stream without `[DONE]`; for a
//! bad request also a 2xx), then RSS, fds and KV at the end of warm-up (`--warmup`), at the end of
//! the load, their maxima after warm-up and when idle. It exits with status 1 if any request
//! failed unexpectedly.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autoglm_examples::machine;
use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
#[command(about = "Soak the HTTP server with mixed load; sample its RSS, fds and KV blocks")]
struct Cli {
    /// Seconds of load.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Seconds counted as warm-up (the summary compares the end with this point).
    #[arg(long, default_value_t = 60.0)]
    warmup: f64,
    /// Concurrent client tasks.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Where to write the samples (CSV).
    #[arg(long, default_value = "soak.csv")]
    csv: PathBuf,
    /// The `autoglm` binary (default: target/release/autoglm, beside examples/).
    #[arg(long)]
    serve_bin: Option<PathBuf>,
    /// Model directory to serve (default: the glm4v-tiny fixture); named by its directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// KV-cache MiB of the server.
    #[arg(long, default_value_t = 32)]
    kv_cache_mb: usize,
    /// Extra flag for the server, e.g. `--server-arg=--no-pin` (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// File for the server's stderr.
    #[arg(long, default_value = "soak-server.log")]
    server_log: PathBuf,
    /// Milliseconds a slow reader waits between frames.
    #[arg(long, default_value_t = 300)]
    slow_read_ms: u64,
    /// Seed of the clients' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

// ---------------------------------------------------------------------------------------------
// Request kinds and their counts

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stream,
    Plain,
    Image,
    Disconnect,
    Slow,
    Bad,
    Raw,
}

const KINDS: [Kind; 7] = [
    Kind::Stream,
    Kind::Plain,
    Kind::Image,
    Kind::Disconnect,
    Kind::Slow,
    Kind::Bad,
    Kind::Raw,
];

/// How often each kind is drawn (out of the sum).
const WEIGHTS: [u64; 7] = [30, 15, 15, 10, 8, 17, 5];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::Plain => "plain",
            Kind::Image => "image",
            Kind::Disconnect => "disconnect",
            Kind::Slow => "slow",
            Kind::Bad => "bad",
            Kind::Raw => "raw",
        }
    }

    fn index(self) -> usize {
        KINDS.iter().position(|&k| k == self).expect("a kind")
    }
}

/// What became of one request.
enum Outcome {
    /// Answered as it should be.
    Ok,
    /// The 4xx status a request meant to get one got.
    Expected(u16),
    /// Anything else; the text says what.
    Failed(String),
}

/// Per-kind counters, shared by the clients.
#[derive(Default)]
struct Counts {
    sent: [AtomicU64; 7],
    ok: [AtomicU64; 7],
    expected: [AtomicU64; 7],
    failed: [AtomicU64; 7],
    /// Kept-alive connections found closed before a request was sent on them (no request lost;
    /// the request goes on a new connection).
    stale: AtomicU64,
    /// The first few failures, for the report.
    failures: Mutex<Vec<String>>,
    /// Statuses of the expected errors, with how often each came.
    statuses: Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Counts {
    fn done(&self) -> u64 {
        (0..KINDS.len())
            .map(|i| {
                self.ok[i].load(Ordering::Relaxed)
                    + self.expected[i].load(Ordering::Relaxed)
                    + self.failed[i].load(Ordering::Relaxed)
            })
            .sum()
    }

    fn record(&self, kind: Kind, outcome: Outcome) {
        let i = kind.index();
        match outcome {
            Outcome::Ok => self.ok[i].fetch_add(1, Ordering::Relaxed),
            Outcome::Expected(status) => {
                if let Ok(mut m) = self.statuses.lock() {
                    *m.entry(status).or_default() += 1;
                }
                self.expected[i].fetch_add(1, Ordering::Relaxed)
            }
            Outcome::Failed(why) => {
                if let Ok(mut f) = self.failures.lock() {
                    if f.len() < 20 {
                        f.push(format!("{}: {why}", kind.name()));
                    }
                }
                self.failed[i].fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// A small xorshift generator: the clients' choices, reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn kind(&mut self) -> Kind {
        let mut r = self.next() % WEIGHTS.iter().sum::<u64>();
        for (k, w) in KINDS.iter().zip(WEIGHTS) {
            if r < w {
                return *k;
            }
            r -= w;
        }
        unreachable!("weights cover the range")
    }
}

const SYSTEM: &str = "You are a phone agent. Look at the screen and answer with one action in \
    the form do(action=..., element=[x,y]) after a short thought in <think></think>.";

/// A user turn of a few sentences, different for every `(client, k)`.
fn user_text(rng: &mut Rng, client: usize, k: u64) -> String {
    let mut s = format!("Client {client}, request {k}: ");
    for _ in 0..rng.range(1, 12) {
        let _ = write!(
            s,
            "open the app number {} and tap the button near {},{}. ",
            rng.range(1, 40),
            rng.range(0, 999),
            rng.range(0, 999)
        );
    }
    s
}

fn chat_body(
    model: &str,
    content: Value,
    stream: bool,
    max_tokens: u64,
    ignore_eos: bool,
) -> Bytes {
    let mut b = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": content},
        ],
        "stream": stream,
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "temperature": 0.7,
        "top_p": 0.9,
    });
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(b.to_string())
}

/// A `width` x `height` RGB "screenshot" as PNG: a status bar, a grid of coloured icons, a
/// dock; every seed gives other colours (so another image and content hash).
fn screenshot(seed: u64, width: u32, height: u32) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let icons: Vec<[u8; 3]> = (0..24)
        .map(|_| {
            let v = rng.next();
            [v as u8, (v >> 8) as u8, (v >> 16) as u8]
        })
        .collect();
    let wall = [rng.next() as u8 / 2, rng.next() as u8 / 2 + 64, 160];
    let (cw, ch) = (width / 4, height * 2 / 3 / 6);
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        if y < height / 30 {
            return image::Rgb([240, 240, 240]);
        }
        if y > height * 7 / 8 {
            return image::Rgb(icons[(x / cw.max(1)) as usize % 24]);
        }
        let (col, row) = (x / cw.max(1), (y - height / 30) / ch.max(1));
        let (rx, ry) = (x % cw.max(1), (y - height / 30) % ch.max(1));
        if row < 6 && rx > cw / 6 && rx < cw * 5 / 6 && ry < ch * 2 / 3 {
            image::Rgb(icons[((row * 4 + col) % 24) as usize])
        } else {
            image::Rgb([wall[0], wall[1], wall[2].saturating_sub((y / 8) as u8)])
        }
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode PNG");
    out
}

/// The malformed requests: (method, path, body). Each must get a 4xx.
fn bad_request(model: &str, rng: &mut Rng) -> (&'static str, &'static str, String) {
    let msgs = json!([{"role": "user", "content": "hello"}]);
    let chat = "/v1/chat/completions";
    match rng.next() % 11 {
        0 => (
            "POST",
            chat,
            format!("{{\"model\": \"{model}\", \"messages\": ["),
        ),
        1 => (
            "POST",
            chat,
            json!({"model": "no-such-model", "messages": msgs}).to_string(),
        ),
        2 => (
            "POST",
            chat,
            json!({"model": model, "messages": msgs, "max_tokens": -5}).to_string(),
        ),
        3 => {
            let stops: Vec<String> = (0..65).map(|i| format!("stop{i}")).collect();
            let b = json!({"model": model, "messages": msgs, "stop": stops});
            ("POST", chat, b.to_string())
        }
        4 => {
            let b = json!({"model": model, "messages": msgs, "stop": ["x".repeat(600)]});
            ("POST", chat, b.to_string())
        }
        5 => {
            let content = json!([
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not-base64!!"}},
                {"type": "text", "text": "what is on the screen?"},
            ]);
            let b = json!({"model": model, "messages": [{"role": "user", "content": content}]});
            ("POST", chat, b.to_string())
        }
        6 => (
            "POST",
            chat,
            json!({"model": model, "messages": "hello"}).to_string(),
        ),
        7 => ("POST", chat, json!({"model": model}).to_string()),
        8 => (
            "POST",
            "/v1/completions",
            json!({"model": model, "prompt": "hi", "temperature": "hot"}).to_string(),
        ),
        9 => ("POST", "/v1/no-such-route", "{}".to_string()),
        _ => ("GET", chat, String::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// Client

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One HTTP/1.1 connection; dropping it closes the socket (its driver task is aborted).
struct Conn {
    tx: Sender,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let io = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    io.set_nodelay(true).ok();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { tx, driver })
}

fn request(method: &str, path: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "soak")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request")
}

/// Splits an SSE body into its events as bytes arrive; each `data:` payload goes to `event`.
#[derive(Default)]
struct SseSplitter {
    pending: Vec<u8>,
}

impl SseSplitter {
    fn feed(&mut self, data: &[u8], mut event: impl FnMut(&[u8])) {
        self.pending.extend_from_slice(data);
        let mut from = 0;
        while let Some(i) = memchr::memmem::find(&self.pending[from..], b"\n\n") {
            let ev = &self.pending[from..from + i];
            if let Some(payload) = ev.strip_prefix(b"data: ") {
                event(payload);
            }
            from += i + 2;
        }
        self.pending.drain(..from);
    }
}

/// How to read a stream: to the end (waiting `pause` between frames), or drop the connection
/// after `events` events.
#[derive(Clone, Copy)]
enum Read {
    ToEnd { pause: Duration },
    DropAfter { events: usize },
}

/// Sends a streaming request on `conn` and reads it as `read` says. The connection is kept
/// (`Some`) only when the stream was read to its end.
async fn stream(mut conn: Conn, path: &str, body: Bytes, read: Read) -> (Outcome, Option<Conn>) {
    let resp = match conn.tx.send_request(request("POST", path, body)).await {
        Ok(r) => r,
        Err(e) => return (Outcome::Failed(format!("send: {e}")), None),
    };
    let status = resp.status();
    let mut body = resp.into_body();
    if status != 200 {
        let b = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let why = format!("status {status}: {}", String::from_utf8_lossy(&b));
        return (Outcome::Failed(why), None);
    }
    let mut sse = SseSplitter::default();
    let (mut done, mut events, mut error) = (false, 0usize, None::<String>);
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Err(e) => {
                return (
                    Outcome::Failed(format!("body after {events} events: {e}")),
                    None,
                )
            }
        };
        sse.feed(&data, |p| {
            events += 1;
            if p == b"[DONE]" {
                done = true;
            } else {
                match serde_json::from_slice::<Value>(p) {
                    Ok(v) if v.get("error").is_some() => {
                        error.get_or_insert(format!("error event: {}", v["error"]));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        error.get_or_insert(format!("event not JSON ({e})"));
                    }
                }
            }
        });
        match read {
            Read::DropAfter { events: n } if events >= n && error.is_none() => {
                // Hang up mid-stream: the socket closes with `conn`.
                return (Outcome::Ok, None);
            }
            Read::ToEnd { pause } if !pause.is_zero() => tokio::time::sleep(pause).await,
            _ => {}
        }
    }
    if let Some(e) = error {
        return (Outcome::Failed(e), None);
    }
    match (read, done) {
        (_, true) => (Outcome::Ok, Some(conn)),
        (Read::DropAfter { .. }, false) => (Outcome::Ok, None), // ended before we hung up
        (Read::ToEnd { .. }, false) => (
            Outcome::Failed(format!("stream ended without [DONE] after {events} events")),
            None,
        ),
    }
}

/// A non-streaming request on `conn`: a 200 with a choice.
async fn plain(mut conn: Conn, path: &str, body: Bytes) -> (Outcome, Option<Conn>) {
    let resp = match conn.tx.send_request(request("POST", path, body)).await {
        Ok(r) => r,
        Err(e) => return (Outcome::Failed(format!("send: {e}")), None),
    };
    let status = resp.status();
    let b = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return (Outcome::Failed(format!("body: {e}")), None),
    };
    if status != 200 {
        let why = format!("status {status}: {}", String::from_utf8_lossy(&b));
        return (Outcome::Failed(why), None);
    }
    match serde_json::from_slice::<Value>(&b) {
        Ok(v) if v["choices"][0].is_object() => (Outcome::Ok, Some(conn)),
        _ => (
            Outcome::Failed(format!("no choice in {}", String::from_utf8_lossy(&b))),
            None,
        ),
    }
}

/// A malformed request on a connection of its own: must get a 4xx.
async fn bad(addr: SocketAddr, model: &str, rng: &mut Rng) -> Outcome {
    let (method, path, body) = bad_request(model, rng);
    let mut conn = match connect(addr).await {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    let resp = match conn
        .tx
        .send_request(request(method, path, body.into()))
        .await
    {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("{method} {path}: send: {e}")),
    };
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_client_error() {
        Outcome::Expected(status.as_u16())
    } else {
        Outcome::Failed(format!("{method} {path}: status {status}, wanted a 4xx"))
    }
}

/// Raw bytes on a TCP connection: garbage that must get a 4xx, or half a request head and a
/// hang-up.
async fn raw(addr: SocketAddr, rng: &mut Rng) -> Outcome {
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    if rng.next().is_multiple_of(2) {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\ncontent-len";
        if let Err(e) = s.write_all(head).await {
            return Outcome::Failed(format!("write: {e}"));
        }
        return Outcome::Ok; // dropped: the socket closes mid-head
    }
    if let Err(e) = s.write_all(b"HELLO \x01\x02 NOT HTTP\r\n\r\n").await {
        return Outcome::Failed(format!("write: {e}"));
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer)).await;
    match read {
        Ok(Ok(_)) | Ok(Err(_)) if answer.starts_with(b"HTTP/1.1 4") => {
            let code = std::str::from_utf8(&answer[9..12.min(answer.len())]).ok();
            Outcome::Expected(code.and_then(|c| c.parse().ok()).unwrap_or(400))
        }
        Ok(_) => Outcome::Failed(format!(
            "garbage got {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        )),
        Err(_) => Outcome::Failed("garbage: no answer in 30 s".into()),
    }
}

/// One client: requests back to back until `stop`.
async fn client(
    id: usize,
    addr: SocketAddr,
    model: Arc<str>,
    cli: Arc<Cli>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = Rng::new(cli.seed.wrapping_mul(1000) + id as u64);
    let mut kept: Option<Conn> = None;
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let kind = rng.kind();
        counts.sent[kind.index()].fetch_add(1, Ordering::Relaxed);
        let outcome = match kind {
            Kind::Bad => bad(addr, &model, &mut rng).await,
            Kind::Raw => raw(addr, &mut rng).await,
            _ => {
                // The kept-alive connection, or a new one if it was closed (a disconnect always
                // takes a new one, which it then drops).
                let mut conn = match kept.take() {
                    Some(mut c) if kind != Kind::Disconnect => match c.tx.ready().await {
                        Ok(()) => Some(c),
                        Err(_) => {
                            counts.stale.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                    },
                    other => {
                        kept = other;
                        None
                    }
                };
                if conn.is_none() {
                    match connect(addr).await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            counts.record(kind, Outcome::Failed(e));
                            continue;
                        }
                    }
                }
                let conn = conn.expect("a connection");
                let text = user_text(&mut rng, id, k);
                let chat = "/v1/chat/completions";
                let (outcome, back) = match kind {
                    Kind::Stream => {
                        let body = chat_body(&model, json!(text), true, rng.range(8, 96), false);
                        let read = Read::ToEnd {
                            pause: Duration::ZERO,
                        };
                        stream(conn, chat, body, read).await
                    }
                    Kind::Plain if rng.next().is_multiple_of(2) => {
                        let body = chat_body(&model, json!(text), false, rng.range(4, 48), false);
                        plain(conn, chat, body).await
                    }
                    Kind::Plain => {
                        let body = json!({
                            "model": &*model, "prompt": text, "max_tokens": rng.range(4, 48),
                            "temperature": 0.0,
                        });
                        plain(conn, "/v1/completions", body.to_string().into()).await
                    }
                    Kind::Image => {
                        let seed = rng.next();
                        // Mostly reduced screenshots; one in eight at a phone's full 1080x2400.
                        let sizes = [(270, 600), (360, 800), (540, 1200), (1080, 2400)];
                        let (w, h) = sizes[[0, 0, 1, 1, 1, 2, 2, 3][(seed % 8) as usize]];
                        let png = tokio::task::spawn_blocking(move || screenshot(seed, w, h))
                            .await
                            .expect("screenshot");
                        let url = format!(
                            "data:image/png;base64,{}",
                            base64::engine::general_purpose::STANDARD.encode(png)
                        );
                        let content = json!([
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": text},
                        ]);
                        let body = chat_body(&model, content, true, rng.range(8, 48), false);
                        let read = Read::ToEnd {
                            pause: Duration::ZERO,
                        };
                        stream(conn, chat, body, read).await
                    }
                    Kind::Disconnect => {
                        let body = chat_body(&model, json!(text), true, 2048, true);
                        let events = rng.range(1, 8) as usize;
                        stream(conn, chat, body, Read::DropAfter { events }).await
                    }
                    Kind::Slow => {
                        let body = chat_body(&model, json!(text), true, rng.range(8, 24), false);
                        let pause = Duration::from_millis(cli.slow_read_ms);
                        stream(conn, chat, body, Read::ToEnd { pause }).await
                    }
                    Kind::Bad | Kind::Raw => unreachable!("handled above"),
                };
                if back.is_some() {
                    kept = back;
                }
                outcome
            }
        };
        counts.record(kind, outcome);
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    t: f64,
    rss_mb: f64,
    fds: usize,
    kv_used: f64,
    kv_total: f64,
    running: f64,
    waiting: f64,
    done: u64,
    conns: f64,
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The sum over labels of the metric `name` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get_metrics(addr: SocketAddr) -> Result<String, String> {
    let mut conn = connect(addr).await?;
    let req = hyper::Request::get("/metrics")
        .header("host", "soak")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = conn
        .tx
        .send_request(req)
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("GET /metrics: status {}", resp.status()));
    }
    let b = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET /metrics body: {e}"))?;
    Ok(String::from_utf8_lossy(&b.to_bytes()).into_owned())
}

async fn sample(pid: u32, addr: SocketAddr, start: Instant, counts: &Counts) -> Sample {
    // Read /proc before the metrics connection opens, so it does not count as an fd.
    let rss = rss_mb(pid);
    let fds = open_fds(pid);
    let text = get_metrics(addr).await.unwrap_or_else(|e| {
        eprintln!("sample: {e}");
        String::new()
    });
    Sample {
        t: start.elapsed().as_secs_f64(),
        rss_mb: rss,
        fds,
        kv_used: metric(&text, "autoglm_kv_blocks_used"),
        kv_total: metric(&text, "autoglm_kv_blocks_total"),
        running: metric(&text, "autoglm_num_requests_running"),
        waiting: metric(&text, "autoglm_num_requests_waiting"),
        done: counts.done(),
        conns: metric(&text, "autoglm_open_connections"),
    }
}

const CSV_HEADER: &str = "t_s,rss_mb,fds,kv_used,kv_total,running,waiting,requests_done,conns";

fn csv_line(s: &Sample) -> String {
    format!(
        "{:.1},{:.1},{},{},{},{},{},{},{}",
        s.t, s.rss_mb, s.fds, s.kv_used, s.kv_total, s.running, s.waiting, s.done, s.conns
    )
}

// ---------------------------------------------------------------------------------------------
// The server process

/// The `serve` process; killed when dropped.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn start_server(cli: &Cli, model_dir: &std::path::Path, port: u16) -> ServerProcess {
    let bin = cli.serve_bin.clone().unwrap_or_else(|| {
        // target/release/examples/soak -> target/release/autoglm
        let exe = std::env::current_exe().expect("this program's path");
        let dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target/release");
        dir.join("autoglm")
    });
    let log = std::fs::File::create(&cli.server_log).expect("server log");
    let child = Command::new(&bin)
        .arg("serve")
        .arg("--model")
        .arg(model_dir)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--kv-cache-mb", &cli.kv_cache_mb.to_string()])
        .args(&cli.server_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); build it with `cargo build --release -p autoglm-cli`",
                bin.display()
            )
        });
    ServerProcess(child)
}

async fn wait_ready(addr: SocketAddr, server: &mut ServerProcess) {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("the server exited ({status}) before it was ready; see its log");
        }
        if get_metrics(addr).await.is_ok() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the server did not answer within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let cli = Arc::new(Cli::parse());
    let model_dir = cli.model.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4v-tiny")
    });
    let model: Arc<str> = model_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a model directory name")
        .into();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut server = start_server(&cli, &model_dir, port);
    let pid = server.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(wait_ready(addr, &mut server));
    eprintln!(
        "soak: server pid {pid} on {addr} ({model}), {} clients for {} s, sampling every {} s; {}",
        cli.concurrency,
        cli.duration,
        cli.interval,
        machine()
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut csv = std::fs::File::create(&cli.csv).expect("CSV file");
    writeln!(csv, "{CSV_HEADER}").expect("write CSV");
    let start = Instant::now();
    let (samples, idle) = rt.block_on(async {
        let clients: Vec<_> = (0..cli.concurrency)
            .map(|i| {
                tokio::spawn(client(
                    i,
                    addr,
                    model.clone(),
                    cli.clone(),
                    counts.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let mut samples = Vec::new();
        let interval = Duration::from_secs_f64(cli.interval);
        let mut next = start;
        let mut last_print = 0.0;
        while start.elapsed().as_secs_f64() < cli.duration {
            let s = sample(pid, addr, start, &counts).await;
            writeln!(csv, "{}", csv_line(&s)).expect("write CSV");
            csv.flush().ok();
            if s.t - last_print >= 30.0 || samples.is_empty() {
                last_print = s.t;
                eprintln!(
                    "t={:>5.0}s rss={:.1} MB fds={} kv={}/{} running={} waiting={} conns={} done={}",
                    s.t, s.rss_mb, s.fds, s.kv_used, s.kv_total, s.running, s.waiting, s.conns, s.done
                );
            }
            samples.push(s);
            if let Ok(Some(status)) = server.0.try_wait() {
                panic!("the server exited ({status}) under load; see its log");
            }
            next += interval;
            tokio::time::sleep_until(next.into()).await;
        }
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            if tokio::time::timeout(Duration::from_secs(120), c).await.is_err() {
                eprintln!("soak: a client did not finish within 120 s of the stop");
            }
        }
        // Idle: wait for the engine to empty, then a last sample.
        let t0 = Instant::now();
        loop {
            let s = sample(pid, addr, start, &counts).await;
            if (s.running + s.waiting == 0.0 && s.kv_used == 0.0)
                || t0.elapsed() > Duration::from_secs(30)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = sample(pid, addr, start, &counts).await;
        writeln!(csv, "{}", csv_line(&idle)).expect("write CSV");
        (samples, idle)
    });
    drop(server);
    print_summary(&cli, &counts, &samples, &idle);
    let failed: u64 = counts
        .failed
        .iter()
        .map(|f| f.load(Ordering::Relaxed))
        .sum();
    if failed > 0 {
        std::process::exit(1);
    }
}

fn print_summary(cli: &Cli, counts: &Counts, samples: &[Sample], idle: &Sample) {
    println!(
        "\n## soak: {} s, {} clients; {}",
        cli.duration,
        cli.concurrency,
        machine()
    );
    println!("\n| kind | sent | ok | expected 4xx | unexpected |\n|---|---:|---:|---:|---:|");
    let mut tot = [0u64; 4];
    for k in KINDS {
        let i = k.index();
        let row = [
            counts.sent[i].load(Ordering::Relaxed),
            counts.ok[i].load(Ordering::Relaxed),
            counts.expected[i].load(Ordering::Relaxed),
            counts.failed[i].load(Ordering::Relaxed),
        ];
        for (t, v) in tot.iter_mut().zip(row) {
            *t += v;
        }
        println!(
            "| {} | {} | {} | {} | {} |",
            k.name(),
            row[0],
            row[1],
            row[2],
            row[3]
        );
    }
    println!(
        "| all | {} | {} | {} | {} |",
        tot[0], tot[1], tot[2], tot[3]
    );
    println!(
        "\nkept-alive connections found closed before use: {}",
        counts.stale.load(Ordering::Relaxed)
    );
    if let Ok(m) = counts.statuses.lock() {
        let list: Vec<String> = m.iter().map(|(s, n)| format!("{s} x{n}")).collect();
        println!("statuses of the expected errors: {}", list.join(", "));
    }
    if let Ok(f) = counts.failures.lock() {
        for line in f.iter() {
            println!("unexpected: {line}");
        }
    }
    let Some(last) = samples.last() else {
        return;
    };
    let warm = samples.iter().find(|s| s.t >= cli.warmup).unwrap_or(last);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm.t).collect();
    let max = |f: fn(&Sample) -> f64| after.iter().map(|s| f(s)).fold(f64::NAN, f64::max);
    println!(
        "\n| | t (s) | RSS (MB) | open fds | KV blocks used / total | open conns |\n|---|---:|---:|---:|---:|---:|"
    );
    let row = |name: &str, s: &Sample| {
        println!(
            "| {name} | {:.0} | {:.1} | {} | {} / {} | {} |",
            s.t, s.rss_mb, s.fds, s.kv_used, s.kv_total, s.conns
        );
    };
    row("end of warm-up", warm);
    row("end of load", last);
    println!(
        "| max after warm-up | | {:.1} | {} | {} | {} |",
        max(|s| s.rss_mb),
        max(|s| s.fds as f64),
        max(|s| s.kv_used),
        max(|s| s.conns)
    );
    row("idle after the load", idle);
    println!("\nsamples: {} in {}", samples.len() + 1, cli.csv.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sum_over_labels() {
        let text = "# HELP autoglm_kv_blocks_used x\n# TYPE autoglm_kv_blocks_used gauge\n\
                    autoglm_kv_blocks_used{model=\"a\"} 3\nautoglm_kv_blocks_used{model=\"b\"} 4\n\
                    autoglm_kv_blocks_used_other 100\nautoglm_open_connections 2\n";
        assert_eq!(metric(text, "autoglm_kv_blocks_used"), 7.0);
        assert_eq!(metric(text, "autoglm_open_connections"), 2.0);
    }

    #[test]
    fn every_kind_is_drawn() {
        let mut rng = Rng::new(7);
        let mut seen = [0; 7];
        for _ in 0..10_000 {
            seen[rng.kind().index()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }
}
