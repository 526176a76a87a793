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

use crate::sampling::FinishReason;

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
        self.render_series(out, name, "");
    }

    /// The bucket, sum and count lines, each with `labels` (`key="value",` pairs, escaped, with
    /// a trailing comma) before `le`.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cum}");
        }
        cum += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cum}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        let inner = labels.trim_end_matches(',');
        let braced = if inner.is_empty() {
            String::new()
        } else {
            format!("{{{inner}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(
            out,
            "{name}_count{braced} {}",
            self.count.load(Ordering::Relaxed)
        );
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

// vLLM's bucket bounds (vllm/v1/metrics/loggers.py), so that dashboards built for vLLM read the
// same quantile resolution from autoglm.
const VLLM_TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const VLLM_TPOT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const VLLM_E2E_BOUNDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// One model's request metrics, exposed under vLLM's names with its `model_name` label (the
/// server-wide `autoglm_*` histograms mix every model).
#[derive(Debug)]
pub(crate) struct ModelMetrics {
    pub(crate) ttft: Histogram,
    /// Gaps between a choice's consecutive outputs (vLLM's time per output token, also served as
    /// its newer name, inter-token latency).
    pub(crate) tpot: Histogram,
    pub(crate) e2e: Histogram,
    /// Prompt tokens of requests that got their first token.
    pub(crate) prompt_tokens: AtomicU64,
    /// Tokens streamed out, counted as they go.
    pub(crate) generation_tokens: AtomicU64,
    /// Finished choices by reason: stop, length, abort (cancelled, failed or cut off).
    pub(crate) finished: [AtomicU64; 3],
}

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            ttft: Histogram::new(VLLM_TTFT_BOUNDS),
            tpot: Histogram::new(VLLM_TPOT_BOUNDS),
            e2e: Histogram::new(VLLM_E2E_BOUNDS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
        }
    }
}

impl ModelMetrics {
    /// Counts a finished choice (`None`: it ended without a reason, an abort).
    pub(crate) fn count_finished(&self, reason: Option<FinishReason>, n: u64) {
        let i = match reason {
            Some(FinishReason::Stop) => 0,
            Some(FinishReason::Length) => 1,
            Some(FinishReason::Abort) | None => 2,
        };
        self.finished[i].fetch_add(n, Ordering::Relaxed);
    }
}

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
    pub(crate) prefix_queried: u64,
    pub(crate) prefix_hits: u64,
    pub(crate) block_size: usize,
    pub(crate) prefix_caching: bool,
    /// Its request metrics (vLLM's names).
    pub(crate) requests: std::sync::Arc<ModelMetrics>,
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
        render_vllm(&mut out, models);
        out
    }
}

/// vLLM's metrics (the names of vllm/v1/metrics/loggers.py, which Grafana dashboards, the
/// Gateway API Inference Extension and autoscalers read), one series per model with vLLM's
/// `model_name` and `engine` labels. `tests/fixtures/vllm-metrics.txt` lists them; a test checks
/// the exposition against it.
fn render_vllm(out: &mut String, models: &[ModelGauges]) {
    fn kv_usage(g: &ModelGauges) -> f64 {
        if g.kv_total == 0 {
            0.0
        } else {
            g.kv_used as f64 / g.kv_total as f64
        }
    }
    let labels: Vec<String> = models
        .iter()
        .map(|g| format!("model_name=\"{}\",engine=\"0\"", label(&g.model)))
        .collect();
    type Value = fn(&ModelGauges) -> f64;
    let scalars: [(&str, &str, &str, Value); 9] = [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            |g| g.running as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            |g| g.waiting as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_usage,
        ),
        (
            // vLLM's name before 0.9, still what older Gateway API Inference Extension endpoint
            // pickers read for KV utilisation.
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            kv_usage,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            |g| g.prefix_queried as f64,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            |g| g.prefix_hits as f64,
        ),
        (
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            |g| g.preemptions as f64,
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            |g| g.requests.prompt_tokens.load(Ordering::Relaxed) as f64,
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            |g| g.requests.generation_tokens.load(Ordering::Relaxed) as f64,
        ),
    ];
    for (name, kind, help, get) in scalars {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (g, l) in models.iter().zip(&labels) {
            let _ = writeln!(out, "{name}{{{l}}} {}", get(g));
        }
    }
    let name = "vllm:request_success_total";
    let _ = writeln!(
        out,
        "# HELP {name} Count of successfully processed requests.\n# TYPE {name} counter"
    );
    for (g, l) in models.iter().zip(&labels) {
        for (i, reason) in ["stop", "length", "abort"].iter().enumerate() {
            let n = g.requests.finished[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{{l},finished_reason=\"{reason}\"}} {n}");
        }
    }
    type Hist = fn(&ModelMetrics) -> &Histogram;
    let histograms: [(&str, &str, Hist); 4] = [
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            |m| &m.ttft,
        ),
        (
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            |m| &m.tpot,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            |m| &m.tpot,
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            |m| &m.e2e,
        ),
    ];
    for (name, help, get) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (g, l) in models.iter().zip(&labels) {
            get(&g.requests).render_series(out, name, &format!("{l},"));
        }
    }
    let name = "vllm:cache_config_info";
    let _ = writeln!(
        out,
        "# HELP {name} Information of the LLMEngine CacheConfig\n# TYPE {name} gauge"
    );
    // vLLM's has no model_name label (one model per server); with several models here it tells
    // their series apart.
    for g in models {
        let _ = writeln!(
            out,
            "{name}{{block_size=\"{}\",enable_prefix_caching=\"{}\",engine=\"0\",model_name=\"{}\",num_gpu_blocks=\"{}\"}} 1",
            g.block_size,
            if g.prefix_caching { "True" } else { "False" },
            label(&g.model),
            g.kv_total
        );
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

    fn gauges(model: &str, requests: std::sync::Arc<ModelMetrics>) -> ModelGauges {
        ModelGauges {
            model: model.into(),
            draining: false,
            waiting: 3,
            running: 2,
            paused: 0,
            kv_used: 25,
            kv_total: 100,
            steps: 0,
            preemptions: 1,
            engine_generated: 0,
            images_preprocessed: 0,
            image_preprocess_ns: 0,
            images_encoded: 0,
            image_encode_ns: 0,
            encoder_cache_hits: 0,
            prefix_queried: 40,
            prefix_hits: 16,
            block_size: 16,
            prefix_caching: true,
            requests,
        }
    }

    /// Every name of tests/fixtures/vllm-metrics.txt is served with its type, once per model, with
    /// vLLM's labels.
    #[test]
    fn vllm_names_per_model() {
        let want = include_str!("../../../tests/fixtures/vllm-metrics.txt");
        let a = std::sync::Arc::new(ModelMetrics::default());
        a.ttft.observe(Duration::from_millis(30));
        a.count_finished(Some(FinishReason::Length), 2);
        a.count_finished(None, 1);
        let models = [
            gauges("glm \"a\"", a),
            gauges("b", std::sync::Arc::default()),
        ];
        let text = Metrics::default().render(&models, &NetCounts::default(), 0);
        let mut names = 0;
        for line in want
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (name, kind) = line.split_once(' ').expect("name type");
            names += 1;
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} missing"
            );
            let sample = if kind == "histogram" {
                format!("{name}_count{{")
            } else {
                format!("{name}{{")
            };
            for model in ["glm \\\"a\\\"", "b"] {
                let n = text
                    .lines()
                    .filter(|l| l.starts_with(&sample))
                    .filter(|l| l.contains(&format!("model_name=\"{model}\"")))
                    .filter(|l| l.contains("engine=\"0\""))
                    .count();
                let per_model = if name == "vllm:request_success_total" {
                    3
                } else {
                    1
                };
                assert_eq!(n, per_model, "{sample} for {model}:\n{text}");
            }
        }
        assert!(names >= 14, "{names} names in the fixture");
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"b\",engine=\"0\"} 0.25\n"));
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"b\",engine=\"0\"} 16\n"));
        assert!(text.contains(
            "vllm:request_success_total{model_name=\"glm \\\"a\\\"\",engine=\"0\",finished_reason=\"length\"} 2\n"
        ));
        assert!(text.contains(
            "vllm:request_success_total{model_name=\"glm \\\"a\\\"\",engine=\"0\",finished_reason=\"abort\"} 1\n"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"glm \\\"a\\\"\",engine=\"0\",le=\"0.04\"} 1\n"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"glm \\\"a\\\"\",engine=\"0\",le=\"0.02\"} 0\n"
        ));
    }
}
