//! Every error path of the API over loopback: statuses, OpenAI error shapes and limits.
#![cfg(feature = "server")]

mod server_support;

use std::time::Duration;

use serde_json::json;
use server_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400_with_openai_errors() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let ct = [("content-type", "application/json")];

    let r = send(a, "POST", "/v1/completions", &ct, "{not json").await;
    assert_eq!(r.status, 400);
    let e = r.error();
    assert_eq!(e["type"], "invalid_request_error");
    assert!(e["message"].as_str().unwrap().contains("not valid JSON"));

    let r = send(
        a,
        "POST",
        "/v1/completions",
        &ct,
        &b"{\"prompt\": \"\xff\xfe\"}"[..],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error()["message"].as_str().unwrap().contains("UTF-8"));

    let r = send(a, "POST", "/v1/completions", &ct, "").await;
    assert_eq!(r.status, 400);
    let r = send(a, "POST", "/v1/completions", &ct, "[1, 2]").await;
    assert_eq!(r.status, 400);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("must be a JSON object"));
    let r = send(a, "POST", "/v1/completions", &ct, "{\"prompt\": [1]} [").await;
    assert_eq!(r.status, 400);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    for (body, needle) in [
        (json!({"prompt": [1], "max_tokens": "ten"}), "invalid type"),
        (json!({"prompt": [1], "temperature": "hot"}), "invalid type"),
        (json!({"prompt": [1], "max_tokens": -1}), "invalid value"),
        (json!({"prompt": {"a": 1}}), "prompt must be"),
        (json!({"prompt": [1, "x"]}), "prompt must be"),
        (json!({"prompt": []}), "must not be empty"),
        (json!({"max_tokens": 3}), "prompt is required"),
        (json!({"prompt": [1], "stop": 5}), "stop must be"),
        (
            json!({"prompt": [1], "stop": (0..65).map(|i| i.to_string()).collect::<Vec<_>>()}),
            "at most 64 strings, got 65",
        ),
        (
            json!({"prompt": [1], "stop": ["x".repeat(513)]}),
            "at most 512 bytes, got one of 513",
        ),
        (
            json!({"prompt": [1], "stop_token_ids": vec![7; 257]}),
            "at most 256 ids",
        ),
        (
            json!({"prompt": [1], "max_tokens": u64::MAX}),
            "maximum context length",
        ),
        (json!({"prompt": [1], "top_p": 0}), "top_p"),
        (json!({"prompt": [1], "n": 0}), "n = 0"),
        (json!({"prompt": [1], "logprobs": 21}), "at most 20"),
        (json!({"prompt": [1], "top_k": -5}), "top_k"),
        (json!({"prompt": [100000]}), "outside the vocabulary"),
        (json!({"prompt": [1], "echo": true}), "echo"),
    ] {
        let r = post(a, "/v1/completions", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.error();
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }

    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": [1], "max_tokens": 0}),
    )
    .await;
    assert_eq!(r.status, 400);
    let e = r.error();
    assert_eq!(e["param"], "max_tokens");
    assert!(e["message"].as_str().unwrap().contains("at least 1"));
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}),
    )
    .await;
    assert_eq!(r.error()["param"], "max_completion_tokens");

    for (body, path) in [
        (json!({"messages": "hi"}), "/v1/chat/completions"),
        (json!({"messages": []}), "/v1/chat/completions"),
        (
            json!({"messages": [{"content": "x"}]}),
            "/v1/chat/completions",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "/v1/chat/completions",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "/v1/chat/completions",
        ),
        (json!({"tokens": [1, 99999]}), "/detokenize"),
        (json!({}), "/tokenize"),
    ] {
        let r = post(a, path, &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        r.error();
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_length_is_checked_in_vllm_words() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let prompt: Vec<u32> = (1..=10).collect();
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 5000}),
    )
    .await;
    assert_eq!(r.status, 400);
    let e = r.error();
    assert_eq!(
        e["message"],
        "This model's maximum context length is 4096 tokens. However, you requested 5010 tokens (10 in the messages, 5000 in the completion). Please reduce the length of the messages or completion."
    );
    assert_eq!(e["code"], "context_length_exceeded");
    let long: Vec<u32> = (0..4096).map(|i| (i % 500) as u32).collect();
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.error()["message"].as_str().unwrap().starts_with(
        "This model's maximum context length is 4096 tokens. However, your messages resulted in"
    ));
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": long, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 400);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_routes_and_methods() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"model": "nope", "prompt": [1]}),
    )
    .await;
    assert_eq!(r.status, 404);
    let e = r.error();
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    let r = post(
        srv.addr,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(get(srv.addr, "/v1/models/nope").await.status, 404);
    let r = get(srv.addr, "/v2/everything").await;
    assert_eq!(r.status, 404);
    r.error();
    assert!(r.headers.contains_key("x-request-id"));
    let r = get(srv.addr, "/v1/completions").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    r.error();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_heads_over_the_limits() {
    let mut cfg = loopback_config();
    cfg.limits.max_body_bytes = 1024;
    cfg.http.max_header_bytes = 8192;
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let big = json!({"prompt": "x".repeat(2000)});
    let r = post(srv.addr, "/v1/completions", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error()["code"], "request_too_large");
    // Chunked, so no Content-Length to refuse early: the limit applies while reading.
    let body = format!("{{\"prompt\": \"{}\"}}", "y".repeat(3000));
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let out = raw(srv.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    let head = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "z".repeat(20_000)
    );
    let out = raw(srv.addr, head.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    srv.stop().await;
}

/// A generation of 64 choices of up to 4000 tokens, running in the background.
fn long_generation(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move {
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": [1, 2, 3], "n": 64, "max_tokens": 4000, "ignore_eos": true}),
        )
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_503_and_disconnect_cancels() {
    let mut cfg = loopback_config();
    // In-flight counts choices: the long generation's 64 take every slot.
    cfg.limits.max_concurrent_requests = 64;
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    // A long generation holds every slot.
    let long = long_generation(srv.addr);
    eventually("the long request to run", async || {
        let m = get(srv.addr, "/metrics").await.text();
        metric(&m, "autoglm_kv_blocks_used{") > 0.0
    })
    .await;
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": [1], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.error()["type"], "overloaded_error");
    // The client gives up: its connection closes, the request is cancelled, blocks come back.
    long.abort();
    eventually("KV blocks to be freed", async || {
        let m = get(srv.addr, "/metrics").await.text();
        metric(&m, "autoglm_kv_blocks_used{") == 0.0
            && metric(&m, "autoglm_num_requests_running{") == 0.0
            && metric(&m, "autoglm_http_requests_in_flight") == 0.0
    })
    .await;
    let m = get(srv.addr, "/metrics").await.text();
    assert!(metric(&m, "autoglm_engine_generated_tokens_total{") < 64.0 * 4000.0);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": [1], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200);
    srv.stop().await;

    let mut cfg = loopback_config();
    cfg.limits.max_waiting_requests = Some(0);
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let r = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": [1], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 503);
    srv.stop().await;
}

/// Issue 15, item 1: one small body could create prompts x n sequences without bound and count
/// as one request against every limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_creates_a_bounded_number_of_choices_and_each_counts() {
    let mut cfg = loopback_config();
    cfg.limits.max_choices_per_request = 8;
    cfg.limits.max_concurrent_requests = 6;
    cfg.limits.max_waiting_requests = Some(7);
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    // Over the per-request cap: a 400 naming the field, before any tokenizing.
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| vec![1, i]).collect();
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": prompts, "n": 2, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.error();
    assert_eq!(e["param"], "prompt");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("5 prompts x n = 2 make 10 choices"),
        "{e}"
    );
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "n": 9, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["param"], "n");
    // Within it but over the in-flight cap of 6 choices: 503, and nothing is left counted.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": [1], "n": 7, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("this request has 7"));
    // Within every cap: served, with all its choices.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": [[1, 2], [1, 3], [1, 4]], "n": 2, "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 6);
    let m = get(a, "/metrics").await.text();
    assert_eq!(metric(&m, "autoglm_http_requests_in_flight"), 0.0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_disconnect_frees_kv_blocks() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let stream = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let body = json!({"prompt": [1, 2, 3], "n": 16, "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let req = hyper::Request::post("/v1/completions")
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    for _ in 0..5 {
        body.frame().await.unwrap().unwrap();
    }
    // The engine publishes its counters after a step's tokens are sent, so the first read may
    // come before the first step's blocks are counted.
    eventually("KV blocks in use while the request streams", async || {
        let m = get(srv.addr, "/metrics").await.text();
        metric(&m, "autoglm_kv_blocks_used{") > 0.0
    })
    .await;
    drop(body);
    drop(sender);
    conn.abort();
    eventually("KV blocks to be freed after the disconnect", async || {
        let m = get(srv.addr, "/metrics").await.text();
        metric(&m, "autoglm_kv_blocks_used{") == 0.0
            && metric(&m, "autoglm_open_connections") <= 1.0
    })
    .await;
    let m = get(srv.addr, "/metrics").await.text();
    assert!(metric(&m, "autoglm_engine_generated_tokens_total{") < 16.0 * 4000.0);
    srv.stop().await;
}

/// A streamed request's response head waits for its first token; a client that leaves while
/// the request still waits for a free sequence cancels it all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_stream_disconnect_cancels_before_its_first_token() {
    use tokio::io::AsyncWriteExt;
    let mut ec = engine_config();
    ec.scheduler.max_num_seqs = 64;
    let engine = autoglm_core::Engine::from_dir(&fixture_dir(), ec).unwrap();
    let srv = start(loopback_config(), vec![(MODEL, engine)]);
    let addr = srv.addr;
    let metrics = async || get(addr, "/metrics").await.text();
    // Its 64 choices take every sequence for a long while.
    let long = long_generation(addr);
    // (The gauges count sequences.)
    eventually("the long request to run", async || {
        metric(&metrics().await, "autoglm_num_requests_running{") == 64.0
    })
    .await;
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({"prompt": [4], "max_tokens": 8, "stream": true}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    eventually("the streamed request to wait for a sequence", async || {
        metric(&metrics().await, "autoglm_num_requests_waiting{") == 1.0
    })
    .await;
    drop(sock);
    eventually("the waiting request to be cancelled", async || {
        let m = metrics().await;
        metric(&m, "autoglm_num_requests_waiting{") == 0.0
            && metric(&m, "autoglm_http_requests_in_flight") == 64.0
    })
    .await;
    let m = metrics().await;
    assert_eq!(
        metric(&m, "autoglm_num_requests_running{"),
        64.0,
        "the long request ended before the check: the test proved nothing"
    );
    long.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts() {
    let mut cfg = loopback_config();
    cfg.http.header_read_timeout = Some(Duration::from_millis(300));
    cfg.http.idle_timeout = Some(Duration::from_millis(300));
    cfg.limits.body_read_timeout = Some(Duration::from_millis(300));
    cfg.limits.request_timeout = Some(Duration::from_millis(300));
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    // A head that never completes: closed.
    let t = std::time::Instant::now();
    let _ = raw(
        srv.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(3));
    // A body that never completes: 408.
    let out = raw(
        srv.addr,
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"prompt\"",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    // An idle keep-alive connection: closed after its answer.
    let t = std::time::Instant::now();
    let out = raw(
        srv.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // A generation past the request timeout: 504, or an error event in a stream.
    let long = json!({"prompt": [1, 2], "n": 32, "max_tokens": 4000, "ignore_eos": true});
    let r = post(srv.addr, "/v1/completions", &long).await;
    assert_eq!(r.status, 504, "{}", r.text());
    r.error();
    let mut s = long.clone();
    s["stream"] = json!(true);
    let r = post(srv.addr, "/v1/completions", &s).await;
    let events = r.events();
    assert_eq!(events.last().unwrap()["error"]["code"], "timeout");
    eventually("KV blocks to be freed", async || {
        let m = get(srv.addr, "/metrics").await.text();
        metric(&m, "autoglm_kv_blocks_used{") == 0.0
    })
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_answers_503_and_closes() {
    let mut cfg = loopback_config();
    cfg.http.max_connections = 2;
    // All three come from 127.0.0.1: no per-address cap before the global one.
    cfg.http.max_connections_per_ip = Some(8);
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let out = raw(
        srv.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the rejection must not hang"
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{out}");
    assert!(lower.contains("x-request-id:"), "{out}");
    assert!(out.contains("\"overloaded_error\""), "{out}");
    drop((a, b));
    eventually("a slot to free up", async || {
        get(srv.addr, "/health").await.status == 200
    })
    .await;
    srv.stop().await;
}

/// Issue 15, item 5: tokenizing ran on the async HTTP worker, so one large prompt froze every
/// other route. On a runtime of one thread (the worst case), `/health` is answered while a
/// multi-megabyte prompt is still being tokenized.
#[tokio::test(flavor = "current_thread")]
async fn a_large_prompt_is_tokenized_off_the_http_worker() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let text = "autoglm tokenizes this sentence again and again. ".repeat(160_000);
    let big = tokio::spawn(async move { post(a, "/tokenize", &json!({ "prompt": text })).await });
    // Until the request's body is read and its tokenizing has begun.
    eventually("the large request to be read", async || {
        let m = get(a, "/metrics").await.text();
        metric(&m, "autoglm_open_connections") >= 2.0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..3 {
        assert_eq!(get(a, "/health").await.status, 200);
    }
    assert!(
        !big.is_finished(),
        "the large prompt was tokenized before /health could be answered"
    );
    let r = big.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["count"].as_u64().unwrap() > 800_000);
    srv.stop().await;
}
