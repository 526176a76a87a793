//! HTTP details of the OpenAI API over loopback: CORS (headers on allowed origins, preflights
//! answered before authentication, streams too), `x-ratelimit-*` headers on success and on 429,
//! a public `/metrics`, and `/v1/models/{id}` returning the list's entry.
#![cfg(feature = "server")]

mod server_support;

use autoglm_core::server::{ApiKey, RateLimits};
use bytes::Bytes;
use serde_json::json;
use server_support::*;

fn key(k: &str, role: &str, limits: Option<RateLimits>) -> ApiKey {
    ApiKey {
        key: k.into(),
        name: Some(k.into()),
        role: role.into(),
        priority: 0,
        limits,
    }
}

const APP: &str = "https://app.example.com";

fn completion() -> serde_json::Value {
    json!({"prompt": [277], "max_tokens": 2, "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_only_for_allowed_origins_and_preflights_skip_auth() {
    let mut cfg = loopback_config();
    cfg.cors.allowed_origins = vec![APP.into()];
    cfg.auth.api_keys = vec![key("sk-u", "user", None)];
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;

    // A preflight carries no credentials and still gets its 204.
    let pre = [
        ("origin", APP),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization, content-type, x-stainless-os",
        ),
    ];
    let r = send(a, "OPTIONS", "/v1/chat/completions", &pre, Bytes::new()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let h = &r.headers;
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["vary"], "Origin");
    assert_eq!(h["access-control-allow-methods"], "POST");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for want in ["authorization", "content-type", "x-stainless-os"] {
        assert!(allowed.contains(want), "{allowed}");
    }
    assert_eq!(h["access-control-max-age"], "600");
    assert!(!h.contains_key("access-control-allow-credentials"));
    // Any API route; an unknown path is not one.
    let r = send(a, "OPTIONS", "/v1/models/x", &pre, Bytes::new()).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.headers["access-control-allow-methods"], "GET");
    let r = send(a, "OPTIONS", "/nowhere", &pre, Bytes::new()).await;
    assert_eq!(r.status, 404);
    // Another origin's preflight is not answered as one.
    let other = [("origin", "https://evil.example"), pre[1]];
    let r = send(a, "OPTIONS", "/v1/completions", &other, Bytes::new()).await;
    assert_ne!(r.status, 204);
    assert!(!r.headers.contains_key("access-control-allow-origin"));

    // Actual requests: the origin echoed on success, on errors (a 401 too), and on streams.
    let auth = [("authorization", "Bearer sk-u"), ("origin", APP)];
    let r = post_with(a, "/v1/completions", &auth, &completion()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["access-control-allow-origin"], APP);
    let exposed = r.headers["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    let r = post_with(a, "/v1/completions", &[("origin", APP)], &completion()).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["access-control-allow-origin"], APP);
    let mut s = completion();
    s["stream"] = json!(true);
    let r = post_with(a, "/v1/completions", &auth, &s).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["access-control-allow-origin"], APP);
    assert!(!r.events().is_empty());
    let r = post_with(
        a,
        "/v1/completions",
        &[auth[0], ("origin", "https://evil.example")],
        &completion(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    srv.stop().await;

    // No origins configured (the default): no CORS header, and OPTIONS is just a 405.
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let r = send(srv.addr, "OPTIONS", "/v1/completions", &pre, Bytes::new()).await;
    assert_eq!(r.status, 405);
    let r = post_with(
        srv.addr,
        "/v1/completions",
        &[("origin", APP)],
        &completion(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-")));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_wildcard_and_explicit_lists() {
    let mut cfg = loopback_config();
    cfg.cors.allowed_origins = vec!["*".into()];
    cfg.cors.allowed_methods = vec!["GET".into(), "POST".into()];
    cfg.cors.allowed_headers = vec!["authorization".into(), "content-type".into()];
    cfg.cors.allow_credentials = true;
    cfg.cors.max_age_s = 60;
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let pre = [
        ("origin", "http://localhost:3000"),
        ("access-control-request-method", "POST"),
    ];
    let r = send(srv.addr, "OPTIONS", "/v1/completions", &pre, Bytes::new()).await;
    assert_eq!(r.status, 204);
    let h = &r.headers;
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "60");
    let r = get(srv.addr, "/v1/models").await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_on_success_and_on_429() {
    let mut cfg = loopback_config();
    let both = RateLimits {
        requests_per_minute: Some(2.0),
        tokens_per_minute: Some(100.0),
    };
    cfg.auth.api_keys = vec![
        key("sk-l", "user", Some(both)),
        key("sk-free", "user", None),
    ];
    let srv = start(cfg, vec![(MODEL, cpu_engine())]);
    let a = srv.addr;
    let h = [("authorization", "Bearer sk-l")];
    let r = post_with(a, "/v1/completions", &h, &completion()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = |r: &Reply, name: &str| r.headers[name].to_str().unwrap().to_string();
    assert_eq!(v(&r, "x-ratelimit-limit-requests"), "2");
    assert_eq!(v(&r, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(v(&r, "x-ratelimit-limit-tokens"), "100");
    // 1 prompt + 2 generated were used (and the reservation settled before the response).
    let remaining: u64 = v(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!((96..=99).contains(&remaining), "{remaining}");
    // One request back takes 30 s at 2 a minute: "29.99s" or so, a Go duration.
    let reset = v(&r, "x-ratelimit-reset-requests");
    assert!(reset.ends_with('s') && !reset.contains('m'), "{reset}");
    let secs: f64 = reset.trim_end_matches('s').parse().unwrap();
    assert!((29.0..=30.0).contains(&secs), "{reset}");
    assert!(v(&r, "x-ratelimit-reset-tokens").ends_with('s'));

    // Streams carry them in their head.
    let mut s = completion();
    s["stream"] = json!(true);
    let r = post_with(a, "/v1/completions", &h, &s).await;
    assert_eq!(r.status, 200);
    assert_eq!(v(&r, "x-ratelimit-remaining-requests"), "0");

    // The 429 too, with the bucket empty and about a minute to fill it.
    let r = post_with(a, "/v1/completions", &h, &completion()).await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(v(&r, "x-ratelimit-remaining-requests"), "0");
    let reset = v(&r, "x-ratelimit-reset-requests");
    assert!(reset.starts_with("59.") || reset == "1m0s", "{reset}");

    // A key without limits gets none.
    let r = post_with(
        a,
        "/v1/completions",
        &[("authorization", "Bearer sk-free")],
        &completion(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r
        .headers
        .keys()
        .all(|k| !k.as_str().starts_with("x-ratelimit")));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_admin_only_unless_public() {
    for public in [false, true] {
        let mut cfg = loopback_config();
        cfg.auth.api_keys = vec![key("sk-u", "user", None), key("sk-a", "admin", None)];
        cfg.metrics_public = public;
        let srv = start(cfg, vec![(MODEL, cpu_engine())]);
        let anon = get(srv.addr, "/metrics").await;
        let user = send(
            srv.addr,
            "GET",
            "/metrics",
            &[("authorization", "Bearer sk-u")],
            Bytes::new(),
        )
        .await;
        let admin = send(
            srv.addr,
            "GET",
            "/metrics",
            &[("authorization", "Bearer sk-a")],
            Bytes::new(),
        )
        .await;
        assert_eq!(admin.status, 200);
        if public {
            assert_eq!(anon.status, 200);
            assert!(anon.text().contains("autoglm_"), "{}", anon.text());
            assert_eq!(user.status, 200);
        } else {
            assert_eq!(anon.status, 401);
            assert_eq!(user.status, 403);
        }
        // The other routes keep their keys either way.
        assert_eq!(get(srv.addr, "/v1/models").await.status, 401);
        srv.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_by_id_is_its_entry_in_the_list() {
    let srv = start(loopback_config(), vec![(MODEL, cpu_engine())]);
    let list = get(srv.addr, "/v1/models").await.json();
    let one = get(srv.addr, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(list["data"][0], one.json());
    for field in [
        "id",
        "object",
        "created",
        "owned_by",
        "root",
        "parent",
        "max_model_len",
    ] {
        assert!(one.json().get(field).is_some(), "{field}");
    }
    srv.stop().await;
}
