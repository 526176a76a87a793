//! A sequence: one completion of one request, as the scheduler sees it.

use std::sync::Arc;

use super::block_manager::BlockId;
use crate::media::ProcessedImage;
use crate::model::mrope::MropePositions;

/// One image of a prompt: where its placeholder tokens sit.
#[derive(Debug, Clone)]
pub struct PromptImage {
    /// The preprocessed image.
    pub image: Arc<ProcessedImage>,
    /// Index of its first placeholder token in the prompt.
    pub offset: usize,
    /// Placeholder tokens (one per merged 2x2 block of patches).
    pub num_tokens: usize,
}

/// The images of a multimodal prompt and its M-RoPE positions, shared by a request's choices.
#[derive(Debug, Clone)]
pub struct PromptImages {
    /// In prompt order.
    pub images: Vec<PromptImage>,
    /// The prompt's rotary positions and the decode delta.
    pub mrope: MropePositions,
}

impl PromptImages {
    /// What the prefix cache mixes into the hash of block `b` (of `block_size` tokens) besides
    /// its token ids: the content hashes of the images whose placeholders it holds, so prompts
    /// that differ only in an image never share KV blocks. 0 for a block without images.
    pub fn block_salt(&self, b: usize, block_size: usize) -> u64 {
        let (lo, hi) = (b * block_size, (b + 1) * block_size);
        self.images
            .iter()
            .filter(|im| im.offset < hi && im.offset + im.num_tokens > lo)
            .fold(0u64, |acc, im| {
                let h = im.image.content_hash ^ (im.offset as u64).rotate_left(32);
                (acc.rotate_left(5) ^ h).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
            })
    }
}

/// [`Sequence::block_salt`] from its parts (the scheduler asks it while the sequence is
/// borrowed elsewhere).
pub fn block_salt(
    images: Option<&PromptImages>,
    cache_salt: u64,
    b: usize,
    block_size: usize,
) -> u64 {
    let s = images.map_or(0, |im| im.block_salt(b, block_size));
    if b == 0 && cache_salt != 0 {
        (s.rotate_left(17) ^ cache_salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
    } else {
        s
    }
}

/// Identifies a sequence inside the engine.
pub type SeqId = u64;

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued; holds no blocks.
    Waiting,
    /// Scheduled at least once since its last (re)start; holds blocks.
    Running,
}

/// The scheduler's view of one sequence.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Unique id.
    pub id: SeqId,
    /// Smaller runs first.
    pub priority: i32,
    /// Arrival order, breaking priority ties (first come, first served).
    pub arrival: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt within `tokens`.
    pub prompt_len: usize,
    /// Tokens whose keys/values are in the cache.
    pub num_computed: usize,
    /// KV blocks, in position order.
    pub block_table: Vec<BlockId>,
    /// Hashes of the leading full blocks already registered for reuse.
    pub block_hashes: Vec<u64>,
    /// Waiting or running.
    pub status: SeqStatus,
    /// Times this sequence was preempted.
    pub num_preemptions: u32,
    /// The prompt's images (Glm4v), if any.
    pub images: Option<Arc<PromptImages>>,
    /// Token ranges `[start, end)` of image placeholders whose features are still being
    /// encoded: the sequence computes up to the first one it has not passed, then waits.
    pub encoder_waits: Vec<(usize, usize)>,
    /// Held back while its request's stream is full: it keeps its blocks and its place but runs
    /// nothing.
    pub paused: bool,
    /// Mixed into the hash of the first block ([`cache_salt_hash`] of the request's salt; 0
    /// without one), so sequences of different salts share no cached block.
    pub cache_salt: u64,
}

/// The prefix-cache salt of a request's `cache_salt` string: SipHash keyed once per process,
/// so a salt chosen to collide with another tenant's cannot be prepared; never 0 (no salt).
pub fn cache_salt_hash(salt: &str) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEY.get_or_init(Default::default).hash_one(salt) | 1
}

impl Sequence {
    /// A new waiting sequence.
    pub fn new(id: SeqId, tokens: Vec<u32>, priority: i32, arrival: u64) -> Self {
        Sequence {
            id,
            priority,
            arrival,
            prompt_len: tokens.len(),
            tokens,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            status: SeqStatus::Waiting,
            num_preemptions: 0,
            images: None,
            encoder_waits: Vec::new(),
            paused: false,
            cache_salt: 0,
        }
    }

    /// The prefix-cache salt of block `b`: [`PromptImages::block_salt`] (0 without images),
    /// with the request's [`Sequence::cache_salt`] mixed into block 0's.
    pub fn block_salt(&self, b: usize, block_size: usize) -> u64 {
        block_salt(self.images.as_deref(), self.cache_salt, b, block_size)
    }

    /// Generated tokens.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model before the next sample.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// How far the sequence may compute now: its end, or the start of the first image range
    /// it still needs whose features are not ready (no further than where it stands); where it
    /// stands while paused.
    pub fn compute_limit(&self) -> usize {
        if self.paused {
            return self.num_computed;
        }
        self.encoder_waits
            .iter()
            .filter(|&&(_, end)| end > self.num_computed)
            .map(|&(start, _)| start.max(self.num_computed))
            .min()
            .unwrap_or(self.tokens.len())
    }

    /// The (priority, arrival) order key: smaller is served first.
    pub fn order_key(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }
}
