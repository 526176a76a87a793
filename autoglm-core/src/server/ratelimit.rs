//! Per-credential token buckets: one for requests, one for tokens. Buckets are keyed by the
//! principal's credential ([`Principal::id`]), never its display name.
//!
//! Each bucket holds up to one minute's allowance (its capacity) and refills continuously. A
//! request takes one from the request bucket. A generation reserves from the token bucket the
//! most it can cost, its prompt tokens plus `max_tokens` times its choices, when it is admitted,
//! and gets back what it did not use when it ends (finished, cancelled, failed or disconnected):
//! no request can take more than the bucket holds. A refusal is a 429 whose `Retry-After` is the
//! time until the bucket refills enough for it; a generation that could cost more than the
//! capacity itself could never be admitted, and is told so (a 400) instead.
//!
//! Responses to a principal with limits carry OpenAI's `x-ratelimit-*` headers for each limited
//! bucket (on 429s too): `limit` (the per-minute rate), `remaining` (whole units in the bucket
//! now) and `reset` (until the bucket is full again, as a Go duration such as `1s`, `6m0s` or
//! `20ms`, the way OpenAI writes it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::error::ApiError;

/// Rate limits of one principal; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Requests per minute (burst: one minute's worth).
    pub requests_per_minute: Option<f64>,
    /// Prompt plus generated tokens per minute (burst: one minute's worth).
    pub tokens_per_minute: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    last: Instant,
}

impl Bucket {
    fn full(per_minute: f64, now: Instant) -> Self {
        Bucket {
            level: per_minute,
            last: now,
        }
    }

    fn refill(&mut self, per_minute: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * per_minute / 60.0).min(per_minute);
        self.last = now;
    }

    /// Seconds until the bucket is full again.
    fn until_full(&self, per_minute: f64) -> f64 {
        ((per_minute - self.level) / (per_minute / 60.0)).max(0.0)
    }

    /// Whole seconds until the level reaches `want` (at most `per_minute`: a minute at most).
    fn wait_for(&self, want: f64, per_minute: f64) -> u64 {
        let secs = (want - self.level) / (per_minute / 60.0);
        // Rates are checked to be at least 1 a minute and wants to be within the capacity, so
        // this is at most a minute; the clamp only keeps a bad value from becoming 2^64 - 1.
        secs.ceil().clamp(1.0, 3600.0) as u64
    }
}

#[derive(Debug)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// All principals' buckets.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, Buckets>>,
}

impl RateLimiter {
    fn with<T>(&self, p: &Principal, f: impl FnOnce(&mut Buckets, Instant) -> T) -> T {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.entry(p.id.clone()).or_insert_with(|| Buckets {
            requests: p.limits.requests_per_minute.map(|r| Bucket::full(r, now)),
            tokens: p.limits.tokens_per_minute.map(|r| Bucket::full(r, now)),
        });
        f(b, now)
    }

    /// Takes one request from the principal's allowance, or says how long to wait.
    pub(crate) fn admit_request(&self, p: &Principal) -> Result<(), ApiError> {
        let Some(rate) = p.limits.requests_per_minute else {
            return Ok(());
        };
        self.with(p, |b, now| {
            let bucket = b.requests.get_or_insert_with(|| Bucket::full(rate, now));
            bucket.refill(rate, now);
            if bucket.level >= 1.0 {
                bucket.level -= 1.0;
                Ok(())
            } else {
                Err(ApiError::rate_limited(
                    "requests",
                    bucket.wait_for(1.0, rate),
                ))
            }
        })
    }

    /// Takes `tokens` (the most a generation can cost) from the principal's token bucket.
    /// [`Reserve::Unlimited`] when it has no token limit (nothing to give back later).
    pub(crate) fn reserve_tokens(&self, p: &Principal, tokens: usize) -> Reserve {
        let Some(rate) = p.limits.tokens_per_minute else {
            return Reserve::Unlimited;
        };
        let want = tokens as f64;
        if want > rate {
            return Reserve::OverCapacity { capacity: rate };
        }
        self.with(p, |b, now| {
            let bucket = b.tokens.get_or_insert_with(|| Bucket::full(rate, now));
            bucket.refill(rate, now);
            if bucket.level >= want {
                bucket.level -= want;
                Reserve::Reserved
            } else {
                Reserve::Wait(bucket.wait_for(want, rate))
            }
        })
    }

    /// Settles a reservation of `reserved` tokens of which `used` were used: gives back the rest
    /// (never above the capacity), or takes what went over.
    pub(crate) fn settle_tokens(&self, p: &Principal, reserved: usize, used: usize) {
        let Some(rate) = p.limits.tokens_per_minute else {
            return;
        };
        self.with(p, |b, now| {
            let bucket = b.tokens.get_or_insert_with(|| Bucket::full(rate, now));
            bucket.refill(rate, now);
            bucket.level = (bucket.level + reserved as f64 - used as f64).min(rate);
        })
    }
}

impl RateLimiter {
    /// Writes the principal's `x-ratelimit-*` headers, for each bucket it has a limit for.
    pub(crate) fn write_headers(&self, p: &Principal, h: &mut HeaderMap) {
        let (rpm, tpm) = (p.limits.requests_per_minute, p.limits.tokens_per_minute);
        if rpm.is_none() && tpm.is_none() {
            return;
        }
        let state = self.with(p, |b, now| {
            let mut state = [None, None];
            for (slot, (bucket, rate)) in state
                .iter_mut()
                .zip([(&mut b.requests, rpm), (&mut b.tokens, tpm)])
            {
                if let Some(rate) = rate {
                    let bucket = bucket.get_or_insert_with(|| Bucket::full(rate, now));
                    bucket.refill(rate, now);
                    *slot = Some((rate, bucket.level, bucket.until_full(rate)));
                }
            }
            state
        });
        for (what, s) in ["requests", "tokens"].into_iter().zip(state) {
            let Some((rate, level, reset)) = s else {
                continue;
            };
            let mut put = |name: &str, value: String| {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::try_from(format!("x-ratelimit-{name}-{what}")),
                    HeaderValue::try_from(value),
                ) {
                    h.insert(n, v);
                }
            };
            put("limit", format!("{}", rate.floor() as u64));
            put("remaining", format!("{}", level.max(0.0).floor() as u64));
            put("reset", go_duration(reset));
        }
    }
}

/// A duration in seconds as Go's `time.Duration` prints it, to the millisecond, which is how
/// OpenAI writes `x-ratelimit-reset-*`: `0s`, `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
fn go_duration(secs: f64) -> String {
    let ms = (secs.max(0.0) * 1000.0).ceil() as u64;
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s_ms) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
    let mut s = format!("{}", s_ms / 1000);
    if s_ms % 1000 != 0 {
        let frac = format!("{:03}", s_ms % 1000);
        s = format!("{s}.{}", frac.trim_end_matches('0'));
    }
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

/// The outcome of [`RateLimiter::reserve_tokens`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Reserve {
    /// No token limit.
    Unlimited,
    /// Taken; settle it when the generation ends.
    Reserved,
    /// Not now: this many seconds until the bucket holds enough.
    Wait(u64),
    /// More than the bucket ever holds.
    OverCapacity { capacity: f64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(rpm: Option<f64>, tpm: Option<f64>) -> Principal {
        Principal {
            id: "key:p".into(),
            name: "p".into(),
            roles: vec!["user".into()],
            priority: 0,
            limits: RateLimits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            },
        }
    }

    #[test]
    fn durations_are_written_as_go_does() {
        for (secs, want) in [
            (0.0, "0s"),
            (-1.0, "0s"),
            (0.0201, "21ms"),
            (0.5, "500ms"),
            (1.0, "1s"),
            (1.5, "1.5s"),
            (59.25, "59.25s"),
            (60.0, "1m0s"),
            (360.0, "6m0s"),
            (3723.0, "1h2m3s"),
        ] {
            assert_eq!(go_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn headers_show_each_limited_bucket() {
        let l = RateLimiter::default();
        let p = principal(Some(60.0), None);
        let mut h = HeaderMap::new();
        l.write_headers(&p, &mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "60");
        assert_eq!(h["x-ratelimit-reset-requests"], "0s");
        assert!(!h.contains_key("x-ratelimit-limit-tokens"));
        l.admit_request(&p).unwrap();
        l.write_headers(&p, &mut h);
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        // One request refills in a second at 60 a minute.
        let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
        assert!(reset.ends_with("ms") || reset == "1s", "{reset}");
        let mut h = HeaderMap::new();
        l.write_headers(&principal(None, None), &mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn request_bucket_empties_and_says_when() {
        let l = RateLimiter::default();
        let p = principal(Some(2.0), None);
        assert!(l.admit_request(&p).is_ok());
        assert!(l.admit_request(&p).is_ok());
        let e = l.admit_request(&p).unwrap_err();
        assert_eq!(e.status, http::StatusCode::TOO_MANY_REQUESTS);
        assert!((29..=31).contains(&e.retry_after.unwrap()));
    }

    #[test]
    fn buckets_belong_to_credentials_not_names() {
        let l = RateLimiter::default();
        let key = principal(Some(1.0), None);
        let jwt = Principal {
            id: "jwt::p".into(),
            ..key.clone()
        };
        assert!(l.admit_request(&jwt).is_ok());
        assert!(l.admit_request(&jwt).is_err());
        assert!(l.admit_request(&key).is_ok());
        // The token bucket too: a reservation by one credential leaves the other's whole.
        let key = principal(None, Some(100.0));
        let jwt = Principal {
            id: "jwt::p".into(),
            ..key.clone()
        };
        assert_eq!(l.reserve_tokens(&jwt, 100), Reserve::Reserved);
        assert!(matches!(l.reserve_tokens(&jwt, 1), Reserve::Wait(_)));
        assert_eq!(l.reserve_tokens(&key, 100), Reserve::Reserved);
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let l = RateLimiter::default();
        let p = principal(None, Some(120.0));
        assert_eq!(
            l.reserve_tokens(&p, 121),
            Reserve::OverCapacity { capacity: 120.0 }
        );
        assert_eq!(l.reserve_tokens(&p, 100), Reserve::Reserved);
        // 20 left: 60 more take 20 s at 2 a second.
        assert_eq!(l.reserve_tokens(&p, 60), Reserve::Wait(20));
        // 30 of the 100 were used: 70 come back.
        l.settle_tokens(&p, 100, 30);
        assert_eq!(l.reserve_tokens(&p, 90), Reserve::Reserved);
        // Settling never fills past the capacity.
        l.settle_tokens(&p, 90, 0);
        l.settle_tokens(&p, 1000, 0);
        assert_eq!(l.reserve_tokens(&p, 120), Reserve::Reserved);
        assert!(matches!(l.reserve_tokens(&p, 1), Reserve::Wait(1)));
        assert!(l.admit_request(&p).is_ok());
        let free = principal(None, None);
        assert_eq!(l.reserve_tokens(&free, usize::MAX), Reserve::Unlimited);
    }
}
