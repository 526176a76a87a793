//! What the fuzz targets share: the fixtures, one engine per process, and the framing that lets
//! one input carry several files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use autoglm_core::{Device, Engine, EngineConfig};

/// `tests/fixtures/<name>` of this repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The Glm4v fixture on the CPU backend, built once per process: the request targets run every
/// route's work up to admission on it (chat template, tokenizer, image preprocessing).
pub fn glm4v_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = EngineConfig {
            device: Device::Cpu,
            ..Default::default()
        };
        Engine::from_dir(&fixture("glm4v-tiny"), config).expect("the glm4v-tiny fixture loads")
    })
}

/// The separator between the files of one input (`checkpoint`, `model_configs`).
pub const SEP: &[u8] = b"\n--8<--\n";

/// Splits `data` at [`SEP`] into at most `n` parts (the last keeps any further separators).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    while parts.len() + 1 < n {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// A fresh directory under the system's temporary directory for this process's inputs.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("autoglm-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// Writes `files` into `dir`, removing the names of `all` that are not among them.
pub fn write_files(dir: &Path, all: &[&str], files: &[(&str, &[u8])]) {
    for name in all {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("a scratch file");
    }
}
