//! Generate text with autoglm on the CPU.
//!
//! ```text
//! cargo run --release --example generate -- --model DIR --chat "Hello" --max-tokens 64
//! cargo run --release --example generate -- --prompt-ids 1,2,3 --json --logprobs 5
//! cargo run --release --example generate -- --prompts-file requests.jsonl
//! cargo run --release --example generate -- --model tests/fixtures/glm4v-tiny \
//!     --image tests/fixtures/glm4v-tiny/screen.png --chat "What is on this screen?"
//! ```
//! With no `--model`, the bundled tiny model (random weights) is used.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use autoglm_core::engine::{Completion, GenerateOutput, ImageInput, Usage};
use autoglm_core::media::ProcessedImage;
use autoglm_core::sampling::TokenLogprobs;
use autoglm_core::{Engine, Error, SamplingParams};
use autoglm_examples::{init_logging, model_dir, EngineArgs, List, LogFormat, SamplingArgs};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Generate text with autoglm", version)]
struct Cli {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json). Default: the bundled tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw prompt text.
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// A user message, rendered through the model's chat template.
    #[arg(long, group = "input")]
    chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Prompt token ids, e.g. 1,2,3.
    #[arg(long, group = "input")]
    prompt_ids: Option<List<u32>>,
    /// JSON lines, each with `prompt`, `chat` or `prompt_token_ids` and its own sampling fields;
    /// all are submitted at once and one JSON line per request is printed, in input order.
    #[arg(long, group = "input")]
    prompts_file: Option<PathBuf>,
    /// An image for --chat (placed before its text) or --prompt (one
    /// `<|begin_of_image|><|image|><|end_of_image|>` in the text per image); repeatable.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Log level of autoglm's events (error, warn, info, debug, trace; others' are at warn), or a
    /// full filter such as `info,autoglm::engine=debug`. RUST_LOG, when set, wins.
    #[arg(long)]
    log_level: Option<String>,
    /// How logs are written to stderr: text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_level.as_deref(), cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    let dir = model_dir(cli.model.clone());
    let t0 = Instant::now();
    let mut config = cli.engine.config()?;
    // A command-line tool reads whatever image files its user names.
    let m = &mut config.multimodal;
    m.allowed_local_media_path = m.allowed_local_media_path.take().or(Some("/".into()));
    let engine = Engine::from_dir(&dir, config)?;
    eprintln!(
        "loaded {} ({} layers, hidden {}) from {} on {} in {:.2}s",
        engine.model_config().architecture.name(),
        engine.model_config().num_layers,
        engine.model_config().hidden_size,
        dir.display(),
        engine.backend_name(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(file) = &cli.prompts_file {
        return run_file(&engine, file, &cli.sampling.params());
    }
    let read = |p: &PathBuf| {
        std::fs::read(p)
            .map(ImageInput::Encoded)
            .map_err(|e| Error::Io {
                path: p.clone(),
                source: e,
            })
    };
    let (prompt, images) = if let Some(ids) = &cli.prompt_ids {
        (ids.0.clone(), Vec::new())
    } else if let Some(text) = &cli.prompt {
        let images = cli.images.iter().map(read).collect::<Result<_, _>>()?;
        (engine.tokenizer()?.encode(text, false)?, images)
    } else if let Some(text) = &cli.chat {
        let chat = if cli.images.is_empty() {
            json!(text)
        } else {
            // Each --image is given beside the messages, for a `{"type": "image"}` part.
            let mut parts = vec![json!({"type": "image"}); cli.images.len()];
            parts.push(json!({"type": "text", "text": text}));
            json!([{"role": "user", "content": parts}])
        };
        let given = cli.images.iter().map(read).collect::<Result<_, _>>()?;
        chat_ids(&engine, &chat, cli.system.as_deref(), given)?
    } else {
        return Err(Error::InvalidRequest(
            "give one of --prompt, --chat, --prompt-ids or --prompts-file".into(),
        ));
    };
    run_one(&engine, prompt, &images, cli.sampling.params(), cli.json)
}

/// Renders a chat (a user string or a list of messages, whose content parts may be images:
/// `image_url` data URLs or file paths) through the template and encodes it; returns the images
/// in prompt order.
fn chat_ids(
    engine: &Engine,
    chat: &Value,
    system: Option<&str>,
    given: Vec<ImageInput>,
) -> Result<(Vec<u32>, Vec<ImageInput>), Error> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    match chat {
        Value::String(s) => messages.push(json!({"role": "user", "content": s})),
        Value::Array(list) => messages.extend(list.iter().cloned()),
        other => {
            return Err(Error::InvalidRequest(format!(
                "`chat` must be a string or a list of messages, not {other}"
            )))
        }
    }
    let chat = engine.render_chat(&Value::Array(messages), None, true, given)?;
    Ok((chat.prompt, chat.images))
}

fn run_one(
    engine: &Engine,
    prompt: Vec<u32>,
    images: &[ImageInput],
    params: SamplingParams,
    as_json: bool,
) -> Result<(), Error> {
    let n = params.n;
    let start = Instant::now();
    let (prompt, images) = if images.is_empty() {
        (prompt, Vec::new())
    } else {
        engine.expand_images(&prompt, images)?
    };
    let prompt_len = prompt.len();
    let mut first_token = None;
    let mut out = GenerateOutput {
        choices: vec![Completion::default(); n],
        usage: Usage::default(),
    };
    let mut stdout = std::io::stdout().lock();
    let request = autoglm_core::engine::Request {
        prompt,
        params,
        priority: 0,
        images,
        cache_salt: None,
    };
    for ev in engine.submit_request(request)? {
        let ev = ev?;
        first_token.get_or_insert_with(|| start.elapsed());
        if !as_json && ev.index == 0 {
            let _ = stdout.write_all(ev.text.as_bytes());
            let _ = stdout.flush();
        }
        let c = &mut out.choices[ev.index];
        c.token_ids.extend_from_slice(&ev.token_ids);
        c.text.push_str(&ev.text);
        c.logprobs.extend(ev.logprobs);
        c.finish_reason = ev.finish_reason.or(c.finish_reason);
        if let Some(u) = ev.usage {
            out.usage = u;
        }
    }
    let total = start.elapsed();
    let ttft = first_token.unwrap_or(total);
    let generated = out.usage.completion_tokens;
    let decode_tps = if generated > 1 && total > ttft {
        (generated - n.min(generated)) as f64 / (total - ttft).as_secs_f64()
    } else {
        0.0
    };
    if as_json {
        let mut obj = choice_json(&out.choices[0]);
        obj["usage"] = json!(out.usage);
        obj["ttft_ms"] = json!(ttft.as_secs_f64() * 1e3);
        obj["decode_tok_per_s"] = json!(decode_tps);
        if n > 1 {
            obj["choices"] = out.choices.iter().map(choice_json).collect();
        }
        println!("{obj}");
    } else {
        for (i, c) in out.choices.iter().enumerate().skip(1) {
            println!("\n--- choice {i} ---\n{}", c.text);
        }
        println!();
        eprintln!(
            "prompt tokens: {prompt_len} | generated: {generated} | TTFT: {:.1} ms | decode: {decode_tps:.1} tok/s | finish: {}",
            ttft.as_secs_f64() * 1e3,
            out.choices[0].finish_reason.map_or("none", |f| f.as_str())
        );
    }
    Ok(())
}

fn logprobs_json(lp: &TokenLogprobs) -> Value {
    json!({
        "token_id": lp.token_id,
        "logprob": lp.logprob,
        "top": lp.top.iter().map(|(id, l)| json!({"token_id": id, "logprob": l})).collect::<Vec<_>>(),
    })
}

fn choice_json(c: &Completion) -> Value {
    let mut v = json!({
        "token_ids": c.token_ids,
        "text": c.text,
        "finish_reason": c.finish_reason.map(|f| f.as_str()),
    });
    if !c.logprobs.is_empty() {
        v["logprobs"] = c.logprobs.iter().map(logprobs_json).collect();
    }
    v
}

/// A parsed line of --prompts-file: prompt ids (placeholders expanded), its images, parameters.
type ParsedLine = (
    Vec<u32>,
    Vec<std::sync::Arc<ProcessedImage>>,
    SamplingParams,
);

/// One line of --prompts-file, parsed into prompt ids and parameters.
fn parse_line(
    engine: &Engine,
    line: &str,
    defaults: &SamplingParams,
) -> Result<ParsedLine, String> {
    let mut obj: serde_json::Map<String, Value> =
        serde_json::from_str(line).map_err(|e| e.to_string())?;
    let inputs = ["prompt", "chat", "prompt_token_ids"];
    let given: Vec<&str> = inputs
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    if given.len() != 1 {
        return Err(format!(
            "needs exactly one of `prompt`, `chat`, `prompt_token_ids` (found {given:?})"
        ));
    }
    let input = obj.remove(given[0]).expect("checked");
    // vLLM's offline form: `images` (file paths) for the placeholders of `prompt` text or ids.
    let mut images = Vec::new();
    if let Some(list) = obj.remove("images") {
        let paths: Vec<PathBuf> =
            serde_json::from_value(list).map_err(|e| format!("`images`: {e} (a list of paths)"))?;
        for p in paths {
            let bytes = std::fs::read(&p).map_err(|e| format!("`images`: {}: {e}", p.display()))?;
            images.push(ImageInput::Encoded(bytes));
        }
    }
    let prompt = match given[0] {
        "prompt" => {
            let text = input.as_str().ok_or("`prompt` must be a string")?;
            engine
                .tokenizer()
                .and_then(|t| t.encode(text, false))
                .map_err(|e| e.to_string())?
        }
        "chat" => {
            if !images.is_empty() {
                return Err(
                    "`images` goes with `prompt`; put a chat's images in its messages".into(),
                );
            }
            let (ids, imgs) =
                chat_ids(engine, &input, None, Vec::new()).map_err(|e| e.to_string())?;
            images = imgs;
            ids
        }
        _ => serde_json::from_value(input).map_err(|e| format!("`prompt_token_ids`: {e}"))?,
    };
    let mut params = serde_json::to_value(defaults).expect("SamplingParams serializes");
    for (k, v) in obj {
        params[k] = v;
    }
    let params: SamplingParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
    let (prompt, images) = if images.is_empty() {
        (prompt, Vec::new())
    } else {
        engine
            .expand_images(&prompt, &images)
            .map_err(|e| e.to_string())?
    };
    Ok((prompt, images, params))
}

fn run_file(engine: &Engine, file: &PathBuf, defaults: &SamplingParams) -> Result<(), Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::Io {
        path: file.clone(),
        source: e,
    })?;
    let mut requests = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let req = parse_line(engine, line, defaults).map_err(|e| {
            Error::InvalidRequest(format!("{}: line {}: {e}", file.display(), i + 1))
        })?;
        requests.push((i + 1, req));
    }
    // Submit everything before reading anything, so the requests batch together.
    let mut streams = Vec::new();
    for (line, (prompt, images, params)) in requests {
        let n = params.n;
        let request = autoglm_core::engine::Request {
            prompt,
            params,
            priority: 0,
            images,
            cache_salt: None,
        };
        let stream = engine
            .submit_request(request)
            .map_err(|e| Error::InvalidRequest(format!("{}: line {line}: {e}", file.display())))?;
        streams.push((n, stream));
    }
    for (index, (n, stream)) in streams.into_iter().enumerate() {
        let out = autoglm_core::engine::collect(stream, n)?;
        let mut obj = choice_json(&out.choices[0]);
        obj["index"] = json!(index);
        obj["usage"] = json!(out.usage);
        if n > 1 {
            obj["choices"] = out.choices.iter().map(choice_json).collect();
        }
        println!("{obj}");
    }
    Ok(())
}
