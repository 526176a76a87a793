//! Prometheus metrics, rendered in the text exposition format.
//!
//! Counters and histogram buckets are relaxed atomics: observing costs a bucket search over about
//! twenty bounds and two atomic adds, cheap enough to do for every streamed token. Requests by
//! route and status sit in a small mutex-guarded map touched once per response.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed bounds (seconds).
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// One per bound plus +Inf; not cumulative.
    buckets: Vec<AtomicU64>,
    /// Sum in nanoseconds.
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5,
];
const E2E_BOUNDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0,
];

/// The server's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub(crate) ttft: Histogram,
    pub(crate) itl: Histogram,
    pub(crate) e2e: Histogram,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    /// Audit lines dropped because the writer's queue was full.
    pub(crate) audit_lines_dropped: std::sync::Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
            e2e: Histogram::new(E2E_BOUNDS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            audit_lines_dropped: Default::default(),
        }
    }
}

/// A gauge value with its labels, gathered at render time.
pub(crate) struct ModelGauges {
    pub(crate) model: String,
    /// Being unloaded.
    pub(crate) draining: bool,
    pub(crate) waiting: usize,
    pub(crate) running: usize,
    pub(crate) paused: usize,
    pub(crate) kv_used: usize,
    pub(crate) kv_total: usize,
    pub(crate) steps: u64,
    pub(crate) preemptions: u64,
    pub(crate) engine_generated: u64,
    pub(crate) images_preprocessed: u64,
    pub(crate) image_preprocess_ns: u64,
    pub(crate) images_encoded: u64,
    pub(crate) image_encode_ns: u64,
    pub(crate) encoder_cache_hits: u64,
}

/// The socket layer's counters, as read for one exposition.
#[derive(Debug, Default)]
pub(crate) struct NetCounts {
    pub(crate) open: usize,
    pub(crate) rejected: usize,
    pub(crate) rejected_per_address: usize,
    pub(crate) header_timeouts: usize,
    pub(crate) write_timeouts: usize,
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub(crate) fn count_request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }

    /// The exposition text.
    pub(crate) fn render(
        &self,
        models: &[ModelGauges],
        net: &NetCounts,
        in_flight: usize,
    ) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP autoglm_http_requests_total HTTP requests answered, by route and status.\n# TYPE autoglm_http_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "autoglm_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        self.ttft.render(
            &mut out,
            "autoglm_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
        );
        self.itl.render(
            &mut out,
            "autoglm_inter_token_latency_seconds",
            "Time between consecutive outputs of one choice.",
        );
        self.e2e.render(
            &mut out,
            "autoglm_e2e_request_latency_seconds",
            "Time from request arrival to its last byte.",
        );
        let counters = [
            (
                "autoglm_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "autoglm_generation_tokens_total",
                "Tokens generated for finished or cancelled requests.",
                self.generation_tokens.load(Ordering::Relaxed),
            ),
            (
                "autoglm_audit_lines_dropped_total",
                "Audit lines dropped because the audit writer fell behind (its queue is bounded).",
                self.audit_lines_dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "autoglm_open_connections",
                "Open client connections.",
                net.open,
            ),
            (
                "autoglm_rejected_connections_total",
                "Connections turned away over the connection cap.",
                net.rejected,
            ),
            (
                "autoglm_rejected_connections_per_address_total",
                "Connections closed on accept because their client address had its share open.",
                net.rejected_per_address,
            ),
            (
                "autoglm_header_timeouts_total",
                "Connections closed because no request head came within the header timeout of accept.",
                net.header_timeouts,
            ),
            (
                "autoglm_stream_write_timeouts_total",
                "Connections closed (and their requests cancelled) because their socket took no byte for the stream write timeout.",
                net.write_timeouts,
            ),
            (
                "autoglm_http_requests_in_flight",
                "Choices (sequences) of generation requests in flight: a request counts its prompts times n.",
                in_flight,
            ),
        ];
        for (name, help, v) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        type Get = fn(&ModelGauges) -> u64;
        let per_model: [(&str, &str, &str, Get); 12] = [
            (
                "autoglm_model_draining",
                "gauge",
                "1 while the model is being unloaded (no new requests; those running may finish until the unload timeout).",
                |g| g.draining as u64,
            ),
            (
                "autoglm_num_requests_waiting",
                "gauge",
                "Sequences waiting in the engine.",
                |g| g.waiting as u64,
            ),
            (
                "autoglm_num_requests_running",
                "gauge",
                "Sequences running in the engine.",
                |g| g.running as u64,
            ),
            (
                "autoglm_num_requests_paused",
                "gauge",
                "Running sequences held back because their client is not reading its stream.",
                |g| g.paused as u64,
            ),
            (
                "autoglm_kv_blocks_used",
                "gauge",
                "KV-cache blocks in use.",
                |g| g.kv_used as u64,
            ),
            (
                "autoglm_kv_blocks_total",
                "gauge",
                "KV-cache blocks in the pool.",
                |g| g.kv_total as u64,
            ),
            (
                "autoglm_engine_steps_total",
                "counter",
                "Forward passes run by the engine.",
                |g| g.steps,
            ),
            (
                "autoglm_engine_preemptions_total",
                "counter",
                "Sequences preempted by the engine.",
                |g| g.preemptions,
            ),
            (
                "autoglm_engine_generated_tokens_total",
                "counter",
                "Tokens generated by the engine.",
                |g| g.engine_generated,
            ),
            (
                "autoglm_images_preprocessed_total",
                "counter",
                "Images decoded, resized and normalised for the model.",
                |g| g.images_preprocessed,
            ),
            (
                "autoglm_images_encoded_total",
                "counter",
                "Images run through the vision tower.",
                |g| g.images_encoded,
            ),
            (
                "autoglm_encoder_cache_hits_total",
                "counter",
                "Images whose features came from the encoder cache instead of the vision tower.",
                |g| g.encoder_cache_hits,
            ),
        ];
        for (name, kind, help, get) in per_model {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for g in models {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", label(&g.model), get(g));
            }
        }
        type Seconds = fn(&ModelGauges) -> u64;
        let per_model_seconds: [(&str, &str, Seconds); 2] = [
            (
                "autoglm_image_preprocess_seconds_total",
                "Time spent preprocessing images (on the image threads).",
                |g| g.image_preprocess_ns,
            ),
            (
                "autoglm_image_encode_seconds_total",
                "Time the engine spent in the vision tower.",
                |g| g.image_encode_ns,
            ),
        ];
        for (name, help, get) in per_model_seconds {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for g in models {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\"}} {:.6}",
                    label(&g.model),
                    get(g) as f64 * 1e-9
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_secs(100));
        m.count_request("/v1/completions", 200);
        let net = NetCounts {
            open: 1,
            ..Default::default()
        };
        let text = m.render(&[], &net, 0);
        assert!(text.contains("autoglm_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("autoglm_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text
            .contains("autoglm_http_requests_total{route=\"/v1/completions\",status=\"200\"} 1"));
    }
}
