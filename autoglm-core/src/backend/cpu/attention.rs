//! Rope, KV-cache write and causal attention over paged KV blocks, on the CPU.
//!
//! One rayon task per (query token, head): scores over the token's whole context are gathered
//! through the block table, soft-maxed in f32 and used to mix the values. Cost is O(context) per
//! task with no materialised `[T, T]` matrix, so long contexts stay within memory.

use rayon::prelude::*;

use super::{CpuKvCache, CpuTensor};
use crate::backend::{rope_inv_freq, AttentionShape};
use crate::error::{Error, Result};
use crate::runner::ForwardBatch;

/// Dot product with eight independent accumulators so the compiler can vectorise it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Interleaved rotary embedding on the first `rotary_dim` dims of each head in `row`; frequency
/// `i` turns by `pos(i)` (one position for 1-D rope, a stream's for M-RoPE).
fn rope_row(
    row: &mut [f32],
    heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    pos: impl Fn(usize) -> u32,
) {
    for (i, &f) in inv_freq.iter().enumerate() {
        let angle = f * pos(i) as f32;
        let (sin, cos) = angle.sin_cos();
        for h in 0..heads {
            let base = h * head_dim + 2 * i;
            let (x0, x1) = (row[base], row[base + 1]);
            row[base] = x0 * cos - x1 * sin;
            row[base + 1] = x1 * cos + x0 * sin;
        }
    }
}

fn check_batch(
    qkv: &CpuTensor,
    cache: &CpuKvCache,
    batch: &ForwardBatch,
    s: &AttentionShape,
) -> Result<()> {
    let bad = |msg: String| Err(Error::Backend(format!("attention: {msg}")));
    let width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim;
    if qkv.cols != width || qkv.rows != batch.num_tokens() {
        return bad(format!(
            "qkv is {}x{}, expected {}x{width}",
            qkv.rows,
            qkv.cols,
            batch.num_tokens()
        ));
    }
    if batch.query_start.len() != batch.num_seqs() + 1 || batch.positions.len() != qkv.rows {
        return bad("inconsistent batch metadata".into());
    }
    if s.mrope_section.is_some() && batch.mrope_positions.len() != 3 * qkv.rows {
        return bad(format!(
            "M-RoPE needs 3 positions per token: {} for {} tokens",
            batch.mrope_positions.len(),
            qkv.rows
        ));
    }
    let bs = cache.shape.block_size;
    for seq in 0..batch.num_seqs() {
        let ctx = batch.context_lens[seq] as usize;
        let needed = ctx.div_ceil(bs);
        let table = batch.block_table(seq);
        if needed > table.len()
            || table[..needed]
                .iter()
                .any(|&b| b as usize >= cache.shape.num_blocks)
        {
            return bad(format!(
                "sequence {seq}: block table does not cover {ctx} tokens"
            ));
        }
        let (q0, q1) = (
            batch.query_start[seq] as usize,
            batch.query_start[seq + 1] as usize,
        );
        if batch.positions[q0..q1].iter().any(|&p| p as usize >= ctx) {
            return bad(format!(
                "sequence {seq}: a position lies beyond its context length {ctx}"
            ));
        }
    }
    let slots = cache.shape.num_blocks * bs;
    if batch
        .slot_mapping
        .iter()
        .any(|&slot| slot as usize >= slots)
    {
        return bad(format!("slot outside the cache ({slots} slots)"));
    }
    Ok(())
}

pub(super) fn attention(
    qkv: &mut CpuTensor,
    cache: &mut CpuKvCache,
    layer: usize,
    batch: &ForwardBatch,
    s: &AttentionShape,
) -> Result<CpuTensor> {
    check_batch(qkv, cache, batch, s)?;
    let (hd, nh, nkv) = (s.head_dim, s.num_heads, s.num_kv_heads);
    let (qw, kvw) = (nh * hd, nkv * hd);
    let inv_freq = rope_inv_freq(s.rotary_dim, s.rope_theta);
    let cols = qkv.cols;
    // q and k heads are adjacent in the row, so one pass rotates both.
    match s.mrope_section {
        None => qkv
            .data
            .par_chunks_mut(cols)
            .zip(batch.positions.par_iter())
            .for_each(|(row, &pos)| {
                rope_row(&mut row[..qw + kvw], nh + nkv, hd, &inv_freq, |_| pos);
            }),
        Some(section) => {
            let stream: Vec<usize> = (0..inv_freq.len())
                .map(|i| AttentionShape::mrope_stream(section, i))
                .collect();
            qkv.data
                .par_chunks_mut(cols)
                .zip(batch.mrope_positions.par_chunks(3))
                .for_each(|(row, thw)| {
                    rope_row(&mut row[..qw + kvw], nh + nkv, hd, &inv_freq, |i| {
                        thw[stream[i]]
                    });
                })
        }
    }

    let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
    for (row, &slot) in qkv.data.chunks_exact(cols).zip(&batch.slot_mapping) {
        let at = slot as usize * kvw;
        kc[at..at + kvw].copy_from_slice(&row[qw..qw + kvw]);
        vc[at..at + kvw].copy_from_slice(&row[qw + kvw..]);
    }
    let (kc, vc) = (&cache.k[layer][..], &cache.v[layer][..]);

    let mut seq_of_token = vec![0usize; batch.num_tokens()];
    for seq in 0..batch.num_seqs() {
        seq_of_token[batch.query_start[seq] as usize..batch.query_start[seq + 1] as usize]
            .fill(seq);
    }
    let bs = cache.shape.block_size;
    let group = nh / nkv;
    let mut out = vec![0f32; qkv.rows * qw];
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (idx, o)| {
            let (t, head) = (idx / nh, idx % nh);
            let kv_off = (head / group) * hd;
            let table = batch.block_table(seq_of_token[t]);
            let n_ctx = batch.positions[t] as usize + 1;
            let q = &qkv.data[t * cols + head * hd..t * cols + (head + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..n_ctx {
                let slot = table[j / bs] as usize * bs + j % bs;
                let k = &kc[slot * kvw + kv_off..slot * kvw + kv_off + hd];
                let sc = dot(q, k) * s.scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            for (j, &p) in scores.iter().enumerate() {
                let slot = table[j / bs] as usize * bs + j % bs;
                let v = &vc[slot * kvw + kv_off..slot * kvw + kv_off + hd];
                let p = p * inv;
                for (o, &v) in o.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        });
    Ok(CpuTensor::new(qkv.rows, qw, out))
}
