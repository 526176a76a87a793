//! A backend whose operations cost nothing, for measuring everything around the model.
//!
//! Tensors carry only their shape; weights only their row count; the KV cache is nothing. The model
//! still runs its full sequence of calls, so the engine's scheduling, sampling, detokenizing and
//! streaming run exactly as with a real backend, at the engine's own maximum rate. `to_host`
//! returns, for every row, logits that are zero except [`NULL_LOGIT`] at [`NULL_TOKEN`]: greedy
//! decoding picks that token every step, and so does sampling at any ordinary temperature (every
//! other token is `e^-100` less likely).
//!
//! ```
//! use autoglm_core::backend::null::{NullBackend, NullWeights};
//! use autoglm_core::model::{GlmModel, ModelConfig};
//! # fn run() -> autoglm_core::Result<()> {
//! let config = ModelConfig::from_file("tests/fixtures/glm4-tiny/config.json".as_ref())?;
//! let model = GlmModel::from_source(config, &NullWeights, &NullBackend)?;
//! let engine = autoglm_core::Engine::new(NullBackend, model, None, Default::default())?;
//! # Ok(()) }
//! ```
//!
//! Weights can come from any [`WeightSource`]; [`NullWeights`] hands out shapes without data, so a
//! 9B configuration "loads" instantly.

use crate::backend::{AttentionShape, Backend, KvCacheShape};
use crate::error::Result;
use crate::model::{F32Data, HostTensor, WeightSource};
use crate::runner::ForwardBatch;

/// The token every row's logits point at.
pub const NULL_TOKEN: u32 = 0;

/// The logit of [`NULL_TOKEN`]; every other logit is 0.
pub const NULL_LOGIT: f32 = 100.0;

/// A backend that does no arithmetic. See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullBackend;

/// An activation of the null backend: its shape only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullTensor {
    /// Rows (tokens).
    pub rows: usize,
    /// Columns (features); logits have `vocab_size` columns.
    pub cols: usize,
}

/// A parameter of the null backend: its leading dimension only (the output width of a linear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullWeight {
    /// `shape[0]` of the uploaded tensor.
    pub rows: usize,
}

/// A [`WeightSource`] that returns every tensor as `[rows, 0]`: its leading dimension and no data
/// (the only thing [`NullBackend`] keeps of a weight).
#[derive(Debug, Clone, Copy, Default)]
pub struct NullWeights;

impl WeightSource for NullWeights {
    fn tensor(&self, _name: &str, shape: &[usize]) -> Result<HostTensor> {
        Ok(HostTensor {
            shape: vec![shape.first().copied().unwrap_or(1), 0],
            data: F32Data::Owned(Vec::new()),
        })
    }

    fn contains(&self, name: &str) -> bool {
        // Untied: the model asks for its own lm_head, like most checkpoints.
        name == "lm_head.weight"
    }
}

impl Backend for NullBackend {
    type Weight = NullWeight;
    type Tensor = NullTensor;
    type KvCache = ();

    fn name(&self) -> String {
        "null".into()
    }

    fn upload(&self, t: HostTensor) -> Result<NullWeight> {
        Ok(NullWeight {
            rows: t.shape.first().copied().unwrap_or(1),
        })
    }

    fn alloc_kv_cache(&self, _shape: KvCacheShape) -> Result<()> {
        Ok(())
    }

    fn embedding(&self, table: &NullWeight, ids: &[u32]) -> Result<NullTensor> {
        let _ = table;
        Ok(NullTensor {
            rows: ids.len(),
            cols: 0,
        })
    }

    fn rms_norm(&self, x: &NullTensor, _w: &NullWeight, _eps: f32) -> Result<NullTensor> {
        Ok(*x)
    }

    fn add_rms_norm(
        &self,
        _residual: &mut NullTensor,
        x: &NullTensor,
        _w: &NullWeight,
        _eps: f32,
    ) -> Result<NullTensor> {
        Ok(*x)
    }

    fn linear(
        &self,
        x: &NullTensor,
        w: &NullWeight,
        _bias: Option<&NullWeight>,
    ) -> Result<NullTensor> {
        Ok(NullTensor {
            rows: x.rows,
            cols: w.rows,
        })
    }

    fn silu_mul(&self, gate_up: &NullTensor) -> Result<NullTensor> {
        Ok(NullTensor {
            rows: gate_up.rows,
            cols: gate_up.cols / 2,
        })
    }

    fn gather_rows(&self, x: &NullTensor, rows: &[u32]) -> Result<NullTensor> {
        Ok(NullTensor {
            rows: rows.len(),
            cols: x.cols,
        })
    }

    fn attention(
        &self,
        qkv: &mut NullTensor,
        _cache: &mut (),
        _layer: usize,
        _batch: &ForwardBatch,
        shape: &AttentionShape,
    ) -> Result<NullTensor> {
        Ok(NullTensor {
            rows: qkv.rows,
            cols: shape.num_heads * shape.head_dim,
        })
    }

    fn to_host(&self, x: &NullTensor) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.rows * x.cols];
        let hot = NULL_TOKEN as usize;
        if hot < x.cols {
            for row in out.chunks_exact_mut(x.cols) {
                row[hot] = NULL_LOGIT;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GlmModel, ModelConfig};
    use crate::{Engine, SamplingParams};

    fn tiny_config() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/glm4-tiny/config.json");
        ModelConfig::from_file(&dir).unwrap()
    }

    #[test]
    fn streams_the_null_token() {
        let model = GlmModel::from_source(tiny_config(), &NullWeights, &NullBackend).unwrap();
        let engine = Engine::new(NullBackend, model, None, Default::default()).unwrap();
        for temperature in [0.0, 1.0] {
            let params = SamplingParams {
                max_tokens: 40,
                ignore_eos: true,
                temperature,
                ..SamplingParams::default()
            };
            let out = engine.generate(vec![1, 2, 3], params).unwrap();
            assert_eq!(out.choices[0].token_ids, vec![NULL_TOKEN; 40]);
            assert_eq!(out.usage.completion_tokens, 40);
        }
    }
}
