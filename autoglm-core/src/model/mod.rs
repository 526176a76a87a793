//! GLM checkpoints: configuration, weight loading and the model.

mod config;
mod glm;
mod loader;
mod random;

pub use config::{Architecture, ModelConfig};
pub use glm::GlmModel;
pub use loader::{Checkpoint, F32Data, HostTensor};
pub use random::RandomWeights;

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
}
