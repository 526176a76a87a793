//! The paged KV cache's block pool: reference counts, a free list in LRU order, and prefix reuse.
//!
//! A block is either in use (`ref_count > 0`, listed in that many block tables) or free. A full
//! block whose tokens are known gets a hash chained from its predecessor's; while free it keeps its
//! contents and stays findable by that hash until the allocator reuses it (oldest free first), so
//! a later request with the same prefix can take it back instead of recomputing it.
//! Cost: O(log n) per allocate / release, O(blocks of the prompt) per prefix lookup.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use foldhash::HashMap;

/// Identifies a block in the pool.
pub type BlockId = u32;

/// The hash of a full block given its predecessor's hash.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// [`chain_hash`] with `salt` (the images a block's placeholder tokens stand for) mixed in;
/// equal to `chain_hash` when `salt` is 0.
pub fn salted_hash(parent: u64, tokens: &[u32], salt: u64) -> u64 {
    let h = chain_hash(parent, tokens);
    if salt == 0 {
        return h;
    }
    let mut s = std::collections::hash_map::DefaultHasher::new();
    h.hash(&mut s);
    salt.hash(&mut s);
    s.finish()
}

/// The block pool.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Free blocks by the time they were freed (oldest first).
    free: BTreeSet<(u64, BlockId)>,
    freed_at: Vec<u64>,
    clock: u64,
    /// Hash of the contents of a full, reusable block.
    hash_of: Vec<Option<u64>>,
    by_hash: HashMap<u64, BlockId>,
    prefix_caching: bool,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockManager {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).map(|b| (0, b)).collect(),
            freed_at: vec![0; num_blocks],
            clock: 0,
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::default(),
            prefix_caching,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks not referenced by any sequence (some may still hold reusable prefixes).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// The reference count of `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether `table` can grow to hold `tokens` tokens.
    pub fn can_grow(&self, table: &[BlockId], tokens: usize) -> bool {
        self.blocks_for(tokens).saturating_sub(table.len()) <= self.num_free()
    }

    /// Grows `table` with fresh blocks to hold `tokens` tokens; false (and no change) if the pool
    /// is short.
    pub fn grow(&mut self, table: &mut Vec<BlockId>, tokens: usize) -> bool {
        if !self.can_grow(table, tokens) {
            return false;
        }
        while table.len() < self.blocks_for(tokens) {
            let (_, b) = self.free.pop_first().expect("checked by can_grow");
            if let Some(h) = self.hash_of[b as usize].take() {
                self.by_hash.remove(&h);
            }
            self.ref_counts[b as usize] = 1;
            table.push(b);
        }
        true
    }

    /// Releases every block of `table` (emptying it).
    pub fn release(&mut self, table: &mut Vec<BlockId>) {
        // Release back to front so a prefix's head outlives its tail in the LRU order.
        for b in table.drain(..).rev() {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "block {b} released twice");
            *rc -= 1;
            if *rc == 0 {
                self.clock += 1;
                self.freed_at[b as usize] = self.clock;
                self.free.insert((self.clock, b));
            }
        }
    }

    /// Takes the cached blocks holding the longest prefix of `tokens` made of full blocks, at most
    /// `max_tokens` tokens, into the (empty) `table`; returns their hashes. `salt(b)` is mixed
    /// into block `b`'s hash ([`salted_hash`]).
    pub fn take_cached_prefix(
        &mut self,
        tokens: &[u32],
        max_tokens: usize,
        table: &mut Vec<BlockId>,
        salt: impl Fn(usize) -> u64,
    ) -> Vec<u64> {
        debug_assert!(table.is_empty());
        let mut hashes = Vec::new();
        if !self.prefix_caching {
            return hashes;
        }
        let mut parent = 0;
        for (b, chunk) in tokens[..max_tokens.min(tokens.len())]
            .chunks_exact(self.block_size)
            .enumerate()
        {
            let h = salted_hash(parent, chunk, salt(b));
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            if self.ref_counts[b as usize] == 0 {
                self.free.remove(&(self.freed_at[b as usize], b));
            }
            self.ref_counts[b as usize] += 1;
            table.push(b);
            hashes.push(h);
            parent = h;
        }
        hashes
    }

    /// Records that `block` now holds a full block with hash `hash`, so it can be reused.
    pub fn register_full(&mut self, block: BlockId, hash: u64) {
        if !self.prefix_caching || self.hash_of[block as usize].is_some() {
            return;
        }
        // An identical block cached already wins; this one stays private.
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(block);
            self.hash_of[block as usize] = Some(hash);
        }
    }

    /// Checks the pool's internal invariants against the block tables of every live sequence.
    /// For tests; panics with a description on the first violation.
    pub fn check_invariants<'a>(&self, tables: impl IntoIterator<Item = &'a [BlockId]>) {
        let mut counted = vec![0u32; self.num_blocks()];
        for t in tables {
            let mut seen = std::collections::HashSet::new();
            for &b in t {
                assert!(seen.insert(b), "block {b} twice in one table");
                counted[b as usize] += 1;
            }
        }
        assert_eq!(
            counted, self.ref_counts,
            "reference counts differ from the block tables"
        );
        for (b, &rc) in self.ref_counts.iter().enumerate() {
            let in_free = self.free.contains(&(self.freed_at[b], b as BlockId));
            assert_eq!(
                in_free,
                rc == 0,
                "block {b}: ref {rc}, in free list {in_free}"
            );
        }
        assert_eq!(
            self.free.len(),
            counted.iter().filter(|&&c| c == 0).count(),
            "free list has duplicates"
        );
        for (&h, &b) in &self.by_hash {
            assert_eq!(
                self.hash_of[b as usize],
                Some(h),
                "hash index out of date for block {b}"
            );
        }
    }
}
