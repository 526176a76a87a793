//! The pinned host-memory pool: page-locked buffers in size classes, reused across engine steps.
//!
//! Every step the engine builds its batch metadata in host memory that a device can read by DMA,
//! and (on a GPU) reads sampled ids back the same way. Allocating and page-locking that memory
//! costs system calls and page faults, so [`PinnedPool`] does it once per size and reuses it:
//!
//! - **Size classes.** A request is rounded up to a power of two, at least one page (4 KiB). Each
//!   class has a free list; [`PinnedPool::take`] pops from it (a *hit*) or asks the allocator (a
//!   *miss*), and dropping the [`PinnedBuf`] pushes it back. Rounding costs at most 2x in memory;
//!   it buys reuse across the slightly different sizes consecutive steps ask for, so a steady
//!   decode loop is all hits after its first step.
//! - **A byte limit.** Bytes held (free and in use) never exceed
//!   [`PinnedPoolConfig::max_bytes`]: a miss that would go over first frees idle buffers, then
//!   fails with [`Error::PinnedMemoryLimit`] naming the request, the limit and the use.
//! - **Locking and huge pages** are the allocator's business ([`HostAllocator`]). On the CPU,
//!   [`MmapAllocator`] maps anonymous memory, `mlock`s it (keeping it unlocked, and counted so in
//!   [`PoolStats`], where `RLIMIT_MEMLOCK` refuses) and uses huge pages for large regions where the
//!   system offers them.
//! - **Where CUDA plugs in.** A GPU backend implements [`HostAllocator`] over its driver's
//!   page-locked allocation (`cuMemHostAlloc`) and returns it from
//!   [`Backend::host_allocator`](crate::backend::Backend::host_allocator); the engine builds its
//!   pool over whatever the backend returns. Write-combined memory is fast for the host to write
//!   and the device to read but very slow for the host to read, so buffers the host reads back
//!   (sampled ids, logprobs) belong in a second pool over a cached (not write-combined) allocator.
//! - **Vectors.** [`HostVec`] is a growable vector of plain-old-data in a pool buffer; the
//!   engine's [`ForwardBatch`](crate::runner::ForwardBatch) keeps its metadata in them, sized for
//!   the step, so a decode step allocates nothing on the heap for it.
//! - **Lifetime.** The pool's state is shared by its handles and its buffers. When the last
//!   [`PinnedPool`] handle is dropped, idle buffers are freed at once; buffers still alive are
//!   freed when they drop instead of going back to a free list.
//!
//! One mutex guards the free lists and counters; it is held for a push or pop, never during an
//! allocation or a system call that can take long (`mmap`, `mlock`).

mod alloc;
#[cfg(test)]
mod tests;
mod vec;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

pub use alloc::{HostAllocator, MmapAllocator, RawRegion, REGION_ALIGN};
pub use vec::HostVec;

use crate::error::{Error, Result};

/// Settings of a [`PinnedPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedPoolConfig {
    /// Most bytes the pool holds, free and in use together (default 1 GiB).
    pub max_bytes: usize,
    /// Smallest size class in bytes: a power of two, at least [`REGION_ALIGN`] (default 4 KiB).
    /// Raised to the system's page size where that is larger.
    pub min_class: usize,
}

impl Default for PinnedPoolConfig {
    fn default() -> Self {
        PinnedPoolConfig {
            max_bytes: 1 << 30,
            min_class: REGION_ALIGN,
        }
    }
}

impl PinnedPoolConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !self.min_class.is_power_of_two() || self.min_class < REGION_ALIGN {
            return Err(Error::config(
                "pinned.min_class",
                format!(
                    "{} is not a power of two of at least {REGION_ALIGN}",
                    self.min_class
                ),
            ));
        }
        Ok(())
    }
}

/// Counters of a [`PinnedPool`]. Byte figures count whole size classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Bytes the pool holds from its allocator: buffers in use plus free ones.
    pub bytes_pinned: usize,
    /// Bytes held by live [`PinnedBuf`]s.
    pub bytes_in_use: usize,
    /// Highest `bytes_pinned` so far.
    pub peak_bytes_pinned: usize,
    /// Highest `bytes_in_use` so far.
    pub peak_bytes_in_use: usize,
    /// Takes served from a free list.
    pub hits: u64,
    /// Takes that allocated a new region (each is one allocation).
    pub misses: u64,
    /// Regions given back to the allocator (by `trim`, to stay under the limit, or on close).
    pub releases: u64,
    /// Takes that failed: over the limit, or the allocator failed.
    pub refused: u64,
    /// Live buffers.
    pub buffers_in_use: usize,
    /// Buffers waiting on free lists.
    pub buffers_free: usize,
    /// Regions held whose pages are locked.
    pub locked: usize,
    /// Regions held whose pages could not be locked (for example over `RLIMIT_MEMLOCK`).
    pub unlocked: usize,
    /// Regions held that are backed by explicit huge pages.
    pub huge_pages: usize,
    /// The byte limit.
    pub limit: usize,
}

struct State {
    /// Idle regions by class index (class `min_class << i`).
    free: Vec<Vec<RawRegion>>,
    /// Set when the last pool handle is dropped: buffers then free their regions on drop.
    closed: bool,
    stats: PoolStats,
}

struct Shared {
    allocator: Arc<dyn HostAllocator>,
    /// log2 of the smallest class.
    min_shift: u32,
    state: Mutex<State>,
}

/// A thread-safe pool of page-locked host buffers. Cheap to clone (the clones share the pool);
/// `Send + Sync`. See the [module docs](self).
#[derive(Clone)]
pub struct PinnedPool {
    handle: Arc<Handle>,
}

/// Owned by the pool handles only: its drop closes the pool while buffers may still be alive.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Default for PinnedPool {
    /// A pool over [`MmapAllocator`] with the default settings.
    fn default() -> Self {
        Self::new(Arc::new(MmapAllocator::new()), PinnedPoolConfig::default())
            .expect("the default config is valid")
    }
}

impl fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedPool")
            .field("allocator", &self.handle.shared.allocator.name())
            .field("stats", &self.stats())
            .finish()
    }
}

impl PinnedPool {
    /// A pool over `allocator`.
    pub fn new(allocator: Arc<dyn HostAllocator>, config: PinnedPoolConfig) -> Result<Self> {
        config.validate()?;
        let min_class = config.min_class.max(alloc::page_size().next_power_of_two());
        let min_shift = min_class.trailing_zeros();
        let classes = (usize::BITS - min_shift) as usize;
        let state = State {
            free: (0..classes).map(|_| Vec::new()).collect(),
            closed: false,
            stats: PoolStats {
                limit: config.max_bytes,
                ..PoolStats::default()
            },
        };
        Ok(PinnedPool {
            handle: Arc::new(Handle {
                shared: Arc::new(Shared {
                    allocator,
                    min_shift,
                    state: Mutex::new(state),
                }),
            }),
        })
    }

    /// A buffer of `bytes` bytes (its capacity is the size class), from a free list or newly
    /// allocated. Its contents are whatever the last user left. Fails only over the byte limit
    /// or when the allocator fails.
    pub fn take(&self, bytes: usize) -> Result<PinnedBuf> {
        self.handle.shared.take(bytes)
    }

    /// Frees every idle buffer; returns the bytes released.
    pub fn trim(&self) -> usize {
        self.handle.shared.trim()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        self.handle.shared.lock().stats
    }

    /// The allocator's name.
    pub fn allocator_name(&self) -> &str {
        self.handle.shared.allocator.name()
    }

    /// The size class (capacity) a request of `bytes` gets, or `None` if no class is that large.
    pub fn class_size(&self, bytes: usize) -> Option<usize> {
        self.handle.shared.class_of(bytes).map(|(_, c)| c)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters and lists are updated without any call that can panic in between, so a
        // poisoned lock still guards consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (index, bytes) of the class for a request.
    fn class_of(&self, bytes: usize) -> Option<(usize, usize)> {
        let class = bytes.max(1 << self.min_shift).checked_next_power_of_two()?;
        Some(((class.trailing_zeros() - self.min_shift) as usize, class))
    }

    fn take(self: &Arc<Self>, bytes: usize) -> Result<PinnedBuf> {
        let mut st = self.lock();
        if st.closed {
            return Err(Error::Backend(
                "pinned memory pool: the pool has been dropped".into(),
            ));
        }
        let limit_error = |st: &State, class| Error::PinnedMemoryLimit {
            requested: bytes,
            class,
            limit: st.stats.limit,
            in_use: st.stats.bytes_in_use,
            pinned: st.stats.bytes_pinned,
        };
        let Some((idx, class)) = self.class_of(bytes) else {
            st.stats.refused += 1;
            return Err(limit_error(&st, usize::MAX));
        };
        if let Some(region) = st.free[idx].pop() {
            st.stats.hits += 1;
            st.stats.buffers_free -= 1;
            mark_in_use(&mut st.stats, class);
            drop(st);
            return Ok(PinnedBuf::new(region, bytes, idx, self.clone()));
        }
        // A miss. Buffers in use cannot be freed: if they leave no room, fail without touching
        // the free lists; otherwise free idle buffers, largest first, until the new one fits.
        if st.stats.bytes_in_use.saturating_add(class) > st.stats.limit {
            st.stats.refused += 1;
            return Err(limit_error(&st, class));
        }
        let mut evicted = Vec::new();
        for i in (0..st.free.len()).rev() {
            while st.stats.bytes_pinned + class > st.stats.limit {
                let Some(region) = st.free[i].pop() else {
                    break;
                };
                st.stats.buffers_free -= 1;
                forget(&mut st.stats, &region, (1 << self.min_shift) << i);
                evicted.push(region);
            }
        }
        // Reserve the bytes now so that concurrent misses cannot overshoot the limit together.
        st.stats.bytes_pinned += class;
        st.stats.peak_bytes_pinned = st.stats.peak_bytes_pinned.max(st.stats.bytes_pinned);
        mark_in_use(&mut st.stats, class);
        drop(st);
        for region in evicted {
            // SAFETY: the region came from this allocator and left the free list just now.
            unsafe { self.allocator.free(region) };
        }
        let region = self
            .allocator
            .alloc(class)
            .and_then(|r| self.check_region(r, class));
        let mut st = self.lock();
        match region {
            Ok(region) => {
                st.stats.misses += 1;
                count_region(&mut st.stats, &region, 1);
                drop(st);
                Ok(PinnedBuf::new(region, bytes, idx, self.clone()))
            }
            Err(e) => {
                st.stats.refused += 1;
                st.stats.bytes_pinned -= class;
                st.stats.bytes_in_use -= class;
                st.stats.buffers_in_use -= 1;
                Err(e)
            }
        }
    }

    /// Rejects (and frees) a region that breaks the allocator contract's checkable parts.
    fn check_region(&self, region: RawRegion, class: usize) -> Result<RawRegion> {
        let aligned = region.ptr.as_ptr() as usize % REGION_ALIGN == 0;
        if aligned && region.len >= class {
            return Ok(region);
        }
        let msg = format!(
            "pinned memory: allocator {} returned {} bytes at {:p} for {class} bytes (must be at \
             least that, aligned to {REGION_ALIGN})",
            self.allocator.name(),
            region.len,
            region.ptr
        );
        // SAFETY: the region came from this allocator and nothing else has seen it.
        unsafe { self.allocator.free(region) };
        Err(Error::Backend(msg))
    }

    /// Takes back a dropped buffer's region.
    fn give_back(&self, region: RawRegion, idx: usize) {
        let class = (1 << self.min_shift) << idx;
        let mut st = self.lock();
        st.stats.bytes_in_use -= class;
        st.stats.buffers_in_use -= 1;
        if !st.closed {
            st.stats.buffers_free += 1;
            st.free[idx].push(region);
            return;
        }
        forget(&mut st.stats, &region, class);
        drop(st);
        // SAFETY: the region came from this allocator; its buffer is gone.
        unsafe { self.allocator.free(region) };
    }

    /// Removes every idle region from the free lists and the counters.
    fn drain(&self, st: &mut State) -> Vec<RawRegion> {
        let mut out = Vec::new();
        for (i, list) in st.free.iter_mut().enumerate() {
            for region in list.drain(..) {
                forget(&mut st.stats, &region, (1 << self.min_shift) << i);
                out.push(region);
            }
        }
        st.stats.buffers_free = 0;
        out
    }

    fn trim(&self) -> usize {
        let regions = {
            let mut st = self.lock();
            let before = st.stats.bytes_pinned;
            let regions = self.drain(&mut st);
            (regions, before - st.stats.bytes_pinned)
        };
        for region in regions.0 {
            // SAFETY: the region came from this allocator and left its free list.
            unsafe { self.allocator.free(region) };
        }
        regions.1
    }

    fn close(&self) {
        let regions = {
            let mut st = self.lock();
            st.closed = true;
            self.drain(&mut st)
        };
        for region in regions {
            // SAFETY: the region came from this allocator and left its free list.
            unsafe { self.allocator.free(region) };
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Normally empty (closing drained it); freed here in any case.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for region in st.free.drain(..).flatten() {
            // SAFETY: the region came from this allocator, and no buffer refers to it.
            unsafe { self.allocator.free(region) };
        }
    }
}

fn mark_in_use(s: &mut PoolStats, class: usize) {
    s.bytes_in_use += class;
    s.buffers_in_use += 1;
    s.peak_bytes_in_use = s.peak_bytes_in_use.max(s.bytes_in_use);
}

/// Adds (`sign` 1) or removes (-1) a region from the held-region counts.
fn count_region(s: &mut PoolStats, r: &RawRegion, sign: isize) {
    let add = |n: &mut usize| *n = n.wrapping_add_signed(sign);
    add(if r.locked {
        &mut s.locked
    } else {
        &mut s.unlocked
    });
    if r.huge_pages {
        add(&mut s.huge_pages);
    }
}

/// Accounts for a region about to be given back to the allocator.
fn forget(s: &mut PoolStats, r: &RawRegion, class: usize) {
    s.bytes_pinned -= class;
    s.releases += 1;
    count_region(s, r, -1);
}

/// A buffer from a [`PinnedPool`]; returns to the pool when dropped. Derefs to its `len()` bytes;
/// [`as_slice_of`](PinnedBuf::as_slice_of) views them as plain-old-data values.
pub struct PinnedBuf {
    ptr: NonNull<u8>,
    /// Bytes asked for.
    len: usize,
    /// The region as the allocator returned it (only `len` is exposed).
    region_len: usize,
    locked: bool,
    huge_pages: bool,
    /// Size class index.
    class: usize,
    shared: Arc<Shared>,
}

// SAFETY: a PinnedBuf owns its region exclusively, like a `Box<[u8]>`; `&PinnedBuf` gives only
// shared access to the bytes, and the pool state it points to is behind a mutex.
unsafe impl Send for PinnedBuf {}
// SAFETY: as above; no interior mutability is reachable through `&PinnedBuf`.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    fn new(region: RawRegion, len: usize, class: usize, shared: Arc<Shared>) -> Self {
        PinnedBuf {
            ptr: region.ptr,
            len,
            region_len: region.len,
            locked: region.locked,
            huge_pages: region.huge_pages,
            class,
            shared,
        }
    }

    /// Bytes asked for (what the buffer derefs to).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len()` is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size class: bytes the buffer occupies in the pool.
    pub fn capacity(&self) -> usize {
        (1 << self.shared.min_shift) << self.class
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether explicit huge pages back the buffer.
    pub fn is_huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// Start of the buffer, aligned to [`REGION_ALIGN`] (for a device copy).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, writable (for a device-to-host copy).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The buffer as `len() / size_of::<T>()` values of `T` (trailing bytes left out). The buffer
    /// is page-aligned, so any `T` aligned to at most a page fits; others do not compile.
    pub fn as_slice_of<T: bytemuck::Pod>(&self) -> &[T] {
        const { assert!(std::mem::align_of::<T>() <= REGION_ALIGN) };
        let size = std::mem::size_of::<T>();
        if size == 0 {
            return &[];
        }
        bytemuck::cast_slice(&self[..self.len / size * size])
    }

    /// Mutable [`as_slice_of`](PinnedBuf::as_slice_of).
    pub fn as_mut_slice_of<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        const { assert!(std::mem::align_of::<T>() <= REGION_ALIGN) };
        let size = std::mem::size_of::<T>();
        if size == 0 {
            return &mut [];
        }
        let n = self.len / size * size;
        bytemuck::cast_slice_mut(&mut self[..n])
    }

    /// Another buffer from the same pool, of at least `bytes` and as long as its whole size
    /// class; an error once every pool handle is gone.
    pub(crate) fn take_from_same_pool(&self, bytes: usize) -> Result<PinnedBuf> {
        let class = self.shared.class_of(bytes).map_or(bytes, |(_, c)| c);
        self.shared.take(class)
    }
}

impl Deref for PinnedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the region is valid, initialised and exclusively ours for at least `len` bytes
        // (the allocator contract; `len` <= class <= region length) until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for PinnedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let region = RawRegion {
            ptr: self.ptr,
            len: self.region_len,
            locked: self.locked,
            huge_pages: self.huge_pages,
        };
        self.shared.give_back(region, self.class);
    }
}

impl fmt::Debug for PinnedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("locked", &self.locked)
            .finish()
    }
}
