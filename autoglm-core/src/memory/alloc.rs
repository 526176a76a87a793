//! Where the pool's regions come from: the [`HostAllocator`] trait and its CPU implementation.

use std::fmt;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Every region a [`HostAllocator`] returns is aligned to at least this many bytes (a page on
/// every platform autoglm runs on), so any plain-old-data view of it is aligned.
pub const REGION_ALIGN: usize = 4096;

/// One block of host memory, as an allocator hands it out and takes it back.
#[derive(Debug)]
pub struct RawRegion {
    /// Start of the region, aligned to [`REGION_ALIGN`].
    pub ptr: NonNull<u8>,
    /// Length in bytes, at least what was asked for.
    pub len: usize,
    /// Whether the pages are locked in RAM (page-locked for DMA under CUDA, `mlock`ed on the CPU).
    pub locked: bool,
    /// Whether the region is backed by explicit huge pages.
    pub huge_pages: bool,
}

// SAFETY: a region is an address range with a single owner (the pool, or one `PinnedBuf`); moving
// that ownership to another thread is as sound as moving a `Vec`'s buffer.
unsafe impl Send for RawRegion {}

/// A source of page-locked host memory for [`PinnedPool`](super::PinnedPool).
///
/// The CPU implementation is [`MmapAllocator`]; a GPU backend implements this over its driver's
/// page-locked allocation (`cuMemHostAlloc`) so that copies to and from the device are DMA.
///
/// # Safety
///
/// An implementation promises that a region returned by [`alloc`](HostAllocator::alloc):
/// - is valid for reads and writes of `len >= bytes` bytes, aligned to [`REGION_ALIGN`], and its
///   bytes are initialised (memory fresh from the OS is zero-filled, which counts);
/// - is owned by the caller alone and stays valid until it is passed to
///   [`free`](HostAllocator::free) on the same allocator, from any thread;
/// - reports `locked` and `huge_pages` truthfully (statistics rely on it, not safety).
pub unsafe trait HostAllocator: Send + Sync + fmt::Debug {
    /// A short name for logs and statistics ("mmap", "cuda-host").
    fn name(&self) -> &str;

    /// A region of at least `bytes` bytes (`bytes` is a size class: a power of two, at least
    /// [`REGION_ALIGN`]). Failing to lock the pages is not an error: return the region with
    /// `locked: false`.
    fn alloc(&self, bytes: usize) -> Result<RawRegion>;

    /// Returns a region to the system.
    ///
    /// # Safety
    ///
    /// `region` came from [`alloc`](HostAllocator::alloc) on this allocator, unchanged, and is
    /// freed once; nothing reads or writes it afterwards.
    unsafe fn free(&self, region: RawRegion);
}

/// The CPU backend's allocator: anonymous `mmap`, page-aligned, `mlock`ed.
///
/// - Locking: `mlock` also faults every page in, so first touches never page-fault later. When
///   `RLIMIT_MEMLOCK` (often 8 MiB for unprivileged users) refuses it, the region is kept unlocked:
///   it works the same, only without the guarantee, and the pool's statistics count it.
/// - Huge pages: a length that is a multiple of the system's huge page size is first tried with
///   `MAP_HUGETLB` when the system has huge pages reserved (`HugePages_Total` in
///   `/proc/meminfo`); otherwise regions of at least one huge page are `madvise`d
///   `MADV_HUGEPAGE` so transparent huge pages can back them. Either saves TLB misses on large
///   buffers; neither is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapAllocator {
    /// `mlock` every region (default true).
    pub lock: bool,
    /// Try explicit huge pages, then advise transparent ones (default true).
    pub huge_pages: bool,
}

impl Default for MmapAllocator {
    fn default() -> Self {
        MmapAllocator {
            lock: true,
            huge_pages: true,
        }
    }
}

impl MmapAllocator {
    /// Locking and huge pages on.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The system's page size.
pub(super) fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            return n as usize;
        }
    }
    REGION_ALIGN
}

/// The size of an explicit huge page, when the system has some reserved.
#[cfg(target_os = "linux")]
fn reserved_huge_page_size() -> Option<usize> {
    static SIZE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<usize> {
            let line = info.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let total = field("HugePages_Total:")?;
        let size_kb = field("Hugepagesize:")?;
        (total > 0 && size_kb > 0).then_some(size_kb * 1024)
    })
}

/// The huge page size transparent huge pages use (2 MiB on x86-64 and 4 KiB-page arm64).
#[cfg(target_os = "linux")]
const THP_SIZE: usize = 2 << 20;

#[cfg(unix)]
fn mmap_anon(len: usize, extra_flags: libc::c_int) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; it aliases no
    // existing memory. The result is checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(p.cast())
    }
}

// SAFETY: regions are fresh anonymous mappings (zero-filled, page-aligned, at least `bytes` long,
// owned by the caller) and are unmapped only by `free`; `locked` is mlock's own answer.
#[cfg(unix)]
unsafe impl HostAllocator for MmapAllocator {
    fn name(&self) -> &str {
        "mmap"
    }

    fn alloc(&self, bytes: usize) -> Result<RawRegion> {
        let page = page_size();
        let len = bytes.max(1).div_ceil(page) * page;
        let mut region = None;
        #[cfg(target_os = "linux")]
        if self.huge_pages {
            if let Some(huge) = reserved_huge_page_size() {
                if len % huge == 0 {
                    // Fails when the reserved pages are used up: fall back to ordinary pages.
                    region = mmap_anon(len, libc::MAP_HUGETLB).map(|p| (p, true));
                }
            }
        }
        let (ptr, huge_pages) = match region {
            Some(r) => r,
            None => {
                let ptr = mmap_anon(len, 0).ok_or_else(|| {
                    Error::Backend(format!(
                        "pinned memory: mmap of {len} bytes failed: {}",
                        std::io::Error::last_os_error()
                    ))
                })?;
                #[cfg(target_os = "linux")]
                if self.huge_pages && len >= THP_SIZE {
                    // SAFETY: the range is the mapping just created. Advice only; its failure
                    // (THP disabled) changes nothing.
                    unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
                }
                (ptr, false)
            }
        };
        // SAFETY: the range is the mapping just created. Failure (RLIMIT_MEMLOCK) leaves it mapped
        // and usable, only unlocked.
        let locked = self.lock && unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0;
        Ok(RawRegion {
            ptr,
            len,
            locked,
            huge_pages,
        })
    }

    unsafe fn free(&self, region: RawRegion) {
        // SAFETY: the caller guarantees `region` is one of our mappings, whole and freed once;
        // munmap also drops its lock.
        unsafe { libc::munmap(region.ptr.as_ptr().cast(), region.len) };
    }
}

// SAFETY: regions come from the global allocator with REGION_ALIGN alignment, zeroed, and are
// released with the same layout.
#[cfg(not(unix))]
unsafe impl HostAllocator for MmapAllocator {
    fn name(&self) -> &str {
        "heap"
    }

    fn alloc(&self, bytes: usize) -> Result<RawRegion> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), REGION_ALIGN)
            .map_err(|e| Error::Backend(format!("pinned memory: {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            Error::Backend(format!("pinned memory: allocating {bytes} bytes failed"))
        })?;
        Ok(RawRegion {
            ptr,
            len: layout.size(),
            locked: false,
            huge_pages: false,
        })
    }

    unsafe fn free(&self, region: RawRegion) {
        let layout = std::alloc::Layout::from_size_align(region.len, REGION_ALIGN)
            .expect("the layout alloc used");
        // SAFETY: the caller guarantees the region came from `alloc` with this layout.
        unsafe { std::alloc::dealloc(region.ptr.as_ptr(), layout) };
    }
}
