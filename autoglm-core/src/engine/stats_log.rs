//! The periodic stats line (vLLM's "Avg prompt throughput: ..."), logged by the engine thread.
//!
//! Each line covers a window that starts when the engine becomes busy (or at the previous line)
//! and is logged once it is at least `interval` long: after a step, or when the engine thread
//! wakes at the window's end ([`StatsLog::deadline`] bounds its wait while something is
//! unlogged). An idle engine logs nothing and does not wake up. Cost per step: a few relaxed
//! atomic loads and a clock read.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::EngineStats;

/// The counters a line reports the growth of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counters {
    prompt_tokens: u64,
    generated_tokens: u64,
    prefix_queried: u64,
    prefix_hits: u64,
}

impl Counters {
    fn of(s: &EngineStats) -> Self {
        Counters {
            prompt_tokens: s.prompt_tokens_computed.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            prefix_queried: s.prefix_cache_queried_tokens.load(Ordering::Relaxed),
            prefix_hits: s.prefix_cache_hit_tokens.load(Ordering::Relaxed),
        }
    }
}

pub(super) struct StatsLog {
    interval: Duration,
    window_start: Instant,
    last: Counters,
}

impl StatsLog {
    /// `None` when the interval is off or nobody listens at `autoglm::stats` info.
    pub(super) fn new(interval: Option<Duration>, stats: &EngineStats) -> Option<Self> {
        let interval = interval?;
        if !crate::logs::log_enabled!("autoglm::stats", INFO) {
            return None;
        }
        Some(StatsLog {
            interval,
            window_start: Instant::now(),
            last: Counters::of(stats),
        })
    }

    /// Whether the window holds something to report: tokens computed, or requests present.
    fn busy(&self, stats: &EngineStats) -> bool {
        Counters::of(stats) != self.last
            || stats.running.load(Ordering::Relaxed) > 0
            || stats.waiting.load(Ordering::Relaxed) > 0
    }

    /// When the engine thread should wake up to log, if something is unlogged.
    pub(super) fn deadline(&self, stats: &EngineStats) -> Option<Instant> {
        self.busy(stats).then(|| self.window_start + self.interval)
    }

    /// The engine thread slept with nothing unlogged: the next window starts now, not when the
    /// last one ended (an hour of idleness is not averaged into the next line).
    pub(super) fn woke_from_idle(&mut self) {
        self.window_start = Instant::now();
    }

    /// Logs a line if the window is due and something happened in it.
    pub(super) fn tick(&mut self, stats: &EngineStats) {
        let now = Instant::now();
        if !self.busy(stats) {
            self.window_start = now;
            return;
        }
        let elapsed = now.duration_since(self.window_start);
        if elapsed < self.interval {
            return;
        }
        let c = Counters::of(stats);
        let secs = elapsed.as_secs_f64();
        let prompt = (c.prompt_tokens - self.last.prompt_tokens) as f64 / secs;
        let generation = (c.generated_tokens - self.last.generated_tokens) as f64 / secs;
        let used = stats.kv_blocks_used.load(Ordering::Relaxed);
        let total = stats.kv_blocks_total.load(Ordering::Relaxed).max(1);
        let kv = 100.0 * used as f64 / total as f64;
        let queried = c.prefix_queried - self.last.prefix_queried;
        let hit_rate = if queried == 0 {
            0.0
        } else {
            100.0 * (c.prefix_hits - self.last.prefix_hits) as f64 / queried as f64
        };
        tracing::info!(
            target: "autoglm::stats",
            "Avg prompt throughput: {prompt:.1} tokens/s, Avg generation throughput: {generation:.1} tokens/s, \
             Running: {} reqs, Waiting: {} reqs, KV cache usage: {kv:.1}%, Prefix cache hit rate: {hit_rate:.1}%",
            stats.running.load(Ordering::Relaxed),
            stats.waiting.load(Ordering::Relaxed),
        );
        self.last = c;
        self.window_start = now;
    }
}
