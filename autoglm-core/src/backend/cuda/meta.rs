//! A batch's metadata as the kernels read it, packed into one `u32` buffer so it reaches the
//! device with one asynchronous copy from pinned memory. M-RoPE positions (three a token) travel
//! in the same buffer, so a Glm4v decode step copies nothing more, and nothing through pageable
//! memory.

use std::ops::Range;

use crate::memory::HostVec;
use crate::runner::ForwardBatch;

/// Where each array lies in the packed buffer (in elements).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MetaLayout {
    pub(crate) token_ids: Range<usize>,
    pub(crate) positions: Range<usize>,
    pub(crate) slot_mapping: Range<usize>,
    /// The sequence of each query token (derived from `query_start`).
    pub(crate) seq_of_token: Range<usize>,
    pub(crate) block_tables: Range<usize>,
    pub(crate) query_start: Range<usize>,
    pub(crate) context_lens: Range<usize>,
    pub(crate) logits_indices: Range<usize>,
    /// `[t, h, w]` of each token (empty for 1-D rope).
    pub(crate) mrope_positions: Range<usize>,
    pub(crate) max_blocks_per_seq: usize,
}

/// Packs `batch`'s metadata into `out` (cleared first). `batch` must be consistent
/// (`query_start` non-decreasing and ending at the token count, as `check_batch` verifies).
pub(crate) fn pack(batch: &ForwardBatch, out: &mut HostVec<u32>) -> MetaLayout {
    out.clear();
    let mut put = |xs: &[u32]| {
        let start = out.len();
        out.extend_from_slice(xs);
        start..out.len()
    };
    let token_ids = put(&batch.token_ids);
    let positions = put(&batch.positions);
    let slot_mapping = put(&batch.slot_mapping);
    let block_tables = put(&batch.block_tables);
    let query_start = put(&batch.query_start);
    let context_lens = put(&batch.context_lens);
    let logits_indices = put(&batch.logits_indices);
    let mrope_positions = put(&batch.mrope_positions);
    let start = out.len();
    for (seq, w) in batch.query_start.windows(2).enumerate() {
        for _ in w[0]..w[1] {
            out.push(seq as u32);
        }
    }
    MetaLayout {
        token_ids,
        positions,
        slot_mapping,
        seq_of_token: start..out.len(),
        block_tables,
        query_start,
        context_lens,
        logits_indices,
        mrope_positions,
        max_blocks_per_seq: batch.max_blocks_per_seq,
    }
}

impl MetaLayout {
    /// Whether `packed`, laid out as `self`, holds `batch` (so the device copy made from it can
    /// be reused by every op of the same step).
    pub(crate) fn holds(&self, packed: &[u32], batch: &ForwardBatch) -> bool {
        let same = |r: &Range<usize>, xs: &[u32]| packed.get(r.clone()) == Some(xs);
        self.max_blocks_per_seq == batch.max_blocks_per_seq
            && same(&self.token_ids, &batch.token_ids)
            && same(&self.logits_indices, &batch.logits_indices)
            && same(&self.positions, &batch.positions)
            && same(&self.slot_mapping, &batch.slot_mapping)
            && same(&self.query_start, &batch.query_start)
            && same(&self.context_lens, &batch.context_lens)
            && same(&self.block_tables, &batch.block_tables)
            && same(&self.mrope_positions, &batch.mrope_positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> ForwardBatch {
        let mut b = ForwardBatch::new(3);
        // A 3-token prefill chunk and a 1-token decode, block size 4.
        b.push_seq(&[5, 6, 7], 0, &[2], 4);
        b.push_seq(&[9], 6, &[0, 1], 4);
        b.logits_indices.extend_from_slice(&[2, 3]);
        b
    }

    #[test]
    fn packs_every_array_once_with_the_sequence_of_each_token() {
        let b = batch();
        let mut out = HostVec::default();
        out.push(99);
        let l = pack(&b, &mut out);
        assert_eq!(&out[l.token_ids.clone()], &[5, 6, 7, 9]);
        assert_eq!(&out[l.positions.clone()], &[0, 1, 2, 6]);
        assert_eq!(&out[l.slot_mapping.clone()], &[8, 9, 10, 6]);
        assert_eq!(&out[l.seq_of_token.clone()], &[0, 0, 0, 1]);
        assert_eq!(&out[l.block_tables.clone()], &[2, 0, 0, 0, 1, 0]);
        assert_eq!(&out[l.query_start.clone()], &[0, 3, 4]);
        assert_eq!(&out[l.context_lens.clone()], &[3, 7]);
        assert_eq!(&out[l.logits_indices.clone()], &[2, 3]);
        assert_eq!(
            out.len(),
            4 + 4 + 4 + 4 + 6 + 3 + 2 + 2,
            "cleared first, nothing else"
        );
        assert!(l.holds(&out, &b));
        assert!(
            l.mrope_positions.is_empty(),
            "1-D rope: no M-RoPE positions"
        );
    }

    #[test]
    fn mrope_positions_travel_in_the_same_buffer() {
        let mut b = batch();
        b.mrope_positions = vec![0, 0, 0, 1, 3, 5, 2, 4, 6, 6, 6, 6].into();
        let mut out = HostVec::default();
        let l = pack(&b, &mut out);
        assert_eq!(&out[l.mrope_positions.clone()], &b.mrope_positions[..]);
        assert_eq!(
            &out[l.positions.clone()],
            &[0, 1, 2, 6],
            "positions unchanged"
        );
        assert_eq!(&out[l.seq_of_token.clone()], &[0, 0, 0, 1]);
        assert!(l.holds(&out, &b));
        // A changed stream is a new batch; so is the same batch without M-RoPE positions.
        let mut next = b.clone();
        next.mrope_positions[4] = 4;
        assert!(!l.holds(&out, &next));
        assert!(!l.holds(&out, &batch()));
    }

    #[test]
    fn a_changed_batch_is_not_held() {
        let b = batch();
        let mut out = HostVec::default();
        let l = pack(&b, &mut out);
        let mut next = b.clone();
        next.positions[3] = 7;
        assert!(!l.holds(&out, &next));
        let mut next = b.clone();
        next.block_tables[5] = 4;
        assert!(!l.holds(&out, &next));
        let mut longer = b.clone();
        longer.push_seq(&[1], 0, &[3], 4);
        assert!(!l.holds(&out, &longer));
        let empty = ForwardBatch::new(3);
        assert!(!l.holds(&out, &empty));
        // Token ids and logits rows travel in the same copy.
        let mut ids = b.clone();
        ids.token_ids[0] = 1;
        assert!(!l.holds(&out, &ids));
        let mut rows = b.clone();
        rows.logits_indices.clear();
        rows.logits_indices.push(2);
        assert!(!l.holds(&out, &rows));
    }
}
