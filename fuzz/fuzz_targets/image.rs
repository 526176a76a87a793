//! Encoded image bytes (PNG, JPEG, WebP) through the decoder and the Glm4v preprocessing of the
//! fixture's `preprocessor_config.json`: decode with the pixel cap, resize, patchify. A bad image
//! must be an error; the output must have the shape its grid says.
#![no_main]

use std::sync::OnceLock;

use autoglm_core::media::{decode_image, process_rgb, ImageProcessorConfig};

fn config() -> &'static ImageProcessorConfig {
    static C: OnceLock<ImageProcessorConfig> = OnceLock::new();
    C.get_or_init(|| {
        ImageProcessorConfig::from_dir(&autoglm_fuzz::fixture("glm4v-tiny"))
            .expect("fixture config")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let cfg = config();
    // A pixel cap that keeps one input's work small, as `multimodal.max_image_pixels` does.
    let Ok(img) = decode_image(data, 1 << 20) else {
        return;
    };
    if let Ok(p) = process_rgb(&img, cfg) {
        let [t, h, w] = p.grid_thw;
        assert_eq!(
            p.pixel_values.len(),
            t * h * w * p.patch_dim(),
            "{:?}",
            p.grid_thw
        );
    }
});
