//! `TimedBackend`: wraps a CPU-tensor backend and adds up the wall time of every operation, so a
//! decode step can be broken down (which GEMM, attention, norms) without a profiler.
//!
//! Timing is per call with `Instant` around the delegated call; the overhead (tens of ns) is far
//! below the operations measured. Linear layers are keyed by their output x input width.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use autoglm_core::backend::cpu::CpuTensor;
use autoglm_core::backend::{AttentionShape, Backend, KvCacheShape};
use autoglm_core::model::HostTensor;
use autoglm_core::runner::ForwardBatch;
use autoglm_core::Result;

/// Calls and seconds of one kind of operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTime {
    /// Number of calls.
    pub calls: u64,
    /// Total wall time, seconds.
    pub secs: f64,
}

/// See the module documentation.
pub struct TimedBackend<B> {
    inner: B,
    stats: Mutex<BTreeMap<String, OpTime>>,
}

impl<B: Backend<Tensor = CpuTensor>> TimedBackend<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        TimedBackend {
            inner,
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    /// Takes the totals so far and starts again from zero.
    pub fn take(&self) -> BTreeMap<String, OpTime> {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn time<T>(&self, key: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        let dt = t.elapsed().as_secs_f64();
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let e = stats.entry(key()).or_default();
        e.calls += 1;
        e.secs += dt;
        out
    }
}

impl<B: Backend<Tensor = CpuTensor>> Backend for TimedBackend<B> {
    type Weight = B::Weight;
    type Tensor = CpuTensor;
    type KvCache = B::KvCache;

    fn name(&self) -> String {
        format!("timed({})", self.inner.name())
    }

    fn upload(&self, t: HostTensor) -> Result<B::Weight> {
        self.inner.upload(t)
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<B::KvCache> {
        self.inner.alloc_kv_cache(shape)
    }

    fn embedding(&self, table: &B::Weight, ids: &[u32]) -> Result<CpuTensor> {
        self.time(|| "embedding".into(), || self.inner.embedding(table, ids))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &B::Weight, eps: f32) -> Result<CpuTensor> {
        self.time(|| "rms_norm".into(), || self.inner.rms_norm(x, w, eps))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &B::Weight,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.time(
            || "add_rms_norm".into(),
            || self.inner.add_rms_norm(residual, x, w, eps),
        )
    }

    fn linear(&self, x: &CpuTensor, w: &B::Weight, bias: Option<&B::Weight>) -> Result<CpuTensor> {
        let t = Instant::now();
        let out = self.inner.linear(x, w, bias)?;
        let dt = t.elapsed().as_secs_f64();
        let key = format!("linear {}x{}", out.cols, x.cols);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let e = stats.entry(key).or_default();
        e.calls += 1;
        e.secs += dt;
        Ok(out)
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        self.time(|| "silu_mul".into(), || self.inner.silu_mul(gate_up))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor> {
        self.time(|| "gather_rows".into(), || self.inner.gather_rows(x, rows))
    }

    fn attention(
        &self,
        qkv: &mut CpuTensor,
        cache: &mut B::KvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: &AttentionShape,
    ) -> Result<CpuTensor> {
        self.time(
            || "attention".into(),
            || self.inner.attention(qkv, cache, layer, batch, shape),
        )
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        self.time(|| "to_host".into(), || self.inner.to_host(x))
    }
}
