//! Structured output on the engine (CPU backend, the bundled random-weight GLM-4 fixture): the
//! grammar alone must make every output valid, whatever the seed, with penalties, several
//! choices, `ignore_eos` and preemption; unconstrained requests beside them are unchanged.

mod common;

use autoglm_core::engine::{collect, Request};
use autoglm_core::{Device, Engine, EngineConfig, FinishReason, SamplingParams, StructuredOutput};
use common::fixture;
use serde_json::{json, Value};

fn engine(config: EngineConfig) -> Engine {
    Engine::from_dir(
        &fixture("glm4-tiny"),
        EngineConfig {
            device: Device::Cpu,
            ..config
        },
    )
    .unwrap()
}

fn prompt(e: &Engine) -> Vec<u32> {
    e.tokenizer()
        .unwrap()
        .encode("Tap the settings icon.", true)
        .unwrap()
}

fn run(e: &Engine, params: SamplingParams) -> Vec<(String, Option<FinishReason>)> {
    let n = params.n;
    let s = e
        .submit_request(Request {
            prompt: prompt(e),
            params,
            priority: 0,
            images: Vec::new(),
            cache_salt: None,
        })
        .unwrap();
    let out = collect(s, n).unwrap();
    out.choices
        .into_iter()
        .map(|c| (c.text, c.finish_reason))
        .collect()
}

fn sampled(seed: u64, c: StructuredOutput) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        max_tokens: 400,
        structured: Some(c),
        ..Default::default()
    }
}

fn step_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "action": {"type": "string", "enum": ["tap", "swipe", "type"]},
            "x": {"type": "integer", "minimum": 0, "maximum": 999},
            "done": {"type": "boolean"}
        },
        "required": ["action", "x", "done"],
        "additionalProperties": false
    })
}

fn check_step(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(
        ["tap", "swipe", "type"].contains(&v["action"].as_str().unwrap()),
        "{text}"
    );
    let x = v["x"].as_i64().unwrap();
    assert!((0..=999).contains(&x), "{text}");
    assert!(v["done"].is_boolean(), "{text}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
}

#[test]
fn json_schema_outputs_are_valid_for_every_seed() {
    let e = engine(EngineConfig::default());
    for seed in 0..8 {
        for (text, finish) in run(&e, sampled(seed, StructuredOutput::Json(step_schema()))) {
            assert_eq!(finish, Some(FinishReason::Stop), "seed {seed}: {text:?}");
            check_step(&text);
        }
    }
}

#[test]
fn json_object_regex_choice_and_lark_constrain_the_text() {
    let e = engine(EngineConfig::default());
    for seed in 0..4 {
        // Any object: numbers may have exponents beyond f64 (valid JSON that serde_json refuses).
        // Its strings are free, so a random model may run out of tokens inside one: only a
        // finished object is checked whole.
        let (t, f) = run(&e, sampled(seed, StructuredOutput::JsonObject)).remove(0);
        assert!(t.starts_with('{'), "{t:?}");
        if f == Some(FinishReason::Stop) {
            let mut rest = t.as_bytes();
            assert!(json_value(&mut rest) && rest.is_empty(), "{t:?}");
        }

        let (t, f) = run(
            &e,
            sampled(seed, StructuredOutput::Regex("[0-9]{3}-[a-z]{2}".into())),
        )
        .remove(0);
        assert_eq!(f, Some(FinishReason::Stop));
        let b = t.as_bytes();
        assert!(
            b.len() == 6
                && b[..3].iter().all(u8::is_ascii_digit)
                && b[3] == b'-'
                && b[4..].iter().all(u8::is_ascii_lowercase),
            "{t:?}"
        );

        let choices = vec!["Tap".to_string(), "Swipe left".into(), "Back (home)".into()];
        let (t, _) = run(&e, sampled(seed, StructuredOutput::Choice(choices.clone()))).remove(0);
        assert!(choices.contains(&t), "{t:?}");

        let lark = r#"start: "do(" ACTION ")"
ACTION: "tap" | "back" | "home""#;
        let (t, _) = run(&e, sampled(seed, StructuredOutput::Grammar(lark.into()))).remove(0);
        assert!(
            ["do(tap)", "do(back)", "do(home)"].contains(&t.as_str()),
            "{t:?}"
        );
    }
}

#[test]
fn several_choices_penalties_and_ignore_eos_stay_valid() {
    let e = engine(EngineConfig::default());
    let params = SamplingParams {
        n: 4,
        presence_penalty: 1.5,
        frequency_penalty: 1.0,
        repetition_penalty: 1.3,
        ignore_eos: true,
        top_k: 50,
        top_p: 0.9,
        ..sampled(11, StructuredOutput::Json(step_schema()))
    };
    let out = run(&e, params);
    assert_eq!(out.len(), 4);
    for (text, finish) in out {
        // The grammar ends the choice at the end of its value even with ignore_eos.
        assert_eq!(finish, Some(FinishReason::Stop), "{text:?}");
        check_step(&text);
    }
}

#[test]
fn preempted_constrained_sequences_stay_valid_and_free_ones_are_unchanged() {
    let mut config = EngineConfig::default();
    config.cache.block_size = 4;
    config.cache.num_blocks = Some(40);
    config.scheduler.max_num_batched_tokens = 16;
    let small = engine(config);
    let free = SamplingParams {
        max_tokens: 40,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let want = run(&engine(EngineConfig::default()), free.clone())
        .remove(0)
        .0;
    let mut streams = Vec::new();
    for i in 0..8u64 {
        let params = if i % 2 == 0 {
            sampled(i, StructuredOutput::Json(step_schema()))
        } else {
            free.clone()
        };
        let s = small
            .submit_request(Request {
                prompt: prompt(&small),
                params,
                priority: 0,
                images: Vec::new(),
                cache_salt: None,
            })
            .unwrap();
        streams.push((i, s));
    }
    for (i, s) in streams {
        let out = collect(s, 1).unwrap();
        let text = &out.choices[0].text;
        if i % 2 == 0 {
            check_step(text);
        } else {
            assert_eq!(text, &want, "request {i}: an unconstrained request changed");
        }
    }
    let p = small
        .stats()
        .preemptions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(p > 0, "the small pool preempted nothing");
}

#[test]
fn bad_grammars_are_refused_by_name() {
    let e = engine(EngineConfig::default());
    let cases = [
        (StructuredOutput::Regex("(unclosed".into()), "regex"),
        (
            StructuredOutput::Grammar("start: nothing_defined".into()),
            "grammar",
        ),
        (
            StructuredOutput::Json(json!({"type": "no-such-type"})),
            "json",
        ),
        (
            StructuredOutput::Json(json!(["not", "an", "object"])),
            "json",
        ),
        (StructuredOutput::Choice(Vec::new()), "choice"),
        (
            StructuredOutput::Regex("a".repeat(autoglm_core::sampling::MAX_GRAMMAR_BYTES + 1)),
            "regex",
        ),
    ];
    for (c, field) in cases {
        let err = e
            .submit_request(Request {
                prompt: prompt(&e),
                params: sampled(0, c.clone()),
                priority: 0,
                images: Vec::new(),
                cache_salt: None,
            })
            .err()
            .unwrap_or_else(|| panic!("{c:?} was accepted"));
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{field}`")), "{c:?}: {msg}");
    }
}

/// Consumes one JSON value (RFC 8259 syntax, `", "` and `": "` allowed as separators) from the
/// front of `s`; false if there is none.
fn json_value(s: &mut &[u8]) -> bool {
    fn eat(s: &mut &[u8], c: u8) -> bool {
        while s.first() == Some(&b' ') {
            *s = &s[1..];
        }
        if s.first() == Some(&c) {
            *s = &s[1..];
            true
        } else {
            false
        }
    }
    fn string(s: &mut &[u8]) -> bool {
        if !eat(s, b'"') {
            return false;
        }
        while let Some(&c) = s.first() {
            *s = &s[1..];
            match c {
                b'"' => return true,
                b'\\' => {
                    let Some(&e) = s.first() else { return false };
                    *s = &s[1..];
                    if e == b'u' {
                        if s.len() < 4 || !s[..4].iter().all(u8::is_ascii_hexdigit) {
                            return false;
                        }
                        *s = &s[4..];
                    } else if !b"\"\\/bfnrt".contains(&e) {
                        return false;
                    }
                }
                c if c < 0x20 => return false,
                _ => {}
            }
        }
        false
    }
    fn digits(s: &mut &[u8]) -> usize {
        let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
        *s = &s[n..];
        n
    }
    while s.first() == Some(&b' ') {
        *s = &s[1..];
    }
    match s.first() {
        Some(b'{') => {
            *s = &s[1..];
            if eat(s, b'}') {
                return true;
            }
            loop {
                if !(string(s) && eat(s, b':') && json_value(s)) {
                    return false;
                }
                if eat(s, b'}') {
                    return true;
                }
                if !eat(s, b',') {
                    return false;
                }
            }
        }
        Some(b'[') => {
            *s = &s[1..];
            if eat(s, b']') {
                return true;
            }
            loop {
                if !json_value(s) {
                    return false;
                }
                if eat(s, b']') {
                    return true;
                }
                if !eat(s, b',') {
                    return false;
                }
            }
        }
        Some(b'"') => string(s),
        Some(b't') | Some(b'f') | Some(b'n') => {
            for w in [&b"true"[..], b"false", b"null"] {
                if s.starts_with(w) {
                    *s = &s[w.len()..];
                    return true;
                }
            }
            false
        }
        Some(_) => {
            eat(s, b'-');
            match s.first() {
                Some(b'0') => *s = &s[1..],
                Some(c) if c.is_ascii_digit() => {
                    digits(s);
                }
                _ => return false,
            }
            if s.first() == Some(&b'.') {
                *s = &s[1..];
                if digits(s) == 0 {
                    return false;
                }
            }
            if matches!(s.first(), Some(b'e') | Some(b'E')) {
                *s = &s[1..];
                if matches!(s.first(), Some(b'+') | Some(b'-')) {
                    *s = &s[1..];
                }
                if digits(s) == 0 {
                    return false;
                }
            }
            true
        }
        None => false,
    }
}
