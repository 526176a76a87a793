//! Images through `/v1/chat/completions` and `/tokenize` over loopback, on the glm4v-tiny fixture:
//! greedy answers equal transformers' for the same messages, usage counts the image tokens, and
//! every kind of bad image is an OpenAI-style 400 that leaves the server serving.
#![cfg(feature = "server")]

mod common;
mod server_support;

use std::path::PathBuf;
use std::time::Duration;

use autoglm_core::chat::ContentFormat;
use autoglm_core::server::AuditConfig;
use autoglm_core::{Engine, EngineConfig};
use base64::Engine as _;
use serde_json::{json, Value};
use server_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const V: &str = "glm4v-tiny";

fn vdir() -> PathBuf {
    common::fixture(V)
}

fn vexpected() -> Value {
    common::expected(V)
}

fn data_url(bytes: &[u8], mime: &str) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn file_url(name: &str) -> String {
    let mime = if name.ends_with(".jpg") {
        "image/jpeg"
    } else {
        "image/png"
    };
    data_url(&std::fs::read(vdir().join(name)).unwrap(), mime)
}

/// A directory with one image and a link from inside it to a file outside it.
struct MediaDir {
    root: PathBuf,
}

impl MediaDir {
    fn new() -> MediaDir {
        let root =
            std::env::temp_dir().join(format!("autoglm-server-media-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("allowed")).unwrap();
        std::fs::copy(vdir().join("exact.png"), root.join("allowed/exact.png")).unwrap();
        std::fs::copy(vdir().join("exact.png"), root.join("outside.png")).unwrap();
        std::os::unix::fs::symlink(root.join("outside.png"), root.join("allowed/link.png"))
            .unwrap();
        MediaDir { root }
    }

    fn allowed(&self) -> PathBuf {
        self.root.join("allowed")
    }
}

impl Drop for MediaDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn vision_engine(format: ContentFormat, media: Option<PathBuf>) -> Engine {
    let mut c: EngineConfig = engine_config();
    c.multimodal.content_format = format;
    c.multimodal.allowed_local_media_path = media;
    c.multimodal.limit_images_per_prompt = Some(3);
    Engine::from_dir(&vdir(), c).unwrap()
}

/// The fixture's messages with each image file name replaced by its data URL.
fn inline_images(messages: &Value) -> Value {
    let mut m = messages.clone();
    for msg in m.as_array_mut().unwrap() {
        if let Some(parts) = msg["content"].as_array_mut() {
            for p in parts {
                if p["type"] == "image_url" {
                    let name = p["image_url"]["url"].as_str().unwrap().to_string();
                    p["image_url"]["url"] = json!(file_url(&name));
                }
            }
        }
    }
    m
}

fn model_for(case: &Value) -> &'static str {
    match case["content_format"].as_str().unwrap() {
        "string" => "glm4v-string",
        _ => "glm4v-openai",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_images_matches_transformers_and_counts_image_tokens() {
    let srv = start(
        loopback_config(),
        vec![
            ("glm4v-string", vision_engine(ContentFormat::String, None)),
            ("glm4v-openai", vision_engine(ContentFormat::OpenAi, None)),
        ],
    );
    let a = srv.addr;
    let e = vexpected();
    let mut checked = 0;
    for case in e["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let messages = inline_images(&case["messages"]);
        let want = common::ids(&case["greedy_token_ids"]);
        let prompt = common::ids(&case["prompt_token_ids"]);
        let body = json!({
            "model": model_for(case),
            "messages": messages,
            "max_tokens": want.len(),
            "temperature": 0,
            "ignore_eos": true,
            "return_token_ids": true,
        });
        let r = post(a, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let j = r.json();
        let got = common::ids(&j["choices"][0]["token_ids"]);
        assert_eq!(got, want, "{name}: greedy tokens");
        assert_eq!(
            j["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            prompt.len(),
            "{name}: usage.prompt_tokens counts the image tokens"
        );
        assert_eq!(common::ids(&j["prompt_token_ids"]), prompt, "{name}");
        let text = j["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();

        // Streamed: the same text, and usage at the end with include_usage.
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body["return_token_ids"] = json!(false);
        let r = post(a, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, 200, "{name}");
        let events = r.events();
        let streamed: String = events
            .iter()
            .filter_map(|ev| ev["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, text, "{name}: streamed text");
        let usage = &events.last().unwrap()["usage"];
        assert_eq!(
            usage["prompt_tokens"].as_u64().unwrap() as usize,
            prompt.len()
        );
        assert_eq!(
            usage["completion_tokens"].as_u64().unwrap() as usize,
            want.len()
        );

        // /tokenize gives the expanded ids for the same messages.
        let r = post(
            a,
            "/tokenize",
            &json!({"model": model_for(case), "messages": messages}),
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(
            common::ids(&r.json()["tokens"]),
            prompt,
            "{name}: /tokenize"
        );
        checked += 1;
    }
    assert_eq!(checked, 4);

    // vLLM's string form of an image part (`"image_url": "<url>"`) and `detail` are accepted.
    let case = &e["cases"][0];
    let body = |part: Value| {
        json!({"model": "glm4v-openai", "max_tokens": 16, "temperature": 0, "ignore_eos": true,
            "return_token_ids": true,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is on this screen?"}]}]})
    };
    for part in [
        json!({"type": "image_url", "image_url": file_url("screen.png")}),
        json!({"type": "image_url", "image_url": {"url": file_url("screen.png"), "detail": "high"}}),
        json!({"type": "image", "image": file_url("screen.png")}),
    ] {
        let r = post(a, "/v1/chat/completions", &body(part.clone())).await;
        assert_eq!(r.status, 200, "{part}: {}", r.text());
        assert_eq!(
            common::ids(&r.json()["choices"][0]["token_ids"]),
            common::ids(&case["greedy_token_ids"])
        );
    }

    // Metrics count the images and the time spent on them.
    let m = get(a, "/metrics").await.text();
    let pre = metric(
        &m,
        "autoglm_images_preprocessed_total{model=\"glm4v-openai\"}",
    );
    assert!(pre >= 3.0, "images preprocessed: {pre}");
    let enc = metric(&m, "autoglm_images_encoded_total{model=\"glm4v-openai\"}");
    // Three distinct images (screen.png, icon.jpg, half.png) in seven requests: repeats come from
    // the image-keyed prefix cache or the encoder cache, never from the tower again.
    assert_eq!(enc, 3.0, "images encoded");
    assert!(
        metric(
            &m,
            "autoglm_image_preprocess_seconds_total{model=\"glm4v-openai\"}"
        ) > 0.0
    );
    assert!(
        metric(
            &m,
            "autoglm_image_encode_seconds_total{model=\"glm4v-openai\"}"
        ) > 0.0
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_400s_naming_the_problem_and_the_server_keeps_serving() {
    let media = MediaDir::new();
    let srv = start(
        loopback_config(),
        vec![
            (
                V,
                vision_engine(ContentFormat::String, Some(media.allowed())),
            ),
            (MODEL, cpu_engine()),
        ],
    );
    let a = srv.addr;
    let png = std::fs::read(vdir().join("screen.png")).unwrap();
    let chat = |model: &str, urls: Vec<String>| {
        let mut parts: Vec<Value> = urls
            .into_iter()
            .map(|u| json!({"type": "image_url", "image_url": {"url": u}}))
            .collect();
        parts.push(json!({"type": "text", "text": "What is on this screen?"}));
        json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]})
    };
    let allowed = media.allowed();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "bad base64",
            chat(V, vec!["data:image/png;base64,@@@@".into()]),
            "invalid base64",
        ),
        (
            "a data URL that is not an image",
            chat(V, vec![data_url(b"just some text", "text/plain")]),
            "not an image",
        ),
        (
            "bytes that are not an image",
            chat(V, vec![data_url(b"just some text, no image", "image/png")]),
            "not a PNG, JPEG or WebP",
        ),
        (
            "a truncated PNG",
            chat(V, vec![data_url(&png[..png.len() / 2], "image/png")]),
            "cannot decode",
        ),
        (
            "a decompression bomb",
            chat(
                V,
                vec![data_url(&common::bomb_png(100_000, 100_000), "image/png")],
            ),
            "100000x100000",
        ),
        (
            "an http URL",
            chat(V, vec!["http://169.254.169.254/latest/screen.png".into()]),
            "not fetched",
        ),
        (
            "a file outside the allowed path",
            chat(
                V,
                vec![media.root.join("outside.png").display().to_string()],
            ),
            "outside the allowed local media path",
        ),
        (
            "a link out of the allowed path",
            chat(
                V,
                vec![format!("file://{}", allowed.join("link.png").display())],
            ),
            "outside the allowed local media path",
        ),
        (
            "a missing file",
            chat(V, vec![allowed.join("nope.png").display().to_string()]),
            "nope.png",
        ),
        (
            "too many images",
            chat(V, vec![file_url("exact.png"); 4]),
            "at most 3 image(s)",
        ),
        (
            "an image for a text-only model",
            chat(MODEL, vec![file_url("exact.png")]),
            "does not take images",
        ),
        (
            "an unknown part type",
            json!({"model": V, "messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": "x"}]}]}),
            "\"audio_url\"",
        ),
    ];
    for (what, body, needle) in &cases {
        let r = post(a, "/v1/chat/completions", body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let e = r.error();
        assert_eq!(e["type"], "invalid_request_error", "{what}");
        assert_eq!(e["param"], "messages", "{what}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: {msg}");
        let r = post(a, "/tokenize", body).await;
        assert_eq!(r.status, 400, "{what} (/tokenize): {}", r.text());
    }

    // A file inside the allowed path is read; the server still answers after all of the above.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat(V, vec![allowed.join("exact.png").display().to_string()]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        a,
        "/v1/chat/completions",
        &chat(V, vec![file_url("screen.png")]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    srv.stop().await;
}

/// A client that sends a large screenshot and goes away at once: its request is dropped while
/// the image is preprocessed or encoded, and nothing it held stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_image_work_frees_everything() {
    let srv = start(
        loopback_config(),
        vec![(V, vision_engine(ContentFormat::String, None))],
    );
    let a = srv.addr;
    // A 1080x2400 RGBA screenshot-like PNG (smooth, so it stays small on the wire).
    let img = image::RgbaImage::from_fn(1080, 2400, |x, y| {
        image::Rgba([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8, 255])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let body = json!({"model": V, "max_tokens": 64, "stream": true, "ignore_eos": true,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&png, "image/png")}},
            {"type": "text", "text": "What is on this screen?"}]}]})
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Clients that leave at once, while the image is decoded, and once their stream has begun.
    for wait in [1, 30, 300] {
        let _ = raw(a, request.as_bytes(), Duration::from_millis(wait)).await;
    }
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(5).any(|w| w == b"data:") {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .expect("the stream begins")
            .unwrap();
        assert!(n > 0, "the server closed before streaming");
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    eventually("everything the clients held is released", async || {
        let m = get(a, "/metrics").await.text();
        metric(&m, "autoglm_http_requests_in_flight") == 0.0
            && metric(&m, "autoglm_kv_blocks_used{") == 0.0
            && metric(&m, "autoglm_num_requests_running{") == 0.0
            && metric(&m, "autoglm_num_requests_waiting{") == 0.0
    })
    .await;
    let m = get(a, "/metrics").await.text();
    assert!(metric(&m, "autoglm_images_preprocessed_total{") >= 1.0);
    srv.stop().await;
}

/// The audit log records the rendered prompt (image placeholders) and never image bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_never_holds_image_bytes() {
    let path =
        std::env::temp_dir().join(format!("autoglm-audit-images-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut config = loopback_config();
    config.audit = Some(AuditConfig {
        path: path.clone(),
        log_prompts: true,
    });
    let srv = start(
        config,
        vec![(V, vision_engine(ContentFormat::String, None))],
    );
    let url = file_url("screen.png");
    let body = json!({"model": V, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is on this screen?"}]}]});
    let r = post(srv.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    srv.stop().await;
    let log = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let b64 = url.split_once(',').unwrap().1;
    assert!(log.contains("<|image|>"), "{log}");
    assert!(log.contains("What is on this screen?"), "{log}");
    assert!(
        !log.contains(&b64[..64]) && !log.contains("base64"),
        "{log}"
    );
}

/// Open-AutoGLM's decoding rules: `frequency_penalty` applies to generated tokens under greedy
/// decoding (checked against transformers' logits of the fixture's greedy steps), and a stop token
/// ends the reply without its text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_penalties_and_stop_tokens_as_open_autoglm_needs() {
    let srv = start(
        loopback_config(),
        vec![(V, vision_engine(ContentFormat::OpenAi, None))],
    );
    let a = srv.addr;
    let e = vexpected();
    let case = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "two_images_interleaved")
        .unwrap();
    let greedy = common::ids(&case["greedy_token_ids"]);
    let (shape, logits) = common::expected_tensor(V, "two_images_interleaved.greedy_logits");
    let vocab = shape[1];
    let messages = inline_images(&case["messages"]);
    let mut diverged = 0;
    for penalty in [0.2f32, 2.0] {
        // Step k's logits minus penalty x count of each token among the first k generated.
        let mut want = Vec::new();
        for (k, &g) in greedy.iter().enumerate() {
            let mut row = logits[k * vocab..(k + 1) * vocab].to_vec();
            for &t in &greedy[..k] {
                row[t as usize] -= penalty;
            }
            let pick = common::first_max(&row) as u32;
            want.push(pick);
            if pick != g {
                diverged += 1;
                break;
            }
        }
        let r = post(
            a,
            "/v1/chat/completions",
            &json!({"model": V, "messages": messages, "max_tokens": want.len(), "temperature": 0.0,
                "top_p": 0.85, "frequency_penalty": penalty, "ignore_eos": true, "return_token_ids": true}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            common::ids(&r.json()["choices"][0]["token_ids"]),
            want,
            "frequency_penalty {penalty}"
        );
    }
    assert!(diverged > 0, "a penalty changes the greedy continuation");

    // A stop token (here the 4th greedy token, given as a stop id) ends the answer; its text is
    // not in the reply, streamed or not.
    let screen = &e["cases"][0];
    let greedy = common::ids(&screen["greedy_token_ids"]);
    let body = json!({"model": V, "messages": inline_images(&screen["messages"]), "max_tokens": 16,
        "temperature": 0, "ignore_eos": true, "stop_token_ids": [greedy[3]], "return_token_ids": true});
    let r = post(a, "/v1/chat/completions", &body).await;
    let j = r.json();
    assert_eq!(common::ids(&j["choices"][0]["token_ids"]), greedy[..4]);
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    let before = post(
        a,
        "/detokenize",
        &json!({"model": V, "tokens": greedy[..3]}),
    )
    .await
    .json()["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(j["choices"][0]["message"]["content"], before);
    let mut body = body.clone();
    body["stream"] = json!(true);
    let streamed: String = post(a, "/v1/chat/completions", &body)
        .await
        .events()
        .iter()
        .filter_map(|ev| {
            ev["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, before);
    srv.stop().await;
}
