//! Bad input gets a clear error naming the file, field or value, and never a panic.

mod common;

use std::path::Path;

use autoglm_core::engine::Request;
use autoglm_core::{Engine, EngineConfig, Error, SamplingParams};
use common::*;

fn load_err(dir: &Path) -> String {
    match Engine::from_dir(dir, EngineConfig::default()) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_directory_and_files_name_the_path() {
    let e = load_err(Path::new("/nonexistent/model-dir"));
    assert!(e.contains("/nonexistent/model-dir"), "{e}");

    let dir = temp_copy("glm-tiny-bf16", "nofile");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");

    let dir = temp_copy("glm4-tiny", "noshard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    let dir = temp_copy("glm4-tiny", "notok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn truncated_safetensors_is_an_error_naming_the_file() {
    let dir = temp_copy("glm-tiny-bf16", "trunc");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() / 2, 100, 7, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = load_err(&dir);
        assert!(e.contains("model.safetensors"), "truncated to {keep}: {e}");
    }
}

#[test]
fn wrong_tensor_shape_names_the_tensor_and_both_shapes() {
    let dir = temp_copy("glm4-tiny", "shape");
    edit_config(&dir, |v| v["intermediate_size"] = 96.into());
    let e = load_err(&dir);
    assert!(
        e.contains("gate_up_proj") && e.contains("[320, 64]") && e.contains("[192, 64]"),
        "{e}"
    );
    assert!(e.contains("model-0000"), "{e}");
}

#[test]
fn unknown_architecture_and_bad_fields_are_named() {
    let dir = temp_copy("glm4-tiny", "arch");
    edit_config(&dir, |v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"])
    });
    let e = Engine::from_dir(&dir, EngineConfig::default()).unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedArchitecture(ref a) if a == "LlamaForCausalLM"),
        "{e}"
    );

    let dir = temp_copy("glm4-tiny", "kvheads");
    edit_config(&dir, |v| v["num_key_value_heads"] = 3.into());
    let e = load_err(&dir);
    assert!(
        e.contains("num_key_value_heads") && e.contains("config.json"),
        "{e}"
    );

    let dir = temp_copy("glm4-tiny", "missing");
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let e = load_err(&dir);
    assert!(
        e.contains("hidden_size") && e.contains("config.json"),
        "{e}"
    );

    let dir = temp_copy("glm4-tiny", "badjson");
    std::fs::write(
        dir.join("config.json"),
        "{\"architectures\": [\"Glm4ForCausalLM\"], ",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("line"), "{e}");

    let dir = temp_copy("glm4-tiny", "badindex");
    std::fs::write(dir.join("model.safetensors.index.json"), "[1, 2").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors.index.json"), "{e}");
}

#[test]
fn rope_settings_load_from_rope_parameters_too() {
    let dir = temp_copy("glm4-tiny", "ropeparams");
    edit_config(&dir, |v| {
        let o = v.as_object_mut().unwrap();
        let theta = o.remove("rope_theta").unwrap();
        let factor = o.remove("partial_rotary_factor").unwrap();
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}),
        );
    });
    let a = Engine::from_dir(&dir, EngineConfig::default()).unwrap();
    let b = Engine::from_dir(&fixture("glm4-tiny"), EngineConfig::default()).unwrap();
    assert_eq!(a.model_config(), b.model_config());
    let p = SamplingParams {
        max_tokens: 8,
        ..SamplingParams::greedy()
    };
    assert_eq!(
        a.generate(vec![1, 2, 3], p.clone()).unwrap(),
        b.generate(vec![1, 2, 3], p).unwrap()
    );
}

fn request_err(engine: &Engine, prompt: Vec<u32>, params: SamplingParams) -> String {
    match engine.submit_request(Request {
        prompt,
        params,
        priority: 0,
        images: Vec::new(),
        cache_salt: None,
    }) {
        Ok(_) => panic!("request accepted but should not have been"),
        Err(e) => {
            assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn bad_requests_are_rejected_with_the_value_at_fault() {
    let mut cfg = EngineConfig::default();
    cfg.scheduler.max_model_len = Some(32);
    let e = Engine::from_dir(&fixture("glm4-tiny"), cfg).unwrap();
    let ok = SamplingParams::greedy();
    assert!(request_err(&e, vec![], ok.clone()).contains("empty"));
    assert!(request_err(
        &e,
        vec![1],
        SamplingParams {
            max_tokens: 0,
            ..ok.clone()
        }
    )
    .contains("max_tokens"));
    for top_p in [0.0, 1.5, f32::NAN] {
        assert!(request_err(
            &e,
            vec![1],
            SamplingParams {
                top_p,
                ..ok.clone()
            }
        )
        .contains("top_p"));
    }
    assert!(request_err(
        &e,
        vec![1],
        SamplingParams {
            temperature: -1.0,
            ..ok.clone()
        }
    )
    .contains("temperature"));
    assert!(request_err(&e, vec![1], SamplingParams { n: 0, ..ok.clone() }).contains("n = 0"));
    assert!(request_err(
        &e,
        vec![1],
        SamplingParams {
            logprobs: Some(50),
            ..ok.clone()
        }
    )
    .contains("logprobs"));
    let msg = request_err(&e, vec![1; 40], ok.clone());
    assert!(msg.contains("40") && msg.contains("32"), "{msg}");
    let msg = request_err(&e, vec![1, 600], ok.clone());
    assert!(msg.contains("600"), "{msg}");
    // A prompt that fits leaves room: generation stops at the context length.
    let out = e
        .generate(
            vec![1; 30],
            SamplingParams {
                max_tokens: 100,
                ignore_eos: true,
                ..ok
            },
        )
        .unwrap();
    assert_eq!(out.choices[0].token_ids.len(), 2);
    assert_eq!(
        out.choices[0].finish_reason,
        Some(autoglm_core::FinishReason::Length)
    );
}

#[test]
fn bad_engine_configs_are_rejected() {
    let bad = |f: fn(&mut EngineConfig), want: &str| {
        let mut cfg = EngineConfig::default();
        f(&mut cfg);
        let e = Engine::from_dir(&fixture("glm4-tiny"), cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    };
    bad(|c| c.cache.block_size = 0, "cache.block_size");
    bad(|c| c.scheduler.max_num_seqs = 0, "max_num_seqs");
    bad(
        |c| c.scheduler.max_model_len = Some(1 << 20),
        "max_model_len",
    );
    bad(|c| c.cache.num_blocks = Some(1 << 40), "KV cache");
    bad(|c| c.threading.engine_core = Some(100_000), "core 100000");
    bad(
        |c| c.threading.compute_cores = vec![0, 100_001],
        "core 100001",
    );
}

#[test]
fn pinned_threads_run_on_their_cores() {
    let cores = autoglm_core::threading::allowed_cores();
    let mut cfg = EngineConfig::default();
    cfg.threading.engine_core = Some(cores[0]);
    cfg.threading.compute_cores = vec![*cores.last().unwrap()];
    let e = Engine::from_dir(&fixture("glm4-tiny"), cfg.clone()).unwrap();
    let p = SamplingParams {
        max_tokens: 4,
        ..SamplingParams::greedy()
    };
    assert_eq!(
        e.generate(vec![5, 6, 7], p).unwrap().choices[0]
            .token_ids
            .len(),
        4
    );
    let pool = autoglm_core::threading::build_compute_pool(&cfg.threading).unwrap();
    let seen = pool.install(autoglm_core::threading::current_thread_cores);
    assert_eq!(seen, vec![*cores.last().unwrap()]);
}
