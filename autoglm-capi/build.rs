//! Links the release `libautoglm.so` without debug sections. The workspace builds with
//! `debug = "line-tables-only"` (backtraces keep file:line), which would put the line tables of
//! the whole engine into the shared library and make most of its size; a C program that links
//! it has no use for them. Only the cdylib on Linux in the release profile: the staticlib keeps
//! them (its users strip what they link), and so do the Rust tests.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if release && linux {
        println!("cargo::rustc-cdylib-link-arg=-Wl,--strip-debug");
    }
}
