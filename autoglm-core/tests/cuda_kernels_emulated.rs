//! CUDA kernels executed on the CPU, against the host code they stand in for:
//! - attention (`rope_and_cache_write`, `paged_attention`, `attention_combine`) against the CPU
//!   backend's attention (the reference the fixtures check against transformers): indexing, the
//!   paged KV layout, rope, the online softmax, GQA grouping, split-K and its merge, the bf16
//!   output copy and the padding slot;
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
use autoglm_core::backend::{rope_inv_freq, AttentionShape, Backend, KvCacheShape, RowSampling};
use autoglm_core::runner::ForwardBatch;
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
        .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-I"])
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
    /// `paged_attention` with this many KV splits (merged by `attention_combine`).
    Paged { splits: u32 },
    /// `paged_attention_prefill` with this many query tokens a block.
    Prefill { qt: u32 },
}

/// Runs the kernels on `step` with the given KV caches (bf16 bits, updated in place).
fn run_emulated(
    step: &Step,
    tile: u32,
    kernel: Kernel,
    k: &mut Vec<u16>,
    v: &mut Vec<u16>,
) -> EmuOut {
    let (splits, code, qt) = match kernel {
        Kernel::Paged { splits } => (splits, 0u32, 1u32),
        Kernel::Prefill { qt } => (1, 1, qt),
    };
    let s = shape();
    let b = &step.batch;
    let (n_real, w) = (b.num_tokens(), width(&s));
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
    for p in 0..step.pads {
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
    qkv.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    let mut query_start = b.query_start.to_vec();
    for p in 0..step.pads {
        query_start.push((n_real + p + 1) as u32);
    }
    for arr in [&positions, &slots, &seq_of_token, &tables, &query_start] {
        arr.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
    }
    rope_inv_freq(s.rotary_dim, s.rope_theta)
        .iter()
        .for_each(|x| bytes.extend(x.to_le_bytes()));
    k.iter()
        .chain(v.iter())
        .for_each(|x| bytes.extend(x.to_le_bytes()));

    let raw = run_driver(
        attention_emulator(),
        &format!("attention-{tile}-{code}-{splits}-{qt}-{tokens}"),
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
/// avoid block 0, which the padding row reads.
fn steps() -> [Step; 2] {
    let w = width(&shape());
    let mut a = ForwardBatch::new(4);
    a.push_seq(&[0; 10], 0, &[3, 5, 7], BLOCK);
    a.push_seq(&[0; 6], 0, &[2, 9], BLOCK);
    let mut b = ForwardBatch::new(4);
    b.push_seq(&[0; 3], 10, &[3, 5, 7, 8], BLOCK);
    b.push_seq(&[0; 1], 6, &[2, 9], BLOCK);
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
    let s = shape();
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
    for (i, step) in steps().iter().enumerate() {
        let what = format!("tile {tile}, {kernel:?}, step {i}");
        let n = step.batch.num_tokens();
        let mut qkv = CpuTensor::new(n, w, step.qkv.clone());
        let want = cpu
            .attention(&mut qkv, &mut cache, 0, &step.batch, &s)
            .unwrap();
        let got = run_emulated(step, tile, kernel, &mut k, &mut v);
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
    check(64, Kernel::Paged { splits: 1 });
}

/// Tiles of 4 positions: every context spans several tiles, some partly filled.
#[test]
fn attention_kernels_match_the_cpu_backend_across_tiles() {
    check(4, Kernel::Paged { splits: 1 });
}

/// Split-K: each context cut into 3 ranges (some empty for short contexts), merged by
/// attention_combine.
#[test]
fn split_attention_and_its_merge_match_the_cpu_backend() {
    check(4, Kernel::Paged { splits: 3 });
    check(64, Kernel::Paged { splits: 5 });
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

/// Runs `sample_rows` (`argmax` false) or `argmax_rows` on rows of `logits`.
fn sample_emulated(logits: &[f32], cols: usize, params: &[RowSampling], argmax: bool) -> Vec<u32> {
    let rows = logits.len() / cols;
    let mut bytes = Vec::new();
    for x in [rows as u32, cols as u32, u32::from(!argmax)] {
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
        &format!("sampling-{rows}-{cols}-{argmax}"),
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

/// argmax_rows: the first maximum, -inf rows included, for row widths below, at and above the
/// block's 256 threads.
#[test]
fn argmax_rows_takes_the_first_maximum() {
    for cols in [7usize, 256, 1000] {
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
