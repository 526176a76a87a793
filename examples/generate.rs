//! Generate from a chat message with the library's engine, streaming the text as it comes. The
//! full command, with every flag, is `autoglm generate`
//! (`cargo run --release --bin autoglm -- generate --help`).
//!
//! ```text
//! cargo run --release --example generate -- [MODEL_DIR] ["message"]
//! ```

use std::io::Write;
use std::path::PathBuf;

use autoglm_core::{Engine, EngineConfig, SamplingParams};
use autoglm_examples::bundled_model;
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(bundled_model);
    let message = args.next().unwrap_or_else(|| "Hello".into());

    let engine = Engine::from_dir(&dir, EngineConfig::default())?;
    let messages = json!([{"role": "user", "content": message}]);
    let chat = engine.render_chat(&messages, None, true, Vec::new())?;
    let params = SamplingParams {
        max_tokens: 32,
        ..SamplingParams::greedy()
    };
    let mut out = std::io::stdout().lock();
    for event in engine.submit(chat.prompt, params)? {
        out.write_all(event?.text.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    Ok(())
}
