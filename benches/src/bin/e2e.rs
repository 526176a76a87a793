//! End-to-end CPU benchmark of a random-weight GLM-4-shaped model, with its memory-bandwidth
//! roofline measured in the same run.
//!
//! ```text
//! cargo run --release -p autoglm-benches --bin e2e -- --params 50M
//! cargo run --release -p autoglm-benches --bin e2e -- --params 300M --compare-gemv --profile --engine --json
//! cargo run --release -p autoglm-benches --bin e2e -- --hidden 768 --layers 12 --heads 12 --kv-heads 2 --ffn 2688 --vocab 32768
//! e2e --device cuda --params 9B --json      # on a GPU machine (see autoglm_benches::cuda_e2e)
//! cargo run --release -p autoglm-benches --bin e2e -- --vision --vision-grid 16x8   # 9B vision tower
//! ```
//!
//! Measures (a) memory read bandwidth (all threads and one thread), (b) prefill tok/s of one
//! sequence through `GlmModel::forward`, (c) decode tok/s at several batch sizes (each sequence's
//! short prompt already in the KV cache; median step time of N one-token-per-sequence steps),
//! (d) the roofline: weight bytes per decode step / bandwidth, and measured / roofline at batch 1.
//! Optionally the same decode on a prototype skinny-GEMV backend (`--compare-gemv`, including a
//! batch-1 run with the two backends' steps interleaved), a per-operation breakdown of decode steps
//! (`--profile`) and decode through the engine (`--engine`: submit/stream, scheduler and sampler
//! included). Every decode figure comes with the number of cores other processes kept busy
//! meanwhile: on a small shared machine that is the first thing to check.

use std::collections::BTreeMap;
use std::time::Instant;

use autoglm_benches::proto::ProtoBackend;
use autoglm_benches::timed::{OpTime, TimedBackend};
use autoglm_benches::{
    load_average, median, memory_bandwidth, params_read_per_decode_step, Bandwidth, CpuUsage,
    Machine, ModelShape, PROBE_STREAMS,
};
use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::backend::Backend;
use autoglm_core::model::{GlmModel, ModelConfig, RandomWeights};
use autoglm_core::runner::ForwardBatch;
use autoglm_core::{
    CacheConfig, Engine, EngineConfig, SamplingParams, SchedulerConfig, ThreadingConfig,
};
use clap::Parser;
use serde_json::{json, Value};

const BLOCK_SIZE: usize = 16;

#[derive(Parser, Debug)]
#[command(
    about = "End-to-end CPU benchmark of a random-weight GLM-4-shaped model against its memory roofline"
)]
struct Args {
    /// Size preset: 50M or 300M. Explicit shape flags override its fields.
    #[arg(long, default_value = "50M")]
    params: String,
    /// hidden_size
    #[arg(long)]
    hidden: Option<usize>,
    /// num_hidden_layers
    #[arg(long)]
    layers: Option<usize>,
    /// num_attention_heads
    #[arg(long)]
    heads: Option<usize>,
    /// num_key_value_heads
    #[arg(long)]
    kv_heads: Option<usize>,
    /// intermediate_size
    #[arg(long)]
    ffn: Option<usize>,
    /// vocab_size
    #[arg(long)]
    vocab: Option<usize>,
    /// head_dim (default: hidden / heads when hidden or heads is given, else the preset's)
    #[arg(long)]
    head_dim: Option<usize>,
    /// Rayon threads for the forward passes (default: every core this process may use).
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    /// Prefill repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    prefill_runs: usize,
    /// Prompt tokens already in the KV cache of every sequence before decoding.
    #[arg(long, default_value_t = 32)]
    decode_prompt: usize,
    /// Timed decode steps per batch size (median reported).
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Untimed decode steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Size of the bandwidth probe's buffer, MiB (keep it far above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    bw_mib: usize,
    /// Bandwidth probe repetitions (best reported and used for the roofline).
    #[arg(long, default_value_t = 8)]
    bw_runs: usize,
    /// Also decode on the prototype skinny-GEMV backend (benches/src/gemv.rs) for batches up to
    /// --skinny-max-rows rows.
    #[arg(long)]
    compare_gemv: bool,
    /// Steps of each backend in the interleaved batch-1 comparison of --compare-gemv.
    #[arg(long, default_value_t = 32)]
    ab_steps: usize,
    /// Largest activation (rows) the prototype backend sends to the skinny GEMV.
    #[arg(long, default_value_t = 8)]
    skinny_max_rows: usize,
    /// Break decode steps down by operation (a timing wrapper around the backend; also around the
    /// prototype backend with --compare-gemv).
    #[arg(long)]
    profile: bool,
    /// Batch sizes of the --profile breakdown, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    profile_batches: Vec<usize>,
    /// Also decode through the engine (Engine::new + submit, greedy, ignore_eos) at each batch size.
    #[arg(long)]
    engine: bool,
    /// Print one JSON object on stdout (the human report goes to stderr).
    #[arg(long)]
    json: bool,
    /// Seed of the random weights and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run: cpu, or cuda / cuda:N for the CUDA measurements (dummy weights generated on
    /// the device; see autoglm_benches::cuda_e2e).
    #[arg(long, default_value = "cpu")]
    device: autoglm_core::Device,
    /// Take the model's shape from this config.json (overrides --params and the shape flags).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Decode batch sizes on CUDA, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    gpu_batches: Vec<usize>,
    /// On CUDA: products of at most this many rows (decode batches) take the GEMV kernel instead
    /// of cuBLAS (0, the backend's default: cuBLAS for all; at most 8).
    #[arg(long, default_value_t = 0)]
    cuda_gemv_max_rows: usize,
    /// Prompt length of the prefill measurement on CUDA.
    #[arg(long, default_value_t = 2048)]
    gpu_prefill_len: usize,
    /// Instead of the text model: time AutoGLM-Phone-9B's vision tower (random weights) on one
    /// image of `--vision-grid` patches (`--prefill-runs` times, median) and report its cost per full
    /// 1080x2400 screenshot.
    #[arg(long)]
    vision: bool,
    /// The image's patch grid for --vision, HxW (whole 2x2 blocks). On the CPU a reduced image:
    /// the full screenshot is 172x78 patches.
    #[arg(long, default_value = "16x8")]
    vision_grid: String,
}

/// `e2e --vision`: AutoGLM-Phone-9B's vision tower (24 blocks of width 1536, MLP 4096, merger
/// 13696 to 4096) on random weights, timed on one image of `--vision-grid` patches; then exit.
fn run_vision(args: &Args) -> ! {
    use autoglm_core::model::vision::VisionModel;
    use autoglm_core::model::VisionConfig;
    let fail = |e: String| -> ! {
        eprintln!("error: {e}");
        std::process::exit(2)
    };
    let (gh, gw) = args
        .vision_grid
        .split_once('x')
        .and_then(|(h, w)| Some((h.parse::<usize>().ok()?, w.parse::<usize>().ok()?)))
        .filter(|&(h, w)| h > 0 && w > 0 && h % 2 == 0 && w % 2 == 0)
        .unwrap_or_else(|| {
            fail(format!(
                "--vision-grid {:?}: expected HxW of even numbers",
                args.vision_grid
            ))
        });
    let config = VisionConfig {
        depth: 24,
        hidden_size: 1536,
        num_heads: 12,
        intermediate_size: 13696,
        out_hidden_size: 4096,
        image_size: 336,
        patch_size: 14,
        in_channels: 3,
        spatial_merge_size: 2,
        temporal_patch_size: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        image_token_id: 151343,
        image_start_token_id: 151339,
        image_end_token_id: 151340,
    };
    let machine = Machine::detect();
    let full = 172 * 78;
    let weights = RandomWeights {
        seed: args.seed,
        ..Default::default()
    };
    let backend = CpuBackend::new();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(machine.cores).max(1))
        .build()
        .expect("rayon pool");
    let t0 = Instant::now();
    let tower = pool
        .install(|| VisionModel::from_source(&config, &weights, &backend))
        .unwrap_or_else(|e| fail(e.to_string()));
    let load_s = t0.elapsed().as_secs_f64();
    let batch = tower
        .batch(&[[gh, gw]])
        .unwrap_or_else(|e| fail(e.to_string()));
    let pixels: Vec<f32> = (0..gh * gw * config.patch_dim())
        .map(|i| ((i % 97) as f32 - 48.0) / 48.0)
        .collect();
    let encode = || {
        let t = Instant::now();
        let out = pool
            .install(|| tower.encode(&backend, &pixels, &batch))
            .unwrap_or_else(|e| fail(e.to_string()));
        drop(out);
        t.elapsed().as_secs_f64()
    };
    encode();
    let mut times: Vec<f64> = (0..args.prefill_runs.max(1)).map(|_| encode()).collect();
    let s = median(&mut times);
    let flops = config.flops(gh * gw);
    let rate = flops / s;
    let report = json!({
        "bench": "vision_tower",
        "shape": "AutoGLM-Phone-9B vision tower (random weights)",
        "machine": {"cpu": machine.cpu, "cores": machine.cores},
        "load_average": load_average(),
        "grid": [gh, gw],
        "patches": gh * gw,
        "weights_s": load_s,
        "encode_ms_median": s * 1e3,
        "encode_ms_all": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
        "gflop": flops / 1e9,
        "gflop_per_s": rate / 1e9,
        "full_screenshot_patches": full,
        "full_screenshot_tflop": config.flops(full) / 1e12,
        "full_screenshot_s_at_this_rate": config.flops(full) / rate,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "AutoGLM-Phone-9B vision tower, random weights, on {} ({} cores):\n  {gh}x{gw} patches: {:.1} ms median of {} ({:.1} GFLOP, {:.1} GFLOP/s)\n  a full 1080x2400 screenshot ({full} patches, {:.1} TFLOP) would take ~{:.0} s at that rate (attention grows faster than linearly; an estimate, not a measurement)",
            machine.cpu,
            machine.cores,
            s * 1e3,
            times.len(),
            flops / 1e9,
            rate / 1e9,
            config.flops(full) / 1e12,
            config.flops(full) / rate
        );
    }
    std::process::exit(0)
}

/// `e2e --device cuda[:N]`: the CUDA measurements, then exit.
fn run_cuda(args: &Args, ordinal: usize, config: &ModelConfig) -> ! {
    let out = Out { json: args.json };
    let bench = autoglm_benches::cuda_e2e::CudaBenchArgs {
        ordinal,
        prefill_len: args.gpu_prefill_len,
        prefill_runs: args.prefill_runs,
        decode_prompt: args.decode_prompt,
        decode_steps: args.decode_steps,
        warmup_steps: args.warmup_steps,
        batches: args.gpu_batches.clone(),
        gemv_max_rows: args.cuda_gemv_max_rows,
        bw_bytes: args.bw_mib << 20,
        seed: args.seed,
    };
    out.line(format!(
        "model: hidden {} layers {} heads {}/{} kv (head_dim {}) ffn {} vocab {}: {:.2}B parameters",
        config.hidden_size,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
        config.num_parameters() as f64 / 1e9
    ));
    match autoglm_benches::cuda_e2e::run(config, &bench, &|l| out.line(l)) {
        Ok(report) => {
            if args.json {
                println!("{report}");
            }
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}

/// Printing that goes to stdout, or to stderr when stdout carries the JSON.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, s: impl AsRef<str>) {
        if self.json {
            eprintln!("{}", s.as_ref());
        } else {
            println!("{}", s.as_ref());
        }
    }
}

/// Deterministic pseudo-random token ids.
struct Tokens(u64);

impl Tokens {
    fn take(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 33) % vocab as u64) as u32
            })
            .collect()
    }
}

fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

fn shape_from_args(a: &Args) -> Result<ModelShape, String> {
    let explicit = a.hidden.is_some() || a.layers.is_some() || a.heads.is_some();
    let base = match ModelShape::preset(&a.params) {
        Some(p) => p,
        None if explicit => ModelShape::preset("50M").expect("preset"),
        None => {
            return Err(format!(
                "unknown --params {:?} (presets: 50M, 300M)",
                a.params
            ))
        }
    };
    let hidden = a.hidden.unwrap_or(base.hidden);
    let heads = a.heads.unwrap_or(base.heads);
    let head_dim = match a.head_dim {
        Some(d) => d,
        None if a.hidden.is_some() || a.heads.is_some() => hidden / heads.max(1),
        None => base.head_dim,
    };
    Ok(ModelShape {
        hidden,
        layers: a.layers.unwrap_or(base.layers),
        heads,
        kv_heads: a.kv_heads.unwrap_or(base.kv_heads.min(heads)),
        ffn: a.ffn.unwrap_or(base.ffn),
        vocab: a.vocab.unwrap_or(base.vocab),
        head_dim,
    })
}

/// Prefill of one `len`-token sequence, `runs` times; seconds per run.
fn bench_prefill<B: Backend>(
    model: &GlmModel<B>,
    backend: &B,
    len: usize,
    runs: usize,
    toks: &mut Tokens,
) -> Vec<f64> {
    let blocks = len.div_ceil(BLOCK_SIZE);
    let mut cache = backend
        .alloc_kv_cache(model.kv_cache_shape(blocks, BLOCK_SIZE))
        .expect("kv cache");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let vocab = model.config().vocab_size;
    (0..runs)
        .map(|_| {
            let mut batch = ForwardBatch::new(blocks);
            batch.push_seq(&toks.take(len, vocab), 0, &table, BLOCK_SIZE);
            batch.logits_indices = vec![len as u32 - 1].into();
            let t = Instant::now();
            let logits = model
                .forward(backend, &batch, &mut cache)
                .expect("prefill forward");
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(logits);
            dt
        })
        .collect()
}

struct DecodeRun {
    batch: usize,
    /// Seconds of each timed step.
    steps: Vec<f64>,
    median_s: f64,
    min_s: f64,
    /// Cores other processes kept busy on average during the timed steps.
    other_cores: f64,
}

impl DecodeRun {
    fn tok_s(&self) -> f64 {
        self.batch as f64 / self.median_s
    }
}

/// A decode in progress: `batch` sequences whose `prompt` tokens were put in the cache by one
/// prefill forward; each [`Decoder::step`] runs one token per sequence (greedy on the logits).
struct Decoder<'m, B: Backend> {
    model: &'m GlmModel<B>,
    backend: &'m B,
    cache: B::KvCache,
    tables: Vec<Vec<u32>>,
    per_seq: usize,
    pos: usize,
    next: Vec<u32>,
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// Room for `max_steps` decode steps after the prompt.
    fn new(
        model: &'m GlmModel<B>,
        backend: &'m B,
        batch: usize,
        prompt: usize,
        max_steps: usize,
        toks: &mut Tokens,
    ) -> Self {
        let vocab = model.config().vocab_size;
        let per_seq = (prompt + max_steps + 1).div_ceil(BLOCK_SIZE);
        let mut cache = backend
            .alloc_kv_cache(model.kv_cache_shape(batch * per_seq, BLOCK_SIZE))
            .expect("kv cache");
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let mut fb = ForwardBatch::new(per_seq);
        for table in &tables {
            fb.push_seq(&toks.take(prompt, vocab), 0, table, BLOCK_SIZE);
        }
        fb.logits_indices = (1..=batch).map(|s| (s * prompt) as u32 - 1).collect();
        let logits = model
            .forward(backend, &fb, &mut cache)
            .expect("decode prompt forward");
        let next = argmax_rows(&logits, vocab);
        Decoder {
            model,
            backend,
            cache,
            tables,
            per_seq,
            pos: prompt,
            next,
        }
    }

    /// One decode step; returns the seconds `forward` took.
    fn step(&mut self) -> f64 {
        let mut fb = ForwardBatch::new(self.per_seq);
        for (s, table) in self.tables.iter().enumerate() {
            fb.push_seq(&[self.next[s]], self.pos, table, BLOCK_SIZE);
        }
        fb.logits_indices = (0..self.tables.len() as u32).collect();
        let t = Instant::now();
        let logits = self
            .model
            .forward(self.backend, &fb, &mut self.cache)
            .expect("decode forward");
        let dt = t.elapsed().as_secs_f64();
        self.next = argmax_rows(&logits, self.model.config().vocab_size);
        self.pos += 1;
        dt
    }
}

impl DecodeRun {
    fn from_times(batch: usize, times: Vec<f64>, other_cores: f64) -> Self {
        let min_s = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let median_s = median(&mut times.clone());
        DecodeRun {
            batch,
            steps: times,
            median_s,
            min_s,
            other_cores,
        }
    }
}

/// `warmup + steps` decode steps of `batch` sequences with a `prompt`-token context; the last
/// `steps` are timed (`on_timed_start` runs just before them).
#[allow(clippy::too_many_arguments)]
fn bench_decode<B: Backend>(
    model: &GlmModel<B>,
    backend: &B,
    batch: usize,
    prompt: usize,
    steps: usize,
    warmup: usize,
    toks: &mut Tokens,
    on_timed_start: &dyn Fn(),
) -> DecodeRun {
    let mut d = Decoder::new(model, backend, batch, prompt, warmup + steps, toks);
    for _ in 0..warmup {
        d.step();
    }
    on_timed_start();
    let usage = CpuUsage::now();
    let times: Vec<f64> = (0..steps).map(|_| d.step()).collect();
    DecodeRun::from_times(batch, times, usage.since().other_cores)
}

/// Batch-1 decode on two backends with their steps interleaved (A, B, A, B, ...), so that other
/// work on the machine slows both alike and the comparison stays fair.
#[allow(clippy::too_many_arguments)]
fn bench_decode_ab<A: Backend, B: Backend>(
    (model_a, backend_a): (&GlmModel<A>, &A),
    (model_b, backend_b): (&GlmModel<B>, &B),
    prompt: usize,
    steps: usize,
    warmup: usize,
    toks: &mut Tokens,
) -> (DecodeRun, DecodeRun) {
    let mut a = Decoder::new(model_a, backend_a, 1, prompt, warmup + steps, toks);
    let mut b = Decoder::new(model_b, backend_b, 1, prompt, warmup + steps, toks);
    for _ in 0..warmup {
        a.step();
        b.step();
    }
    let usage = CpuUsage::now();
    let (mut ta, mut tb) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        ta.push(a.step());
        tb.push(b.step());
    }
    let other = usage.since().other_cores;
    (
        DecodeRun::from_times(1, ta, other),
        DecodeRun::from_times(1, tb, other),
    )
}

struct EngineRun {
    batch: usize,
    /// Median time between a request's consecutive tokens, over all requests.
    median_itl_s: f64,
    /// Median time to first token.
    median_ttft_s: f64,
    /// Generated tokens / wall time from submission to the last token.
    throughput: f64,
}

/// `batch` requests submitted together to an engine; per-token timestamps from each stream.
fn bench_engine(
    engine: &Engine,
    batch: usize,
    prompt: usize,
    max_tokens: usize,
    toks: &mut Tokens,
) -> EngineRun {
    let vocab = engine.model_config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| toks.take(prompt, vocab)).collect();
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let t0 = Instant::now();
    let streams: Vec<_> = prompts
        .into_iter()
        .map(|p| engine.submit(p, params.clone()).expect("submit"))
        .collect();
    let per_request: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                s.spawn(move || {
                    let mut stamps = Vec::new();
                    let mut n = 0;
                    for ev in stream {
                        let ev = ev.expect("engine event");
                        if !ev.token_ids.is_empty() {
                            stamps.push(t0.elapsed().as_secs_f64());
                            n += ev.token_ids.len();
                        }
                    }
                    (stamps, n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("stream thread"))
            .collect()
    });
    let end = per_request
        .iter()
        .filter_map(|(s, _)| s.last().copied())
        .fold(0.0, f64::max);
    let total: usize = per_request.iter().map(|(_, n)| n).sum();
    let mut itl: Vec<f64> = per_request
        .iter()
        .flat_map(|(s, _)| s.windows(2).map(|w| w[1] - w[0]))
        .collect();
    let mut ttft: Vec<f64> = per_request
        .iter()
        .filter_map(|(s, _)| s.first().copied())
        .collect();
    EngineRun {
        batch,
        median_itl_s: median(&mut itl),
        median_ttft_s: median(&mut ttft),
        throughput: total as f64 / end,
    }
}

/// Per-step times of each operation over the timed steps of one decode run.
struct Profile {
    /// (operation, calls per step, ms per step, weight GB/s for linear layers).
    ops: Vec<(String, f64, f64, Option<f64>)>,
    /// Median step time, ms.
    step_ms: f64,
    /// Mean step time, ms (the op totals are sums, so compare them with the mean).
    mean_step_ms: f64,
    /// Cores other processes kept busy meanwhile.
    other_cores: f64,
}

impl Profile {
    fn new(stats: BTreeMap<String, OpTime>, run: &DecodeRun) -> Self {
        let steps = run.steps.len().max(1) as f64;
        let mut ops: Vec<(String, f64, f64, Option<f64>)> = stats
            .into_iter()
            .map(|(name, t)| {
                let per_step_s = t.secs / steps;
                // "linear NxK": N*K*4 weight bytes per call.
                let gbs = name.strip_prefix("linear ").and_then(|dims| {
                    let (n, k) = dims.split_once('x')?;
                    let bytes = n.parse::<f64>().ok()? * k.parse::<f64>().ok()? * 4.0;
                    Some(bytes * t.calls as f64 / t.secs / 1e9)
                });
                (name, t.calls as f64 / steps, per_step_s * 1e3, gbs)
            })
            .collect();
        ops.sort_by(|a, b| b.2.total_cmp(&a.2));
        let mean = run.steps.iter().sum::<f64>() / steps;
        Profile {
            ops,
            step_ms: run.median_s * 1e3,
            mean_step_ms: mean * 1e3,
            other_cores: run.other_cores,
        }
    }

    fn json(&self) -> Value {
        Value::Array(
            self.ops
                .iter()
                .map(|(name, calls, ms, gbs)| {
                    json!({"op": name, "calls_per_step": calls, "ms_per_step": ms, "weight_gb_s": gbs})
                })
                .collect(),
        )
    }
}

fn gb(x: f64) -> f64 {
    x / 1e9
}

fn ms(x: f64) -> f64 {
    x * 1e3
}

fn config_json(c: &ModelConfig) -> Value {
    json!({
        "architecture": c.architecture.name(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_layers": c.num_layers,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rotary_dim": c.rotary_dim,
        "vocab_size": c.vocab_size,
        "attention_bias": c.attention_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
    })
}

fn decode_json(runs: &[DecodeRun], roofline_s: f64) -> Value {
    Value::Array(
        runs.iter()
            .map(|r| {
                json!({
                    "batch": r.batch,
                    "median_step_ms": ms(r.median_s),
                    "min_step_ms": ms(r.min_s),
                    "steps": r.steps.len(),
                    "tok_per_s": r.tok_s(),
                    "step_over_roofline": r.median_s / roofline_s,
                    "other_processes_cores": r.other_cores,
                })
            })
            .collect(),
    )
}

fn main() {
    let args = Args::parse();
    if args.vision {
        if args.device != autoglm_core::Device::Cpu {
            eprintln!("error: --vision runs on the CPU (the CUDA tower is checked by tests/cuda_fixtures.rs)");
            std::process::exit(2);
        }
        run_vision(&args);
    }
    let out = Out { json: args.json };
    let shape = match shape_from_args(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let config = match &args.config {
        Some(path) => ModelConfig::from_file(path),
        None => shape.config(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid model shape {shape:?}: {e}");
            std::process::exit(2);
        }
    };
    match args.device {
        autoglm_core::Device::Cuda(n) => run_cuda(&args, n, &config),
        autoglm_core::Device::Auto => {
            eprintln!("error: --device auto is not a benchmark target; use cpu or cuda[:N]");
            std::process::exit(2);
        }
        autoglm_core::Device::Cpu => {}
    }
    let machine = Machine::detect();
    let threads = args.threads.unwrap_or(machine.cores).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool");
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("rayon pool");
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();

    let load_start = load_average();
    let usage_start = CpuUsage::now();
    let params = config.num_parameters();
    let params_read = params_read_per_decode_step(&config);
    let weight_bytes = params * 4;
    let read_bytes = params_read * 4;
    out.line(format!("autoglm e2e benchmark  ({date})"));
    out.line(format!(
        "machine: {}, {} cores, {:.1} GiB RAM; rayon threads: {threads}",
        machine.cpu,
        machine.cores,
        machine.mem_bytes as f64 / (1u64 << 30) as f64
    ));
    out.line(format!(
        "model: Glm4 random weights, hidden {} layers {} heads {}/{} kv (head_dim {}, rotary {}) ffn {} vocab {}, qkv bias, untied head",
        config.hidden_size,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.rotary_dim,
        config.intermediate_size,
        config.vocab_size
    ));
    out.line(format!(
        "parameters: {params} ({:.1}M), f32 weights {:.1} MiB; read per decode step (all but the embedding table): {params_read}",
        params as f64 / 1e6,
        weight_bytes as f64 / (1u64 << 20) as f64
    ));

    // (a) bandwidth, before the model takes memory.
    let bw_bytes = args.bw_mib << 20;
    let bw: Bandwidth = pool.install(|| memory_bandwidth(bw_bytes, args.bw_runs));
    let bw1: Bandwidth = one.install(|| memory_bandwidth(bw_bytes, args.bw_runs));
    drop(one);
    out.line(format!(
        "memory read bandwidth ({} MiB, best of {} runs x {:?} streams per task): {:.2} GB/s with {threads} threads \
         ({} streams; median {:.2}; one stream per task {:.2}); {:.2} GB/s with 1 thread (one stream {:.2})",
        args.bw_mib,
        bw.runs,
        PROBE_STREAMS,
        gb(bw.best),
        bw.best_streams,
        gb(bw.median),
        gb(bw.single_stream),
        gb(bw1.best),
        gb(bw1.single_stream)
    ));

    let t = Instant::now();
    let weights = RandomWeights {
        seed: args.seed,
        scale: 0.05,
    };
    let backend = CpuBackend::new();
    let model = pool
        .install(|| GlmModel::from_source(config.clone(), &weights, &backend))
        .expect("build model");
    out.line(format!(
        "built the model in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let mut toks = Tokens(args.seed ^ 0x5eed);

    // (b) prefill.
    let mut prefill = pool.install(|| {
        bench_prefill(
            &model,
            &backend,
            args.prefill_len,
            args.prefill_runs.max(1),
            &mut toks,
        )
    });
    let prefill_min = prefill.iter().cloned().fold(f64::INFINITY, f64::min);
    let prefill_med = median(&mut prefill);
    let prefill_tok_s = args.prefill_len as f64 / prefill_med;
    let prefill_gflops = 2.0 * params_read as f64 * args.prefill_len as f64 / prefill_med / 1e9;

    // (c) decode.
    let decode: Vec<DecodeRun> = args
        .batches
        .iter()
        .map(|&b| {
            pool.install(|| {
                bench_decode(
                    &model,
                    &backend,
                    b,
                    args.decode_prompt,
                    args.decode_steps,
                    args.warmup_steps,
                    &mut toks,
                    &|| {},
                )
            })
        })
        .collect();

    // (d) roofline.
    let roofline_s = weight_bytes as f64 / bw.best;
    let roofline_read_s = read_bytes as f64 / bw.best;
    let b1 = decode.iter().find(|r| r.batch == 1);

    // Optional: prototype skinny GEMV backend.
    let mut proto_runs = Vec::new();
    let mut ab: Option<(DecodeRun, DecodeRun)> = None;
    if args.compare_gemv {
        let pb = ProtoBackend::new(args.skinny_max_rows);
        let t = Instant::now();
        let pmodel = pool
            .install(|| GlmModel::from_source(config.clone(), &weights, &pb))
            .expect("build proto model");
        out.line(format!(
            "built the prototype-GEMV model in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        for &b in &args.batches {
            proto_runs.push(pool.install(|| {
                bench_decode(
                    &pmodel,
                    &pb,
                    b,
                    args.decode_prompt,
                    args.decode_steps,
                    args.warmup_steps,
                    &mut toks,
                    &|| {},
                )
            }));
        }
        ab = Some(pool.install(|| {
            bench_decode_ab(
                (&model, &backend),
                (&pmodel, &pb),
                args.decode_prompt,
                args.ab_steps,
                args.warmup_steps,
                &mut toks,
            )
        }));
    }

    // Optional: per-operation breakdown of decode steps (TimedBackend around each backend).
    let mut profiles: Vec<(String, usize, Profile)> = Vec::new();
    if args.profile {
        for &b in &args.profile_batches {
            let tb = TimedBackend::new(CpuBackend::new());
            let tmodel = pool
                .install(|| GlmModel::from_source(config.clone(), &weights, &tb))
                .expect("build timed model");
            let run = pool.install(|| {
                bench_decode(
                    &tmodel,
                    &tb,
                    b,
                    args.decode_prompt,
                    args.decode_steps,
                    args.warmup_steps,
                    &mut toks,
                    &|| drop(tb.take()),
                )
            });
            profiles.push(("cpu (matmul_nt)".into(), b, Profile::new(tb.take(), &run)));
            drop(tmodel);
            if args.compare_gemv {
                let tb = TimedBackend::new(ProtoBackend::new(args.skinny_max_rows));
                let tmodel = pool
                    .install(|| GlmModel::from_source(config.clone(), &weights, &tb))
                    .expect("build timed model");
                let run = pool.install(|| {
                    bench_decode(
                        &tmodel,
                        &tb,
                        b,
                        args.decode_prompt,
                        args.decode_steps,
                        args.warmup_steps,
                        &mut toks,
                        &|| drop(tb.take()),
                    )
                });
                profiles.push(("skinny GEMV".into(), b, Profile::new(tb.take(), &run)));
            }
        }
    }

    // Optional: the engine (scheduler, sampler, streams) around the same model.
    let mut engine_runs = Vec::new();
    if args.engine {
        let max_b = args.batches.iter().copied().max().unwrap_or(1);
        let per_seq =
            (args.decode_prompt + args.warmup_steps + args.decode_steps + 2).div_ceil(BLOCK_SIZE);
        let cfg = EngineConfig {
            cache: CacheConfig {
                block_size: BLOCK_SIZE,
                num_blocks: Some(max_b * per_seq + 8),
                ..CacheConfig::default()
            },
            scheduler: SchedulerConfig {
                max_num_seqs: max_b,
                ..SchedulerConfig::default()
            },
            threading: ThreadingConfig {
                num_threads: Some(threads),
                ..ThreadingConfig::default()
            },
            seed: args.seed,
            ..EngineConfig::default()
        };
        let engine = Engine::new(CpuBackend::new(), model, None, cfg).expect("engine");
        for &b in &args.batches {
            let max_tokens = args.warmup_steps + args.decode_steps + 1;
            engine_runs.push(bench_engine(
                &engine,
                b,
                args.decode_prompt,
                max_tokens,
                &mut toks,
            ));
        }
    } else {
        drop(model);
    }

    // Report.
    let load_end = load_average();
    let run_usage = usage_start.since();
    let fmt_load = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
    out.line("");
    out.line(format!(
        "load average (1 min) at start {} / end {}; over the whole run other processes kept {:.2} cores busy \
         on average (this one {:.2}, hypervisor steal {:.2}): figures taken while other work ran are low",
        fmt_load(load_start),
        fmt_load(load_end),
        run_usage.other_cores,
        run_usage.own_cores,
        run_usage.steal_cores
    ));
    out.line(format!(
        "prefill: {} tokens, one sequence, median of {}",
        args.prefill_len,
        args.prefill_runs.max(1)
    ));
    out.line(format!(
        "  {:.1} ms  ->  {:.1} tok/s  ({:.1} GFLOP/s on the weight GEMMs; best run {:.1} ms)",
        ms(prefill_med),
        prefill_tok_s,
        prefill_gflops,
        ms(prefill_min)
    ));
    out.line("");
    out.line(format!(
        "decode: {} prompt tokens per sequence in the KV cache, {} warm-up + {} timed steps, median step",
        args.decode_prompt, args.warmup_steps, args.decode_steps
    ));
    out.line(format!(
        "  {:>5}  {:>10}  {:>10}  {:>10}  {:>12}  {:>11}",
        "batch", "step ms", "min ms", "tok/s", "x roofline", "other cores"
    ));
    for r in &decode {
        out.line(format!(
            "  {:>5}  {:>10.2}  {:>10.2}  {:>10.1}  {:>12.2}  {:>11.2}",
            r.batch,
            ms(r.median_s),
            ms(r.min_s),
            r.tok_s(),
            r.median_s / roofline_s,
            r.other_cores
        ));
    }
    if !proto_runs.is_empty() {
        out.line(format!(
            "decode on the prototype skinny-GEMV backend (linear with <= {} rows -> benches/src/gemv.rs, else matmul_nt):",
            args.skinny_max_rows
        ));
        out.line(format!(
            "  {:>5}  {:>10}  {:>10}  {:>10}  {:>12}  {:>11}",
            "batch", "step ms", "min ms", "tok/s", "x roofline", "other cores"
        ));
        for r in &proto_runs {
            out.line(format!(
                "  {:>5}  {:>10.2}  {:>10.2}  {:>10.1}  {:>12.2}  {:>11.2}",
                r.batch,
                ms(r.median_s),
                ms(r.min_s),
                r.tok_s(),
                r.median_s / roofline_s,
                r.other_cores
            ));
        }
    }
    if let Some((a, b)) = &ab {
        out.line(format!(
            "batch-1 decode, CpuBackend (matmul_nt) and skinny-GEMV steps interleaved ({} each; other processes {:.2} cores):",
            a.steps.len(),
            a.other_cores
        ));
        out.line(format!(
            "  matmul_nt {:>8.2} ms (min {:.2}) = {:.2}x roofline   skinny {:>8.2} ms (min {:.2}) = {:.2}x roofline   speed-up {:.2}x",
            ms(a.median_s),
            ms(a.min_s),
            a.median_s / roofline_s,
            ms(b.median_s),
            ms(b.min_s),
            b.median_s / roofline_s,
            a.median_s / b.median_s
        ));
    }
    if !engine_runs.is_empty() {
        out.line("decode through the engine (submit + stream, greedy, ignore_eos; ITL = time between a request's tokens):");
        out.line(format!(
            "  {:>5}  {:>12}  {:>10}  {:>10}  {:>14}",
            "batch", "median ITL ms", "tok/s", "TTFT ms", "out tok/s (wall)"
        ));
        for r in &engine_runs {
            out.line(format!(
                "  {:>5}  {:>12.2}  {:>10.1}  {:>10.1}  {:>14.1}",
                r.batch,
                ms(r.median_itl_s),
                r.batch as f64 / r.median_itl_s,
                ms(r.median_ttft_s),
                r.throughput
            ));
        }
    }
    for (name, b, p) in &profiles {
        let total: f64 = p.ops.iter().map(|o| o.2).sum();
        out.line(format!(
            "decode step breakdown, batch {b}, {name}: mean step {:.2} ms (median {:.2}); ops below sum to {:.2} ms; other processes {:.2} cores",
            p.mean_step_ms, p.step_ms, total, p.other_cores
        ));
        out.line(format!(
            "  {:<22} {:>9} {:>10} {:>7} {:>14}",
            "op", "calls", "ms/step", "share", "weights GB/s"
        ));
        for (op, calls, ms, gbs) in &p.ops {
            out.line(format!(
                "  {:<22} {:>9.0} {:>10.2} {:>6.1}% {:>14}",
                op,
                calls,
                ms,
                100.0 * ms / p.mean_step_ms,
                gbs.map_or(String::new(), |g| format!("{g:.2}"))
            ));
        }
    }
    out.line("");
    out.line("roofline (decode reads every weight once per step; CPU backend stores f32):");
    out.line(format!(
        "  weight bytes per step: {:.1} MiB (num_parameters x 4) / {:.2} GB/s = {:.2} ms  ->  {:.1} tok/s at batch 1",
        weight_bytes as f64 / (1u64 << 20) as f64,
        gb(bw.best),
        ms(roofline_s),
        1.0 / roofline_s
    ));
    out.line(format!(
        "  strict (without the embedding table, which a step reads one row of): {:.1} MiB -> {:.2} ms",
        read_bytes as f64 / (1u64 << 20) as f64,
        ms(roofline_read_s)
    ));
    let mut verdict = Value::Null;
    if let Some(b1) = b1 {
        let ratio = b1.median_s / roofline_s;
        let ratio_strict = b1.median_s / roofline_read_s;
        let ok = ratio <= 2.0;
        out.line("  ================================================================");
        out.line(format!(
            "  BATCH-1 DECODE: {:.2} ms/step = {:.2}x the roofline ({:.2}x strict); target <= 2x: {}",
            ms(b1.median_s),
            ratio,
            ratio_strict,
            if ok { "MET" } else { "NOT MET" }
        ));
        out.line(format!(
            "  effective bandwidth at batch 1: {:.2} GB/s of {:.2} GB/s; other processes kept {:.2} cores busy meanwhile",
            gb(read_bytes as f64 / b1.median_s),
            gb(bw.best),
            b1.other_cores
        ));
        if let Some(p1) = proto_runs.iter().find(|r| r.batch == 1) {
            out.line(format!(
                "  with the prototype skinny GEMV: {:.2} ms/step = {:.2}x the roofline ({:.2}x strict)",
                ms(p1.median_s),
                p1.median_s / roofline_s,
                p1.median_s / roofline_read_s
            ));
        }
        out.line("  ================================================================");
        verdict = json!({
            "median_step_ms": ms(b1.median_s),
            "ratio_to_roofline": ratio,
            "ratio_to_strict_roofline": ratio_strict,
            "target": 2.0,
            "other_processes_cores": b1.other_cores,
            "met": ok,
        });
    }

    if args.json {
        let obj = json!({
            "date": date,
            "machine": {"cpu": machine.cpu, "cores": machine.cores, "mem_bytes": machine.mem_bytes},
            "threads": threads,
            "loadavg_1min": {"start": load_start, "end": load_end},
            "contention": {
                "other_processes_cores": run_usage.other_cores,
                "own_cores": run_usage.own_cores,
                "steal_cores": run_usage.steal_cores,
            },
            "model": config_json(&config),
            "num_parameters": params,
            "params_read_per_decode_step": params_read,
            "weight_bytes": weight_bytes,
            "bandwidth": {
                "buffer_bytes": bw.bytes,
                "runs": bw.runs,
                "streams_tried": PROBE_STREAMS,
                "best_gb_s": gb(bw.best),
                "best_streams": bw.best_streams,
                "median_gb_s": gb(bw.median),
                "single_stream_gb_s": gb(bw.single_stream),
                "one_thread_best_gb_s": gb(bw1.best),
                "one_thread_single_stream_gb_s": gb(bw1.single_stream),
            },
            "prefill": {
                "tokens": args.prefill_len,
                "runs": args.prefill_runs.max(1),
                "median_ms": ms(prefill_med),
                "min_ms": ms(prefill_min),
                "tok_per_s": prefill_tok_s,
                "gflop_per_s": prefill_gflops,
            },
            "decode": {
                "prompt_tokens": args.decode_prompt,
                "warmup_steps": args.warmup_steps,
                "timed_steps": args.decode_steps,
                "runs": decode_json(&decode, roofline_s),
                "skinny_gemv_runs": decode_json(&proto_runs, roofline_s),
                "batch1_interleaved": ab.as_ref().map(|(a, b)| json!({
                    "steps": a.steps.len(),
                    "other_processes_cores": a.other_cores,
                    "matmul_nt_median_ms": ms(a.median_s),
                    "matmul_nt_min_ms": ms(a.min_s),
                    "matmul_nt_over_roofline": a.median_s / roofline_s,
                    "skinny_median_ms": ms(b.median_s),
                    "skinny_min_ms": ms(b.min_s),
                    "skinny_over_roofline": b.median_s / roofline_s,
                    "speedup": a.median_s / b.median_s,
                })),
                "skinny_max_rows": if args.compare_gemv { json!(args.skinny_max_rows) } else { Value::Null },
            },
            "profile": Value::Array(profiles.iter().map(|(name, b, p)| json!({
                "backend": name,
                "batch": b,
                "median_step_ms": p.step_ms,
                "mean_step_ms": p.mean_step_ms,
                "other_processes_cores": p.other_cores,
                "ops": p.json(),
            })).collect()),
            "engine": Value::Array(engine_runs.iter().map(|r| json!({
                "batch": r.batch,
                "median_itl_ms": ms(r.median_itl_s),
                "tok_per_s": r.batch as f64 / r.median_itl_s,
                "median_ttft_ms": ms(r.median_ttft_s),
                "wall_out_tok_per_s": r.throughput,
            })).collect()),
            "roofline": {
                "bytes_per_step": weight_bytes,
                "ms_per_step": ms(roofline_s),
                "strict_bytes_per_step": read_bytes,
                "strict_ms_per_step": ms(roofline_read_s),
                "batch1": verdict,
            },
        });
        println!("{obj}");
    }
}
