//! Encoded image features kept for reuse, keyed by image content and bounded in bytes.
//!
//! A prompt's image is encoded by the vision tower when its first placeholder is scheduled; a
//! later chunk of the same prompt (chunked prefill cutting through the image), a second choice, a
//! recompute after preemption or another request with the same image finds it here. Entries
//! added during a step stay until the step's forward pass has read them; then the least recently
//! used go until the total fits the budget (an image larger than the budget is used once and
//! dropped).

use foldhash::HashMap;

struct Entry<T> {
    embeds: T,
    bytes: usize,
    used: u64,
}

pub(crate) struct EncoderCache<T> {
    map: HashMap<u64, Entry<T>>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

impl<T> EncoderCache<T> {
    pub(crate) fn new(limit: usize) -> Self {
        EncoderCache {
            map: HashMap::default(),
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

    /// Drops the least recently used entries until the cache fits its budget.
    pub(crate) fn evict_to_limit(&mut self) {
        while self.bytes > self.limit {
            let Some((&hash, _)) = self.map.iter().min_by_key(|(_, e)| e.used) else {
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
}
