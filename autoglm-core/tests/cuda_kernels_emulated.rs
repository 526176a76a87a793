//! CUDA kernels executed on the CPU, against the host code they stand in for:
//! - attention (`rope_and_cache_write`, `paged_attention`, `attention_combine`) against the CPU
//!   backend's attention (the reference the fixtures check against transformers): indexing, the
//!   paged KV layout, rope, the online softmax, GQA grouping, split-K and its merge, the bf16
//!   output copy and the padding slot; with M-RoPE, rope by the `[t, h, w]` streams;
//! - the vision tower's kernels (vision.cu) against the CPU backend's ops: `layer_norm`, `gelu`,
//!   the bicubic position-table resampling (bit for bit), and the 2-D-rope attention within each
//!   image of a batch (`vision_rope`, `vision_attention`);
//! - sampling (`argmax_rows`, `sample_rows`) against the host sampler's rules: for every case,
//!   draws placed in the middle of a kept token's share must pick exactly that token.
//!
//! `tests/emu/cuda_emu.h` emulates the little of CUDA C++ the kernels use (each block's threads
//! as real threads, `__syncthreads` and warp shuffles through barriers, uninitialised shared
//! memory filled with NaNs); the drivers in `tests/emu` launch the kernels as `ops.rs` does.
//! Timing and anything about the real device stay for `cuda_fixtures`. Needs a C++20 compiler
//! (`$CXX`, else `c++`; `.ci/test` installs one).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use autoglm_core::backend::cpu::{CpuBackend, CpuTensor};
use autoglm_core::backend::{
    rope_inv_freq, AttentionShape, Backend, KvCacheShape, RowSampling, VisionAttentionShape,
};
use autoglm_core::model::vision::merge_block_positions;
use autoglm_core::runner::{ForwardBatch, VisionBatch};
use half::bf16;

/// The slot of a padding token (cuda/graph.rs): its key and value must not be written.
const PAD_SLOT: u32 = u32::MAX;
const BLOCK: usize = 4;
const BLOCKS: usize = 16;
/// The value every cache slot starts with in the emulated cache (bf16 1.0).
const SENTINEL: u16 = 0x3f80;

/// Builds `tests/emu/{driver}.cpp` with the kernels (once per test process).
fn build(driver: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::temp_dir().join(format!("autoglm-{driver}-{}", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-pthread",
            "-Wall",
            "-Werror",
            // `#pragma unroll` is nvcc's/NVRTC's; the host compiler ignores it.
            "-Wno-unknown-pragmas",
            "-I",
        ])
        .arg(dir.join("src/backend/cuda/kernels"))
        .arg("-I")
        .arg(dir.join("tests/emu"))
        .arg(dir.join(format!("tests/emu/{driver}.cpp")))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cxx} (this test needs a C++20 compiler): {e}"));
    assert!(
        out.status.success(),
        "{cxx} failed on {driver}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a driver on `input`; returns its output file's bytes.
fn run_driver(exe: &Path, tag: &str, input: &[u8]) -> Vec<u8> {
    let dir = std::env::temp_dir();
    let (inp, outp) = (
        dir.join(format!("autoglm-emu-in-{}-{tag}", std::process::id())),
        dir.join(format!("autoglm-emu-out-{}-{tag}", std::process::id())),
    );
    std::fs::write(&inp, input).unwrap();
    let run = Command::new(exe).arg(&inp).arg(&outp).output().unwrap();
    let _ = std::fs::remove_file(&inp);
    assert!(
        run.status.success(),
        "emulated kernels failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let raw = std::fs::read(&outp).unwrap();
    let _ = std::fs::remove_file(&outp);
    raw
}

fn attention_emulator() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("attention_driver"))
}

fn sampling_emulator() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("sampling_driver"))
}

fn shape() -> AttentionShape {
    AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rotary_dim: 8,
        rope_theta: 10000.0,
        scale: 0.25,
        mrope_section: None,
    }
}

/// One step as the kernels see it: the CPU batch's arrays plus optional padding rows.
struct Step {
    batch: ForwardBatch,
    qkv: Vec<f32>,
    /// Padding rows appended for the emulator only (the CPU backend has no padding slot).
    pads: usize,
}

struct EmuOut {
    qkv: Vec<f32>,
    out: Vec<f32>,
    out_bf16: Vec<u16>,
    k: Vec<u16>,
    v: Vec<u16>,
}

fn width(s: &AttentionShape) -> usize {
    (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs the kernels on `step` with the given KV caches (bf16 bits, updated in place).
/// Which attention kernel the driver launches after the cache write.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// `paged_attention` with this many KV splits (merged by `attention_combine`), each KV
    /// head's query group served by `group_split` blocks.
    Paged { splits: u32, group_split: u32 },
    /// `paged_attention_prefill` with this many query tokens a block.
    Prefill { qt: u32 },
}

/// Runs the kernels on `step` with the given KV caches (bf16 bits, updated in place).
fn run_emulated(
    s: &AttentionShape,
    step: &Step,
    tile: u32,
    kernel: Kernel,
    k: &mut Vec<u16>,
    v: &mut Vec<u16>,
) -> EmuOut {
    let (splits, code, qt) = match kernel {
        // The driver reads the group split from the (otherwise unused) qt field.
        Kernel::Paged {
            splits,
            group_split,
        } => (splits, 0u32, group_split),
        Kernel::Prefill { qt } => (1, 1, qt),
    };
    let b = &step.batch;
    let (n_real, w) = (b.num_tokens(), width(s));
    let tokens = n_real + step.pads;
    let seqs = b.num_seqs() + step.pads;
    let mbps = b.max_blocks_per_seq;
    let mut seq_of_token = Vec::new();
    for (seq, q) in b.query_start.windows(2).enumerate() {
        seq_of_token.extend((q[0]..q[1]).map(|_| seq as u32));
    }
    let mut positions = b.positions.to_vec();
    let mut slots = b.slot_mapping.to_vec();
    let mut tables = b.block_tables.to_vec();
    let mut qkv = step.qkv.clone();
    let mut mrope = b.mrope_positions.to_vec();
    for p in 0..step.pads {
        mrope.extend([0, 0, 0]);
        positions.push(0);
        slots.push(PAD_SLOT);
        seq_of_token.push((b.num_seqs() + p) as u32);
        tables.extend(std::iter::repeat_n(0, mbps));
        qkv.extend(random(w, 99 + p as u64));
    }
    let mut bytes = Vec::new();
    let header = [
        tokens,
        s.num_heads,
        s.num_kv_heads,
        s.head_dim,
        s.rotary_dim,
        BLOCK,
        BLOCKS * BLOCK,
        mbps,
        seqs,
    ];
    for x in header {
        bytes.extend((x as u32).to_le_bytes());
    }
    bytes.extend(tile.to_le_bytes());
    bytes.extend(splits.to_le_bytes());
    bytes.extend(s.scale.to_le_bytes());
    bytes.extend(code.to_le_bytes());
    bytes.extend(qt.to_le_bytes());
    // The rope kernel's streams: ops.rs passes the same for each shape.
    let pairs = s.rotary_dim as u32 / 2;
    let (stride, sec0, sec01) = match s.mrope_section {
        None => (1u32, pairs, pairs),
        Some(sec) => (3, sec[0] as u32, (sec[0] + sec[1]) as u32),
    };
    for x in [stride, sec0, sec01] {
        bytes.extend(x.to_le_bytes());
    }
    qkv.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    let mut query_start = b.query_start.to_vec();
    for p in 0..step.pads {
        query_start.push((n_real + p + 1) as u32);
    }
    for arr in [&positions, &slots, &seq_of_token, &tables, &query_start] {
        arr.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    }
    if s.mrope_section.is_some() {
        assert_eq!(mrope.len(), 3 * tokens, "three M-RoPE positions a token");
        mrope.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    }
    rope_inv_freq(s.rotary_dim, s.rope_theta)
        .iter()
        .for_each(|x| bytes.extend(x.to_le_bytes()));
    k.iter()
        .chain(v.iter())
        .for_each(|x| bytes.extend(x.to_le_bytes()));

    let raw = run_driver(
        attention_emulator(),
        &format!(
            "attention-{tile}-{code}-{splits}-{qt}-{tokens}-{}",
            s.mrope_section.is_some()
        ),
        &bytes,
    );
    let mut at = 0;
    let mut f32s = |n: usize| -> Vec<f32> {
        let v = raw[at..at + 4 * n]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        at += 4 * n;
        v
    };
    let n_out = tokens * s.num_heads * s.head_dim;
    let qkv_out = f32s(tokens * w);
    let out = f32s(n_out);
    let u16s = |at: usize, n: usize| -> Vec<u16> {
        raw[at..at + 2 * n]
            .chunks(2)
            .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let base = 4 * (tokens * w + n_out);
    let kv_len = k.len();
    let out_bf16 = u16s(base, n_out);
    *k = u16s(base + 2 * n_out, kv_len);
    *v = u16s(base + 2 * n_out + 2 * kv_len, kv_len);
    assert_eq!(raw.len(), base + 2 * n_out + 4 * kv_len, "output size");
    EmuOut {
        qkv: qkv_out,
        out,
        out_bf16,
        k: k.clone(),
        v: v.clone(),
    }
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// The two steps: a prefill of two sequences (10 and 6 tokens), then a mixed step (a 3-token
/// chunk of sequence 0, one decode token of sequence 1) with one padding row. Sequence tables
/// avoid block 0, which the padding row reads. With M-RoPE (`s.mrope_section`), every token's
/// three positions differ from each other and from its position.
fn steps(s: &AttentionShape) -> [Step; 2] {
    let w = width(s);
    let mut a = ForwardBatch::new(4);
    a.push_seq(&[0; 10], 0, &[3, 5, 7], BLOCK);
    a.push_seq(&[0; 6], 0, &[2, 9], BLOCK);
    let mut b = ForwardBatch::new(4);
    b.push_seq(&[0; 3], 10, &[3, 5, 7, 8], BLOCK);
    b.push_seq(&[0; 1], 6, &[2, 9], BLOCK);
    if s.mrope_section.is_some() {
        for batch in [&mut a, &mut b] {
            let thw: Vec<u32> = batch
                .positions
                .iter()
                .enumerate()
                .flat_map(|(i, &p)| {
                    let i = i as u32;
                    [p + 1, p + 2 + i % 3, 2 * p + 7 + i % 4]
                })
                .collect();
            batch.mrope_positions = thw.into();
        }
    }
    [
        Step {
            qkv: random(16 * w, 1),
            batch: a,
            pads: 0,
        },
        Step {
            qkv: random(4 * w, 2),
            batch: b,
            pads: 1,
        },
    ]
}

/// Both steps on the CPU backend and through the emulated kernels with `tile` positions per
/// shared-memory tile and `splits` KV splits; every output compared.
fn check(tile: u32, kernel: Kernel) {
    check_shape(&shape(), tile, kernel);
}

/// [`check`] for the attention shape `s`.
fn check_shape(s: &AttentionShape, tile: u32, kernel: Kernel) {
    let s = *s;
    let cpu = CpuBackend::new();
    let cache_shape = KvCacheShape {
        num_layers: 1,
        num_blocks: BLOCKS,
        block_size: BLOCK,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.head_dim,
    };
    let mut cache = cpu.alloc_kv_cache(cache_shape).unwrap();
    let kvw = s.num_kv_heads * s.head_dim;
    let mut k = vec![SENTINEL; BLOCKS * BLOCK * kvw];
    let mut v = k.clone();
    let (w, hd, nh) = (width(&s), s.head_dim, s.num_heads);
    for (i, step) in steps(&s).iter().enumerate() {
        let what = format!("tile {tile}, {kernel:?}, step {i}");
        let n = step.batch.num_tokens();
        let mut qkv = CpuTensor::new(n, w, step.qkv.clone());
        let want = cpu
            .attention(&mut qkv, &mut cache, 0, &step.batch, &s)
            .unwrap();
        let got = run_emulated(&s, step, tile, kernel, &mut k, &mut v);
        // Rope on q and k (v untouched): f32 on both sides.
        let e = max_rel_err(&got.qkv[..n * w], &qkv.data);
        assert!(e < 1e-5, "{what}: roped qkv, relative error {e}");
        // Attention over bf16 keys and values against the f32 cache of the CPU.
        let e = max_rel_err(&got.out[..n * nh * hd], &want.data);
        assert!(e < 2e-2, "{what}: attention output, relative error {e}");
        for (j, (&b, &f)) in got.out_bf16.iter().zip(&got.out).enumerate() {
            assert_eq!(b, bf16::from_f32(f).to_bits(), "{what}: bf16 output {j}");
        }
        // Each real token's key and value landed in its slot, as bf16 of the roped values.
        for t in 0..n {
            let slot = step.batch.slot_mapping[t] as usize;
            let row = &got.qkv[t * w..(t + 1) * w];
            let (kr, vr) = (&row[nh * hd..nh * hd + kvw], &row[nh * hd + kvw..]);
            for c in 0..kvw {
                assert_eq!(
                    got.k[slot * kvw + c],
                    bf16::from_f32(kr[c]).to_bits(),
                    "{what}: k of token {t}"
                );
                assert_eq!(
                    got.v[slot * kvw + c],
                    bf16::from_f32(vr[c]).to_bits(),
                    "{what}: v of token {t}"
                );
            }
        }
        // Block 0 belongs to no sequence: the padding row read it and wrote nothing.
        assert!(
            got.k[..BLOCK * kvw]
                .iter()
                .chain(&got.v[..BLOCK * kvw])
                .all(|&x| x == SENTINEL),
            "{what}: the padding row wrote into the cache"
        );
        // The padding row's output is finite (it attends to one slot).
        let pad = &got.out[n * nh * hd..];
        assert!(pad.iter().all(|x| x.is_finite()), "{what}: padding output");
    }
}

#[test]
fn attention_kernels_match_the_cpu_backend_in_one_tile() {
    check(
        64,
        Kernel::Paged {
            splits: 1,
            group_split: 1,
        },
    );
}

/// Tiles of 4 positions: every context spans several tiles, some partly filled.
#[test]
fn attention_kernels_match_the_cpu_backend_across_tiles() {
    check(
        4,
        Kernel::Paged {
            splits: 1,
            group_split: 1,
        },
    );
}

/// Split-K: each context cut into 3 ranges (some empty for short contexts), merged by
/// attention_combine.
#[test]
fn split_attention_and_its_merge_match_the_cpu_backend() {
    check(
        4,
        Kernel::Paged {
            splits: 3,
            group_split: 1,
        },
    );
    check(
        64,
        Kernel::Paged {
            splits: 5,
            group_split: 1,
        },
    );
}

/// Each KV head's two query heads served by two blocks (what small decode batches launch),
/// alone and with split-K.
#[test]
fn attention_with_the_query_group_over_several_blocks_matches_the_cpu_backend() {
    check(
        64,
        Kernel::Paged {
            splits: 1,
            group_split: 2,
        },
    );
    check(
        4,
        Kernel::Paged {
            splits: 3,
            group_split: 2,
        },
    );
}

/// The query-tiled prefill kernel: blocks of 1, 2, 3 and 8 query tokens (the 10- and 3-token
/// chunks end in partial blocks; the decode token and the padding row are blocks of one), each
/// row masked at its own position, with one and with many KV tiles.
#[test]
fn prefill_kernel_matches_the_cpu_backend() {
    for qt in [1, 2, 3, 8] {
        check(4, Kernel::Prefill { qt });
    }
    check(64, Kernel::Prefill { qt: 4 });
}

/// The glm4v-tiny text attention: heads of 32 with 16 rotary dims, M-RoPE section [2, 3, 3].
fn mrope_shape() -> AttentionShape {
    AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rotary_dim: 16,
        rope_theta: 10000.0,
        scale: 32f32.powf(-0.5),
        mrope_section: Some([2, 3, 3]),
    }
}

/// M-RoPE: `rope_and_cache_write` turns frequency i by stream `mrope_stream([2, 3, 3], i)` of
/// the token's `[t, h, w]` (all three differing from each other and from the token's position,
/// which still picks the cache slot and the causal mask), against the CPU backend with the same
/// M-RoPE positions, through every attention kernel. The comparison can tell the streams apart:
/// the CPU's roped q and k under 1-D rope or other sections differ far beyond its tolerance.
#[test]
fn mrope_rope_path_matches_the_cpu_backend() {
    let s = mrope_shape();
    let cpu = CpuBackend::new();
    let step = &steps(&s)[0];
    let roped = |section: Option<[usize; 3]>| {
        let shape = AttentionShape {
            mrope_section: section,
            ..s
        };
        let mut cache = cpu
            .alloc_kv_cache(KvCacheShape {
                num_layers: 1,
                num_blocks: BLOCKS,
                block_size: BLOCK,
                num_kv_heads: s.num_kv_heads,
                head_dim: s.head_dim,
            })
            .unwrap();
        let mut qkv = CpuTensor::new(step.batch.num_tokens(), width(&s), step.qkv.clone());
        cpu.attention(&mut qkv, &mut cache, 0, &step.batch, &shape)
            .unwrap();
        qkv.data
    };
    let want = roped(s.mrope_section);
    for other in [None, Some([8, 0, 0]), Some([3, 3, 2]), Some([2, 2, 4])] {
        let e = max_rel_err(&roped(other), &want);
        assert!(
            e > 1e-2,
            "{other:?} rotates like [2, 3, 3] (difference {e})"
        );
    }
    check_shape(
        &s,
        64,
        Kernel::Paged {
            splits: 1,
            group_split: 1,
        },
    );
    check_shape(
        &s,
        4,
        Kernel::Paged {
            splits: 3,
            group_split: 1,
        },
    );
    check_shape(&s, 4, Kernel::Prefill { qt: 2 });
}

/// Runs `sample_rows` (`argmax` false) or `argmax_rows` on rows of `logits`.
fn sample_emulated(logits: &[f32], cols: usize, params: &[RowSampling], argmax: bool) -> Vec<u32> {
    sampling_kernel_emulated(logits, cols, params, u32::from(!argmax))
}

/// Runs kernel `code` of `tests/emu/sampling_driver.cpp` (0 argmax_rows, 1 sample_rows, 2 the
/// two-pass argmax) on rows of `logits`.
fn sampling_kernel_emulated(
    logits: &[f32],
    cols: usize,
    params: &[RowSampling],
    code: u32,
) -> Vec<u32> {
    let argmax = code != 1;
    let rows = logits.len() / cols;
    let mut bytes = Vec::new();
    for x in [rows as u32, cols as u32, code] {
        bytes.extend(x.to_le_bytes());
    }
    logits.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    if !argmax {
        assert_eq!(params.len(), rows);
        for r in params {
            for x in [
                r.temperature as f64,
                r.top_k as f64,
                r.top_p as f64,
                r.min_p as f64,
                r.uniform,
            ] {
                bytes.extend(x.to_le_bytes());
            }
        }
    }
    let raw = run_driver(
        sampling_emulator(),
        &format!("sampling-{rows}-{cols}-{code}"),
        &bytes,
    );
    raw.chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// For each setting, draws in the middle of kept tokens' shares (in index order, as the device
/// walks them) must pick exactly those tokens: the first and last kept token, three between, and
/// a draw just below 1. Checks the kept set at every cut (ties by index) and the walk.
#[test]
fn sample_rows_picks_the_token_whose_share_holds_the_draw() {
    let logits = common::sampling_logits();
    let cases = common::sampling_cases();
    let (mut params, mut want) = (Vec::new(), Vec::new());
    for case in cases {
        let shares = common::expected_shares(&logits, &case);
        let kept: Vec<usize> = (0..logits.len()).filter(|&i| shares[i] > 0.0).collect();
        let n = kept.len();
        let picks: std::collections::BTreeSet<usize> =
            [0, n / 4, n / 2, 3 * n / 4, n - 1].into_iter().collect();
        let mut before = 0.0;
        for (j, &t) in kept.iter().enumerate() {
            if picks.contains(&j) {
                params.push(RowSampling {
                    uniform: before + shares[t] / 2.0,
                    ..case
                });
                want.push(t as u32);
            }
            before += shares[t];
        }
        params.push(RowSampling {
            uniform: 1.0 - 1e-12,
            ..case
        });
        want.push(kept[n - 1] as u32);
    }
    let rows = params.len();
    let all: Vec<f32> = (0..rows).flat_map(|_| logits.iter().copied()).collect();
    let got = sample_emulated(&all, logits.len(), &params, false);
    for (r, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "row {r}: {:?}", params[r]);
    }
}

/// argmax_rows and the two-pass argmax of wide rows (chunks of 64 columns here): the first
/// maximum, -inf rows included, for row widths below, at and above the block's 256 threads and
/// one chunk (1000 columns: 16 chunks, the last partial).
#[test]
fn argmax_rows_takes_the_first_maximum() {
    for cols in [7usize, 64, 256, 1000] {
        let mut logits = Vec::new();
        let mut want = Vec::new();
        for r in 0..6usize {
            let row: Vec<f32> = (0..cols)
                .map(|i| match r {
                    0 => ((i * 37) % 101) as f32,
                    1 => f32::NEG_INFINITY,
                    2 => -(i as f32),
                    3 => i as f32,
                    4 if i == cols / 2 => f32::INFINITY,
                    _ => ((i * 7919) % 13) as f32 * 0.5,
                })
                .collect();
            want.push(common::first_max(&row) as u32);
            logits.extend(row);
        }
        let got = sample_emulated(&logits, cols, &[], true);
        assert_eq!(
            got, want,
            "{cols} columns (rows: ties, all -inf, first, last, +inf, mixed)"
        );
        let got = sampling_kernel_emulated(&logits, cols, &[], 2);
        assert_eq!(got, want, "two-pass argmax, {cols} columns");
    }
}

fn ops_emulator() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("ops_driver"))
}

/// Input of `tests/emu/ops_driver.cpp`, built field by field.
#[derive(Default)]
struct OpInput(Vec<u8>);

impl OpInput {
    fn u32(mut self, x: u32) -> Self {
        self.0.extend(x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend(x.to_le_bytes());
        self
    }
    fn f32s(mut self, xs: &[f32]) -> Self {
        xs.iter().for_each(|x| self.0.extend(x.to_le_bytes()));
        self
    }
    fn u32s(mut self, xs: &[u32]) -> Self {
        xs.iter().for_each(|x| self.0.extend(x.to_le_bytes()));
        self
    }
    fn u16s(mut self, xs: &[u16]) -> Self {
        xs.iter().for_each(|x| self.0.extend(x.to_le_bytes()));
        self
    }
    fn run(self, tag: &str) -> OpOutput {
        OpOutput(run_driver(ops_emulator(), tag, &self.0), 0)
    }
}

/// Output of `ops_driver`, read array by array.
struct OpOutput(Vec<u8>, usize);

impl OpOutput {
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        let v = self.0[self.1..self.1 + 4 * n]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        self.1 += 4 * n;
        v
    }
    fn u16s(&mut self, n: usize) -> Vec<u16> {
        let v = self.0[self.1..self.1 + 2 * n]
            .chunks(2)
            .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
            .collect();
        self.1 += 2 * n;
        v
    }
    fn done(&self) {
        assert_eq!(self.1, self.0.len(), "the driver wrote more than was read");
    }
}

fn bf16_bits(xs: &[f32]) -> Vec<u16> {
    xs.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// rms_norm, add_rms_norm and silu_mul against the CPU backend, rows wider than a block (300
/// columns over 256 threads), with their bf16 copies equal to the f32 outputs rounded.
#[test]
fn norms_and_silu_match_the_cpu_backend() {
    use autoglm_core::model::HostTensor;
    let cpu = CpuBackend::new();
    let (rows, width, eps) = (3usize, 300usize, 1e-5f32);
    let x = random(rows * width, 11);
    let r = random(rows * width, 12);
    let w: Vec<f32> = random(width, 13).iter().map(|v| 1.0 + v).collect();
    let wt = cpu
        .upload(HostTensor::owned(vec![width], w.clone()))
        .unwrap();
    let xt = CpuTensor::new(rows, width, x.clone());

    let mut o = OpInput::default()
        .u32(0)
        .u32(rows as u32)
        .u32(width as u32)
        .f32s(&[eps])
        .f32s(&x)
        .f32s(&w)
        .run("rms_norm");
    let (out, ob) = (o.f32s(rows * width), o.u16s(rows * width));
    o.done();
    let want = cpu.rms_norm(&xt, &wt, eps).unwrap();
    let e = max_rel_err(&out, &want.data);
    assert!(e < 1e-5, "rms_norm: relative error {e}");
    assert_eq!(ob, bf16_bits(&out), "rms_norm: bf16 copy");

    let mut o = OpInput::default()
        .u32(1)
        .u32(rows as u32)
        .u32(width as u32)
        .f32s(&[eps])
        .f32s(&r)
        .f32s(&x)
        .f32s(&w)
        .run("add_rms_norm");
    let (res, out, ob) = (
        o.f32s(rows * width),
        o.f32s(rows * width),
        o.u16s(rows * width),
    );
    o.done();
    let mut rt = CpuTensor::new(rows, width, r.clone());
    let want = cpu.add_rms_norm(&mut rt, &xt, &wt, eps).unwrap();
    assert_eq!(res, rt.data, "add_rms_norm: the residual (r + x, exact)");
    let e = max_rel_err(&out, &want.data);
    assert!(e < 1e-5, "add_rms_norm: relative error {e}");
    assert_eq!(ob, bf16_bits(&out), "add_rms_norm: bf16 copy");

    let gate_up = random(rows * 2 * width, 14)
        .iter()
        .map(|v| 6.0 * v)
        .collect::<Vec<f32>>();
    let mut o = OpInput::default()
        .u32(2)
        .u32(rows as u32)
        .u32(width as u32)
        .f32s(&gate_up)
        .run("silu_mul");
    let (out, ob) = (o.f32s(rows * width), o.u16s(rows * width));
    o.done();
    let want = cpu
        .silu_mul(&CpuTensor::new(rows, 2 * width, gate_up))
        .unwrap();
    let e = max_rel_err(&out, &want.data);
    assert!(e < 1e-6, "silu_mul: relative error {e}");
    assert_eq!(ob, bf16_bits(&out), "silu_mul: bf16 copy");
}

/// Embedding (bf16 table), gather_rows, add_bias and the f32 -> bf16 conversion are exact:
/// against the CPU backend, and against `half` for the rounding (ties to even, infinities,
/// subnormals, overflow to infinity; NaN stays NaN).
#[test]
fn embedding_gather_bias_and_bf16_rounding_are_exact() {
    use autoglm_core::model::HostTensor;
    let cpu = CpuBackend::new();
    let (vocab, width) = (50usize, 300usize);
    // Table values that bf16 holds exactly, so the CPU's f32 table is the same table.
    let table: Vec<f32> = random(vocab * width, 21)
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    let ids = [0u32, 49, 7, 7, 13];
    let mut o = OpInput::default()
        .u32(3)
        .u32(vocab as u32)
        .u32(width as u32)
        .u32(ids.len() as u32)
        .u16s(&bf16_bits(&table))
        .u32s(&ids)
        .run("embedding");
    let out = o.f32s(ids.len() * width);
    o.done();
    let tt = cpu
        .upload(HostTensor::owned(vec![vocab, width], table.clone()))
        .unwrap();
    assert_eq!(out, cpu.embedding(&tt, &ids).unwrap().data, "embedding");

    let x = random(6 * width, 22);
    let picks = [5u32, 0, 5, 2];
    let mut o = OpInput::default()
        .u32(5)
        .u32(6)
        .u32(width as u32)
        .u32(picks.len() as u32)
        .f32s(&x)
        .u32s(&picks)
        .run("gather_rows");
    let out = o.f32s(picks.len() * width);
    o.done();
    let want = cpu
        .gather_rows(&CpuTensor::new(6, width, x.clone()), &picks)
        .unwrap();
    assert_eq!(out, want.data, "gather_rows");

    let b = random(width, 23);
    let mut o = OpInput::default()
        .u32(6)
        .u32(6)
        .u32(width as u32)
        .f32s(&x)
        .f32s(&b)
        .run("add_bias");
    let out = o.f32s(6 * width);
    o.done();
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v + b[i % width])
        .collect();
    assert_eq!(out, want, "add_bias");

    let mut values = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + f32::EPSILON * 32768.0, // halfway between two bf16 values: to even
        1.0 + f32::EPSILON * 98304.0, // halfway, rounds up to even
        -3.5e-39,                     // subnormal
        f32::MAX,                     // overflows to infinity
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
    ];
    values.extend(random(1000, 24).iter().map(|v| v * 1e3));
    values.push(f32::NAN);
    let mut o = OpInput::default()
        .u32(7)
        .u64(values.len() as u64)
        .f32s(&values)
        .run("f32_to_bf16");
    let got = o.u16s(values.len());
    o.done();
    for (v, g) in values.iter().zip(&got) {
        if v.is_nan() {
            assert!(bf16::from_bits(*g).is_nan(), "NaN -> {g:#x}");
        } else {
            assert_eq!(*g, bf16::from_f32(*v).to_bits(), "bf16 of {v:e}");
        }
    }
}

/// Weights generated on the device (random.cu) equal RandomWeights' host tensor element for
/// element, over several 4096-element chunks and a partial last one; the bf16 variant equals
/// them rounded.
#[test]
fn generated_weights_equal_the_host_generator() {
    use autoglm_core::model::{Fill, WeightSource};
    let src = autoglm_core::model::RandomWeights {
        seed: 3,
        scale: 0.05,
    };
    let name = "model.layers.0.mlp.down_proj.weight";
    let shape = [3usize, 5000];
    let n = shape[0] * shape[1];
    let host = src.tensor(name, &shape).unwrap();
    let Some(Fill::Uniform { stream, scale }) = src.generator(name) else {
        panic!("{name} is not generated from a stream");
    };
    for as_bf16 in [false, true] {
        let mut o = OpInput::default()
            .u32(4)
            .u32(u32::from(as_bf16))
            .u64(n as u64)
            .u64(stream)
            .f32s(&[scale])
            .run(&format!("random-{as_bf16}"));
        if as_bf16 {
            let got = o.u16s(n);
            o.done();
            assert_eq!(got, bf16_bits(&host.data), "bf16 weights");
        } else {
            let got = o.f32s(n);
            o.done();
            assert_eq!(&got[..], &host.data[..], "f32 weights");
        }
    }
}

fn vision_emulator() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("vision_driver"))
}

/// Runs one op of `tests/emu/vision_driver.cpp`.
fn run_vision(input: OpInput, tag: &str) -> OpOutput {
    OpOutput(run_driver(vision_emulator(), tag, &input.0), 0)
}

/// layer_norm (rows wider than a block, a mean far from 0) and exact GELU against the CPU
/// backend; GELU's bf16 copy equals its f32 output rounded.
#[test]
fn layer_norm_and_gelu_match_the_cpu_backend() {
    use autoglm_core::model::HostTensor;
    let cpu = CpuBackend::new();
    let (rows, width, eps) = (4usize, 300usize, 1e-5f32);
    let x: Vec<f32> = random(rows * width, 31)
        .iter()
        .enumerate()
        .map(|(i, v)| 2.0 * v + 3.0 + (i / width) as f32)
        .collect();
    let w: Vec<f32> = random(width, 32).iter().map(|v| 1.0 + v).collect();
    let b = random(width, 33);
    let up = |v: &[f32]| {
        cpu.upload(HostTensor::owned(vec![v.len()], v.to_vec()))
            .unwrap()
    };
    let mut o = run_vision(
        OpInput::default()
            .u32(0)
            .u32(rows as u32)
            .u32(width as u32)
            .f32s(&[eps])
            .f32s(&x)
            .f32s(&w)
            .f32s(&b),
        "layer_norm",
    );
    let out = o.f32s(rows * width);
    o.done();
    let want = cpu
        .layer_norm(
            &CpuTensor::new(rows, width, x.clone()),
            &up(&w),
            &up(&b),
            eps,
        )
        .unwrap();
    let e = max_rel_err(&out, &want.data);
    assert!(e < 1e-5, "layer_norm: relative error {e}");

    let mut x: Vec<f32> = random(3000, 34).iter().map(|v| 5.0 * v).collect();
    x.extend([0.0, -0.0, 1e-8, -7.0, 7.0, 30.0, -30.0]);
    let mut o = run_vision(
        OpInput::default().u32(1).u64(x.len() as u64).f32s(&x),
        "gelu",
    );
    let (out, ob) = (o.f32s(x.len()), o.u16s(x.len()));
    o.done();
    let want = cpu.gelu(&CpuTensor::new(1, x.len(), x.clone())).unwrap();
    let e = max_rel_err(&out, &want.data);
    assert!(e < 1e-6, "gelu: relative error {e}");
    // Element by element too (tanh's approximation is 1e-3 away near |x| = 2); erff's last bits
    // differ from libm's, amplified where 1 + erf(x) cancels (x < -1).
    for (i, (&g, &v)) in out.iter().zip(&want.data).enumerate() {
        assert!(
            (g - v).abs() <= 1e-6 * v.abs().max(1.0),
            "gelu({}) = {g}, want {v}",
            x[i]
        );
    }
    assert_eq!(ob, bf16_bits(&out), "gelu: bf16 copy");
}

/// A vision batch of images of `grids` patch grids, rows in 2x2 merge-block order (the tower's).
fn vision_batch(grids: &[[u32; 2]]) -> VisionBatch {
    let mut b = VisionBatch::default();
    for &[gh, gw] in grids {
        b.push_image(
            [gh, gw],
            &merge_block_positions(gh as usize, gw as usize, 2),
        );
    }
    b
}

/// The bicubic resampling of a 24 x 24 position table (bf16 values, as the backend stores it)
/// to grids of 10x4, 4x6 and 4x8 patches (the fixture's images) and 40x30 (larger than the
/// table), in one batch: equal to the CPU backend's bit for bit (the kernel computes the taps
/// and accumulates in the CPU's order, each operation rounded alike). Rows wider than a block.
#[test]
fn interpolate_pos_embed_matches_the_cpu_backend_bit_for_bit() {
    use autoglm_core::model::HostTensor;
    let cpu = CpuBackend::new();
    let (side, width) = (24usize, 300usize);
    let table: Vec<f32> = random(side * side * width, 41)
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    let grids = [[10u32, 4], [4, 6], [4, 8], [40, 30]];
    let batch = vision_batch(&grids);
    let rows = batch.num_patches();
    let mut input = OpInput::default()
        .u32(2)
        .u32(rows as u32)
        .u32(grids.len() as u32)
        .u32(side as u32)
        .u32(width as u32)
        .u16s(&bf16_bits(&table));
    input = input.u32s(&batch.patch_hw.iter().flatten().copied().collect::<Vec<_>>());
    input = input.u32s(&batch.image_of_rows());
    input = input.u32s(&grids.iter().flatten().copied().collect::<Vec<_>>());
    let mut o = run_vision(input, "interpolate");
    let got = o.f32s(rows * width);
    o.done();
    let t = cpu
        .upload(HostTensor::owned(vec![side * side, width], table))
        .unwrap();
    let want = cpu.interpolate_pos_embed(&t, side, &batch).unwrap();
    for (i, w) in batch.cu_seqlens.windows(2).enumerate() {
        let r = w[0] as usize * width..w[1] as usize * width;
        let (g, x) = (&got[r.clone()], &want.data[r]);
        let e = max_rel_err(g, x);
        assert!(g == x, "image {i} ({:?}): relative error {e}", grids[i]);
    }
}

/// The 2-D NeoX-halves rope of the vision tower (backend/cpu/vision.rs), as a reference for the
/// kernel's rotated q and k: `[rows, 2 * heads * head_dim]`.
fn rope_2d_reference(qkv: &[f32], hw: &[[u32; 2]], nh: usize, hd: usize) -> Vec<f32> {
    let inv = rope_inv_freq(hd / 2, 10000.0);
    let (w, half, quarter) = (nh * hd, hd / 2, hd / 4);
    let mut out = Vec::with_capacity(hw.len() * 2 * w);
    for (row, p) in qkv.chunks(3 * w).zip(hw) {
        let mut qk = row[..2 * w].to_vec();
        for head in qk.chunks_mut(hd) {
            for d in 0..half {
                let angle = if d < quarter {
                    p[0] as f32 * inv[d]
                } else {
                    p[1] as f32 * inv[d - quarter]
                };
                let (s, c) = angle.sin_cos();
                let (a, b) = (head[d], head[d + half]);
                head[d] = a * c - b * s;
                head[d + half] = b * c + a * s;
            }
        }
        out.extend(qk);
    }
    out
}

/// `vision_rope` + `vision_attention` on a batch of two images of different sizes (10x8 = 80
/// patches, several key tiles and query blocks, and 4x6 = 24) against the CPU backend, heads of
/// 16 and 128, with the tiling ops.rs picks and with small odd tiles (partial query blocks and
/// key tiles everywhere). f32 on both sides; the output's bf16 copy is it rounded.
#[test]
fn vision_attention_matches_the_cpu_backend_within_each_image() {
    let cpu = CpuBackend::new();
    let batch = vision_batch(&[[10, 8], [4, 6]]);
    let rows = batch.num_patches();
    // (heads, head_dim, [(query rows a block, key rows a tile)]): vision_tiling's choice first.
    let cases = [
        (2usize, 16usize, [(16u32, 64u32), (3, 8)]),
        (2, 128, [(16, 32), (5, 24)]),
    ];
    for (nh, hd, tilings) in cases {
        let w = nh * hd;
        let shape = VisionAttentionShape {
            num_heads: nh,
            head_dim: hd,
            rope_theta: 10000.0,
            scale: (hd as f32).powf(-0.5),
        };
        // Larger q and k than v: scores far from uniform, so the weights matter.
        let qkv: Vec<f32> = random(rows * 3 * w, 50 + hd as u64)
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % (3 * w) < 2 * w { 2.5 * v } else { v })
            .collect();
        let want = cpu
            .vision_attention(&CpuTensor::new(rows, 3 * w, qkv.clone()), &batch, &shape)
            .unwrap();
        let rope = rope_2d_reference(&qkv, &batch.patch_hw, nh, hd);
        for (qt, tile) in tilings {
            let what = format!("{nh} heads of {hd}, {qt} query rows a block, tiles of {tile}");
            let mut input = OpInput::default().u32(3);
            for x in [rows, 2, nh, hd, tile as usize, qt as usize] {
                input = input.u32(x as u32);
            }
            input = input.f32s(&[shape.scale]).f32s(&qkv);
            input = input.u32s(&batch.patch_hw.iter().flatten().copied().collect::<Vec<_>>());
            input = input
                .u32s(&batch.cu_seqlens)
                .f32s(&rope_inv_freq(hd / 2, shape.rope_theta));
            let mut o = run_vision(input, &format!("vision-attention-{hd}-{qt}-{tile}"));
            let (qk, out, ob) = (o.f32s(rows * 2 * w), o.f32s(rows * w), o.u16s(rows * w));
            o.done();
            let e = max_rel_err(&qk, &rope);
            assert!(e < 1e-5, "{what}: rotated q and k, relative error {e}");
            for (i, c) in batch.cu_seqlens.windows(2).enumerate() {
                let r = c[0] as usize * w..c[1] as usize * w;
                let e = max_rel_err(&out[r.clone()], &want.data[r]);
                assert!(e < 1e-5, "{what}: image {i}: relative error {e}");
            }
            assert_eq!(ob, bf16_bits(&out), "{what}: bf16 copy");
        }
    }
}

/// gemv_bf16 (the decode-sized product) against an f64 sum of the same bf16 products, for 1, 3
/// and 8 rows, a width whose 16-byte chunks do not fill the last warp pass (k = 8 * 37) and an
/// output count that leaves the last block's warps partly idle (n = 13): every output is
/// written once (the buffer starts as NaN) and agrees to f32 rounding.
#[test]
fn gemv_matches_an_exact_product_of_the_bf16_operands() {
    let (n, k) = (13usize, 8 * 37usize);
    let w = bf16_bits(&random(n * k, 21));
    for m in [1usize, 3, 8] {
        let x = bf16_bits(&random(m * k, 22 + m as u64));
        let mut o = OpInput::default()
            .u32(8)
            .u32(m as u32)
            .u32(n as u32)
            .u32(k as u32)
            .u16s(&w)
            .u16s(&x)
            .run("gemv_bf16");
        let y = o.f32s(m * n);
        o.done();
        let f = |b: u16| bf16::from_bits(b).to_f64();
        let want: Vec<f32> = (0..m * n)
            .map(|i| {
                let (j, r) = (i / n, i % n);
                (0..k)
                    .map(|c| f(x[j * k + c]) * f(w[r * k + c]))
                    .sum::<f64>() as f32
            })
            .collect();
        let e = max_rel_err(&y, &want);
        assert!(e < 1e-5, "{m} rows: relative error {e}");
    }
}
