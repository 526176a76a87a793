//! The CUDA backend against the CPU reference (and through it, transformers). Needs a CUDA GPU:
//! every test is `#[ignore]`d and fails loudly when run with `--include-ignored` on a machine
//! without one (a GPU check that finds no GPU must not pass). On the GPU machine:
//! `cargo test --release -p autoglm-core --test cuda_fixtures -- --include-ignored` (or the
//! prebuilt executable via `.ci/gpu-check.sh`).
//!
//! Tolerances: weights and activations are rounded to bf16 before each GEMM (8 bits of mantissa,
//! relative step 2^-8 = 0.4%), so logits differ from the f32 reference by about 1e-2 of their
//! scale; greedy tokens are compared where the reference's top-2 margin exceeds that.

mod common;

use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::backend::cuda::{CudaBackend, CudaOptions};
use autoglm_core::backend::{Backend, RowSampling};
use autoglm_core::model::{GlmModel, HostTensor, ModelConfig, RandomWeights};
use autoglm_core::runner::ForwardBatch;
use autoglm_core::{Device, Engine, EngineConfig, SamplingParams};
use common::*;

/// Relative tolerance of bf16 logits against the f32 reference (max abs error / max |logit|).
const TOL: f32 = 3e-2;
const BLOCK: usize = 4;

fn cuda() -> CudaBackend {
    match CudaBackend::new(CudaOptions::default()) {
        Ok(b) => b,
        Err(e) => panic!("this test needs a usable CUDA device: {e}"),
    }
}

fn single(tokens: &[u32], start: usize, all_logits: bool) -> ForwardBatch {
    let blocks: Vec<u32> = (0..(start + tokens.len()).div_ceil(BLOCK) as u32).collect();
    let mut b = ForwardBatch::new(blocks.len());
    b.push_seq(tokens, start, &blocks, BLOCK);
    b.logits_indices = if all_logits {
        (0..tokens.len() as u32).collect()
    } else {
        vec![tokens.len() as u32 - 1].into()
    };
    b
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn check_rows(what: &str, got: &[f32], want: &[f32], vocab: usize) {
    assert_eq!(got.len(), want.len(), "{what}: logits length");
    for (r, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let e = rel_err(g, w);
        assert!(e < TOL, "{what}: row {r}: relative error {e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn prompt_logits_match_the_reference_at_every_position() {
    let gpu = cuda();
    eprintln!("{} ({}), sm_{}", gpu.name(), gpu.device_name(), gpu.arch());
    for name in FIXTURES {
        let model = GlmModel::load(&fixture(name), &gpu).unwrap();
        let vocab = model.config().vocab_size;
        for case in expected(name)["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_token_ids"]);
            let mut cache = gpu
                .alloc_kv_cache(model.kv_cache_shape(128, BLOCK))
                .unwrap();
            let logits = model
                .forward(&gpu, &single(&prompt, 0, true), &mut cache)
                .unwrap();
            let (_, want) = expected_tensor(name, case["logits_tensor"].as_str().unwrap());
            check_rows(
                &format!("{name} prompt {}", prompt.len()),
                &logits,
                &want,
                vocab,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn decode_logits_match_and_greedy_tokens_agree_where_the_margin_is_clear() {
    let gpu = cuda();
    for name in FIXTURES {
        let model = GlmModel::load(&fixture(name), &gpu).unwrap();
        let vocab = model.config().vocab_size;
        for case in expected(name)["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_token_ids"]);
            let greedy = ids(&case["greedy_token_ids"]);
            let margins = case["greedy_top2_margins"].as_array().unwrap();
            let (_, want) = expected_tensor(name, case["greedy_logits_tensor"].as_str().unwrap());
            let mut cache = gpu
                .alloc_kv_cache(model.kv_cache_shape(128, BLOCK))
                .unwrap();
            let mut logits = model
                .forward(&gpu, &single(&prompt, 0, false), &mut cache)
                .unwrap();
            // Teacher-forced with the reference tokens, so one flipped step cannot derail the rest.
            for (step, &tok) in greedy.iter().enumerate() {
                let w = &want[step * vocab..(step + 1) * vocab];
                let e = rel_err(&logits, w);
                assert!(e < TOL, "{name}: decode step {step}: relative error {e}");
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let margin = margins[step].as_f64().unwrap() as f32;
                if margin > 2.0 * TOL * scale {
                    assert_eq!(argmax(&logits), tok, "{name}: greedy token at step {step}");
                }
                let pos = prompt.len() + step;
                logits = model
                    .forward(&gpu, &single(&[tok], pos, false), &mut cache)
                    .unwrap();
            }
        }
    }
}

/// Long contexts take the split-K decode path (context >= 512); a random tiny model checks it
/// against the CPU on the same weights.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn long_context_decode_matches_the_cpu_on_the_same_weights() {
    let gpu = cuda();
    let cpu = CpuBackend::new();
    let config = ModelConfig::from_file(&fixture("glm4-tiny").join("config.json")).unwrap();
    let src = RandomWeights {
        seed: 7,
        scale: 0.08,
    };
    let on_gpu = GlmModel::from_source(config.clone(), &src, &gpu).unwrap();
    let on_cpu = GlmModel::from_source(config.clone(), &src, &cpu).unwrap();
    let vocab = config.vocab_size;
    let prompt: Vec<u32> = (0..1500u32).map(|i| (i * 7919) % vocab as u32).collect();
    let mut gc = gpu
        .alloc_kv_cache(on_gpu.kv_cache_shape(512, BLOCK))
        .unwrap();
    let mut cc = cpu
        .alloc_kv_cache(on_cpu.kv_cache_shape(512, BLOCK))
        .unwrap();
    // Prefill in two chunks (the second attends to the first through the cache), then decode.
    let (a, b) = prompt.split_at(700);
    for (chunk, start) in [(a, 0), (b, 700)] {
        let batch = single(chunk, start, true);
        let g = on_gpu.forward(&gpu, &batch, &mut gc).unwrap();
        let c = on_cpu.forward(&cpu, &batch, &mut cc).unwrap();
        check_rows(&format!("prefill chunk at {start}"), &g, &c, vocab);
    }
    let mut tok = 1u32;
    for step in 0..8 {
        let batch = single(&[tok], prompt.len() + step, false);
        let g = on_gpu.forward(&gpu, &batch, &mut gc).unwrap();
        let c = on_cpu.forward(&cpu, &batch, &mut cc).unwrap();
        check_rows(&format!("decode step {step}"), &g, &c, vocab);
        tok = argmax(&c);
    }
}

/// Weights generated on the device equal the host's RandomWeights rounded to bf16: the logits
/// of the two models agree to bf16 tolerance.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn device_generated_dummy_weights_equal_the_host_generator() {
    let gpu = cuda();
    let cpu = CpuBackend::new();
    let config = ModelConfig::from_file(&fixture("glm-tiny-bf16").join("config.json")).unwrap();
    let src = RandomWeights::default();
    let on_gpu = GlmModel::from_source(config.clone(), &src, &gpu).unwrap();
    let on_cpu = GlmModel::from_source(config.clone(), &src, &cpu).unwrap();
    let prompt: Vec<u32> = (1..40).collect();
    let batch = single(&prompt, 0, true);
    let mut gc = gpu
        .alloc_kv_cache(on_gpu.kv_cache_shape(16, BLOCK))
        .unwrap();
    let mut cc = cpu
        .alloc_kv_cache(on_cpu.kv_cache_shape(16, BLOCK))
        .unwrap();
    let g = on_gpu.forward(&gpu, &batch, &mut gc).unwrap();
    let c = on_cpu.forward(&cpu, &batch, &mut cc).unwrap();
    check_rows("dummy weights", &g, &c, config.vocab_size);
}

/// An engine on cuda:0 with the glm4-tiny fixture.
fn cuda_engine() -> Engine {
    cuda_engine_with_graphs(true)
}

fn cuda_engine_with_graphs(graphs: bool) -> Engine {
    let _ = cuda();
    let mut config = EngineConfig {
        device: Device::Cuda(0),
        ..EngineConfig::default()
    };
    config.cache.num_blocks = Some(1024);
    config.cuda.graphs = graphs;
    Engine::from_dir(&fixture("glm4-tiny"), config).unwrap()
}

/// The engine on cuda:0: device argmax (plain greedy) and host sampling (greedy with logprobs)
/// pick the same tokens, alone and in a batch of 8.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn engine_on_cuda_device_argmax_equals_host_greedy_and_batching_changes_nothing() {
    let engine = cuda_engine();
    assert_eq!(engine.backend_name(), "cuda:0");
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| {
            (0..(5 + 3 * i))
                .map(|t| (t * 37 + i * 11) % 500 + 1)
                .collect()
        })
        .collect();
    let greedy = SamplingParams {
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let with_logprobs = SamplingParams {
        logprobs: Some(1),
        ..greedy.clone()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            engine.generate(p.clone(), greedy.clone()).unwrap().choices[0]
                .token_ids
                .clone()
        })
        .collect();
    for (p, want) in prompts.iter().zip(&alone) {
        let host = engine.generate(p.clone(), with_logprobs.clone()).unwrap();
        assert_eq!(&host.choices[0].token_ids, want, "host vs device argmax");
    }
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(p.clone(), greedy.clone()).unwrap())
        .collect();
    for (s, want) in streams.into_iter().zip(&alone) {
        let out = autoglm_core::engine::collect(s, 1).unwrap();
        assert_eq!(&out.choices[0].token_ids, want, "batched vs alone");
    }
}

/// Device sampling against the host sampler's distribution: N rows of the same logits with
/// draws u = (i + 0.5) / N spread evenly over [0, 1), so every token must be picked by its share
/// of the rows (within one row either way, in whatever order the device walks the tokens), and a
/// token the filters drop never. The logits repeat values (ties at every cut) and hold -inf.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn device_sampling_draws_every_kept_token_by_its_share() {
    let gpu = cuda();
    let values = sampling_logits();
    let vocab = values.len();
    let table = gpu
        .upload(HostTensor::owned(vec![1, vocab], values))
        .unwrap();
    const N: usize = 8192;
    let x = gpu.embedding(&table, &[0u32; N]).unwrap();
    // The logits as the device holds them (rounded to bf16 on upload).
    let logits = gpu.to_host(&x).unwrap()[..vocab].to_vec();
    let row = |temperature, top_k, top_p, min_p| RowSampling {
        temperature,
        top_k,
        top_p,
        min_p,
        uniform: 0.0,
    };
    let cases = sampling_cases();
    let mut ids = Vec::new();
    for case in cases {
        let rows: Vec<RowSampling> = (0..N)
            .map(|i| RowSampling {
                uniform: (i as f64 + 0.5) / N as f64,
                ..case
            })
            .collect();
        gpu.sample_rows(&x, &rows, &mut ids).unwrap();
        assert_eq!(ids.len(), N);
        let mut count = vec![0usize; vocab];
        for &t in &ids {
            count[t as usize] += 1;
        }
        let want = expected_shares(&logits, &case);
        for t in 0..vocab {
            let got = count[t] as f64 / N as f64;
            if want[t] == 0.0 {
                assert_eq!(count[t], 0, "{case:?}: token {t} is filtered out but drawn");
            } else {
                assert!(
                    (got - want[t]).abs() <= 1.5 / N as f64,
                    "{case:?}: token {t} drawn {got} of the time, its share is {}",
                    want[t]
                );
            }
        }
    }
    // Greedy and sampled rows in one call: the greedy rows take the first maximum.
    let mixed: Vec<RowSampling> = (0..64)
        .map(|i| {
            if i % 2 == 0 {
                RowSampling::GREEDY
            } else {
                RowSampling {
                    uniform: 0.37,
                    ..row(1.0, 0, 1.0, 0.0)
                }
            }
        })
        .collect();
    let x = gpu.embedding(&table, &[0u32; 64]).unwrap();
    gpu.sample_rows(&x, &mixed, &mut ids).unwrap();
    for (i, &t) in ids.iter().enumerate().step_by(2) {
        assert_eq!(t, argmax(&logits), "greedy row {i}");
    }
    assert!(
        gpu.sample_rows(&x, &mixed[..3], &mut ids).is_err(),
        "row count mismatch"
    );
}

/// The engine samples on the device (no logprobs or penalties) with the same distribution as
/// on the host: a seeded request repeats itself; temperature sampling over many requests hits
/// several tokens; top-k 1 equals greedy.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn engine_on_cuda_samples_on_the_device() {
    let engine = cuda_engine();
    let prompt: Vec<u32> = (1..9).collect();
    let sampled = SamplingParams {
        max_tokens: 16,
        ignore_eos: true,
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(7),
        ..SamplingParams::default()
    };
    let a = engine.generate(prompt.clone(), sampled.clone()).unwrap();
    let b = engine.generate(prompt.clone(), sampled.clone()).unwrap();
    assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids, "same seed");
    let firsts: std::collections::HashSet<u32> = (0..32u64)
        .map(|s| {
            let p = SamplingParams {
                max_tokens: 1,
                seed: Some(s),
                ..sampled.clone()
            };
            engine.generate(prompt.clone(), p).unwrap().choices[0].token_ids[0]
        })
        .collect();
    assert!(firsts.len() > 1, "32 seeds all drew {firsts:?}");
    let greedy = SamplingParams {
        max_tokens: 16,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let top1 = SamplingParams {
        top_k: 1,
        temperature: 1.0,
        ..greedy.clone()
    };
    assert_eq!(
        engine.generate(prompt.clone(), top1).unwrap().choices[0].token_ids,
        engine.generate(prompt, greedy).unwrap().choices[0].token_ids,
        "top-k 1 is greedy"
    );
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn a_model_larger_than_the_device_is_refused_naming_the_sizes() {
    let gpu = cuda();
    let (_, total) = gpu.memory_info().unwrap();
    let err = gpu.check_fits(total + (1 << 30)).unwrap_err().to_string();
    assert!(err.contains("MiB"), "{err}");
}

fn cuda_with_graphs(graphs: bool) -> CudaBackend {
    match CudaBackend::new(CudaOptions {
        graphs,
        ..CudaOptions::default()
    }) {
        Ok(b) => b,
        Err(e) => panic!("this test needs a usable CUDA device: {e}"),
    }
}

/// Decode steps replayed from CUDA graphs compute what eager steps compute: `n` sequences
/// (prompts of different lengths, sequence 0 owning cache block 0, which the padding rows read)
/// decode 12 steps through `run_step` on a backend with graphs and on one without, same
/// weights; logits agree to float noise at every step (the first step of a bucket runs eagerly
/// and captures, the rest replay; the contexts cross the 32-token block-table width of the first
/// graph, so a second graph is captured), and the greedy tokens are the same. Batch sizes 1, 3,
/// 5 and 12 pad to buckets 1, 4, 8 and 16.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn decode_graphs_replay_what_eager_steps_compute() {
    let config = ModelConfig::from_file(&fixture("glm4-tiny").join("config.json")).unwrap();
    let src = RandomWeights {
        seed: 11,
        scale: 0.08,
    };
    let vocab = config.vocab_size;
    let graphed = cuda_with_graphs(true);
    let eager = cuda_with_graphs(false);
    let mg = GlmModel::from_source(config.clone(), &src, &graphed).unwrap();
    let me = GlmModel::from_source(config.clone(), &src, &eager).unwrap();
    for n in [1usize, 3, 5, 12] {
        let mut cg = graphed
            .alloc_kv_cache(mg.kv_cache_shape(256, BLOCK))
            .unwrap();
        let mut ce = eager.alloc_kv_cache(me.kv_cache_shape(256, BLOCK)).unwrap();
        // Sequence s owns blocks s*16 .. s*16+16 (64 tokens).
        let table = |s: usize, len: usize| -> Vec<u32> {
            (0..len.div_ceil(BLOCK) as u32)
                .map(|b| s as u32 * 16 + b)
                .collect()
        };
        let mut lens = Vec::new();
        let mut next = Vec::new();
        for s in 0..n {
            let len = 24 + 3 * s % 7;
            let prompt: Vec<u32> = (0..len as u32)
                .map(|t| (t * 31 + s as u32 * 7) % 500 + 1)
                .collect();
            let mut b = ForwardBatch::new(table(s, len).len());
            b.push_seq(&prompt, 0, &table(s, len), BLOCK);
            b.logits_indices = vec![len as u32 - 1].into();
            let g = mg.forward(&graphed, &b, &mut cg).unwrap();
            let e = me.forward(&eager, &b, &mut ce).unwrap();
            check_rows(&format!("n={n} prefill {s}"), &g, &e, vocab);
            lens.push(len);
            next.push(argmax(&e));
        }
        for step in 0..12 {
            let width = (0..n).map(|s| table(s, lens[s] + 1).len()).max().unwrap();
            let mut b = ForwardBatch::new(width);
            for s in 0..n {
                b.push_seq(&[next[s]], lens[s], &table(s, lens[s] + 1), BLOCK);
            }
            b.logits_indices = (0..n as u32).collect();
            let run = |backend: &CudaBackend, model: &GlmModel<CudaBackend>, cache| {
                let t = backend
                    .run_step(&b, cache, &mut |b, c| model.forward_logits(backend, b, c))
                    .unwrap();
                assert_eq!(
                    (t.rows, t.cols),
                    (n, vocab),
                    "n={n} step {step}: logits shape"
                );
                backend.to_host(&t).unwrap()
            };
            let g = run(&graphed, &mg, &mut cg);
            let e = run(&eager, &me, &mut ce);
            for s in 0..n {
                let (gr, er) = (
                    &g[s * vocab..(s + 1) * vocab],
                    &e[s * vocab..(s + 1) * vocab],
                );
                let err = rel_err(gr, er);
                assert!(
                    err < 2e-3,
                    "n={n} step {step} seq {s}: relative error {err}"
                );
                let scale = er.iter().fold(0f32, |m, x| m.max(x.abs()));
                let mut sorted = er.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] > 4e-3 * scale {
                    assert_eq!(
                        argmax(gr),
                        argmax(er),
                        "n={n} step {step} seq {s}: greedy token"
                    );
                }
                next[s] = argmax(er);
                lens[s] += 1;
            }
        }
    }
}

/// The engine gives the same greedy tokens with CUDA graphs as without, alone and batched.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn engine_with_cuda_graphs_gives_the_tokens_of_eager_steps() {
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| {
            (0..(4 + 5 * i))
                .map(|t| (t * 13 + i * 29) % 500 + 1)
                .collect()
        })
        .collect();
    let greedy = SamplingParams {
        max_tokens: 40,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let run = |e: &Engine| -> Vec<Vec<u32>> {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| e.submit(p.clone(), greedy.clone()).unwrap())
            .collect();
        streams
            .into_iter()
            .map(|s| {
                autoglm_core::engine::collect(s, 1).unwrap().choices[0]
                    .token_ids
                    .clone()
            })
            .collect()
    };
    let eager = run(&cuda_engine_with_graphs(false));
    let graphed = cuda_engine_with_graphs(true);
    assert_eq!(run(&graphed), eager, "batched: graphs vs eager");
    let alone = graphed
        .generate(prompts[2].clone(), greedy.clone())
        .unwrap()
        .choices[0]
        .token_ids
        .clone();
    assert_eq!(alone, eager[2], "alone (batch 1 graph) vs eager");
}

/// A decode loop as the engine runs it (`run_step`, then `sample_rows` on the device) moves
/// nothing through pageable host memory, eagerly or through graphs: ids, positions, slots,
/// block tables, sampling parameters and sampled tokens all travel through pinned buffers.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn steady_decode_copies_nothing_through_pageable_memory() {
    let gpu = cuda();
    let model = GlmModel::load(&fixture("glm4-tiny"), &gpu).unwrap();
    let mut cache = gpu.alloc_kv_cache(model.kv_cache_shape(64, BLOCK)).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let prompt: Vec<u32> = (1..20).collect();
    let mut b = ForwardBatch::new(table.len());
    b.push_seq(&prompt, 0, &table, BLOCK);
    b.logits_indices = vec![prompt.len() as u32 - 1].into();
    let greedy = [RowSampling::GREEDY];
    let mut next = Vec::with_capacity(1);
    let l = model.forward_logits(&gpu, &b, &mut cache).unwrap();
    gpu.sample_rows(&l, &greedy, &mut next).unwrap();
    let before = gpu.pageable_copies();
    let mut pos = prompt.len();
    for graphs in [false, true] {
        gpu.set_graphs(graphs);
        for _ in 0..8 {
            let mut b = ForwardBatch::new(table.len());
            b.push_seq(&[next[0]], pos, &table, BLOCK);
            b.logits_indices = vec![0].into();
            let l = gpu
                .run_step(&b, &mut cache, &mut |b, c| model.forward_logits(&gpu, b, c))
                .unwrap();
            gpu.sample_rows(&l, &greedy, &mut next).unwrap();
            pos += 1;
        }
        assert_eq!(
            gpu.pageable_copies(),
            before,
            "pageable copies during decode (graphs: {graphs})"
        );
    }
}
