//! The `e2e` benchmark on the CUDA backend (`e2e --device cuda[:N]`): start-up time, device
//! bandwidth, prefill of one long prompt, decode tok/s at several batch sizes and batch-1 decode
//! against the bandwidth roofline. The model is a dummy of the given shape whose weights are
//! generated on the device (no checkpoint needed: `--params 9B` or `--config config.json`).
//!
//! Timing: wall clock around work that ends in a device synchronization (each decode step ends
//! with the device argmax copying the tokens back; prefill synchronizes explicitly), after warm-up
//! steps; medians reported. Decode is measured eagerly and then with CUDA graphs, on the same
//! sequences, through `Backend::run_step` as the engine calls it. First run on an H200: docs/BENCHMARKS.md section 6.

use std::time::Instant;

use autoglm_core::backend::cuda::{CudaBackend, CudaOptions};
use autoglm_core::backend::{Backend, RowSampling};
use autoglm_core::model::{GlmModel, ModelConfig, RandomWeights};
use autoglm_core::runner::ForwardBatch;
use serde_json::{json, Value};

use crate::{median, params_read_per_decode_step};

const BLOCK_SIZE: usize = 16;

/// What to measure.
#[derive(Debug, Clone)]
pub struct CudaBenchArgs {
    /// Device ordinal.
    pub ordinal: usize,
    /// Prompt length of the prefill measurement.
    pub prefill_len: usize,
    /// Prefill repetitions (median reported).
    pub prefill_runs: usize,
    /// Context already in the cache of each decoding sequence.
    pub decode_prompt: usize,
    /// Timed decode steps per batch size.
    pub decode_steps: usize,
    /// Untimed decode steps first.
    pub warmup_steps: usize,
    /// Decode batch sizes.
    pub batches: Vec<usize>,
    /// Bytes copied by the bandwidth probe.
    pub bw_bytes: usize,
    /// Seed of the weights and prompts.
    pub seed: u64,
    /// `CudaOptions::gemv_max_rows`: decode products of at most this many rows take the GEMV
    /// kernel, the rest cuBLAS (0: all cuBLAS).
    pub gemv_max_rows: usize,
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// Runs the CUDA measurements; returns the JSON report (and prints the human one with `line`).
pub fn run(
    config: &ModelConfig,
    a: &CudaBenchArgs,
    line: &dyn Fn(String),
) -> autoglm_core::Result<Value> {
    let t = Instant::now();
    let gpu = CudaBackend::new(CudaOptions {
        ordinal: a.ordinal,
        gemv_max_rows: a.gemv_max_rows,
        ..CudaOptions::default()
    })?;
    let startup_backend_s = t.elapsed().as_secs_f64();
    let (free, total) = gpu.memory_info()?;
    line(format!(
        "device: {} ({}, sm_{}), {:.1} GiB free of {:.1} GiB; backend ready in {:.2} s (kernels compiled or loaded from the disk cache); products of <= {} rows on the GEMV kernel",
        gpu.name(),
        gpu.device_name(),
        gpu.arch(),
        free as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64,
        startup_backend_s,
        a.gemv_max_rows
    ));
    gpu.check_fits(autoglm_core::backend::cuda::weight_bytes(config))?;
    let bw = gpu.copy_bandwidth(a.bw_bytes, 5)?;
    line(format!(
        "device copy bandwidth (read + write, {} MiB): {:.1} GB/s",
        a.bw_bytes >> 20,
        bw / 1e9
    ));

    let t = Instant::now();
    let weights = RandomWeights {
        seed: a.seed,
        scale: 0.05,
    };
    let model = GlmModel::from_source(config.clone(), &weights, &gpu)?;
    gpu.synchronize()?;
    let startup_weights_s = t.elapsed().as_secs_f64();
    line(format!(
        "dummy weights generated on the device in {startup_weights_s:.2} s"
    ));
    let vocab = config.vocab_size;

    // Prefill of one sequence.
    let blocks = a.prefill_len.div_ceil(BLOCK_SIZE);
    let mut cache = gpu.alloc_kv_cache(model.kv_cache_shape(blocks, BLOCK_SIZE))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut prefill = Vec::new();
    for run in 0..=a.prefill_runs.max(1) {
        let mut batch = ForwardBatch::new(blocks);
        batch.push_seq(
            &tokens(a.prefill_len, vocab, a.seed ^ run as u64),
            0,
            &table,
            BLOCK_SIZE,
        );
        batch.logits_indices = vec![a.prefill_len as u32 - 1].into();
        let t = Instant::now();
        let logits = model.forward_logits(&gpu, &batch, &mut cache)?;
        gpu.synchronize()?;
        if run > 0 {
            prefill.push(t.elapsed().as_secs_f64());
        }
        drop(logits);
    }
    drop(cache);
    let prefill_s = median(&mut prefill.clone());
    line(format!(
        "prefill of {} tokens: median {:.1} ms ({:.0} tok/s)",
        a.prefill_len,
        prefill_s * 1e3,
        a.prefill_len as f64 / prefill_s
    ));

    // Decode.
    // The roofline: the weights read once per step at the memory bandwidth the copy probe
    // measured, counting its bytes read and written (a device-to-device copy's traffic is what
    // the memory delivers; a read-only stream gets about as much, not half).
    let read_bytes = params_read_per_decode_step(config) * 2;
    let roofline_s = read_bytes as f64 / bw;
    let mut decode = Vec::new();
    for &b in &a.batches {
        // The same sequences decode eagerly, then through CUDA graphs (the first graph step
        // captures): warm-up and timed steps for each.
        let steps = a.warmup_steps + a.decode_steps;
        let per_seq = (a.decode_prompt + 2 * steps + 2).div_ceil(BLOCK_SIZE);
        let mut cache = gpu.alloc_kv_cache(model.kv_cache_shape(b * per_seq, BLOCK_SIZE))?;
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let mut fb = ForwardBatch::new(per_seq);
        for (s, table) in tables.iter().enumerate() {
            fb.push_seq(
                &tokens(a.decode_prompt, vocab, a.seed ^ (s as u64 + 100)),
                0,
                table,
                BLOCK_SIZE,
            );
        }
        fb.logits_indices = (1..=b).map(|s| (s * a.decode_prompt) as u32 - 1).collect();
        let l = model.forward_logits(&gpu, &fb, &mut cache)?;
        let greedy = vec![RowSampling::GREEDY; b];
        let mut next = Vec::with_capacity(b);
        gpu.sample_rows(&l, &greedy, &mut next)?;
        let mut last = Some(l);
        let mut pos = a.decode_prompt;
        let mut timed = |graphs: bool, next: &mut Vec<u32>| -> autoglm_core::Result<Vec<f64>> {
            gpu.set_graphs(graphs);
            let mut times = Vec::new();
            for step in 0..steps {
                let mut fb = ForwardBatch::new(per_seq);
                for (s, table) in tables.iter().enumerate() {
                    fb.push_seq(&[next[s]], pos, table, BLOCK_SIZE);
                }
                fb.logits_indices = (0..b as u32).collect();
                let t = Instant::now();
                let l = gpu.run_step(&fb, &mut cache, &mut |fb, c| {
                    model.forward_logits(&gpu, fb, c)
                })?;
                gpu.sample_rows(&l, &greedy, next)?;
                last = Some(l);
                if step >= a.warmup_steps {
                    times.push(t.elapsed().as_secs_f64());
                }
                pos += 1;
            }
            Ok(times)
        };
        let eager_times = timed(false, &mut next)?;
        let times = timed(true, &mut next)?;
        // Device sampling of the last step's logits (temperature 0.8, top-k 50, top-p 0.9) next
        // to greedy: what a sampled request adds per step.
        let l = last.expect("at least one decode step");
        let sampled: Vec<RowSampling> = (0..b)
            .map(|i| RowSampling {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
                min_p: 0.0,
                uniform: (i as f64 + 0.5) / b as f64,
            })
            .collect();
        let mut ids = Vec::with_capacity(b);
        let mut time_rows = |rows: &[RowSampling]| -> autoglm_core::Result<f64> {
            let mut t = Vec::new();
            for _ in 0..10 {
                let t0 = Instant::now();
                gpu.sample_rows(&l, rows, &mut ids)?;
                t.push(t0.elapsed().as_secs_f64());
            }
            Ok(median(&mut t))
        };
        let (greedy_s, sampled_s) = (time_rows(&greedy)?, time_rows(&sampled)?);
        line(format!(
            "sampling batch {b} on the device: greedy {:.3} ms, T 0.8 / top-k 50 / top-p 0.9 {:.3} ms",
            greedy_s * 1e3,
            sampled_s * 1e3
        ));
        let med = median(&mut times.clone());
        let eager_med = median(&mut eager_times.clone());
        line(format!(
            "decode batch {b}: median step {:.2} ms, {:.1} tok/s with CUDA graphs; {:.2} ms, {:.1} tok/s eager{}",
            med * 1e3,
            b as f64 / med,
            eager_med * 1e3,
            b as f64 / eager_med,
            if b == 1 {
                format!(
                    " ({:.0}% of the roofline {:.1} tok/s: {:.2} GB read per step at {:.0} GB/s; eager {:.0}%)",
                    100.0 * roofline_s / med,
                    1.0 / roofline_s,
                    read_bytes as f64 / 1e9,
                    bw / 1e9,
                    100.0 * roofline_s / eager_med
                )
            } else {
                String::new()
            }
        ));
        decode.push(
            json!({"batch": b, "median_step_ms": med * 1e3, "tok_s": b as f64 / med,
                           "eager_median_step_ms": eager_med * 1e3, "eager_tok_s": b as f64 / eager_med,
                           "sample_greedy_ms": greedy_s * 1e3, "sample_top_p_ms": sampled_s * 1e3,
                           "steps_ms": times.iter().map(|x| x * 1e3).collect::<Vec<_>>()}),
        );
    }
    Ok(json!({
        "device": gpu.device_name(),
        "arch": gpu.arch(),
        "gemv_max_rows": a.gemv_max_rows,
        "startup_backend_s": startup_backend_s,
        "startup_weights_s": startup_weights_s,
        "copy_bandwidth_gb_s": bw / 1e9,
        "prefill": {"tokens": a.prefill_len, "median_ms": prefill_s * 1e3, "tok_s": a.prefill_len as f64 / prefill_s},
        "decode": decode,
        "roofline": {"bytes_per_step": read_bytes, "read_bandwidth_gb_s": bw / 1e9, "batch1_tok_s": 1.0 / roofline_s},
        "timing": "wall clock around synchronized work, medians after warm-up",
    }))
}
