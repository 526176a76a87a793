//! Pieces shared by the example programs: the `autoglm` command's engine and sampling flags (from
//! `autoglm-cli`), the bundled default model, and the machine description of benchmark reports.

pub use autoglm_cli::args::{
    bundled_model, model_dir, EngineArgs, List, MultiModalArgs, SamplingArgs,
};

/// The machine a benchmark ran on, for its report: "N cores, CPU model" (the cores this process
/// may run on).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = autoglm_core::threading::allowed_cores().len();
    format!("{cores} cores, {cpu}")
}
