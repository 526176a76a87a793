//! Encoded image features kept for reuse, keyed by image content and bounded in bytes.
//!
//! A prompt's image is encoded when the prompt arrives (see `encoder.rs`), unless its features
//! are here already; a later chunk of the same prompt (chunked prefill cutting through the
//! image), a second choice, a recompute after preemption or another request with the same image
//! finds it here. Entries
//! added during a step stay until the step's forward pass has read them; then the least recently
//! used go until the total fits the budget (an image larger than the budget is used once and
//! dropped). An image a sequence still has to prefill is pinned: its features, once encoded, stay
//! until that sequence has passed them (or is gone), whatever the budget says.

use foldhash::HashMap;

struct Entry<T> {
    embeds: T,
    bytes: usize,
    used: u64,
}

pub(crate) struct EncoderCache<T> {
    map: HashMap<u64, Entry<T>>,
    /// Sequences that still need each image, by content hash (present or not yet encoded).
    pins: HashMap<u64, usize>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

impl<T> EncoderCache<T> {
    pub(crate) fn new(limit: usize) -> Self {
        EncoderCache {
            map: HashMap::default(),
            pins: HashMap::default(),
            bytes: 0,
            limit,
            clock: 0,
        }
    }

    /// Whether `hash` is cached; marks it used.
    pub(crate) fn touch(&mut self, hash: u64) -> bool {
        self.clock += 1;
        match self.map.get_mut(&hash) {
            Some(e) => {
                e.used = self.clock;
                true
            }
            None => false,
        }
    }

    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.map.contains_key(&hash)
    }

    /// One more sequence needs `hash`.
    pub(crate) fn pin(&mut self, hash: u64) {
        *self.pins.entry(hash).or_default() += 1;
    }

    /// One sequence no longer needs `hash`; true when none does.
    pub(crate) fn unpin(&mut self, hash: u64) -> bool {
        match self.pins.get_mut(&hash) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.pins.remove(&hash);
                true
            }
        }
    }

    pub(crate) fn is_pinned(&self, hash: u64) -> bool {
        self.pins.contains_key(&hash)
    }

    pub(crate) fn get(&self, hash: u64) -> Option<&T> {
        self.map.get(&hash).map(|e| &e.embeds)
    }

    pub(crate) fn insert(&mut self, hash: u64, embeds: T, bytes: usize) {
        self.clock += 1;
        let old = self.map.insert(
            hash,
            Entry {
                embeds,
                bytes,
                used: self.clock,
            },
        );
        self.bytes += bytes;
        if let Some(old) = old {
            self.bytes -= old.bytes;
        }
    }

    /// Drops the least recently used unpinned entries until the cache fits its budget (or only
    /// pinned ones are left).
    pub(crate) fn evict_to_limit(&mut self) {
        while self.bytes > self.limit {
            let pins = &self.pins;
            let Some((&hash, _)) = self
                .map
                .iter()
                .filter(|(h, _)| !pins.contains_key(h))
                .min_by_key(|(_, e)| e.used)
            else {
                break;
            };
            if let Some(e) = self.map.remove(&hash) {
                self.bytes -= e.bytes;
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_go_first_and_the_budget_holds() {
        let mut c = EncoderCache::new(10);
        c.insert(1, "a", 4);
        c.insert(2, "b", 4);
        assert!(c.touch(1));
        c.insert(3, "c", 4);
        c.evict_to_limit();
        assert_eq!((c.len(), c.bytes()), (2, 8));
        assert!(c.get(2).is_none(), "2 was the least recently used");
        assert_eq!((c.get(1), c.get(3)), (Some(&"a"), Some(&"c")));
        // One entry over the budget on its own is dropped after use.
        c.insert(4, "d", 11);
        c.evict_to_limit();
        assert_eq!(c.len(), 0);
        assert!(!c.touch(4));
    }

    #[test]
    fn pinned_entries_outlive_the_budget_until_unpinned() {
        let mut c = EncoderCache::new(4);
        c.pin(1);
        c.pin(1);
        c.insert(1, "a", 4);
        c.insert(2, "b", 4);
        c.evict_to_limit();
        assert!(
            c.contains(1) && !c.contains(2),
            "the unpinned entry goes, pinned or not older"
        );
        c.insert(3, "c", 8);
        c.evict_to_limit();
        assert!(c.contains(1) && !c.contains(3));
        assert!(!c.unpin(1), "a second sequence still needs it");
        assert!(c.is_pinned(1));
        assert!(c.unpin(1));
        c.insert(4, "d", 1);
        c.evict_to_limit();
        assert!(
            !c.contains(1) && c.contains(4),
            "unpinned, 1 is the least recently used"
        );
        assert_eq!(c.bytes(), 1);
    }
}
