//! Per-principal token buckets: one for requests, one for tokens.
//!
//! Each bucket holds up to one minute's allowance and refills continuously. A request takes one
//! from the request bucket. The token bucket is charged the prompt's tokens when a generation is
//! admitted and the generated tokens when it ends (it may go negative: the cost of an answer is
//! known only afterwards); a request is admitted only while the token bucket is positive. A refusal
//! is a 429 whose `Retry-After` is the time until the bucket refills enough.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

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

    /// Whole seconds until the level reaches `want`.
    fn wait_for(&self, want: f64, per_minute: f64) -> u64 {
        let secs = (want - self.level) / (per_minute / 60.0);
        secs.ceil().max(1.0) as u64
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
        let b = map.entry(p.name.clone()).or_insert_with(|| Buckets {
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

    /// Admits a generation while the token bucket is positive, charging its prompt tokens.
    pub(crate) fn admit_tokens(&self, p: &Principal, prompt_tokens: usize) -> Result<(), ApiError> {
        let Some(rate) = p.limits.tokens_per_minute else {
            return Ok(());
        };
        self.with(p, |b, now| {
            let bucket = b.tokens.get_or_insert_with(|| Bucket::full(rate, now));
            bucket.refill(rate, now);
            if bucket.level > 0.0 {
                bucket.level -= prompt_tokens as f64;
                Ok(())
            } else {
                Err(ApiError::rate_limited("tokens", bucket.wait_for(1.0, rate)))
            }
        })
    }

    /// Charges generated tokens after the fact.
    pub(crate) fn charge_tokens(&self, p: &Principal, tokens: usize) {
        let Some(rate) = p.limits.tokens_per_minute else {
            return;
        };
        self.with(p, |b, now| {
            let bucket = b.tokens.get_or_insert_with(|| Bucket::full(rate, now));
            bucket.refill(rate, now);
            bucket.level -= tokens as f64;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(rpm: Option<f64>, tpm: Option<f64>) -> Principal {
        Principal {
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
    fn token_bucket_goes_into_debt() {
        let l = RateLimiter::default();
        let p = principal(None, Some(100.0));
        assert!(l.admit_tokens(&p, 10).is_ok());
        l.charge_tokens(&p, 200);
        assert!(l.admit_tokens(&p, 1).is_err());
        assert!(l.admit_request(&p).is_ok());
    }
}
