//! Prefix-cache isolation over loopback (issue 15 item 9): `--prefix-cache-scope` and vLLM's
//! `cache_salt`, seen through `usage.prompt_tokens_details.cached_tokens`.
#![cfg(feature = "server")]

mod server_support;

use autoglm_core::server::{ApiKey, PrefixCacheScope};
use serde_json::{json, Value};
use server_support::*;

fn key(k: &str) -> ApiKey {
    ApiKey {
        key: k.into(),
        name: Some(format!("tenant-{k}")),
        role: "user".into(),
        priority: 0,
        limits: None,
    }
}

/// A 96-token prompt (several KV blocks), the same every time.
fn body(salt: Option<&str>) -> Value {
    let prompt: Vec<u32> = (0..96).map(|i| 100 + (i * 7) % 500).collect();
    let mut b = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0});
    if let Some(s) = salt {
        b["cache_salt"] = json!(s);
    }
    b
}

/// The cached prompt tokens of one completion sent with `bearer`.
async fn cached(srv: &TestServer, bearer: &str, salt: Option<&str>) -> u64 {
    let auth = format!("Bearer {bearer}");
    let r = post_with(
        srv.addr,
        "/v1/completions",
        &[("authorization", &auth)],
        &body(salt),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {}", r.text()))
}

fn config(scope: PrefixCacheScope) -> autoglm_core::server::ServerConfig {
    let mut cfg = loopback_config();
    cfg.auth.api_keys = vec![key("sk-a"), key("sk-b")];
    cfg.prefix_cache_scope = scope;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_never_reuses_another_tenants_prefix_by_default() {
    assert_eq!(
        autoglm_core::server::ServerConfig::default().prefix_cache_scope,
        PrefixCacheScope::Principal
    );
    let srv = start(
        config(PrefixCacheScope::default()),
        vec![("glm4-tiny", cpu_engine())],
    );
    assert_eq!(cached(&srv, "sk-a", None).await, 0, "a cold cache");
    // Another tenant's identical prompt is computed again: nothing to time.
    assert_eq!(cached(&srv, "sk-b", None).await, 0);
    // Each tenant reuses its own.
    assert!(cached(&srv, "sk-a", None).await >= 64);
    assert!(cached(&srv, "sk-b", None).await >= 64);
    // A salt separates further, within a tenant; the same salt shares.
    assert_eq!(cached(&srv, "sk-a", Some("session-1")).await, 0);
    assert!(cached(&srv, "sk-a", Some("session-1")).await >= 64);
    // Another tenant guessing the salt still gets nothing.
    assert_eq!(cached(&srv, "sk-b", Some("session-1")).await, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_scope_shares_across_tenants_unless_salted() {
    let srv = start(
        config(PrefixCacheScope::Global),
        vec![("glm4-tiny", cpu_engine())],
    );
    assert_eq!(cached(&srv, "sk-a", None).await, 0);
    assert!(
        cached(&srv, "sk-b", None).await >= 64,
        "shared in global scope"
    );
    assert_eq!(cached(&srv, "sk-b", Some("mine")).await, 0);
    assert!(
        cached(&srv, "sk-a", Some("mine")).await >= 64,
        "same salt shares"
    );
    assert_eq!(cached(&srv, "sk-a", Some("other")).await, 0);
    // Bad salts name the field.
    for bad in [json!(""), json!("x".repeat(1025)), json!(7)] {
        let mut b = body(None);
        b["cache_salt"] = bad;
        let r = post_with(
            srv.addr,
            "/v1/completions",
            &[("authorization", "Bearer sk-a")],
            &b,
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text());
        if b["cache_salt"].is_string() {
            assert!(r.text().contains("cache_salt"), "{}", r.text());
        }
    }
    srv.stop().await;
}
