//! `RequestStream` as a `futures_core::Stream`: driven by tokio and by a runtime-free
//! `block_on`, it yields the fixture's greedy tokens, ends, stays ended, and cancels on drop.
//! It is an `Iterator` too, so `StreamExt` methods whose names `Iterator` also has (`next`,
//! `map`, ...) are called by path.
#![cfg(feature = "server")]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use autoglm_core::{Engine, EngineConfig, FinishReason, RequestStream, SamplingParams};
use common::*;
use futures_core::{FusedStream, Stream};
use futures_util::StreamExt;

fn engine() -> Engine {
    let mut cfg = EngineConfig::default();
    cfg.cache.memory_bytes = 16 << 20;
    cfg.threading.num_threads = Some(1);
    Engine::from_dir(&fixture("glm4-tiny"), cfg).unwrap()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn case0() -> (Vec<u32>, Vec<u32>) {
    let case = &expected("glm4-tiny")["cases"][0];
    (
        ids(&case["prompt_token_ids"]),
        ids(&case["greedy_token_ids"]),
    )
}

/// Every event's tokens, and the last finish reason.
async fn drain(mut s: RequestStream) -> (Vec<u32>, Option<FinishReason>) {
    let (mut tokens, mut finish) = (Vec::new(), None);
    while let Some(ev) = StreamExt::next(&mut s).await {
        let ev = ev.unwrap();
        tokens.extend(ev.token_ids);
        finish = ev.finish_reason.or(finish);
    }
    assert!(s.is_terminated());
    // Polled again after the end: still the end.
    assert!(StreamExt::next(&mut s).await.is_none());
    (tokens, finish)
}

#[test]
fn a_stream_is_driven_by_tokio() {
    let engine = engine();
    let (prompt, want) = case0();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = engine.submit(prompt.clone(), greedy(want.len())).unwrap();
        let (tokens, finish) = drain(stream).await;
        assert_eq!(tokens, want);
        assert_eq!(finish, Some(FinishReason::Length));

        // Two at once on one task, merged as streams.
        let a = engine.submit(prompt.clone(), greedy(4)).unwrap();
        let b = engine.submit(prompt.clone(), greedy(6)).unwrap();
        // `select` takes streams by value: no method-name clash with `Iterator` here.
        let got: Vec<_> = futures_util::stream::select(a, b).collect().await;
        let n: usize = got
            .iter()
            .map(|e| e.as_ref().unwrap().token_ids.len())
            .sum();
        assert_eq!(n, 10);

        // Dropped half-way: the request is cancelled and its blocks come back.
        let mut s = engine.submit(prompt.clone(), greedy(10_000)).unwrap();
        assert!(StreamExt::next(&mut s).await.unwrap().is_ok());
        drop(s);
        let stats = engine.stats();
        for _ in 0..500 {
            if stats.running.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(stats.running.load(std::sync::atomic::Ordering::Relaxed), 0);
    });
}

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// The smallest executor: poll, park until woken. The stream needs no runtime of its own.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[test]
fn a_stream_needs_no_runtime() {
    let engine = engine();
    let (prompt, want) = case0();
    let stream = engine.submit(prompt, greedy(want.len())).unwrap();
    assert_eq!(Stream::size_hint(&stream), (0, None));
    let (tokens, _) = block_on(drain(stream));
    assert_eq!(tokens, want);
}
