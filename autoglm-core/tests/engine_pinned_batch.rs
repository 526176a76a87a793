//! The engine builds every step's batch in pinned pool buffers: once warmed up, decode steps reuse
//! them (pool hits only, no new allocation), and building a batch allocates nothing on the heap.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use autoglm_core::engine::{collect, GenerateOutput};
use autoglm_core::memory::{PinnedPool, PoolStats};
use autoglm_core::runner::{BatchShape, ForwardBatch};
use autoglm_core::{Engine, EngineConfig, SamplingParams};
use common::*;

/// Counts heap allocations made by the current thread (other threads' do not interfere).
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count_alloc() {
    // `try_with`: the slot may be gone while a thread exits.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to the system allocator unchanged; counting touches a const-initialised
// thread-local without a destructor, which itself never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap allocations `f` makes on this thread.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

const SEQS: usize = 8;
const STRIDE: usize = 16;
const BLOCK: usize = 4;

/// One decode step's batch, as the engine builds it: one token per sequence.
fn decode_batch(make: impl FnOnce() -> ForwardBatch, tables: &[Vec<u32>], pos: usize) {
    let mut b = make();
    for (s, table) in tables.iter().enumerate() {
        b.push_seq(&[s as u32], pos, table, BLOCK);
        b.logits_indices.push(s as u32);
    }
    std::hint::black_box(&b);
}

#[test]
fn building_a_decode_batch_in_a_warm_pool_allocates_nothing_on_the_heap() {
    let pool = PinnedPool::default();
    let shape = BatchShape {
        num_tokens: SEQS,
        num_seqs: SEQS,
        max_blocks_per_seq: STRIDE,
        num_logits: SEQS,
        mrope: false,
    };
    let tables: Vec<Vec<u32>> = (0..SEQS)
        .map(|s| ((s * STRIDE) as u32..((s + 1) * STRIDE) as u32).collect())
        .collect();
    let pinned = || ForwardBatch::in_pool(&pool, shape).unwrap();
    // Warm-up: the first batch allocates the pool's buffers (and its free lists).
    decode_batch(pinned, &tables, 0);
    let warm = pool.stats();
    for pos in 1..40 {
        let n = allocations_in(|| decode_batch(pinned, &tables, pos));
        assert_eq!(n, 0, "step at position {pos} allocated");
    }
    let s = pool.stats();
    assert_eq!(s.misses, warm.misses);
    assert_eq!(s.hits, warm.hits + 39 * 7);
    assert_eq!((s.bytes_in_use, s.buffers_in_use), (0, 0));
    // The counter does see heap allocations: a heap batch makes some every step.
    let heap = allocations_in(|| decode_batch(|| ForwardBatch::new(STRIDE), &tables, 1));
    assert!(heap >= 7, "{heap}");
}

fn engine() -> Engine {
    let mut cfg = EngineConfig::default();
    cfg.cache.block_size = BLOCK;
    Engine::from_dir(&fixture("glm4-tiny"), cfg).unwrap()
}

/// Runs every prompt at once for `max_tokens` greedy tokens each.
fn run(engine: &Engine, max_tokens: usize) -> Vec<GenerateOutput> {
    let e = expected("glm4-tiny");
    let params = SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let streams: Vec<_> = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| engine.submit(ids(&c["prompt_token_ids"]), params.clone()))
        .collect::<Result<_, _>>()
        .unwrap();
    streams
        .into_iter()
        .map(|s| collect(s, 1).unwrap())
        .collect()
}

fn pool_stats(engine: &Engine) -> PoolStats {
    engine
        .stats()
        .pinned_pool()
        .expect("the engine has started")
}

fn steps(engine: &Engine) -> u64 {
    engine
        .stats()
        .steps
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn after_warm_up_engine_steps_are_pool_hits_only() {
    let engine = engine();
    // Warm-up: prefills and a few decode steps allocate what the batches need.
    let first = run(&engine, 4);
    let warm = pool_stats(&engine);
    let warm_steps = steps(&engine);
    assert!(warm.misses > 0 && warm.refused == 0, "{warm:?}");
    // Each step's batch takes seven buffers (one per part) and gives them back.
    assert_eq!(warm.hits + warm.misses, 7 * warm_steps);
    assert!(warm.bytes_pinned > 0);

    // Many more steps, with longer contexts (wider block tables): no new allocation.
    let second = run(&engine, 48);
    let s = pool_stats(&engine);
    let more = steps(&engine) - warm_steps;
    assert!(more >= 48, "{more} steps");
    assert_eq!(s.misses, warm.misses, "{s:?}");
    assert_eq!(s.hits, warm.hits + 7 * more);
    assert_eq!(s.refused, 0);
    assert_eq!(s.bytes_pinned, warm.bytes_pinned);
    // Batches in reused buffers still compute the reference continuations.
    let cases = expected("glm4-tiny")["cases"].clone();
    for ((case, a), b) in cases.as_array().unwrap().iter().zip(&first).zip(&second) {
        let want = ids(&case["greedy_token_ids"]);
        assert_eq!(a.choices[0].token_ids[..], want[..4]);
        assert_eq!(b.choices[0].token_ids[..want.len()], want[..]);
    }
}
