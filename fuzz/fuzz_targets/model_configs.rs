//! The JSON files of a model directory as the engine reads them: `config.json` (`ModelConfig`,
//! validated), `tokenizer_config.json` and `generation_config.json` (through `Tokenizer::from_dir`,
//! beside the fixture's `tokenizer.json`), `preprocessor_config.json` (`ImageProcessorConfig`) and
//! a `chat_template.jinja`, separated by `autoglm_fuzz::SEP`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use autoglm_core::media::ImageProcessorConfig;
use autoglm_core::model::ModelConfig;
use autoglm_core::tokenizer::Tokenizer;

const FILES: [&str; 4] = [
    "tokenizer_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
];

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = autoglm_fuzz::scratch_dir("configs");
        let t = std::fs::read(autoglm_fuzz::fixture("glm4v-tiny").join("tokenizer.json"))
            .expect("fixture tokenizer");
        std::fs::write(d.join("tokenizer.json"), t).expect("scratch tokenizer");
        d
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let parts = autoglm_fuzz::split(data, 5);
    if let Ok(text) = std::str::from_utf8(parts[0]) {
        if let Ok(c) = ModelConfig::from_json(text) {
            let _ = c.validate();
        }
    }
    let dir = dir();
    let files: Vec<(&str, &[u8])> = FILES
        .iter()
        .copied()
        .zip(parts[1..].iter().copied())
        .collect();
    autoglm_fuzz::write_files(dir, &FILES, &files);
    if let Ok(tok) = Tokenizer::from_dir(dir) {
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let _ = tok.apply_chat_template(&messages, None, true);
    }
    if let Ok(cfg) = ImageProcessorConfig::from_dir(dir) {
        let _ = cfg.validate();
    }
});
