//! The skinny GEMV the benchmarks compare with the `gemm` crate at decode shapes. It began here as
//! a prototype and now lives in the core (`autoglm_core::backend::cpu::gemv`), where
//! `matmul_nt` uses it for products of at most `SKINNY_ROWS` rows; this module re-exports it so the
//! benchmark programs keep their names. `autoglm_core::backend::cpu::matmul_nt_gemm` is the gemm
//! path alone.

pub use autoglm_core::backend::cpu::gemv::*;
