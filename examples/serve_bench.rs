//! How much the HTTP server costs: tokens/s delivered through the server vs the engine's own
//! tokens/s, with the null backend (a model that costs nothing), at several concurrencies.
//!
//! ```text
//! cargo run --release --example serve_bench -- --concurrency 1,100,1000
//! ```
//! For each concurrency C, C requests (prompt of `--prompt-len` ids, `ignore_eos`, greedy) of T
//! tokens each (T = `--total-tokens` / C, within 64..=4000) are run twice on fresh engines:
//! - engine: submitted directly, each stream drained by a tokio task with `recv_async`;
//! - server: the same requests as streaming `POST /v1/completions` over loopback, one HTTP/1.1
//!   connection each, from a client runtime in this process.
//!
//! Client-side figures follow vLLM's benchmark_serving: TTFT is the time from sending a request
//! to its first token; ITL the gaps between successive token events of a request; TPOT a
//! request's (latency - TTFT) / (tokens - 1); output throughput is all tokens over the wall time
//! from the first request sent to the last token received; "middle 80%" throughput is the rate
//! between the arrival of 10% and of 90% of all tokens (streams open, without connection set-up
//! and tail). As `examples/serve` runs by default on two cores or more, the engine loop is on
//! the first core and every other thread (server, client, engine-alone consumers) on the
//! remaining ones (`--engine-core N` picks the core, `--unpinned` leaves all to the OS). Each configuration runs `--repeats`
//! times, engine and server runs alternating, and the pair with the median server/engine ratio
//! is reported.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autoglm_core::backend::null::{NullBackend, NullWeights};
use autoglm_core::model::{GlmModel, ModelConfig};
use autoglm_core::net::BindAddr;
use autoglm_core::server::{ModelRegistry, Server, ServerConfig};
use autoglm_core::tokenizer::Tokenizer;
use autoglm_core::{Engine, EngineConfig, SamplingParams};
use autoglm_examples::{bundled_model, machine, List};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 connection to `addr` with windows large enough that flow control never stalls a
/// stream of this benchmark.
async fn h2_connect(addr: SocketAddr) -> H2Sender {
    let io = tokio::net::TcpStream::connect(addr).await.expect("connect");
    io.set_nodelay(true).ok();
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(1 << 30)
        .handshake(TokioIo::new(io))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    tx
}

#[derive(Debug, Parser)]
#[command(about = "Server overhead with a zero-cost model")]
struct Cli {
    /// Concurrent streams to measure, e.g. 1,100,1000.
    #[arg(long, default_value = "1,100,1000")]
    concurrency: List<usize>,
    /// Tokens per configuration, split over its streams (each gets 64..=4000).
    #[arg(long, default_value_t = 256_000)]
    total_tokens: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 8)]
    prompt_len: usize,
    /// Worker threads (and SO_REUSEPORT acceptors) of the server's runtime; default: one per
    /// core the server may use (the cores left beside `--engine-core`, else all), as
    /// `examples/serve --http-cores` does.
    #[arg(long)]
    server_workers: Option<usize>,
    /// Worker threads of the client's runtime.
    #[arg(long, default_value_t = 1)]
    client_workers: usize,
    /// Engine/server run pairs per configuration (the median-ratio pair is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// The server's stream interval: token events written to a connection together.
    #[arg(long, default_value_t = 1)]
    stream_interval: usize,
    /// The stream interval of the engine-alone consumers (default: the server's, so the
    /// comparison isolates the server; 1 compares with consumers woken for every token).
    #[arg(long)]
    engine_stream_interval: Option<usize>,
    /// Pin the engine loop to this core and every runtime thread (server, client, engine-alone
    /// consumers) to the other cores, so the engine never shares its core with socket work
    /// (default: the first core, as `examples/serve` does, when there are two or more).
    #[arg(long)]
    engine_core: Option<usize>,
    /// Pin nothing (`examples/serve --no-pin`).
    #[arg(long, conflicts_with = "engine_core")]
    unpinned: bool,
    /// Multiplex the streams over this many HTTP/2 (h2c, prior knowledge) connections instead of
    /// opening one HTTP/1.1 connection per stream.
    #[arg(long, default_value_t = 0)]
    http2_connections: usize,
    /// Requests each stream runs one after another (the next starts when the previous one's
    /// last token arrives; through the server on the same keep-alive HTTP/1.1 connection), so C
    /// streams stay busy while requests start and finish, as `vllm bench serve
    /// --max-concurrency C --num-prompts C*R` runs. 1: every stream is one request on a new
    /// connection, all sent at once.
    #[arg(long, default_value_t = 1)]
    requests_per_stream: usize,
    /// Measure only `engine` or only `server` (for profiling); default both.
    #[arg(long)]
    only: Option<String>,
}

/// A fresh engine on the null backend with the bundled model's shape and tokenizer.
fn null_engine(concurrency: usize, prompt_len: usize, engine_core: Option<usize>) -> Engine {
    let dir = bundled_model();
    let mc = ModelConfig::from_file(&dir.join("config.json")).expect("bundled config");
    let model = GlmModel::from_source(mc, &NullWeights, &NullBackend).expect("null model");
    let tok = Tokenizer::from_dir(&dir).expect("bundled tokenizer");
    let mut c = EngineConfig::default();
    c.scheduler.max_num_seqs = concurrency.max(1);
    c.scheduler.max_num_batched_tokens = (concurrency * prompt_len).max(2048);
    c.cache.memory_bytes = 1 << 30;
    c.threading.num_threads = Some(1);
    c.threading.engine_core = engine_core;
    c.threading.compute_cores = engine_core.into_iter().collect();
    Engine::new(NullBackend, model, Some(tok), c).expect("null engine")
}

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((i * 31 + j * 7) % 500 + 1) as u32)
        .collect()
}

/// CPU time (ns, from /proc/self/task/*/schedstat) of this process's threads by name prefix:
/// server runtime, engine (the engine loop runs inside its compute pool), client runtime.
fn cpu_ns() -> [u64; 3] {
    let mut out = [0u64; 3];
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(0);
        let slot = if comm.starts_with("bench-server") {
            0
        } else if comm.starts_with("autoglm") {
            1
        } else if comm.starts_with("bench-client") {
            2
        } else {
            continue;
        };
        out[slot] += ns;
    }
    out
}

#[derive(Debug, Default, Clone)]
struct Run {
    tokens: usize,
    wall: Duration,
    /// CPU ns of [server runtime, engine, client runtime] threads during the run.
    cpu: [u64; 3],
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tpot: Vec<f64>,
    /// Per stream, when each token arrived (seconds from the run's start).
    arrivals: Vec<Vec<f32>>,
}

impl Run {
    fn tok_per_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }

    /// Tokens/s over the middle 80% of the tokens (from the moment 10% of all tokens had
    /// arrived to the moment 90% had): the rate once the streams are open, without connection
    /// set-up and the tail.
    fn steady_tok_per_s(&self) -> f64 {
        let mut all: Vec<f32> = self.arrivals.iter().flatten().copied().collect();
        if all.len() < 10 {
            return f64::NAN;
        }
        all.sort_by(f32::total_cmp);
        let (lo, hi) = (all.len() / 10, all.len() * 9 / 10);
        (hi - lo) as f64 / (all[hi] - all[lo]) as f64
    }

    /// CPU microseconds per token of thread group `i`.
    fn cpu_us_per_token(&self, i: usize) -> f64 {
        self.cpu[i] as f64 / 1e3 / self.tokens.max(1) as f64
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The engine alone: every request submitted at once, each stream drained by its own task, woken
/// at the same stream interval as the server's streams (so the comparison isolates the server).
#[allow(clippy::too_many_arguments)]
fn run_engine(
    rt: &tokio::runtime::Runtime,
    c: usize,
    requests: usize,
    tokens: usize,
    prompt_len: usize,
    stream_interval: usize,
    engine_core: Option<usize>,
) -> Run {
    let engine = null_engine(c, prompt_len, engine_core);
    // One short request first, so first-use costs are not in the figures.
    let warm = SamplingParams {
        max_tokens: 4,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let _ = engine.generate(prompt(0, prompt_len), warm);
    let cpu0 = cpu_ns();
    let mut run = rt.block_on(async {
        let t0 = Instant::now();
        let params = SamplingParams {
            max_tokens: tokens,
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let submit = move |engine: &Engine, params: &SamplingParams, k: usize| {
            let mut s = engine
                .submit(prompt(k, prompt_len), params.clone())
                .expect("submit");
            s.set_stream_interval(stream_interval);
            s
        };
        let mut tasks = Vec::with_capacity(c);
        for i in 0..c {
            // Every stream's first request is submitted at once, the rest as the previous ends.
            let first = submit(&engine, &params, i * requests);
            let mut sent = t0.elapsed();
            let (engine, params) = (engine.clone(), params.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::with_capacity(requests);
                let mut next = Some(first);
                for r in 0..requests {
                    let mut s = next.take().expect("a request");
                    let mut n = 0;
                    let mut first_at = None;
                    let mut arrivals = Vec::with_capacity(tokens);
                    while let Some(ev) = s.recv_async().await {
                        let k = ev.expect("event").token_ids.len();
                        n += k;
                        let now = t0.elapsed();
                        first_at.get_or_insert(now);
                        arrivals.extend(std::iter::repeat_n(now.as_secs_f32(), k));
                    }
                    out.push((
                        n,
                        first_at.unwrap_or_default().saturating_sub(sent),
                        arrivals,
                    ));
                    if r + 1 < requests {
                        next = Some(submit(&engine, &params, i * requests + r + 1));
                        sent = t0.elapsed();
                    }
                }
                out
            }));
        }
        let mut run = Run::default();
        for t in tasks {
            let mut stream_arrivals = Vec::new();
            for (n, ttft, arrivals) in t.await.expect("task") {
                run.tokens += n;
                run.ttft.push(ttft.as_secs_f64());
                stream_arrivals.extend(arrivals);
            }
            run.arrivals.push(stream_arrivals);
        }
        run.wall = t0.elapsed();
        run
    });
    let cpu1 = cpu_ns();
    run.cpu = std::array::from_fn(|i| cpu1[i] - cpu0[i]);
    drop(engine);
    run
}

/// Client-side timing of one streamed response, as vLLM's benchmark_serving takes it: every SSE
/// event is one token here (the server sends one per token), and events that arrive in one read
/// arrive together (an ITL of 0, as that client would see them).
struct EventClock {
    t0: Instant,
    sent: Instant,
    events: usize,
    ttft: f64,
    last: Instant,
    itl: Vec<f64>,
    arrivals: Vec<f32>,
    prev_newline: bool,
}

impl EventClock {
    fn new(t0: Instant, sent: Instant) -> Self {
        EventClock {
            t0,
            sent,
            events: 0,
            ttft: 0.0,
            last: sent,
            itl: Vec::new(),
            arrivals: Vec::new(),
            prev_newline: false,
        }
    }

    /// Body bytes that arrived at `now`; an event ends with a blank line.
    fn feed(&mut self, data: &[u8], now: Instant) {
        for i in memchr::memchr_iter(b'\n', data) {
            let after_newline = if i == 0 {
                self.prev_newline
            } else {
                data[i - 1] == b'\n'
            };
            if after_newline {
                if self.events == 0 {
                    self.ttft = (now - self.sent).as_secs_f64();
                } else {
                    self.itl.push((now - self.last).as_secs_f64());
                }
                self.last = now;
                self.events += 1;
                self.arrivals.push((now - self.t0).as_secs_f32());
            }
        }
        if let Some(&b) = data.last() {
            self.prev_newline = b == b'\n';
        }
    }

    /// The request's figures, once its last event arrived.
    fn finish(mut self) -> Timing {
        // The last event is `[DONE]`, which carries no token.
        let tokens = self.events.saturating_sub(1);
        self.itl.pop();
        self.arrivals.pop();
        let latency = (self.last - self.sent).as_secs_f64();
        (tokens, self.ttft, self.itl, latency, self.arrivals)
    }
}

/// A request's client-side figures: (tokens, TTFT, ITLs, latency, token arrival times in seconds
/// from the run's start).
type Timing = (usize, f64, Vec<f64>, f64, Vec<f32>);

/// One stream: its requests one after another, each streamed; their timings.
async fn stream_requests(
    addr: SocketAddr,
    h2: Option<H2Sender>,
    bodies: Vec<String>,
    t0: Instant,
) -> Vec<Timing> {
    let Some(tx) = h2 else {
        return h1_stream(addr, &bodies, t0).await;
    };
    let mut out = Vec::with_capacity(bodies.len());
    for body in bodies {
        out.push(h2_request(tx.clone(), addr, body, t0).await);
    }
    out
}

/// One streaming request over a shared HTTP/2 connection.
async fn h2_request(mut tx: H2Sender, addr: SocketAddr, body: String, t0: Instant) -> Timing {
    let req = hyper::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let sent = Instant::now();
    let resp = tx.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut clock = EventClock::new(t0, sent);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            clock.feed(&data, Instant::now());
        }
    }
    clock.finish()
}

/// A stream's requests, one after another on one new HTTP/1.1 connection (kept alive between
/// them), written and read directly on the socket (as a load generator like wrk does) so the
/// client's share of the one core it shares with the server stays small: each request in one
/// write, the responses read into one reused buffer, their chunked framing decoded in place.
async fn h1_stream(addr: SocketAddr, bodies: &[String], t0: Instant) -> Vec<Timing> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = vec![0u8; 16 << 10];
    let mut out = Vec::with_capacity(bodies.len());
    for body in bodies {
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let sent = Instant::now();
        io.write_all(req.as_bytes()).await.expect("send request");
        let mut clock = EventClock::new(t0, sent);
        let mut filled = 0;
        // The head: status 200 and a chunked body.
        let body_start = loop {
            let n = io.read(&mut buf[filled..]).await.expect("read response");
            assert!(n > 0, "connection closed before the response head");
            filled += n;
            if let Some(end) = memchr::memmem::find(&buf[..filled], b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end]).expect("response head");
                assert!(head.starts_with("HTTP/1.1 200"), "response: {head}");
                assert!(
                    head.to_ascii_lowercase()
                        .contains("transfer-encoding: chunked"),
                    "not chunked: {head}"
                );
                break end + 4;
            }
            assert!(filled < buf.len(), "response head over {} bytes", buf.len());
        };
        let mut chunks = Chunked::Size(0);
        let mut now = Instant::now();
        let (mut from, mut to) = (body_start, filled);
        loop {
            chunks.feed(&buf[from..to], |d| clock.feed(d, now));
            if chunks == Chunked::Done {
                break;
            }
            let n = io.read(&mut buf).await.expect("read body");
            assert!(n > 0, "connection closed mid-body");
            now = Instant::now();
            (from, to) = (0, n);
        }
        out.push(clock.finish());
    }
    out
}

/// Decoder state of a chunked HTTP/1.1 body (no extensions or trailers expected, as the server
/// sends none).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunked {
    /// Reading a chunk-size line (the hex digits so far).
    Size(usize),
    /// After the size line's CR.
    SizeLf(usize),
    /// Inside chunk data (bytes left).
    Data(usize),
    DataCr,
    DataLf,
    /// After the last chunk: its blank line's CR, then LF.
    EndCr,
    EndLf,
    Done,
}

impl Chunked {
    /// Decodes `input`, passing each run of body data to `data`.
    fn feed(&mut self, mut input: &[u8], mut data: impl FnMut(&[u8])) {
        while let Some(&b) = input.first() {
            let mut used = 1;
            *self = match *self {
                Chunked::Size(n) => match b {
                    b'\r' => Chunked::SizeLf(n),
                    _ => {
                        let d = (b as char).to_digit(16).expect("hex chunk size") as usize;
                        Chunked::Size(n * 16 + d)
                    }
                },
                Chunked::SizeLf(n) => {
                    assert_eq!(b, b'\n', "chunk size line");
                    if n == 0 {
                        Chunked::EndCr
                    } else {
                        Chunked::Data(n)
                    }
                }
                Chunked::Data(n) => {
                    used = n.min(input.len());
                    data(&input[..used]);
                    if used == n {
                        Chunked::DataCr
                    } else {
                        Chunked::Data(n - used)
                    }
                }
                Chunked::DataCr => {
                    assert_eq!(b, b'\r', "chunk end");
                    Chunked::DataLf
                }
                Chunked::DataLf => {
                    assert_eq!(b, b'\n', "chunk end");
                    Chunked::Size(0)
                }
                Chunked::EndCr => {
                    assert_eq!(b, b'\r', "last chunk");
                    Chunked::EndLf
                }
                Chunked::EndLf => {
                    assert_eq!(b, b'\n', "last chunk");
                    Chunked::Done
                }
                Chunked::Done => panic!("bytes after the last chunk"),
            };
            input = &input[used..];
        }
    }
}

/// The same requests through the server on loopback.
#[allow(clippy::too_many_arguments)]
fn run_server(
    server_rt: &tokio::runtime::Runtime,
    client_rt: &tokio::runtime::Runtime,
    c: usize,
    requests: usize,
    tokens: usize,
    prompt_len: usize,
    stream_interval: usize,
    engine_core: Option<usize>,
    h2_connections: usize,
) -> Run {
    let engine = null_engine(c, prompt_len, engine_core);
    let models = Arc::new(ModelRegistry::new(EngineConfig::default()));
    models.add("null", engine, None).expect("add");
    let (addr, handle, task) = server_rt.block_on(async {
        let mut cfg = ServerConfig {
            listen: vec![BindAddr::Tcp(([127, 0, 0, 1], 0).into())],
            ..Default::default()
        };
        cfg.socket.acceptors = server_rt.metrics().num_workers();
        cfg.stream_interval = stream_interval;
        cfg.http.max_connections = 2 * c + 16;
        // Every client connects from 127.0.0.1.
        cfg.http.max_connections_per_ip = Some(cfg.http.max_connections);
        cfg.limits.max_concurrent_requests = 2 * c + 16;
        let server = Server::bind(cfg, models).expect("bind");
        let addr = match server.local_addrs()[0] {
            BindAddr::Tcp(a) => a,
            BindAddr::Unix(_) => unreachable!(),
        };
        let handle = server.handle();
        (addr, handle, tokio::spawn(server.run()))
    });
    let warm = serde_json::json!({"model": "null", "prompt": prompt(0, prompt_len), "max_tokens": 4, "ignore_eos": true, "stream": true});
    let h2: Vec<H2Sender> = client_rt.block_on(async {
        let mut h2 = Vec::with_capacity(h2_connections);
        for _ in 0..h2_connections {
            h2.push(h2_connect(addr).await);
        }
        h2
    });
    let sender = |i: usize| (!h2.is_empty()).then(|| h2[i % h2.len()].clone());
    client_rt.block_on(stream_requests(
        addr,
        sender(0),
        vec![warm.to_string()],
        Instant::now(),
    ));
    let cpu0 = cpu_ns();
    let mut run = client_rt.block_on(async {
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(c);
        for i in 0..c {
            let bodies = (0..requests)
                .map(|r| {
                    serde_json::json!({
                        "model": "null", "prompt": prompt(i * requests + r, prompt_len),
                        "max_tokens": tokens, "temperature": 0, "ignore_eos": true, "stream": true,
                    })
                    .to_string()
                })
                .collect();
            tasks.push(tokio::spawn(stream_requests(addr, sender(i), bodies, t0)));
        }
        let mut run = Run::default();
        for t in tasks {
            let mut stream_arrivals = Vec::new();
            for (n, ttft, itl, latency, arrivals) in t.await.expect("client task") {
                stream_arrivals.extend(arrivals);
                run.tokens += n;
                run.ttft.push(ttft);
                if n > 1 {
                    run.tpot.push((latency - ttft) / (n - 1) as f64);
                }
                run.itl.extend(itl);
            }
            run.arrivals.push(stream_arrivals);
        }
        run.wall = t0.elapsed();
        run
    });
    let cpu1 = cpu_ns();
    run.cpu = std::array::from_fn(|i| cpu1[i] - cpu0[i]);
    handle.shutdown();
    server_rt.block_on(async { task.await.expect("server task") });
    run
}

fn main() {
    let cli = Cli::parse();
    let _ = autoglm_core::net::raise_nofile_limit();
    // The engine on its core, every runtime thread on the rest.
    let cores = autoglm_core::threading::allowed_cores();
    let engine_core = match (cli.unpinned, cli.engine_core) {
        (true, _) => None,
        (false, Some(c)) => Some(c),
        (false, None) => autoglm_core::threading::serving_layout().map(|(e, _)| e),
    };
    let others: Vec<usize> = cores
        .iter()
        .copied()
        .filter(|&c| Some(c) != engine_core)
        .collect();
    if let Some(c) = engine_core {
        if !cores.contains(&c) || others.is_empty() {
            eprintln!("error: --engine-core {c} needs another core for the rest (allowed cores: {cores:?})");
            std::process::exit(2);
        }
    }
    let rest = others.clone();
    let pin_others = move || {
        if engine_core.is_some() {
            autoglm_core::threading::pin_current_thread_to(&rest).expect("pin runtime thread");
        }
    };
    let server_workers = cli.server_workers.unwrap_or(others.len()).max(1);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_workers)
        .on_thread_start(pin_others.clone())
        .thread_name("bench-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_workers)
        .on_thread_start(pin_others)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    println!("machine: {}", machine());
    println!(
        "null backend, bundled model shape (vocab 600) and tokenizer; prompt {} tokens; server workers {}, client workers {}; stream interval {} (engine-alone consumers: {}); engine core {}; {} request(s) per stream; median-ratio pair of {} alternating engine/server runs",
        cli.prompt_len, server_workers, cli.client_workers, cli.stream_interval,
        cli.engine_stream_interval.unwrap_or(cli.stream_interval),
        engine_core.map_or("unpinned".to_string(), |c| format!("{c} (everything else on {others:?})")),
        cli.requests_per_stream.max(1),
        cli.repeats
    );
    println!();
    println!("| streams | tokens/stream | engine tok/s | server tok/s | server/engine | all pairs | middle 80%: engine tok/s | server tok/s | server/engine | engine TTFT p50 ms | TTFT p50 ms | TTFT p99 ms | TTFT max ms | ITL p50 ms | ITL p99 ms | TPOT mean ms | CPU µs/token: engine alone (engine + consumer) | via server (engine + server + client) |");
    println!(
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    let engine_interval = cli.engine_stream_interval.unwrap_or(cli.stream_interval);
    for &c in &cli.concurrency.0 {
        let tokens = (cli.total_tokens / c.max(1)).clamp(64, 4000);
        let requests = cli.requests_per_stream.max(1);
        let per_stream = if requests == 1 {
            tokens.to_string()
        } else {
            format!("{requests} x {tokens}")
        };
        // Warm-up (page faults, thread pools, connection paths).
        let want = |what: &str| cli.only.as_deref().is_none_or(|o| o == what);
        // Engine and server runs alternate, so load from elsewhere on the machine hits both
        // alike; the pair with the median ratio is reported.
        if want("engine") {
            run_engine(
                &server_rt,
                c,
                1,
                64,
                cli.prompt_len,
                engine_interval,
                engine_core,
            );
        }
        if want("server") {
            run_server(
                &server_rt,
                &client_rt,
                c,
                1,
                64,
                cli.prompt_len,
                cli.stream_interval,
                engine_core,
                cli.http2_connections,
            );
        }
        let mut pairs: Vec<(Run, Run)> = (0..cli.repeats.max(1))
            .map(|_| {
                let e = if want("engine") {
                    run_engine(
                        &server_rt,
                        c,
                        requests,
                        tokens,
                        cli.prompt_len,
                        engine_interval,
                        engine_core,
                    )
                } else {
                    Run::default()
                };
                let s = if want("server") {
                    run_server(
                        &server_rt,
                        &client_rt,
                        c,
                        requests,
                        tokens,
                        cli.prompt_len,
                        cli.stream_interval,
                        engine_core,
                        cli.http2_connections,
                    )
                } else {
                    Run::default()
                };
                (e, s)
            })
            .collect();
        let ratio = |p: &(Run, Run)| p.1.tok_per_s() / p.0.tok_per_s();
        pairs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
        let (lo, hi) = (ratio(&pairs[0]), ratio(&pairs[pairs.len() - 1]));
        let (engine, mut server) = pairs.swap_remove(pairs.len() / 2);
        if want("server") {
            assert_eq!(
                server.tokens,
                c * requests * tokens,
                "every token delivered"
            );
        }
        if want("engine") {
            assert_eq!(engine.tokens, c * requests * tokens);
        }
        let tpot_mean = server.tpot.iter().sum::<f64>() / server.tpot.len().max(1) as f64;
        println!(
            "| {c} | {per_stream} | {:.0} | {:.0} | {:.3} | {lo:.2}-{hi:.2} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} | {:.2} + {:.2} | {:.2} + {:.2} + {:.2} |",
            engine.tok_per_s(),
            server.tok_per_s(),
            server.tok_per_s() / engine.tok_per_s(),
            engine.steady_tok_per_s(),
            server.steady_tok_per_s(),
            server.steady_tok_per_s() / engine.steady_tok_per_s(),
            percentile(&mut engine.ttft.clone(), 0.5) * 1e3,
            percentile(&mut server.ttft, 0.5) * 1e3,
            percentile(&mut server.ttft, 0.99) * 1e3,
            percentile(&mut server.ttft, 1.0) * 1e3,
            percentile(&mut server.itl, 0.5) * 1e3,
            percentile(&mut server.itl, 0.99) * 1e3,
            tpot_mean * 1e3,
            engine.cpu_us_per_token(1),
            engine.cpu_us_per_token(0),
            server.cpu_us_per_token(1),
            server.cpu_us_per_token(0),
            server.cpu_us_per_token(2),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunked body of SSE events, decoded from every split of it into two reads.
    #[test]
    fn chunked_sse_bodies_decode_at_any_split() {
        let events = [
            "data: {\"text\":\"a\"}\n\n",
            "data: {\"text\":\"\\n\\n\"}\n\ndata: {\"text\":\"b\"}\n\n",
            "data: [DONE]\n\n",
        ];
        let mut wire = Vec::new();
        for e in events {
            wire.extend_from_slice(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let want: String = events.concat();
        for cut in 0..=wire.len() {
            let t0 = Instant::now();
            let mut clock = EventClock::new(t0, t0);
            let mut body = Vec::new();
            let mut dec = Chunked::Size(0);
            for part in [&wire[..cut], &wire[cut..]] {
                dec.feed(part, |d| {
                    body.extend_from_slice(d);
                    clock.feed(d, Instant::now());
                });
            }
            assert_eq!(dec, Chunked::Done, "cut at {cut}");
            assert_eq!(String::from_utf8(body).unwrap(), want, "cut at {cut}");
            // Four events, the last `[DONE]`: three tokens.
            let (tokens, _, itl, _, arrivals) = clock.finish();
            assert_eq!(tokens, 3, "cut at {cut}");
            assert_eq!((itl.len(), arrivals.len()), (2, 3));
        }
    }

    #[test]
    #[should_panic(expected = "hex chunk size")]
    fn a_bad_chunk_size_is_refused() {
        Chunked::Size(0).feed(b"zz\r\n", |_| {});
    }
}
