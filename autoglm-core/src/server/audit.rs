//! The audit log: one JSON line per answered request, written by a background thread.
//!
//! Lines carry time, request id (the server's; the client's `x-request-id` as
//! `client_request_id`), principal (display name) and credential id, route, status, token
//! counts and latency; the prompt text only when [`AuditConfig::log_prompts`] says so. Writing never blocks a request: lines go
//! through a bounded channel ([`QUEUE_LINES`]) to a thread that appends them and flushes whenever
//! it catches up; when the queue is full a line is dropped and counted
//! (`autoglm_audit_lines_dropped_total`). A logged prompt is cut to [`MAX_PROMPT_BYTES`] (at a
//! char boundary) with a marker saying how many bytes were cut.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Lines the writer's queue holds; more are dropped (and counted), never waited for.
pub(crate) const QUEUE_LINES: usize = 1024;
/// Bytes of a prompt an audit line keeps.
pub(crate) const MAX_PROMPT_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes at a char boundary, with a marker saying how many were cut.
pub(crate) fn truncate_prompt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[{} bytes cut]", &text[..end], text.len() - end)
}

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
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    pub(crate) fn open(config: &AuditConfig, dropped: Arc<AtomicU64>) -> Result<Self> {
        let out: Box<dyn Write + Send> = if config.path.as_os_str() == "-" {
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
        Self::spawn(out, QUEUE_LINES, config.log_prompts, dropped).map_err(|e| Error::Io {
            path: config.path.clone(),
            source: e,
        })
    }

    fn spawn(
        mut out: Box<dyn Write + Send>,
        queue: usize,
        log_prompts: bool,
        dropped: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = flume::bounded::<Vec<u8>>(queue);
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
            })?;
        Ok(AuditLog {
            tx,
            log_prompts,
            dropped,
        })
    }

    pub(crate) fn record(&self, entry: &AuditEntry<'_>) {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        if let Err(flume::TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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
    use super::*;

    #[test]
    fn prompts_are_cut_at_a_char_boundary_with_a_marker() {
        assert_eq!(truncate_prompt("short", 10), "short");
        // "é" is 2 bytes: 5 bytes would split the third one.
        assert_eq!(truncate_prompt("ééééé", 5), "éé...[6 bytes cut]");
        let big = "x".repeat(10_000);
        let cut = truncate_prompt(&big, MAX_PROMPT_BYTES);
        assert!(cut.ends_with("...[5904 bytes cut]"), "{}", &cut[4090..]);
    }

    /// A writer that blocks until told to go on.
    struct Stuck(flume::Receiver<()>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_drops_and_counts_lines_instead_of_blocking() {
        let (go, wait) = flume::unbounded();
        let dropped = Arc::new(AtomicU64::new(0));
        let log = AuditLog::spawn(Box::new(Stuck(wait)), 4, false, dropped.clone()).unwrap();
        let entry = AuditEntry {
            time: rfc3339_now(),
            request_id: "r",
            client_request_id: None,
            principal: None,
            credential_id: None,
            method: "GET",
            route: "/",
            status: 200,
            model: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0.0,
            prompt: None,
        };
        // One is taken by the writer (stuck on it), 4 queue, the rest are dropped at once.
        for _ in 0..20 {
            log.record(&entry);
        }
        let n = dropped.load(Ordering::Relaxed);
        assert!((15..=16).contains(&n), "{n}");
        drop(go);
    }

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
