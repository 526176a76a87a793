//! The audit log: one JSON line per answered request, written by a background thread.
//!
//! Lines carry time, request id (the server's; the client's `x-request-id` as
//! `client_request_id`), principal (display name) and credential id, route, status, token
//! counts and latency; the prompt text only when [`AuditConfig::log_prompts`] says so. Writing never blocks a request: lines go
//! through an unbounded channel to a thread that appends them and flushes whenever it catches up.

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where and what to audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File the JSON lines are appended to (`-` for stderr).
    pub path: PathBuf,
    /// Include prompt text (completions) or messages (chat). Off by default: prompts are data.
    #[serde(default)]
    pub log_prompts: bool,
}

/// One audit line.
#[derive(Debug, Serialize)]
pub(crate) struct AuditEntry<'a> {
    pub(crate) time: String,
    pub(crate) request_id: &'a str,
    /// The client's `x-request-id`, when it sent a sane one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client_request_id: Option<&'a str>,
    pub(crate) principal: Option<&'a str>,
    /// The credential ([`Principal::id`](super::auth::Principal::id)): tells apart principals of
    /// one display name.
    pub(crate) credential_id: Option<&'a str>,
    pub(crate) method: &'a str,
    pub(crate) route: &'a str,
    pub(crate) status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<&'a str>,
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt: Option<&'a str>,
}

/// The writer handle.
#[derive(Debug)]
pub(crate) struct AuditLog {
    tx: flume::Sender<Vec<u8>>,
    pub(crate) log_prompts: bool,
}

impl AuditLog {
    pub(crate) fn open(config: &AuditConfig) -> Result<Self> {
        let mut out: Box<dyn Write + Send> = if config.path.as_os_str() == "-" {
            Box::new(std::io::stderr())
        } else {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&config.path)
                .map_err(|e| Error::Io {
                    path: config.path.clone(),
                    source: e,
                })?;
            Box::new(std::io::BufWriter::new(f))
        };
        let (tx, rx) = flume::unbounded::<Vec<u8>>();
        std::thread::Builder::new()
            .name("autoglm-audit".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(&line);
                    while let Ok(line) = rx.try_recv() {
                        let _ = out.write_all(&line);
                    }
                    let _ = out.flush();
                }
            })
            .map_err(|e| Error::Io {
                path: config.path.clone(),
                source: e,
            })?;
        Ok(AuditLog {
            tx,
            log_prompts: config.log_prompts,
        })
    }

    pub(crate) fn record(&self, entry: &AuditEntry<'_>) {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        let _ = self.tx.send(line);
    }
}

/// RFC 3339 UTC time with milliseconds, e.g. `2025-01-31T12:00:00.123Z`.
pub(crate) fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_time() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(
            super::rfc3339(1_735_689_599, 999),
            "2024-12-31T23:59:59.999Z"
        );
    }
}
