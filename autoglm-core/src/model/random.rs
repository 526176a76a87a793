//! Random weights of a real config's shape, for benchmarks and tests that need a model of a given
//! size without a checkpoint. Deterministic for a seed; norms are ones so activations stay sane.

use rayon::prelude::*;

use super::{Fill, HostTensor, WeightSource};
use crate::error::Result;

/// A [`WeightSource`] generating uniform weights in `[-scale, scale]` from a seed.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    /// Base seed; each tensor's stream is derived from it and the tensor's name.
    pub seed: u64,
    /// Half-width of the uniform distribution for matrices and biases.
    pub scale: f32,
}

impl Default for RandomWeights {
    fn default() -> Self {
        RandomWeights {
            seed: 0,
            scale: 0.05,
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let len = shape.iter().product::<usize>();
        let (stream, scale) = match self.fill(name) {
            Fill::Constant(v) => return Ok(HostTensor::owned(shape.to_vec(), vec![v; len])),
            Fill::Uniform { stream, scale } => (stream, scale),
        };
        let mut data = vec![0f32; len];
        data.par_chunks_mut(4096)
            .enumerate()
            .for_each(|(chunk, out)| {
                let mut state = splitmix(stream ^ chunk as u64);
                for x in out {
                    state = splitmix(state);
                    *x = ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
                }
            });
        Ok(HostTensor::owned(shape.to_vec(), data))
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight" || self.scale >= 0.0
    }

    fn generator(&self, name: &str) -> Option<Fill> {
        Some(self.fill(name))
    }
}

impl RandomWeights {
    /// How the tensor `name` is filled: norms are ones, everything else uniform from a stream
    /// derived from the seed and the name.
    fn fill(&self, name: &str) -> Fill {
        if name.ends_with("norm.weight") {
            return Fill::Constant(1.0);
        }
        Fill::Uniform {
            stream: name.bytes().fold(self.seed, |h, b| splitmix(h ^ b as u64)),
            scale: self.scale,
        }
    }
}
