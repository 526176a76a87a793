//! Logs: a checkpoint load's start / progress / done events, the engine's per-step and
//! per-request debug events, the periodic stats line (and its silence when idle), and the
//! server's access log (its fields, probes at debug, no prompt, and the switch that turns it off).
//!
//! One subscriber for the whole binary (the engine logs from its own thread, which a
//! thread-local default would not reach), writing JSON lines into a buffer; the tests take turns.

mod server_support;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use autoglm_core::server::ApiKey;
use autoglm_core::{Engine, SamplingParams};
use serde_json::{json, Value};
use server_support::*;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber (once) and takes the turn of one test.
fn capture() -> (MutexGuard<'static, ()>, Buffer) {
    static TURN: Mutex<()> = Mutex::new(());
    static BUFFER: OnceLock<Buffer> = OnceLock::new();
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let buf = BUFFER
        .get_or_init(|| {
            let buf = Buffer::default();
            let writer = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            buf
        })
        .clone();
    take(&buf);
    (turn, buf)
}

/// The events logged since the last call.
fn take(buf: &Buffer) -> Vec<Value> {
    let bytes = std::mem::take(&mut *buf.0.lock().unwrap());
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn at<'a>(events: &'a [Value], target: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["target"] == target).collect()
}

fn with_message<'a>(events: &[&'a Value], message: &str) -> Vec<&'a Value> {
    events
        .iter()
        .copied()
        .filter(|e| e["message"] == message)
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

#[test]
fn a_load_logs_its_start_progress_and_end() {
    let (_turn, buf) = capture();
    let engine = cpu_engine();
    drop(engine);
    let events = take(&buf);
    let model = at(&events, "autoglm::model");
    let first = model.first().expect("load events");
    assert_eq!(first["message"], "loading model", "{model:?}");
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["architecture"], "Glm4");
    assert!(first["dir"].as_str().unwrap().ends_with("glm4-tiny"));
    let total = first["weight_bytes"].as_u64().unwrap();
    assert!(total > 0);

    let progress = with_message(&model, "loading weights");
    let percents: Vec<u64> = progress
        .iter()
        .map(|e| e["percent"].as_u64().unwrap())
        .collect();
    assert!(!percents.is_empty(), "{model:?}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
    assert!(percents.len() <= 10, "{percents:?}");
    assert_eq!(
        percents.last(),
        Some(&100),
        "every tensor of the fixture is read"
    );
    for e in &progress {
        assert_eq!(e["total_bytes"].as_u64(), Some(total));
        assert!(e["read_bytes"].as_u64().unwrap() <= total);
    }

    let last = model.last().unwrap();
    assert_eq!(last["message"], "model loaded");
    assert!(last["seconds"].as_f64().unwrap() >= 0.0);
    let started = with_message(&at(&events, "autoglm::engine"), "engine started");
    assert_eq!(started.len(), 1, "{events:?}");
    assert!(started[0]["kv_blocks"].as_u64().unwrap() > 0);
}

#[test]
fn a_generation_logs_its_steps_and_requests_at_debug() {
    let (_turn, buf) = capture();
    let engine = cpu_engine();
    let tok = engine.tokenizer().unwrap();
    let secret = "a secret prompt, long enough to fill a few blocks of the cache. ".repeat(4);
    let prompt = tok.encode(&secret, true).unwrap();
    assert!(prompt.len() > 2 * 16, "{}", prompt.len());
    take(&buf);
    let out = engine.generate(prompt.clone(), greedy(5)).unwrap();
    let text = out.choices[0].text.clone();
    // Again: its full blocks come from the prefix cache.
    engine.generate(prompt.clone(), greedy(2)).unwrap();
    let events = take(&buf);
    let engine_events = at(&events, "autoglm::engine");

    let steps = with_message(&engine_events, "step");
    assert!(steps.len() >= 5, "{engine_events:?}");
    for s in &steps {
        assert_eq!(s["level"], "DEBUG");
        assert!(s["step_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(s["seqs"], 1);
    }
    assert_eq!(
        steps[0]["prefill_tokens"].as_u64(),
        Some(prompt.len() as u64)
    );
    assert_eq!(steps[0]["decode_tokens"], 0);
    assert_eq!(steps[1]["prefill_tokens"], 0);
    assert_eq!(steps[1]["decode_tokens"], 1);

    let added = with_message(&engine_events, "request added");
    assert_eq!(added.len(), 2);
    assert_eq!(
        added[0]["prompt_tokens"].as_u64(),
        Some(prompt.len() as u64)
    );
    let finished = with_message(&engine_events, "request finished");
    assert_eq!(finished.len(), 2);
    assert_eq!(finished[0]["completion_tokens"], 5);
    assert_eq!(finished[0]["finish_reason"], "length");
    assert_eq!(finished[0]["request"], added[0]["request"]);

    let hits = with_message(&engine_events, "prefix cache hit");
    assert_eq!(hits.len(), 1, "{engine_events:?}");
    assert_eq!(hits[0]["request"], added[1]["request"]);
    assert!(hits[0]["cached_tokens"].as_u64().unwrap() >= 32);

    // A cancelled request says so.
    let stream = engine.submit(prompt, greedy(1000)).unwrap();
    drop(stream);
    let mut cancelled = Vec::new();
    for _ in 0..200 {
        cancelled.extend(take(&buf));
        if cancelled
            .iter()
            .any(|e| e["message"] == "request cancelled")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        cancelled
            .iter()
            .any(|e| e["message"] == "request cancelled"),
        "{cancelled:?}"
    );

    let all: String = events.iter().map(Value::to_string).collect();
    assert!(!all.contains("secret"), "prompt text in the logs");
    if text.trim().len() >= 4 {
        assert!(!all.contains(text.trim()), "generated text in the logs");
    }
}

#[test]
fn stats_lines_come_with_activity_and_stop_when_idle() {
    let (_turn, buf) = capture();
    let mut config = engine_config();
    config.log_stats_interval = Some(Duration::from_millis(100));
    let engine = Engine::from_dir(&fixture_dir(), config).unwrap();
    take(&buf);
    engine.generate(vec![5, 6, 7, 8], greedy(16)).unwrap();
    // The window that holds the generation's end is logged when it closes.
    std::thread::sleep(Duration::from_millis(400));
    let events = take(&buf);
    let stats = at(&events, "autoglm::stats");
    assert!(!stats.is_empty(), "no stats line: {events:?}");
    for s in &stats {
        assert_eq!(s["level"], "INFO");
        let m = s["message"].as_str().unwrap();
        for part in [
            "Avg prompt throughput: ",
            "tokens/s, Avg generation throughput: ",
            "Running: ",
            "Waiting: ",
            "KV cache usage: ",
            "Prefix cache hit rate: ",
        ] {
            assert!(m.contains(part), "{m}");
        }
    }
    let generation: f64 = stats
        .iter()
        .map(|s| {
            let m = s["message"].as_str().unwrap();
            let rest = m.split("Avg generation throughput: ").nth(1).unwrap();
            rest.split(' ').next().unwrap().parse::<f64>().unwrap()
        })
        .sum();
    assert!(generation > 0.0, "{stats:?}");
    let last = stats.last().unwrap()["message"].as_str().unwrap();
    assert!(last.contains("Running: 0 reqs, Waiting: 0 reqs"), "{last}");

    // Idle: nothing more, however long it waits.
    std::thread::sleep(Duration::from_millis(500));
    let idle = take(&buf);
    assert!(at(&idle, "autoglm::stats").is_empty(), "{idle:?}");

    // Off: no line even with activity.
    drop(engine);
    let mut config = engine_config();
    config.log_stats_interval = None;
    let engine = Engine::from_dir(&fixture_dir(), config).unwrap();
    engine.generate(vec![5, 6, 7, 8], greedy(16)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let off = take(&buf);
    assert!(at(&off, "autoglm::stats").is_empty(), "{off:?}");
}

async fn access_events(buf: &Buffer, seen: &mut Vec<Value>, want: usize) {
    for _ in 0..500 {
        seen.extend(take(buf));
        if at(seen, "autoglm::access").len() >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{want} access lines expected: {seen:?}");
}

// The turn is held for the whole test on purpose: the other tests must not log meanwhile.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_and_no_prompt() {
    let (_turn, buf) = capture();
    let mut cfg = loopback_config();
    cfg.auth.api_keys = vec![ApiKey {
        key: "sk-user-0123".into(),
        name: Some("alice".into()),
        role: "user".into(),
        priority: 0,
        limits: None,
    }];
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    take(&buf);
    let secret = "the secret prompt";
    let auth = [("authorization", "Bearer sk-user-0123")];
    let body = json!({"model": MODEL, "prompt": secret, "max_tokens": 3, "ignore_eos": true});
    let r = post_with(a, "/v1/completions", &auth, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(a, "/v1/completions", &body).await;
    assert_eq!(r.status, 401);
    let r = get(a, "/health").await;
    assert_eq!(r.status, 200);
    let r = get(a, "/nowhere").await;
    assert_eq!(r.status, 404);
    let mut seen = Vec::new();
    access_events(&buf, &mut seen, 4).await;
    let access = at(&seen, "autoglm::access");
    assert_eq!(access.len(), 4, "{access:?}");

    let ok = access
        .iter()
        .find(|e| e["status"] == 200 && e["route"] == "/v1/completions");
    let ok = ok.unwrap_or_else(|| panic!("{access:?}"));
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["principal"], "alice");
    assert_eq!(ok["credential_id"], "key:alice");
    assert_eq!(ok["model"], MODEL);
    assert!(ok["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(ok["completion_tokens"], 3);
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ok["request_id"].as_str().unwrap().len(), 32);
    let client = ok["client"].as_str().unwrap();
    assert!(client.starts_with("127.0.0.1:"), "{client}");

    let denied = access.iter().find(|e| e["status"] == 401).unwrap();
    assert_eq!(denied["level"], "INFO");
    assert!(
        denied.get("principal").is_none_or(Value::is_null),
        "{denied}"
    );
    let health = access.iter().find(|e| e["route"] == "/health").unwrap();
    assert_eq!(health["level"], "DEBUG", "probes stay at debug");
    let missing = access.iter().find(|e| e["status"] == 404).unwrap();
    assert_eq!(missing["route"], "other");

    let all: String = seen.iter().map(Value::to_string).collect();
    assert!(!all.contains("secret"), "prompt text in the logs: {all}");
    assert!(!all.contains("sk-user-0123"), "an API key in the logs");
    srv.stop().await;

    // Off: the same requests log no access line.
    let mut cfg = loopback_config();
    cfg.access_log = false;
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    take(&buf);
    let r = post(srv.addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200);
    let r = get(srv.addr, "/nowhere").await;
    assert_eq!(r.status, 404);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let off = take(&buf);
    assert!(at(&off, "autoglm::access").is_empty(), "{off:?}");
    srv.stop().await;
}
