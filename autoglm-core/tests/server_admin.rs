//! Several models chosen by the `model` field; loading and unloading them at run time.
#![cfg(feature = "server")]

mod server_support;

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use server_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_by_name_load_and_unload() {
    let mut cfg = loopback_config();
    cfg.model_root = Some(fixture_dir().parent().unwrap().to_path_buf());
    let srv = start(
        cfg,
        vec![
            ("cpu", cpu_engine()),
            ("null", null_engine(engine_config())),
        ],
    );
    let a = srv.addr;
    let ask = |model: &'static str| json!({"model": model, "prompt": [277], "max_tokens": 4, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let r = post(a, "/v1/completions", &ask("null")).await.json();
    assert_eq!(r["model"], "null");
    assert_eq!(r["choices"][0]["token_ids"], json!([0, 0, 0, 0]));
    let r = post(a, "/v1/completions", &ask("cpu")).await.json();
    assert_eq!(r["choices"][0]["token_ids"], json!(greedy_case(0).1[..4]));
    // No model field: the first model.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": [277], "max_tokens": 1}),
    )
    .await
    .json();
    assert_eq!(r["model"], "cpu");

    // Load a third model from disk.
    let load = json!({"name": "disk", "path": "glm4-tiny"});
    let r = post(a, "/admin/models", &load).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let names: Vec<String> = get(a, "/v1/models").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["cpu", "null", "disk"]);
    let r = post(a, "/v1/completions", &ask("disk")).await.json();
    assert_eq!(r["choices"][0]["token_ids"], json!(greedy_case(0).1[..4]));
    assert_eq!(post(a, "/admin/models", &load).await.status, 400);
    let r = post(
        a,
        "/admin/models",
        &json!({"name": "x", "path": "/nonexistent"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error()["param"], "path");
    assert_eq!(
        post(a, "/admin/models", &json!({"name": "x"})).await.status,
        400
    );

    // Unload `cpu` while one of its streams runs: new requests get 404 at once, the stream
    // finishes, then the DELETE answers.
    let io = tokio::net::TcpStream::connect(a).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let body = json!({"model": "cpu", "prompt": [1, 2], "n": 4, "max_tokens": 1500, "ignore_eos": true, "stream": true});
    let req = hyper::Request::post("/v1/completions")
        .header("host", "x")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let mut stream = tx.send_request(req).await.unwrap().into_body();
    let mut seen = stream
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .to_vec();
    let delete = tokio::spawn(async move { send(a, "DELETE", "/admin/models/cpu", &[], "").await });
    eventually("cpu to leave the list", async || {
        !get(a, "/v1/models").await.text().contains("\"cpu\"")
    })
    .await;
    let r = post(a, "/v1/completions", &ask("cpu")).await;
    assert_eq!(r.status, 404);
    assert!(
        !delete.is_finished(),
        "the unload waits for the running stream"
    );
    while let Some(f) = stream.frame().await {
        seen.extend_from_slice(&f.unwrap().into_data().unwrap());
    }
    let events = sse_events(&seen);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["choices"][0]["finish_reason"] == "length")
            .count(),
        4
    );
    let r = tokio::time::timeout(Duration::from_secs(20), delete)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(
        send(a, "DELETE", "/admin/models/cpu", &[], "").await.status,
        404
    );
    assert_eq!(post(a, "/v1/completions", &ask("null")).await.status, 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_a_model_a_stalled_client_holds_is_bounded_by_the_unload_timeout() {
    let mut cfg = loopback_config();
    cfg.unload_timeout = Some(Duration::from_secs(2));
    cfg.socket.send_buffer_size = Some(4096);
    let srv = start(
        cfg,
        vec![
            ("cpu", cpu_engine()),
            ("null", null_engine(engine_config())),
        ],
    );
    let a = srv.addr;
    let engine = srv.models.lease(Some("cpu")).unwrap().engine.clone();

    // A client with a small receive buffer reads the response head of a long stream, then nothing.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(a).await.unwrap();
    let body = json!({"model": "cpu", "prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    stall_after_head(&mut s, &body).await;
    eventually("the stalled request to be held back", async || {
        metric(
            &get(a, "/metrics").await.text(),
            "autoglm_num_requests_paused{model=\"cpu\"}",
        ) == 1.0
    })
    .await;

    let t = std::time::Instant::now();
    let delete = tokio::spawn(async move { send(a, "DELETE", "/admin/models/cpu", &[], "").await });
    // While it drains: not offered for new requests, still in the metrics, and a second DELETE
    // says it is under way.
    eventually("cpu to leave the list", async || {
        !get(a, "/v1/models").await.text().contains("\"cpu\"")
    })
    .await;
    let m = get(a, "/metrics").await.text();
    assert_eq!(
        metric(&m, "autoglm_model_draining{model=\"cpu\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "autoglm_model_draining{model=\"null\"}"), 0.0);
    assert!(metric(&m, "autoglm_kv_blocks_used{model=\"cpu\"}") > 0.0);
    let again = send(a, "DELETE", "/admin/models/cpu", &[], "").await;
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json()["unloading"], true);
    assert_eq!(get(a, "/v1/models/cpu").await.status, 404);
    let ask = json!({"model": "cpu", "prompt": [277], "max_tokens": 1});
    assert_eq!(post(a, "/v1/completions", &ask).await.status, 404);

    // At the timeout what is left is ended and the engine stopped, though the client still
    // holds its connection and reads nothing.
    let r = tokio::time::timeout(Duration::from_secs(20), delete)
        .await
        .expect("the unload ends at its timeout")
        .unwrap();
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(r.json()["cancelled_requests"], 1);
    assert!(engine.is_stopped(), "the engine thread was joined");
    assert!(engine.submit(vec![1], Default::default()).is_err());
    let m = get(a, "/metrics").await.text();
    assert!(!m.contains("model=\"cpu\""), "{m}");
    assert_eq!(
        send(a, "DELETE", "/admin/models/cpu", &[], "").await.status,
        404
    );
    let ask = json!({"model": "null", "prompt": [277], "max_tokens": 1});
    assert_eq!(post(a, "/v1/completions", &ask).await.status, 200);
    drop(s);
    srv.stop().await;
}

/// Issue 15 item 12: model names from a safe set (and percent-decoded in URLs), server paths
/// shown to admins only, and loading confined to `--model-root` without echoing file contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_loading_is_confined_to_the_model_root_and_paths_stay_with_admins() {
    use autoglm_core::server::ApiKey;
    let root = std::env::temp_dir().join(format!("autoglm-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("models")).unwrap();
    // A checkpoint directory (copied) and one whose config.json holds a secret-looking value.
    let good = root.join("models/tiny");
    std::fs::create_dir_all(&good).unwrap();
    for f in std::fs::read_dir(fixture_dir()).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, good.join(f.file_name().unwrap())).unwrap();
        }
    }
    let bad = root.join("models/bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("config.json"),
        r#"{"architectures": ["TOPSECRET-42"], "hidden_size": "TOPSECRET-43"}"#,
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", root.join("models/etc")).unwrap();
    let key = |k: &str, role: &str| ApiKey {
        key: k.into(),
        name: Some(role.into()),
        role: role.into(),
        priority: 0,
        limits: None,
    };
    let mut cfg = loopback_config();
    cfg.auth.api_keys = vec![key("sk-admin", "admin"), key("sk-user", "user")];
    cfg.model_root = Some(root.join("models"));
    let srv = start(cfg, vec![("cpu", cpu_engine())]);
    let a = srv.addr;
    let admin = [("authorization", "Bearer sk-admin")];
    let user = [("authorization", "Bearer sk-user")];
    let load = |name: &str, path: &str| json!({"name": name, "path": path});

    let r = post_with(a, "/admin/models", &admin, &load("org/tiny-1", "tiny")).await;
    assert_eq!(r.status, 201, "{}", r.text());
    for (path, what) in [
        ("/etc", "absolute path outside"),
        ("../../../etc", "climbing out"),
        ("etc", "a link out of the root"),
        ("missing", "not there"),
    ] {
        let r = post_with(a, "/admin/models", &admin, &load("x", path)).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.error()["param"], "path", "{what}");
        // The same answer whether or not it exists: nothing learned about the host.
        assert!(
            r.text().contains("is not a directory under the model root"),
            "{what}: {}",
            r.text()
        );
    }
    let r = post_with(a, "/admin/models", &admin, &load("x", "bad")).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!r.text().contains("TOPSECRET"), "{}", r.text());
    assert!(!r.text().contains(&*root.to_string_lossy()), "{}", r.text());
    // Names outside the safe set are refused by name.
    for name in ["has space", "a%2Fb", "/lead", "trail/", "a//b", "", "é"] {
        let r = post_with(a, "/admin/models", &admin, &load(name, "tiny")).await;
        assert_eq!(r.status, 400, "{name:?}: {}", r.text());
        assert_eq!(r.error()["param"], "name", "{name:?}");
    }

    // Paths: admins see the directory, users the name.
    let root_of = |v: serde_json::Value, id: &str| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["root"].as_str().unwrap().to_string())
            .unwrap()
    };
    let as_user = send(a, "GET", "/v1/models", &user, bytes::Bytes::new()).await;
    assert_eq!(root_of(as_user.json(), "org/tiny-1"), "org/tiny-1");
    let as_admin = send(a, "GET", "/v1/models", &admin, bytes::Bytes::new()).await;
    assert!(root_of(as_admin.json(), "org/tiny-1").ends_with("models/tiny"));

    // A name with a slash is reachable percent-encoded or not.
    let r = send(
        a,
        "GET",
        "/v1/models/org%2Ftiny-1",
        &user,
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        a,
        "DELETE",
        "/admin/models/org%2Ftiny-1",
        &admin,
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(
        a,
        "DELETE",
        "/admin/models/org/tiny-1",
        &admin,
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    srv.stop().await;

    // Without --model-root, loading by path is off.
    let srv = start(loopback_config(), vec![("cpu", cpu_engine())]);
    let r = post(srv.addr, "/admin/models", &load("y", "tiny")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("--model-root"), "{}", r.text());
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}
