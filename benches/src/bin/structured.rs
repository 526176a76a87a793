//! What structured output costs a batch: decode throughput of 32 streams, all free, against the
//! same 32 with half of them under a JSON-schema grammar, on the CPU backend.
//!
//! ```text
//! cargo run --release -p autoglm-benches --bin structured
//! cargo run --release -p autoglm-benches --bin structured -- --hidden 512 --layers 8 --rounds 7
//! ```
//!
//! The model has the bundled fixture's tokenizer (a 600-token byte-level BPE vocabulary, so the
//! token masks are much cheaper than with GLM-4's 151k tokens) and random weights of the given
//! shape (by default the fixture's own tiny shape, where a step costs least and the grammar's
//! share is largest). Every stream has the same prompt and decodes `--tokens` tokens with
//! `ignore_eos`; the grammar is a JSON object holding a list of at least 10,000 steps, so no
//! constrained stream ends before its free neighbours. Free and half-constrained runs alternate
//! `--rounds` times on one engine; the report gives each run's tokens/s, the medians, their
//! ratio, the spread between rounds (the noise of this shared machine) and how long the engine
//! thread waited for masks.

use std::sync::atomic::Ordering;
use std::time::Instant;

use autoglm_benches::{median, CpuUsage};
use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::engine::{collect, Request};
use autoglm_core::model::{GlmModel, ModelConfig, RandomWeights};
use autoglm_core::tokenizer::Tokenizer;
use autoglm_core::{Engine, EngineConfig, SamplingParams, StructuredOutput};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Decode throughput with and without structured output")]
struct Args {
    /// Concurrent streams (half of them constrained in the second run).
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Tokens each stream decodes.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Free / constrained run pairs.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Hidden size of the random model (default: the fixture's).
    #[arg(long)]
    hidden: Option<usize>,
    /// Layers of the random model (default: the fixture's).
    #[arg(long)]
    layers: Option<usize>,
}

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4-tiny")
}

fn grammar() -> StructuredOutput {
    let step = json!({
        "type": "object",
        "properties": {
            "action": {"enum": ["tap", "swipe", "type", "back", "home"]},
            "x": {"type": "integer", "minimum": 0, "maximum": 1080},
            "y": {"type": "integer", "minimum": 0, "maximum": 2400},
            "note": {"type": "string", "maxLength": 24}
        },
        "required": ["action", "x", "y", "note"],
        "additionalProperties": false
    });
    StructuredOutput::Json(json!({
        "type": "object",
        "properties": {"steps": {"type": "array", "items": step, "minItems": 10000}},
        "required": ["steps"]
    }))
}

/// One run: all streams submitted at once, drained; tokens/s over the wall time.
fn run(engine: &Engine, prompt: &[u32], args: &Args, constrained: usize) -> f64 {
    let t = Instant::now();
    let streams: Vec<_> = (0..args.streams)
        .map(|i| {
            let params = SamplingParams {
                max_tokens: args.tokens,
                ignore_eos: true,
                seed: Some(i as u64),
                structured: (i < constrained).then(grammar),
                ..Default::default()
            };
            engine
                .submit_request(Request {
                    prompt: prompt.to_vec(),
                    params,
                    priority: 0,
                    images: Vec::new(),
                    cache_salt: None,
                })
                .expect("submit")
        })
        .collect();
    let mut tokens = 0;
    for s in streams {
        let out = collect(s, 1).expect("stream");
        let n = out.choices[0].token_ids.len();
        assert_eq!(n, args.tokens, "a stream ended early");
        tokens += n;
    }
    tokens as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let args = Args::parse();
    let dir = fixture();
    let mut config = ModelConfig::from_file(&dir.join("config.json")).expect("fixture config");
    if let Some(h) = args.hidden {
        config.hidden_size = h;
        config.intermediate_size = h * 8 / 3;
        config.head_dim = h / config.num_heads;
        config.rotary_dim = config.head_dim / 2;
    }
    if let Some(l) = args.layers {
        config.num_layers = l;
    }
    let backend = CpuBackend::new();
    let weights = RandomWeights {
        seed: 1,
        scale: 0.05,
    };
    let model = GlmModel::from_source(config.clone(), &weights, &backend).expect("model");
    let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
    let prompt = tokenizer
        .encode("Open the settings app and turn on Wi-Fi.", true)
        .expect("prompt");
    let engine =
        Engine::new(backend, model, Some(tokenizer), EngineConfig::default()).expect("engine");
    println!(
        "model: hidden {} x {} layers, vocab {}; {} streams x {} tokens, half constrained in the second run",
        config.hidden_size, config.num_layers, config.vocab_size, args.streams, args.tokens
    );
    // Warm-up: the grammar's token trie and the engine's buffers.
    run(&engine, &prompt, &args, args.streams / 2);
    let (mut free, mut half) = (Vec::new(), Vec::new());
    let usage = CpuUsage::now();
    let stats = engine.stats();
    let (m0, w0) = (
        stats.grammar_masks.load(Ordering::Relaxed),
        stats.grammar_wait_ns.load(Ordering::Relaxed),
    );
    for r in 0..args.rounds {
        let f = run(&engine, &prompt, &args, 0);
        let h = run(&engine, &prompt, &args, args.streams / 2);
        println!(
            "round {r}: free {f:8.0} tok/s   half constrained {h:8.0} tok/s   ratio {:.3}",
            h / f
        );
        free.push(f);
        half.push(h);
    }
    let contention = usage.since();
    let masks = stats.grammar_masks.load(Ordering::Relaxed) - m0;
    let wait = (stats.grammar_wait_ns.load(Ordering::Relaxed) - w0) as f64 / 1e3;
    let spread = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        (hi - lo) / lo * 100.0
    };
    let (sf, sh) = (spread(&free), spread(&half));
    let (mf, mh) = (median(&mut free), median(&mut half));
    println!(
        "median: free {mf:.0} tok/s, half constrained {mh:.0} tok/s: ratio {:.3} ({:+.1}%)",
        mh / mf,
        (mh / mf - 1.0) * 100.0
    );
    println!("spread between rounds: free {sf:.1}%, constrained {sh:.1}%");
    println!(
        "masks: {masks}, engine thread waited {:.1} us per mask on average",
        wait / masks.max(1) as f64
    );
    println!(
        "other processes kept {:.2} cores busy meanwhile (steal {:.2})",
        contention.other_cores, contention.steal_cores
    );
}
