//! Sampling parameters and the sampler.
//!
//! The sampler follows vLLM's order: repetition / presence / frequency penalties, then temperature,
//! then top-k, top-p and min-p, then a draw from the request's own RNG. Each sequence owns its RNG,
//! so a seeded request gives the same tokens whatever else is in the batch. Logprobs are those of
//! the model's raw distribution (before penalties and temperature), as vLLM reports them.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Largest `logprobs` (top-N) a request may ask for.
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes (UTF-8).
pub const MAX_STOP_BYTES: usize = 512;
/// Most stop token ids a request may give.
pub const MAX_STOP_TOKEN_IDS: usize = 256;

/// Longest grammar source (schema JSON, regex, choices or Lark text) a request may give.
pub const MAX_GRAMMAR_BYTES: usize = 64 << 10;

/// What a request's output must match (vLLM's `structured_outputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// A JSON value valid against this JSON schema.
    Json(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this grammar in llguidance's Lark syntax (a `start` rule), or a GBNF-style
    /// grammar written as Lark.
    Grammar(String),
}

impl StructuredOutput {
    /// The field a client names for this constraint (for errors).
    pub fn field(&self) -> &'static str {
        match self {
            StructuredOutput::Json(_) => "json",
            StructuredOutput::JsonObject => "json_object",
            StructuredOutput::Regex(_) => "regex",
            StructuredOutput::Choice(_) => "choice",
            StructuredOutput::Grammar(_) => "grammar",
        }
    }

    /// One constraint of kind `kind` (`json`, `regex`, `choice`, `grammar`, `json_object`) from
    /// its JSON value, as vLLM's `structured_outputs` and `guided_*` fields give it (a JSON
    /// schema may also be a string holding one).
    pub fn from_field(kind: &str, v: &Value) -> std::result::Result<Self, String> {
        Ok(match (kind, v) {
            ("json", Value::Object(_)) => StructuredOutput::Json(v.clone()),
            ("json", Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(o @ Value::Object(_)) => StructuredOutput::Json(o),
                _ => return Err("a JSON schema must be an object (or a string holding one)".into()),
            },
            ("json", _) => return Err("a JSON schema must be an object".into()),
            ("json_object", _) => StructuredOutput::JsonObject,
            ("regex", Value::String(s)) => StructuredOutput::Regex(s.clone()),
            ("grammar", Value::String(s)) => StructuredOutput::Grammar(s.clone()),
            ("choice", Value::Array(items)) => StructuredOutput::Choice(
                items
                    .iter()
                    .map(|i| i.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("choice must be a list of strings")?,
            ),
            ("choice", _) => return Err("choice must be a list of strings".into()),
            ("regex" | "grammar", _) => return Err(format!("{kind} must be a string")),
            (other, _) => {
                return Err(format!(
                    "{other} is not a structured-output kind (json, regex, choice, grammar, json_object are)"
                ))
            }
        })
    }

    /// vLLM's `structured_outputs` object (`{"json": schema}`, `{"regex": ...}`, `{"choice":
    /// [...]}`, `{"grammar": ...}`, `{"json_object": true}`): exactly one kind set.
    pub fn from_vllm(v: &Value) -> std::result::Result<Option<Self>, String> {
        let Value::Object(o) = v else {
            return Err("structured_outputs must be an object such as {\"json\": {...}}".into());
        };
        let set: Vec<(&String, &Value)> = o
            .iter()
            .filter(|(k, v)| {
                let unset_flag = k.as_str() == "json_object" && **v == Value::Bool(false);
                !(v.is_null() || unset_flag)
            })
            .collect();
        match set[..] {
            [] => Ok(None),
            [(k, v)] => Self::from_field(k, v).map(Some),
            _ => Err(format!(
                "structured_outputs may set one of json, regex, choice, grammar, json_object; got {}",
                set.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    pub(crate) fn size(&self) -> usize {
        match self {
            StructuredOutput::Json(v) => v.to_string().len(),
            StructuredOutput::JsonObject => 0,
            StructuredOutput::Regex(s) | StructuredOutput::Grammar(s) => s.len(),
            StructuredOutput::Choice(c) => c.iter().map(|s| s.len() + 1).sum(),
        }
    }
}

/// How a request is sampled and when it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Independent completions of the same prompt.
    pub n: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; in (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; in [0, 1].
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in prompt or output; > 0.
    pub repetition_penalty: f32,
    /// Subtracted once from logits of tokens already generated; in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence from logits of tokens already generated; in [-2, 2].
    pub frequency_penalty: f32,
    /// Seed of this request's RNG; `None` draws one.
    pub seed: Option<u64>,
    /// Token ids that end the sequence (kept in `token_ids`, not in the text).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the sequence; not included in the output text.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Return the top-N logprobs of every generated token (and the chosen token's); at most 20.
    pub logprobs: Option<usize>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// A grammar the output must match (structured output); `None` leaves it free.
    pub structured: Option<StructuredOutput>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            max_tokens: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
            structured: None,
        }
    }
}

/// Defaults for the sampling fields a request leaves unset, as a model's `generation_config.json`
/// recommends them (vLLM's `--generation-config auto`): `temperature`, `top_k`, `top_p`, `min_p`,
/// `repetition_penalty` and `max_new_tokens` (as `max_tokens`). Like vLLM, other keys
/// (`do_sample`, `max_length`, ...) are not used. All `None`: the engine's own defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    /// Default `temperature`.
    pub temperature: Option<f32>,
    /// Default `top_k` (0: all tokens).
    pub top_k: Option<usize>,
    /// Default `top_p`.
    pub top_p: Option<f32>,
    /// Default `min_p`.
    pub min_p: Option<f32>,
    /// Default `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// Default `max_tokens` (`max_new_tokens` in the file).
    pub max_tokens: Option<usize>,
}

impl SamplingDefaults {
    /// Reads the defaults of a `generation_config.json`; a missing file gives none. A value of the
    /// wrong type or out of range is an error naming the file and the key.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let json: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })?;
        let bad = |key: &str, want: &str| {
            Error::config(
                format!("{}: {key}", path.display()),
                format!("{} is not {want}", json[key]),
            )
        };
        let float = |key: &str| -> Result<Option<f32>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(|x| Some(x as f32))
                    .ok_or_else(|| bad(key, "a number")),
            }
        };
        let int = |key: &str| -> Result<Option<i64>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_i64().map(Some).ok_or_else(|| bad(key, "an integer")),
            }
        };
        let top_k = match int("top_k")? {
            None => None,
            // transformers' 0 and vLLM's -1 both mean every token.
            Some(0) | Some(-1) => Some(0),
            Some(k) if k > 0 => Some(k as usize),
            Some(_) => return Err(bad("top_k", "-1, 0 or a positive integer")),
        };
        let max_tokens = match int("max_new_tokens")? {
            None => None,
            Some(m) if m > 0 => Some(m as usize),
            Some(_) => return Err(bad("max_new_tokens", "a positive integer")),
        };
        let d = SamplingDefaults {
            temperature: float("temperature")?,
            top_k,
            top_p: float("top_p")?,
            min_p: float("min_p")?,
            repetition_penalty: float("repetition_penalty")?,
            max_tokens,
        };
        d.params().validate().map_err(|e| {
            Error::config(
                path.display().to_string(),
                e.to_string().trim_start_matches("invalid request: "),
            )
        })?;
        Ok(d)
    }

    /// Whether no default is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// [`SamplingParams::default`] with these defaults applied.
    pub fn params(&self) -> SamplingParams {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            max_tokens: self.max_tokens.unwrap_or(d.max_tokens),
            ..d
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), other fields default.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    /// Rejects values outside their ranges, naming the field and value.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: String, want: &str| {
            Err(Error::InvalidRequest(format!("{field} = {v}: {want}")))
        };
        if self.n == 0 || self.n > 128 {
            return bad("n", self.n.to_string(), "must be in 1..=128");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "0".into(), "must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "must be a finite number >= 0",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p.to_string(), "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p.to_string(), "must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty.to_string(),
                "must be > 0",
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, v.to_string(), "must be in [-2, 2]");
            }
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return bad("logprobs", k.to_string(), "must be at most 20");
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "\"\"".into(), "stop strings must not be empty");
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(
                "stop",
                format!("{} strings", self.stop.len()),
                &format!("at most {MAX_STOP_STRINGS} stop strings"),
            );
        }
        if let Some(s) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return bad(
                "stop",
                format!("a string of {} bytes", s.len()),
                &format!("each stop string is at most {MAX_STOP_BYTES} bytes"),
            );
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return bad(
                "stop_token_ids",
                format!("{} ids", self.stop_token_ids.len()),
                &format!("at most {MAX_STOP_TOKEN_IDS} ids"),
            );
        }
        Ok(())
    }
}

/// A request's stop strings, matched in one pass over the text that can hold a new match
/// (an Aho-Corasick automaton: the time per step is the new text plus the longest stop string,
/// whatever their number).
#[derive(Debug, Clone)]
pub struct StopStrings {
    automaton: Option<aho_corasick::AhoCorasick>,
    longest: usize,
}

impl StopStrings {
    /// The matcher of `stops` (none: never matches).
    pub fn new(stops: &[String]) -> Result<Self> {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let automaton = if stops.is_empty() {
            None
        } else {
            Some(
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                    .build(stops)
                    .map_err(|e| Error::InvalidRequest(format!("stop: {e}")))?,
            )
        };
        Ok(StopStrings { automaton, longest })
    }

    /// Bytes of text to hold back from the client while they could still begin a stop string.
    pub fn hold(&self) -> usize {
        self.longest.saturating_sub(1)
    }

    /// Byte offset of the leftmost stop string in `text` that starts at or after `from` (a
    /// char boundary).
    pub fn find(&self, text: &str, from: usize) -> Option<usize> {
        let m = self.automaton.as_ref()?.find(&text.as_bytes()[from..])?;
        Some(from + m.start())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// Cancelled, or failed inside the engine.
    Abort,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Logprobs of one generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The chosen token.
    pub token_id: u32,
    /// Its logprob under the model's raw distribution.
    pub logprob: f32,
    /// The most likely tokens and their logprobs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: its RNG.
pub(crate) struct SamplerState {
    rng: ChaCha8Rng,
}

impl SamplerState {
    pub(crate) fn new(seed: u64) -> Self {
        SamplerState {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    pub(crate) fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `log_softmax` of `logits` at `ids`, plus the top `n`.
pub(crate) fn logprobs_of(logits: &[f32], token_id: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |id: u32| (logits[id as usize] as f64 - lse) as f32;
    let mut top: Vec<u32> = (0..logits.len() as u32).collect();
    if n > 0 && n < top.len() {
        top.select_nth_unstable_by(n - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
    }
    top.truncate(n);
    top.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    TokenLogprobs {
        token_id,
        logprob: lp(token_id),
        top: top.into_iter().map(|id| (id, lp(id))).collect(),
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`). NaNs are skipped.
pub(crate) fn argmax(x: &[f32]) -> u32 {
    // The largest value first, in 8 independent lanes (no index carried, so it vectorizes),
    // then the first position holding it.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let max = rest
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    x.iter().position(|&v| v == max).unwrap_or(0) as u32
}

fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(seen).filter(|(_, s)| *s) {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

/// Whether `p` changes logits before sampling (repetition, presence or frequency penalty).
pub(crate) fn has_penalties(p: &SamplingParams) -> bool {
    p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
}

/// Picks the next token. `logits` is scratch (modified in place by the penalties).
pub(crate) fn sample(
    logits: &mut [f32],
    p: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    state: &mut SamplerState,
) -> u32 {
    apply_penalties(logits, p, prompt, output);
    sample_unpenalised(logits, p, state)
}

/// Picks the next token from logits the penalties have been applied to (or that need none).
pub(crate) fn sample_unpenalised(
    logits: &[f32],
    p: &SamplingParams,
    state: &mut SamplerState,
) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    let max = logits[argmax(logits) as usize] * inv_t;
    // Unnormalised probabilities; the most likely token has weight 1.
    let weight = |i: u32| ((logits[i as usize] * inv_t - max) as f64).exp();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut cand: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize].is_finite())
        .collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, by_logit);
        cand.truncate(p.top_k);
    }
    if p.min_p > 0.0 {
        cand.retain(|&i| weight(i) >= p.min_p as f64);
    }
    if p.top_p < 1.0 {
        let target = p.top_p as f64 * cand.iter().map(|&i| weight(i)).sum::<f64>();
        // Sort only as long a prefix as the top-p mass needs (usually a few hundred tokens).
        let mut sorted = cand.len().min(1024);
        loop {
            if sorted < cand.len() {
                cand.select_nth_unstable_by(sorted - 1, by_logit);
            }
            cand[..sorted].sort_unstable_by(by_logit);
            if sorted == cand.len()
                || cand[..sorted].iter().map(|&i| weight(i)).sum::<f64>() >= target
            {
                break;
            }
            sorted = (sorted * 8).min(cand.len());
        }
        let mut cum = 0.0;
        let keep = cand[..sorted]
            .iter()
            .position(|&i| {
                cum += weight(i);
                cum >= target
            })
            .map_or(sorted, |j| j + 1);
        cand.truncate(keep);
    }
    let mass: f64 = cand.iter().map(|&i| weight(i)).sum();
    let mut u = state.uniform() * mass;
    for &i in &cand {
        u -= weight(i);
        if u < 0.0 {
            return i;
        }
    }
    cand[cand.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_find_the_leftmost_match_as_a_scan_of_each_would() {
        // The earlier matcher: each string's first occurrence, the leftmost of them.
        fn naive(text: &str, from: usize, stops: &[String]) -> Option<usize> {
            stops
                .iter()
                .filter_map(|s| text[from..].find(s.as_str()).map(|p| p + from))
                .min()
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..2000 {
            let word = |rng: &mut ChaCha8Rng, n: u64| -> String {
                (0..1 + rng.next_u64() % n)
                    .map(|_| ['a', 'b', 'c', 'é'][(rng.next_u64() % 4) as usize])
                    .collect()
            };
            let text = word(&mut rng, 40);
            let stops: Vec<String> = (0..1 + rng.next_u64() % 5)
                .map(|_| word(&mut rng, 4))
                .collect();
            let m = StopStrings::new(&stops).unwrap();
            let mut from = (rng.next_u64() as usize) % (text.len() + 1);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            assert_eq!(
                m.find(&text, from),
                naive(&text, from, &stops),
                "{text:?} {stops:?} {from}"
            );
            assert_eq!(m.hold(), stops.iter().map(|s| s.len()).max().unwrap() - 1);
        }
        let none = StopStrings::new(&[]).unwrap();
        assert_eq!((none.find("abc", 0), none.hold()), (None, 0));
    }

    #[test]
    fn stop_lists_are_capped_in_number_and_length() {
        let too_many = params(|p| p.stop = (0..=MAX_STOP_STRINGS).map(|i| i.to_string()).collect());
        let e = too_many.validate().unwrap_err().to_string();
        assert!(e.contains("stop = 65 strings: at most 64"), "{e}");
        let too_long = params(|p| p.stop = vec!["x".repeat(MAX_STOP_BYTES + 1)]);
        let e = too_long.validate().unwrap_err().to_string();
        assert!(e.contains("a string of 513 bytes"), "{e}");
        let ids = params(|p| p.stop_token_ids = vec![1; MAX_STOP_TOKEN_IDS + 1]);
        assert!(ids
            .validate()
            .unwrap_err()
            .to_string()
            .contains("stop_token_ids"));
        let fine = params(|p| p.stop = vec!["x".repeat(MAX_STOP_BYTES); MAX_STOP_STRINGS]);
        fine.validate().unwrap();
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn argmax_is_the_first_largest_in_every_lane_and_the_tail() {
        for len in [1, 7, 8, 9, 600, 1003] {
            for at in [0, len / 3, len - 1] {
                let mut x: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 20.0).collect();
                x[at] = 5.0;
                assert_eq!(argmax(&x), at as u32, "len {len}, max at {at}");
                // A tie later on keeps the first; NaNs and -inf are passed over.
                x.push(5.0);
                x.insert(0, f32::NAN);
                assert_eq!(argmax(&x), at as u32 + 1, "len {len}, tie");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 9]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut l = vec![0.0, 3.0, 3.0, 1.0];
        assert_eq!(
            sample(
                &mut l,
                &SamplingParams::greedy(),
                &[],
                &[],
                &mut SamplerState::new(0)
            ),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = vec![0.5, 0.1, 2.0, 1.9, -1.0];
        for seed in 0..50 {
            let mut l = logits.clone();
            assert_eq!(
                sample(
                    &mut l,
                    &params(|p| p.top_k = 1),
                    &[],
                    &[],
                    &mut SamplerState::new(seed)
                ),
                2
            );
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]
        let logits = vec![3.0, 2.0, 1.0, -0.1];
        for seed in 0..200 {
            let mut l = logits.clone();
            let t = sample(
                &mut l,
                &params(|p| p.top_p = 0.7),
                &[],
                &[],
                &mut SamplerState::new(seed),
            );
            assert!(t <= 1, "top_p 0.7 kept token {t}");
            let mut l = logits.clone();
            let t = sample(
                &mut l,
                &params(|p| p.min_p = 0.3),
                &[],
                &[],
                &mut SamplerState::new(seed),
            );
            assert!(t <= 1, "min_p 0.3 kept token {t}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = vec![0.0f32, (3.0f32).ln()]; // probs 0.25 / 0.75
        let mut state = SamplerState::new(7);
        let ones = (0..4000)
            .filter(|_| sample(&mut logits.clone(), &params(|_| {}), &[], &[], &mut state) == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones} of 4000");
    }

    #[test]
    fn plain_temperature_sampling_reaches_the_whole_vocabulary() {
        // 5000 equally likely tokens: every part of the vocabulary must be reachable.
        let logits = vec![0f32; 5000];
        let mut state = SamplerState::new(3);
        let beyond = (0..2000)
            .filter(|_| sample(&mut logits.clone(), &params(|_| {}), &[], &[], &mut state) >= 1024)
            .count();
        assert!(
            beyond > 1400,
            "{beyond} of 2000 samples beyond the first 1024 ids"
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // 2000 tokens: one at weight 1, the rest tiny; top_p 0.5 must keep only the first even
        // though the sorted prefix is shorter than the vocabulary.
        let mut logits = vec![-20f32; 2000];
        logits[1500] = 0.0;
        for seed in 0..20 {
            let t = sample(
                &mut logits.clone(),
                &params(|p| p.top_p = 0.5),
                &[],
                &[],
                &mut SamplerState::new(seed),
            );
            assert_eq!(t, 1500);
        }
        // With uniform logits, top_p 0.9 keeps ~1800 of 2000 tokens, not a 1024-token prefix.
        let logits = vec![0f32; 2000];
        let mut state = SamplerState::new(9);
        let high = (0..2000).filter(|_| {
            sample(
                &mut logits.clone(),
                &params(|p| p.top_p = 0.9),
                &[],
                &[],
                &mut state,
            ) >= 1024
        });
        assert!(high.count() > 600);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = SamplerState::new(seed);
            (0..20)
                .map(|_| sample(&mut logits.clone(), &params(|_| {}), &[], &[], &mut s))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn penalties_change_the_choice() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            sample(&mut [2.0, 1.5], &p, &[0], &[], &mut SamplerState::new(0)),
            1
        );
        let p = SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            sample(&mut [2.0, 1.5], &p, &[], &[0, 0], &mut SamplerState::new(0)),
            1
        );
        let p = SamplingParams {
            presence_penalty: 0.3,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            sample(&mut [2.0, 1.9], &p, &[], &[0], &mut SamplerState::new(0)),
            1
        );
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let lp = logprobs_of(&[1.0, 2.0, 3.0], 0, 2);
        let z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lp.logprob as f64 - (1.0 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn validation_names_the_field() {
        let e = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("top_p") && e.contains("1.5"), "{e}");
        let e = SamplingParams {
            max_tokens: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_tokens"), "{e}");
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
