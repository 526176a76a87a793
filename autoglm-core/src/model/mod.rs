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
}

impl WeightSource for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        Checkpoint::tensor(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
}
