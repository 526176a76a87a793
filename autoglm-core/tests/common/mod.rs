//! Shared helpers for the integration tests: fixture paths and expected values.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use serde_json::Value;

/// The two fixtures shipped with the project and three more shapes made by
/// `tests/fixtures/extra/generate.py` with transformers: MQA with rope in `rope_parameters`, full
/// rotary without bias and tied f16 embeddings, and a 300-token prompt on sharded bf16 weights.
pub const FIXTURES: [&str; 5] = [
    "glm4-tiny",
    "glm-tiny-bf16",
    "extra/glm4-mqa",
    "extra/glm-full-rotary-nobias",
    "extra/glm4-long-sharded-bf16",
];

/// `tests/fixtures/<name>`; `AUTOGLM_FIXTURES` overrides the folder (prebuilt test executables
/// run on another machine, e.g. by `.ci/gpu-check.sh`).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("AUTOGLM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
        .join(name)
}

pub fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A `[rows, cols]` float32 tensor from `expected.safetensors`.
pub fn expected_tensor(name: &str, tensor: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixture(name).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(tensor).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// max |a - b| / max |b| over one row.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A copy of a fixture in a fresh temporary directory, for tests that corrupt files.
pub fn temp_copy(name: &str, tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("autoglm-test-{}-{tag}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// The index of the first largest value (as `torch.argmax`).
pub fn first_max(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The logits of the device sampling tests: 1000 tokens, values repeating (ties at every cut),
/// every 97th -inf.
pub fn sampling_logits() -> Vec<f32> {
    (0..1000)
        .map(|i| {
            if i % 97 == 5 {
                f32::NEG_INFINITY
            } else {
                ((i * 37) % 101) as f32 * 0.05 - 2.5
            }
        })
        .collect()
}

/// The settings of the device sampling tests (uniform 0: each test sets its draws): plain,
/// top-k, top-p, min-p, all three, top-k 1, greedy.
pub fn sampling_cases() -> [autoglm_core::backend::RowSampling; 7] {
    let row = |temperature, top_k, top_p, min_p| autoglm_core::backend::RowSampling {
        temperature,
        top_k,
        top_p,
        min_p,
        uniform: 0.0,
    };
    [
        row(1.0, 0, 1.0, 0.0),
        row(0.7, 15, 1.0, 0.0),
        row(1.0, 0, 0.3, 0.0),
        row(1.3, 0, 1.0, 0.5),
        row(0.9, 40, 0.8, 0.05),
        row(2.0, 1, 1.0, 0.0),
        row(0.0, 0, 1.0, 0.0),
    ]
}

/// Each token's share of draws under `r` by the host sampler's rules (`sampling::sample`):
/// candidates sorted by (logit desc, index asc), then top-k, min-p, top-p.
pub fn expected_shares(logits: &[f32], r: &autoglm_core::backend::RowSampling) -> Vec<f64> {
    let mut p = vec![0.0; logits.len()];
    let best = first_max(logits);
    if r.temperature <= 0.0 {
        p[best] = 1.0;
        return p;
    }
    let inv_t = 1.0 / r.temperature;
    let mx = logits[best] * inv_t;
    let w = |i: usize| ((logits[i] * inv_t - mx) as f64).exp();
    let mut cand: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    cand.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if r.top_k > 0 {
        cand.truncate(r.top_k);
    }
    if r.min_p > 0.0 {
        cand.retain(|&i| w(i) >= r.min_p as f64);
    }
    if r.top_p < 1.0 {
        let target = r.top_p as f64 * cand.iter().map(|&i| w(i)).sum::<f64>();
        let mut cum = 0.0;
        let keep = cand
            .iter()
            .position(|&i| {
                cum += w(i);
                cum >= target
            })
            .map_or(cand.len(), |j| j + 1);
        cand.truncate(keep);
    }
    let mass: f64 = cand.iter().map(|&i| w(i)).sum();
    for &i in &cand {
        p[i] = w(i) / mass;
    }
    p
}

/// CRC-32 (IEEE) as PNG chunks use it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Appends one PNG chunk.
pub fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A PNG header (RGB, 8 bits) declaring `w x h`, with a tiny IDAT.
pub fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}
