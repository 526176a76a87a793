//! Glm4v image work on the CPU: preprocessing of a phone screenshot (decode, resize, normalise,
//! patchify; the 1080x2400 RGBA PNG Open-AutoGLM sends every step) and the vision tower of the
//! glm4v-tiny fixture on an image of the same shape at a reduced size. The FLOP count of the
//! AutoGLM-Phone-9B tower on the full screenshot is printed once.
//!
//! `cargo bench -p autoglm-benches --bench vision`; `python3 benches/python/preprocess_transformers.py`
//! times transformers' processor on the same file (written to `target/screenshot-1080x2400.png`).

use std::path::PathBuf;

use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::media::{
    self, decode_image, patchify, resize, smart_resize, ImageProcessorConfig,
};
use autoglm_core::model::{GlmModel, VisionConfig};
use criterion::{criterion_group, criterion_main, Criterion};

/// A deterministic 1080x2400 RGBA "screenshot": flat UI bands, text-like noise rows, a gradient
/// banner and a semi-transparent toast, PNG-encoded.
fn screenshot() -> Vec<u8> {
    let (w, h) = (1080u32, 2400u32);
    let mut img = image::RgbaImage::new(w, h);
    let mut state = 0x1234_5678u32;
    for (x, y, p) in img.enumerate_pixels_mut() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let band = (y / 160) % 4;
        let base = [
            [250, 250, 250],
            [30, 120, 220],
            [240, 240, 245],
            [20, 20, 20],
        ][band as usize];
        let text = (y % 160) > 40 && (y % 160) < 70 && (x % 24) < 14 && state.is_multiple_of(3);
        let mut c = if text { [40, 40, 40] } else { base };
        if y < 200 {
            c = [(x * 255 / w) as u8, (y * 255 / 200) as u8, 180];
        }
        let alpha = if (1900..2000).contains(&y) && (200..880).contains(&x) {
            200
        } else {
            255
        };
        *p = image::Rgba([c[0], c[1], c[2], alpha]);
    }
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode PNG");
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn preprocess(c: &mut Criterion) {
    let png = screenshot();
    let path = root().join("target/screenshot-1080x2400.png");
    // The file the transformers script reads (`benches/python/preprocess_transformers.py`).
    let written =
        std::fs::create_dir_all(root().join("target")).and_then(|()| std::fs::write(&path, &png));
    if let Err(e) = written {
        eprintln!("cannot write {}: {e}", path.display());
    }
    let cfg = ImageProcessorConfig::default();
    let rgb = decode_image(&png, cfg.max_image_pixels).expect("decode");
    let (h, w) = smart_resize(rgb.height, rgb.width, &cfg).expect("size");
    let resized = resize(&rgb, h, w);
    let pool = rayon::ThreadPoolBuilder::new().build().expect("pool");
    let mut g = c.benchmark_group("preprocess_1080x2400_png");
    g.bench_function("decode", |b| {
        b.iter(|| pool.install(|| decode_image(&png, cfg.max_image_pixels).unwrap()))
    });
    g.bench_function("resize", |b| b.iter(|| pool.install(|| resize(&rgb, h, w))));
    g.bench_function("normalize_patchify", |b| {
        b.iter(|| pool.install(|| patchify(&resized, &cfg)))
    });
    g.bench_function("all", |b| {
        b.iter(|| pool.install(|| media::process_image(&png, &cfg).unwrap()))
    });
    g.finish();
}

fn tower(c: &mut Criterion) {
    let backend = CpuBackend::new();
    let dir = root().join("tests/fixtures/glm4v-tiny");
    let model = GlmModel::load(&dir, &backend).expect("glm4v-tiny");
    let vision = model.vision().expect("a vision tower");
    let full = VisionConfig {
        depth: 24,
        hidden_size: 1536,
        num_heads: 12,
        intermediate_size: 13696,
        out_hidden_size: 4096,
        ..vision.config().clone()
    };
    let patches = 172 * 78;
    eprintln!(
        "AutoGLM-Phone-9B tower on a 1080x2400 screenshot ({patches} patches): {:.1} TFLOP",
        full.flops(patches) / 1e12
    );
    let pool = rayon::ThreadPoolBuilder::new().build().expect("pool");
    let mut g = c.benchmark_group("vision_tower_glm4v_tiny");
    g.sample_size(10);
    // The screenshot's aspect at a quarter of each side: 43 x 19 patches, rounded to 44 x 20.
    for (gh, gw) in [(44usize, 20usize), (86, 38)] {
        let batch = vision.batch(&[[gh, gw]]).expect("grid");
        let pixels: Vec<f32> = (0..gh * gw * 1176)
            .map(|i| ((i % 97) as f32 - 48.0) / 48.0)
            .collect();
        eprintln!(
            "glm4v-tiny tower, {gh}x{gw} patches: {:.2} GFLOP",
            vision.flops(gh * gw) / 1e9
        );
        g.bench_function(format!("{gh}x{gw}_patches"), |b| {
            b.iter(|| pool.install(|| vision.encode(&backend, &pixels, &batch).unwrap()))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = preprocess, tower
}
criterion_main!(benches);
