//! Cross-origin resource sharing (see [`CorsConfig`]): the headers an allowed origin's responses
//! carry, and the answer to a preflight. With no origin configured nothing here runs, and
//! responses carry no CORS header.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::body::Body;
use super::config::CorsConfig;

/// Request headers a `*` configuration allows besides those a preflight names: a literal `*`
/// in `Access-Control-Allow-Headers` never covers `Authorization`.
const BASE_HEADERS: &str = "authorization, content-type, x-request-id";

/// Response headers a page may read: the request id, the rate-limit state, and when to retry.
const EXPOSED: &str = "x-request-id, retry-after, x-ratelimit-limit-requests, \
x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, \
x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";

/// The request's `Origin` when CORS is on and allows it.
pub(crate) fn allowed_origin(cfg: &CorsConfig, headers: &HeaderMap) -> Option<HeaderValue> {
    if !cfg.enabled() {
        return None;
    }
    let origin = headers.get(ORIGIN)?;
    cfg.allows_origin(origin.to_str().ok()?)
        .then(|| origin.clone())
}

/// Whether a request is a preflight: `OPTIONS` with `Access-Control-Request-Method`.
pub(crate) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The 204 answer to a preflight from `origin` to a route serving `route_methods`.
pub(crate) fn preflight(
    cfg: &CorsConfig,
    origin: HeaderValue,
    headers: &HeaderMap,
    route_methods: &'static str,
) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let methods = if cfg.allowed_methods.iter().any(|m| m == "*") {
        HeaderValue::from_static(route_methods)
    } else {
        list(&cfg.allowed_methods)
    };
    let allow_headers = if cfg.allowed_headers.iter().any(|h| h == "*") {
        match headers
            .get(ACCESS_CONTROL_REQUEST_HEADERS)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.trim().is_empty())
        {
            Some(asked) => HeaderValue::from_str(&format!("{BASE_HEADERS}, {asked}"))
                .unwrap_or(HeaderValue::from_static(BASE_HEADERS)),
            None => HeaderValue::from_static(BASE_HEADERS),
        }
    } else {
        list(&cfg.allowed_headers)
    };
    let h = r.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_METHODS, methods);
    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(cfg.max_age_s));
    decorate(cfg, origin, h);
    r
}

/// Adds the headers an allowed origin's response carries.
pub(crate) fn decorate(cfg: &CorsConfig, origin: HeaderValue, h: &mut HeaderMap) {
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(VARY, HeaderValue::from_static("Origin"));
    if cfg.allow_credentials {
        h.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED),
    );
}

/// The configuration's entries as one header value; they were checked to be visible ASCII.
fn list(items: &[String]) -> HeaderValue {
    HeaderValue::from_str(&items.join(", ")).unwrap_or(HeaderValue::from_static(""))
}
