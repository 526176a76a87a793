//! Structured output: a grammar (JSON schema, regex, choice list or Lark grammar) decides which
//! tokens a sequence may sample next, through [llguidance](https://github.com/guidance-ai/llguidance),
//! the constrained-decoding core vLLM and SGLang can use.
//!
//! Each constrained choice owns a [`Matcher`]. The mask for its next token is computed on the
//! grammar thread while the engine runs the step's forward pass: when a token is emitted the
//! matcher goes to that thread, consumes the token and computes the next mask, and the sampler
//! waits for it only if it is not ready when the logits are (the engine thread never walks the
//! grammar itself). The mask sets disallowed logits to -inf before penalties, temperature and
//! top-k/p, on both backends (a constrained row is sampled on the host).

use std::sync::{Arc, OnceLock};

use flume::{bounded, Receiver};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::sampling::{StructuredOutput, MAX_GRAMMAR_BYTES};
use crate::tokenizer::Tokenizer;

impl StructuredOutput {
    fn grammar(&self) -> Result<TopLevelGrammar> {
        let bad = |msg: String| Error::InvalidRequest(format!("structured output {msg}"));
        if self.size() > MAX_GRAMMAR_BYTES {
            return Err(bad(format!(
                "`{}`: {} bytes, more than the {MAX_GRAMMAR_BYTES} allowed",
                self.field(),
                self.size()
            )));
        }
        Ok(match self {
            StructuredOutput::Json(schema) => {
                let Value::Object(o) = schema else {
                    return Err(bad(format!(
                        "`json`: the schema must be an object, got {schema}"
                    )));
                };
                let mut o = o.clone();
                // One canonical layout (", " and ": ", no other whitespace): a model cannot pad
                // the value with whitespace until it runs out of tokens.
                o.entry("x-guidance").or_insert_with(|| {
                    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
                });
                TopLevelGrammar::from_json_schema(Value::Object(o))
            }
            StructuredOutput::JsonObject => TopLevelGrammar::from_json_schema(json!({
                "type": "object",
                "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
            })),
            StructuredOutput::Regex(rx) => TopLevelGrammar::from_regex(rx),
            StructuredOutput::Choice(choices) => {
                if choices.is_empty() {
                    return Err(bad("`choice`: the list is empty".into()));
                }
                let alts: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
            StructuredOutput::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Compiles constraints for one tokenizer: built on first use (the token trie of the vocabulary).
pub(crate) struct GrammarCompiler {
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
    tokenizer: Option<Tokenizer>,
    vocab_size: usize,
    eos: u32,
}

impl GrammarCompiler {
    pub(crate) fn new(tokenizer: Option<Tokenizer>, vocab_size: usize) -> Self {
        GrammarCompiler {
            eos: trie_eos(tokenizer.as_ref()),
            factory: OnceLock::new(),
            tokenizer,
            vocab_size,
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>> {
        self.factory
            .get_or_init(|| {
                let tok = self
                    .tokenizer
                    .as_ref()
                    .ok_or("structured output needs a tokenizer; this engine has none")?;
                let mut words = tok
                    .grammar_token_bytes()
                    .ok_or("structured output needs a byte-level BPE tokenizer (GLM-4's kind)")?;
                words.resize(self.vocab_size.max(words.len()), Vec::new());
                let info = TokRxInfo::new(words.len() as u32, self.eos);
                let trie = TokTrie::from(&info, &words);
                let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                // Errors come back to the request; the library itself never writes to stderr.
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| Error::InvalidRequest(e.clone()))
    }

    /// A matcher for `c` in its start state, or a 400-class error naming the constraint.
    pub(crate) fn matcher(&self, c: &StructuredOutput) -> Result<Matcher> {
        let factory = self.factory()?;
        let parser = factory.create_parser(c.grammar()?).map_err(|e| {
            Error::InvalidRequest(format!("structured output `{}`: {e}", c.field()))
        })?;
        let m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(Error::InvalidRequest(format!(
                "structured output `{}`: {e}",
                c.field()
            )));
        }
        Ok(m)
    }
}

/// The end-of-sequence id the token trie knows (its masks allow it where the text may end);
/// every other end-of-sequence id follows it.
pub(crate) fn trie_eos(tok: Option<&Tokenizer>) -> u32 {
    tok.and_then(|t| t.eos_token_ids().first().copied())
        .unwrap_or(0)
}

/// A token mask, or why the grammar cannot go on.
type MaskResult = std::result::Result<SimpleVob, String>;

/// One constrained choice: its matcher, either here or on the grammar thread computing a mask.
pub(crate) struct GrammarSlot {
    matcher: Option<Matcher>,
    pending: Option<Receiver<(Matcher, MaskResult)>>,
    mask: Option<MaskResult>,
}

/// The grammar thread: masks are computed here, beside the engine's forward pass.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
            .thread_name(|i| format!("autoglm-grammar-{i}"))
            .build()
            .expect("the grammar thread starts")
    })
}

impl GrammarSlot {
    /// Starts computing the first mask.
    pub(crate) fn new(matcher: Matcher) -> Self {
        let mut slot = GrammarSlot {
            matcher: Some(matcher),
            pending: None,
            mask: None,
        };
        slot.advance(None);
        slot
    }

    /// Sends the matcher to the grammar thread to consume `token` (if any) and compute the
    /// next mask.
    pub(crate) fn advance(&mut self, token: Option<u32>) {
        let Some(mut m) = self.take_matcher() else {
            return;
        };
        let (tx, rx) = bounded(1);
        self.mask = None;
        self.pending = Some(rx);
        pool().spawn(move || {
            let r = (|| {
                if let Some(t) = token {
                    m.consume_token(t).map_err(|e| e.to_string())?;
                }
                m.compute_mask_or_eos().map_err(|e| e.to_string())
            })();
            let _ = tx.send((m, r));
        });
    }

    fn take_matcher(&mut self) -> Option<Matcher> {
        if let Some(rx) = self.pending.take() {
            if let Ok((m, r)) = rx.recv() {
                self.matcher = Some(m);
                self.mask = Some(r);
            }
        }
        self.matcher.take()
    }

    /// The mask for the next token (waiting for the grammar thread if it is still at it).
    pub(crate) fn mask(&mut self) -> std::result::Result<&SimpleVob, String> {
        if let Some(rx) = self.pending.take() {
            match rx.recv() {
                Ok((m, r)) => {
                    self.matcher = Some(m);
                    self.mask = Some(r);
                }
                Err(_) => self.mask = Some(Err("the grammar thread stopped".into())),
            }
        }
        match &self.mask {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(e.clone()),
            None => Err("no mask was computed".into()),
        }
    }
}

/// Writes `logits` into `out` with every token the mask disallows at -inf; the end-of-sequence
/// ids count as allowed when the mask allows its end-of-sequence token. Returns how many tokens
/// stay allowed.
pub(crate) fn apply_mask(
    mask: &SimpleVob,
    eos: &[u32],
    trie_eos: u32,
    logits: &[f32],
    out: &mut Vec<f32>,
) -> usize {
    let n = logits.len().min(mask.len());
    out.clear();
    out.extend((0..n).map(|i| {
        if mask.get(i) {
            logits[i]
        } else {
            f32::NEG_INFINITY
        }
    }));
    out.resize(logits.len(), f32::NEG_INFINITY);
    if (trie_eos as usize) < n && mask.get(trie_eos as usize) {
        for &e in eos {
            if let (Some(o), Some(&l)) = (out.get_mut(e as usize), logits.get(e as usize)) {
                *o = l;
            }
        }
    }
    out.iter().filter(|l| **l != f32::NEG_INFINITY).count()
}
