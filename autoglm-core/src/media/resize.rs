//! Bicubic resize of 8-bit RGB as PyTorch's antialiased uint8 kernel computes it (what
//! torchvision's `resize(..., BICUBIC, antialias=True)` runs on a uint8 tensor, and so what
//! transformers 5's default Glm4v processor produces).
//!
//! Separable: the width pass first, then the height pass, each skipped when that side keeps its
//! size, with uint8 rounding in between. Per output pixel the taps span `support = 2 * max(scale,
//! 1)` input pixels around its centre, weighted by the cubic kernel with a = -0.5 at
//! `(x - centre) / max(scale, 1)`, normalised, then turned into int16 fixed-point weights with the
//! most precision bits the largest weight allows; the sum starts at half an LSB and is shifted
//! and clamped. PIL does the same with 22-bit weights, hence up to 1-2 LSB between the two.

use rayon::prelude::*;

use super::RgbImage;

/// One output pixel's taps: first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i16>,
}

fn cubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Taps of every output pixel along one axis, and their precision in bits.
fn taps(input: usize, output: usize) -> (Vec<Taps>, u32) {
    let scale = input as f64 / output as f64;
    let support = 2.0 * scale.max(1.0);
    let inv = 1.0 / scale.max(1.0);
    // PyTorch clamps the tap count to this ("rare cases when due to precision xsize can be
    // larger than max_interp_size by one").
    let max_taps = support.ceil() as usize * 2 + 1;
    let mut float = Vec::with_capacity(output);
    let mut max_w = 0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let hi = hi.max(lo).min(lo + max_taps);
        let mut w: Vec<f64> = (lo..hi)
            .map(|j| cubic((j as f64 - center + 0.5) * inv))
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
            }
        }
        max_w = w.iter().fold(max_w, |m, &v| m.max(v));
        float.push((lo, w));
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + max_w * (1u64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = (1u64 << precision) as f64;
    let taps = float
        .into_iter()
        .map(|(start, w)| Taps {
            start,
            weights: w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i16
                    } else {
                        (0.5 + v * one) as i16
                    }
                })
                .collect(),
        })
        .collect();
    (taps, precision)
}

/// `img` resized to `height x width`.
///
/// Sums are 32-bit: the int16 weights of a pixel add up to `1 << precision <= 1 << 15` in
/// absolute value at most a few times over, times 255, far inside `i32`.
pub fn resize(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let mut cur = img.clone();
    if width != cur.width {
        let (t, prec) = taps(cur.width, width);
        let half = 1i32 << (prec.max(1) - 1);
        let mut out = vec![0u8; cur.height * width * 3];
        out.par_chunks_mut(width * 3)
            .zip(cur.data.par_chunks(cur.width * 3))
            .for_each(|(o, row)| {
                for (px, tap) in o.chunks_exact_mut(3).zip(&t) {
                    let src = &row[tap.start * 3..(tap.start + tap.weights.len()) * 3];
                    let mut acc = [half; 3];
                    for (p, &w) in src.chunks_exact(3).zip(&tap.weights) {
                        let w = w as i32;
                        acc[0] += p[0] as i32 * w;
                        acc[1] += p[1] as i32 * w;
                        acc[2] += p[2] as i32 * w;
                    }
                    for (d, a) in px.iter_mut().zip(acc) {
                        *d = (a >> prec).clamp(0, 255) as u8;
                    }
                }
            });
        cur = RgbImage {
            width,
            height: cur.height,
            data: out,
        };
    }
    if height != cur.height {
        let (t, prec) = taps(cur.height, height);
        let half = 1i32 << (prec.max(1) - 1);
        let stride = cur.width * 3;
        let mut out = vec![0u8; height * stride];
        out.par_chunks_mut(stride).zip(t.par_iter()).for_each_init(
            || vec![0i32; stride],
            |acc, (o, tap)| {
                acc.fill(half);
                for (k, &w) in tap.weights.iter().enumerate() {
                    let row = &cur.data[(tap.start + k) * stride..][..stride];
                    let w = w as i32;
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v as i32 * w;
                    }
                }
                for (d, &a) in o.iter_mut().zip(acc.iter()) {
                    *d = (a >> prec).clamp(0, 255) as u8;
                }
            },
        );
        cur = RgbImage {
            width: cur.width,
            height,
            data: out,
        };
    }
    cur
}
