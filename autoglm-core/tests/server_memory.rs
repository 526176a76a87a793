//! Peak memory of parsing a large request body, counted by a global allocator (issue 15 item 12:
//! an 8 MB token-array body peaked at 36x its size as a `serde_json::Value`).
#![cfg(feature = "server")]

mod server_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use server_support::*;

struct Peak;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping touches
// only atomics and never allocates.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's contract is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as a new block beside the old one, which it may be while copying.
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_token_array_body_costs_a_small_multiple_of_its_size() {
    let srv = start(loopback_config(), vec![("glm4-tiny", cpu_engine())]);
    // About 8 MB of token ids: far past the context, so the answer is a 400 after parsing.
    let ids: Vec<String> = (0..1_300_000u32)
        .map(|i| (i % 90_000).to_string())
        .collect();
    let body = format!(r#"{{"prompt": [{}], "max_tokens": 1}}"#, ids.join(","));
    drop(ids);
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let size = body.len();
    drop(body);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let reply = raw(srv.addr, &request, Duration::from_secs(60)).await;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "{}",
        &reply[..reply.len().min(400)]
    );
    assert!(reply.contains("context length"), "{reply}");
    let ratio = peak as f64 / size as f64;
    eprintln!("body {size} bytes, peak {peak} bytes above the start: {ratio:.1}x");
    // The body itself, the ids at 4 bytes each (1/2 of the text) while growing, and the rest.
    assert!(
        ratio < 4.0,
        "parsing a {size}-byte body peaked at {ratio:.1}x its size"
    );
    srv.stop().await;
}
