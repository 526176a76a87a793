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

/// One axis's taps with a fixed count per output pixel: `k` weights each, zero-padded, the
/// window moved inside the input where the padding would run past its end.
struct FixedTaps {
    k: usize,
    starts: Vec<usize>,
    weights: Vec<i32>,
    precision: u32,
}

impl FixedTaps {
    fn new(input: usize, output: usize) -> Self {
        let (t, precision) = taps(input, output);
        // A window never spans more than the input, so `k <= input`.
        let k = t.iter().map(|t| t.weights.len()).max().unwrap_or(0).max(1);
        let mut starts = Vec::with_capacity(output);
        let mut weights = vec![0i32; output * k];
        for (tap, w) in t.iter().zip(weights.chunks_exact_mut(k)) {
            let start = tap.start.min(input.saturating_sub(k));
            let off = tap.start - start;
            for (d, &v) in w[off..].iter_mut().zip(&tap.weights) {
                *d = v as i32;
            }
            starts.push(start);
        }
        Self {
            k,
            starts,
            weights,
            precision,
        }
    }

    fn half(&self) -> i32 {
        1i32 << (self.precision.max(1) - 1)
    }
}

/// Rows the width pass takes at once: transposed so that one input column of the band is
/// `BAND * 3` contiguous bytes, every tap of an output column is one contiguous multiply-add
/// across the band (vectorised), the same weight for all of its rows.
const BAND: usize = 16;
const LANES: usize = BAND * 3;

fn store(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// The width pass over `BAND` rows (`rows`: `BAND` rows of `sw` pixels; `out`: `BAND` rows of
/// `starts.len()` pixels; `tb`: scratch of `sw * LANES` bytes).
#[inline(always)]
fn width_band_impl(rows: &[u8], sw: usize, t: &FixedTaps, out: &mut [u8], tb: &mut [u8]) {
    let dw = t.starts.len();
    for r in 0..BAND {
        let row = &rows[r * sw * 3..(r + 1) * sw * 3];
        for (col, px) in tb.chunks_exact_mut(LANES).zip(row.chunks_exact(3)) {
            col[r * 3..r * 3 + 3].copy_from_slice(px);
        }
    }
    let half = t.half();
    for (x, (&s, w)) in t.starts.iter().zip(t.weights.chunks_exact(t.k)).enumerate() {
        let mut acc = [half; LANES];
        for (col, &wt) in tb[s * LANES..(s + t.k) * LANES].chunks_exact(LANES).zip(w) {
            for (a, &v) in acc.iter_mut().zip(col) {
                *a += v as i32 * wt;
            }
        }
        for (r, a) in acc.chunks_exact(3).enumerate() {
            let o = &mut out[(r * dw + x) * 3..][..3];
            for (d, &v) in o.iter_mut().zip(a) {
                *d = store(v, t.precision);
            }
        }
    }
}

/// The width pass over one row (the last rows of an image that do not fill a band).
fn width_row(row: &[u8], t: &FixedTaps, out: &mut [u8]) {
    let half = t.half();
    for (o, (&s, w)) in out
        .chunks_exact_mut(3)
        .zip(t.starts.iter().zip(t.weights.chunks_exact(t.k)))
    {
        let mut acc = [half; 3];
        for (p, &wt) in row[s * 3..(s + t.k) * 3].chunks_exact(3).zip(w) {
            for (a, &v) in acc.iter_mut().zip(p) {
                *a += v as i32 * wt;
            }
        }
        for (d, &v) in o.iter_mut().zip(&acc) {
            *d = store(v, t.precision);
        }
    }
}

/// One output row of the height pass: the taps' input rows (`rows[i]` for weight `w[i]`)
/// multiplied and added across the row in `acc`.
#[inline(always)]
fn height_row_impl(
    src: &[u8],
    stride: usize,
    start: usize,
    w: &[i32],
    t: &FixedTaps,
    acc: &mut [i32],
    out: &mut [u8],
) {
    acc.fill(t.half());
    for (k, &wt) in w.iter().enumerate() {
        let row = &src[(start + k) * stride..][..stride];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as i32 * wt;
        }
    }
    for (d, &a) in out.iter_mut().zip(acc.iter()) {
        *d = store(a, t.precision);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::FixedTaps;

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn width_band(
        rows: &[u8],
        sw: usize,
        t: &FixedTaps,
        out: &mut [u8],
        tb: &mut [u8],
    ) {
        super::width_band_impl(rows, sw, t, out, tb)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn height_row(
        src: &[u8],
        stride: usize,
        start: usize,
        w: &[i32],
        t: &FixedTaps,
        acc: &mut [i32],
        out: &mut [u8],
    ) {
        super::height_row_impl(src, stride, start, w, t, acc, out)
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn width_band(rows: &[u8], sw: usize, t: &FixedTaps, out: &mut [u8], tb: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::width_band(rows, sw, t, out, tb) };
    }
    width_band_impl(rows, sw, t, out, tb)
}

fn height_row(
    src: &[u8],
    stride: usize,
    start: usize,
    w: &[i32],
    t: &FixedTaps,
    acc: &mut [i32],
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::height_row(src, stride, start, w, t, acc, out) };
    }
    height_row_impl(src, stride, start, w, t, acc, out)
}

/// The width pass: `sh` rows of `sw` pixels to rows of `t.starts.len()` pixels.
fn resize_width(src: &[u8], sw: usize, sh: usize, t: &FixedTaps) -> Vec<u8> {
    let dw = t.starts.len();
    let mut out = vec![0u8; sh * dw * 3];
    let bands = sh / BAND;
    let (full, rest) = out.split_at_mut(bands * BAND * dw * 3);
    full.par_chunks_mut(BAND * dw * 3)
        .zip(src.par_chunks(BAND * sw * 3))
        .for_each_init(
            || vec![0u8; sw * LANES],
            |tb, (o, rows)| width_band(rows, sw, t, o, tb),
        );
    for (o, row) in rest
        .chunks_exact_mut(dw * 3)
        .zip(src[bands * BAND * sw * 3..].chunks_exact(sw * 3))
    {
        width_row(row, t, o);
    }
    out
}

/// The height pass: `t.starts.len()` rows from rows of `width` pixels.
fn resize_height(src: &[u8], width: usize, t: &FixedTaps) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; t.starts.len() * stride];
    out.par_chunks_mut(stride)
        .zip(t.starts.par_iter().zip(t.weights.par_chunks(t.k)))
        .for_each_init(
            || vec![0i32; stride],
            |acc, (o, (&s, w))| height_row(src, stride, s, w, t, acc, o),
        );
    out
}

/// `img` resized to `height x width`.
///
/// Sums are 32-bit: the int16 weights of a pixel add up to `1 << precision <= 1 << 15` in
/// absolute value at most a few times over, times 255, far inside `i32`. Both passes are
/// exact integer arithmetic, so the vectorised and the scalar paths give the same bytes.
pub fn resize(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    let widened = (width != img.width).then(|| {
        resize_width(
            &img.data,
            img.width,
            img.height,
            &FixedTaps::new(img.width, width),
        )
    });
    let data = if height != img.height {
        let src = widened.as_deref().unwrap_or(&img.data);
        resize_height(src, width, &FixedTaps::new(img.height, height))
    } else {
        widened.unwrap_or_else(|| img.data.clone())
    };
    RgbImage {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward form of both passes (one output pixel at a time, variable tap
    /// counts), which the vectorised passes must reproduce byte for byte.
    fn reference(img: &RgbImage, height: usize, width: usize) -> RgbImage {
        let mut cur = img.clone();
        if width != cur.width {
            let (t, prec) = taps(cur.width, width);
            let half = 1i32 << (prec.max(1) - 1);
            let mut out = vec![0u8; cur.height * width * 3];
            for (o, row) in out
                .chunks_mut(width * 3)
                .zip(cur.data.chunks(cur.width * 3))
            {
                for (px, tap) in o.chunks_exact_mut(3).zip(&t) {
                    let src = &row[tap.start * 3..(tap.start + tap.weights.len()) * 3];
                    let mut acc = [half; 3];
                    for (p, &w) in src.chunks_exact(3).zip(&tap.weights) {
                        for c in 0..3 {
                            acc[c] += p[c] as i32 * w as i32;
                        }
                    }
                    for (d, a) in px.iter_mut().zip(acc) {
                        *d = (a >> prec).clamp(0, 255) as u8;
                    }
                }
            }
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
            for (o, tap) in out.chunks_mut(stride).zip(&t) {
                for (x, d) in o.iter_mut().enumerate() {
                    let mut a = half;
                    for (k, &w) in tap.weights.iter().enumerate() {
                        a += cur.data[(tap.start + k) * stride + x] as i32 * w as i32;
                    }
                    *d = (a >> prec).clamp(0, 255) as u8;
                }
            }
            cur = RgbImage {
                width: cur.width,
                height,
                data: out,
            };
        }
        cur
    }

    fn noise(width: usize, height: usize, seed: u32) -> RgbImage {
        let mut s = seed | 1;
        let data = (0..width * height * 3)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect();
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// Up, down (to many taps), one side only, tiny inputs, sizes that leave a partial band.
    #[test]
    fn the_vectorised_passes_equal_the_reference_byte_for_byte() {
        let cases = [
            ((90, 200), (112, 196)),
            ((1080, 37), (1092, 56)),
            ((333, 75), (56, 28)),
            ((28, 700), (28, 140)),
            ((3, 2), (28, 28)),
            ((1, 1), (28, 56)),
            ((200, 17), (200, 45)),
            ((41, 41), (41, 41)),
            ((500, 90), (28, 700)),
        ];
        for (i, ((w0, h0), (w1, h1))) in cases.into_iter().enumerate() {
            let img = noise(w0, h0, 7 + i as u32);
            let want = reference(&img, h1, w1);
            let got = resize(&img, h1, w1);
            assert_eq!((got.width, got.height), (w1, h1));
            assert!(got.data == want.data, "{w0}x{h0} -> {w1}x{h1}");
        }
    }
}
