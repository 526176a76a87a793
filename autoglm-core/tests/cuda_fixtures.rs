//! The CUDA backend against the CPU reference (and through it, transformers). Needs a CUDA GPU:
//! every test is `#[ignore]`d and fails loudly when run with `--include-ignored` on a machine
//! without one (a GPU check that finds no GPU must not pass). On the GPU machine:
//! `cargo test --release -p autoglm-core --test cuda_fixtures -- --include-ignored` (or the
//! prebuilt executable via `.ci/gpu-check.sh`).
//!
//! Tolerances: weights and activations are rounded to bf16 before each GEMM (8 bits of mantissa,
//! relative step 2^-8 = 0.4%), so logits differ from the f32 reference by about 1e-2 of their
//! scale; greedy tokens are compared where the reference's top-2 margin exceeds that.
//!
//! Glm4v (glm4v-tiny): the vision tower's ops one by one and the whole tower against the CPU,
//! prompts with images (M-RoPE) and their decode steps against transformers, M-RoPE decode
//! steps through graphs against eager ones, and the engine with images.

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
            let tols = bf16_tolerances(
                name,
                &|m| teacher_forced(&CpuBackend::new(), m, &prompt, &greedy),
                &want,
                vocab,
            );
            // Teacher-forced with the reference tokens, so one flipped step cannot derail the rest.
            for (step, &tok) in greedy.iter().enumerate() {
                let w = &want[step * vocab..(step + 1) * vocab];
                let (e, tol) = (rel_err(&logits, w), tols[step]);
                assert!(
                    e < tol,
                    "{name}: decode step {step}: relative error {e} (bound {tol})"
                );
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let margin = margins[step].as_f64().unwrap() as f32;
                if margin > 2.0 * tol * scale {
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

/// The logits of `prompt` (last row) and then of each of `greedy` fed one decode step at a time.
fn teacher_forced<B: Backend>(
    b: &B,
    model: &GlmModel<B>,
    prompt: &[u32],
    greedy: &[u32],
) -> Vec<f32> {
    let mut cache = b.alloc_kv_cache(model.kv_cache_shape(128, BLOCK)).unwrap();
    let mut out = model
        .forward(b, &single(prompt, 0, false), &mut cache)
        .unwrap();
    for (step, &tok) in greedy
        .iter()
        .enumerate()
        .take(greedy.len().saturating_sub(1))
    {
        let l = model
            .forward(b, &single(&[tok], prompt.len() + step, false), &mut cache)
            .unwrap();
        out.extend_from_slice(&l);
    }
    out
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

/// The opt-in GEMV kernel for decode-sized products (`CudaOptions::gemv_max_rows`) gives the
/// logits cuBLAS gives: glm4-tiny's prompts and 1-, 3- and 8-row decode batches, to f32
/// rounding (both multiply the same bf16 operands and accumulate in f32).
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn the_gemv_kernel_gives_the_logits_of_cublas() {
    let with = |rows| match CudaBackend::new(CudaOptions {
        gemv_max_rows: rows,
        ..CudaOptions::default()
    }) {
        Ok(b) => b,
        Err(e) => panic!("this test needs a usable CUDA device: {e}"),
    };
    let (blas, gemv) = (with(0), with(8));
    let mb = GlmModel::load(&fixture("glm4-tiny"), &blas).unwrap();
    let mg = GlmModel::load(&fixture("glm4-tiny"), &gemv).unwrap();
    let vocab = mb.config().vocab_size;
    for n in [1usize, 3, 8] {
        let table = |s: usize| -> Vec<u32> { (4 * s as u32..4 * s as u32 + 4).collect() };
        let prompt =
            |s: usize| -> Vec<u32> { (0..5 + s as u32).map(|i| (7 * i + 3) % 600).collect() };
        // Prefill each sequence (more rows than the GEMV takes), then one decode row each.
        let mut pre = ForwardBatch::new(4);
        let mut step = ForwardBatch::new(4);
        for s in 0..n {
            pre.push_seq(&prompt(s), 0, &table(s), BLOCK);
            step.push_seq(&[11 + s as u32], 5 + s, &table(s), BLOCK);
        }
        pre.logits_indices = vec![0].into();
        step.logits_indices = (0..n as u32).collect();
        let mut cb = blas.alloc_kv_cache(mb.kv_cache_shape(32, BLOCK)).unwrap();
        let mut cg = gemv.alloc_kv_cache(mg.kv_cache_shape(32, BLOCK)).unwrap();
        mb.forward(&blas, &pre, &mut cb).unwrap();
        mg.forward(&gemv, &pre, &mut cg).unwrap();
        let want = mb.forward(&blas, &step, &mut cb).unwrap();
        let got = mg.forward(&gemv, &step, &mut cg).unwrap();
        for (r, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = rel_err(g, w);
            assert!(e < 1e-4, "{n} rows: row {r}: relative error {e}");
        }
    }
}

/// Greedy sampling of vocabulary-wide rows (151552 columns: the two-pass argmax, many blocks a
/// row) takes the first maximum: ties placed in different chunks, a row of -inf, the maximum in
/// the last column.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn argmax_of_vocabulary_wide_rows_is_the_first_maximum() {
    let gpu = cuda();
    let cols = 151_552;
    let mut x = vec![0f32; 5 * cols];
    let mut seed = 7u64;
    for v in x.iter_mut() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *v = ((seed >> 40) % 1000) as f32 * 1e-3;
    }
    x[cols + 5000] = 2.0; // row 1: a tie between chunks 1 and 30; the first wins
    x[cols + 123_456] = 2.0;
    x[2 * cols..3 * cols].fill(f32::NEG_INFINITY); // row 2: index 0
    x[4 * cols - 1] = 5.0; // row 3: the last column
    x[4 * cols + 4095] = 3.0; // row 4: a chunk's last column tied with the next chunk's first
    x[4 * cols + 4096] = 3.0;
    let want: Vec<u32> = x.chunks(cols).map(|r| first_max(r) as u32).collect();
    assert_eq!(want[1..], [5000, 0, cols as u32 - 1, 4095]);
    let t = gpu.tensor_from_host(5, cols, &x).unwrap();
    let mut got = Vec::new();
    gpu.sample_rows(&t, &[RowSampling::GREEDY; 5], &mut got)
        .unwrap();
    assert_eq!(got, want);
}

#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn a_model_larger_than_the_device_is_refused_naming_the_sizes() {
    let gpu = cuda();
    let (_, total) = gpu.memory_info().unwrap();
    let err = gpu.check_fits(total + (1 << 30)).unwrap_err().to_string();
    assert!(err.contains("MiB"), "{err}");
}

/// transformers as an independent oracle at GLM-4-9B-0414's layer shape (hidden 4096, 32 heads,
/// 2 KV heads, head_dim 128, ffn 13696, vocab 151552; fewer layers): the checkpoint, its prompt
/// plus transformers' greedy continuation and transformers' float32 logits at every position
/// come from `benches/python/xcheck_transformers.py DIR` (run first by `.ci/gpu-check.sh`),
/// named by `AUTOGLM_XCHECK_DIR`. The prompt is prefilled at once, then the continuation is fed
/// one token per decode step (teacher-forced); every row is within bf16 tolerance and the greedy
/// token agrees where transformers' top-2 margin is clear.
#[test]
#[ignore = "needs a CUDA GPU and AUTOGLM_XCHECK_DIR; run by .ci/gpu-check.sh"]
fn transformers_logits_of_a_9b_shaped_checkpoint_match() {
    xcheck_transformers(&cuda());
}

/// The same check on the CPU backend (the f32 reference, against transformers' f32 logits).
#[test]
#[ignore = "needs AUTOGLM_XCHECK_DIR; run by .ci/gpu-check.sh"]
fn transformers_logits_of_a_9b_shaped_checkpoint_match_on_the_cpu() {
    xcheck_transformers(&CpuBackend::new());
}

fn xcheck_transformers<B: Backend>(gpu: &B) {
    let dir = std::path::PathBuf::from(std::env::var_os("AUTOGLM_XCHECK_DIR").expect(
        "set AUTOGLM_XCHECK_DIR to the folder benches/python/xcheck_transformers.py wrote",
    ));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("xcheck.json")).unwrap()).unwrap();
    let tokens = ids(&meta["token_ids"]);
    let prompt_len = meta["prompt_len"].as_u64().unwrap() as usize;
    let margins = meta["top2_margins"].as_array().unwrap();
    let want: Vec<f32> = std::fs::read(dir.join("logits.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let t = std::time::Instant::now();
    let model = GlmModel::load(&dir, gpu).unwrap();
    let vocab = model.config().vocab_size;
    assert_eq!(want.len(), tokens.len() * vocab, "logits.f32 rows");
    eprintln!(
        "{}: loaded {} ({} layers) in {:.2} s",
        gpu.name(),
        dir.display(),
        model.config().num_layers,
        t.elapsed().as_secs_f64()
    );
    let row = |i: usize| &want[i * vocab..(i + 1) * vocab];
    let check = |what: String, got: &[f32], i: usize| {
        let w = row(i);
        let e = rel_err(got, w);
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let margin = margins[i].as_f64().unwrap() as f32;
        let clear = margin > 2.0 * TOL * scale;
        eprintln!(
            "{what}: relative error {e:.2e}, argmax {} vs {} (margin {:.3} of {scale:.3}{})",
            argmax(got),
            argmax(w),
            margin,
            if clear { ", clear" } else { "" }
        );
        assert!(e < TOL, "{what}: relative error {e}");
        if clear {
            assert_eq!(argmax(got), argmax(w), "{what}: greedy token");
        }
    };
    let blocks = (tokens.len() + 1).div_ceil(BLOCK);
    let mut cache = gpu
        .alloc_kv_cache(model.kv_cache_shape(blocks, BLOCK))
        .unwrap();
    let logits = model
        .forward(gpu, &single(&tokens[..prompt_len], 0, true), &mut cache)
        .unwrap();
    for (i, got) in logits.chunks(vocab).enumerate() {
        check(format!("prefill position {i}"), got, i);
    }
    for pos in prompt_len..tokens.len() {
        let got = model
            .forward(gpu, &single(&tokens[pos..=pos], pos, false), &mut cache)
            .unwrap();
        check(format!("decode position {pos}"), &got, pos);
    }
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

// Glm4v (the glm4v-tiny fixture): the vision tower's ops, the tower, M-RoPE prompts and decode
// steps (eager and through graphs) and the engine with images, on the device.

const GLM4V: &str = "glm4v-tiny";

/// The images of a glm4v-tiny case as transformers preprocessed them: patch grid `[gh, gw]` and
/// pixel values.
fn glm4v_images(case: &serde_json::Value) -> Vec<([usize; 2], Vec<f32>)> {
    let grids = case["image_grid_thw"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tensors = case["pixel_values_tensors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    tensors
        .iter()
        .zip(grids)
        .map(|(t, g)| {
            let g = ids(&g);
            let pixels = expected_tensor(GLM4V, t.as_str().unwrap()).1;
            ([g[1] as usize, g[2] as usize], pixels)
        })
        .collect()
}

fn glm4v_cases() -> Vec<serde_json::Value> {
    expected(GLM4V)["cases"].as_array().unwrap().clone()
}

/// Every named stage of the tower on `images` (one batch) and its output, on the host.
type Stages = Vec<(String, Vec<f32>)>;
fn tower<B: Backend>(
    backend: &B,
    model: &GlmModel<B>,
    images: &[([usize; 2], Vec<f32>)],
) -> (Stages, Vec<f32>) {
    let vision = model.vision().unwrap();
    let grids: Vec<[usize; 2]> = images.iter().map(|i| i.0).collect();
    let pixels: Vec<f32> = images.iter().flat_map(|i| i.1.iter().copied()).collect();
    let batch = vision.batch(&grids).unwrap();
    let mut stages = Vec::new();
    let out = vision
        .encode_stages(backend, &pixels, &batch, &mut |name, t| {
            stages.push((name.to_string(), backend.to_host(t)?));
            Ok(())
        })
        .unwrap();
    (stages, backend.to_host(&out).unwrap())
}

/// The vision tower on the device against the CPU reference, stage by stage (bf16 tolerance),
/// and its output against transformers' image embeddings; a case's images encoded together
/// equal them encoded one by one (attention stays within each image).
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn glm4v_vision_tower_matches_the_cpu_backend_at_every_stage() {
    let gpu = cuda();
    let cpu = CpuBackend::new();
    let mg = GlmModel::load(&fixture(GLM4V), &gpu).unwrap();
    let mc = GlmModel::load(&fixture(GLM4V), &cpu).unwrap();
    let mut checked = 0;
    for case in glm4v_cases() {
        let name = case["name"].as_str().unwrap();
        let images = glm4v_images(&case);
        if images.is_empty() {
            continue;
        }
        let (gs, gout) = tower(&gpu, &mg, &images);
        let (cs, cout) = tower(&cpu, &mc, &images);
        assert_eq!(gs.len(), cs.len(), "{name}: stages");
        for ((stage, g), (_, c)) in gs.iter().zip(&cs) {
            let e = rel_err(g, c);
            eprintln!("{name}: {stage}: relative error {e:.2e}");
            assert!(e < TOL, "{name}: {stage}: relative error {e}");
        }
        let e = rel_err(&gout, &cout);
        assert!(
            e < TOL,
            "{name}: tower output vs the CPU: relative error {e}"
        );
        let want = expected_tensor(GLM4V, case["image_embeds_tensor"].as_str().unwrap()).1;
        let e = rel_err(&gout, &want);
        assert!(
            e < TOL,
            "{name}: tower output vs transformers: relative error {e}"
        );
        if images.len() > 1 {
            let alone: Vec<f32> = images
                .iter()
                .flat_map(|im| tower(&gpu, &mg, std::slice::from_ref(im)).1)
                .collect();
            let e = rel_err(&gout, &alone);
            assert!(
                e < 1e-3,
                "{name}: images together vs alone: relative error {e}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "cases with images: {checked}");
}

/// Prefill of a case's whole prompt with its M-RoPE positions and image rows on `backend`, in
/// the cache blocks `table` (blocks of `BLOCK`): the logits of every prompt row and the prompt's
/// M-RoPE positions.
fn glm4v_prefill<B: Backend>(
    backend: &B,
    model: &GlmModel<B>,
    case: &serde_json::Value,
    table: &[u32],
    cache: &mut B::KvCache,
) -> (Vec<f32>, autoglm_core::model::mrope::MropePositions) {
    use autoglm_core::model::vision::ImageRows;
    let prompt = ids(&case["prompt_token_ids"]);
    let vision = model.vision().unwrap();
    let image_token = model.config().vision.as_ref().unwrap().image_token_id;
    let images = glm4v_images(case);
    let merged: Vec<[usize; 2]> = images.iter().map(|i| [i.0[0] / 2, i.0[1] / 2]).collect();
    let pos = autoglm_core::model::mrope::mrope_positions(&prompt, image_token, &merged).unwrap();
    let mut b = ForwardBatch::new(table.len());
    b.push_seq(&prompt, 0, table, BLOCK);
    b.logits_indices = (0..prompt.len() as u32).collect();
    b.mrope_positions = pos.positions.iter().flatten().copied().collect();
    let embeds: Vec<B::Tensor> = images
        .iter()
        .map(|(g, px)| {
            vision
                .encode(backend, px, &vision.batch(&[*g]).unwrap())
                .unwrap()
        })
        .collect();
    let mut rows = Vec::new();
    let (mut i, mut k) = (0, 0);
    while i < prompt.len() {
        if prompt[i] == image_token {
            let len = merged[k][0] * merged[k][1];
            rows.push(ImageRows {
                embeds: &embeds[k],
                src_row: 0,
                dst_row: i,
                len,
            });
            i += len;
            k += 1;
        } else {
            i += 1;
        }
    }
    let logits = model
        .forward_logits_with_images(backend, &b, cache, &rows)
        .unwrap();
    (backend.to_host(&logits).unwrap(), pos)
}

/// The decode step of token `tok` at `pos` (M-RoPE position `pos + delta` in every stream).
fn glm4v_decode(
    tok: u32,
    pos: usize,
    m: &autoglm_core::model::mrope::MropePositions,
) -> ForwardBatch {
    let mut b = single(&[tok], pos, false);
    b.mrope_positions = m.at(pos).to_vec().into();
    b
}

/// Prompts with images (M-RoPE positions, image rows over the placeholders) give transformers'
/// logits at every position within bf16 tolerance, and the CPU's; then, teacher-forced with the
/// reference tokens, every decode step's logits match and the greedy token agrees wherever the
/// reference's top-2 margin is clear (above 0.05 and twice the row's actual deviation).
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn glm4v_prompt_and_decode_logits_with_images_match_the_reference() {
    let gpu = cuda();
    let cpu = CpuBackend::new();
    let mg = GlmModel::load(&fixture(GLM4V), &gpu).unwrap();
    let mc = GlmModel::load(&fixture(GLM4V), &cpu).unwrap();
    let vocab = mg.config().vocab_size;
    let mut compared = 0;
    for case in glm4v_cases() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_token_ids"]);
        let mut gc = gpu.alloc_kv_cache(mg.kv_cache_shape(128, BLOCK)).unwrap();
        let mut cc = cpu.alloc_kv_cache(mc.kv_cache_shape(128, BLOCK)).unwrap();
        // Blocks 0.. as `single` (the decode steps below) uses them.
        let table: Vec<u32> = (0..prompt.len().div_ceil(BLOCK) as u32).collect();
        let (g, m) = glm4v_prefill(&gpu, &mg, &case, &table, &mut gc);
        let (c, _) = glm4v_prefill(&cpu, &mc, &case, &table, &mut cc);
        let want = expected_tensor(GLM4V, case["logits_tensor"].as_str().unwrap()).1;
        let tols = bf16_tolerances(
            GLM4V,
            &|m| {
                glm4v_prefill(
                    &CpuBackend::new(),
                    m,
                    &case,
                    &table,
                    &mut cpu.alloc_kv_cache(m.kv_cache_shape(128, BLOCK)).unwrap(),
                )
                .0
            },
            &want,
            vocab,
        );
        for (r, (gr, wr)) in g.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = rel_err(gr, wr);
            assert!(
                e < tols[r],
                "{name}: prompt vs transformers: row {r}: relative error {e} (bound {})",
                tols[r]
            );
        }
        for (r, (gr, cr)) in g.chunks(vocab).zip(c.chunks(vocab)).enumerate() {
            let e = rel_err(gr, cr);
            assert!(
                e < tols[r],
                "{name}: prompt vs the CPU: row {r}: relative error {e} (bound {})",
                tols[r]
            );
        }

        let greedy = ids(&case["greedy_token_ids"]);
        let margins = case["greedy_top2_margins"].as_array().unwrap();
        let want = expected_tensor(GLM4V, case["greedy_logits_tensor"].as_str().unwrap()).1;
        let mut logits = g[(prompt.len() - 1) * vocab..].to_vec();
        for (step, &tok) in greedy.iter().enumerate() {
            let w = &want[step * vocab..(step + 1) * vocab];
            let e = rel_err(&logits, w);
            assert!(e < TOL, "{name}: decode step {step}: relative error {e}");
            let dev = logits
                .iter()
                .zip(w)
                .fold(0f32, |mx, (a, b)| mx.max((a - b).abs()));
            let margin = margins[step].as_f64().unwrap() as f32;
            if margin > 0.05f32.max(2.0 * dev) {
                assert_eq!(argmax(&logits), tok, "{name}: greedy token at step {step}");
                compared += 1;
            }
            let b = glm4v_decode(tok, prompt.len() + step, &m);
            logits = mg.forward(&gpu, &b, &mut gc).unwrap();
        }
    }
    assert!(compared > 0, "no decode step had a clear margin");
}

/// M-RoPE decode steps replayed from CUDA graphs compute what eager steps compute: three
/// glm4v-tiny sequences (prompts with images, so their decode positions run behind their cache
/// positions by the rope delta; bucket 4, one padding row) decode 10 steps through `run_step`
/// on a backend with graphs and on one without; logits agree to float noise at every step, and
/// neither backend copies anything through pageable memory while decoding.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn glm4v_mrope_decode_graphs_replay_what_eager_steps_compute() {
    let graphed = cuda_with_graphs(true);
    let eager = cuda_with_graphs(false);
    let mg = GlmModel::load(&fixture(GLM4V), &graphed).unwrap();
    let me = GlmModel::load(&fixture(GLM4V), &eager).unwrap();
    let vocab = mg.config().vocab_size;
    let cases: Vec<_> = glm4v_cases().into_iter().take(3).collect();
    // One cache per backend; sequence s owns blocks 64 s .. 64 s + 64 (256 tokens).
    let mut cg = graphed
        .alloc_kv_cache(mg.kv_cache_shape(256, BLOCK))
        .unwrap();
    let mut ce = eager.alloc_kv_cache(me.kv_cache_shape(256, BLOCK)).unwrap();
    let table = |s: usize, len: usize| -> Vec<u32> {
        (0..len.div_ceil(BLOCK) as u32)
            .map(|b| s as u32 * 64 + b)
            .collect()
    };
    let mut seqs = Vec::new();
    for (s, case) in cases.iter().enumerate() {
        // Each prompt alone, with its images, in its own blocks.
        let len = case["prompt_token_ids"].as_array().unwrap().len();
        let (g, m) = glm4v_prefill(&graphed, &mg, case, &table(s, len), &mut cg);
        let (e, _) = glm4v_prefill(&eager, &me, case, &table(s, len), &mut ce);
        check_rows(&format!("prefill {s}"), &g, &e, vocab);
        seqs.push((len, m, argmax(&e[(len - 1) * vocab..])));
    }
    // Copies while stepping, not counting the test's own `to_host` of each step's logits.
    let mut copies = (0, 0);
    for step in 0..10 {
        let width = seqs
            .iter()
            .enumerate()
            .map(|(s, q)| table(s, q.0 + 1).len())
            .max()
            .unwrap();
        let mut b = ForwardBatch::new(width);
        for (s, (len, m, tok)) in seqs.iter().enumerate() {
            b.push_seq(&[*tok], *len, &table(s, len + 1), BLOCK);
            b.mrope_positions.extend_from_slice(&m.at(*len));
        }
        b.logits_indices = (0..seqs.len() as u32).collect();
        let run = |backend: &CudaBackend, model: &GlmModel<CudaBackend>, cache| {
            let before = backend.pageable_copies();
            let t = backend
                .run_step(&b, cache, &mut |b, c| model.forward_logits(backend, b, c))
                .unwrap();
            let during = backend.pageable_copies() - before;
            (backend.to_host(&t).unwrap(), during)
        };
        let (g, dg) = run(&graphed, &mg, &mut cg);
        let (e, de) = run(&eager, &me, &mut ce);
        copies = (copies.0 + dg, copies.1 + de);
        for (s, q) in seqs.iter_mut().enumerate() {
            let (gr, er) = (
                &g[s * vocab..(s + 1) * vocab],
                &e[s * vocab..(s + 1) * vocab],
            );
            let err = rel_err(gr, er);
            assert!(err < 2e-3, "step {step} seq {s}: relative error {err}");
            q.2 = argmax(er);
            q.0 += 1;
        }
    }
    assert_eq!(copies, (0, 0), "pageable copies during M-RoPE decode steps");
}

fn glm4v_engine(graphs: bool) -> Engine {
    let _ = cuda();
    let mut config = EngineConfig {
        device: Device::Cuda(0),
        ..EngineConfig::default()
    };
    config.cache.num_blocks = Some(1024);
    config.cuda.graphs = graphs;
    Engine::from_dir(&fixture(GLM4V), config).unwrap()
}

/// The engine on cuda:0 with images: greedy continuations equal transformers' up to the first
/// step whose reference top-2 margin is under 0.05 (bf16 may flip a closer call), and the same
/// with CUDA graphs as without (M-RoPE decode steps replayed).
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn glm4v_engine_on_cuda_gives_the_reference_tokens_with_and_without_graphs() {
    use autoglm_core::engine::Request;
    use autoglm_core::media::ProcessedImage;
    use std::sync::Arc;
    let run = |engine: &Engine| -> Vec<Vec<u32>> {
        let streams: Vec<_> = glm4v_cases()
            .iter()
            .map(|case| {
                let images = glm4v_images(case)
                    .into_iter()
                    .enumerate()
                    .map(|(i, (g, px))| {
                        Arc::new(ProcessedImage {
                            grid_thw: [1, g[0], g[1]],
                            pixel_values: px,
                            original_hw: (0, 0),
                            resized_hw: (g[0] * 14, g[1] * 14),
                            // Distinct per image file (the encoder and prefix caches key on it).
                            content_hash: case["pixel_values_tensors"][i]
                                .as_str()
                                .unwrap()
                                .bytes()
                                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                                }),
                        })
                    })
                    .collect();
                let greedy = ids(&case["greedy_token_ids"]);
                engine
                    .submit_request(Request {
                        prompt: ids(&case["prompt_token_ids"]),
                        params: SamplingParams {
                            max_tokens: greedy.len(),
                            ignore_eos: true,
                            ..SamplingParams::greedy()
                        },
                        priority: 0,
                        images,
                        cache_salt: None,
                    })
                    .unwrap()
            })
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
    let graphed = run(&glm4v_engine(true));
    let eager = run(&glm4v_engine(false));
    assert_eq!(graphed, eager, "graphs vs eager");
    for (case, got) in glm4v_cases().iter().zip(&graphed) {
        let name = case["name"].as_str().unwrap();
        let want = ids(&case["greedy_token_ids"]);
        let margins = case["greedy_top2_margins"].as_array().unwrap();
        let clear = margins
            .iter()
            .position(|m| m.as_f64().unwrap() < 0.05)
            .unwrap_or(want.len());
        assert_eq!(
            &got[..clear],
            &want[..clear],
            "{name}: the first {clear} tokens"
        );
    }
}

/// The vision tower's new ops, one by one on the device against the CPU backend:
/// tensor_from_host and group_rows exactly; copy_rows exactly, with the bf16 twin the next GEMM
/// reads kept consistent (copied when both tensors carry one, dropped otherwise); layer_norm,
/// gelu, the position-table resampling and the per-image attention within tolerance.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn vision_ops_match_the_cpu_backend_on_the_device() {
    use autoglm_core::backend::cpu::CpuTensor;
    use autoglm_core::backend::VisionAttentionShape;
    use autoglm_core::model::vision::merge_block_positions;
    use autoglm_core::runner::VisionBatch;
    let gpu = cuda();
    let cpu = CpuBackend::new();
    let data = |n: usize, seed: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let (rows, cols) = (12usize, 40usize);
    let x = data(rows * cols, 1);
    let t = gpu.tensor_from_host(rows, cols, &x).unwrap();
    assert_eq!(gpu.to_host(&t).unwrap(), x, "tensor_from_host");
    assert!(
        gpu.tensor_from_host(rows, cols + 1, &x).is_err(),
        "size mismatch"
    );
    let grouped = gpu.group_rows(t, 4).unwrap();
    assert_eq!((grouped.rows, grouped.cols), (3, 160));
    assert_eq!(
        gpu.to_host(&grouped).unwrap(),
        x,
        "group_rows keeps the data"
    );
    let t = gpu.tensor_from_host(rows, cols, &x).unwrap();
    assert!(gpu.group_rows(t, 5).is_err(), "12 rows in groups of 5");

    // copy_rows, then a GEMM: its result must be that of the copied values.
    let up = |v: Vec<f32>, shape: Vec<usize>| HostTensor::owned(shape, v);
    let wg = gpu.upload(up(data(8 * cols, 2), vec![8, cols])).unwrap();
    let norm = gpu.upload(up(vec![1.0; cols], vec![cols])).unwrap();
    let src_host = data(5 * cols, 3);
    for twins in [true, false] {
        let base = gpu.tensor_from_host(rows, cols, &x).unwrap();
        // With twins: both from rms_norm (which writes one); without: straight from the host.
        let mut dst = if twins {
            gpu.rms_norm(&base, &norm, 1e-6).unwrap()
        } else {
            base
        };
        let s = gpu.tensor_from_host(5, cols, &src_host).unwrap();
        let src = if twins {
            gpu.rms_norm(&s, &norm, 1e-6).unwrap()
        } else {
            s
        };
        let mut want = gpu.to_host(&dst).unwrap();
        let src_vals = gpu.to_host(&src).unwrap();
        want[4 * cols..7 * cols].copy_from_slice(&src_vals[cols..4 * cols]);
        gpu.copy_rows(&mut dst, 4, &src, 1, 3).unwrap();
        assert_eq!(
            gpu.to_host(&dst).unwrap(),
            want,
            "copy_rows (twins: {twins})"
        );
        let fresh = gpu.tensor_from_host(rows, cols, &want).unwrap();
        let a = gpu.to_host(&gpu.linear(&dst, &wg, None).unwrap()).unwrap();
        let b = gpu
            .to_host(&gpu.linear(&fresh, &wg, None).unwrap())
            .unwrap();
        assert_eq!(
            a, b,
            "the GEMM after copy_rows reads the copied rows (twins: {twins})"
        );
        assert!(
            gpu.copy_rows(&mut dst, 10, &src, 0, 3).is_err(),
            "past the end"
        );
    }
    // A twin-carrying destination and a source without one: the stale twin must go.
    let mut dst = gpu
        .rms_norm(&gpu.tensor_from_host(rows, cols, &x).unwrap(), &norm, 1e-6)
        .unwrap();
    let src = gpu.tensor_from_host(5, cols, &src_host).unwrap();
    gpu.copy_rows(&mut dst, 0, &src, 0, 5).unwrap();
    let vals = gpu.to_host(&dst).unwrap();
    let a = gpu.to_host(&gpu.linear(&dst, &wg, None).unwrap()).unwrap();
    let fresh = gpu.tensor_from_host(rows, cols, &vals).unwrap();
    let b = gpu
        .to_host(&gpu.linear(&fresh, &wg, None).unwrap())
        .unwrap();
    assert_eq!(a, b, "a stale bf16 twin was used after copy_rows");

    // layer_norm and gelu.
    let w = data(cols, 4).iter().map(|v| 1.0 + v).collect::<Vec<_>>();
    let bias = data(cols, 5);
    let (wg1, bg1) = (
        gpu.upload(up(w.clone(), vec![cols])).unwrap(),
        gpu.upload(up(bias.clone(), vec![cols])).unwrap(),
    );
    let (wc1, bc1) = (
        cpu.upload(up(w, vec![cols])).unwrap(),
        cpu.upload(up(bias, vec![cols])).unwrap(),
    );
    let xs: Vec<f32> = x.iter().map(|v| 3.0 * v + 2.0).collect();
    let (xg, xc) = (
        gpu.tensor_from_host(rows, cols, &xs).unwrap(),
        CpuTensor::new(rows, cols, xs.clone()),
    );
    let g = gpu
        .to_host(&gpu.layer_norm(&xg, &wg1, &bg1, 1e-5).unwrap())
        .unwrap();
    let c = cpu.layer_norm(&xc, &wc1, &bc1, 1e-5).unwrap().data;
    assert!(rel_err(&g, &c) < 1e-5, "layer_norm: {}", rel_err(&g, &c));
    let g = gpu.to_host(&gpu.gelu(&xg).unwrap()).unwrap();
    let c = cpu.gelu(&xc).unwrap().data;
    assert!(rel_err(&g, &c) < 1e-6, "gelu: {}", rel_err(&g, &c));

    // The position table (bf16-exact values) at grids smaller and larger than it.
    let (side, width) = (24usize, 64usize);
    let table: Vec<f32> = data(side * side * width, 6)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    let tg = gpu
        .upload(up(table.clone(), vec![side * side, width]))
        .unwrap();
    let tc = cpu.upload(up(table, vec![side * side, width])).unwrap();
    let mut batch = VisionBatch::default();
    for [gh, gw] in [[10usize, 4], [4, 6], [4, 8], [40, 30]] {
        batch.push_image([gh as u32, gw as u32], &merge_block_positions(gh, gw, 2));
    }
    let g = gpu
        .to_host(&gpu.interpolate_pos_embed(&tg, side, &batch).unwrap())
        .unwrap();
    let c = cpu.interpolate_pos_embed(&tc, side, &batch).unwrap().data;
    assert!(
        rel_err(&g, &c) < 1e-6,
        "interpolate_pos_embed: {}",
        rel_err(&g, &c)
    );

    // Attention within each image: the 40x30 image (1200 patches, many tiles) and three small.
    for (nh, hd) in [(4usize, 16usize), (2, 128)] {
        let shape = VisionAttentionShape {
            num_heads: nh,
            head_dim: hd,
            rope_theta: 10000.0,
            scale: (hd as f32).powf(-0.5),
        };
        let n = batch.num_patches();
        let qkv = data(n * 3 * nh * hd, 7 + hd as u32);
        let g = gpu
            .vision_attention(
                &gpu.tensor_from_host(n, 3 * nh * hd, &qkv).unwrap(),
                &batch,
                &shape,
            )
            .unwrap();
        let c = cpu
            .vision_attention(&CpuTensor::new(n, 3 * nh * hd, qkv), &batch, &shape)
            .unwrap();
        let e = rel_err(&gpu.to_host(&g).unwrap(), &c.data);
        assert!(
            e < 1e-4,
            "vision_attention ({nh} heads of {hd}): relative error {e}"
        );
    }
}

/// A full phone screenshot's worth of patches (116 x 112 = 12,992, heads of 128) in one image,
/// beside a small one: the per-image attention on the device equals the CPU's (f32 on both
/// sides). 812 query blocks of 16 patches, each walking 406 key tiles of 32.
#[test]
#[ignore = "needs a CUDA GPU; run with --include-ignored on the GPU machine"]
fn vision_attention_of_a_screenshot_sized_image_matches_the_cpu() {
    use autoglm_core::backend::cpu::CpuTensor;
    use autoglm_core::backend::VisionAttentionShape;
    use autoglm_core::model::vision::merge_block_positions;
    use autoglm_core::runner::VisionBatch;
    let gpu = cuda();
    let cpu = CpuBackend::new();
    let mut batch = VisionBatch::default();
    for [gh, gw] in [[116usize, 112], [4, 6]] {
        batch.push_image([gh as u32, gw as u32], &merge_block_positions(gh, gw, 2));
    }
    let (nh, hd) = (2usize, 128usize);
    let shape = VisionAttentionShape {
        num_heads: nh,
        head_dim: hd,
        rope_theta: 10000.0,
        scale: (hd as f32).powf(-0.5),
    };
    let n = batch.num_patches();
    let w = 3 * nh * hd;
    let qkv: Vec<f32> = (0..(n * w) as u64)
        .map(|i| {
            ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let t = std::time::Instant::now();
    let g = gpu
        .vision_attention(&gpu.tensor_from_host(n, w, &qkv).unwrap(), &batch, &shape)
        .unwrap();
    let g = gpu.to_host(&g).unwrap();
    eprintln!(
        "{n} patches: {:.1} ms on the device (first call, upload included)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let c = cpu
        .vision_attention(&CpuTensor::new(n, w, qkv), &batch, &shape)
        .unwrap();
    for (i, r) in batch.cu_seqlens.windows(2).enumerate() {
        let rows = r[0] as usize * nh * hd..r[1] as usize * nh * hd;
        let e = rel_err(&g[rows.clone()], &c.data[rows]);
        assert!(e < 1e-4, "image {i}: relative error {e}");
    }
}

/// A checkpoint's weights rounded to bf16, as the CUDA backend uploads them: on the CPU backend,
/// the error that rounding the weights alone causes (see [`bf16_tolerances`]).
struct Bf16Rounded(autoglm_core::model::Checkpoint);

impl autoglm_core::model::WeightSource for Bf16Rounded {
    fn tensor(&self, name: &str, shape: &[usize]) -> autoglm_core::Result<HostTensor> {
        let t = self.0.tensor(name, shape)?;
        let data = t
            .data
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        Ok(HostTensor::owned(t.shape.clone(), data))
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// The bf16 noise floor of a fixture: the CPU backend's logits with the weights rounded to bf16,
/// relative error per row against the float32 reference rows `want` (prompt rows, or the
/// teacher-forced decode rows with `decode`). The CUDA backend rounds its activations to bf16
/// before every GEMM as well, which adds about as much again, so its rows are held to
/// `TOL.max(2 * floor)`: most fixtures' floor is under 1.4% (the bound stays TOL), but the
/// full-rotary fixture's reaches 2.8% at some decode steps and glm4v-tiny's some prompt rows.
fn bf16_tolerances(
    name: &str,
    run: &dyn Fn(&GlmModel<CpuBackend>) -> Vec<f32>,
    want: &[f32],
    vocab: usize,
) -> Vec<f32> {
    let cpu = CpuBackend::new();
    let dir = fixture(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = Bf16Rounded(autoglm_core::model::Checkpoint::open(&dir).unwrap());
    let model = GlmModel::from_source(config, &src, &cpu).unwrap();
    let got = run(&model);
    assert_eq!(got.len(), want.len(), "{name}: bf16 floor rows");
    got.chunks(vocab)
        .zip(want.chunks(vocab))
        .map(|(g, w)| TOL.max(2.0 * rel_err(g, w)))
        .collect()
}
