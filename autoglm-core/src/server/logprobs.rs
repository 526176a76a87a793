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
    /// Appends tokens; `offset` is the text length before them and advances past each token.
    pub(crate) fn push(
        &mut self,
        tok: Option<&Tokenizer>,
        lps: &[TokenLogprobs],
        offset: &mut usize,
    ) {
        for lp in lps {
            let text = token_text(tok, lp.token_id);
            let mut top = Map::new();
            for &(id, l) in &lp.top {
                top.insert(token_text(tok, id), Value::from(finite(l)));
            }
            // vLLM includes the sampled token in the map even when it is not among the top.
            top.entry(text.clone())
                .or_insert_with(|| Value::from(finite(lp.logprob)));
            self.text_offset.push(*offset);
            *offset += text.chars().count();
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
