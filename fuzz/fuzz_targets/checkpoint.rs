//! A checkpoint directory loaded as the engine loads it (`GlmModel::load` on the CPU backend):
//! `config.json`, then `model.safetensors`; or, with a third part, the second is the shard
//! `a.safetensors` and the third `model.safetensors.index.json`. The parts are separated by
//! `autoglm_fuzz::SEP` (seeds: `fuzz/make_seeds.py`). A bad file must be an error naming it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use autoglm_core::backend::cpu::CpuBackend;
use autoglm_core::model::GlmModel;

const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "a.safetensors",
];

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| autoglm_fuzz::scratch_dir("checkpoint"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let parts = autoglm_fuzz::split(data, 3);
    let dir = dir();
    match parts[..] {
        [config, weights] => autoglm_fuzz::write_files(
            dir,
            &FILES,
            &[("config.json", config), ("model.safetensors", weights)],
        ),
        [config, shard, index] => autoglm_fuzz::write_files(
            dir,
            &FILES,
            &[
                ("config.json", config),
                ("a.safetensors", shard),
                ("model.safetensors.index.json", index),
            ],
        ),
        _ => return,
    }
    if let Err(e) = GlmModel::load(dir, &CpuBackend::new()) {
        let msg = e.to_string();
        assert!(
            msg.contains(&*dir.to_string_lossy())
                || FILES.iter().any(|f| msg.contains(f))
                || ["config", "tensor", "architecture"]
                    .iter()
                    .any(|w| msg.contains(w)),
            "an error that names neither the file nor the field: {msg}"
        );
    }
});
