//! The engine's side of device sampling (`Backend::samples_on_device` / `sample_rows`), checked on
//! the CPU: a backend that computes on the CPU but says it samples where the logits live (as the
//! CUDA backend does) gets every step whose sampled rows need nothing but their token, with each
//! row's parameters and a uniform draw from its sequence's RNG; steps with logprobs or penalties
//! go to the host sampler instead. Its `sample_rows` draws from the host sampler's distribution
//! (`common::expected_shares`), walking the kept tokens in index order as the CUDA kernel does.

mod common;

use std::sync::{Arc, Mutex};

use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::backend::{AttentionShape, Backend, KvCacheShape, RowSampling};
use autoglm_core::model::{GlmModel, HostTensor};
use autoglm_core::runner::ForwardBatch;
use autoglm_core::tokenizer::Tokenizer;
use autoglm_core::{Engine, EngineConfig, Result, SamplingParams};
use common::*;

/// The CPU backend, sampling "on the device"; records the rows of every `sample_rows` call.
struct Sampling {
    cpu: CpuBackend,
    calls: Calls,
}

type Calls = Arc<Mutex<Vec<Vec<RowSampling>>>>;

type Cpu = CpuBackend;

impl Backend for Sampling {
    type Weight = <Cpu as Backend>::Weight;
    type Tensor = <Cpu as Backend>::Tensor;
    type KvCache = <Cpu as Backend>::KvCache;

    fn name(&self) -> String {
        "cpu-sampling".into()
    }
    fn upload(&self, t: HostTensor) -> Result<Self::Weight> {
        self.cpu.upload(t)
    }
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache> {
        self.cpu.alloc_kv_cache(shape)
    }
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor> {
        self.cpu.embedding(table, ids)
    }
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Result<Self::Tensor> {
        self.cpu.rms_norm(x, w, eps)
    }
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.cpu.add_rms_norm(residual, x, w, eps)
    }
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor> {
        self.cpu.linear(x, w, bias)
    }
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor> {
        self.cpu.silu_mul(gate_up)
    }
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor> {
        self.cpu.gather_rows(x, rows)
    }
    fn attention(
        &self,
        qkv: &mut Self::Tensor,
        cache: &mut Self::KvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: &AttentionShape,
    ) -> Result<Self::Tensor> {
        self.cpu.attention(qkv, cache, layer, batch, shape)
    }
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        self.cpu.to_host(x)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn sample_rows(
        &self,
        logits: &Self::Tensor,
        rows: &[RowSampling],
        out: &mut Vec<u32>,
    ) -> Result<()> {
        self.calls.lock().unwrap().push(rows.to_vec());
        let host = self.cpu.to_host(logits)?;
        let vocab = host.len() / rows.len();
        out.clear();
        for (r, l) in rows.iter().zip(host.chunks(vocab)) {
            let shares = expected_shares(l, r);
            let mut left = r.uniform;
            let last = shares.iter().rposition(|&p| p > 0.0).unwrap();
            let pick = (0..vocab)
                .find(|&i| {
                    left -= shares[i];
                    shares[i] > 0.0 && left < 0.0
                })
                .unwrap_or(last);
            out.push(pick as u32);
        }
        Ok(())
    }
}

/// An engine on the glm4-tiny fixture with the `Sampling` backend, and its record of calls.
fn engine() -> (Engine, Calls) {
    let dir = fixture("glm4-tiny");
    let calls = Calls::default();
    let backend = Sampling {
        cpu: CpuBackend::new(),
        calls: calls.clone(),
    };
    let model = GlmModel::load(&dir, &backend).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let e = Engine::new(backend, model, Some(tok), EngineConfig::default()).unwrap();
    (e, calls)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens: 12,
        ignore_eos: true,
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.01,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn cases() -> Vec<(Vec<u32>, Vec<u32>)> {
    expected("glm4-tiny")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (ids(&c["prompt_token_ids"]), ids(&c["greedy_token_ids"])))
        .collect()
}

#[test]
fn greedy_batches_are_sampled_on_the_device_row_by_row() {
    let (e, calls) = engine();
    let cases = cases();
    // All at once: rows of different requests share steps, and each gets its own token.
    let streams: Vec<_> = cases
        .iter()
        .map(|(p, want)| e.submit(p.clone(), greedy(want.len())).unwrap())
        .collect();
    for (s, (_, want)) in streams.into_iter().zip(&cases) {
        let out = autoglm_core::engine::collect(s, 1).unwrap();
        assert_eq!(&out.choices[0].token_ids, want, "fixture greedy tokens");
    }
    let calls = calls.lock().unwrap();
    let tokens: usize = cases.iter().map(|(_, w)| w.len()).sum();
    assert_eq!(
        calls.iter().map(Vec::len).sum::<usize>(),
        tokens,
        "one row per token"
    );
    assert!(
        calls.iter().any(|rows| rows.len() > 1),
        "some step had several rows"
    );
    assert!(calls.iter().flatten().all(|r| *r == RowSampling::GREEDY));
}

/// The uniform draws of the rows recorded since the last call.
fn take_draws(calls: &Calls) -> Vec<f64> {
    let mut calls = calls.lock().unwrap();
    calls.drain(..).flatten().map(|r| r.uniform).collect()
}

#[test]
fn sampled_rows_carry_their_parameters_and_a_fresh_draw() {
    let (e, calls) = engine();
    let prompt = cases()[0].0.clone();
    let a = e.generate(prompt.clone(), sampled(3)).unwrap();
    let rows: Vec<RowSampling> = calls.lock().unwrap().drain(..).flatten().collect();
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert_eq!(
            (r.temperature, r.top_k, r.top_p, r.min_p),
            (0.8, 40, 0.9, 0.01)
        );
        assert!((0.0..1.0).contains(&r.uniform), "{r:?}");
    }
    let mut draws: Vec<f64> = rows.iter().map(|r| r.uniform).collect();
    draws.dedup();
    assert_eq!(draws.len(), 12, "one new draw per token");
    // The seed fixes the draws, so the tokens repeat; another seed draws differently.
    let b = e.generate(prompt.clone(), sampled(3)).unwrap();
    assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids);
    let again = take_draws(&calls);
    assert_eq!(again, draws);
    e.generate(prompt, sampled(4)).unwrap();
    let other = take_draws(&calls);
    assert_ne!(other, draws);
}

#[test]
fn logprobs_and_penalties_keep_the_step_on_the_host() {
    let (e, calls) = engine();
    let (prompt, want) = cases()[1].clone();
    let with_logprobs = SamplingParams {
        logprobs: Some(2),
        ..greedy(want.len())
    };
    let out = e.generate(prompt.clone(), with_logprobs).unwrap();
    assert_eq!(out.choices[0].token_ids, want);
    assert_eq!(out.choices[0].logprobs.len(), want.len());
    let penalised = SamplingParams {
        repetition_penalty: 1.3,
        ..greedy(8)
    };
    e.generate(prompt.clone(), penalised).unwrap();
    assert!(
        calls.lock().unwrap().is_empty(),
        "no step went to sample_rows"
    );

    // A plain request batched with one that wants logprobs is sampled on the host too, and
    // its tokens do not change.
    let plain = e.submit(prompt.clone(), greedy(want.len())).unwrap();
    let lp = e
        .submit(
            prompt,
            SamplingParams {
                logprobs: Some(1),
                ..greedy(want.len())
            },
        )
        .unwrap();
    let plain = autoglm_core::engine::collect(plain, 1).unwrap();
    let lp = autoglm_core::engine::collect(lp, 1).unwrap();
    assert_eq!(plain.choices[0].token_ids, want);
    assert_eq!(lp.choices[0].token_ids, want);
    let calls = calls.lock().unwrap();
    assert!(
        calls.iter().all(|rows| rows.len() == 1),
        "no step that held the logprobs request was sampled on the device: {calls:?}"
    );
}
