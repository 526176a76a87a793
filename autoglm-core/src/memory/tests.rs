use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// The mmap allocator, counting live regions; optionally breaking the contract (short regions).
#[derive(Debug, Default)]
struct Counting {
    inner: MmapAllocator,
    live: AtomicIsize,
    short: bool,
}

// SAFETY: forwards to MmapAllocator; a `short` region is really `len` bytes long (the mapping is
// larger), so what it reports is true.
unsafe impl HostAllocator for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn alloc(&self, bytes: usize) -> Result<RawRegion> {
        let mut r = self.inner.alloc(bytes)?;
        self.live.fetch_add(1, Ordering::SeqCst);
        if self.short {
            r.len = bytes / 2;
        }
        Ok(r)
    }
    unsafe fn free(&self, mut region: RawRegion) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        if self.short {
            region.len *= 2;
        }
        // SAFETY: forwarded from our caller, with the length restored.
        unsafe { self.inner.free(region) };
    }
}

fn pool(max_bytes: usize) -> (PinnedPool, Arc<Counting>) {
    let alloc = Arc::new(Counting::default());
    let config = PinnedPoolConfig {
        max_bytes,
        ..Default::default()
    };
    (PinnedPool::new(alloc.clone(), config).unwrap(), alloc)
}

const KIB: usize = 1024;

#[test]
fn pool_and_buffers_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PinnedPool>();
    check::<PinnedBuf>();
}

#[test]
fn a_returned_buffer_is_reused_for_the_same_class() {
    let (pool, alloc) = pool(1 << 30);
    let buf = pool.take(10_000).unwrap();
    assert_eq!((buf.len(), buf.capacity()), (10_000, 16 * KIB));
    let addr = buf.as_ptr();
    drop(buf);
    let s = pool.stats();
    assert_eq!(
        (s.hits, s.misses, s.buffers_free, s.buffers_in_use),
        (0, 1, 1, 0)
    );
    // Another size of the same class: the same memory, no allocation.
    let buf = pool.take(9_000).unwrap();
    assert_eq!(buf.as_ptr(), addr);
    assert_eq!(buf.len(), 9_000);
    let s = pool.stats();
    assert_eq!(
        (s.hits, s.misses, s.buffers_free, s.buffers_in_use),
        (1, 1, 0, 1)
    );
    // A different class is a miss.
    let other = pool.take(20_000).unwrap();
    assert_ne!(other.as_ptr(), addr);
    assert_eq!(pool.stats().misses, 2);
    assert_eq!(alloc.live.load(Ordering::SeqCst), 2);
}

#[test]
fn sizes_round_up_to_power_of_two_classes_of_at_least_a_page() {
    let pool = PinnedPool::default();
    let page = alloc::page_size().max(4 * KIB);
    assert_eq!(pool.class_size(0), Some(page));
    assert_eq!(pool.class_size(1), Some(page));
    assert_eq!(pool.class_size(page), Some(page));
    assert_eq!(pool.class_size(page + 1), Some(2 * page));
    assert_eq!(pool.class_size(3 << 20), Some(4 << 20));
    assert_eq!(pool.class_size(usize::MAX), None);
    let zero = pool.take(0).unwrap();
    assert!(zero.is_empty());
    assert_eq!(zero.capacity(), page);
}

#[test]
fn buffers_are_page_aligned_and_typed_views_cover_whole_values() {
    let pool = PinnedPool::default();
    for bytes in [1, 4 * KIB, 5_000, 64 * KIB + 3, 2 << 20, 3 << 20] {
        let mut buf = pool.take(bytes).unwrap();
        assert_eq!(buf.as_ptr() as usize % REGION_ALIGN, 0, "{bytes} bytes");
        assert_eq!(buf.len(), bytes);
        // Every byte is writable and reads back.
        buf.fill(0xab);
        assert!(buf.iter().all(|&b| b == 0xab));
        let n = bytes / 4;
        let words = buf.as_mut_slice_of::<u32>();
        assert_eq!(words.len(), n);
        assert_eq!(words.as_ptr() as usize % std::mem::align_of::<u32>(), 0);
        for (i, w) in words.iter_mut().enumerate() {
            *w = i as u32;
        }
        let ints: &[i32] = buf.as_slice_of();
        assert_eq!(ints.len(), n);
        assert!(ints.iter().enumerate().all(|(i, &v)| v == i as i32));
        if n > 1 {
            assert_eq!(&buf[4..8], &1u32.to_ne_bytes());
        }
        assert_eq!(buf.as_slice_of::<f32>().len(), n);
        assert_eq!(buf.as_slice_of::<u64>().len(), bytes / 8);
        assert_eq!(buf.as_slice_of::<u8>().len(), bytes);
    }
    let s = pool.stats();
    assert_eq!(s.locked + s.unlocked, s.buffers_free);
}

#[test]
fn taking_over_the_limit_fails_with_the_sizes_in_the_message() {
    let (pool, _alloc) = pool(64 * KIB);
    let a = pool.take(32 * KIB).unwrap();
    let _b = pool.take(16 * KIB).unwrap();
    let err = pool.take(20 * KIB).unwrap_err();
    assert!(
        matches!(
            err,
            Error::PinnedMemoryLimit {
                requested: 20480,
                class: 32768,
                limit: 65536,
                in_use: 49152,
                pinned: 49152
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    for part in [
        "20480 bytes",
        "size class 32768",
        "limit of 65536",
        "49152 bytes in use",
    ] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    // Failures leave the counters as they were, and are counted.
    let s = pool.stats();
    assert_eq!(
        (s.bytes_in_use, s.bytes_pinned, s.misses),
        (48 * KIB, 48 * KIB, 2)
    );
    assert_eq!(s.refused, 1);
    // An idle buffer of the class is reused without any room needed.
    drop(a);
    let c = pool.take(32 * KIB).unwrap();
    assert_eq!(pool.stats().hits, 1);
    drop(c);
    // Buffers in use leave no room for 64 KiB: fail without freeing the idle one for nothing.
    assert!(pool.take(64 * KIB).is_err());
    assert_eq!(pool.stats().buffers_free, 1);
}

#[test]
fn a_miss_frees_idle_buffers_to_stay_under_the_limit() {
    let (pool, alloc) = pool(64 * KIB);
    drop((pool.take(32 * KIB).unwrap(), pool.take(16 * KIB).unwrap()));
    assert_eq!(pool.stats().bytes_pinned, 48 * KIB);
    let big = pool.take(64 * KIB).unwrap();
    let s = pool.stats();
    assert_eq!(
        (s.bytes_pinned, s.releases, s.buffers_free),
        (64 * KIB, 2, 0)
    );
    assert_eq!(alloc.live.load(Ordering::SeqCst), 1);
    assert!(s.peak_bytes_pinned <= 64 * KIB);
    drop(big);
}

#[test]
fn trim_releases_idle_buffers_only() {
    let (pool, alloc) = pool(1 << 30);
    let kept = pool.take(8 * KIB).unwrap();
    drop((pool.take(4 * KIB).unwrap(), pool.take(100 * KIB).unwrap()));
    assert_eq!(alloc.live.load(Ordering::SeqCst), 3);
    assert_eq!(pool.trim(), 4 * KIB + 128 * KIB);
    let s = pool.stats();
    assert_eq!(
        (s.bytes_pinned, s.bytes_in_use, s.buffers_free),
        (8 * KIB, 8 * KIB, 0)
    );
    assert_eq!(s.releases, 2);
    assert_eq!(alloc.live.load(Ordering::SeqCst), 1);
    // The next take of a trimmed class allocates again.
    let _again = pool.take(4 * KIB).unwrap();
    assert_eq!(pool.stats().misses, 4);
    drop(kept);
}

#[test]
fn peaks_remember_the_high_water_mark() {
    let (pool, _alloc) = pool(1 << 30);
    let a = pool.take(1 << 20).unwrap();
    let b = pool.take(4 * KIB).unwrap();
    drop((a, b));
    let _c = pool.take(4 * KIB).unwrap();
    let s = pool.stats();
    assert_eq!(s.peak_bytes_in_use, (1 << 20) + 4 * KIB);
    assert_eq!(s.peak_bytes_pinned, (1 << 20) + 4 * KIB);
    assert_eq!(s.bytes_in_use, 4 * KIB);
    pool.trim();
    assert_eq!(pool.stats().peak_bytes_pinned, (1 << 20) + 4 * KIB);
}

#[test]
fn dropping_the_pool_frees_idle_buffers_now_and_live_ones_on_their_drop() {
    let (pool, alloc) = pool(1 << 30);
    let clone = pool.clone();
    let mut live = pool.take(12 * KIB).unwrap();
    drop(pool.take(4 * KIB).unwrap());
    drop(pool);
    // A clone keeps the pool open.
    assert_eq!(alloc.live.load(Ordering::SeqCst), 2);
    drop(clone);
    assert_eq!(alloc.live.load(Ordering::SeqCst), 1);
    // The live buffer still works and frees itself instead of returning to a free list.
    live.fill(7);
    assert!(live.iter().all(|&b| b == 7));
    let other = live.take_from_same_pool(KIB);
    assert!(other.is_err(), "a closed pool hands out nothing");
    drop(live);
    assert_eq!(alloc.live.load(Ordering::SeqCst), 0);
}

#[test]
fn a_region_that_breaks_the_allocator_contract_is_rejected_and_freed() {
    let alloc = Arc::new(Counting {
        short: true,
        ..Default::default()
    });
    let pool = PinnedPool::new(alloc.clone(), PinnedPoolConfig::default()).unwrap();
    let err = pool.take(8 * KIB).unwrap_err().to_string();
    assert!(err.contains("counting returned 4096 bytes"), "{err}");
    assert_eq!(alloc.live.load(Ordering::SeqCst), 0);
    let s = pool.stats();
    assert_eq!(
        (s.bytes_pinned, s.bytes_in_use, s.buffers_in_use),
        (0, 0, 0)
    );
    assert_eq!((s.misses, s.refused), (0, 1));
}

#[test]
fn config_rejects_a_minimum_class_that_is_not_a_power_of_two_page() {
    for min_class in [0, 1000, 2048, 5000] {
        let c = PinnedPoolConfig {
            min_class,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("pinned.min_class"), "{err}");
    }
    let c = PinnedPoolConfig {
        min_class: 64 * KIB,
        ..Default::default()
    };
    let pool = PinnedPool::new(Arc::new(MmapAllocator::new()), c).unwrap();
    assert_eq!(pool.take(1).unwrap().capacity(), 64 * KIB);
}

#[test]
fn concurrent_takes_and_returns_never_share_a_buffer_and_balance_the_counters() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 300;
    const SIZES: [usize; 4] = [100, 5_000, 20_000, 70_000];
    let (pool, alloc) = pool(1 << 30);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let pool = pool.clone();
            s.spawn(move || {
                let mut held: Vec<PinnedBuf> = Vec::new();
                for r in 0..ROUNDS {
                    let mut buf = pool.take(SIZES[(t + r) % SIZES.len()]).unwrap();
                    let mark = (t * ROUNDS + r) as u32;
                    buf.as_mut_slice_of::<u32>().fill(mark);
                    std::thread::yield_now();
                    // Nobody else wrote into it meanwhile.
                    assert!(buf.as_slice_of::<u32>().iter().all(|&w| w == mark));
                    held.push(buf);
                    if held.len() > 2 {
                        held.remove(r % 3);
                    }
                }
            });
        }
    });
    let s = pool.stats();
    assert_eq!(s.hits + s.misses, (THREADS * ROUNDS) as u64);
    assert_eq!((s.bytes_in_use, s.buffers_in_use), (0, 0));
    // Each class never had more than THREADS * 3 buffers alive at once.
    assert!(s.misses as usize <= SIZES.len() * THREADS * 3, "{s:?}");
    assert!(s.hits > s.misses, "{s:?}");
    assert_eq!(s.buffers_free as isize, alloc.live.load(Ordering::SeqCst));
    let classes: usize = SIZES.iter().map(|&b| pool.class_size(b).unwrap()).sum();
    assert!(s.bytes_pinned <= classes * THREADS * 3);
    assert_eq!(s.locked + s.unlocked, s.buffers_free);
    assert_eq!(pool.trim(), s.bytes_pinned);
    assert_eq!(alloc.live.load(Ordering::SeqCst), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Take(usize),
    Drop(usize),
    Trim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..40_000).prop_map(Op::Take),
        3 => any::<usize>().prop_map(Op::Drop),
        1 => Just(Op::Trim),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Against a model of what is held: a take fails exactly when the buffers in use leave no
    /// room, and the counters always add up.
    #[test]
    fn counters_follow_a_model_of_takes_drops_and_trims(ops in prop::collection::vec(op(), 1..60)) {
        const LIMIT: usize = 96 * KIB;
        let (pool, alloc) = pool(LIMIT);
        let mut held: Vec<PinnedBuf> = Vec::new();
        let (mut takes, mut refused) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Take(bytes) => {
                    let class = pool.class_size(bytes).unwrap();
                    let in_use: usize = held.iter().map(|b| b.capacity()).sum();
                    match pool.take(bytes) {
                        Ok(b) => {
                            prop_assert!(in_use + class <= LIMIT);
                            prop_assert_eq!((b.len(), b.capacity()), (bytes, class));
                            held.push(b);
                            takes += 1;
                        }
                        Err(e) => {
                            prop_assert!(in_use + class > LIMIT, "{}", e);
                            refused += 1;
                        }
                    }
                }
                Op::Drop(i) if !held.is_empty() => {
                    let n = held.len();
                    held.swap_remove(i % n);
                }
                Op::Drop(_) => {}
                Op::Trim => {
                    pool.trim();
                    prop_assert_eq!(pool.stats().buffers_free, 0);
                }
            }
            let s = pool.stats();
            let in_use: usize = held.iter().map(|b| b.capacity()).sum();
            prop_assert_eq!(s.bytes_in_use, in_use);
            prop_assert_eq!(s.buffers_in_use, held.len());
            prop_assert_eq!(s.hits + s.misses, takes);
            prop_assert_eq!(s.refused, refused);
            prop_assert!(s.bytes_pinned <= LIMIT);
            prop_assert!(s.bytes_pinned >= s.bytes_in_use);
            prop_assert!(s.peak_bytes_pinned >= s.bytes_pinned);
            prop_assert!(s.peak_bytes_in_use >= s.bytes_in_use);
            prop_assert_eq!(s.buffers_in_use + s.buffers_free, s.locked + s.unlocked);
            prop_assert_eq!(
                (s.buffers_in_use + s.buffers_free) as isize,
                alloc.live.load(Ordering::SeqCst)
            );
        }
        drop(held);
        drop(pool);
        prop_assert_eq!(alloc.live.load(Ordering::SeqCst), 0);
    }
}
