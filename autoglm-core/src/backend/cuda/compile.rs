//! Kernel sources, compiled by NVRTC straight to a cubin for the device's architecture and cached.
//!
//! A cubin (not PTX) is loaded so that an NVRTC newer than the driver never yields "unsupported
//! PTX version". Compiled cubins are kept in memory for the process (per source and arch) and on
//! disk under `$XDG_CACHE_HOME/autoglm/kernels` (else `~/.cache/autoglm/kernels`), named by a hash
//! of the source, the architecture, the options and the NVRTC version, so a second start skips
//! compilation. A cache file that cannot be read or written only costs a compilation.
//!
//! The functions here need `libnvrtc` but no driver or GPU: CI compiles every kernel with them.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{Error, Result};

/// Prepended to every kernel file (bf16 helpers, block reductions).
const PRELUDE: &str = include_str!("kernels/common.cuh");

/// One compilation unit: a `.cu` file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    /// File name under `backend/cuda/kernels/`.
    pub name: &'static str,
    /// The file's text.
    pub source: &'static str,
    /// `extern "C"` kernels the backend loads from it.
    pub functions: &'static [&'static str],
}

/// Every kernel the CUDA backend uses.
pub const MODULES: &[KernelModule] = &[
    KernelModule {
        name: "elementwise.cu",
        source: include_str!("kernels/elementwise.cu"),
        functions: &[
            "embedding_bf16",
            "rms_norm",
            "add_rms_norm",
            "silu_mul",
            "f32_to_bf16",
            "add_bias",
            "gather_rows",
        ],
    },
    KernelModule {
        name: "attention.cu",
        source: include_str!("kernels/attention.cu"),
        functions: &[
            "rope_and_cache_write",
            "paged_attention",
            "attention_combine",
            "paged_attention_prefill",
        ],
    },
    KernelModule {
        name: "sampling.cu",
        source: include_str!("kernels/sampling.cu"),
        functions: &[
            "argmax_rows",
            "argmax_partial",
            "argmax_combine",
            "sample_rows",
        ],
    },
    KernelModule {
        name: "random.cu",
        source: include_str!("kernels/random.cu"),
        functions: &[
            "random_uniform_bf16",
            "random_uniform_f32",
            "fill_f32",
            "fill_bf16",
        ],
    },
    KernelModule {
        name: "gemv.cu",
        source: include_str!("kernels/gemv.cu"),
        functions: &["gemv_bf16"],
    },
    KernelModule {
        name: "vision.cu",
        source: include_str!("kernels/vision.cu"),
        functions: &[
            "layer_norm",
            "gelu",
            "interpolate_pos_embed",
            "vision_rope",
            "vision_attention",
        ],
    },
];

/// NVRTC options besides the architecture. No fast math: expf/sincosf stay accurate so the
/// backend tracks the f32 CPU reference within bf16 rounding.
const OPTIONS: &[&str] = &["--std=c++17", "--fmad=true"];

/// Whether `libnvrtc` can be loaded (never panics).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names; nothing is called.
    unsafe { nvrtc_sys::is_culib_present() }
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(
            "libnvrtc (libnvrtc.so.13) was not found: install the CUDA toolkit or \
             `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtc is present (checked above); the pointers are to live locals.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::CudaUnavailable(format!("nvrtcVersion failed: {e}")))?;
    Ok((major, minor))
}

/// The full text NVRTC compiles for `module`.
fn full_source(module: &KernelModule) -> String {
    format!("{PRELUDE}\n#line 1 \"{}\"\n{}", module.name, module.source)
}

/// Compiles `module` to a cubin for `sm_{arch}` (e.g. `arch = 90`), without looking at any cache.
/// A compilation error is returned with NVRTC's log, naming the file.
pub fn compile_cubin(module: &KernelModule, arch: u32) -> Result<Vec<u8>> {
    require_nvrtc()?;
    let src = CString::new(full_source(module))
        .map_err(|_| Error::Backend(format!("{}: the source contains a NUL byte", module.name)))?;
    let name = CString::new(module.name).expect("kernel file names have no NUL");
    let prog = nvrtc::create_program(&src, Some(&name))
        .map_err(|e| Error::Backend(format!("{}: nvrtcCreateProgram: {e}", module.name)))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture=sm_{arch}"));
    // SAFETY: `prog` was just created and is destroyed exactly once below; `src` and `name`
    // outlive it.
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let result = (|| {
        if let Err(e) = compiled {
            // SAFETY: `prog` is live.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            return Err(Error::Backend(format!(
                "{} (sm_{arch}) does not compile: {e}\n{log}",
                module.name
            )));
        }
        let mut size = 0usize;
        // SAFETY: `prog` is live and compiled; `size` is a live local.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }
            .result()
            .map_err(|e| Error::Backend(format!("{}: nvrtcGetCUBINSize: {e}", module.name)))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| Error::Backend(format!("{}: nvrtcGetCUBIN: {e}", module.name)))?;
        if cubin.is_empty() {
            return Err(Error::Backend(format!(
                "{}: NVRTC returned an empty cubin for sm_{arch}",
                module.name
            )));
        }
        Ok(cubin)
    })();
    // SAFETY: `prog` is live and not used afterwards.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// FNV-1a, 64 bits: a stable cache key (not a security boundary; a collision only loads a wrong
/// cubin whose functions then fail to resolve or whose key differs in the next version).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The on-disk cache directory: `$XDG_CACHE_HOME/autoglm/kernels` or `~/.cache/autoglm/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("autoglm").join("kernels"))
}

/// Where a compiled module would be cached.
fn cache_file(
    dir: &std::path::Path,
    module: &KernelModule,
    arch: u32,
    nvrtc: (i32, i32),
) -> PathBuf {
    let version = format!("{}.{}", nvrtc.0, nvrtc.1);
    let key = fnv1a(&[
        full_source(module).as_bytes(),
        arch.to_string().as_bytes(),
        OPTIONS.join(" ").as_bytes(),
        version.as_bytes(),
    ]);
    let stem = module.name.trim_end_matches(".cu");
    dir.join(format!("{stem}-sm{arch}-{key:016x}.cubin"))
}

/// How a cubin was obtained (for start-up logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubinOrigin {
    /// Already compiled in this process.
    Memory,
    /// Read from the disk cache.
    Disk,
    /// Compiled now.
    Compiled,
}

type MemoryCache = Mutex<HashMap<(&'static str, u32), Vec<u8>>>;

fn memory_cache() -> &'static MemoryCache {
    static CACHE: OnceLock<MemoryCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The cubin of `module` for `sm_{arch}`: from this process's memory, else from `disk_dir` (when
/// given), else compiled now (and written to `disk_dir`).
pub fn cubin(
    module: &KernelModule,
    arch: u32,
    disk_dir: Option<&std::path::Path>,
) -> Result<(Vec<u8>, CubinOrigin)> {
    if let Some(c) = memory_cache()
        .lock()
        .ok()
        .and_then(|m| m.get(&(module.name, arch)).cloned())
    {
        return Ok((c, CubinOrigin::Memory));
    }
    let path = match disk_dir {
        Some(dir) => Some(cache_file(dir, module, arch, nvrtc_version()?)),
        None => None,
    };
    let (bin, origin) = match path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        Some(bin) if !bin.is_empty() => (bin, CubinOrigin::Disk),
        _ => {
            let bin = compile_cubin(module, arch)?;
            if let Some(p) = &path {
                write_atomically(p, &bin);
            }
            (bin, CubinOrigin::Compiled)
        }
    };
    if let Ok(mut m) = memory_cache().lock() {
        m.insert((module.name, arch), bin.clone());
    }
    Ok((bin, origin))
}

/// Forgets `module`'s cubin in this process (the disk cache stays).
pub fn evict_memory(module: &KernelModule, arch: u32) {
    if let Ok(mut m) = memory_cache().lock() {
        m.remove(&(module.name, arch));
    }
}

/// Forgets `module`'s cubin (memory and disk), e.g. after the driver rejected a cached file.
pub fn evict(module: &KernelModule, arch: u32, disk_dir: Option<&std::path::Path>) {
    evict_memory(module, arch);
    if let (Some(dir), Ok(v)) = (disk_dir, nvrtc_version()) {
        let _ = std::fs::remove_file(cache_file(dir, module, arch, v));
    }
}

/// Best effort: a temporary file renamed into place, so a concurrent reader never sees half a
/// cubin. Failures are ignored (the cache is an optimisation).
fn write_atomically(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_source_arch_and_version() {
        let dir = std::path::Path::new("/x");
        let m = MODULES[0];
        let a = cache_file(dir, &m, 90, (13, 0));
        assert_ne!(a, cache_file(dir, &m, 80, (13, 0)));
        assert_ne!(a, cache_file(dir, &m, 90, (13, 1)));
        assert_ne!(a, cache_file(dir, &MODULES[1], 90, (13, 0)));
        assert_eq!(a, cache_file(dir, &m, 90, (13, 0)));
    }

    #[test]
    fn every_listed_function_is_defined_in_its_file() {
        for m in MODULES {
            for f in m.functions {
                // `__global__ void f(`, possibly with `__launch_bounds__(..)` before the name.
                let name = format!(" {f}(");
                let defined = m
                    .source
                    .lines()
                    .any(|l| l.contains("__global__ void") && l.contains(&name));
                assert!(defined, "{}: no kernel {f}", m.name);
            }
        }
    }
}
