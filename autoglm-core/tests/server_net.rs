//! The socket layer: Unix sockets, IPv6, h2c, TLS 1.3 with ALPN, SO_REUSEPORT acceptors and
//! graceful shutdown.
#![cfg(feature = "server")]

mod server_support;

use std::sync::Arc;
use std::time::Duration;

use autoglm_core::net::{BindAddr, TlsFiles};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use server_support::*;

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("autoglm-net-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn completion_request(stream: bool) -> Request<Full<Bytes>> {
    let (prompt, _) = greedy_case(0);
    let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                      "return_token_ids": true, "stream": stream});
    Request::post("/v1/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn greedy_json() -> serde_json::Value {
    json!(greedy_case(0).1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_ipv6() {
    let dir = temp_dir("uds");
    let sock = dir.join("s.sock");
    let mut cfg = loopback_config();
    cfg.listen.push(BindAddr::Unix(sock.clone()));
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if v6 {
        cfg.listen.push("[::1]:0".parse().unwrap());
    }
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    assert!(srv.addrs.contains(&BindAddr::Unix(sock.clone())));
    let io = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = read_reply(tx.send_request(completion_request(false)).await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["token_ids"], greedy_json());
    if v6 {
        let a6 = srv
            .addrs
            .iter()
            .find_map(|a| match a {
                BindAddr::Tcp(sa) if sa.is_ipv6() => Some(*sa),
                _ => None,
            })
            .unwrap();
        assert_eq!(get(a6, "/health").await.status, 200);
    } else {
        eprintln!("no IPv6 loopback here; skipped that part");
    }
    srv.stop().await;
    assert!(!sock.exists(), "the socket file is removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_streams() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let io = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Two concurrent streams on one connection.
    let (a, b) = tokio::join!(
        tx.clone().send_request(completion_request(true)),
        tx.send_request(completion_request(false))
    );
    let a = a.unwrap();
    assert_eq!(a.version(), hyper::Version::HTTP_2);
    assert!(a.headers().contains_key("x-request-id"));
    let a = read_reply(a).await;
    let b = read_reply(b.unwrap()).await;
    let streamed: Vec<u64> = a
        .events()
        .iter()
        .flat_map(|e| {
            e["choices"][0]["token_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(json!(streamed), greedy_json());
    assert_eq!(b.json()["choices"][0]["token_ids"], greedy_json());
    srv.stop().await;
}

fn tls_client(alpn: &[&[u8]], cert_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_with_alpn_h2_and_http1() {
    let dir = temp_dir("tls");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = loopback_config();
    cfg.tls = Some(TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    });
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let tls = tls_client(&[b"h2", b"http/1.1"], &cert_pem)
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = read_reply(tx.send_request(completion_request(true)).await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert!(!r.events().is_empty());

    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let tls = tls_client(&[b"http/1.1"], &cert_pem)
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = read_reply(tx.send_request(completion_request(false)).await.unwrap()).await;
    assert_eq!(r.json()["choices"][0]["token_ids"], greedy_json());

    // Plain HTTP on the TLS port does not get an answer in clear text.
    let out = raw(
        srv.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(!out.starts_with("HTTP/1.1 200"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_streams_then_exits() {
    let mut cfg = loopback_config();
    cfg.socket.acceptors = 2;
    cfg.shutdown_grace = Some(Duration::from_secs(30));
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let io = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = json!({"prompt": [1, 2, 3], "n": 8, "max_tokens": 1500, "ignore_eos": true, "stream": true});
    let req = Request::post("/v1/completions")
        .header("host", "x")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut seen = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .to_vec();
    srv.handle.shutdown();
    // New connections are refused once the acceptors stop.
    eventually("the listeners to close", async || {
        tokio::net::TcpStream::connect(srv.addr).await.is_err()
    })
    .await;
    while let Some(f) = body.frame().await {
        seen.extend_from_slice(&f.unwrap().into_data().unwrap());
    }
    let events = sse_events(&seen);
    let finished = events
        .iter()
        .filter(|e| e["choices"][0]["finish_reason"] == "length")
        .count();
    assert_eq!(finished, 8, "every choice ran to its end");
    tokio::time::timeout(Duration::from_secs(10), srv.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_ends_long_streams_with_an_error_event() {
    const DRAIN: Duration = Duration::from_millis(1000);
    let mut cfg = loopback_config();
    cfg.shutdown_drain_delay = Some(DRAIN);
    // Short: the stream (64 choices of 4,000 tokens) must still run when the grace ends.
    cfg.shutdown_grace = Some(Duration::from_millis(300));
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let io = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = json!({"prompt": [1, 2, 3], "n": 64, "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let req = Request::post("/v1/completions")
        .header("host", "x")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let mut body = tx.send_request(req).await.unwrap().into_body();
    // The client reads its stream all along.
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => seen.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(e) => return Err((e.to_string(), seen)),
            }
        }
        Ok(seen)
    });
    let models = srv.models.clone();
    let t = std::time::Instant::now();
    srv.handle.shutdown();

    // During the drain delay /ready fails at once, yet new connections are accepted and served
    // (the load balancer may not have noticed yet).
    let ready = get(srv.addr, "/ready").await;
    assert_eq!(ready.status, 503);
    let (prompt, greedy) = greedy_case(0);
    let late = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": greedy.len(), "temperature": 0,
                "ignore_eos": true, "return_token_ids": true}),
    )
    .await;
    assert_eq!(late.status, 200, "{}", late.text());
    assert_eq!(late.json()["choices"][0]["token_ids"], json!(greedy));
    assert!(t.elapsed() < DRAIN, "the checks ran past the drain delay");
    // Then the listeners stop.
    eventually("the listeners to close", async || {
        tokio::net::TcpStream::connect(srv.addr).await.is_err()
    })
    .await;
    assert!(t.elapsed() >= DRAIN, "closed before the drain delay");

    tokio::time::timeout(Duration::from_secs(10), srv.task)
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < DRAIN + Duration::from_secs(4));
    // The stream still running at the grace's end got an error event, then [DONE], then a clean
    // end of its chunked body.
    let seen = reader
        .await
        .unwrap()
        .unwrap_or_else(|(e, seen)| panic!("{e} after {}", String::from_utf8_lossy(&seen)));
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "{}",
        &text[text.len().saturating_sub(500)..]
    );
    let events = sse_events(&seen);
    let last = events.last().expect("events");
    assert_eq!(last["error"]["code"], "server_shutdown", "{last}");
    assert_eq!(last["error"]["type"], "server_error", "{last}");
    let finished = events
        .iter()
        .filter(|e| e["choices"][0]["finish_reason"] == "length")
        .count();
    assert!(
        finished < 64,
        "the stream ran to its end before the grace did"
    );
    let engine = models.lease(None).unwrap();
    eventually("KV blocks to be freed", async || {
        engine
            .engine
            .stats()
            .kv_blocks_used
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streamed_request_running_past_the_shutdown_grace_gets_a_503() {
    let mut cfg = loopback_config();
    cfg.shutdown_grace = Some(Duration::from_millis(300));
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let long = tokio::spawn(async move {
        post(
            a,
            "/v1/completions",
            &json!({"prompt": [1, 2, 3], "n": 64, "max_tokens": 4000, "ignore_eos": true}),
        )
        .await
    });
    eventually("the request to run", async || {
        metric(
            &get(a, "/metrics").await.text(),
            "autoglm_num_requests_running{",
        ) > 0.0
    })
    .await;
    srv.handle.shutdown();
    let r = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("answered at the grace's end")
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error()["code"], "server_shutdown");
    tokio::time::timeout(Duration::from_secs(10), srv.task)
        .await
        .unwrap()
        .unwrap();
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8), with a receive
/// buffer of `rcvbuf` bytes when given.
async fn connect_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
    rcvbuf: Option<u32>,
) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind((from, 0).into()).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.connect(to).await.unwrap()
}

/// Sends `GET path` with `connection: close` and reads until the server closes (at most `wait`):
/// the answer, or what came before the connection was closed or reset.
async fn get_on(mut s: tokio::net::TcpStream, path: &str, wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    // A connection closed on accept may refuse the write too.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closes `s` (EOF or reset) within `wait`, reading and discarding.
async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn metrics_from(from: [u8; 4], to: std::net::SocketAddr) -> String {
    let r = get_on(
        connect_from(from, to, None).await,
        "/metrics",
        Duration::from_secs(5),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_capped_per_address_and_closed_after_the_header_timeout() {
    const CAP: usize = 8;
    let mut cfg = loopback_config();
    cfg.http.max_connections = 64;
    cfg.http.max_connections_per_ip = Some(CAP);
    cfg.http.header_read_timeout = Some(Duration::from_millis(1500));
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let (a, b) = ([127, 0, 0, 1], [127, 0, 0, 2]);
    let opened = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(connect_from(a, srv.addr, None).await);
    }
    // All of them accepted (the metrics connection from another address is the one more).
    eventually("the idle sockets to be accepted", async || {
        metric(&metrics_from(b, srv.addr).await, "autoglm_open_connections") >= (CAP + 1) as f64
    })
    .await;
    // One more from the same address is closed unanswered; another address is served.
    let extra = get_on(
        connect_from(a, srv.addr, None).await,
        "/health",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        !extra.contains("200 OK"),
        "a connection over the per-address cap was served: {extra}"
    );
    let other = get_on(
        connect_from(b, srv.addr, None).await,
        "/health",
        Duration::from_secs(3),
    )
    .await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    let m = metrics_from(b, srv.addr).await;
    assert_eq!(
        metric(&m, "autoglm_rejected_connections_per_address_total"),
        1.0
    );
    // Sockets that never send a byte are closed once the header timeout has passed since accept.
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(4)).await,
            "an idle socket outlived the header timeout"
        );
    }
    let t = opened.elapsed();
    assert!(
        t >= Duration::from_millis(1400),
        "closed before the header timeout ({t:?})"
    );
    // Their address has its share back.
    let again = get_on(
        connect_from(a, srv.addr, None).await,
        "/health",
        Duration::from_secs(3),
    )
    .await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    let m = metrics_from(b, srv.addr).await;
    assert!(metric(&m, "autoglm_header_timeouts_total") >= CAP as f64);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stops_reading_is_cancelled_after_the_write_timeout() {
    use tokio::io::AsyncReadExt;
    const MAX_TOKENS: usize = 4000;
    let mut cfg = loopback_config();
    cfg.stream_write_timeout = Some(Duration::from_secs(1));
    cfg.socket.send_buffer_size = Some(4096);
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let engine = srv.models.lease(None).unwrap().engine.clone();
    let stats = || engine.stats();
    let load = |v: &std::sync::atomic::AtomicUsize| v.load(std::sync::atomic::Ordering::Relaxed);

    // A client with a small receive buffer reads the response head, then nothing more.
    let mut s = connect_from([127, 0, 0, 1], srv.addr, Some(4096)).await;
    let body = json!({"prompt": [1, 2, 3], "max_tokens": MAX_TOKENS, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    stall_after_head(&mut s, &body).await;

    // Its output fills a bounded queue and the engine holds the request back, unfinished, while
    // it goes on with everyone else.
    eventually("the stalled request to be held back", async || {
        metric(
            &get(srv.addr, "/metrics").await.text(),
            "autoglm_num_requests_paused{",
        ) == 1.0
    })
    .await;
    let generated = stats()
        .generated_tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        generated < MAX_TOKENS as u64 / 2,
        "{generated} tokens generated for a client that reads nothing"
    );
    assert!(load(&stats().kv_blocks_used) > 0);
    let (prompt, greedy) = greedy_case(0);
    let other = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": greedy.len(), "temperature": 0,
                "ignore_eos": true, "return_token_ids": true}),
    )
    .await;
    assert_eq!(other.json()["choices"][0]["token_ids"], json!(greedy));

    // Past the write timeout (the client still reads nothing) the connection is closed and the
    // request cancelled: its slot, its KV blocks and its model lease are free.
    eventually(
        "the stalled request to be cancelled and freed",
        async || {
            let m = get(srv.addr, "/metrics").await.text();
            metric(&m, "autoglm_http_requests_in_flight") == 0.0
                && load(&stats().kv_blocks_used) == 0
                && load(&stats().running) == 0
        },
    )
    .await;
    let m = get(srv.addr, "/metrics").await.text();
    assert_eq!(metric(&m, "autoglm_stream_write_timeouts_total"), 1.0);
    assert_eq!(metric(&m, "autoglm_num_requests_paused{"), 0.0);
    // What the client finds when it reads again: what was in flight, then the end, no [DONE].
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stalled connection stays open");
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
    assert!(
        stats()
            .generated_tokens
            .load(std::sync::atomic::Ordering::Relaxed)
            < MAX_TOKENS as u64,
        "the request ran to its end"
    );
    drop(engine);
    let models = srv.models.clone();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), models.unload(MODEL))
            .await
            .expect("no lease is left on the model")
            .is_some()
    );
    srv.stop().await;
}
