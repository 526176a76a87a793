//! Image preprocessing against transformers 5.24's Glm4v processors (the glm4v-tiny fixture's
//! `images[]`): decoded RGB, target sizes, and pixel values of the default (torchvision) processor
//! and of the PIL one; then bad input.

mod common;

use autoglm_core::media::{
    decode_image, process_image, process_rgb, ImageProcessorConfig, RgbImage,
};
use common::*;

const NAME: &str = "glm4v-tiny";

fn u8_tensor(name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(fixture(NAME).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().to_vec())
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn config() -> ImageProcessorConfig {
    ImageProcessorConfig::from_dir(&fixture(NAME)).unwrap()
}

#[test]
fn preprocessor_config_reads_the_budget() {
    let c = config();
    assert_eq!((c.min_pixels, c.max_pixels), (6272, 18816));
    assert_eq!(
        (c.patch_size, c.merge_size, c.temporal_patch_size),
        (14, 2, 2)
    );
    assert_eq!(
        c,
        ImageProcessorConfig {
            min_pixels: 6272,
            max_pixels: 18816,
            ..Default::default()
        }
    );
}

#[test]
fn decoded_rgb_matches_pil_after_compositing_over_white() {
    for im in expected(NAME)["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let bytes = std::fs::read(fixture(NAME).join(file)).unwrap();
        let rgb = decode_image(&bytes, 1 << 30).unwrap();
        let (shape, want) = u8_tensor(im["rgb_tensor"].as_str().unwrap());
        assert_eq!(shape, vec![rgb.height, rgb.width, 3], "{file}");
        let lsb = rgb
            .data
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        // PNGs exactly; the JPEG within a few LSB (zune-jpeg against libjpeg-turbo).
        let tol = if file.ends_with(".jpg") { 4 } else { 0 };
        eprintln!("{file}: decoded RGB max difference {lsb} LSB");
        assert!(lsb <= tol, "{file}: {lsb} LSB");
    }
}

#[test]
fn pixel_values_match_the_default_processor() {
    let cfg = config();
    for im in expected(NAME)["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let bytes = std::fs::read(fixture(NAME).join(file)).unwrap();
        let p = process_image(&bytes, &cfg).unwrap();
        let grid = ids(&im["image_grid_thw"]);
        assert_eq!(p.grid_thw.map(|x| x as u32).to_vec(), grid, "{file}");
        let hw = ids(&im["resized_size_hw"]);
        assert_eq!(
            (p.resized_hw.0 as u32, p.resized_hw.1 as u32),
            (hw[0], hw[1]),
            "{file}"
        );
        let (shape, tv) = expected_tensor(NAME, im["pixel_values_tensor"].as_str().unwrap());
        assert_eq!(shape, vec![p.num_patches(), 1176]);
        let (_, pil) = expected_tensor(NAME, im["pixel_values_pil_tensor"].as_str().unwrap());
        let (d_tv, d_pil) = (
            max_abs(&p.pixel_values, &tv),
            max_abs(&p.pixel_values, &pil),
        );
        eprintln!("{file}: max |pixel_values - torchvision| {d_tv:.3e}, - PIL {d_pil:.3e}");
        // One LSB is 1/255/std ~ 0.015; the JPEG's decoder differs from libjpeg-turbo's by a
        // few LSB, which the upscale spreads.
        let tol = if file.ends_with(".jpg") { 0.1 } else { 1e-5 };
        assert!(
            d_tv <= tol,
            "{file}: {d_tv} against the torchvision processor"
        );

        // From the very pixels PIL decoded, the resize and normalisation alone are exact.
        let (shape, rgb) = u8_tensor(im["rgb_tensor"].as_str().unwrap());
        let img = RgbImage {
            height: shape[0],
            width: shape[1],
            data: rgb,
        };
        let q = process_rgb(&img, &cfg).unwrap();
        let d = max_abs(&q.pixel_values, &tv);
        eprintln!("{file}: from transformers' RGB, max |pixel_values - torchvision| {d:.3e}");
        assert!(d <= 1e-5, "{file}: {d} from the reference RGB");
    }
}

#[test]
fn bad_images_are_refused_with_a_reason() {
    let cfg = config();
    let err = |bytes: &[u8]| process_image(bytes, &cfg).unwrap_err().to_string();
    let e = err(b"GIF89a not really");
    assert!(e.contains("image"), "{e}");
    let e = err(b"hello world, not an image at all");
    assert!(e.contains("not a PNG, JPEG or WebP"), "{e}");
    let png = std::fs::read(fixture(NAME).join("screen.png")).unwrap();
    let e = err(&png[..png.len() / 2]);
    assert!(e.contains("cannot decode"), "{e}");
    let jpg = std::fs::read(fixture(NAME).join("icon.jpg")).unwrap();
    let e = process_image(&jpg[..200], &cfg)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("image"), "{e}");
    // A decompression bomb: a valid header claiming 100000 x 100000 pixels.
    let e = err(&bomb_png(100_000, 100_000));
    assert!(
        e.contains("100000x100000") && e.contains("more than the limit"),
        "{e}"
    );
    // An aspect ratio over 200 (1 x 300).
    let e = err(&tiny_png(300, 1));
    assert!(e.contains("aspect ratio"), "{e}");
}

fn tiny_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::new(w, h);
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}
