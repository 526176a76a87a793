//! Every CUDA kernel compiles with NVRTC for Ampere (sm_80) and Hopper (sm_90). Needs `libnvrtc`
//! but no GPU or driver; `.ci/test-cuda.sh` installs it from PyPI and runs this with
//! `--include-ignored`, so a kernel syntax or type error fails CI. In a plain `cargo test` it is
//! reported as ignored, never as passed.

use autoglm_core::backend::cuda::compile::{self, MODULES};

#[test]
#[ignore = "needs libnvrtc (pip install nvidia-cuda-nvrtc); run by .ci/test-cuda.sh"]
fn every_kernel_compiles_for_sm80_and_sm90() {
    assert!(
        compile::nvrtc_available(),
        "libnvrtc cannot be loaded: set LD_LIBRARY_PATH to a directory with libnvrtc.so.13"
    );
    let (major, minor) = compile::nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    for arch in [80, 90] {
        for m in MODULES {
            let cubin = compile::compile_cubin(m, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{} sm_{arch}: not a cubin", m.name);
            for f in m.functions {
                // The symbol table names every extern "C" kernel.
                assert!(
                    cubin.windows(f.len()).any(|w| w == f.as_bytes()),
                    "{} sm_{arch}: kernel {f} missing from the cubin",
                    m.name
                );
            }
        }
    }
}

#[test]
#[ignore = "needs libnvrtc (pip install nvidia-cuda-nvrtc); run by .ci/test-cuda.sh"]
fn a_kernel_error_is_reported_with_the_file_and_nvrtc_log() {
    let broken = compile::KernelModule {
        name: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        functions: &["k"],
    };
    let err = compile::compile_cubin(&broken, 80).unwrap_err().to_string();
    assert!(err.contains("broken.cu"), "{err}");
    assert!(err.contains("undefined_name"), "{err}");
}

#[test]
#[ignore = "needs libnvrtc (pip install nvidia-cuda-nvrtc); run by .ci/test-cuda.sh"]
fn the_disk_cache_serves_a_second_start() {
    let dir = std::env::temp_dir().join(format!("autoglm-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = &MODULES[2];
    // The in-memory cache may already hold it from another test: evict first.
    compile::evict(m, 86, Some(&dir));
    let (a, origin) = compile::cubin(m, 86, Some(&dir)).unwrap();
    assert_eq!(origin, compile::CubinOrigin::Compiled);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1, "one cubin file written");
    // A new process has an empty memory cache; evicting only memory is what it sees.
    compile::evict_memory(m, 86);
    let (b, origin) = compile::cubin(m, 86, Some(&dir)).unwrap();
    assert_eq!(origin, compile::CubinOrigin::Disk);
    assert_eq!(a, b);
    let (_, origin) = compile::cubin(m, 86, Some(&dir)).unwrap();
    assert_eq!(origin, compile::CubinOrigin::Memory);
    let _ = std::fs::remove_dir_all(&dir);
}
