//! Load: 500 concurrent streaming requests over loopback on the fixture model (CPU backend), each
//! on its own connection; every stream must complete with the text (and tokens) of the
//! non-streamed answer to the same request. Bounded: the whole test must finish in 180 s.
#![cfg(feature = "server")]

mod server_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::*;

const STREAMS: usize = 500;

fn request(prompt: &Value, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0,
           "ignore_eos": true, "return_token_ids": true, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_streams() {
    tokio::time::timeout(Duration::from_secs(180), run())
        .await
        .expect("load test within 180 s");
}

async fn run() {
    let mut cfg = loopback_config();
    cfg.http.max_connections = 2 * STREAMS;
    // Every stream comes from 127.0.0.1.
    cfg.http.max_connections_per_ip = Some(2 * STREAMS);
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let e = expected();
    let prompts: Vec<Value> = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prompt_token_ids"].clone())
        .chain(
            e["chat"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["token_ids"].clone()),
        )
        .collect();
    let mut answers = Vec::new();
    for p in &prompts {
        let v = post(srv.addr, "/v1/completions", &request(p, false))
            .await
            .json();
        let c = &v["choices"][0];
        answers.push((
            c["text"].as_str().unwrap().to_string(),
            c["token_ids"].clone(),
        ));
    }
    // The fixture's own greedy answers, as a check on the check.
    for (i, c) in e["cases"].as_array().unwrap().iter().enumerate() {
        assert_eq!(answers[i].1, c["greedy_token_ids"]);
    }

    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let which = i % prompts.len();
        let body = request(&prompts[which], true);
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let r = post(addr, "/v1/completions", &body).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let events = r.events();
            let mut text = String::new();
            let mut ids = Vec::new();
            let mut finish = None;
            for ev in &events {
                let c = &ev["choices"][0];
                text.push_str(c["text"].as_str().unwrap_or(""));
                ids.extend(c["token_ids"].as_array().cloned().unwrap_or_default());
                if !c["finish_reason"].is_null() {
                    finish = Some(c["finish_reason"].clone());
                }
            }
            (which, text, Value::Array(ids), finish)
        }));
    }
    let mut done = 0;
    for t in tasks {
        let (which, text, ids, finish) = t.await.unwrap();
        assert_eq!(text, answers[which].0, "stream of prompt {which}");
        assert_eq!(ids, answers[which].1, "stream of prompt {which}");
        assert_eq!(finish, Some(json!("length")));
        done += 1;
    }
    assert_eq!(done, STREAMS);
    eprintln!(
        "{STREAMS} concurrent streams of 24 tokens in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let m = get(srv.addr, "/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "autoglm_http_requests_total{route=\"/v1/completions\",status=\"200\"}"
        ),
        (STREAMS + prompts.len()) as f64
    );
    assert_eq!(metric(&m, "autoglm_kv_blocks_used{"), 0.0);
    assert_eq!(metric(&m, "autoglm_http_requests_in_flight"), 0.0);
    srv.stop().await;
}
