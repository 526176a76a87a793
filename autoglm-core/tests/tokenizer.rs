//! Tokenizer and chat-template tests against the Hugging Face reference fixtures.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use autoglm_core::error::Error;
use autoglm_core::tokenizer::{IncrementalDetokenizer, Tokenizer};
use serde_json::{json, Value};

const FIXTURES: [&str; 2] = [
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/glm4-tiny"),
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/glm-tiny-bf16"
    ),
];

fn load(dir: &str) -> Tokenizer {
    Tokenizer::from_dir(Path::new(dir)).unwrap_or_else(|e| panic!("loading {dir}: {e}"))
}

fn expected(dir: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(dir).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("autoglm-tok-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A directory with the fixture's tokenizer.json and the given tokenizer_config.json.
    fn with_template(tag: &str, template: &str) -> Self {
        let d = Self::new(tag);
        std::fs::copy(
            Path::new(FIXTURES[0]).join("tokenizer.json"),
            d.0.join("tokenizer.json"),
        )
        .unwrap();
        let cfg = json!({"chat_template": template, "eos_token": {"content": "<|endoftext|>"}, "bos_token": "[gMASK]"});
        std::fs::write(d.0.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        d
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Feeds `ids` one by one; returns the deltas (the flush last).
fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
    let mut det = IncrementalDetokenizer::new(skip);
    let mut deltas: Vec<String> = ids.iter().map(|&id| det.push(tok, id).unwrap()).collect();
    deltas.push(det.flush(tok).unwrap());
    assert_eq!(det.text(), deltas.concat());
    deltas
}

#[test]
fn tokenizer_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Tokenizer>();
}

#[test]
fn chat_cases_render_and_encode() {
    for dir in FIXTURES {
        let tok = load(dir);
        assert!(tok.has_chat_template());
        let cases = expected(dir)["chat"].as_array().unwrap().clone();
        assert!(!cases.is_empty());
        for case in cases {
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = tok
                .apply_chat_template(&case["messages"], None, agp)
                .unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{dir}");
            assert_eq!(
                tok.encode(&rendered, false).unwrap(),
                ids(&case["token_ids"]),
                "{dir}: {rendered:?}"
            );
        }
    }
}

#[test]
fn tokenizer_cases_encode_and_decode() {
    for dir in FIXTURES {
        let tok = load(dir);
        for case in expected(dir)["tokenizer"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["token_ids"]);
            assert_eq!(tok.encode(text, false).unwrap(), want, "{dir}: {text:?}");
            assert_eq!(
                tok.decode(&want, false).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{dir}: {text:?}"
            );
        }
    }
}

#[test]
fn special_tokens_and_vocab() {
    for dir in FIXTURES {
        let tok = load(dir);
        assert_eq!(tok.eos_token_ids(), &[586, 593, 595], "{dir}");
        assert_eq!(tok.vocab_size(), 600);
        assert_eq!(tok.token_to_id("<|user|>"), Some(593));
        assert_eq!(tok.id_to_token(594).as_deref(), Some("<|assistant|>"));
        assert_eq!(tok.token_to_id("<|no such token|>"), None);
        assert_eq!(tok.id_to_token(1_000_000), None);
        let chat = tok.encode("<|user|>\nhi<|assistant|>", false).unwrap();
        assert_eq!(tok.decode(&chat, true).unwrap(), "\nhi");
        assert_eq!(tok.inner().get_vocab_size(true), 600);
    }
}

#[test]
fn incremental_detokenizer_matches_full_decode() {
    for dir in FIXTURES {
        let tok = load(dir);
        let exp = expected(dir);
        let mut sequences: Vec<Vec<u32>> = exp["tokenizer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["token_ids"]))
            .collect();
        sequences.extend(
            exp["chat"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| ids(&c["token_ids"])),
        );
        for seq in &sequences {
            for skip in [false, true] {
                let full = tok.decode(seq, skip).unwrap();
                let deltas = stream(&tok, seq, skip);
                assert_eq!(deltas.concat(), full, "{dir}: {seq:?}");
                if !full.contains('\u{FFFD}') {
                    assert!(
                        deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                        "{dir}: {deltas:?}"
                    );
                }
                assert_eq!(
                    deltas.last().map(String::as_str),
                    Some(""),
                    "nothing pending at the end"
                );
            }
        }
        // The emoji and Chinese cases do split characters across tokens: some pushes must hold back.
        for text in [
            "emoji 🚀 and   spaces",
            "企业级Open-AutoGLM部署的挑战与演进",
        ] {
            let seq = tok.encode(text, false).unwrap();
            let deltas = stream(&tok, &seq, false);
            assert_eq!(deltas.concat(), text);
            assert!(deltas.iter().any(String::is_empty), "{text}: {deltas:?}");
            assert!(
                deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                "{text}: {deltas:?}"
            );
        }
    }
}

#[test]
fn incremental_detokenizer_flushes_an_incomplete_character() {
    let tok = load(FIXTURES[0]);
    let seq = tok.encode("a🚀", false).unwrap();
    let cut = &seq[..seq.len() - 1];
    let mut det = IncrementalDetokenizer::new(false);
    let pushed: String = cut.iter().map(|&id| det.push(&tok, id).unwrap()).collect();
    assert_eq!(pushed, "a");
    let tail = det.flush(&tok).unwrap();
    assert!(tail.contains('\u{FFFD}'), "{tail:?}");
    assert_eq!(det.text(), tok.decode(cut, false).unwrap());
    assert_eq!(det.flush(&tok).unwrap(), "");
}

#[test]
fn glm_template_renders_tools_with_tojson_indent() {
    let tok = load(FIXTURES[0]);
    let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
    let messages = json!([
        {"role": "system", "content": "", "tools": [tool]},
        {"role": "user", "content": "Weather in 北京?"}
    ]);
    let rendered = tok.apply_chat_template(&messages, None, true).unwrap();
    // Rendered by jinja2 with transformers' settings (json.dumps(indent=4, ensure_ascii=False)).
    let want = "[gMASK]<sop><|system|>\n你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，\
你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n{\n    \"name\": \"get_weather\",\n    \
\"parameters\": {\n        \"type\": \"object\"\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWeather in 北京?<|assistant|>";
    assert_eq!(rendered, want);
}

#[test]
fn tools_variable_and_tojson_match_python_json_dumps() {
    let template = "{% for tool in tools %}{{ tool['function'] | tojson(indent=4) }}\n{% endfor %}{{ messages[0].x | tojson }}|{{ messages[0].x | tojson(ensure_ascii=true, sort_keys=true) }}";
    let d = TempDir::with_template("tools", template);
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let messages = json!([{"role": "user", "content": "", "x": {"a": "<b>&'é\"\n🚀", "n": [1, 2.5, null, true, [], {}]}}]);
    let out = tok
        .apply_chat_template(&messages, Some(&tools), false)
        .unwrap();
    let want = "{\n    \"name\": \"get_weather\",\n    \"parameters\": {\n        \"type\": \"object\"\n    }\n}\n\
{\"a\": \"<b>&'é\\\"\\n🚀\", \"n\": [1, 2.5, null, true, [], {}]}|\
{\"a\": \"<b>&'\\u00e9\\\"\\n\\ud83d\\ude80\", \"n\": [1, 2.5, null, true, [], {}]}";
    assert_eq!(out, want);
}

#[test]
fn template_environment_follows_transformers() {
    let template = "{% for m in messages %}\n  {{ m.role.upper() }}:{{ m['content'].strip() }}{{ m['metadata'] }}|{{ m.get('x', 'dflt') }}\n{% endfor %}\n\
{% if tools is defined %}T{% else %}noT{% endif %}{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}{{ pad_token }}\n";
    let d = TempDir::with_template("env", template);
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    let messages = json!([{"role": "user", "content": "  hi  "}]);
    // jinja2 (trim_blocks, lstrip_blocks) renders this exactly so.
    assert_eq!(
        tok.apply_chat_template(&messages, None, false).unwrap(),
        "  USER:hi|dflt\nnoT[gMASK]<|endoftext|>False"
    );
    assert_eq!(
        tok.apply_chat_template(&messages, Some(&json!([])), true)
            .unwrap(),
        "  USER:hi|dflt\nT[gMASK]<|endoftext|>True"
    );

    let d = TempDir::with_template("strftime", "{{ strftime_now('%Y-%m-%d') }}");
    let date = Tokenizer::from_dir(&d.0)
        .unwrap()
        .apply_chat_template(&json!([]), None, false)
        .unwrap();
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date[..4].parse::<u32>().unwrap() >= 2024,
        "{date:?}"
    );
}

#[test]
fn raise_exception_is_a_template_error() {
    let d = TempDir::with_template(
        "raise",
        "{% if messages | length == 0 %}{{ raise_exception('boom') }}{% endif %}ok",
    );
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    assert_eq!(
        tok.apply_chat_template(&json!([{"role": "user"}]), None, false)
            .unwrap(),
        "ok"
    );
    match tok.apply_chat_template(&json!([]), None, false) {
        Err(Error::Template(msg)) => assert!(msg.contains("boom"), "{msg}"),
        other => panic!("expected a template error, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_culprit() {
    let tok = load(FIXTURES[0]);
    let err = tok
        .apply_chat_template(&json!({"role": "user"}), None, false)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Template(m) if m.contains("messages")),
        "{err}"
    );
    let err = tok
        .apply_chat_template(&json!([]), Some(&json!("nope")), false)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Template(m) if m.contains("tools")),
        "{err}"
    );

    let d = TempDir::with_template("syntax", "{% for m in messages %}");
    let err = Tokenizer::from_dir(&d.0).unwrap_err();
    assert!(
        matches!(&err, Error::Template(m) if m.contains("tokenizer_config.json")),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let d = TempDir::new("missing");
    let err = Tokenizer::from_dir(&d.0).unwrap_err();
    match &err {
        Error::Io { path, .. } => assert_eq!(path, &d.0.join("tokenizer.json")),
        other => panic!("expected an Io error, got {other:?}"),
    }
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(d.0.join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_dir(&d.0).unwrap_err();
    assert!(
        matches!(&err, Error::Tokenizer(m) if m.contains("tokenizer.json")),
        "{err}"
    );
}

#[test]
fn malformed_configs_name_the_file() {
    let d = TempDir::with_template("malformed", "x");
    std::fs::write(d.0.join("tokenizer_config.json"), "{\"chat_template\": ").unwrap();
    let err = Tokenizer::from_dir(&d.0).unwrap_err();
    match &err {
        Error::Json { path, .. } => assert_eq!(path, &d.0.join("tokenizer_config.json")),
        other => panic!("expected a Json error, got {other:?}"),
    }
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    std::fs::write(d.0.join("tokenizer_config.json"), "{\"chat_template\": 3}").unwrap();
    let err = Tokenizer::from_dir(&d.0).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    std::fs::remove_file(d.0.join("tokenizer_config.json")).unwrap();
    std::fs::write(
        d.0.join("generation_config.json"),
        "{\"eos_token_id\": [1, \"x\"]}",
    )
    .unwrap();
    let err = Tokenizer::from_dir(&d.0).unwrap_err();
    assert!(
        err.to_string().contains("generation_config.json")
            && err.to_string().contains("eos_token_id"),
        "{err}"
    );
}

#[test]
fn eos_union_and_no_template() {
    let d = TempDir::new("eos");
    std::fs::copy(
        Path::new(FIXTURES[0]).join("tokenizer.json"),
        d.0.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        d.0.join("generation_config.json"),
        "{\"eos_token_id\": 595}",
    )
    .unwrap();
    std::fs::write(d.0.join("config.json"), "{\"eos_token_id\": [586, 595]}").unwrap();
    let tok = Tokenizer::from_dir(&d.0).unwrap();
    assert_eq!(tok.eos_token_ids(), &[595, 586]);
    assert!(!tok.has_chat_template());
    let err = tok.apply_chat_template(&json!([]), None, true).unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err}");
}

#[test]
fn out_of_vocabulary_ids_do_not_panic() {
    let tok = load(FIXTURES[0]);
    let _ = tok.decode(&[1_000_000, u32::MAX], false);
    assert_eq!(tok.decode(&[], true).unwrap(), "");
    let mut det = IncrementalDetokenizer::new(true);
    for id in [39, u32::MAX, 565, 593, 600, 369] {
        let _ = det.push(&tok, id);
    }
    let _ = det.flush(&tok);
    assert!(det.text().starts_with("Hel"), "{:?}", det.text());
}

/// Streaming any ids (added and special tokens, ids past the vocabulary, bytes that split
/// characters) gives exactly `decode` of the whole list, with or without special tokens, and no
/// delta before the flush holds a half character.
#[test]
fn incremental_text_equals_decode_of_random_ids() {
    for dir in FIXTURES {
        let tok = load(dir);
        let vocab = tok.vocab_size() as u64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let mut seqs: Vec<Vec<u32>> = (0..40)
            .map(|_| (0..1 + next(60)).map(|_| next(vocab + 8) as u32).collect())
            .collect();
        seqs.push(tok.encode("北京 🚀 naïve — 的 ☃", false).unwrap());
        for ids in &seqs {
            for skip in [false, true] {
                let deltas = stream(&tok, ids, skip);
                assert_eq!(
                    deltas.concat(),
                    tok.decode(ids, skip).unwrap(),
                    "{dir}: {ids:?} skip {skip}"
                );
            }
        }
        let text = "北京 🚀 naïve — 的 ☃";
        let deltas = stream(&tok, &tok.encode(text, false).unwrap(), false);
        assert_eq!(deltas.concat(), text);
        assert!(
            deltas.iter().all(|d| !d.contains('\u{FFFD}')),
            "{dir}: {deltas:?}"
        );
    }
}
