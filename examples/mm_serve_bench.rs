//! Load benchmark of image requests through the server: Open-AutoGLM-shaped chats (a phone
//! screenshot and the agent's history) at several concurrencies, with text-only streams beside
//! them, on the glm4v-tiny fixture.
//!
//! ```text
//! cargo run --release --example mm_serve_bench -- --concurrency 1,8,32 --steps 3
//! ```
//!
//! The real server runs in this process on a loopback port; every client is a hyper HTTP/1.1
//! connection (kept alive across its requests) streaming `POST /v1/chat/completions` with
//! `stream_options.include_usage`. A request is shaped as Open-AutoGLM's phone agent
//! (`phone_agent/model/client.py` and its message builder) sends it: a plain-string system prompt,
//! the earlier user turns as text only (`** Screen Info **` and a JSON line), the earlier
//! assistant replies (`<think>..</think><answer>do(action=..)</answer>`), and the newest user turn
//! as `[image_url (a 1080x2400 RGBA PNG as a data URL), text]`; `max_tokens` small, `ignore_eos`,
//! temperature 0, top_p 0.85, frequency_penalty 0.2. Every screenshot of a run is distinct, so
//! neither the encoder cache nor the prefix cache hides the image's cost.
//!
//! For each concurrency C, C image clients send `--steps` requests back to back (the history
//! growing by one turn each step, after `--history` earlier turns), while `--text-streams`
//! text-only clients stream long outputs (`--text-tokens`, `ignore_eos`) until the image clients
//! are done. Reported per C: client-side TTFT (request sent -> first token event) p50/p99/mean,
//! and how it splits: mean preprocessing (decode, resize, normalise, patchify) and vision-encode
//! milliseconds per image from the engine's counters (`EngineStats`, deltas over the run), and
//! the remainder (TTFT minus both: prefill, queueing in the scheduler and the preprocessing
//! pool, request parsing, base64, HTTP). For the text streams: inter-token latency (gaps between
//! successive token events, counted while the image clients were running) against the same
//! streams alone, measured before the first and after the last concurrency, in the same process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use autoglm_core::engine::EngineStats;
use autoglm_core::net::BindAddr;
use autoglm_core::server::{ModelRegistry, Server, ServerConfig};
use autoglm_core::Engine;
use autoglm_examples::{machine, EngineArgs, List};
use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rayon::prelude::*;
use serde_json::{json, Value};

const MODEL: &str = "glm4v-tiny";

#[derive(Debug, Parser)]
#[command(
    about = "Open-AutoGLM-shaped image requests through the server, with text streams beside"
)]
struct Cli {
    /// Model directory (default: the glm4v-tiny fixture).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent image clients to measure, e.g. 1,8,32.
    #[arg(long, default_value = "1,8,32")]
    concurrency: List<usize>,
    /// Requests each image client sends, one after another.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Earlier agent turns (user text + assistant reply) before a client's first request.
    #[arg(long, default_value_t = 2)]
    history: usize,
    /// Pixel budget of the image processor (`size.longest_edge`, counted over the two frames an
    /// image becomes); 0 keeps the model's preprocessor_config.json (or --mm-processor-kwargs).
    /// The default gives 286 image tokens (308x728 pixels) per 1080x2400 screenshot.
    #[arg(long, default_value_t = 500_000)]
    max_pixels: usize,
    /// Tokens each image request generates (`ignore_eos`).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Text-only streaming clients beside the image clients (and alone, as the baseline).
    #[arg(long, default_value_t = 4)]
    text_streams: usize,
    /// Tokens each text-only request generates (`ignore_eos`).
    #[arg(long, default_value_t = 256)]
    text_tokens: usize,
    /// Seconds each text-streams-alone baseline runs (requests in flight then finish).
    #[arg(long, default_value_t = 10.0)]
    baseline_secs: f64,
    /// Worker threads of the server's runtime.
    #[arg(long, default_value_t = 2)]
    server_workers: usize,
    /// Worker threads of the clients' runtime.
    #[arg(long, default_value_t = 1)]
    client_workers: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Open-AutoGLM's system prompt is a plain string (the date, then the agent's rules); this one
/// has its shape and about its opening's length.
fn system_prompt() -> String {
    "The current date: 2026-12-02, Wednesday\n\
     # Setup\n\
     You are a professional Android operation agent assistant that can fulfill the user's \
     high-level instructions. Given a screenshot of the Android interface at each step, you \
     first analyze the situation, then plan the best course of action using Python-style \
     pseudo-code.\n\
     Your response format must be structured as follows:\n\
     <think>Think first: analyze the current screen and decide on the next action.</think>\n\
     <answer>One of the available actions, e.g. do(action=\"Tap\", element=[x,y]), \
     do(action=\"Type\", text=\"...\"), do(action=\"Swipe\", start=[x1,y1], end=[x2,y2]), \
     do(action=\"Back\"), do(action=\"Launch\", app=\"...\"), finish(message=\"...\")</answer>\n\
     Coordinates run from (0,0) at the top left to (999,999) at the bottom right."
        .to_string()
}

const APPS: [&str; 6] = [
    "System Home",
    "Settings",
    "WeChat",
    "Taobao",
    "Meituan",
    "Xiaohongshu",
];

/// The text of user turn `turn` of client `client` (the first names the task).
fn user_text(client: usize, turn: usize) -> String {
    let info = json!({ "current_app": APPS[(client + turn) % APPS.len()] }).to_string();
    let screen = format!("** Screen Info **\n\n{info}");
    if turn == 0 {
        format!(
            "Open the settings and turn on Wi-Fi, then send the network name to contact #{client}.\n\n{screen}"
        )
    } else {
        screen
    }
}

/// The assistant's reply to user turn `turn`, as the agent keeps it in its history.
fn assistant_text(turn: usize) -> String {
    format!(
        "<think>Step {turn}: the target is visible near the middle of the screen, so I tap it \
         to continue.</think><answer>do(action=\"Tap\", element=[500,500])</answer>"
    )
}

/// The body of image client `client`'s request at step `step`: `history + step` earlier turns
/// as text, then the screenshot (`None`: the same chat without it) and the newest screen info.
fn image_body(
    client: usize,
    step: usize,
    history: usize,
    png_b64: Option<&str>,
    max_tokens: usize,
) -> Bytes {
    let mut messages = vec![json!({"role": "system", "content": system_prompt()})];
    let turns = history + step;
    // Earlier user turns as the agent keeps them: its content list, the image part removed.
    for t in 0..turns {
        messages.push(
            json!({"role": "user", "content": [{"type": "text", "text": user_text(client, t)}]}),
        );
        messages.push(json!({"role": "assistant", "content": assistant_text(t)}));
    }
    let mut content = Vec::new();
    if let Some(png) = png_b64 {
        content.push(json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}));
    }
    content.push(json!({"type": "text", "text": user_text(client, turns)}));
    messages.push(json!({"role": "user", "content": content}));
    Bytes::from(
        json!({
            "model": MODEL,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": max_tokens,
            "ignore_eos": true,
            "temperature": 0.0,
            "top_p": 0.85,
            "frequency_penalty": 0.2,
        })
        .to_string(),
    )
}

/// A text-only request (long output).
fn text_body(stream: usize, k: usize, max_tokens: usize) -> Bytes {
    Bytes::from(
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": format!("Tell me a long story about a robot (stream {stream}, request {k}).")},
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": max_tokens,
            "ignore_eos": true,
            "temperature": 0.0,
        })
        .to_string(),
    )
}

/// A synthetic 1080x2400 RGBA phone screenshot as PNG: status bar, a grid of app icons with
/// text-like rows under them, a dock; `seed` changes the colours and the "text", so every seed
/// gives a different image (and content hash).
fn screenshot(seed: u64) -> Vec<u8> {
    let (w, h) = (1080u32, 2400u32);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let wallpaper = [
        (next() % 80) as u8 + 20,
        (next() % 80) as u8 + 60,
        (next() % 80) as u8 + 120,
    ];
    let icons: Vec<[u8; 3]> = (0..24)
        .map(|_| {
            let v = next();
            [v as u8, (v >> 8) as u8, (v >> 16) as u8]
        })
        .collect();
    let mut img = image::RgbaImage::new(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let mut c = [
            wallpaper[0].saturating_add((y / 24) as u8 / 2),
            wallpaper[1],
            wallpaper[2].saturating_sub((x / 16) as u8 / 2),
        ];
        let mut alpha = 255;
        if y < 80 {
            // Status bar, with a clock and icons as dark blocks.
            c = [245, 245, 245];
            if (20..60).contains(&y) && ((40..200).contains(&x) || (820..1040).contains(&x)) {
                c = [30, 30, 30];
            }
        } else if (300..1900).contains(&y) {
            // Six rows of four icons; each 180 px square, a label row below.
            let (row, ry) = ((y - 300) / 260, (y - 300) % 260);
            let (col, rx) = (x / 270, x % 270);
            let icon = &icons[((row * 4 + col) % 24) as usize];
            if (45..225).contains(&rx) && ry < 180 {
                c = *icon;
                if ry > 60 && ry < 120 && rx > 105 && rx < 165 {
                    c = [255, 255, 255];
                }
            } else if (60..210).contains(&rx) && (200..228).contains(&ry) && next() % 3 == 0 {
                c = [250, 250, 250];
            }
        } else if (2100..2300).contains(&y) {
            // A translucent dock.
            alpha = 200;
            c = [220, 220, 225];
            if (x % 270) > 60 && (x % 270) < 210 && (2130..2270).contains(&y) {
                c = icons[(x / 270) as usize];
                alpha = 255;
            }
        }
        *p = image::Rgba([c[0], c[1], c[2], alpha]);
    }
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode PNG");
    out
}

// ---------------------------------------------------------------------------------------------
// Client

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let io = tokio::net::TcpStream::connect(addr).await.expect("connect");
    io.set_nodelay(true).ok();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    tx
}

/// One streamed response, timed at the client.
#[derive(Debug, Clone)]
struct Timing {
    sent: Instant,
    /// When the first event arrived: the role prelude, which the server sends together with
    /// the first token (the response head waits for it).
    first: Option<Instant>,
    /// When each token event arrived (events that arrive in one read share the time). The
    /// server sends no event for a token whose text is empty (a partial character, a special
    /// token), so two tokens can be one event, as vLLM's benchmark counts them too.
    tokens: Vec<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Timing {
    fn ttft(&self) -> f64 {
        self.first
            .map_or(f64::NAN, |t| (t - self.sent).as_secs_f64())
    }
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

/// What one event says: the role prelude, a token (a choice with a `delta.content`), usage,
/// or the end.
#[derive(Debug, PartialEq)]
enum Event {
    Role,
    Token,
    Usage(usize, usize),
    Done,
    Other,
}

fn classify(payload: &[u8]) -> Event {
    if payload == b"[DONE]" {
        return Event::Done;
    }
    let v: Value = serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("event not JSON ({e}): {}", String::from_utf8_lossy(payload)));
    if let Some(err) = v.get("error") {
        panic!("error event: {err}");
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
        return Event::Usage(n("prompt_tokens"), n("completion_tokens"));
    }
    let Some(delta) = v["choices"]
        .as_array()
        .and_then(|c| c.first())
        .map(|c| &c["delta"])
    else {
        return Event::Other;
    };
    if delta.get("role").is_some() {
        Event::Role
    } else if delta.get("content").is_some_and(Value::is_string) {
        Event::Token
    } else {
        Event::Other
    }
}

/// One streaming chat request on `tx`.
async fn chat(tx: &mut Sender, body: Bytes) -> Timing {
    tx.ready().await.expect("connection ready");
    let req = hyper::Request::post("/v1/chat/completions")
        .header("host", "bench")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    let sent = Instant::now();
    let resp = tx.send_request(req).await.expect("response");
    let status = resp.status();
    let mut body = resp.into_body();
    if status != 200 {
        let b = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        panic!("status {status}: {}", String::from_utf8_lossy(&b));
    }
    let mut t = Timing {
        sent,
        first: None,
        tokens: Vec::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let mut sse = SseSplitter::default();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let now = Instant::now();
        if let Ok(data) = frame.expect("body frame").into_data() {
            sse.feed(&data, |p| match classify(p) {
                Event::Role => {
                    t.first.get_or_insert(now);
                }
                Event::Token => t.tokens.push(now),
                Event::Usage(p, c) => (t.prompt_tokens, t.completion_tokens) = (p, c),
                Event::Done => done = true,
                Event::Other => {}
            });
        }
    }
    assert!(done, "stream ended without [DONE]");
    t
}

/// Text-only clients: each sends long requests back to back until `stop`, then finishes the one
/// in flight.
fn spawn_text_streams(
    addr: SocketAddr,
    n: usize,
    tokens: usize,
    stop: Arc<AtomicBool>,
    tag: usize,
) -> Vec<tokio::task::JoinHandle<Vec<Timing>>> {
    (0..n)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tx = connect(addr).await;
                let mut out = Vec::new();
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    out.push(chat(&mut tx, text_body(i, tag * 100_000 + k, tokens)).await);
                    k += 1;
                }
                out
            })
        })
        .collect()
}

/// Gaps between successive token events of each request, those that end within `window` (all
/// when `None`), in seconds.
fn itls(requests: &[Timing], window: Option<(Instant, Instant)>) -> Vec<f64> {
    let mut out = Vec::new();
    for r in requests {
        for w in r.tokens.windows(2) {
            if window.is_none_or(|(a, b)| w[0] >= a && w[1] <= b) {
                out.push((w[1] - w[0]).as_secs_f64());
            }
        }
    }
    out
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// Machine and engine counters

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Busy ticks of the whole machine and of this process, to tell how many cores other processes
/// kept busy during a phase.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    busy: u64,
    own: u64,
}

impl Cpu {
    fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let get = |i: usize| f.get(i).copied().unwrap_or(0);
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_string();
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .map(|x| x.parse().unwrap_or(0))
                    .collect();
                // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
                Some(v.get(11)? + v.get(12)?)
            })
            .unwrap_or(0);
        Cpu {
            at: Instant::now(),
            busy: get(0) + get(1) + get(2) + get(5) + get(6) + get(7),
            own,
        }
    }

    /// (cores this process kept busy, cores other processes kept busy) since `self`; ticks of
    /// 10 ms (USER_HZ 100).
    fn since(&self) -> (f64, f64) {
        let now = Cpu::now();
        let secs = (now.at - self.at).as_secs_f64().max(1e-9);
        let own = (now.own - self.own) as f64 / 100.0 / secs;
        let all = (now.busy - self.busy) as f64 / 100.0 / secs;
        (own, (all - own).max(0.0))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    preprocessed: u64,
    preprocess_ns: u64,
    encoded: u64,
    encode_ns: u64,
    encoder_hits: u64,
    steps: u64,
    prompt_computed: u64,
}

impl Counters {
    fn read(s: &EngineStats) -> Counters {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            preprocessed: r(&s.images_preprocessed),
            preprocess_ns: r(&s.image_preprocess_ns),
            encoded: r(&s.images_encoded),
            encode_ns: r(&s.image_encode_ns),
            encoder_hits: r(&s.encoder_cache_hits),
            steps: r(&s.steps),
            prompt_computed: r(&s.prompt_tokens_computed),
        }
    }

    fn minus(self, o: Counters) -> Counters {
        Counters {
            preprocessed: self.preprocessed - o.preprocessed,
            preprocess_ns: self.preprocess_ns - o.preprocess_ns,
            encoded: self.encoded - o.encoded,
            encode_ns: self.encode_ns - o.encode_ns,
            encoder_hits: self.encoder_hits - o.encoder_hits,
            steps: self.steps - o.steps,
            prompt_computed: self.prompt_computed - o.prompt_computed,
        }
    }

    fn preprocess_ms(&self) -> f64 {
        self.preprocess_ns as f64 / 1e6 / self.preprocessed.max(1) as f64
    }

    fn encode_ms(&self) -> f64 {
        self.encode_ns as f64 / 1e6 / self.encoded.max(1) as f64
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

/// The text streams alone for `secs`.
struct Alone {
    itl: Vec<f64>,
    requests: usize,
    cpu: (f64, f64),
}

fn run_alone(rt: &tokio::runtime::Runtime, addr: SocketAddr, cli: &Cli, tag: usize) -> Alone {
    let cpu = Cpu::now();
    let timings = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = spawn_text_streams(addr, cli.text_streams, cli.text_tokens, stop.clone(), tag);
        tokio::time::sleep(Duration::from_secs_f64(cli.baseline_secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("text stream"));
        }
        all
    });
    for t in &timings {
        assert_eq!(
            t.completion_tokens, cli.text_tokens,
            "every text token delivered"
        );
    }
    Alone {
        itl: itls(&timings, None),
        requests: timings.len(),
        cpu: cpu.since(),
    }
}

/// What one measured phase runs.
#[derive(Clone, Copy)]
struct Shape {
    /// Image clients.
    c: usize,
    /// Text streams beside them.
    text_streams: usize,
    /// false: the same chats without the screenshot.
    with_image: bool,
    /// Number of the first client (each client's task text differs).
    client0: usize,
    /// Seed of the first screenshot.
    seed0: u64,
}

/// One concurrency: C image clients and the text streams beside them.
struct Level {
    label: String,
    text_streams: usize,
    images: Vec<Timing>,
    wall: f64,
    text_itl: Vec<f64>,
    text_requests: usize,
    counters: Counters,
    cpu: (f64, f64),
    png_bytes: usize,
}

fn run_level(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    engine: &Engine,
    cli: &Cli,
    shape: Shape,
) -> Level {
    let Shape {
        c,
        text_streams,
        with_image,
        client0,
        seed0,
    } = shape;
    // Every screenshot of the whole run is distinct (seeded by a global count).
    let t = Instant::now();
    let pngs: Vec<String> = (0..if with_image { c * cli.steps } else { 0 })
        .into_par_iter()
        .map(|k| base64::engine::general_purpose::STANDARD.encode(screenshot(seed0 + k as u64)))
        .collect();
    let png_bytes = pngs.iter().map(|p| p.len() * 3 / 4).sum::<usize>() / pngs.len().max(1);
    let made = pngs.len();
    let bodies: Vec<Vec<Bytes>> = (0..c)
        .map(|i| {
            (0..cli.steps)
                .map(|s| {
                    let png = with_image.then(|| pngs[i * cli.steps + s].as_str());
                    image_body(client0 + i, s, cli.history, png, cli.max_tokens)
                })
                .collect()
        })
        .collect();
    drop(pngs);
    eprintln!(
        "  {c} client(s): {made} screenshots made in {:.1} s (PNG {:.0} KiB each)",
        t.elapsed().as_secs_f64(),
        png_bytes as f64 / 1024.0
    );
    let before = Counters::read(engine.stats());
    let cpu = Cpu::now();
    let (images, wall, text, window) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let text = spawn_text_streams(
            addr,
            text_streams,
            cli.text_tokens,
            stop.clone(),
            seed0 as usize,
        );
        let t0 = Instant::now();
        let clients: Vec<_> = bodies
            .into_iter()
            .map(|bodies| {
                tokio::spawn(async move {
                    let mut tx = connect(addr).await;
                    let mut out = Vec::with_capacity(bodies.len());
                    for b in bodies {
                        out.push(chat(&mut tx, b).await);
                    }
                    out
                })
            })
            .collect();
        let mut images = Vec::new();
        for t in clients {
            images.extend(t.await.expect("image client"));
        }
        let t1 = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let mut texts = Vec::new();
        for t in text {
            texts.extend(t.await.expect("text stream"));
        }
        (images, (t1 - t0).as_secs_f64(), texts, (t0, t1))
    });
    let cpu = cpu.since();
    let counters = Counters::read(engine.stats()).minus(before);
    for t in &images {
        assert_eq!(
            t.completion_tokens, cli.max_tokens,
            "every image token delivered"
        );
    }
    let label = match (with_image, text_streams) {
        (true, 0) => format!("{c}, no text streams"),
        (false, 0) => format!("{c}, same chats without the screenshot, no text streams"),
        _ => c.to_string(),
    };
    Level {
        label,
        text_streams,
        wall,
        text_itl: itls(&text, Some(window)),
        text_requests: text.len(),
        images,
        counters,
        cpu,
        png_bytes,
    }
}

fn main() {
    let cli = Cli::parse();
    let _ = autoglm_core::net::raise_nofile_limit();
    let dir = cli.model.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4v-tiny")
    });
    let mut config = cli.engine.config().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    if cli.max_pixels > 0 {
        config.multimodal.max_pixels = Some(cli.max_pixels);
    }
    let max_c = cli.concurrency.0.iter().copied().max().unwrap_or(1);
    config.scheduler.max_num_seqs = config.scheduler.max_num_seqs.max(max_c + cli.text_streams);
    let engine = Engine::from_dir(&dir, config.clone()).unwrap_or_else(|e| {
        eprintln!("error: loading {}: {e}", dir.display());
        std::process::exit(2);
    });
    let backend = engine.backend_name().to_string();
    let resized = engine.image_processor().map(|p| {
        let (h, w) = autoglm_core::media::smart_resize(2400, 1080, p).expect("screen size");
        let f = p.factor();
        (
            p.max_pixels,
            w,
            h,
            (h / f) * (w / f),
            (h / p.patch_size) * (w / p.patch_size),
        )
    });
    let Some((max_pixels, rw, rh, image_tokens, patches)) = resized else {
        eprintln!("error: {} takes no images", dir.display());
        std::process::exit(2);
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.server_workers.max(1))
        .thread_name("bench-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_workers.max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    let models = Arc::new(ModelRegistry::new(config.clone()));
    models
        .add(MODEL, engine.clone(), Some(dir.clone()))
        .expect("add model");
    let (addr, handle, task) = server_rt.block_on(async {
        let mut cfg = ServerConfig {
            listen: vec![BindAddr::Tcp(([127, 0, 0, 1], 0).into())],
            ..Default::default()
        };
        cfg.socket.acceptors = cli.server_workers.max(1);
        let most = 2 * (max_c + cli.text_streams) + 16;
        cfg.http.max_connections = most;
        // Every client connects from 127.0.0.1.
        cfg.http.max_connections_per_ip = Some(most);
        cfg.limits.max_concurrent_requests = most;
        let server = Server::bind(cfg, models).expect("bind");
        let addr = match server.local_addrs()[0] {
            BindAddr::Tcp(a) => a,
            BindAddr::Unix(_) => unreachable!(),
        };
        let handle = server.handle();
        (addr, handle, tokio::spawn(server.run()))
    });

    let command: Vec<String> = std::env::args().collect();
    println!("machine: {}", machine());
    println!("command: {}", command.join(" "));
    println!("load average at start: {}", loadavg());
    println!(
        "model {} on {backend}; max_pixels {max_pixels}{}: a 1080x2400 screenshot is resized to {rw}x{rh}, {patches} patches, {image_tokens} image tokens; image requests: {} steps per client after {} earlier turns, max_tokens {} (ignore_eos, temperature 0, top_p 0.85, frequency_penalty 0.2); {} text streams of {} tokens beside; server workers {}, client workers {}",
        dir.display(),
        if cli.max_pixels > 0 { " (--max-pixels)" } else { " (the model's)" },
        cli.steps,
        cli.history,
        cli.max_tokens,
        cli.text_streams,
        cli.text_tokens,
        cli.server_workers,
        cli.client_workers,
    );

    // Warm-up: one image request and one text request (thread pools, page faults).
    client_rt.block_on(async {
        let png = base64::engine::general_purpose::STANDARD.encode(screenshot(u64::MAX / 3));
        let mut tx = connect(addr).await;
        let w = chat(&mut tx, image_body(0, 0, cli.history, Some(&png), 4)).await;
        eprintln!(
            "warm-up: image request of {} prompt tokens, TTFT {:.1} ms",
            w.prompt_tokens,
            w.ttft() * 1e3
        );
        chat(&mut tx, text_body(0, 0, 8)).await;
    });

    // One client alone, without text streams, with the screenshot and without it: the
    // uncontended split, and what the same chat costs without its image.
    let mut levels = Vec::new();
    let mut seed = 1u64;
    let mut client0 = 1000;
    for with_image in [true, false] {
        eprintln!("one client alone (screenshot: {with_image})...");
        let shape = Shape {
            c: 1,
            text_streams: 0,
            with_image,
            client0,
            seed0: seed,
        };
        levels.push(run_level(&client_rt, addr, &engine, &cli, shape));
        seed += cli.steps as u64;
        client0 += 1;
    }
    let text = cli.text_streams > 0;
    let alone_a = text.then(|| {
        eprintln!("text streams alone (1 of 2)...");
        run_alone(&client_rt, addr, &cli, 0)
    });
    for &c in &cli.concurrency.0 {
        eprintln!("image clients: {c}...");
        let shape = Shape {
            c,
            text_streams: cli.text_streams,
            with_image: true,
            client0,
            seed0: seed,
        };
        levels.push(run_level(&client_rt, addr, &engine, &cli, shape));
        seed += (c * cli.steps) as u64;
        client0 += c;
    }
    let alone_b = text.then(|| {
        eprintln!("text streams alone (2 of 2)...");
        run_alone(&client_rt, addr, &cli, 1)
    });
    println!("load average at end: {}", loadavg());
    println!();

    println!("| image clients | requests | prompt tokens (mean) | PNG KiB | wall s | TTFT p50 ms | TTFT p99 ms | TTFT mean ms | preprocess ms/image | vision encode ms/image | remainder ms (mean TTFT - both) | images pre/enc | engine steps | prompt tokens computed | cores: own / other |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|");
    for l in &levels {
        let ttft: Vec<f64> = l.images.iter().map(Timing::ttft).collect();
        let prompt: Vec<f64> = l.images.iter().map(|t| t.prompt_tokens as f64).collect();
        let k = &l.counters;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {}/{} | {} | {} | {:.2} / {:.2} |",
            l.label,
            l.images.len(),
            mean(&prompt),
            l.png_bytes as f64 / 1024.0,
            l.wall,
            percentile(&ttft, 0.5) * 1e3,
            percentile(&ttft, 0.99) * 1e3,
            mean(&ttft) * 1e3,
            k.preprocess_ms(),
            k.encode_ms(),
            mean(&ttft) * 1e3 - k.preprocess_ms() - k.encode_ms(),
            k.preprocessed,
            k.encoded,
            k.steps,
            k.prompt_computed,
            l.cpu.0,
            l.cpu.1,
        );
    }
    if text {
        print_text_streams(&cli, &levels, [&alone_a, &alone_b]);
    }
    println!();
    for l in &levels {
        println!(
            "{}: encoder-cache hits {} (a later prefill chunk of an image already encoded counts as one)",
            l.label, l.counters.encoder_hits
        );
    }
    handle.shutdown();
    server_rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    });
}

/// The text streams' table: alone (twice) and beside each concurrency; ratios against the mean
/// of the two alone runs.
fn print_text_streams(cli: &Cli, levels: &[Level], alone: [&Option<Alone>; 2]) {
    let [alone_a, alone_b] = alone;
    println!();
    let alone: Vec<&Alone> = [alone_a, alone_b].into_iter().flatten().collect();
    let base =
        |f: &dyn Fn(&[f64]) -> f64| mean(&alone.iter().map(|a| f(&a.itl)).collect::<Vec<_>>());
    let (base_mean, base_p99) = (base(&|v| mean(v)), base(&|v| percentile(v, 0.99)));
    println!("| text streams ({} x {} tokens) | requests | token events | ITL p50 ms | p90 ms | p99 ms | max ms | mean ms | mean / alone | p99 / alone | cores: own / other |", cli.text_streams, cli.text_tokens);
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    // (what, requests, ITLs, cores own / other)
    type Row<'a> = (String, usize, &'a [f64], (f64, f64));
    let mut rows: Vec<Row> = Vec::new();
    if let Some(a) = alone_a {
        rows.push(("alone, before".into(), a.requests, &a.itl, a.cpu));
    }
    for l in levels.iter().filter(|l| l.text_streams > 0) {
        rows.push((
            format!("beside {} image clients", l.label),
            l.text_requests,
            &l.text_itl,
            l.cpu,
        ));
    }
    if let Some(a) = alone_b {
        rows.push(("alone, after".into(), a.requests, &a.itl, a.cpu));
    }
    for (name, requests, itl, cpu) in rows {
        println!(
            "| {name} | {requests} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.3} | {:.2} | {:.2} | {:.2} / {:.2} |",
            itl.len(),
            percentile(itl, 0.5) * 1e3,
            percentile(itl, 0.9) * 1e3,
            percentile(itl, 0.99) * 1e3,
            percentile(itl, 1.0) * 1e3,
            mean(itl) * 1e3,
            mean(itl) / base_mean,
            percentile(itl, 0.99) / base_p99,
            cpu.0,
            cpu.1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SSE events split into two reads at every point come out whole.
    #[test]
    fn sse_events_survive_any_split() {
        let wire = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
                    data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\\n\\n\"}}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\n";
        for cut in 0..=wire.len() {
            let mut s = SseSplitter::default();
            let mut got = Vec::new();
            for part in [&wire.as_bytes()[..cut], &wire.as_bytes()[cut..]] {
                s.feed(part, |p| got.push(classify(p)));
            }
            assert_eq!(
                got,
                [Event::Role, Event::Token, Event::Usage(7, 2), Event::Done],
                "cut at {cut}"
            );
        }
    }

    /// Seeds give different screenshots of the phone's size.
    #[test]
    fn screenshots_differ_by_seed() {
        let (a, b) = (screenshot(1), screenshot(2));
        assert_ne!(a, b);
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), (1080, 2400));
        assert!(img.color().has_alpha());
    }
}
