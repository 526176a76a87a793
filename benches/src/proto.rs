//! `ProtoBackend`: the CPU backend with `linear` swapped for [`matmul_nt_skinny`] at small batch.
//!
//! Everything except `linear` and `embedding` is delegated to `autoglm_core`'s `CpuBackend`
//! (attention, norms, silu-mul, the KV cache), so a model run on this backend differs from the
//! real one only in how decode-sized GEMMs are computed. It is a measuring device for the
//! benchmarks, not a backend to ship: `CpuWeight` keeps its data private, so this backend keeps
//! its own copy of every matrix and hands only the 1-D tensors (norms, biases) to `CpuBackend`.

use autoglm_core::backend::cpu::{matmul_nt, CpuBackend, CpuKvCache, CpuTensor, CpuWeight};
use autoglm_core::backend::{AttentionShape, Backend, KvCacheShape};
use autoglm_core::model::{F32Data, HostTensor};
use autoglm_core::runner::ForwardBatch;
use autoglm_core::{Error, Result};

use crate::gemv::matmul_nt_skinny;

/// A weight of [`ProtoBackend`]: its own f32 data, plus `CpuBackend`'s copy for 1-D tensors.
pub struct ProtoWeight {
    shape: Vec<usize>,
    data: F32Data,
    cpu: Option<CpuWeight>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ProtoBackend {
    inner: CpuBackend,
    /// `linear` uses the skinny kernel when the activation has at most this many rows.
    pub max_skinny_rows: usize,
}

impl ProtoBackend {
    /// A backend using the skinny kernel for activations of at most `max_skinny_rows` rows.
    pub fn new(max_skinny_rows: usize) -> Self {
        ProtoBackend {
            inner: CpuBackend::new(),
            max_skinny_rows,
        }
    }
}

fn cpu_of<'a>(w: &'a ProtoWeight, op: &str) -> Result<&'a CpuWeight> {
    w.cpu
        .as_ref()
        .ok_or_else(|| Error::Backend(format!("proto {op}: weight {:?} is not a vector", w.shape)))
}

impl Backend for ProtoBackend {
    type Weight = ProtoWeight;
    type Tensor = CpuTensor;
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        "cpu-skinny-gemv".into()
    }

    fn upload(&self, t: HostTensor) -> Result<ProtoWeight> {
        let cpu = if t.shape.len() == 1 {
            Some(
                self.inner
                    .upload(HostTensor::owned(t.shape.clone(), t.data.to_vec()))?,
            )
        } else {
            None
        };
        Ok(ProtoWeight {
            shape: t.shape,
            data: t.data,
            cpu,
        })
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache> {
        self.inner.alloc_kv_cache(shape)
    }

    fn embedding(&self, table: &ProtoWeight, ids: &[u32]) -> Result<CpuTensor> {
        let (vocab, width) = (table.shape[0], table.shape.get(1).copied().unwrap_or(1));
        let mut out = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary ({vocab})"
                )));
            }
            out.extend_from_slice(&table.data[id * width..(id + 1) * width]);
        }
        Ok(CpuTensor::new(ids.len(), width, out))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &ProtoWeight, eps: f32) -> Result<CpuTensor> {
        self.inner.rms_norm(x, cpu_of(w, "rms_norm")?, eps)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &ProtoWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.inner
            .add_rms_norm(residual, x, cpu_of(w, "add_rms_norm")?, eps)
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &ProtoWeight,
        bias: Option<&ProtoWeight>,
    ) -> Result<CpuTensor> {
        let (n, k) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
        if x.cols != k {
            return Err(Error::Backend(format!(
                "linear: input width {} for weight {:?}",
                x.cols, w.shape
            )));
        }
        let mut out = vec![0f32; x.rows * n];
        if let Some(b) = bias {
            if b.data.len() != n {
                return Err(Error::Backend(format!(
                    "linear: bias {} for {n} outputs",
                    b.data.len()
                )));
            }
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(&b.data);
            }
        }
        if x.rows <= self.max_skinny_rows {
            matmul_nt_skinny(&mut out, &x.data, &w.data, x.rows, n, k, bias.is_some());
        } else {
            matmul_nt(&mut out, &x.data, &w.data, x.rows, n, k, bias.is_some());
        }
        Ok(CpuTensor::new(x.rows, n, out))
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        self.inner.silu_mul(gate_up)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor> {
        self.inner.gather_rows(x, rows)
    }

    fn attention(
        &self,
        qkv: &mut CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        batch: &ForwardBatch,
        shape: &AttentionShape,
    ) -> Result<CpuTensor> {
        self.inner.attention(qkv, cache, layer, batch, shape)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        self.inner.to_host(x)
    }
}
