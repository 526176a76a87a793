//! `config.json` of a GLM checkpoint, parsed and validated.
//!
//! Rope settings are accepted where published checkpoints put them (`rope_theta`,
//! `partial_rotary_factor` at top level) and where newer writers put them (`rope_parameters`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The GLM variants this engine runs. They differ by config flags, not by code paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `GlmForCausalLM` (glm-4-9b-chat-hf family).
    Glm,
    /// `Glm4ForCausalLM` (GLM-4-0414 family): adds post-attention and post-MLP RMSNorms.
    Glm4,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "GlmForCausalLM" => Ok(Architecture::Glm),
            "Glm4ForCausalLM" => Ok(Architecture::Glm4),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The Hugging Face class name.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Glm => "GlmForCausalLM",
            Architecture::Glm4 => "Glm4ForCausalLM",
        }
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which GLM variant.
    pub architecture: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width (each of gate and up).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA; 1 is MQA).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether q/k/v projections carry a bias.
    pub attention_bias: bool,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Rotary base.
    pub rope_theta: f32,
    /// Leading dims of each head that are rotated (interleaved pairs); the rest pass through.
    pub rotary_dim: usize,
    /// End-of-sequence ids from `config.json` (GLM has three).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Whether the layers carry `post_self_attn_layernorm` / `post_mlp_layernorm` (GLM4).
    pub fn has_post_norms(&self) -> bool {
        self.architecture == Architecture::Glm4
    }

    /// Width of the fused q|k|v projection output.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Number of parameters (weights only, as stored).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let qkv = self.qkv_width();
        let bias = if self.attention_bias { qkv } else { 0 };
        let norms = if self.has_post_norms() { 4 * h } else { 2 * h };
        let layer = qkv * h + bias + q * h + 2 * i * h + i * h + norms;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Json { source, .. } => Error::Json {
                path: path.to_owned(),
                source,
            },
            Error::InvalidConfig { field, msg } => Error::InvalidConfig {
                field: format!("{}: {field}", path.display()),
                msg,
            },
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| Error::Json {
            path: "config.json".into(),
            source,
        })?;
        raw.into_config()
    }
}

#[derive(Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<serde_json::Value>,
    eos_token_id: Option<OneOrMany>,
}

impl RawConfig {
    fn into_config(self) -> Result<ModelConfig> {
        let arch_name = match self.architectures.as_deref() {
            Some([one, ..]) => one.clone(),
            _ => return Err(Error::config("architectures", "missing or empty")),
        };
        let architecture = Architecture::from_name(&arch_name)?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(Error::config(
                    "hidden_act",
                    format!("{act:?} is not supported (only \"silu\")"),
                ));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(Error::config(
                    "rope_scaling",
                    format!("{scaling} is not supported"),
                ));
            }
        }
        let rope = self.rope_parameters.as_ref();
        if let Some(kind) = rope.and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                return Err(Error::config(
                    "rope_parameters.rope_type",
                    format!("{kind:?} is not supported"),
                ));
            }
        }
        let rope_theta = rope
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let factor = rope
            .and_then(|r| r.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(0.5);
        let num_heads = self.num_attention_heads;
        let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 {
            return Err(Error::config("num_attention_heads", "must be positive"));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / num_heads);
        let rotary_dim = (head_dim as f64 * factor) as usize;
        let eos_token_ids = self
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        let cfg = ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5) as f32,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(8192),
            attention_bias: self.attention_bias.unwrap_or(true),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            rope_theta: rope_theta as f32,
            rotary_dim,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ModelConfig {
    /// Checks that the shapes are consistent.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if self.rotary_dim % 2 != 0 || self.rotary_dim > self.head_dim || self.rotary_dim == 0 {
            return Err(Error::config(
                "partial_rotary_factor",
                format!(
                    "gives rotary dim {} for head_dim {} (must be even, 2..=head_dim)",
                    self.rotary_dim, self.head_dim
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(Error::config(
                "rms_norm_eps",
                format!("{} is not a non-negative number", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config(
                "rope_theta",
                format!("{} is not a positive number", self.rope_theta),
            ));
        }
        if let Some(bad) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(Error::config(
                "eos_token_id",
                format!("{bad} is outside the vocabulary ({})", self.vocab_size),
            ));
        }
        Ok(())
    }
}
