//! CPU weight formats side by side on one checkpoint: prefill tok/s, decode tok/s at batch 1 and
//! 8, load time and peak RSS, per format, with llama.cpp's `llama-bench` beside them when it is
//! installed (issue 18's comparison).
//!
//! ```text
//! cargo run --release -p autoglm-benches --bin cpu_formats -- --shape 1.45B --rounds 3
//! cargo run --release -p autoglm-benches --bin cpu_formats -- --shape 9B --formats bf16 --rounds 1 --batches 1
//! ```
//!
//! The checkpoint is a random-weight GLM-4-0414-shaped model written once in bf16 as a
//! safetensors file under `--dir` (streamed tensor by tensor, so a 9B shape needs no 18.8 GB in
//! memory). Each measurement runs in a fresh child process (this program with `--one FORMAT`), so
//! each format's peak RSS (`VmHWM`) is its own; the formats alternate within each round and the
//! medians over the rounds are reported, with the CPU time other processes used meanwhile (this
//! machine may be shared).
//!
//! Formats: `bf16` (the checkpoint's matrices used as they are stored, memory-mapped: the default
//! of the CPU backend), `f32` (`CpuBackend::widening()`, every tensor widened to f32 at load: what
//! autoglm did before). llama.cpp: `llama-bench` from `$LLAMA_BENCH`, `$PATH` or
//! `$LLAMA_CPP_DIR/build/bin`, run on `--gguf FILE` (convert the same checkpoint with llama.cpp's
//! `convert_hf_to_gguf.py`; building llama.cpp is the user's business); without them the table
//! says it was not found and where it looked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use autoglm_benches::{median, CpuUsage, Machine, ModelShape};
use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::backend::Backend;
use autoglm_core::model::{GlmModel, RandomWeights, WeightSource};
use autoglm_core::runner::ForwardBatch;
use clap::Parser;
use serde_json::{json, Value};

const BLOCK: usize = 16;

#[derive(Parser, Debug)]
#[command(about = "CPU weight formats side by side (prefill, decode at batch 1 and 8, peak RSS)")]
struct Args {
    /// Model shape preset: 50M, 300M, 1.45B, 9B.
    #[arg(long, default_value = "1.45B")]
    shape: String,
    /// Formats to compare, comma-separated: bf16, f32.
    #[arg(long, value_delimiter = ',', default_value = "bf16,f32")]
    formats: Vec<String>,
    /// Rounds (each runs every format once, alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Prompt tokens of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Timed decode steps per batch size (after 2 untimed ones).
    #[arg(long, default_value_t = 12)]
    decode_steps: usize,
    /// Context already in the cache of each decoding sequence.
    #[arg(long, default_value_t = 64)]
    decode_prompt: usize,
    /// Threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the checkpoint is written (kept for later runs; remove it to regenerate).
    #[arg(long, default_value = "/tmp/autoglm-cpu-formats")]
    dir: PathBuf,
    /// A GGUF file of the same model for llama.cpp's llama-bench.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure one format in this process and print one JSON line.
    #[arg(long, hide = true)]
    one: Option<String>,
}

fn main() {
    let args = Args::parse();
    let shape = match ModelShape::preset(&args.shape) {
        Some(s) => s,
        None => {
            eprintln!(
                "error: unknown --shape {:?} (50M, 300M, 1.45B, 9B)",
                args.shape
            );
            std::process::exit(2);
        }
    };
    let config = shape.config().expect("preset config");
    let dir = args.dir.join(args.shape.to_ascii_lowercase());
    if let Some(format) = &args.one {
        match measure(&args, &dir, format) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Err(e) = write_checkpoint(&dir, &shape) {
        eprintln!("error: writing the checkpoint under {}: {e}", dir.display());
        std::process::exit(1);
    }
    let machine = Machine::detect();
    println!(
        "machine: {} ({} cores, {:.1} GiB); CPU flags: {}",
        machine.cpu,
        machine.cores,
        machine.mem_bytes as f64 / (1u64 << 30) as f64,
        cpu_flags()
    );
    println!(
        "model: {} shape, {:.2}B parameters, bf16 checkpoint {} ({:.2} GB); prefill {} tokens, decode {} steps at batches {:?} ({} tokens of context)",
        args.shape,
        config.num_parameters() as f64 / 1e9,
        dir.display(),
        2.0 * config.num_parameters() as f64 / 1e9,
        args.prefill_len,
        args.decode_steps,
        args.batches,
        args.decode_prompt
    );
    let exe = std::env::current_exe().expect("own executable");
    let mut runs: Vec<(String, Value)> = Vec::new();
    for round in 0..args.rounds.max(1) {
        for format in &args.formats {
            let mut cmd = Command::new(&exe);
            cmd.args(std::env::args().skip(1)).args(["--one", format]);
            let out = cmd.output().expect("run a child");
            if !out.status.success() {
                eprintln!(
                    "error: {format} (round {round}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::process::exit(1);
            }
            let v: Value = serde_json::from_slice(&out.stdout).expect("child JSON");
            println!("round {round} {format}: {v}");
            runs.push((format.clone(), v));
        }
    }
    let llama = llama_bench(&args);
    report(&args, &runs, &llama);
}

fn cpu_flags() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = text
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("")
        .to_string();
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_bf16",
        "avx512_vnni",
        "avx_vnni",
        "amx_bf16",
        "amx_int8",
    ];
    let have: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    have.join(" ")
}

/// Writes `dir/config.json` and `dir/model.safetensors` (bf16) unless they exist for this shape.
fn write_checkpoint(dir: &Path, shape: &ModelShape) -> std::io::Result<()> {
    let st = dir.join("model.safetensors");
    let cfg_path = dir.join("config.json");
    let config_json = json!({
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        "attention_bias": true,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "eos_token_id": [0],
    });
    if st.exists()
        && std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            == Some(config_json.clone())
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let t = Instant::now();
    let (h, q, kv) = (
        shape.hidden,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![shape.vocab, h])];
    for i in 0..shape.layers {
        let p = format!("model.layers.{i}");
        for (name, dims) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("post_self_attn_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_up_proj.weight", vec![2 * shape.ffn, h]),
            ("mlp.down_proj.weight", vec![h, shape.ffn]),
            ("post_mlp_layernorm.weight", vec![h]),
        ] {
            tensors.push((format!("{p}.{name}"), dims));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![shape.vocab, h]));
    // The safetensors layout, streamed: u64 header length, the JSON header (padded with spaces to
    // 8 bytes), then each tensor's bytes in header order.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dims) in &tensors {
        let bytes = 2 * dims.iter().product::<usize>();
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": dims, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).expect("header");
    let pad = (8 - text.len() % 8) % 8;
    text.push_str(&" ".repeat(pad));
    let tmp = dir.join("model.safetensors.partial");
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())?;
    let src = RandomWeights {
        seed: 18,
        scale: 0.05,
    };
    for (name, dims) in &tensors {
        let t = src
            .tensor(name, dims)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // Norm weights near 1 (as trained models have), the rest as generated.
        let norm = name.ends_with("norm.weight");
        let mut buf = Vec::with_capacity(2 * t.data.len());
        for &x in t.data.iter() {
            let v = if norm { 1.0 + x } else { x };
            buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    drop(f);
    std::fs::rename(&tmp, &st)?;
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config_json).expect("config"),
    )?;
    eprintln!(
        "wrote {} ({:.2} GB) in {:.1} s",
        st.display(),
        offset as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Tokens(u64);
impl Tokens {
    fn take(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % vocab as u64) as u32
            })
            .collect()
    }
}

fn measure(args: &Args, dir: &Path, format: &str) -> autoglm_core::Result<Value> {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let backend = match format {
        "bf16" => CpuBackend::new(),
        "f32" => CpuBackend::widening(),
        other => {
            return Err(autoglm_core::Error::InvalidRequest(format!(
                "unknown format {other:?} (bf16, f32)"
            )))
        }
    };
    let rss_start = vm_kib("VmRSS:");
    let usage = CpuUsage::now();
    let t = Instant::now();
    let model = pool.install(|| GlmModel::load(dir, &backend))?;
    let load_s = t.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    let mut toks = Tokens(0x5eed);

    // Prefill: one sequence, a warm-up and two timed runs.
    let n = args.prefill_len;
    let blocks = n.div_ceil(BLOCK);
    let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(blocks, BLOCK))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut prefill = Vec::new();
    for run in 0..3 {
        let mut b = ForwardBatch::new(blocks);
        b.push_seq(&toks.take(n, vocab), 0, &table, BLOCK);
        b.logits_indices = vec![n as u32 - 1].into();
        let t = Instant::now();
        pool.install(|| model.forward(&backend, &b, &mut cache))?;
        if run > 0 {
            prefill.push(t.elapsed().as_secs_f64());
        }
    }
    drop(cache);
    let prefill_s = median(&mut prefill);

    let mut decode = serde_json::Map::new();
    for &bsz in &args.batches {
        let steps = 2 + args.decode_steps;
        let per_seq = (args.decode_prompt + steps + 1).div_ceil(BLOCK);
        let mut cache = backend.alloc_kv_cache(model.kv_cache_shape(bsz * per_seq, BLOCK))?;
        let tables: Vec<Vec<u32>> = (0..bsz)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let mut fb = ForwardBatch::new(per_seq);
        for t in &tables {
            fb.push_seq(&toks.take(args.decode_prompt, vocab), 0, t, BLOCK);
        }
        fb.logits_indices = vec![0].into();
        pool.install(|| model.forward(&backend, &fb, &mut cache))?;
        let mut times = Vec::new();
        for step in 0..steps {
            let mut fb = ForwardBatch::new(per_seq);
            let next = toks.take(bsz, vocab);
            for (s, t) in tables.iter().enumerate() {
                fb.push_seq(&next[s..=s], args.decode_prompt + step, t, BLOCK);
            }
            fb.logits_indices = (0..bsz as u32).collect();
            let t = Instant::now();
            pool.install(|| model.forward(&backend, &fb, &mut cache))?;
            if step >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let med = median(&mut times);
        decode.insert(
            bsz.to_string(),
            json!({"step_ms": med * 1e3, "tok_s": bsz as f64 / med}),
        );
    }
    Ok(json!({
        "format": format,
        "threads": threads,
        "load_s": load_s,
        "prefill_tok_s": n as f64 / prefill_s,
        "decode": decode,
        "rss_start_mib": rss_start as f64 / 1024.0,
        "peak_rss_mib": vm_kib("VmHWM:") as f64 / 1024.0,
        // Cores other processes kept busy while this one measured.
        "other_cores": usage.since().other_cores,
    }))
}

/// llama.cpp's llama-bench on `--gguf`, when both are there: its JSON, or why not.
fn llama_bench(args: &Args) -> Value {
    let mut looked = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LLAMA_BENCH") {
        candidates.push(p.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("llama-bench")));
    }
    if let Some(d) = std::env::var_os("LLAMA_CPP_DIR") {
        candidates.push(PathBuf::from(d).join("build/bin/llama-bench"));
    }
    let exe = candidates.into_iter().find(|p| {
        looked.push(p.display().to_string());
        p.is_file()
    });
    let (Some(exe), Some(gguf)) = (exe, args.gguf.as_ref()) else {
        return json!({
            "status": "not run",
            "why": if args.gguf.is_none() { "no --gguf file given" } else { "llama-bench not found" },
            "looked_in": "$LLAMA_BENCH, $PATH, $LLAMA_CPP_DIR/build/bin",
        });
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let out = Command::new(&exe)
        .arg("-m")
        .arg(gguf)
        .args([
            "-p",
            &args.prefill_len.to_string(),
            "-n",
            &args.decode_steps.to_string(),
        ])
        .args(["-t", &threads.to_string(), "-o", "json"])
        .output();
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| json!({"status": "unreadable output", "error": e.to_string()})),
        Ok(o) => json!({"status": "failed", "stderr": String::from_utf8_lossy(&o.stderr)}),
        Err(e) => json!({"status": "failed", "error": e.to_string()}),
    }
}

fn report(args: &Args, runs: &[(String, Value)], llama: &Value) {
    println!();
    let mut head = String::from("| format | load s | prefill tok/s |");
    for b in &args.batches {
        head.push_str(&format!(" decode tok/s, batch {b} |"));
    }
    head.push_str(" peak RSS MiB | other processes (cores) |");
    println!("{head}");
    println!("{}", "|---".repeat(4 + args.batches.len() + 1) + "|");
    let mut summary = Vec::new();
    for format in &args.formats {
        let rs: Vec<&Value> = runs
            .iter()
            .filter(|r| &r.0 == format)
            .map(|r| &r.1)
            .collect();
        let med =
            |f: &dyn Fn(&Value) -> f64| median(&mut rs.iter().map(|v| f(v)).collect::<Vec<_>>());
        let mut row = format!(
            "| {format} | {:.2} | {:.1} |",
            med(&|v| v["load_s"].as_f64().unwrap_or(f64::NAN)),
            med(&|v| v["prefill_tok_s"].as_f64().unwrap_or(f64::NAN))
        );
        let mut dec = serde_json::Map::new();
        for b in &args.batches {
            let key = b.to_string();
            let t = med(&|v| v["decode"][&key]["tok_s"].as_f64().unwrap_or(f64::NAN));
            row.push_str(&format!(" {t:.2} |"));
            dec.insert(key, json!(t));
        }
        let noise: Vec<f64> = rs
            .iter()
            .map(|v| v["other_cores"].as_f64().unwrap_or(0.0))
            .collect();
        row.push_str(&format!(
            " {:.0} | {:.2}-{:.2} |",
            med(&|v| v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)),
            noise.iter().cloned().fold(f64::INFINITY, f64::min),
            noise.iter().cloned().fold(0.0, f64::max)
        ));
        println!("{row}");
        summary.push(
            json!({"format": format, "runs": rs.len(), "decode_tok_s": dec,
            "prefill_tok_s": med(&|v| v["prefill_tok_s"].as_f64().unwrap_or(f64::NAN)),
            "peak_rss_mib": med(&|v| v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN))}),
        );
    }
    println!(
        "(medians of {} rounds; formats alternate within each round)",
        args.rounds
    );
    println!("llama.cpp llama-bench: {llama}");
    if let Some(path) = &args.json {
        let all = json!({"shape": args.shape, "summary": summary, "runs": runs.iter().map(|r| &r.1).collect::<Vec<_>>(), "llama_bench": llama});
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&all).expect("json")) {
            eprintln!("error: writing {}: {e}", path.display());
        }
    }
}
