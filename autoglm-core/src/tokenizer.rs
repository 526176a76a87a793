//! The model's tokenizer and chat template.
//!
//! [`Tokenizer`] wraps a Hugging Face `tokenizer.json` (through the `tokenizers` crate), the chat
//! template and special-token strings of `tokenizer_config.json`, and the stop ids declared by
//! `generation_config.json` / `config.json`. Chat templates are rendered with minijinja, configured to
//! reproduce `transformers`' `apply_chat_template` (trim/lstrip blocks, Python string methods,
//! `raise_exception`, `strftime_now`, and a `tojson` that matches Python's `json.dumps`).
//!
//! [`IncrementalDetokenizer`] turns generated ids into text deltas for streaming without ever
//! splitting a UTF-8 character.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// A tokenizer loaded from a Hugging Face model directory, with its chat template and stop ids.
///
/// Cloning is cheap (the state is shared behind an `Arc`); the type is `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tok: tokenizers::Tokenizer,
    eos: Vec<u32>,
    env: Environment<'static>,
    /// Names of the compiled templates (`default`, `tool_use`, ...); empty when there is none.
    templates: Vec<String>,
    /// The file the chat template came from, for error messages.
    template_origin: PathBuf,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` strings that are set.
    special: Vec<(&'static str, String)>,
    /// The bytes of every token, for byte-level BPE (built on first use; `None` for other
    /// decoders).
    bytes: std::sync::OnceLock<Option<TokenBytes>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.inner.eos)
            .field("chat_templates", &self.inner.templates)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (chat template; bos/eos/pad/unk token strings)
    /// and the stop ids: the union of `eos_token_id` (an int or a list) of `generation_config.json`
    /// and `config.json` when present (falling back to the id of `eos_token`).
    ///
    /// Only `tokenizer.json` is required. A chat template may also come from `chat_template.jinja`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json_opt(&cfg_path)?.unwrap_or(Json::Null);
        let special = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .into_iter()
            .filter_map(|k| token_string(cfg.get(k)?).map(|s| (k, s)))
            .collect::<Vec<_>>();

        let (sources, template_origin) =
            template_sources(dir, &cfg_path, cfg.get("chat_template"))?;
        let mut env = new_environment();
        let mut templates = Vec::with_capacity(sources.len());
        for (name, source) in sources {
            env.add_template_owned(name.clone(), source)
                .map_err(|e| template_error(&template_origin, &name, &e))?;
            templates.push(name);
        }

        let mut eos = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            let path = dir.join(file);
            if let Some(v) = read_json_opt(&path)?
                .as_ref()
                .and_then(|j| j.get("eos_token_id"))
            {
                collect_eos(&path, v, &mut eos)?;
            }
        }
        if eos.is_empty() {
            let eos_token = special.iter().find(|(k, _)| *k == "eos_token");
            eos.extend(eos_token.and_then(|(_, s)| tok.token_to_id(s)));
        }
        let inner = Inner {
            tok,
            eos,
            env,
            templates,
            template_origin,
            special,
            bytes: std::sync::OnceLock::new(),
        };
        Ok(Tokenizer {
            inner: Arc::new(inner),
        })
    }

    /// This tokenizer with `source` (Jinja) as its only chat template, replacing the model's
    /// (vLLM's `--chat-template`). A template that does not compile is an error.
    pub fn with_chat_template(&self, source: &str) -> Result<Self> {
        let origin = PathBuf::from("--chat-template");
        let mut env = new_environment();
        env.add_template_owned("default".to_string(), source.to_string())
            .map_err(|e| template_error(&origin, "default", &e))?;
        let i = &self.inner;
        let inner = Inner {
            tok: i.tok.clone(),
            eos: i.eos.clone(),
            env,
            templates: vec!["default".into()],
            template_origin: origin,
            special: i.special.clone(),
            bytes: std::sync::OnceLock::new(),
        };
        Ok(Tokenizer {
            inner: Arc::new(inner),
        })
    }

    /// Encodes `text`; with `add_special_tokens` the tokenizer's post-processor adds its tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tok
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {}: {e}", preview(text))))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text; `skip_special_tokens` drops special tokens such as `<|user|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let head = &ids[..ids.len().min(16)];
        (self.inner.tok.decode(ids, skip_special_tokens)).map_err(|e| {
            Error::Tokenizer(format!("cannot decode {} ids {head:?}...: {e}", ids.len()))
        })
    }

    /// Builds what [`IncrementalDetokenizer`] uses (otherwise built by its first token).
    pub(crate) fn prepare_detokenizer(&self) {
        let _ = self.token_bytes();
    }

    /// Each token's bytes when the decoder is byte-level BPE alone (GLM-4's tokenizers): what
    /// `decode` concatenates before reading the result as UTF-8.
    fn token_bytes(&self) -> Option<&TokenBytes> {
        self.inner
            .bytes
            .get_or_init(|| TokenBytes::new(&self.inner.tok))
            .as_ref()
    }

    /// Every token's bytes for a constrained-decoding token trie: special added tokens are
    /// prefixed with 0xFF (so no grammar over text can produce them), ids with no token are
    /// empty. `None` unless the decoder is byte-level BPE.
    pub(crate) fn grammar_token_bytes(&self) -> Option<Vec<Vec<u8>>> {
        let t = self.token_bytes()?;
        Some(
            (0..t.special.len() as u32)
                .map(|id| {
                    let b = t.get(id, false);
                    if t.special[id as usize] {
                        let mut v = Vec::with_capacity(b.len() + 1);
                        v.push(0xFF);
                        v.extend_from_slice(b);
                        v
                    } else {
                        b.to_vec()
                    }
                })
                .collect(),
        )
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tok.get_vocab_size(true)
    }

    /// The ids that end generation, in the order first declared (no duplicates).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos
    }

    /// The id of a token string (added tokens included), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tok.token_to_id(token)
    }

    /// The token string of an id, if the id is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tok.id_to_token(id)
    }

    /// Whether a chat template was found.
    pub fn has_chat_template(&self) -> bool {
        !self.inner.templates.is_empty()
    }

    /// Renders the chat template with Hugging Face semantics.
    ///
    /// `messages` is a JSON array of message objects (`{"role", "content", ...any other keys}`);
    /// `tools` an optional JSON array, exposed to the template as `tools` (undefined when `None`).
    /// The template also sees `add_generation_prompt` and the special-token strings
    /// (`bos_token`, `eos_token`, `pad_token`, `unk_token`) that `tokenizer_config.json` sets.
    pub fn apply_chat_template(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let inner = &*self.inner;
        for (what, v) in [("messages", Some(messages)), ("tools", tools)] {
            if let Some(v) = v.filter(|v| !v.is_array()) {
                let got = preview(&v.to_string());
                return Err(Error::Template(format!(
                    "`{what}` must be a JSON array, got {got}"
                )));
            }
        }
        if inner.templates.is_empty() {
            let origin = inner.template_origin.display();
            return Err(Error::Template(format!(
                "{origin}: the tokenizer has no chat template"
            )));
        }
        let has = |n: &str| inner.templates.iter().any(|t| t == n);
        let name = match () {
            _ if tools.is_some() && has("tool_use") => "tool_use",
            _ if inner.templates.len() == 1 => inner.templates[0].as_str(),
            _ => "default",
        };
        let err = |e: minijinja::Error| template_error(&inner.template_origin, name, &e);
        let template = inner.env.get_template(name).map_err(err)?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        if let Some(t) = tools {
            ctx.push(("tools", Value::from_serialize(t)));
        }
        for (k, v) in &inner.special {
            ctx.push((k, Value::from(v.as_str())));
        }
        template.render(Value::from_iter(ctx)).map_err(err)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner.tok
    }
}

/// Reads and parses a JSON file; `Ok(None)` when it does not exist.
fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A special token given as a string or as an `AddedToken` object `{"content": ...}`.
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The named chat template sources and the file they came from.
fn template_sources(
    dir: &Path,
    cfg_path: &Path,
    v: Option<&Json>,
) -> Result<(Vec<(String, String)>, PathBuf)> {
    let bad = || {
        Error::Template(format!(
            "{}: `chat_template` must be a string or a list of {{\"name\", \"template\"}} objects",
            cfg_path.display()
        ))
    };
    match v {
        Some(Json::String(s)) => Ok((vec![("default".into(), s.clone())], cfg_path.to_path_buf())),
        Some(Json::Array(list)) => {
            let named = list.iter().map(|t| {
                let field = |k: &str| t.get(k).and_then(Json::as_str).map(str::to_owned);
                Some((field("name")?, field("template")?))
            });
            let named = named.collect::<Option<Vec<_>>>().ok_or_else(bad)?;
            Ok((named, cfg_path.to_path_buf()))
        }
        None | Some(Json::Null) => {
            let path = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok((vec![("default".into(), s)], path)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Ok((Vec::new(), cfg_path.to_path_buf()))
                }
                Err(e) => Err(Error::io(path, e)),
            }
        }
        Some(_) => Err(bad()),
    }
}

/// Appends the ids of an `eos_token_id` value (an int, a list of ints, or null) not yet in `out`.
fn collect_eos(path: &Path, v: &Json, out: &mut Vec<u32>) -> Result<()> {
    let bad = || {
        Error::config(
            format!("{}: eos_token_id", path.display()),
            format!(
                "expected a token id or a list of token ids, got {}",
                preview(&v.to_string())
            ),
        )
    };
    let one = |x: &Json| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)
    };
    let ids = match v {
        Json::Null => Vec::new(),
        Json::Array(a) => a.iter().map(one).collect::<Result<Vec<_>>>()?,
        x => vec![one(x)?],
    };
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(())
}

/// At most 80 characters of `s`, quoted, for error messages.
fn preview(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{:?}...", &s[..i]),
        None => format!("{s:?}"),
    }
}

/// A template error naming the file and template, with minijinja's message and its sources.
fn template_error(origin: &Path, name: &str, e: &minijinja::Error) -> Error {
    let mut msg = format!("{} (template {name:?}): {e}", origin.display());
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let _ = write!(msg, ": {s}");
        src = s.source();
    }
    Error::Template(msg)
}

type JinjaResult<T> = std::result::Result<T, minijinja::Error>;

fn jinja_error(msg: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg)
}

/// A minijinja environment configured like transformers' chat-template environment.
fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> JinjaResult<Value> {
        Err(jinja_error(msg))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `strftime_now(format)`: the local time formatted by the C library, as Python's `strftime` does.
#[cfg(unix)]
fn strftime_now(format: String) -> JinjaResult<String> {
    let c_format = std::ffi::CString::new(format.as_str())
        .map_err(|_| jinja_error(format!("strftime_now: NUL byte in {format:?}")))?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let now = libc::time_t::try_from(secs).unwrap_or(0);
    // SAFETY: `libc::tm` is plain data (integers and, on some platforms, a nullable pointer), so
    // all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned values; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return Err(jinja_error(
            "strftime_now: cannot determine the local time".into(),
        ));
    }
    let mut buf = vec![0u8; 256 + 16 * format.len()];
    // SAFETY: `buf` is writable for `buf.len()` bytes, `c_format` is NUL-terminated and `tm` was
    // filled by localtime_r; strftime writes at most `buf.len()` bytes and returns how many.
    let n = unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm) };
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `strftime_now(format)`: unavailable off Unix.
#[cfg(not(unix))]
fn strftime_now(format: String) -> JinjaResult<String> {
    Err(jinja_error(format!(
        "strftime_now({format:?}) is only supported on Unix"
    )))
}

/// How [`tojson`] lays out JSON, after Python's `json.dumps` arguments.
struct JsonStyle {
    indent: Option<String>,
    item_sep: &'static str,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// `tojson(indent=None, ensure_ascii=False, sort_keys=False)`, like transformers' filter, which
/// calls Python's `json.dumps` (no HTML escaping, unlike minijinja's built-in).
fn tojson(value: Value, kwargs: Kwargs) -> JinjaResult<Value> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(jinja_error(format!(
                    "tojson: indent must be an int or a string, not {v}"
                )))
            }
        },
        None => None,
    };
    let style = JsonStyle {
        item_sep: if indent.is_some() { "," } else { ", " },
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| jinja_error(format!("tojson: cannot serialize {value}: {e}")))?;
    let mut out = String::new();
    write_json(&mut out, &json, &style, 0);
    Ok(Value::from_safe_string(out))
}

/// Writes `v` as `json.dumps` would (separators `item_sep` and ": ", Python's indentation).
fn write_json(out: &mut String, v: &Json, style: &JsonStyle, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &style.indent {
            out.push('\n');
            (0..depth).for_each(|_| out.push_str(ind));
        }
    };
    let (open, close, items): (char, char, Vec<(Option<&String>, &Json)>) = match v {
        Json::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
        Json::Object(m) => {
            let mut items: Vec<_> = m.iter().map(|(k, x)| (Some(k), x)).collect();
            if style.sort_keys {
                items.sort_by_key(|(k, _)| *k);
            }
            ('{', '}', items)
        }
        Json::String(s) => return write_json_str(out, s, style.ensure_ascii),
        other => return out.push_str(&other.to_string()),
    };
    out.push(open);
    for (i, (key, x)) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(style.item_sep);
        }
        newline(out, depth + 1);
        if let Some(key) = key {
            write_json_str(out, key, style.ensure_ascii);
            out.push_str(": ");
        }
        write_json(out, x, style, depth + 1);
    }
    if !items.is_empty() {
        newline(out, depth);
    }
    out.push(close);
}

/// A JSON string literal escaped as Python's `json.dumps` does.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' || (ensure_ascii && c > '~') => {
                for unit in c.encode_utf16(&mut [0u16; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The bytes of every token of a byte-level BPE tokenizer, as `tokenizers`' ByteLevel decoder
/// produces them: a token whose characters are all in the byte-to-character alphabet gives the
/// bytes they stand for, any other (an added token such as `<|user|>` with other characters) its
/// own UTF-8. Decoding a run of ids is then concatenating their bytes and reading them as UTF-8
/// (invalid sequences as U+FFFD), with no allocation per token.
#[derive(Debug)]
struct TokenBytes {
    data: Vec<u8>,
    /// Token `id` is `data[offsets[id]..offsets[id + 1]]` (empty for an id with no token, which
    /// `decode` drops).
    offsets: Vec<u32>,
    /// Special added tokens (dropped when skipping special tokens).
    special: Vec<bool>,
}

impl TokenBytes {
    fn new(tok: &tokenizers::Tokenizer) -> Option<TokenBytes> {
        if !matches!(
            tok.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) {
            return None;
        }
        // GPT-2's byte-to-character alphabet: printable Latin-1 stands for itself, the other
        // bytes for U+0100 onwards in byte order.
        let mut char_byte = std::collections::HashMap::with_capacity(256);
        let mut extra = 0u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                char::from(b)
            } else {
                extra += 1;
                char::from_u32(255 + extra)?
            };
            char_byte.insert(c, b);
        }
        // `decode` skips a token whose string is that of a special added token.
        let added = tok.get_added_tokens_decoder();
        let specials: std::collections::HashSet<&str> = added
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.as_str())
            .collect();
        let last_added = added.keys().map(|&id| id as usize + 1).max().unwrap_or(0);
        let n = tok.get_vocab_size(true).max(last_added);
        let mut t = TokenBytes {
            data: Vec::new(),
            offsets: Vec::with_capacity(n + 1),
            special: Vec::with_capacity(n),
        };
        t.offsets.push(0);
        for id in 0..n as u32 {
            let token = tok.id_to_token(id);
            if let Some(token) = &token {
                let start = t.data.len();
                let mapped = token.chars().all(|c| match char_byte.get(&c) {
                    Some(&b) => {
                        t.data.push(b);
                        true
                    }
                    None => false,
                });
                if !mapped {
                    t.data.truncate(start);
                    t.data.extend_from_slice(token.as_bytes());
                }
            }
            t.offsets.push(u32::try_from(t.data.len()).ok()?);
            t.special
                .push(token.as_deref().is_some_and(|s| specials.contains(s)));
        }
        Some(t)
    }

    /// The bytes `decode` contributes for `id` (none for unknown ids and skipped specials).
    fn get(&self, id: u32, skip_special_tokens: bool) -> &[u8] {
        let i = id as usize;
        match self.special.get(i) {
            Some(&special) if !(skip_special_tokens && special) => {
                &self.data[self.offsets[i] as usize..self.offsets[i + 1] as usize]
            }
            _ => &[],
        }
    }
}

/// Where `bytes` can be cut so that the part before reads as UTF-8 exactly as it would inside the
/// whole: before a trailing character whose remaining bytes have not arrived yet, else the end.
fn complete_utf8_prefix(bytes: &[u8]) -> usize {
    let n = bytes.len();
    for back in 1..=n.min(3) {
        let b = bytes[n - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for its lead byte
        }
        let len = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 1, // ASCII, or a byte that starts no character (read as U+FFFD either way)
        };
        return if len > back { n - back } else { n };
    }
    n
}

/// Turns a growing list of token ids into text deltas; never emits half a UTF-8 character.
///
/// For byte-level BPE (GLM-4) the tokens' bytes are appended to a buffer and every complete
/// character is emitted. For other decoders it uses the prefix/read-offset technique of vLLM and
/// TGI: the ids since the last emission are decoded together with the ids of the emission before
/// (so decoders that depend on context, such as SentencePiece's leading space, see it), and text
/// ending in U+FFFD is held back.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special_tokens: bool,
    text: String,
    /// Byte-level path: bytes of an incomplete character.
    pending: Vec<u8>,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a new sequence; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Appends one token; returns the newly completed text (empty while a character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        match tokenizer.token_bytes() {
            Some(t) => {
                self.pending
                    .extend_from_slice(t.get(id, self.skip_special_tokens));
                Ok(self.emit_bytes(false))
            }
            None => self.push_by_decoding(tokenizer, id),
        }
    }

    /// The text held back at the end of a sequence (an incomplete character, rendered as U+FFFD
    /// like Hugging Face's decode); empty when nothing is pending.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        match tokenizer.token_bytes() {
            Some(_) => Ok(self.emit_bytes(true)),
            None => self.step(tokenizer, true),
        }
    }

    fn push_by_decoding(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        self.step(tokenizer, false)
    }

    /// Emits the pending bytes up to the last complete character (all of them when `flush`).
    fn emit_bytes(&mut self, flush: bool) -> String {
        let cut = if flush {
            self.pending.len()
        } else {
            complete_utf8_prefix(&self.pending)
        };
        if cut == 0 {
            return String::new();
        }
        let delta = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        self.text.push_str(&delta);
        delta
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Decodes the window; unless `flush`, holds back text that is empty or ends in U+FFFD.
    fn step(&mut self, tokenizer: &Tokenizer, flush: bool) -> Result<String> {
        let skip = self.skip_special_tokens;
        let prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read], skip)?;
        let new_text = tokenizer.decode(&self.ids[self.prefix..], skip)?;
        let delta = new_text.get(prefix_text.len()..).unwrap_or_default();
        if !flush && (delta.is_empty() || delta.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        self.text.push_str(delta);
        // The emitted ids become the context (prefix) of the next window; older ids are dropped.
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        Ok(delta.to_owned())
    }
}

#[cfg(test)]
mod incremental_tests {
    use super::*;

    #[test]
    fn utf8_cut_holds_back_only_an_unfinished_character() {
        let rocket = "🚀".as_bytes(); // F0 9F 9A 80
        let euro = "€".as_bytes(); // E2 82 AC
        for (bytes, want) in [
            (&b"ab"[..], 2),
            (&rocket[..1], 0),
            (&rocket[..3], 0),
            (rocket, 4),
            (&[b'a', euro[0], euro[1]][..], 1),
            (&[b'a', 0x80, 0x80, 0x80][..], 4), // stray continuation bytes: emitted (U+FFFD)
            (&[b'a', 0xFF][..], 2),
            (&[][..], 0),
        ] {
            assert_eq!(complete_utf8_prefix(bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn the_decoding_path_gives_the_byte_path_text() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/glm4-tiny");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert!(tok.token_bytes().is_some(), "glm4-tiny decodes byte-level");
        let ids = tok.encode("Hello 北京 🚀!", false).unwrap();
        for skip in [false, true] {
            let (mut fast, mut slow) = (
                IncrementalDetokenizer::new(skip),
                IncrementalDetokenizer::new(skip),
            );
            for &id in ids.iter().chain(&[4, 599, 1_000_000]) {
                fast.push(&tok, id).unwrap();
                slow.push_by_decoding(&tok, id).unwrap();
            }
            fast.flush(&tok).unwrap();
            slow.step(&tok, true).unwrap();
            assert_eq!(fast.text(), slow.text());
        }
    }
}
