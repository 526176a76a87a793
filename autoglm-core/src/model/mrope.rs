//! M-RoPE positions of a Glm4v prompt, as transformers' `get_rope_index` computes them.
//!
//! Each token gets three rotary positions (temporal, height, width). Text tokens advance all three
//! together; an image of `lh x lw` merged tokens (its patch grid over the 2x2 merge) starting at
//! `p` puts token `(r, c)` at `(p, p + r, p + c)`, and the text after it resumes at
//! `p + max(lh, lw)`. A prompt of `L` tokens whose largest position is `M` has
//! `rope_delta = M + 1 - L`: the `k`-th token after the prompt sits at `L + k + rope_delta` in
//! all three streams. A text-only prompt gets `0..L` in every stream and a delta of 0.

use crate::error::{Error, Result};

/// The M-RoPE positions of a prompt and the delta carried into decoding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MropePositions {
    /// `[t, h, w]` of each prompt token.
    pub positions: Vec<[u32; 3]>,
    /// Position of token `i >= positions.len()` minus `i`, in every stream.
    pub rope_delta: i64,
}

impl MropePositions {
    /// The `[t, h, w]` of token `i` (a prompt token's own, or a generated token's).
    pub fn at(&self, i: usize) -> [u32; 3] {
        match self.positions.get(i) {
            Some(&p) => p,
            None => {
                let p = (i as i64 + self.rope_delta) as u32;
                [p, p, p]
            }
        }
    }
}

/// Positions of `tokens` whose runs of `image_token` are images of merged-token grids `grids`
/// (`[lh, lw]` each, in order). Each run must hold exactly its image's `lh * lw` tokens.
pub fn mrope_positions(
    tokens: &[u32],
    image_token: u32,
    grids: &[[usize; 2]],
) -> Result<MropePositions> {
    let mut positions = Vec::with_capacity(tokens.len());
    let mut next = 0u32;
    let mut images = grids.iter();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] != image_token {
            positions.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let run = tokens[i..]
            .iter()
            .take_while(|&&t| t == image_token)
            .count();
        let mut left = run;
        while left > 0 {
            let Some(&[lh, lw]) = images.next() else {
                return Err(Error::InvalidRequest(format!(
                    "the prompt holds more image placeholder tokens than its {} images take",
                    grids.len()
                )));
            };
            let n = lh * lw;
            if n > left {
                return Err(Error::InvalidRequest(format!(
                    "an image of {lh}x{lw} tokens needs {n} placeholder tokens, but its run has {left}"
                )));
            }
            for r in 0..lh as u32 {
                for c in 0..lw as u32 {
                    positions.push([next, next + r, next + c]);
                }
            }
            next += lh.max(lw) as u32;
            left -= n;
        }
        i += run;
    }
    if images.next().is_some() {
        return Err(Error::InvalidRequest(format!(
            "the prompt has fewer image placeholder tokens than its {} images need",
            grids.len()
        )));
    }
    Ok(MropePositions {
        positions,
        rope_delta: next as i64 - tokens.len() as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GLM4V.md's example: 5 text tokens, a 4x6-patch image (2x3 tokens), 3 text tokens.
    #[test]
    fn an_image_between_text_runs_matches_get_rope_index() {
        let tokens = [1, 2, 3, 4, 5, 9, 9, 9, 9, 9, 9, 6, 7, 8];
        let p = mrope_positions(&tokens, 9, &[[2, 3]]).unwrap();
        let row = |k: usize| p.positions.iter().map(|x| x[k]).collect::<Vec<_>>();
        assert_eq!(row(0), [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 8, 9, 10]);
        assert_eq!(row(1), [0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 8, 9, 10]);
        assert_eq!(row(2), [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10]);
        assert_eq!(p.rope_delta, -3);
        assert_eq!(p.at(14), [11, 11, 11]);
    }

    #[test]
    fn text_only_prompts_count_up_with_no_delta() {
        let p = mrope_positions(&[4, 5, 6], 9, &[]).unwrap();
        assert_eq!(p.positions, [[0; 3], [1; 3], [2; 3]]);
        assert_eq!(p.rope_delta, 0);
    }

    #[test]
    fn placeholder_counts_that_do_not_match_the_images_are_refused() {
        assert!(mrope_positions(&[9, 9, 9], 9, &[[1, 2]]).is_err());
        assert!(mrope_positions(&[9, 9], 9, &[[1, 2], [1, 1]]).is_err());
        assert!(mrope_positions(&[9], 9, &[[1, 2]]).is_err());
        // Two adjacent images in one run.
        let p = mrope_positions(&[9, 9, 9], 9, &[[1, 2], [1, 1]]).unwrap();
        assert_eq!(p.positions, [[0, 0, 0], [0, 0, 1], [2, 2, 2]]);
    }
}
