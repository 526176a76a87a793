//! The model runner's input: one [`ForwardBatch`] per engine step.
//!
//! A batch mixes prefill chunks and decode tokens of many sequences. It is plain data: token ids,
//! their absolute positions, the KV-cache slot each token's key/value is written to, and per sequence
//! the range of its query tokens, its context length after this step and its block table.

/// Everything a backend needs to run one forward pass over a mixed batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    /// Token ids of all query tokens, sequence after sequence.
    pub token_ids: Vec<u32>,
    /// Absolute position of each token in its sequence.
    pub positions: Vec<u32>,
    /// KV-cache slot (`block * block_size + offset`) that receives each token's key and value.
    pub slot_mapping: Vec<u32>,
    /// Prefix sums of query tokens per sequence: sequence `s` owns tokens `query_start[s]..query_start[s+1]`.
    pub query_start: Vec<u32>,
    /// Tokens in the cache for each sequence once this step's tokens are written.
    pub context_lens: Vec<u32>,
    /// Block tables, `max_blocks_per_seq` entries per sequence (padded with 0).
    pub block_tables: Vec<u32>,
    /// Row stride of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Rows (token indices) whose logits are returned, in order.
    pub logits_indices: Vec<u32>,
}

impl ForwardBatch {
    /// Number of query tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// The block table of sequence `s`.
    pub fn block_table(&self, s: usize) -> &[u32] {
        &self.block_tables[s * self.max_blocks_per_seq..(s + 1) * self.max_blocks_per_seq]
    }

    /// An empty batch whose block tables have `max_blocks_per_seq` entries per sequence.
    pub fn new(max_blocks_per_seq: usize) -> Self {
        ForwardBatch {
            query_start: vec![0],
            max_blocks_per_seq,
            ..Default::default()
        }
    }

    /// Appends a sequence's chunk: `tokens` at positions `start..start+len`, with its block table
    /// (at most `max_blocks_per_seq` entries, covering every position up to the chunk's end).
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        start: usize,
        block_table: &[u32],
        block_size: usize,
    ) {
        debug_assert!(block_table.len() <= self.max_blocks_per_seq);
        debug_assert!((start + tokens.len()).div_ceil(block_size) <= block_table.len());
        for (i, &t) in tokens.iter().enumerate() {
            let pos = start + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
            self.slot_mapping.push(
                block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32,
            );
        }
        self.query_start.push(self.token_ids.len() as u32);
        self.context_lens.push((start + tokens.len()) as u32);
        self.block_tables.extend_from_slice(block_table);
        self.block_tables
            .resize(self.context_lens.len() * self.max_blocks_per_seq, 0);
    }
}
