//! Sweep of the decode-shape GEMM options at m = 1, 4 and 8, on weights that come from DRAM
//! (each product takes the next of several copies, at least 256 MiB in all):
//! - `matmul_nt, 1 thread`: `autoglm_core::backend::cpu::matmul_nt` on a one-thread pool, i.e.
//!   the `gemm` crate alone (at m = 1 its single-threaded gemv: the core's path before ff59148);
//! - `matmul_nt`: the core's current path (m <= 4: weight rows split over the pool, gemm on each
//!   slice; m > 4: gemm's parallel blocked kernel);
//! - `skinny R=.. tasks/thread=..`: the prototype of `benches/src/gemv.rs`.
//!
//! ```text
//! cargo run --release -p autoglm-benches --example gemv_sweep [-- THREADS]
//! ```

use std::time::Instant;

use autoglm_benches::gemv::{matmul_nt_skinny_with, SkinnyParams};
use autoglm_benches::{median, memory_bandwidth, CpuUsage};
use autoglm_core::backend::cpu::matmul_nt;

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

enum Opt {
    GemmOneThread,
    Gemm,
    Skinny(SkinnyParams),
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| autoglm_core::threading::allowed_cores().len().max(1));
    let usage = CpuUsage::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let bw = pool.install(|| memory_bandwidth(1 << 30, 5));
    println!(
        "threads {threads}; memory read bandwidth {:.2} GB/s (best, {} streams/task), {:.2} GB/s one stream/task",
        bw.best / 1e9,
        bw.best_streams,
        bw.single_stream / 1e9
    );
    // (n, k): decode weights of the 300M preset and GLM-4-9B's down_proj.
    let shapes = [
        (1024usize, 1024usize),
        (7168, 1024),
        (1024, 3584),
        (4096, 13696),
    ];
    let mut options = vec![
        (
            "matmul_nt, 1 thread (gemm alone)".to_string(),
            Opt::GemmOneThread,
        ),
        ("matmul_nt".to_string(), Opt::Gemm),
    ];
    for (r, t) in [(1, 4), (4, 4), (8, 4), (8, 1)] {
        options.push((
            format!("skinny R={r} tasks/thread={t}"),
            Opt::Skinny(SkinnyParams {
                rows_per_block: r,
                tasks_per_thread: t,
            }),
        ));
    }
    for &(n, k) in &shapes {
        let bytes = n * k * 4;
        let copies = ((256usize << 20) / bytes).clamp(1, 64);
        let weights: Vec<Vec<f32>> = (0..copies).map(|c| data(n * k, c as u64 + 1)).collect();
        for &m in &[1usize, 4, 8] {
            let lhs = data(m * k, 99);
            let mut dst = vec![0f32; m * n];
            println!(
                "m={m} n={n} k={k} ({:.1} MiB x {copies} copies)",
                bytes as f64 / (1 << 20) as f64
            );
            for (name, opt) in &options {
                let reps = (copies * 4).max(12);
                let mut times = Vec::with_capacity(reps);
                let p = if matches!(opt, Opt::GemmOneThread) {
                    &one
                } else {
                    &pool
                };
                p.install(|| {
                    for r in 0..reps + 2 {
                        let w = &weights[r % copies];
                        let t = Instant::now();
                        match opt {
                            Opt::GemmOneThread | Opt::Gemm => {
                                matmul_nt(&mut dst, &lhs, w, m, n, k, false)
                            }
                            Opt::Skinny(p) => {
                                matmul_nt_skinny_with(*p, &mut dst, &lhs, w, m, n, k, false)
                            }
                        }
                        if r >= 2 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                });
                let med = median(&mut times);
                println!(
                    "  {name:<34} {:>9.1} us  {:>6.2} GB/s  ({:>3.0}% of {:.1} GB/s)",
                    med * 1e6,
                    bytes as f64 / med / 1e9,
                    100.0 * bytes as f64 / med / bw.best,
                    bw.best / 1e9
                );
            }
        }
    }
    let c = usage.since();
    println!(
        "other processes kept {:.2} cores busy on average during the sweep",
        c.other_cores
    );
}
