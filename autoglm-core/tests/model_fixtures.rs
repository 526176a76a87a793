//! The model against Hugging Face transformers (the fixtures' expected values).

mod common;

use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::backend::Backend;
use autoglm_core::model::GlmModel;
use autoglm_core::runner::ForwardBatch;
use autoglm_core::{Engine, EngineConfig, SamplingParams};
use common::*;

const TOL: f32 = 1e-4;
const BLOCK: usize = 4;

/// A batch of one sequence: `tokens` at positions `start..`, with blocks 0..n in order.
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

#[test]
fn prompt_logits_match_transformers_at_every_position() {
    for name in FIXTURES {
        let backend = CpuBackend::new();
        let model = GlmModel::load(&fixture(name), &backend).unwrap();
        let vocab = model.config().vocab_size;
        for case in expected(name)["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_token_ids"]);
            let mut cache = backend
                .alloc_kv_cache(model.kv_cache_shape(128, BLOCK))
                .unwrap();
            let logits = model
                .forward(&backend, &single(&prompt, 0, true), &mut cache)
                .unwrap();
            let (shape, want) = expected_tensor(name, case["logits_tensor"].as_str().unwrap());
            assert_eq!(shape, vec![prompt.len(), vocab]);
            for pos in 0..prompt.len() {
                let e = rel_err(
                    &logits[pos * vocab..(pos + 1) * vocab],
                    &want[pos * vocab..(pos + 1) * vocab],
                );
                assert!(
                    e < TOL,
                    "{name}: prompt of {} tokens, position {pos}: relative error {e}",
                    prompt.len()
                );
            }
        }
    }
}

#[test]
fn decode_path_logits_and_greedy_tokens_match() {
    for name in FIXTURES {
        let backend = CpuBackend::new();
        let model = GlmModel::load(&fixture(name), &backend).unwrap();
        let vocab = model.config().vocab_size;
        for case in expected(name)["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_token_ids"]);
            let greedy = ids(&case["greedy_token_ids"]);
            let (_, want) = expected_tensor(name, case["greedy_logits_tensor"].as_str().unwrap());
            let mut cache = backend
                .alloc_kv_cache(model.kv_cache_shape(128, BLOCK))
                .unwrap();
            let mut logits = model
                .forward(&backend, &single(&prompt, 0, false), &mut cache)
                .unwrap();
            for (step, &tok) in greedy.iter().enumerate() {
                let e = rel_err(&logits, &want[step * vocab..(step + 1) * vocab]);
                assert!(e < TOL, "{name}: decode step {step}: relative error {e}");
                let best = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0 as u32;
                assert_eq!(best, tok, "{name}: greedy token at step {step}");
                let pos = prompt.len() + step;
                logits = model
                    .forward(&backend, &single(&[tok], pos, false), &mut cache)
                    .unwrap();
            }
        }
    }
}

#[test]
fn engine_greedy_continuations_and_top5_logprobs_match() {
    for name in FIXTURES {
        let engine = Engine::from_dir(&fixture(name), EngineConfig::default()).unwrap();
        for case in expected(name)["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_token_ids"]);
            let greedy = ids(&case["greedy_token_ids"]);
            let params = SamplingParams {
                max_tokens: greedy.len(),
                ignore_eos: true,
                logprobs: Some(5),
                ..SamplingParams::greedy()
            };
            let out = engine.generate(prompt.clone(), params).unwrap();
            let c = &out.choices[0];
            assert_eq!(c.token_ids, greedy, "{name}: prompt {prompt:?}");
            assert_eq!(c.finish_reason, Some(autoglm_core::FinishReason::Length));
            assert_eq!(out.usage.prompt_tokens, prompt.len());
            assert_eq!(out.usage.completion_tokens, greedy.len());
            let top: Vec<u32> = c.logprobs[0].top.iter().map(|t| t.0).collect();
            assert_eq!(top, ids(&case["last_top5_ids"]), "{name}");
            for (got, want) in c.logprobs[0]
                .top
                .iter()
                .zip(case["last_top5_logprobs"].as_array().unwrap())
            {
                let want = want.as_f64().unwrap() as f32;
                assert!(
                    (got.1 - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{name}: logprob {} vs {want}",
                    got.1
                );
            }
            assert!((c.logprobs[0].logprob - c.logprobs[0].top[0].1).abs() < 1e-6);
        }
    }
}

/// A bf16 checkpoint's matrices stay bf16 on the CPU backend, as views of the mapped file (no
/// copy, no widening: half the memory of f32), while the norms are widened; its logits are the
/// fixture's (the tests above), and they equal those of a backend that widens everything.
#[test]
fn bf16_matrices_stay_mapped_and_compute_what_widened_ones_do() {
    use autoglm_core::model::{Checkpoint, HalfData, HalfKind};
    let dir = fixture("glm-tiny-bf16");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let config = autoglm_core::model::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let shape = [config.hidden_size, config.intermediate_size];
    let t = ckpt
        .half_tensor("model.layers.0.mlp.down_proj.weight", &shape)
        .unwrap()
        .expect("stored as bf16");
    assert_eq!(t.kind, HalfKind::Bf16);
    assert!(
        matches!(t.data, HalfData::Mapped { .. }),
        "a view of the map"
    );
    // A shape mismatch is still an error naming the tensor.
    let err = ckpt
        .half_tensor("model.layers.0.mlp.down_proj.weight", &[1, 2])
        .err()
        .expect("wrong shape")
        .to_string();
    assert!(
        err.contains("down_proj") && err.contains("expected [1, 2]"),
        "{err}"
    );

    let kept = CpuBackend::new();
    let wide = CpuBackend::widening();
    let a = GlmModel::load(&dir, &kept).unwrap();
    let b = GlmModel::load(&dir, &wide).unwrap();
    for case in expected("glm-tiny-bf16")["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_token_ids"]);
        let run = |m: &GlmModel<CpuBackend>, be: &CpuBackend| {
            let mut cache = be.alloc_kv_cache(m.kv_cache_shape(64, 4)).unwrap();
            let blocks: Vec<u32> = (0..prompt.len().div_ceil(4) as u32).collect();
            let mut fb = ForwardBatch::new(blocks.len());
            fb.push_seq(&prompt, 0, &blocks, 4);
            fb.logits_indices = (0..prompt.len() as u32).collect();
            m.forward(be, &fb, &mut cache).unwrap()
        };
        let (x, y) = (run(&a, &kept), run(&b, &wide));
        let e = rel_err(&x, &y);
        assert!(e < 1e-5, "prompt of {}: relative error {e}", prompt.len());
    }
}
