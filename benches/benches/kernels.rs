//! Criterion benches of the CPU backend's kernels at decode and prefill shapes.
//!
//! ```text
//! cargo bench -p autoglm-benches --bench kernels              # everything (about 2-3 minutes on 2 cores)
//! cargo bench -p autoglm-benches --bench kernels -- matmul_nt # one group
//! ```
//!
//! Groups:
//! - `matmul_nt_decode/{matmul_nt,skinny}/m{M}/{N}x{K}`: `autoglm_core::backend::cpu::matmul_nt`
//!   (the `gemm` crate; since ff59148 split over the pool by weight rows when m <= 4) against the
//!   prototype skinny GEMV of `benches/src/gemv.rs`, m = 1, 8, 32.
//!   Throughput is the weight bytes (`N*K*4`), so the GiB/s column is the weight-streaming rate.
//!   Each iteration takes the next of several copies of the weight (at least 128 MiB in all), so
//!   the weights come from DRAM as in a real decode step, not from the L3. 4096x13696 is
//!   GLM-4-9B's down_proj (214 MiB).
//! - `matmul_nt_prefill/m256/{N}x{K}`: throughput in elements = FLOPs (2*M*N*K), so "elem/s" reads
//!   as FLOP/s.
//! - `rms_norm`, `silu_mul`: through the `Backend` trait, GLM-4-9B widths.
//! - `attention_decode/b{B}/ctx1024`: `Backend::attention` (rope + KV write + paged attention) for
//!   B sequences each attending over 1024 cached tokens, GLM-4-9B attention geometry (32 q heads,
//!   2 kv heads, head_dim 128, rotary 64). The cache holds zeros rather than prefilled keys: the
//!   kernel's cost does not depend on the values, and prefilling 1k tokens per sequence would
//!   take longer than the bench itself.

use std::time::Duration;

use autoglm_benches::gemv::matmul_nt_skinny;
use autoglm_core::backend::cpu::{matmul_nt, CpuBackend, CpuTensor};
use autoglm_core::backend::{AttentionShape, Backend, KvCacheShape};
use autoglm_core::model::HostTensor;
use autoglm_core::runner::ForwardBatch;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// (n, k, label) of the decode-shape weights.
const DECODE_SHAPES: &[(usize, usize)] = &[(1024, 1024), (4096, 1024), (1024, 4096), (4096, 13696)];

fn matmul_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_nt_decode");
    for &(n, k) in DECODE_SHAPES {
        // A decode step reads each weight once, from memory: rotate over copies totalling at
        // least 128 MiB so that no iteration finds its matrix in the (32 MiB) L3.
        let copies = ((128usize << 20) / (n * k * 4)).clamp(1, 32);
        let weights: Vec<Vec<f32>> = (0..copies).map(|c| data(n * k, c as u64 + 1)).collect();
        g.throughput(Throughput::Bytes((n * k * 4) as u64));
        for &m in &[1usize, 8, 32] {
            // The DRAM-sized shape only at m = 1 and 8, to keep the run short.
            if k > 4096 && m == 32 {
                continue;
            }
            let lhs = data(m * k, 1000);
            let mut dst = vec![0f32; m * n];
            let id = format!("m{m}/{n}x{k}");
            let mut next = 0;
            g.bench_function(BenchmarkId::new("matmul_nt", &id), |b| {
                b.iter(|| {
                    next = (next + 1) % copies;
                    matmul_nt(&mut dst, &lhs, &weights[next], m, n, k, false)
                });
            });
            g.bench_function(BenchmarkId::new("skinny", &id), |b| {
                b.iter(|| {
                    next = (next + 1) % copies;
                    matmul_nt_skinny(&mut dst, &lhs, &weights[next], m, n, k, false)
                });
            });
        }
    }
    g.finish();
}

fn matmul_prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_nt_prefill");
    let m = 256;
    for &(n, k) in &[(1024usize, 1024usize), (4096, 1024), (1024, 4096)] {
        let (lhs, rhs) = (data(m * k, 3), data(n * k, 4));
        let mut dst = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(BenchmarkId::new(format!("m{m}"), format!("{n}x{k}")), |b| {
            b.iter(|| matmul_nt(&mut dst, &lhs, &rhs, m, n, k, false));
        });
    }
    g.finish();
}

fn norms_and_activations(c: &mut Criterion) {
    let be = CpuBackend::new();
    let hidden = 4096;
    let w = be
        .upload(HostTensor::owned(vec![hidden], vec![1.0; hidden]))
        .expect("upload");
    let mut g = c.benchmark_group("rms_norm");
    for &rows in &[1usize, 256] {
        let x = CpuTensor::new(rows, hidden, data(rows * hidden, 5));
        g.throughput(Throughput::Bytes((rows * hidden * 4) as u64));
        g.bench_function(BenchmarkId::new(format!("rows{rows}"), hidden), |b| {
            b.iter(|| be.rms_norm(&x, &w, 1e-5).expect("rms_norm"));
        });
    }
    g.finish();

    let ffn = 13696;
    let mut g = c.benchmark_group("silu_mul");
    for &rows in &[1usize, 32] {
        let x = CpuTensor::new(rows, 2 * ffn, data(rows * 2 * ffn, 6));
        g.throughput(Throughput::Bytes((rows * 2 * ffn * 4) as u64));
        g.bench_function(BenchmarkId::new(format!("rows{rows}"), ffn), |b| {
            b.iter(|| be.silu_mul(&x).expect("silu_mul"));
        });
    }
    g.finish();
}

fn attention_decode(c: &mut Criterion) {
    let be = CpuBackend::new();
    let (heads, kv_heads, head_dim, ctx, bs) = (32usize, 2usize, 128usize, 1024usize, 16usize);
    let shape = AttentionShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rotary_dim: head_dim / 2,
        rope_theta: 10000.0,
        scale: (head_dim as f32).powf(-0.5),
        mrope_section: None,
    };
    let per_seq = ctx / bs;
    let mut g = c.benchmark_group("attention_decode");
    for &batch in &[1usize, 8] {
        let kv_shape = KvCacheShape {
            num_layers: 1,
            num_blocks: batch * per_seq,
            block_size: bs,
            num_kv_heads: kv_heads,
            head_dim,
        };
        let mut cache = be.alloc_kv_cache(kv_shape).expect("kv cache");
        let mut fb = ForwardBatch::new(per_seq);
        for s in 0..batch {
            let table: Vec<u32> = ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect();
            fb.push_seq(&[0], ctx - 1, &table, bs);
        }
        let qkv = CpuTensor::new(
            batch,
            (heads + 2 * kv_heads) * head_dim,
            data(batch * (heads + 2 * kv_heads) * head_dim, 7),
        );
        // K and V bytes read per step.
        g.throughput(Throughput::Bytes(
            (batch * ctx * 2 * kv_heads * head_dim * 4) as u64,
        ));
        g.bench_function(
            BenchmarkId::new(format!("b{batch}"), format!("ctx{ctx}")),
            |b| {
                b.iter_batched(
                    || qkv.clone(),
                    |mut q| {
                        be.attention(&mut q, &mut cache, 0, &fb, &shape)
                            .expect("attention")
                    },
                    BatchSize::SmallInput,
                );
            },
        );
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = kernels;
    config = config();
    targets = matmul_decode, matmul_prefill, norms_and_activations, attention_decode
}
criterion_main!(kernels);
