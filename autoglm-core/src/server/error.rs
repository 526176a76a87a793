//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::body::{json_response, Body};
use crate::error::Error;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub(crate) retry_after: Option<u64>,
    /// Methods allowed, for 405.
    pub(crate) allow: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            allow: None,
        }
    }

    pub(crate) fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub(crate) fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub(crate) fn bad_param(param: &str, message: impl Into<String>) -> Self {
        ApiError::bad_request(message).with_param(param)
    }

    pub(crate) fn model_not_found(name: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{name}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub(crate) fn route_not_found(method: &str, path: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Invalid URL ({method} {path})"),
        )
        .with_code("unknown_url")
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub(crate) fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        let mut e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path} (allowed: {allow})"),
        );
        e.allow = Some(allow);
        e
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "permission_error", message)
            .with_code("insufficient_permissions")
    }

    pub(crate) fn rate_limited(what: &str, retry_after: u64) -> Self {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("Rate limit reached for {what}; retry after {retry_after} s."),
        )
        .with_code("rate_limit_exceeded");
        e.retry_after = Some(retry_after);
        e
    }

    pub(crate) fn overloaded(message: impl Into<String>) -> Self {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", message)
            .with_code("overloaded");
        e.retry_after = Some(1);
        e
    }

    /// A request still running when the shutdown grace ran out.
    pub(crate) fn shutting_down() -> Self {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server shut down before the request finished; retry it on another instance.",
        )
        .with_code("server_shutdown");
        e.retry_after = Some(1);
        e
    }

    pub(crate) fn timeout(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout_error", message).with_code("timeout")
    }

    pub(crate) fn gateway_timeout(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message).with_code("timeout")
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON object `{"error": {...}}`, also used inside an SSE stream.
    pub(crate) fn envelope(&self) -> impl Serialize + '_ {
        Envelope {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let mut r = json_response(self.status, &self.envelope());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidRequest(m) => ApiError::bad_request(m),
            Error::Tokenizer(_) | Error::Template(_) | Error::Image(_) => {
                ApiError::bad_request(e.to_string())
            }
            Error::EngineShutdown => ApiError::overloaded("The model is shutting down."),
            other => ApiError::internal(other.to_string()),
        }
    }
}
