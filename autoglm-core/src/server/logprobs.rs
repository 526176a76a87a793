//! Logprobs in OpenAI's two shapes: completions (`tokens`, `token_logprobs`, `top_logprobs` maps,
//! `text_offset`) and chat (`content: [{token, logprob, bytes, top_logprobs}]`).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::sampling::TokenLogprobs;
use crate::tokenizer::Tokenizer;

/// A token as text: its own decoding (special tokens kept), or `token_id:N` without a tokenizer.
pub(crate) fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    tok.and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("token_id:{id}"))
}

/// Like vLLM: a logprob of -inf is reported as -9999.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

/// `logprobs` of a completion choice.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct CompletionLogprobs {
    pub(crate) tokens: Vec<String>,
    pub(crate) token_logprobs: Vec<f32>,
    pub(crate) top_logprobs: Vec<Map<String, Value>>,
    pub(crate) text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends tokens; `offset` is the text length (in characters) before them and advances
    /// past each token by what the token adds to the choice's `text`: nothing for a special
    /// token when `skip_special_tokens` drops it from the text, though `tokens` still shows it.
    pub(crate) fn push(
        &mut self,
        tok: Option<&Tokenizer>,
        lps: &[TokenLogprobs],
        offset: &mut usize,
        skip_special_tokens: bool,
    ) {
        for lp in lps {
            let text = token_text(tok, lp.token_id);
            let in_text = match tok {
                Some(t) if skip_special_tokens => t
                    .decode(&[lp.token_id], true)
                    .map_or(0, |s| s.chars().count()),
                _ => text.chars().count(),
            };
            let mut top = Map::new();
            for &(id, l) in &lp.top {
                top.insert(token_text(tok, id), Value::from(finite(l)));
            }
            // vLLM includes the sampled token in the map even when it is not among the top.
            top.entry(text.clone())
                .or_insert_with(|| Value::from(finite(lp.logprob)));
            self.text_offset.push(*offset);
            *offset += in_text;
            self.tokens.push(text);
            self.token_logprobs.push(finite(lp.logprob));
            self.top_logprobs.push(top);
        }
    }
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatTopLogprob {
    pub(crate) token: String,
    pub(crate) logprob: f32,
    pub(crate) bytes: Vec<u8>,
}

/// One generated token in chat logprobs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatTokenLogprob {
    pub(crate) token: String,
    pub(crate) logprob: f32,
    pub(crate) bytes: Vec<u8>,
    pub(crate) top_logprobs: Vec<ChatTopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct ChatLogprobs {
    pub(crate) content: Vec<ChatTokenLogprob>,
}

impl ChatLogprobs {
    pub(crate) fn push(&mut self, tok: Option<&Tokenizer>, lps: &[TokenLogprobs]) {
        for lp in lps {
            let token = token_text(tok, lp.token_id);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let token = token_text(tok, id);
                    ChatTopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob: finite(l),
                    }
                })
                .collect();
            self.content.push(ChatTokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: finite(lp.logprob),
                top_logprobs,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(token_id: u32) -> TokenLogprobs {
        TokenLogprobs {
            token_id,
            logprob: -1.0,
            top: vec![(token_id, -1.0)],
        }
    }

    #[test]
    fn text_offset_skips_what_the_text_skips() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/glm4-tiny");
        let tok = Tokenizer::from_dir(dir.as_ref()).unwrap();
        // "Hi", then <|user|> (593, special), then "Hi" again.
        let hi = tok.encode("Hi", false).unwrap();
        let ids: Vec<u32> = hi.iter().copied().chain([593]).chain(hi.clone()).collect();
        let lps: Vec<_> = ids.iter().map(|&id| lp(id)).collect();
        let hi_len = tok.decode(&hi, true).unwrap().chars().count();
        let first = hi.len();

        let mut skipped = CompletionLogprobs::default();
        let mut offset = 0;
        skipped.push(Some(&tok), &lps[..first + 1], &mut offset, true);
        skipped.push(Some(&tok), &lps[first + 1..], &mut offset, true);
        let text = tok.decode(&ids, true).unwrap();
        assert_eq!(offset, text.chars().count());
        // The special token is listed, and the token after it starts where it did.
        assert_eq!(skipped.tokens[first], "<|user|>");
        assert_eq!(skipped.text_offset[first], hi_len);
        assert_eq!(skipped.text_offset[first + 1], hi_len);

        let mut kept = CompletionLogprobs::default();
        let mut offset = 0;
        kept.push(Some(&tok), &lps, &mut offset, false);
        assert_eq!(offset, tok.decode(&ids, false).unwrap().chars().count());
        assert_eq!(kept.text_offset[first + 1], hi_len + "<|user|>".len());
    }
}
