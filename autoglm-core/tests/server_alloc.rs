//! Allocations per streamed token on the server's threads, counted by a global allocator.
//!
//! The server runs on its own runtime whose worker threads are the only ones counted (the client
//! runs on the test thread, the engine on its own thread). The per-token figure is the difference
//! between a long and a short stream divided by the difference in tokens, so per-request costs
//! (parsing, tokenizing, the response head) cancel out.
#![cfg(feature = "server")]

mod server_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::BodyExt;
use serde_json::json;
use server_support::*;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTED.try_with(|c| c.get()).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only an
// atomic and a const-initialized thread-local without a destructor, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Server-thread allocations of one streamed completion of `tokens` tokens, and its event count.
async fn streamed(addr: std::net::SocketAddr, tokens: usize, path: &str) -> (u64, usize) {
    let io = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = if path.contains("chat") {
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens, "ignore_eos": true, "stream": true})
    } else {
        json!({"prompt": [1, 2, 3], "max_tokens": tokens, "ignore_eos": true, "stream": true})
    };
    let req = hyper::Request::post(path)
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let before = ALLOCS.load(Ordering::SeqCst);
    let mut resp = tx.send_request(req).await.unwrap().into_body();
    let mut all = Vec::new();
    while let Some(f) = resp.frame().await {
        all.extend_from_slice(&f.unwrap().into_data().unwrap());
    }
    let allocs = ALLOCS.load(Ordering::SeqCst) - before;
    (allocs, sse_events(&all).len())
}

#[test]
fn allocations_per_streamed_token() {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| COUNTED.with(|c| c.set(true)))
        .enable_all()
        .build()
        .unwrap();
    let srv = server_rt.block_on(async {
        let mut ec = engine_config();
        ec.cache.memory_bytes = 256 << 20;
        start(loopback_config(), vec![(MODEL, null_engine(ec))])
    });
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (short, long) = (100, 4000);
    let mut report = Vec::new();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        client.block_on(streamed(srv.addr, 10, path));
        let (a_short, _) = client.block_on(streamed(srv.addr, short, path));
        let (a_long, events) = client.block_on(streamed(srv.addr, long, path));
        let per_token = (a_long as f64 - a_short as f64) / (long - short) as f64;
        eprintln!(
            "{path}: {a_short} allocations for {short} tokens, {a_long} for {long} ({events} events): {per_token:.2} per token on the server's threads"
        );
        report.push((path, per_token));
        assert!(events >= long, "one event per token");
    }
    for (path, per_token) in report {
        // Events are rendered into a per-stream buffer whose memory is reused once hyper has
        // written a chunk, and the engine's event channel allocates nothing per event; what is
        // left is the engine's own output per token (its token id vector and text), freed on the
        // server's threads.
        assert!(
            per_token <= 0.25,
            "{path}: {per_token:.2} allocations per token"
        );
    }
    server_rt.block_on(srv.stop());
}
