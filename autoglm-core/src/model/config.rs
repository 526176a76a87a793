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
    /// `Glm4vForConditionalGeneration` (GLM-4.1V, AutoGLM-Phone-9B): the GLM4 decoder with M-RoPE
    /// behind a vision tower.
    Glm4v,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "GlmForCausalLM" => Ok(Architecture::Glm),
            "Glm4ForCausalLM" => Ok(Architecture::Glm4),
            "Glm4vForConditionalGeneration" => Ok(Architecture::Glm4v),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The Hugging Face class name.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Glm => "GlmForCausalLM",
            Architecture::Glm4 => "Glm4ForCausalLM",
            Architecture::Glm4v => "Glm4vForConditionalGeneration",
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
    /// M-RoPE (Glm4v): how many of the `rotary_dim / 2` frequencies take their angle from the
    /// temporal, height and width position streams, in that order. `None`: 1-D rope.
    pub mrope_section: Option<[usize; 3]>,
    /// The vision tower and image token ids (Glm4v).
    pub vision: Option<VisionConfig>,
}

/// `vision_config` of a Glm4v checkpoint, with the image token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Width of the tower.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Width of the merger's SwiGLU (the blocks' MLP is `out_hidden_size` wide).
    pub intermediate_size: usize,
    /// Width of the merged image tokens: the text model's hidden size.
    pub out_hidden_size: usize,
    /// Side of the square the learned position table was trained on (`image_size / patch_size`
    /// positions a side).
    pub image_size: usize,
    /// Pixels per patch side.
    pub patch_size: usize,
    /// Colour channels.
    pub in_channels: usize,
    /// Patches per merged token side (2: 2x2 patches make one token).
    pub spatial_merge_size: usize,
    /// Frames per patch (an image is duplicated into 2).
    pub temporal_patch_size: usize,
    /// RMSNorm epsilon of the tower.
    pub rms_norm_eps: f32,
    /// Base of the tower's 2-D rotary embedding.
    pub rope_theta: f32,
    /// `<|image|>`: the placeholder each image token replaces.
    pub image_token_id: u32,
    /// `<|begin_of_image|>`.
    pub image_start_token_id: u32,
    /// `<|end_of_image|>`.
    pub image_end_token_id: u32,
}

impl VisionConfig {
    /// Floating-point operations of one image of `patches` patches (multiply-adds count 2):
    /// GEMMs and attention scores/mixing; element-wise work is left out.
    pub fn flops(&self, patches: usize) -> f64 {
        let c = self;
        let (n, h, o, i) = (
            patches as f64,
            c.hidden_size as f64,
            c.out_hidden_size as f64,
            c.intermediate_size as f64,
        );
        let m = (c.spatial_merge_size * c.spatial_merge_size) as f64;
        let patch = n * c.patch_dim() as f64 * h;
        let block = n * (3.0 * h * h + h * h + 3.0 * h * o) + 2.0 * n * n * h;
        let tokens = n / m;
        let merger = tokens * (m * h * o + o * o + 3.0 * o * i);
        2.0 * (patch + c.depth as f64 * block + merger)
    }
    /// Per-head width of the tower.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per patch: channels x frames x patch x patch (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Positions per side of the learned position table (24).
    pub fn num_positions_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of parameters of the tower.
    pub fn num_parameters(&self) -> usize {
        let (h, m, o, i) = (
            self.hidden_size,
            self.spatial_merge_size * self.spatial_merge_size,
            self.out_hidden_size,
            self.intermediate_size,
        );
        let side = self.num_positions_side();
        let block = 2 * h + 3 * h * h + h * h + 3 * o * h;
        self.patch_dim() * h
            + h
            + h
            + side * side * h
            + self.depth * block
            + h
            + (m * h * o + o)
            + (o * o + 2 * o + 3 * i * o)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vision_config.depth", self.depth),
            ("vision_config.hidden_size", self.hidden_size),
            ("vision_config.num_heads", self.num_heads),
            ("vision_config.intermediate_size", self.intermediate_size),
            ("vision_config.out_hidden_size", self.out_hidden_size),
            ("vision_config.patch_size", self.patch_size),
            ("vision_config.in_channels", self.in_channels),
            ("vision_config.spatial_merge_size", self.spatial_merge_size),
            (
                "vision_config.temporal_patch_size",
                self.temporal_patch_size,
            ),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if self.hidden_size % self.num_heads != 0 || self.head_dim() % 4 != 0 {
            return Err(Error::config(
                "vision_config.num_heads",
                format!(
                    "{} heads over width {} do not give a head width divisible by 4 (2-D rotary)",
                    self.num_heads, self.hidden_size
                ),
            ));
        }
        if self.num_positions_side() == 0 {
            return Err(Error::config(
                "vision_config.image_size",
                format!("{} is smaller than one patch", self.image_size),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(Error::config(
                "vision_config.rms_norm_eps",
                format!("{} is not a non-negative number", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config(
                "vision_config.rope_parameters.rope_theta",
                format!("{} is not a positive number", self.rope_theta),
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Whether the layers carry `post_self_attn_layernorm` / `post_mlp_layernorm` (GLM4).
    pub fn has_post_norms(&self) -> bool {
        matches!(self.architecture, Architecture::Glm4 | Architecture::Glm4v)
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
        let vision = self.vision.as_ref().map_or(0, VisionConfig::num_parameters);
        v * h + self.num_layers * layer + h + head + vision
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
        let json = |source| Error::Json {
            path: "config.json".into(),
            source,
        };
        let mut top: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(json)?;
        // Glm4v nests the decoder's keys under `text_config`; keys it lacks (architectures,
        // token ids, tie_word_embeddings) come from the top level.
        let vision = top.remove("vision_config");
        let merged = match top.remove("text_config") {
            Some(serde_json::Value::Object(mut text)) => {
                for (k, v) in top.iter() {
                    text.entry(k.clone()).or_insert_with(|| v.clone());
                }
                text
            }
            Some(other) if !other.is_null() => {
                return Err(Error::config("text_config", "must be an object"))
            }
            _ => top.clone(),
        };
        let raw: RawConfig =
            serde_json::from_value(serde_json::Value::Object(merged)).map_err(json)?;
        let vision = match vision {
            Some(v) if !v.is_null() => Some(serde_json::from_value::<RawVision>(v).map_err(json)?),
            _ => None,
        };
        raw.into_config(vision, &top)
    }
}

#[derive(Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    mrope_section: Option<Vec<usize>>,
}

impl RawRope {
    fn rope_type(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.kind.as_deref())
    }
}

#[derive(Deserialize)]
struct RawVision {
    depth: usize,
    hidden_size: usize,
    num_heads: usize,
    intermediate_size: usize,
    out_hidden_size: usize,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    in_channels: Option<usize>,
    spatial_merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    rope_parameters: Option<RawRope>,
    rope_theta: Option<f64>,
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
    image_token_id: Option<u32>,
    image_start_token_id: Option<u32>,
    image_end_token_id: Option<u32>,
}

impl RawConfig {
    fn into_config(
        self,
        vision: Option<RawVision>,
        top: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<ModelConfig> {
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
        // Older Glm4v files carry `mrope_section` in a `rope_scaling` of type "default"; any
        // real scaling is refused.
        let scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let refused = || Error::config("rope_scaling", format!("{v} is not supported"));
                let r: RawRope = serde_json::from_value(v.clone()).map_err(|_| refused())?;
                if !matches!(r.rope_type(), None | Some("default" | "mrope")) {
                    return Err(refused());
                }
                Some(r)
            }
        };
        let rope = self.rope_parameters.as_ref();
        if let Some(kind) = rope.and_then(RawRope::rope_type) {
            if kind != "default" && kind != "mrope" {
                return Err(Error::config(
                    "rope_parameters.rope_type",
                    format!("{kind:?} is not supported"),
                ));
            }
        }
        let mrope = rope
            .and_then(|r| r.mrope_section.clone())
            .or_else(|| scaling.as_ref().and_then(|r| r.mrope_section.clone()));
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
        let mrope_section = match mrope {
            None => None,
            Some(v) => match v[..] {
                [t, h, w] => Some([t, h, w]),
                _ => {
                    return Err(Error::config(
                        "rope_parameters.mrope_section",
                        format!("{v:?} must list three sizes (t, h, w)"),
                    ))
                }
            },
        };
        let vision = match (architecture, vision) {
            (Architecture::Glm4v, None) => {
                return Err(Error::config(
                    "vision_config",
                    "missing (Glm4vForConditionalGeneration needs one)",
                ))
            }
            (Architecture::Glm4v, Some(v)) => {
                let token = |name: &str, own: Option<u32>| -> Result<u32> {
                    own.or_else(|| top.get(name).and_then(|v| v.as_u64()).map(|v| v as u32))
                        .ok_or_else(|| Error::config(name, "missing"))
                };
                Some(v.into_config(
                    token("image_token_id", self.image_token_id)?,
                    token("image_start_token_id", self.image_start_token_id)?,
                    token("image_end_token_id", self.image_end_token_id)?,
                )?)
            }
            (_, _) => None,
        };
        if architecture == Architecture::Glm4v && mrope_section.is_none() {
            return Err(Error::config(
                "rope_parameters.mrope_section",
                "missing (Glm4v's decoder uses M-RoPE)",
            ));
        }
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
            mrope_section,
            vision,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl RawVision {
    fn into_config(self, image: u32, start: u32, end: u32) -> Result<VisionConfig> {
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                return Err(Error::config(
                    "vision_config.hidden_act",
                    format!("{act:?} is not supported (only \"silu\")"),
                ));
            }
        }
        if self.attention_bias == Some(true) {
            return Err(Error::config(
                "vision_config.attention_bias",
                "true is not supported (Glm4v's tower has no qkv bias)",
            ));
        }
        let theta = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let v = VisionConfig {
            depth: self.depth,
            hidden_size: self.hidden_size,
            num_heads: self.num_heads,
            intermediate_size: self.intermediate_size,
            out_hidden_size: self.out_hidden_size,
            image_size: self.image_size.unwrap_or(336),
            patch_size: self.patch_size.unwrap_or(14),
            in_channels: self.in_channels.unwrap_or(3),
            spatial_merge_size: self.spatial_merge_size.unwrap_or(2),
            temporal_patch_size: self.temporal_patch_size.unwrap_or(2),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5) as f32,
            rope_theta: theta as f32,
            image_token_id: image,
            image_start_token_id: start,
            image_end_token_id: end,
        };
        v.validate()?;
        Ok(v)
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
        if let Some(sec) = self.mrope_section {
            if sec.iter().sum::<usize>() != self.rotary_dim / 2 {
                return Err(Error::config(
                    "rope_parameters.mrope_section",
                    format!(
                        "{sec:?} sums to {}, but the rotary dim {} has {} frequencies",
                        sec.iter().sum::<usize>(),
                        self.rotary_dim,
                        self.rotary_dim / 2
                    ),
                ));
            }
        }
        if let Some(v) = &self.vision {
            v.validate()?;
            if v.out_hidden_size != self.hidden_size {
                return Err(Error::config(
                    "vision_config.out_hidden_size",
                    format!(
                        "{} differs from the text model's hidden_size {}",
                        v.out_hidden_size, self.hidden_size
                    ),
                ));
            }
            for (field, id) in [
                ("image_token_id", v.image_token_id),
                ("image_start_token_id", v.image_start_token_id),
                ("image_end_token_id", v.image_end_token_id),
            ] {
                if id as usize >= self.vocab_size {
                    return Err(Error::config(
                        field,
                        format!("{id} is outside the vocabulary ({})", self.vocab_size),
                    ));
                }
            }
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
