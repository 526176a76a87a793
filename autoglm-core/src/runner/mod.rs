//! The model runner's input: one [`ForwardBatch`] per engine step.
//!
//! A batch mixes prefill chunks and decode tokens of many sequences. It is plain data: token ids,
//! their absolute positions, the KV-cache slot each token's key/value is written to, and per sequence
//! the range of its query tokens, its context length after this step and its block table.
//!
//! The engine builds each step's batch in pinned buffers from its [`PinnedPool`], sized for the
//! step ([`ForwardBatch::in_pool`]), so a device copies them by DMA and a steady decode loop reuses
//! the same buffers every step without a heap allocation. [`ForwardBatch::new`] builds on the heap
//! instead, for tests and tools.

use crate::error::Result;
use crate::memory::{HostVec, PinnedPool};

/// How much a batch holds: what [`ForwardBatch::in_pool`] reserves room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchShape {
    /// Query tokens.
    pub num_tokens: usize,
    /// Sequences.
    pub num_seqs: usize,
    /// Block-table entries per sequence (the row stride of the block tables).
    pub max_blocks_per_seq: usize,
    /// Rows whose logits are returned.
    pub num_logits: usize,
    /// Whether the tokens carry M-RoPE positions (three each).
    pub mrope: bool,
}

/// Everything a backend needs to run one forward pass over a mixed batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    /// Token ids of all query tokens, sequence after sequence.
    pub token_ids: HostVec<u32>,
    /// Absolute position of each token in its sequence.
    pub positions: HostVec<u32>,
    /// KV-cache slot (`block * block_size + offset`) that receives each token's key and value.
    pub slot_mapping: HostVec<u32>,
    /// Prefix sums of query tokens per sequence: sequence `s` owns tokens `query_start[s]..query_start[s+1]`.
    pub query_start: HostVec<u32>,
    /// Tokens in the cache for each sequence once this step's tokens are written.
    pub context_lens: HostVec<u32>,
    /// Block tables, `max_blocks_per_seq` entries per sequence (padded with 0).
    pub block_tables: HostVec<u32>,
    /// Row stride of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Rows (token indices) whose logits are returned, in order.
    pub logits_indices: HostVec<u32>,
    /// M-RoPE (Glm4v): the rotary position of each token in the temporal, height and width
    /// streams, three entries a token (`[t, h, w]`). Empty for 1-D rope, where `positions`
    /// drive the rotation; when set, `positions` still index the cache and the causal mask.
    pub mrope_positions: HostVec<u32>,
}

/// The vision tower's input metadata for one encoder call: the images' patches stacked in
/// `pixel_values` order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VisionBatch {
    /// Prefix sums of patches per image: image `i` owns rows `cu_seqlens[i]..cu_seqlens[i+1]`
    /// (attention stays within an image).
    pub cu_seqlens: Vec<u32>,
    /// Patch grid `[gh, gw]` of each image.
    pub grids: Vec<[u32; 2]>,
    /// `[h, w]` coordinates of each row's patch in its image's grid (2x2 merge-block order).
    pub patch_hw: Vec<[u32; 2]>,
}

impl VisionBatch {
    /// Number of patch rows.
    pub fn num_patches(&self) -> usize {
        self.patch_hw.len()
    }

    /// Appends one image of `grid` patches whose rows have coordinates `patch_hw`.
    pub fn push_image(&mut self, grid: [u32; 2], patch_hw: &[[u32; 2]]) {
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        self.grids.push(grid);
        self.patch_hw.extend_from_slice(patch_hw);
        self.cu_seqlens.push(self.patch_hw.len() as u32);
    }

    /// Checks that the batch describes `rows` rows: prefix sums over exactly them, one
    /// coordinate per row, each inside its image's grid. Backends call it before indexing; the
    /// error names `op`.
    pub fn check(&self, op: &str, rows: usize) -> crate::error::Result<()> {
        let bad = |msg: String| crate::error::Error::Backend(format!("{op}: {msg}"));
        let cu = &self.cu_seqlens;
        if cu.len() != self.grids.len() + 1
            || cu.first() != Some(&0)
            || cu.last().map(|&n| n as usize) != Some(rows)
            || cu.windows(2).any(|w| w[0] > w[1])
            || self.patch_hw.len() != rows
        {
            return Err(bad(format!(
                "batch of {} images and {} patches does not describe {rows} rows",
                self.grids.len(),
                self.patch_hw.len()
            )));
        }
        for (i, (w, g)) in cu.windows(2).zip(&self.grids).enumerate() {
            let outside = self.patch_hw[w[0] as usize..w[1] as usize]
                .iter()
                .any(|hw| hw[0] >= g[0] || hw[1] >= g[1]);
            if outside {
                return Err(bad(format!(
                    "image {i}: a patch lies outside its {}x{} grid",
                    g[0], g[1]
                )));
            }
        }
        Ok(())
    }

    /// The image each row belongs to.
    pub fn image_of_rows(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.num_patches()];
        for (i, w) in self.cu_seqlens.windows(2).enumerate() {
            out[w[0] as usize..w[1] as usize].fill(i as u32);
        }
        out
    }
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

    /// An empty batch on the heap whose block tables have `max_blocks_per_seq` entries per
    /// sequence.
    pub fn new(max_blocks_per_seq: usize) -> Self {
        ForwardBatch {
            query_start: vec![0].into(),
            max_blocks_per_seq,
            ..Default::default()
        }
    }

    /// An empty batch in buffers from `pool` with room for `shape` (pushing more still works:
    /// a full buffer moves to a larger one).
    pub fn in_pool(pool: &PinnedPool, shape: BatchShape) -> Result<Self> {
        let vec = |n: usize| HostVec::with_capacity_in(pool, n);
        let mut query_start = vec(shape.num_seqs + 1)?;
        query_start.push(0);
        Ok(ForwardBatch {
            token_ids: vec(shape.num_tokens)?,
            positions: vec(shape.num_tokens)?,
            slot_mapping: vec(shape.num_tokens)?,
            query_start,
            context_lens: vec(shape.num_seqs)?,
            block_tables: vec(shape.num_seqs * shape.max_blocks_per_seq)?,
            max_blocks_per_seq: shape.max_blocks_per_seq,
            logits_indices: vec(shape.num_logits)?,
            mrope_positions: if shape.mrope {
                vec(3 * shape.num_tokens)?
            } else {
                HostVec::new()
            },
        })
    }

    /// Whether every part of the batch lives in pinned pool buffers.
    pub fn is_pinned(&self) -> bool {
        [
            &self.token_ids,
            &self.positions,
            &self.slot_mapping,
            &self.query_start,
            &self.context_lens,
            &self.block_tables,
            &self.logits_indices,
        ]
        .iter()
        .all(|v| v.is_pinned())
            && (self.mrope_positions.is_empty() || self.mrope_positions.is_pinned())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn two_seqs(mut b: ForwardBatch) -> ForwardBatch {
        b.push_seq(&[5, 6, 7], 0, &[3, 1], 2);
        b.logits_indices.push(2);
        b.push_seq(&[9], 4, &[0, 2, 4], 2);
        b.logits_indices.push(3);
        b
    }

    /// Where the parts of `b` live, sorted.
    fn buffers(b: &ForwardBatch) -> Vec<*const u32> {
        let mut p = [
            &b.token_ids,
            &b.positions,
            &b.slot_mapping,
            &b.query_start,
            &b.context_lens,
            &b.block_tables,
            &b.logits_indices,
        ]
        .map(|v| v.as_ptr());
        p.sort();
        p.to_vec()
    }

    const SHAPE: BatchShape = BatchShape {
        num_tokens: 4,
        num_seqs: 2,
        max_blocks_per_seq: 3,
        num_logits: 2,
        mrope: false,
    };

    #[test]
    fn push_seq_fills_every_part() {
        let b = two_seqs(ForwardBatch::new(3));
        assert_eq!(*b.token_ids, [5, 6, 7, 9]);
        assert_eq!(*b.positions, [0, 1, 2, 4]);
        // Positions 0 and 1 in block 3, 2 in block 1; position 4 in block 4.
        assert_eq!(*b.slot_mapping, [6, 7, 2, 8]);
        assert_eq!(*b.query_start, [0, 3, 4]);
        assert_eq!(*b.context_lens, [3, 5]);
        assert_eq!(*b.block_tables, [3, 1, 0, 0, 2, 4]);
        assert_eq!(b.block_table(1), &[0, 2, 4]);
        assert_eq!((b.num_tokens(), b.num_seqs()), (4, 2));
        assert!(!b.is_pinned());
    }

    #[test]
    fn a_pooled_batch_equals_a_heap_one_and_the_next_step_reuses_its_buffers() {
        let pool = PinnedPool::default();
        let pinned = two_seqs(ForwardBatch::in_pool(&pool, SHAPE).unwrap());
        assert!(pinned.is_pinned());
        assert_eq!(pinned, two_seqs(ForwardBatch::new(3)));
        let addrs = buffers(&pinned);
        assert_eq!(pool.stats().buffers_in_use, 7);
        drop(pinned);
        // Same shape: the same buffers, whose stale contents do not show.
        let mut again = ForwardBatch::in_pool(&pool, SHAPE).unwrap();
        assert_eq!(again, ForwardBatch::new(3));
        again.push_seq(&[1], 3, &[7, 8], 2);
        assert_eq!(*again.block_tables, [7, 8, 0]);
        assert_eq!(buffers(&again), addrs);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses), (7, 7));
    }

    #[test]
    fn pushing_past_the_reserved_shape_moves_to_larger_pinned_buffers() {
        let pool = PinnedPool::default();
        let small = BatchShape {
            num_tokens: 1,
            num_seqs: 1,
            ..SHAPE
        };
        let mut b = ForwardBatch::in_pool(&pool, small).unwrap();
        let cap = b.token_ids.capacity();
        let many: Vec<u32> = (0..cap as u32 + 1).collect();
        let table: Vec<u32> = (0..3).collect();
        b.push_seq(&many[..8], 0, &table, 4);
        b.token_ids.extend_from_slice(&many);
        assert!(b.token_ids.capacity() > cap);
        assert!(b.is_pinned());
        assert_eq!(&b.token_ids[8..], &many[..]);
        let copy = b.clone();
        assert!(!copy.is_pinned());
        assert_eq!(copy, b);
    }
}
