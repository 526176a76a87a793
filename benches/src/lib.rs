//! Benchmarks of autoglm: criterion benches of the CPU kernels (`benches/kernels.rs`) and the
//! end-to-end program `e2e` (`src/bin/e2e.rs`). This library holds what both share: machine
//! information, a memory-bandwidth probe, a meter of other processes' CPU use, model-size presets,
//! a prototype skinny GEMV ([`gemv`], wired into a backend in [`proto`]) to compare against the
//! `gemm` crate at decode shapes, and a per-operation timing wrapper for backends ([`timed`]).
//! Figures and commands: `docs/BENCHMARKS.md`.

pub mod cuda_e2e;
pub mod gemv;
pub mod proto;
pub mod timed;

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
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let cores = autoglm_core::threading::allowed_cores().len().max(1);
        Machine {
            cpu,
            cores,
            mem_bytes,
        }
    }
}

/// The 1-minute load average from /proc/loadavg (other work on the machine skews every figure).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time counters, to tell how much other processes competed with a benchmark.
#[derive(Debug, Clone, Copy)]
pub struct CpuUsage {
    at: Instant,
    /// Busy ticks of the whole machine (/proc/stat: user, nice, system, irq, softirq).
    busy: u64,
    /// Ticks stolen by the hypervisor (/proc/stat: steal).
    steal: u64,
    /// Ticks this process ran (/proc/self/stat: utime + stime).
    own: u64,
}

/// What other work did between two [`CpuUsage`] snapshots.
#[derive(Debug, Clone, Copy)]
pub struct Contention {
    /// Average number of cores busy with other processes.
    pub other_cores: f64,
    /// Average number of cores this process kept busy.
    pub own_cores: f64,
    /// Average number of cores' worth of time stolen by the hypervisor.
    pub steal_cores: f64,
}

impl CpuUsage {
    /// Reads the counters now (zeros where /proc is missing).
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let get = |i: usize| f.get(i).copied().unwrap_or(0);
        let busy = get(0) + get(1) + get(2) + get(5) + get(6);
        let steal = get(7);
        let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the ")" that closes the command name; utime and stime are fields 14, 15.
        let own = own_stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                // rest starts at field 3 (state); utime and stime are fields 14 and 15.
                let v: Vec<&str> = rest.split_whitespace().collect();
                let field = |n: usize| {
                    v.get(n - 3)
                        .and_then(|x| x.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                field(14) + field(15)
            })
            .unwrap_or(0);
        CpuUsage {
            at: Instant::now(),
            busy,
            steal,
            own,
        }
    }

    /// Other processes' and this process's average core use since `self`.
    pub fn since(&self) -> Contention {
        let now = CpuUsage::now();
        // USER_HZ is 100 on every Linux configuration in practice.
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let ticks = |t: u64| t as f64 / 100.0 / secs;
        let busy = now.busy.saturating_sub(self.busy);
        let own = now.own.saturating_sub(self.own);
        Contention {
            other_cores: ticks(busy.saturating_sub(own)),
            own_cores: ticks(own),
            steal_cores: ticks(now.steal.saturating_sub(self.steal)),
        }
    }
}

/// Sum of `chunk` read as `streams` equal parts walked side by side (eight u64 lanes each).
///
/// One sequential stream per core leaves bandwidth on the table on many x86 parts (the hardware
/// prefetchers track several streams; one stream keeps too few cache-line misses in flight), so
/// the probe also reads 4 and 8 interleaved streams per task and keeps the best, which is what a
/// well-written kernel can reach and hence the honest roofline.
fn sum_streams(chunk: &[u64], streams: usize) -> u64 {
    let part = chunk.len() / streams / 8 * 8;
    let mut acc = [[0u64; 8]; 8];
    let mut off = 0;
    while off < part {
        for (j, a) in acc.iter_mut().enumerate().take(streams) {
            let x = &chunk[j * part + off..j * part + off + 8];
            for i in 0..8 {
                a[i] = a[i].wrapping_add(x[i]);
            }
        }
        off += 8;
    }
    let tail = chunk[streams * part..]
        .iter()
        .fold(0u64, |a, &b| a.wrapping_add(b));
    acc.iter().flatten().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Streams per task the probe tries (interleaved parts of each 4 MiB task; see `sum_streams`).
pub const PROBE_STREAMS: [usize; 3] = [1, 4, 8];

/// Result of [`memory_bandwidth`].
#[derive(Debug, Clone)]
pub struct Bandwidth {
    /// Best (highest) over every run and stream count, bytes per second: the roofline's bandwidth.
    pub best: f64,
    /// Median over the runs of the best stream count, bytes per second.
    pub median: f64,
    /// Best with one sequential stream per task (the naive probe), bytes per second.
    pub single_stream: f64,
    /// Stream count that gave `best`.
    pub best_streams: usize,
    /// Bytes read per run.
    pub bytes: usize,
    /// Runs per stream count.
    pub runs: usize,
}

/// Read bandwidth of main memory: `bytes` of u64 (pre-touched), summed in 4 MiB chunks on the
/// current rayon pool, `runs` times for each of [`PROBE_STREAMS`]. Call it inside the pool whose
/// threads you want to measure.
pub fn memory_bandwidth(bytes: usize, runs: usize) -> Bandwidth {
    let len = bytes / 8;
    let mut buf = vec![0u64; len];
    buf.par_chunks_mut(1 << 15).enumerate().for_each(|(c, s)| {
        for (i, x) in s.iter_mut().enumerate() {
            *x = (c as u64) << 20 | i as u64;
        }
    });
    let chunk = ((4 << 20) / 8).min(len.max(1));
    let runs = runs.max(1);
    let mut check = 0u64;
    let mut per_streams = Vec::new();
    for &streams in &PROBE_STREAMS {
        let mut rates = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let s = buf
                .par_chunks(chunk)
                .map(|c| sum_streams(c, streams))
                .reduce(|| 0, u64::wrapping_add);
            let dt = t.elapsed().as_secs_f64();
            check = check.wrapping_add(std::hint::black_box(s));
            rates.push(len as f64 * 8.0 / dt);
        }
        per_streams.push((streams, rates));
    }
    std::hint::black_box(check);
    let max = |r: &[f64]| r.iter().cloned().fold(0.0, f64::max);
    let (best_streams, best_rates) = per_streams
        .iter()
        .max_by(|a, b| max(&a.1).total_cmp(&max(&b.1)))
        .cloned()
        .expect("at least one variant");
    let single_stream = max(&per_streams[0].1);
    let best = max(&best_rates);
    let mut rates = best_rates;
    Bandwidth {
        best,
        median: median(&mut rates),
        single_stream,
        best_streams,
        bytes: len * 8,
        runs,
    }
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
    /// Named presets: "50M", "300M", "1.45B" and "9B" (GLM-4 proportions: GQA, ffn about 3.5x hidden, untied head).
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            // 50.9M parameters.
            "50M" => Some(ModelShape {
                hidden: 512,
                layers: 10,
                heads: 8,
                kv_heads: 2,
                ffn: 1792,
                vocab: 16384,
                head_dim: 64,
            }),
            // 307.8M parameters.
            "300M" => Some(ModelShape {
                hidden: 1024,
                layers: 18,
                heads: 16,
                kv_heads: 2,
                ffn: 3584,
                vocab: 32768,
                head_dim: 64,
            }),
            // GLM-4-0414 proportions at 1.45B parameters (issue 18's comparison with llama.cpp):
            // 2.9 GB in bf16.
            "1.45B" | "1B" => Some(ModelShape {
                hidden: 2048,
                layers: 16,
                heads: 16,
                kv_heads: 2,
                ffn: 6848,
                vocab: 151552,
                head_dim: 128,
            }),
            // GLM-4-9B (glm-4-9b-chat-hf's shape): 9.4B parameters, 18.8 GB in bf16.
            "9B" => Some(ModelShape {
                hidden: 4096,
                layers: 40,
                heads: 32,
                kv_heads: 2,
                ffn: 13696,
                vocab: 151552,
                head_dim: 128,
            }),
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
            mrope_section: None,
            vision: None,
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
        let p50 = ModelShape::preset("50M")
            .unwrap()
            .config()
            .unwrap()
            .num_parameters();
        let p300 = ModelShape::preset("300m")
            .unwrap()
            .config()
            .unwrap()
            .num_parameters();
        assert!((45_000_000..55_000_000).contains(&p50), "{p50}");
        assert!((280_000_000..320_000_000).contains(&p300), "{p300}");
        let p9b = ModelShape::preset("9B")
            .unwrap()
            .config()
            .unwrap()
            .num_parameters();
        // GLM-4-9B: 9,399,951,360 parameters (the published checkpoint's count).
        assert!((9_300_000_000..9_500_000_000).contains(&p9b), "{p9b}");
    }

    #[test]
    fn stream_sums_agree() {
        let v: Vec<u64> = (0..10_007u64).map(|i| i * 2_654_435_761).collect();
        let want = v.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        for s in 1..=8 {
            assert_eq!(sum_streams(&v, s), want, "{s} streams");
        }
    }

    #[test]
    fn cpu_usage_reads_this_process() {
        let start = CpuUsage::now();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 300 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let c = start.since();
        assert!(
            c.own_cores > 0.3 && c.other_cores >= 0.0 && c.steal_cores >= 0.0,
            "{c:?}"
        );
    }

    #[test]
    fn bandwidth_probe_runs() {
        let bw = memory_bandwidth(8 << 20, 2);
        assert!(
            bw.best > 0.0 && bw.best >= bw.median && bw.best >= bw.single_stream && bw.runs == 2
        );
    }
}
