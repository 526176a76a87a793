//! Benchmarks of autoglm: criterion benches of the CPU kernels (`benches/kernels.rs`) and the
//! end-to-end program `e2e` (`src/bin/e2e.rs`). This library holds what both share: machine
//! information, a memory-bandwidth probe, model-size presets and a prototype skinny GEMV
//! ([`gemv`], wired into a backend in [`proto`]) to compare against the `gemm` crate at decode shapes.

pub mod gemv;
pub mod proto;

use std::time::Instant;

use autoglm_core::model::{Architecture, ModelConfig};
use rayon::prelude::*;

/// What the benchmark ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs this process may run on.
    pub cores: usize,
    /// `MemTotal` from /proc/meminfo, in bytes.
    pub mem_bytes: u64,
}

impl Machine {
    /// Reads /proc (Linux); fields fall back to "unknown"/0 elsewhere.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let cores = autoglm_core::threading::allowed_cores().len().max(1);
        Machine { cpu, cores, mem_bytes }
    }
}

/// Sum of a slice of u64 with eight independent lanes (vectorised; bound by memory, not by adds).
fn sum_u64(chunk: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let it = chunk.chunks_exact(8);
    let tail: u64 = it.remainder().iter().fold(0u64, |a, &b| a.wrapping_add(b));
    for c in it {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Result of [`memory_bandwidth`].
#[derive(Debug, Clone)]
pub struct Bandwidth {
    /// Best (highest) of the runs, bytes per second.
    pub best: f64,
    /// Median of the runs, bytes per second.
    pub median: f64,
    /// Bytes read per run.
    pub bytes: usize,
    /// Runs measured.
    pub runs: usize,
}

/// Read bandwidth of main memory: `bytes` of u64 (pre-touched), summed in 256 KiB chunks on the
/// current rayon pool, `runs` times. Call it inside the pool whose threads you want to measure.
pub fn memory_bandwidth(bytes: usize, runs: usize) -> Bandwidth {
    let len = bytes / 8;
    let mut buf = vec![0u64; len];
    buf.par_chunks_mut(1 << 15).enumerate().for_each(|(c, s)| {
        for (i, x) in s.iter_mut().enumerate() {
            *x = (c as u64) << 20 | i as u64;
        }
    });
    let chunk = (256 << 10) / 8;
    let mut rates = Vec::with_capacity(runs);
    let mut check = 0u64;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let s = buf.par_chunks(chunk).map(sum_u64).reduce(|| 0, u64::wrapping_add);
        let dt = t.elapsed().as_secs_f64();
        check = check.wrapping_add(std::hint::black_box(s));
        rates.push(len as f64 * 8.0 / dt);
    }
    std::hint::black_box(check);
    let best = rates.iter().cloned().fold(0.0, f64::max);
    Bandwidth { best, median: median(&mut rates), bytes: len * 8, runs: rates.len() }
}

/// Median of `v` (sorted in place); NaN for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Shape of a GLM-4-like model: what the `e2e` presets and flags choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// hidden_size
    pub hidden: usize,
    /// num_hidden_layers
    pub layers: usize,
    /// num_attention_heads
    pub heads: usize,
    /// num_key_value_heads
    pub kv_heads: usize,
    /// intermediate_size
    pub ffn: usize,
    /// vocab_size
    pub vocab: usize,
    /// head_dim (`hidden / heads` unless given)
    pub head_dim: usize,
}

impl ModelShape {
    /// Named presets: "50M" and "300M" (GLM-4 proportions: GQA, ffn about 3.5x hidden, untied head).
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            // 50.9M parameters.
            "50M" => Some(ModelShape { hidden: 512, layers: 10, heads: 8, kv_heads: 2, ffn: 1792, vocab: 16384, head_dim: 64 }),
            // 307.8M parameters.
            "300M" => Some(ModelShape { hidden: 1024, layers: 18, heads: 16, kv_heads: 2, ffn: 3584, vocab: 32768, head_dim: 64 }),
            _ => None,
        }
    }

    /// A validated `Glm4ForCausalLM` config of this shape: qkv bias, partial rotary 0.5, untied
    /// `lm_head`, rope theta 10000, eps 1e-5, 4096 positions.
    pub fn config(&self) -> autoglm_core::Result<ModelConfig> {
        let cfg = ModelConfig {
            architecture: Architecture::Glm4,
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
            attention_bias: true,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rotary_dim: self.head_dim / 2,
            eos_token_ids: vec![],
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Parameters a decode step actually streams from memory: everything but the embedding table
/// (one row of it per token is read). Counts the table when the head is tied to it.
pub fn params_read_per_decode_step(cfg: &ModelConfig) -> usize {
    let table = cfg.vocab_size * cfg.hidden_size;
    if cfg.tie_word_embeddings {
        cfg.num_parameters()
    } else {
        cfg.num_parameters() - table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_land_near_their_names() {
        let p50 = ModelShape::preset("50M").unwrap().config().unwrap().num_parameters();
        let p300 = ModelShape::preset("300m").unwrap().config().unwrap().num_parameters();
        assert!((45_000_000..55_000_000).contains(&p50), "{p50}");
        assert!((280_000_000..320_000_000).contains(&p300), "{p300}");
    }

    #[test]
    fn bandwidth_probe_runs() {
        let bw = memory_bandwidth(8 << 20, 2);
        assert!(bw.best > 0.0 && bw.best >= bw.median && bw.runs == 2);
    }
}
