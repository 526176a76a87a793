//! Batching must not change results: the same greedy requests give the same tokens alone, all
//! together, mixed with sampled requests, with chunked prefill, with prefix reuse, and under a KV
//! pool so small that preemption happens.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use autoglm_core::engine::{collect, GenerateOutput, Request};
use autoglm_core::{Engine, EngineConfig, FinishReason, SamplingParams};
use common::*;

const STEPS: usize = 24;

fn prompts() -> Vec<Vec<u32>> {
    let e = expected("glm4-tiny");
    let mut p: Vec<Vec<u32>> = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["prompt_token_ids"]))
        .collect();
    p.extend(
        e["chat"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["token_ids"])),
    );
    p
}

fn greedy() -> SamplingParams {
    SamplingParams {
        max_tokens: STEPS,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens: STEPS,
        ignore_eos: true,
        temperature: 0.9,
        top_p: 0.9,
        seed: Some(seed),
        ..Default::default()
    }
}

fn engine(f: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig::default();
    cfg.cache.block_size = 4;
    f(&mut cfg);
    Engine::from_dir(&fixture("glm4-tiny"), cfg).unwrap()
}

/// Submits everything first, then collects, so the requests share engine steps.
fn together(engine: &Engine, reqs: Vec<(Vec<u32>, SamplingParams)>) -> Vec<GenerateOutput> {
    let streams: Vec<_> = reqs
        .into_iter()
        .map(|(p, s)| (s.n, engine.submit(p, s).unwrap()))
        .collect();
    streams
        .into_iter()
        .map(|(n, s)| collect(s, n).unwrap())
        .collect()
}

fn alone(engine: &Engine, reqs: &[(Vec<u32>, SamplingParams)]) -> Vec<Vec<u32>> {
    reqs.iter()
        .map(|(p, s)| {
            engine.generate(p.clone(), s.clone()).unwrap().choices[0]
                .token_ids
                .clone()
        })
        .collect()
}

fn tokens(outs: &[GenerateOutput]) -> Vec<Vec<u32>> {
    outs.iter()
        .map(|o| o.choices[0].token_ids.clone())
        .collect()
}

#[test]
fn greedy_tokens_are_the_same_alone_and_batched() {
    let e = engine(|_| {});
    let reqs: Vec<_> = prompts().into_iter().map(|p| (p, greedy())).collect();
    let solo = alone(&e, &reqs);
    assert_eq!(tokens(&together(&e, reqs.clone())), solo);
    // Fixture continuations are the ground truth for the first three.
    for (case, got) in expected("glm4-tiny")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&solo)
    {
        assert_eq!(&ids(&case["greedy_token_ids"]), got);
    }
}

#[test]
fn greedy_tokens_do_not_change_when_mixed_with_sampled_requests() {
    let e = engine(|_| {});
    let greedy_reqs: Vec<_> = prompts().into_iter().map(|p| (p, greedy())).collect();
    let solo = alone(&e, &greedy_reqs);
    let mut mixed = Vec::new();
    for (i, (p, g)) in greedy_reqs.iter().enumerate() {
        mixed.push((p.clone(), sampled(i as u64)));
        mixed.push((p.clone(), g.clone()));
    }
    let outs = together(&e, mixed);
    let got: Vec<Vec<u32>> = outs
        .iter()
        .skip(1)
        .step_by(2)
        .map(|o| o.choices[0].token_ids.clone())
        .collect();
    assert_eq!(got, solo);
}

#[test]
fn seeded_sampling_is_the_same_whatever_the_batch() {
    let e = engine(|_| {});
    let reqs: Vec<_> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, sampled(100 + i as u64)))
        .collect();
    let solo = alone(&e, &reqs);
    assert_eq!(tokens(&together(&e, reqs.clone())), solo);
    let other_seed = e.generate(reqs[0].0.clone(), sampled(999)).unwrap().choices[0]
        .token_ids
        .clone();
    assert_ne!(
        other_seed, solo[0],
        "a different seed should give different samples"
    );
}

#[test]
fn chunked_prefill_gives_the_same_tokens() {
    let reqs: Vec<_> = prompts().into_iter().map(|p| (p, greedy())).collect();
    let solo = alone(&engine(|_| {}), &reqs);
    let chunked = engine(|c| c.scheduler.max_num_batched_tokens = 5);
    assert_eq!(tokens(&together(&chunked, reqs)), solo);
    assert!(chunked.stats().steps.load(Ordering::Relaxed) > 40);
}

#[test]
fn preemption_by_recompute_gives_the_same_tokens() {
    let reqs: Vec<_> = prompts().into_iter().map(|p| (p, greedy())).collect();
    let solo = alone(&engine(|_| {}), &reqs);
    // 20 blocks of 4 tokens: the longest request alone needs 16, so concurrent ones get preempted.
    let small = engine(|c| {
        c.cache.num_blocks = Some(20);
        c.cache.enable_prefix_caching = false;
    });
    assert_eq!(tokens(&together(&small, reqs.clone())), solo);
    assert!(
        small.stats().preemptions.load(Ordering::Relaxed) > 0,
        "the pool was meant to force preemption"
    );
    // The same with prefix caching on (preempted sequences take their cached blocks back).
    let small = engine(|c| c.cache.num_blocks = Some(20));
    assert_eq!(tokens(&together(&small, reqs)), solo);
    assert_eq!(small.stats().kv_blocks_used.load(Ordering::Relaxed), 0);
}

#[test]
fn prefix_cache_reuses_blocks_and_keeps_tokens() {
    let e = engine(|_| {});
    let prompt = prompts()[2].clone();
    let first = e.generate(prompt.clone(), greedy()).unwrap();
    let second = e.generate(prompt.clone(), greedy()).unwrap();
    assert_eq!(first.usage.cached_prompt_tokens, 0);
    assert!(
        second.usage.cached_prompt_tokens >= prompt.len() - 4,
        "{:?}",
        second.usage
    );
    assert_eq!(first.choices[0].token_ids, second.choices[0].token_ids);
}

#[test]
fn n_choices_share_a_request() {
    let e = engine(|_| {});
    let p = prompts()[1].clone();
    let single = e.generate(p.clone(), greedy()).unwrap().choices[0]
        .token_ids
        .clone();
    let out = e
        .generate(p.clone(), SamplingParams { n: 3, ..greedy() })
        .unwrap();
    assert_eq!(out.choices.len(), 3);
    for c in &out.choices {
        assert_eq!(c.token_ids, single);
    }
    assert_eq!(out.usage.completion_tokens, 3 * STEPS);
    let a = e
        .generate(p.clone(), SamplingParams { n: 3, ..sampled(5) })
        .unwrap();
    let b = e
        .generate(p, SamplingParams { n: 3, ..sampled(5) })
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a.choices[0].token_ids, a.choices[1].token_ids);
}

#[test]
fn stop_strings_and_stop_tokens_end_the_output() {
    let e = engine(|_| {});
    let p = prompts()[2].clone();
    let full = e.generate(p.clone(), greedy()).unwrap().choices.remove(0);
    assert!(full.text.chars().count() > 6, "{:?}", full.text);
    // A stop string from the middle of the text: output is everything before it.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let got = e
        .generate(
            p.clone(),
            SamplingParams {
                stop: vec![stop.clone()],
                ..greedy()
            },
        )
        .unwrap()
        .choices
        .remove(0);
    assert_eq!(got.text, full.text[..cut], "stop {stop:?}");
    assert_eq!(got.finish_reason, Some(FinishReason::Stop));
    // A stop token: kept in token_ids, generation ends there.
    let tok = full.token_ids[5];
    let first = full.token_ids.iter().position(|&t| t == tok).unwrap();
    let got = e
        .generate(
            p.clone(),
            SamplingParams {
                stop_token_ids: vec![tok],
                ..greedy()
            },
        )
        .unwrap()
        .choices
        .remove(0);
    assert_eq!(got.token_ids, full.token_ids[..=first]);
    assert_eq!(got.finish_reason, Some(FinishReason::Stop));
    // max_tokens.
    let got = e
        .generate(
            p,
            SamplingParams {
                max_tokens: 3,
                ..greedy()
            },
        )
        .unwrap()
        .choices
        .remove(0);
    assert_eq!(got.token_ids, full.token_ids[..3]);
    assert_eq!(got.finish_reason, Some(FinishReason::Length));
}

#[test]
fn streamed_text_concatenates_to_the_decoded_output() {
    let e = engine(|_| {});
    let p = prompts()[0].clone();
    let mut text = String::new();
    let mut ids = Vec::new();
    for ev in e.submit(p, greedy()).unwrap() {
        let ev = ev.unwrap();
        text.push_str(&ev.text);
        ids.extend(ev.token_ids);
    }
    assert_eq!(text, e.tokenizer().unwrap().decode(&ids, true).unwrap());
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dropping_a_stream_cancels_and_frees_its_blocks() {
    let e = engine(|c| c.scheduler.max_model_len = Some(4096));
    let long = SamplingParams {
        max_tokens: 4000,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let mut stream = e.submit(prompts()[2].clone(), long).unwrap();
    stream.next().unwrap().unwrap();
    wait_for("blocks in use", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) > 0
    });
    drop(stream);
    wait_for("blocks back in the pool", || {
        e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            && e.stats().running.load(Ordering::Relaxed) == 0
    });
    // The engine still serves requests afterwards.
    assert_eq!(
        e.generate(prompts()[0].clone(), greedy()).unwrap().choices[0]
            .token_ids
            .len(),
        STEPS
    );
}

#[test]
fn higher_priority_waiting_requests_run_first() {
    // One sequence at a time: the order of completion is the order of admission.
    let e = engine(|c| c.scheduler.max_num_seqs = 1);
    let busy = e
        .submit(
            prompts()[2].clone(),
            SamplingParams {
                max_tokens: 200,
                ..greedy()
            },
        )
        .unwrap();
    // The low-priority request runs long, so the threads collecting the two streams cannot
    // record them out of order on a loaded machine.
    let low = e
        .submit_request(Request {
            prompt: prompts()[0].clone(),
            params: SamplingParams {
                max_tokens: 200,
                ..greedy()
            },
            priority: 5,
            images: Vec::new(),
            cache_salt: None,
        })
        .unwrap();
    let high = e
        .submit_request(Request {
            prompt: prompts()[1].clone(),
            params: greedy(),
            priority: -1,
            images: Vec::new(),
            cache_salt: None,
        })
        .unwrap();
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let handles: Vec<_> = [("low", low), ("high", high)]
        .into_iter()
        .map(|(name, s)| {
            let done = done.clone();
            std::thread::spawn(move || {
                collect(s, 1).unwrap();
                done.lock().unwrap().push(name);
            })
        })
        .collect();
    collect(busy, 1).unwrap();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(*done.lock().unwrap(), vec!["high", "low"]);
}

#[test]
fn many_threads_submit_at_once() {
    let e = engine(|_| {});
    let want = alone(&e, &[(prompts()[0].clone(), greedy())]).remove(0);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let e = e.clone();
            let p = prompts()[0].clone();
            std::thread::spawn(move || e.generate(p, greedy()).unwrap().choices.remove(0).token_ids)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

#[test]
fn engine_handle_is_send_and_sync() {
    fn is_send_sync<T: Send + Sync>() {}
    fn is_send<T: Send>() {}
    is_send_sync::<Engine>();
    is_send::<autoglm_core::RequestStream>();
}
