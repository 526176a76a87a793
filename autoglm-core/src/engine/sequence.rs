//! A sequence: one completion of one request, as the scheduler sees it.

use super::block_manager::BlockId;

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
        }
    }

    /// Generated tokens.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model before the next sample.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// The (priority, arrival) order key: smaller is served first.
    pub fn order_key(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }
}
