//! Glm4vForConditionalGeneration against transformers, stage by stage (the glm4v-tiny fixture):
//! vision tower, M-RoPE positions, prompt logits with images, greedy decoding through the engine.
//! The images' pixel values are the fixture's own here, so these tests check the model alone;
//! `media_fixtures.rs` checks preprocessing.

mod common;

use std::sync::Arc;

use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::backend::Backend;
use autoglm_core::engine::Request;
use autoglm_core::media::ProcessedImage;
use autoglm_core::model::mrope::mrope_positions;
use autoglm_core::model::vision::ImageRows;
use autoglm_core::model::{Architecture, GlmModel, ModelConfig};
use autoglm_core::runner::ForwardBatch;
use autoglm_core::{Engine, EngineConfig, SamplingParams};
use common::*;
use serde_json::Value;

const NAME: &str = "glm4v-tiny";
const BLOCK: usize = 4;

fn expected_i64(tensor: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(fixture(NAME).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(tensor).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{tensor}");
    let data = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), data)
}

fn cases() -> Vec<Value> {
    expected(NAME)["cases"].as_array().unwrap().clone()
}

fn tensor(name: &str) -> Vec<f32> {
    expected_tensor(NAME, name).1
}

/// The case's images as transformers preprocessed them.
fn images(case: &Value) -> Vec<Arc<ProcessedImage>> {
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
            Arc::new(ProcessedImage {
                grid_thw: [g[0] as usize, g[1] as usize, g[2] as usize],
                pixel_values: tensor(t.as_str().unwrap()),
                original_hw: (0, 0),
                resized_hw: (g[1] as usize * 14, g[2] as usize * 14),
                // Distinct per image file (the encoder cache and prefix cache key on it).
                content_hash: t
                    .as_str()
                    .unwrap()
                    .bytes()
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                    }),
            })
        })
        .collect()
}

#[test]
fn config_reads_text_and_vision_settings_in_both_layouts() {
    let c = ModelConfig::from_file(&fixture(NAME).join("config.json")).unwrap();
    assert_eq!(c.architecture, Architecture::Glm4v);
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads),
        (128, 2, 4, 2)
    );
    assert_eq!((c.head_dim, c.rotary_dim, c.vocab_size), (32, 16, 640));
    assert_eq!(c.mrope_section, Some([2, 3, 3]));
    assert_eq!(c.eos_token_ids, [584, 591, 593, 603]);
    let v = c.vision.as_ref().unwrap();
    assert_eq!(
        (v.depth, v.hidden_size, v.num_heads, v.out_hidden_size),
        (2, 64, 4, 128)
    );
    assert_eq!(
        (
            v.image_token_id,
            v.image_start_token_id,
            v.image_end_token_id
        ),
        (598, 594, 595)
    );
    assert_eq!((v.patch_dim(), v.num_positions_side()), (1176, 24));

    // GLM-4.1V-9B-Thinking's older layout: rope keys inside text_config, mrope_section under
    // rope_scaling, vision model_type "glm4v".
    let mut old: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(NAME).join("config.json")).unwrap())
            .unwrap();
    let text = old["text_config"].as_object_mut().unwrap();
    text.remove("rope_parameters");
    text.insert("rope_theta".into(), 10000.0.into());
    text.insert("partial_rotary_factor".into(), 0.5.into());
    text.insert(
        "rope_scaling".into(),
        serde_json::json!({"rope_type": "default", "type": "default", "mrope_section": [2, 3, 3]}),
    );
    old["vision_config"]["model_type"] = "glm4v".into();
    let o = ModelConfig::from_json(&old.to_string()).unwrap();
    assert_eq!(o, c);

    // A wrong section sum or a missing vision config is named.
    let mut bad = old.clone();
    bad["text_config"]["rope_scaling"]["mrope_section"] = serde_json::json!([2, 3, 4]);
    let e = ModelConfig::from_json(&bad.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mrope_section") && e.contains("sums to 9"),
        "{e}"
    );
    let mut bad = old;
    bad.as_object_mut().unwrap().remove("vision_config");
    let e = ModelConfig::from_json(&bad.to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vision_config"), "{e}");
}

#[test]
fn vision_tower_matches_every_stage() {
    let backend = CpuBackend::new();
    let model = GlmModel::load(&fixture(NAME), &backend).unwrap();
    let vision = model.vision().unwrap();
    for case in cases() {
        let name = case["name"].as_str().unwrap().to_string();
        let imgs = images(&case);
        if imgs.is_empty() {
            continue;
        }
        let grids: Vec<[usize; 2]> = imgs
            .iter()
            .map(|i| [i.grid_thw[1], i.grid_thw[2]])
            .collect();
        let batch = vision.batch(&grids).unwrap();
        // The patch coordinates and per-image sequences transformers used.
        let (_, hw) = expected_i64(&format!("{name}.vision.position_ids_hw"));
        let ours: Vec<i64> = batch
            .patch_hw
            .iter()
            .flat_map(|p| [p[0] as i64, p[1] as i64])
            .collect();
        assert_eq!(ours, hw, "{name}: patch coordinates");
        let (_, cu) = expected_i64(&format!("{name}.vision.cu_seqlens"));
        assert_eq!(
            batch
                .cu_seqlens
                .iter()
                .map(|&x| x as i64)
                .collect::<Vec<_>>(),
            cu
        );
        let pixels: Vec<f32> = imgs.iter().flat_map(|i| i.pixel_values.clone()).collect();
        let stages = case["vision_stage_tensors"].as_object().unwrap().clone();
        let mut checked = 0;
        let out = vision
            .encode_stages(&backend, &pixels, &batch, &mut |stage, t| {
                if let Some(want) = stages.get(stage).and_then(Value::as_str) {
                    let got = backend.to_host(t).unwrap();
                    let want = tensor(want);
                    let e = rel_err(&got, &want);
                    assert!(e < 2e-5, "{name}: {stage}: relative error {e}");
                    checked += 1;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(checked, 9, "{name}: every stored stage compared");
        let embeds = backend.to_host(&out).unwrap();
        let want = tensor(case["image_embeds_tensor"].as_str().unwrap());
        assert!(rel_err(&embeds, &want) < 2e-5, "{name}: image embeddings");
    }
}

#[test]
fn mrope_positions_and_delta_match_get_rope_index() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_token_ids"]);
        let grids: Vec<[usize; 2]> = images(&case)
            .iter()
            .map(|i| [i.grid_thw[1] / 2, i.grid_thw[2] / 2])
            .collect();
        let p = mrope_positions(&prompt, 598, &grids).unwrap();
        let (shape, want) = expected_i64(case["position_ids_tensor"].as_str().unwrap());
        assert_eq!(shape, vec![3, prompt.len()]);
        for (stream, row) in want.chunks(prompt.len()).enumerate() {
            let got: Vec<i64> = p.positions.iter().map(|x| x[stream] as i64).collect();
            assert_eq!(got, row, "{name}: stream {stream}");
        }
        assert_eq!(
            p.rope_delta,
            case["rope_deltas"].as_i64().unwrap(),
            "{name}"
        );
    }
}

/// One sequence's whole prompt, with its M-RoPE positions and image rows.
fn prompt_logits(model: &GlmModel<CpuBackend>, backend: &CpuBackend, case: &Value) -> Vec<f32> {
    let prompt = ids(&case["prompt_token_ids"]);
    let imgs = images(case);
    let vision = model.vision().unwrap();
    let grids: Vec<[usize; 2]> = imgs
        .iter()
        .map(|i| [i.grid_thw[1], i.grid_thw[2]])
        .collect();
    let merged: Vec<[usize; 2]> = grids.iter().map(|g| [g[0] / 2, g[1] / 2]).collect();
    let pos = mrope_positions(&prompt, 598, &merged).unwrap();
    let blocks: Vec<u32> = (0..prompt.len().div_ceil(BLOCK) as u32).collect();
    let mut b = ForwardBatch::new(blocks.len());
    b.push_seq(&prompt, 0, &blocks, BLOCK);
    b.logits_indices = (0..prompt.len() as u32).collect();
    b.mrope_positions = pos.positions.iter().flatten().copied().collect();
    let embeds: Vec<_> = imgs
        .iter()
        .zip(&grids)
        .map(|(im, g)| {
            let vb = vision.batch(&[*g]).unwrap();
            vision.encode(backend, &im.pixel_values, &vb).unwrap()
        })
        .collect();
    let mut rows = Vec::new();
    let mut k = 0;
    let mut i = 0;
    while i < prompt.len() {
        if prompt[i] == 598 {
            let n = (grids[k][0] * grids[k][1]) / 4;
            rows.push(ImageRows {
                embeds: &embeds[k],
                src_row: 0,
                dst_row: i,
                len: n,
            });
            i += n;
            k += 1;
        } else {
            i += 1;
        }
    }
    let mut cache = backend
        .alloc_kv_cache(model.kv_cache_shape(128, BLOCK))
        .unwrap();
    let l = model
        .forward_logits_with_images(backend, &b, &mut cache, &rows)
        .unwrap();
    backend.to_host(&l).unwrap()
}

#[test]
fn prompt_logits_with_images_match_at_every_position() {
    let backend = CpuBackend::new();
    let model = GlmModel::load(&fixture(NAME), &backend).unwrap();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let logits = prompt_logits(&model, &backend, &case);
        let want = tensor(case["logits_tensor"].as_str().unwrap());
        let vocab = 640;
        let mut worst = 0f32;
        for (pos, (g, w)) in logits.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = rel_err(g, w);
            worst = worst.max(e);
            assert!(e < 1e-4, "{name}: position {pos}: relative error {e}");
        }
        eprintln!("{name}: worst relative error over the prompt {worst:.2e}");
    }
}

fn engine(config: EngineConfig) -> Engine {
    Engine::from_dir(&fixture(NAME), config).unwrap()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: n,
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

#[test]
fn greedy_continuations_with_images_match_and_decode_logits_too() {
    let engine = engine(EngineConfig {
        device: autoglm_core::Device::Cpu,
        ..Default::default()
    });
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let want = ids(&case["greedy_token_ids"]);
        let mut params = greedy(want.len());
        params.logprobs = Some(0);
        let out = engine
            .submit_request(Request {
                prompt: ids(&case["prompt_token_ids"]),
                params,
                priority: 0,
                images: images(&case),
                cache_salt: None,
            })
            .unwrap();
        let out = autoglm_core::engine::collect(out, 1).unwrap();
        assert_eq!(out.choices[0].token_ids, want, "{name}");
        assert_eq!(
            out.usage.prompt_tokens,
            case["prompt_token_ids"].as_array().unwrap().len()
        );
    }
}

#[test]
fn bad_image_requests_are_refused_by_name() {
    let engine = engine(EngineConfig {
        device: autoglm_core::Device::Cpu,
        ..Default::default()
    });
    let case = &cases()[0];
    let prompt = ids(&case["prompt_token_ids"]);
    let imgs = images(case);
    let submit = |prompt: Vec<u32>, images: Vec<Arc<ProcessedImage>>| {
        engine
            .submit_request(Request {
                prompt,
                params: greedy(2),
                priority: 0,
                images,
                cache_salt: None,
            })
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // More images than placeholders, and the reverse.
    let two = vec![imgs[0].clone(), imgs[0].clone()];
    let e = submit(prompt.clone(), two);
    assert!(
        e.contains("1 image placeholder") && e.contains("2 image"),
        "{e}"
    );
    let e = submit(prompt.clone(), vec![]);
    assert!(
        e.contains("1 image placeholder") && e.contains("0 image"),
        "{e}"
    );
    // A run of the wrong length.
    let short: Vec<u32> = prompt
        .iter()
        .copied()
        .filter(|&t| t != 598)
        .chain([598, 598])
        .collect();
    let e = submit(short, imgs.clone());
    assert!(
        e.contains("takes 10 placeholder tokens") && e.contains("has 2"),
        "{e}"
    );
    // Images for a text-only model.
    let text = Engine::from_dir(&fixture("glm4-tiny"), EngineConfig::default()).unwrap();
    let e = text
        .submit_request(Request {
            prompt: vec![1, 2],
            params: greedy(2),
            priority: 0,
            images: imgs,
            cache_salt: None,
        })
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not take images"), "{e}");
    // The engine keeps serving.
    let ok = engine
        .generate(ids(&cases()[3]["prompt_token_ids"]), greedy(3))
        .unwrap();
    assert_eq!(ok.choices[0].token_ids.len(), 3);
}

/// The whole path as a user takes it: OpenAI messages with `data:` PNG URLs, the chat template in
/// the case's content format, preprocessing from the PNG bytes, placeholder expansion, greedy
/// decoding: the prompt equals transformers' `input_ids` and the tokens its greedy continuation.
#[test]
fn chat_messages_with_png_data_urls_give_the_reference_prompt_and_tokens() {
    use autoglm_core::chat::{prepare_chat, ContentFormat, MediaPolicy};
    use autoglm_core::engine::ImageInput;
    use base64::Engine as _;
    let engine = engine(EngineConfig {
        device: autoglm_core::Device::Cpu,
        ..Default::default()
    });
    let tok = engine.tokenizer().unwrap();
    let mut checked = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let files: Vec<String> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        if files.iter().any(|f| f.ends_with(".jpg")) {
            // JPEG decoders differ by a few LSB from libjpeg-turbo (media_fixtures.rs).
            continue;
        }
        // Image URLs become data URLs of the files' bytes, as Open-AutoGLM sends them.
        let mut messages = case["messages"].clone();
        for m in messages.as_array_mut().unwrap() {
            if let Some(parts) = m["content"].as_array_mut() {
                for p in parts {
                    if let Some(url) = p.pointer_mut("/image_url/url") {
                        let bytes =
                            std::fs::read(fixture(NAME).join(url.as_str().unwrap())).unwrap();
                        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                        *url = format!("data:image/png;base64,{b64}").into();
                    }
                }
            }
        }
        let format = match case["content_format"].as_str().unwrap() {
            "string" => ContentFormat::String,
            _ => ContentFormat::OpenAi,
        };
        let chat = prepare_chat(&messages, format).unwrap();
        let text = tok.apply_chat_template(&chat.messages, None, true).unwrap();
        assert_eq!(
            text,
            case["rendered"].as_str().unwrap(),
            "{name}: rendered prompt"
        );
        let prompt = tok.encode(&text, false).unwrap();
        let images: Vec<ImageInput> = chat
            .images
            .into_iter()
            .map(|src| ImageInput::Encoded(MediaPolicy::default().read(src).unwrap()))
            .collect();
        let (expanded, processed) = engine.expand_images(&prompt, &images).unwrap();
        assert_eq!(expanded, ids(&case["input_ids"]), "{name}: expanded prompt");
        let want = ids(&case["greedy_token_ids"]);
        let out = engine
            .submit_request(Request {
                prompt: expanded,
                params: greedy(want.len()),
                priority: 0,
                images: processed,
                cache_salt: None,
            })
            .unwrap();
        let out = autoglm_core::engine::collect(out, 1).unwrap();
        assert_eq!(out.choices[0].token_ids, want, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 3, "screen_openai, agent_step_string and text_only");
}

/// Batching does not change results: every case's greedy tokens, all submitted at once (images
/// next to text-only requests and to other images), with chunked prefill cutting through the
/// images (8 tokens a step), and with a KV pool so small that sequences are preempted and
/// recomputed, match the reference; prefix caching never lets prompts that differ only in their
/// image share blocks.
#[test]
fn batching_chunking_and_preemption_keep_the_tokens() {
    let configs = [
        ("together", EngineConfig::default()),
        ("chunked", {
            let mut c = EngineConfig::default();
            c.scheduler.max_num_batched_tokens = 8;
            c
        }),
        ("preempted", {
            let mut c = EngineConfig::default();
            c.cache.block_size = 4;
            c.cache.num_blocks = Some(60);
            c.scheduler.max_num_batched_tokens = 16;
            c
        }),
        // Features evicted as soon as the budget allows: only the pins keep them for prefill.
        ("no encoder cache", {
            let mut c = EngineConfig::default();
            c.multimodal.encoder_cache_bytes = 0;
            c.scheduler.max_num_batched_tokens = 8;
            c
        }),
        // Encoded on the engine thread, one image per step.
        ("inline", {
            let mut c = EngineConfig::default();
            c.multimodal.concurrent_encoder = false;
            c.multimodal.max_encoder_tokens_per_step = Some(1);
            c
        }),
        ("inline, preempted", {
            let mut c = EngineConfig::default();
            c.multimodal.concurrent_encoder = false;
            c.multimodal.encoder_cache_bytes = 0;
            c.cache.block_size = 4;
            c.cache.num_blocks = Some(60);
            c.scheduler.max_num_batched_tokens = 16;
            c
        }),
    ];
    for (what, mut config) in configs {
        config.device = autoglm_core::Device::Cpu;
        let engine = engine(config);
        if what == "preempted" {
            // The concurrent encoder makes an image request wait for its features, so on a busy
            // machine the requests would trickle in one by one and never fill the small pool.
            // Encoding every image first (under another cache salt, so no prompt block is reused)
            // lets all of them be scheduled at once, as with the inline encoder.
            for case in cases().iter().filter(|c| !images(c).is_empty()) {
                let s = engine
                    .submit_request(Request {
                        prompt: ids(&case["prompt_token_ids"]),
                        params: greedy(1),
                        priority: 0,
                        images: images(case),
                        cache_salt: Some("warm-up".into()),
                    })
                    .unwrap();
                autoglm_core::engine::collect(s, 1).unwrap();
            }
        }
        // Every request twice: the second copy may hit the prefix and encoder caches.
        let mut streams = Vec::new();
        for round in 0..2 {
            for case in cases() {
                let want = ids(&case["greedy_token_ids"]);
                let s = engine
                    .submit_request(Request {
                        prompt: ids(&case["prompt_token_ids"]),
                        params: greedy(want.len()),
                        priority: 0,
                        images: images(&case),
                        cache_salt: None,
                    })
                    .unwrap();
                streams.push((round, case["name"].as_str().unwrap().to_string(), want, s));
            }
        }
        for (round, name, want, s) in streams {
            let out = autoglm_core::engine::collect(s, 1).unwrap();
            assert_eq!(
                out.choices[0].token_ids, want,
                "{what}: {name} (round {round})"
            );
        }
        if what.ends_with("preempted") {
            let p = engine
                .stats()
                .preemptions
                .load(std::sync::atomic::Ordering::Relaxed);
            assert!(p > 0, "{what}: the small pool preempted nothing");
        }
        let encoded = engine
            .stats()
            .images_encoded
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(encoded >= 4, "{what}: {encoded} images encoded");
    }
}

/// Two prompts that differ only in their image share no KV block: the second gets its own
/// image's tokens, not the first's (same placeholder ids, other pixels).
#[test]
fn prompts_differing_only_in_their_image_do_not_share_kv() {
    let engine = engine(EngineConfig {
        device: autoglm_core::Device::Cpu,
        ..Default::default()
    });
    let all = cases();
    let agent = &all[1];
    // exact.png (the agent case's image) and icon.jpg (resized) both have 4x6 patches: same
    // placeholder run, other pixels.
    let two = &all[2];
    let icon = images(two).remove(0);
    assert_eq!(icon.grid_thw, images(agent)[0].grid_thw);
    let prompt = ids(&agent["prompt_token_ids"]);
    let run = |imgs: Vec<Arc<ProcessedImage>>| {
        let s = engine
            .submit_request(Request {
                prompt: prompt.clone(),
                params: greedy(8),
                priority: 0,
                images: imgs,
                cache_salt: None,
            })
            .unwrap();
        autoglm_core::engine::collect(s, 1).unwrap()
    };
    let own = run(images(agent));
    let other = run(vec![icon.clone()]);
    let own_again = run(images(agent));
    assert_eq!(
        own.choices[0].token_ids,
        ids(&agent["greedy_token_ids"])[..8]
    );
    assert_eq!(own_again.choices[0].token_ids, own.choices[0].token_ids);
    // The repeat reused the cached prefix; the other image could reuse only what precedes it.
    assert!(own_again.usage.cached_prompt_tokens > other.usage.cached_prompt_tokens);
    let offset = prompt.iter().position(|&t| t == 598).unwrap();
    assert!(
        other.usage.cached_prompt_tokens <= offset,
        "shared KV past the image"
    );
    // And the other image's continuation is what that image alone gives (a fresh engine).
    let fresh = self::engine(EngineConfig {
        device: autoglm_core::Device::Cpu,
        ..Default::default()
    });
    let s = fresh
        .submit_request(Request {
            prompt: prompt.clone(),
            params: greedy(8),
            priority: 0,
            images: vec![icon],
            cache_salt: None,
        })
        .unwrap();
    let alone = autoglm_core::engine::collect(s, 1).unwrap();
    assert_eq!(other.choices[0].token_ids, alone.choices[0].token_ids);
}
