//! Device selection without a GPU: `cuda` fails with a reason, `auto` falls back to the CPU and
//! still generates. On a machine with a usable GPU the same tests check the CUDA path instead, so
//! each assertion is about the machine it runs on.

mod common;

use autoglm_core::backend::cuda;
use autoglm_core::{Device, Engine, EngineConfig, Error, SamplingParams};
use common::*;

fn config(device: Device) -> EngineConfig {
    let mut c = EngineConfig {
        device,
        ..EngineConfig::default()
    };
    // On a GPU the pool would otherwise take most of the device for a tiny model.
    c.cache.num_blocks = Some(256);
    c
}

#[test]
fn cuda_without_a_usable_device_is_unavailable_with_a_reason() {
    let result = Engine::from_dir(&fixture("glm4-tiny"), config(Device::Cuda(0)));
    match cuda::probe(0) {
        Err(_) => match result {
            Err(Error::CudaUnavailable(reason)) => {
                assert!(reason.contains("cuda"), "the reason names CUDA: {reason}");
            }
            other => panic!("expected CudaUnavailable, got {other:?}"),
        },
        Ok(_) => assert_eq!(result.unwrap().backend_name(), "cuda:0"),
    }
}

#[test]
fn a_device_number_beyond_the_count_is_unavailable() {
    match Engine::from_dir(&fixture("glm4-tiny"), config(Device::Cuda(4096))) {
        Err(Error::CudaUnavailable(reason)) => assert!(reason.contains("cuda:4096"), "{reason}"),
        other => panic!("expected CudaUnavailable, got {other:?}"),
    }
}

#[test]
fn auto_runs_where_it_can_and_still_generates() {
    let engine = Engine::from_dir(&fixture("glm4-tiny"), config(Device::Auto)).unwrap();
    let gpu = cuda::probe(0).is_ok();
    assert_eq!(engine.backend_name(), if gpu { "cuda:0" } else { "cpu" });
    let case = &expected("glm4-tiny")["cases"][0];
    let (prompt, greedy) = (
        ids(&case["prompt_token_ids"]),
        ids(&case["greedy_token_ids"]),
    );
    let params = SamplingParams {
        max_tokens: greedy.len(),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let out = engine.generate(prompt, params).unwrap();
    assert_eq!(out.choices[0].token_ids.len(), greedy.len());
    if !gpu {
        // The CPU is the f32 reference: exactly transformers' greedy tokens.
        assert_eq!(out.choices[0].token_ids, greedy);
    }
}

#[test]
fn memory_utilization_out_of_range_is_rejected_naming_the_field() {
    for bad in [0.0, -0.5, 1.5, f32::NAN] {
        let mut c = config(Device::Cpu);
        c.cuda.memory_utilization = bad;
        let err = Engine::from_dir(&fixture("glm4-tiny"), c).unwrap_err();
        assert!(
            err.to_string().contains("cuda.memory_utilization"),
            "{bad}: {err}"
        );
    }
}
