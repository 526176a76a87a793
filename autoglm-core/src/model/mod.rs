//! GLM checkpoints: configuration, weight loading and the model.

mod config;
mod glm;
mod loader;
pub mod mrope;
mod random;
pub mod vision;

pub use config::{Architecture, ModelConfig, VisionConfig};
pub use glm::GlmModel;
pub use loader::{Checkpoint, F32Data, HalfData, HalfKind, HalfTensor, HostTensor};
pub use random::RandomWeights;

use crate::backend::Backend;
use crate::error::Result;

/// Where weights come from: a checkpoint on disk or a generator.
pub trait WeightSource {
    /// The tensor called `name` (Hugging Face naming), which must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor>;
    /// Whether the source holds `name` (used for optional tensors such as a tied `lm_head`).
    fn contains(&self, name: &str) -> bool;
    /// For generated weights: how `name` is filled, so a backend can generate it in place
    /// ([`Backend::generate`](crate::backend::Backend::generate)) instead of receiving host data.
    /// `None` (the default): read it with [`WeightSource::tensor`].
    fn generator(&self, name: &str) -> Option<Fill> {
        let _ = name;
        None
    }
    /// `name` as the source stores it when that is bf16 or f16, for backends that compute with
    /// 16-bit weights as they are ([`Backend::keeps_half_weights`]); `None` (the default) when
    /// the source holds it in another format.
    fn half_tensor(&self, name: &str, shape: &[usize]) -> Result<Option<HalfTensor>> {
        let _ = (name, shape);
        Ok(None)
    }
}

/// How a generated tensor is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// Every element equal.
    Constant(f32),
    /// [`RandomWeights`]' uniform stream: chunks of 4096 elements, chunk `c` seeded with
    /// `splitmix(stream ^ c)`, values in `[-scale, scale]`.
    Uniform {
        /// The tensor's stream (derived from the seed and the tensor's name).
        stream: u64,
        /// Half-width of the distribution.
        scale: f32,
    },
}

/// One part of a generated weight: `rows` leading-dimension rows filled by `fill`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillPart {
    /// Rows (first dimension) of this part.
    pub rows: usize,
    /// How they are filled.
    pub fill: Fill,
}

impl WeightSource for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Checkpoint::tensor(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn half_tensor(&self, name: &str, shape: &[usize]) -> Result<Option<HalfTensor>> {
        Checkpoint::half_tensor(self, name, shape)
    }
}

/// [`load_stacked`] for a matrix that only `linear` and `embedding` read: when the backend keeps
/// 16-bit weights as they are and the source stores every part in one 16-bit format, the parts
/// go to [`Backend::upload_half`] unconverted (views of the mapped checkpoint, no copy).
pub(crate) fn load_matrix<B: Backend>(
    src: &dyn WeightSource,
    backend: &B,
    parts: &[(String, Vec<usize>)],
) -> Result<B::Weight> {
    if backend.keeps_half_weights() && parts.iter().all(|(name, _)| src.generator(name).is_none()) {
        let mut halves = Vec::with_capacity(parts.len());
        for (name, shape) in parts {
            match src.half_tensor(name, shape)? {
                Some(t) if halves.first().is_none_or(|f: &HalfTensor| f.kind == t.kind) => {
                    halves.push(t)
                }
                _ => break,
            }
        }
        if halves.len() == parts.len() {
            return backend.upload_half(halves);
        }
    }
    load_stacked(src, backend, parts)
}

/// One weight from one or more tensors stacked along the first dimension: generated on the
/// backend when the source is a generator the backend can run, else read and uploaded.
pub(crate) fn load_stacked<B: Backend>(
    src: &dyn WeightSource,
    backend: &B,
    parts: &[(String, Vec<usize>)],
) -> Result<B::Weight> {
    let fills: Option<Vec<FillPart>> = parts
        .iter()
        .map(|(name, shape)| {
            src.generator(name).map(|fill| FillPart {
                rows: shape[0],
                fill,
            })
        })
        .collect();
    if let Some(fills) = fills {
        let mut shape = parts[0].1.clone();
        shape[0] = parts.iter().map(|p| p.1[0]).sum();
        if let Some(w) = backend.generate(&shape, &fills) {
            return w;
        }
    }
    let mut tensors = parts
        .iter()
        .map(|(name, shape)| src.tensor(name, shape))
        .collect::<Result<Vec<HostTensor>>>()?;
    let t = if tensors.len() == 1 {
        tensors.pop().expect("one tensor")
    } else {
        HostTensor::concat_rows(&tensors)
    };
    backend.upload(t)
}

/// A weight source seen through renamed prefixes: the first `(from, to)` pair whose `to` form
/// the source holds for `probe` applies to every name starting with `from`.
pub(crate) struct Renamed<'a> {
    inner: &'a dyn WeightSource,
    rename: Option<(&'static str, &'static str)>,
}

impl<'a> Renamed<'a> {
    pub(crate) fn new(
        inner: &'a dyn WeightSource,
        probe: &str,
        pairs: &[(&'static str, &'static str)],
    ) -> Self {
        let rename = pairs.iter().copied().find(|(from, to)| {
            !inner.contains(probe)
                && probe
                    .strip_prefix(from)
                    .is_some_and(|rest| inner.contains(&format!("{to}{rest}")))
        });
        Renamed { inner, rename }
    }

    fn name(&self, name: &str) -> String {
        match self.rename {
            Some((from, to)) => match name.strip_prefix(from) {
                Some(rest) => format!("{to}{rest}"),
                None => name.to_string(),
            },
            None => name.to_string(),
        }
    }
}

impl WeightSource for Renamed<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.inner.tensor(&self.name(name), shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.name(name))
    }
    fn generator(&self, name: &str) -> Option<Fill> {
        self.inner.generator(&self.name(name))
    }
    fn half_tensor(&self, name: &str, shape: &[usize]) -> Result<Option<HalfTensor>> {
        self.inner.half_tensor(&self.name(name), shape)
    }
}

/// The decoder's weights under the names `glm.rs` uses (`model.layers.*`, ...), whether the
/// checkpoint keeps them there or under transformers 5's `model.language_model.*`.
pub(crate) type TextWeights<'a> = Renamed<'a>;

impl<'a> TextWeights<'a> {
    pub(crate) fn text(inner: &'a dyn WeightSource) -> Self {
        Renamed::new(
            inner,
            "model.embed_tokens.weight",
            &[("model.", "model.language_model.")],
        )
    }
}
