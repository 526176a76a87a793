//! Security over loopback: API keys and JWTs (HS256, RS256; exp, nbf, aud), roles to routes, rate
//! limits with Retry-After, priorities, and the audit log.
#![cfg(feature = "server")]

mod server_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use autoglm_core::server::{read_api_keys_file, ApiKey, AuditConfig, JwtConfig, RateLimits};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use server_support::*;

/// A throwaway RSA key pair made for these tests with `openssl genpkey` (never used elsewhere).
const RSA_PRIVATE: &str = r#"-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQDiqgy4UIdGw9Tq
6njBYLQMD+hgXxo/qMzsxRiJ1KJMqI/GO5wEm2FxAyl4oQaysJEfc42tHrCNW4P0
SEIh6w8vq72n+/jvFHyrH6tnqa0FwBlIunW4ixCdAecbFl07h3sQLYvjrj6POhjK
GWqsJKqM4R3FdeldMxmMbX8O0mafNfQMguyzHsfJVlWUuJu1ZOPfay385px0dPZs
jazooYBphi0EB7bBLVA3GNxAJGSuqJPGBoek38dGu8wyGItwBzZDD2XaO27VE4xU
n9FQoue5x4NIQbfTRXqKc4lRa4Up/EKTavSVWzQ39H9Np5T7Ch8R7iR1IQ0QgkL5
7kEiqwPpAgMBAAECggEAC2ym/CSZJ5Gbgu+ogHlb3WH/bvXYnLwhqrls48Efktat
eyPNyo01d/zdXiLM87x/NdTyZpODTsyoYIf7Y4/SA5M0UoZvumNk9axrTHosVLSl
NSf/4sFs9iliDoNYnMOd7YQKn8Iv/3mlKRt1S0rLmPZrwrmPRM744FpQgFzcCi5q
7J6NRzu1oCGsPD0P7Zzvb6sgbaTsBPG3wSKWmOcDgAo73qPFC5wiRItzLkPYDJ1I
yTBGZrJ8EYjncY/GZK1Dss7IHmwL5J3bcJtV3QYHFFUoSaslslXrYbzf3W3hOimE
XyT8iWMGRyGZk0JOXwBUEEMPTb4CiXPGl0D8S2E+5QKBgQD1viwr/cV4IZmyYquc
5UAGapf2Yp6E9qQPJxc5ysgeXqxlsoGxTJRBBdv5mJeWhKSJdtEpdPPwNdv0J+Ns
aeJfhJLUbhYwbgBjaL8QXRb27bJDQfHkgVtNpbfszevVQ5BqDnjaoOnH6GwdtaTF
nHff0g7Zf2cVdwWH6KknGneuKwKBgQDsIARnaRb5MdYL2nPePI0miQJLmSTE6Z8u
KS7cPwYEhX5g6Fc+iPU5nBtDU+q6cY6UU4SWa4KsZXR3BEiIvf301ZiYJi8+IJqD
gBEhBg1BIwl3Dfn4WnpmKrIRDN2tpAYFXc5mB/AtzsWCLAcyKH/f4O8GSMg/pb4R
jiWTsjGgOwKBgQC3r4XfABqJuDvlfiGe7jFUWnrqXT72TlHFTcfrl+rL4KJmhe6x
c3dhvxp1UB0HEnDWm6yum0/3npqhvuscz2y5TyRdi0gkvSSnKdWfSqXuvy+/XFyO
HC7+ND/tzuJYD9+zlsu5SAxXNCEUeAEJAPMNpzsYUkXgYo4Mz9kYdI0+7wKBgQCp
6gBBSeY2PB6DORfX/Eq2SDFWpUVITbU2SnxmERQLfOSMZ6UgYv3UDvmvYVuv/rdT
FSZ797F4zSkZ3AM2I0H0RSAhnJiyZFPL/QRWdzxiewv8mBohFTqu+lpY2qFKqpWK
lw5Hbb7vt7N5EKW8+lfKitp18znmUyaLC3cO6VO8sQKBgQC6dMxRWN00HjXVhmkd
u1vIDdF5iHOzRx0Zar3zXvoSHhAo2Kw57QSM1rINfieV8nGN1XfvJFzLIOmkrpAn
89OECfTSQyWbHxkc5uWcv+yTzHRWdjgqxIuXIsMUJfMOqlE2hCbjaIt4yvrwyWa8
dMGjqg6Ma+QXq3FVmr9Q5v2X5Q==
-----END PRIVATE KEY-----
"#;
const RSA_PUBLIC: &str = r#"-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA4qoMuFCHRsPU6up4wWC0
DA/oYF8aP6jM7MUYidSiTKiPxjucBJthcQMpeKEGsrCRH3ONrR6wjVuD9EhCIesP
L6u9p/v47xR8qx+rZ6mtBcAZSLp1uIsQnQHnGxZdO4d7EC2L464+jzoYyhlqrCSq
jOEdxXXpXTMZjG1/DtJmnzX0DILssx7HyVZVlLibtWTj32st/OacdHT2bI2s6KGA
aYYtBAe2wS1QNxjcQCRkrqiTxgaHpN/HRrvMMhiLcAc2Qw9l2jtu1ROMVJ/RUKLn
uceDSEG300V6inOJUWuFKfxCk2r0lVs0N/R/TaeU+wofEe4kdSENEIJC+e5BIqsD
6QIDAQAB
-----END PUBLIC KEY-----
"#;
const SECRET: &str = "test-hs256-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn key(k: &str, role: &str, limits: Option<RateLimits>) -> ApiKey {
    ApiKey {
        key: k.into(),
        name: Some(format!("{role}-{k}")),
        role: role.into(),
        priority: 0,
        limits,
    }
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: &Value) -> String {
    let k = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::RS256), claims, &k).unwrap()
}

async fn call(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        h.push(("authorization", a));
    }
    if path == "/metrics" || path == "/v1/models" || path == "/health" || path == "/ready" {
        send(addr, "GET", path, &h, "").await
    } else {
        post_with(
            addr,
            path,
            &h,
            &json!({"prompt": [1, 2], "max_tokens": 2, "ignore_eos": true}),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_roles() {
    let mut cfg = loopback_config();
    cfg.auth.api_keys = vec![key("sk-user", "user", None), key("sk-admin", "admin", None)];
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let r = call(a, "/v1/completions", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(r.error()["type"], "authentication_error");
    assert_eq!(
        call(a, "/v1/completions", Some("sk-wrong")).await.status,
        401
    );
    assert_eq!(call(a, "/v1/completions", Some("sk-use")).await.status, 401);
    assert_eq!(
        call(a, "/v1/completions", Some("sk-user")).await.status,
        200
    );
    assert_eq!(call(a, "/v1/models", Some("sk-user")).await.status, 200);
    let r = call(a, "/metrics", Some("sk-user")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error()["type"], "permission_error");
    let r = post_with(
        a,
        "/admin/models",
        &[("authorization", "Bearer sk-user")],
        &json!({}),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(call(a, "/metrics", Some("sk-admin")).await.status, 200);
    assert_eq!(
        call(a, "/v1/completions", Some("sk-admin")).await.status,
        200
    );
    // Probes stay public.
    assert_eq!(call(a, "/health", None).await.status, 200);
    assert_eq!(call(a, "/ready", None).await.status, 200);
    let r = send(
        a,
        "GET",
        "/v1/models",
        &[("authorization", "Basic abc")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_hs256_and_rs256() {
    let mut cfg = loopback_config();
    cfg.auth.jwt = Some(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        rs256_public_key_pem: Some(RSA_PUBLIC.into()),
        audience: vec!["autoglm".into()],
        leeway_s: 0,
        ..Default::default()
    });
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let t = now();
    let good = json!({"sub": "alice", "aud": "autoglm", "exp": t + 600, "role": "user"});
    for tok in [hs256(&good), rs256(&good)] {
        assert_eq!(call(a, "/v1/completions", Some(&tok)).await.status, 200);
        assert_eq!(call(a, "/metrics", Some(&tok)).await.status, 403);
    }
    let admin = json!({"sub": "root", "aud": "autoglm", "exp": t + 600, "role": ["user", "admin"]});
    assert_eq!(call(a, "/metrics", Some(&rs256(&admin))).await.status, 200);
    for (claims, why) in [
        (
            json!({"sub": "a", "aud": "autoglm", "exp": t - 120}),
            "expired",
        ),
        (
            json!({"sub": "a", "aud": "autoglm", "exp": t + 600, "nbf": t + 300}),
            "not valid yet",
        ),
        (
            json!({"sub": "a", "aud": "other", "exp": t + 600}),
            "audience",
        ),
        (json!({"sub": "a", "aud": "autoglm"}), "exp"),
    ] {
        let r = call(a, "/v1/completions", Some(&hs256(&claims))).await;
        assert_eq!(r.status, 401, "{claims}");
        assert!(
            r.error()["message"].as_str().unwrap().contains(why),
            "{claims}: {}",
            r.text()
        );
    }
    // Signed with another secret: bad signature.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"nope"),
    )
    .unwrap();
    assert_eq!(call(a, "/v1/completions", Some(&forged)).await.status, 401);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let mut cfg = loopback_config();
    let rpm = RateLimits {
        requests_per_minute: Some(3.0),
        tokens_per_minute: None,
    };
    let tpm = RateLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(10.0),
    };
    cfg.auth.api_keys = vec![
        key("sk-r", "user", Some(rpm)),
        key("sk-t", "user", Some(tpm)),
        key("sk-free", "user", None),
    ];
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    for _ in 0..3 {
        assert_eq!(call(a, "/v1/completions", Some("sk-r")).await.status, 200);
    }
    let r = call(a, "/v1/completions", Some("sk-r")).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(r.error()["code"], "rate_limit_exceeded");
    // Other keys are not affected.
    assert_eq!(
        call(a, "/v1/completions", Some("sk-free")).await.status,
        200
    );
    // Tokens: each call reserves its 2 prompt + 2 max_tokens against 10 a minute (10 -> 6 -> 2);
    // the third finds too few left.
    for _ in 0..2 {
        assert_eq!(call(a, "/v1/completions", Some("sk-t")).await.status, 200);
    }
    let r = call(a, "/v1/completions", Some("sk-t")).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_is_reserved_up_front_and_what_is_unused_given_back() {
    let mut cfg = loopback_config();
    // One token a second, 60 at most.
    let tpm = RateLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(60.0),
    };
    cfg.auth.api_keys = vec![
        key("sk-t", "user", Some(tpm)),
        key("sk-admin", "admin", None),
    ];
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let h = [("authorization", "Bearer sk-t")];
    // Greedy from [277] runs 4 x6 then 133: a stop at 133 ends it after 7 tokens.
    let (prompt, greedy) = greedy_case(0);
    assert_eq!(prompt.len(), 1);
    assert_eq!(greedy.iter().position(|&t| t == 133), Some(6));
    let ask = |max_tokens: usize, stop: bool| {
        let mut b = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": true});
        if stop {
            b["stop_token_ids"] = json!([133]);
        }
        b
    };
    let generated = async || {
        let m = call(a, "/metrics", Some("sk-admin")).await.text();
        metric(&m, "autoglm_engine_generated_tokens_total{")
    };

    // More than the bucket ever holds (1 + 100 > 60): a 400 naming max_tokens, nothing run.
    let r = post_with(a, "/v1/completions", &h, &ask(100, false)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["param"], "max_tokens");
    assert_eq!(generated().await, 0.0);
    // 1 + 40 reserved and used: 19 left.
    let r = post_with(a, "/v1/completions", &h, &ask(40, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 40);
    // The same again needs 41: 429, and Retry-After says when 41 will be there (22 s or so).
    let r = post_with(a, "/v1/completions", &h, &ask(40, false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((15..=23).contains(&retry), "Retry-After {retry}");
    assert_eq!(generated().await, 40.0);
    // 1 + 18 reserved, 1 + 7 used: 11 come back...
    let r = post_with(a, "/v1/completions", &h, &ask(18, true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 7);
    // ...which is what lets 1 + 9 through now.
    let r = post_with(a, "/v1/completions", &h, &ask(9, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_lines_and_priorities() {
    let dir = std::env::temp_dir().join(format!("autoglm-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&path);
    let mut cfg = loopback_config();
    let mut vip = key("sk-vip", "user", None);
    vip.priority = -5;
    cfg.auth.api_keys = vec![key("sk-user", "user", None), vip];
    cfg.audit = Some(AuditConfig {
        path: path.clone(),
        log_prompts: false,
    });
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let secret_prompt = "the secret prompt";
    let h = [
        ("authorization", "Bearer sk-user"),
        ("x-request-id", "audit-1"),
    ];
    let r = post_with(
        a,
        "/v1/completions",
        &h,
        &json!({"prompt": secret_prompt, "max_tokens": 3, "ignore_eos": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    let h = [
        ("authorization", "Bearer sk-vip"),
        ("x-request-id", "audit-2"),
    ];
    let body = json!({"prompt": [5, 6], "max_tokens": 2, "ignore_eos": true, "stream": true});
    let r = post_with(a, "/v1/completions", &h, &body).await;
    assert_eq!(r.status, 200);
    let _ = call(a, "/v1/completions", Some("bad")).await;
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    eventually("three audit lines", async || read().lines().count() >= 3).await;
    let text = read();
    assert!(
        !text.contains(secret_prompt),
        "prompts stay out of the audit log by default"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines
        .iter()
        .find(|l| l["client_request_id"] == "audit-1")
        .unwrap();
    // The client's id is its own field: the request id stays the server's.
    assert_eq!(first["request_id"].as_str().unwrap().len(), 32);
    assert_eq!(first["principal"], "user-sk-user");
    assert_eq!(first["route"], "/v1/completions");
    assert_eq!(first["status"], 200);
    assert_eq!(first["completion_tokens"], 3);
    assert!(first["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    let streamed = lines
        .iter()
        .find(|l| l["client_request_id"] == "audit-2")
        .unwrap();
    assert_ne!(streamed["request_id"], first["request_id"]);
    assert_eq!(streamed["completion_tokens"], 2);
    assert_eq!(streamed["prompt_tokens"], 2);
    assert!(lines
        .iter()
        .any(|l| l["status"] == 401 && l["principal"].is_null()));
    srv.stop().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_priority_reaches_the_scheduler() {
    let mut cfg = loopback_config();
    let mut vip = key("sk-vip", "user", None);
    vip.priority = -5;
    cfg.auth.api_keys = vec![
        key("sk-user", "user", None),
        vip,
        key("sk-admin", "admin", None),
    ];
    let mut ec = engine_config();
    ec.scheduler.max_num_seqs = 1;
    let engine = autoglm_core::Engine::from_dir(&fixture_dir(), ec).unwrap();
    let srv = start(cfg, vec![(MODEL, engine)]);
    let a = srv.addr;
    let req = |k: &'static str, n: usize| async move {
        let h = [(
            "authorization",
            if k == "vip" {
                "Bearer sk-vip"
            } else {
                "Bearer sk-user"
            },
        )];
        let r = post_with(
            a,
            "/v1/completions",
            &h,
            &json!({"prompt": [1, 2], "max_tokens": n, "ignore_eos": true}),
        )
        .await;
        assert_eq!(r.status, 200);
        std::time::Instant::now()
    };
    // One slot: a long request runs, then a normal and a vip request wait for it.
    let first = tokio::spawn(req("user", 3000));
    eventually("the first request to run", async || {
        let m = send(
            a,
            "GET",
            "/metrics",
            &[("authorization", "Bearer sk-admin")],
            "",
        )
        .await
        .text();
        m.lines()
            .any(|l| l.starts_with("autoglm_num_requests_running{") && l.ends_with(" 1"))
    })
    .await;
    let normal = tokio::spawn(req("user", 50));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let vip = tokio::spawn(req("vip", 50));
    let (_, normal, vip) = (
        first.await.unwrap(),
        normal.await.unwrap(),
        vip.await.unwrap(),
    );
    assert!(vip < normal, "the vip request (priority -5) finishes first");
    srv.stop().await;
}

/// present). Without them configured, such tokens are still fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audience_and_issuer_are_required_when_configured() {
    let mut cfg = loopback_config();
    cfg.auth.jwt = Some(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        audience: vec!["autoglm".into()],
        issuer: vec!["https://idp.example".into()],
        leeway_s: 0,
        ..Default::default()
    });
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let t = now();
    let iss = "https://idp.example";
    let good = json!({"sub": "a", "aud": "autoglm", "iss": iss, "exp": t + 600});
    assert_eq!(
        call(a, "/v1/completions", Some(&hs256(&good))).await.status,
        200
    );
    // Lacking both, either may be named (jsonwebtoken checks its required claims in no set order).
    let either: &[&str] = &["`aud`", "`iss`"];
    for (claims, named) in [
        (
            json!({"sub": "a", "iss": iss, "exp": t + 600}),
            &["`aud`"][..],
        ),
        (
            json!({"sub": "a", "aud": "autoglm", "exp": t + 600}),
            &["`iss`"][..],
        ),
        (json!({"sub": "a", "exp": t + 600}), either),
        (
            json!({"sub": "a", "aud": "autoglm", "iss": "https://evil.example", "exp": t + 600}),
            &["issuer"][..],
        ),
    ] {
        let r = call(a, "/v1/completions", Some(&hs256(&claims))).await;
        assert_eq!(r.status, 401, "{claims}: {}", r.text());
        assert_eq!(r.error()["type"], "authentication_error");
        let msg = r.error()["message"].as_str().unwrap().to_string();
        assert!(named.iter().any(|n| msg.contains(n)), "{claims}: {msg}");
    }
    srv.stop().await;

    let mut cfg = loopback_config();
    cfg.auth.jwt = Some(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    });
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let bare = json!({"sub": "a", "exp": t + 600});
    assert_eq!(
        call(srv.addr, "/v1/completions", Some(&hs256(&bare)))
            .await
            .status,
        200
    );
    srv.stop().await;
}

/// A fresh, empty directory for one test's files.
fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("autoglm-auth-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The audit log's lines, once there are at least `n`.
async fn audit_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    eventually("audit lines", async || read().lines().count() >= n).await;
    read()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// credential (`key:<name>`, `jwt:<iss>:<sub>`) while still showing the display name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_named_like_an_api_key_has_its_own_buckets_and_identity() {
    let dir = scratch("identity");
    let path = dir.join("audit.jsonl");
    let two = RateLimits {
        requests_per_minute: Some(2.0),
        tokens_per_minute: None,
    };
    let mut cfg = loopback_config();
    cfg.auth.api_keys = vec![ApiKey {
        key: "sk-alice".into(),
        name: Some("alice".into()),
        role: "user".into(),
        priority: 0,
        limits: Some(two.clone()),
    }];
    cfg.auth.default_limits = two;
    cfg.auth.jwt = Some(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        issuer: vec!["idp".into()],
        ..Default::default()
    });
    cfg.audit = Some(AuditConfig {
        path: path.clone(),
        log_prompts: false,
    });
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let jwt = hs256(&json!({"sub": "alice", "iss": "idp", "exp": now() + 600}));
    for _ in 0..2 {
        assert_eq!(call(a, "/v1/completions", Some(&jwt)).await.status, 200);
    }
    assert_eq!(call(a, "/v1/completions", Some(&jwt)).await.status, 429);
    // The key's own allowance is untouched by the token's.
    for _ in 0..2 {
        let r = call(a, "/v1/completions", Some("sk-alice")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        call(a, "/v1/completions", Some("sk-alice")).await.status,
        429
    );
    let lines = audit_lines(&path, 6).await;
    let by = |cred: &str, status: u64| {
        lines
            .iter()
            .filter(|l| l["credential_id"] == cred && l["status"] == status)
            .inspect(|l| assert_eq!(l["principal"], "alice", "{l}"))
            .count()
    };
    assert_eq!(by("key:alice", 200), 2, "{lines:?}");
    assert_eq!(by("key:alice", 429), 1, "{lines:?}");
    assert_eq!(by("jwt:idp:alice", 200), 2, "{lines:?}");
    assert_eq!(by("jwt:idp:alice", 429), 1, "{lines:?}");
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Key names identify keys in rate limits and the audit log (`key:<name>`), so a keys file naming
/// two keys alike is refused at load, naming the file and the name (both used to load and then
/// shared one set of buckets); so is a configuration whose keys, wherever they came from, do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_key_names_are_refused_at_load() {
    let dir = scratch("keys-file");
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        "[[keys]]\nkey = \"sk-1\"\nname = \"ops\"\n\n[[keys]]\nkey = \"sk-2\"\nname = \"dev\"\n\n\
         [[keys]]\nkey = \"sk-3\"\nname = \"ops\"\nrole = \"admin\"\n",
    )
    .unwrap();
    let e = read_api_keys_file(&path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("\"ops\""), "{e}");
    assert!(e.contains("duplicate"), "{e}");
    std::fs::write(
        &path,
        "[[keys]]\nkey = \"sk-1\"\nname = \"ops\"\n\n[[keys]]\nkey = \"sk-2\"\n",
    )
    .unwrap();
    let keys = read_api_keys_file(&path).unwrap();
    assert_eq!(keys.len(), 2);
    // Across sources (flags, files, Python): the configuration check names the field.
    let mut cfg = loopback_config();
    cfg.auth.api_keys = keys;
    cfg.auth.api_keys.push(key("sk-9", "user", None));
    cfg.auth.api_keys[2].name = Some("ops".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("auth.api_keys") && e.contains("\"ops\""), "{e}");
    // An unnamed key is `key-N`; naming another key so collides too.
    cfg.auth.api_keys[2].name = Some("key-1".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("\"key-1\""), "{e}");
    cfg.auth.api_keys[2].name = Some("other".into());
    cfg.validate().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
