//! The GLM family (`GlmForCausalLM`, `Glm4ForCausalLM`) written once against [`Backend`].
//!
//! Differences between the variants are config flags: GLM4 adds `post_self_attn_layernorm` and
//! `post_mlp_layernorm`; q/k/v biases follow `attention_bias`; `lm_head` may be tied. q, k and v
//! are fused into one projection at load so each layer runs one GEMM for them.

use std::path::Path;
use std::sync::Arc;

use super::vision::{ImageRows, VisionModel};
use super::{load_matrix, load_stacked, Checkpoint, ModelConfig, TextWeights, WeightSource};
use crate::backend::{AttentionShape, Backend, KvCacheShape};
use crate::error::Result;
use crate::runner::ForwardBatch;

struct GlmLayer<B: Backend> {
    input_norm: B::Weight,
    qkv: B::Weight,
    qkv_bias: Option<B::Weight>,
    o_proj: B::Weight,
    post_self_attn_norm: Option<B::Weight>,
    post_attention_norm: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
    post_mlp_norm: Option<B::Weight>,
}

/// A loaded GLM model on backend `B`; for Glm4v, with its vision tower.
pub struct GlmModel<B: Backend> {
    config: ModelConfig,
    vision: Option<Arc<VisionModel<B>>>,
    embed: B::Weight,
    layers: Vec<GlmLayer<B>>,
    norm: B::Weight,
    /// `None` when tied to the embedding.
    lm_head: Option<B::Weight>,
    attn: AttentionShape,
}

impl<B: Backend> GlmModel<B> {
    /// Loads `config.json` and the safetensors weights of a checkpoint directory.
    /// Logs (target `autoglm::model`, info) when it starts, as the weights come in (every
    /// tenth of their bytes) and when it is done.
    pub fn load(dir: &Path, backend: &B) -> Result<Self> {
        let started = std::time::Instant::now();
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        tracing::info!(
            target: "autoglm::model",
            dir = %dir.display(),
            architecture = ?config.architecture,
            layers = config.num_layers,
            weight_bytes = ckpt.total_bytes(),
            files = ckpt.num_files(),
            backend = %backend.name(),
            "loading model"
        );
        let model = Self::from_source(config, &ckpt, backend)?;
        tracing::info!(
            target: "autoglm::model",
            weight_bytes = ckpt.total_bytes(),
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(model)
    }

    /// Builds the model from any weight source (a checkpoint, random weights). Glm4v
    /// checkpoints may name the decoder's weights `model.language_model.*` (transformers 5,
    /// published GLM-4.1V files) or `model.*`, and the tower's `model.visual.*` or `visual.*`.
    pub fn from_source(config: ModelConfig, src: &dyn WeightSource, backend: &B) -> Result<Self> {
        config.validate()?;
        let vision = match &config.vision {
            Some(v) => Some(Arc::new(VisionModel::from_source(v, src, backend)?)),
            None => None,
        };
        let text = TextWeights::text(src);
        let src: &dyn WeightSource = &text;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
        let load = |parts: &[(String, Vec<usize>)]| load_stacked(src, backend, parts);
        let one = |name: String, shape: &[usize]| load(&[(name, shape.to_vec())]);
        // Matrices only `linear` / `embedding` read: kept in the checkpoint's 16-bit format on
        // backends that compute with it.
        let matrix = |parts: &[(String, Vec<usize>)]| load_matrix(src, backend, parts);
        let one_matrix = |name: String, shape: &[usize]| matrix(&[(name, shape.to_vec())]);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let n = |name: &str| format!("{p}.{name}");
            let qkv = matrix(&[
                (n("self_attn.q_proj.weight"), vec![q, h]),
                (n("self_attn.k_proj.weight"), vec![kv, h]),
                (n("self_attn.v_proj.weight"), vec![kv, h]),
            ])?;
            let qkv_bias = if c.attention_bias {
                Some(load(&[
                    (n("self_attn.q_proj.bias"), vec![q]),
                    (n("self_attn.k_proj.bias"), vec![kv]),
                    (n("self_attn.v_proj.bias"), vec![kv]),
                ])?)
            } else {
                None
            };
            let post = |name: &str| -> Result<Option<B::Weight>> {
                if c.has_post_norms() {
                    Ok(Some(one(n(name), &[h])?))
                } else {
                    Ok(None)
                }
            };
            layers.push(GlmLayer {
                input_norm: one(n("input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o_proj: one_matrix(n("self_attn.o_proj.weight"), &[h, q])?,
                post_self_attn_norm: post("post_self_attn_layernorm.weight")?,
                post_attention_norm: one(n("post_attention_layernorm.weight"), &[h])?,
                gate_up: one_matrix(n("mlp.gate_up_proj.weight"), &[2 * c.intermediate_size, h])?,
                down: one_matrix(n("mlp.down_proj.weight"), &[h, c.intermediate_size])?,
                post_mlp_norm: post("post_mlp_layernorm.weight")?,
            });
        }
        let embed = one_matrix("model.embed_tokens.weight".into(), &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !src.contains("lm_head.weight") {
            None
        } else {
            Some(one_matrix("lm_head.weight".into(), &[c.vocab_size, h])?)
        };
        let norm = one("model.norm.weight".into(), &[h])?;
        let attn = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            rotary_dim: c.rotary_dim,
            rope_theta: c.rope_theta,
            scale: (hd as f32).powf(-0.5),
            mrope_section: c.mrope_section,
        };
        Ok(GlmModel {
            config,
            vision,
            embed,
            layers,
            norm,
            lm_head,
            attn,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The vision tower (Glm4v), if the model has one.
    pub fn vision(&self) -> Option<&VisionModel<B>> {
        self.vision.as_deref()
    }

    /// The vision tower, shared (for a thread that encodes images beside the steps).
    pub fn vision_shared(&self) -> Option<Arc<VisionModel<B>>> {
        self.vision.clone()
    }

    /// The KV-cache shape for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_layers: self.config.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs the batch, writing its keys/values into `cache`, and returns the logits of the rows in
    /// `batch.logits_indices` as a row-major `[logits_indices.len(), vocab_size]` host matrix.
    pub fn forward(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
    ) -> Result<Vec<f32>> {
        let logits = self.forward_logits(backend, batch, cache)?;
        backend.to_host(&logits)
    }

    /// [`GlmModel::forward`] leaving the `[logits_indices.len(), vocab_size]` logits on the
    /// backend (for device-side sampling).
    pub fn forward_logits(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
    ) -> Result<B::Tensor> {
        self.forward_logits_with_images(backend, batch, cache, &[])
    }

    /// [`GlmModel::forward_logits`] with image features in place of the embeddings of the
    /// batch rows `images` name (the `<|image|>` placeholders).
    pub fn forward_logits_with_images(
        &self,
        backend: &B,
        batch: &ForwardBatch,
        cache: &mut B::KvCache,
        images: &[ImageRows<'_, B::Tensor>],
    ) -> Result<B::Tensor> {
        let eps = self.config.rms_norm_eps;
        backend.prepare_batch(batch)?;
        let mut residual = backend.embedding(&self.embed, &batch.token_ids)?;
        for img in images {
            backend.copy_rows(&mut residual, img.dst_row, img.embeds, img.src_row, img.len)?;
        }
        let mut h = backend.rms_norm(&residual, &self.layers[0].input_norm, eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut qkv = backend.linear(&h, &layer.qkv, layer.qkv_bias.as_ref())?;
            let ctx = backend.attention(&mut qkv, cache, i, batch, &self.attn)?;
            let mut a = backend.linear(&ctx, &layer.o_proj, None)?;
            if let Some(w) = &layer.post_self_attn_norm {
                a = backend.rms_norm(&a, w, eps)?;
            }
            h = backend.add_rms_norm(&mut residual, &a, &layer.post_attention_norm, eps)?;
            let gate_up = backend.linear(&h, &layer.gate_up, None)?;
            let act = backend.silu_mul(&gate_up)?;
            let mut m = backend.linear(&act, &layer.down, None)?;
            if let Some(w) = &layer.post_mlp_norm {
                m = backend.rms_norm(&m, w, eps)?;
            }
            let next_norm = self.layers.get(i + 1).map_or(&self.norm, |l| &l.input_norm);
            h = backend.add_rms_norm(&mut residual, &m, next_norm, eps)?;
        }
        let h = backend.gather_rows(&h, &batch.logits_indices)?;
        backend.linear(&h, self.lm_head.as_ref().unwrap_or(&self.embed), None)
    }
}
