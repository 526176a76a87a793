//! What the library logs, and where: `tracing` events under these targets (the library never
//! writes to stderr itself; a host installs a subscriber, or a `log` logger, which receives
//! the events as `log` records when no subscriber is installed — Python's `logging` does, through
//! `pyo3-log`):
//!
//! | target | level | what |
//! | --- | --- | --- |
//! | `autoglm::model` | info | a checkpoint load: start (dir, architecture, weight bytes), each tenth of the weights read, done (seconds) |
//! | `autoglm::engine` | info | the engine thread's start (backend, KV blocks, context length) |
//! | `autoglm::engine` | debug | each step (sequences, prefill and decode tokens, milliseconds), requests added / finished / aborted, preemptions, prefix-cache hits |
//! | `autoglm::stats` | info | throughput, queue and cache use every [`EngineConfig::log_stats_interval`](crate::EngineConfig::log_stats_interval), when something happened |
//! | `autoglm::access` | info (debug for probes) | one line per HTTP request: ids, principal, route, status, tokens, latency, client address; never the prompt |
//! | `autoglm::cuda`, `autoglm::threading`, `autoglm::engine` | warn | fallbacks: no CUDA, a rejected kernel cache, a failed graph capture, a worker left unpinned |
//!
//! No event carries prompt or generated text.

/// Whether an event at `$target` and level (`INFO` or `DEBUG`) would reach anyone: a tracing
/// subscriber, or, with none installed, a `log` logger. For work done only to log (a clock read,
/// a running total); the event macros themselves check for free.
macro_rules! log_enabled {
    ($target:literal, INFO) => {
        $crate::logs::log_enabled!(@ $target, INFO, Info)
    };
    ($target:literal, DEBUG) => {
        $crate::logs::log_enabled!(@ $target, DEBUG, Debug)
    };
    (@ $target:literal, $tracing:ident, $log:ident) => {
        tracing::enabled!(target: $target, tracing::Level::$tracing)
            || (!tracing::dispatcher::has_been_set()
                && tracing::log::log_enabled!(target: $target, tracing::log::Level::$log))
    };
}
pub(crate) use log_enabled;
