//! Hostile chat messages through both fixtures' chat templates (GLM-4's from
//! `tokenizer_config.json`, Glm4v's from `chat_template.jinja`): message content is data, so
//! template syntax inside it must come out verbatim, never be evaluated.
//!
//! The input is a JSON array of messages, or `{"messages": [...], "tools": [...]}`; anything else
//! becomes the text of one user message.
#![no_main]

use std::sync::OnceLock;

use autoglm_core::chat::{prepare_chat, ContentFormat};
use autoglm_core::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn tokenizers() -> &'static [Tokenizer; 2] {
    static T: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        ["glm4-tiny", "glm4v-tiny"]
            .map(|n| Tokenizer::from_dir(&autoglm_fuzz::fixture(n)).expect("fixture tokenizer"))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (messages, tools, plain) = match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(mut o)) => (
            o.remove("messages").unwrap_or(Value::Null),
            o.remove("tools"),
            None,
        ),
        Ok(v) => (v, None, None),
        Err(_) => {
            let text = String::from_utf8_lossy(data).into_owned();
            (json!([{"role": "user", "content": text}]), None, Some(text))
        }
    };
    for format in [ContentFormat::String, ContentFormat::OpenAi] {
        let Ok(chat) = prepare_chat(&messages, format) else {
            continue;
        };
        for tok in tokenizers() {
            for add_generation_prompt in [false, true] {
                let Ok(text) =
                    tok.apply_chat_template(&chat.messages, tools.as_ref(), add_generation_prompt)
                else {
                    continue;
                };
                if let Some(plain) = &plain {
                    // The content is rendered as it is (the templates do not trim user text).
                    assert!(
                        text.contains(plain.trim()),
                        "content altered: {plain:?} -> {text:?}"
                    );
                }
                let _ = tok.encode(&text, false);
            }
        }
    }
});
