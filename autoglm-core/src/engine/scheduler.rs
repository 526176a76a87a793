//! Continuous batching: which sequences run in the next forward pass, and how many tokens each.
//!
//! Each step has a token budget (`max_num_batched_tokens`). Running sequences are served first, in
//! (priority, arrival) order: a decoding sequence takes one token, a sequence in prefill takes the
//! next chunk of its prompt that fits the budget (chunked prefill). When the block pool runs out,
//! the lowest-priority, latest running sequence is preempted: its blocks are released and it goes
//! back to waiting, to be recomputed later (vLLM's recompute policy). Waiting sequences are admitted
//! only in steps that preempted nothing, while the budget, `max_num_seqs` and the pool allow; a new
//! sequence first takes back any cached blocks of its prompt's prefix.
//!
//! The scheduler is a pure data structure: no I/O, no backend, fully testable on its own.

use std::collections::VecDeque;

use foldhash::HashMap;

use super::block_manager::{salted_hash, BlockManager};
use super::sequence::{SeqId, SeqStatus, Sequence};

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The sequence.
    pub seq_id: SeqId,
    /// Position of its first token in this step (= tokens computed before).
    pub start: usize,
    /// Tokens it runs in this step.
    pub len: usize,
    /// Whether this step completes its tokens, so a new token is sampled from its last row.
    pub sample: bool,
}

/// The plan for one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Sequences in the batch, in batch order.
    pub scheduled: Vec<ScheduledSeq>,
    /// Sequences preempted (sent back to waiting) while planning.
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    /// Total tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }
}

/// Waiting and running queues over one block pool.
#[derive(Debug, Clone)]
pub struct Scheduler {
    blocks: BlockManager,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
}

impl Scheduler {
    /// A scheduler over `blocks`.
    pub fn new(blocks: BlockManager, max_num_seqs: usize, max_num_batched_tokens: usize) -> Self {
        Scheduler {
            blocks,
            max_num_seqs,
            max_num_batched_tokens,
            seqs: HashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Queues a new sequence (its `tokens` must be non-empty).
    pub fn add(&mut self, seq: Sequence) {
        debug_assert!(!seq.tokens.is_empty());
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// A sequence by id.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Whether any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Sequences waiting.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// The block pool.
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    fn preempt(&mut self, id: SeqId) {
        let seq = self.seqs.get_mut(&id).expect("running sequence exists");
        self.blocks.release(&mut seq.block_table);
        seq.block_hashes.clear();
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        seq.num_preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.max_num_batched_tokens;
        let seqs = &self.seqs;
        self.running.sort_by_key(|id| seqs[id].order_key());

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let take = seq.num_uncomputed().min(budget);
            let take = take.min(seq.compute_limit() - seq.num_computed);
            if take == 0 {
                i += 1;
                continue;
            }
            let target = seq.num_computed + take;
            let mut fits = false;
            loop {
                let seq = self.seqs.get_mut(&id).expect("running sequence exists");
                if self.blocks.grow(&mut seq.block_table, target) {
                    fits = true;
                    break;
                }
                let victim = self.running.pop().expect("the sequence itself is running");
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
            if !fits {
                break;
            }
            let seq = &self.seqs[&id];
            out.scheduled.push(ScheduledSeq {
                seq_id: id,
                start: seq.num_computed,
                len: take,
                sample: target == seq.tokens.len(),
            });
            budget -= take;
            i += 1;
        }

        if out.preempted.is_empty() {
            let seqs = &self.seqs;
            self.waiting
                .make_contiguous()
                .sort_by_key(|id| seqs[id].order_key());
            let mut w = 0;
            while budget > 0 && self.running.len() < self.max_num_seqs {
                let Some(&id) = self.waiting.get(w) else {
                    break;
                };
                let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
                if seq.block_table.is_empty() {
                    // At least one token must run to produce logits.
                    let max_cached = seq.tokens.len() - 1;
                    let bs = self.blocks.block_size();
                    let (images, cache_salt) = (seq.images.clone(), seq.cache_salt);
                    let salt =
                        |b| super::sequence::block_salt(images.as_deref(), cache_salt, b, bs);
                    seq.block_hashes = self.blocks.take_cached_prefix(
                        &seq.tokens,
                        max_cached,
                        &mut seq.block_table,
                        salt,
                    );
                    seq.num_computed = seq.block_hashes.len() * self.blocks.block_size();
                }
                let take = seq.num_uncomputed().min(budget);
                let take = take.min(seq.compute_limit() - seq.num_computed);
                if take == 0 {
                    // Its next tokens wait for an image's features: it keeps its place and
                    // those behind it may go first.
                    self.blocks.release(&mut seq.block_table);
                    seq.block_hashes.clear();
                    seq.num_computed = 0;
                    w += 1;
                    continue;
                }
                let target = seq.num_computed + take;
                if !self.blocks.grow(&mut seq.block_table, target) {
                    self.blocks.release(&mut seq.block_table);
                    seq.block_hashes.clear();
                    seq.num_computed = 0;
                    break;
                }
                seq.status = SeqStatus::Running;
                out.scheduled.push(ScheduledSeq {
                    seq_id: id,
                    start: seq.num_computed,
                    len: take,
                    sample: target == seq.tokens.len(),
                });
                self.waiting.remove(w);
                self.running.push(id);
                budget -= take;
            }
        }
        out
    }

    /// Records that the planned step ran: its tokens are now in the cache, and newly full blocks
    /// become reusable.
    pub fn commit(&mut self, out: &SchedulerOutput) {
        let bs = self.blocks.block_size();
        for s in &out.scheduled {
            let Some(seq) = self.seqs.get_mut(&s.seq_id) else {
                continue;
            };
            seq.num_computed = s.start + s.len;
            for b in seq.block_hashes.len()..seq.num_computed / bs {
                let parent = seq.block_hashes.last().copied().unwrap_or(0);
                let salt = seq.block_salt(b, bs);
                let h = salted_hash(parent, &seq.tokens[b * bs..(b + 1) * bs], salt);
                self.blocks.register_full(seq.block_table[b], h);
                seq.block_hashes.push(h);
            }
        }
    }

    /// Sets the image ranges a sequence waits for ([`Sequence::encoder_waits`]).
    pub fn set_encoder_waits(&mut self, id: SeqId, waits: &[(usize, usize)]) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.encoder_waits.clear();
            seq.encoder_waits.extend_from_slice(waits);
        }
    }

    /// Holds a sequence back (it keeps its blocks and its place) or lets it run again.
    pub fn set_paused(&mut self, id: SeqId, paused: bool) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.paused = paused;
        }
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Removes a finished or cancelled sequence, releasing its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        self.blocks.release(&mut seq.block_table);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        Some(seq)
    }

    /// Checks queue and pool invariants; for tests.
    pub fn check_invariants(&self) {
        assert_eq!(
            self.waiting.len() + self.running.len(),
            self.seqs.len(),
            "queues and sequence map disagree"
        );
        for id in &self.waiting {
            let s = &self.seqs[id];
            assert_eq!(s.status, SeqStatus::Waiting);
            assert!(
                s.block_table.is_empty(),
                "waiting sequence {id} holds blocks"
            );
        }
        for id in &self.running {
            let s = &self.seqs[id];
            assert_eq!(s.status, SeqStatus::Running);
            assert!(
                s.block_table.len() * self.blocks.block_size() >= s.num_computed,
                "sequence {id} lacks blocks"
            );
        }
        self.blocks
            .check_invariants(self.seqs.values().map(|s| s.block_table.as_slice()));
    }
}
