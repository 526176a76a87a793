//! Page-locked host memory from the CUDA driver (`cuMemHostAlloc`) for the pinned pool.

use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use crate::error::{Error, Result};
use crate::memory::{HostAllocator, RawRegion, REGION_ALIGN};

/// Regions from `cuMemHostAlloc`: page-locked and registered with the driver, so copies from
/// them are DMA transfers that run asynchronously on a stream (from pageable memory the driver
/// stages through a bounce buffer and the copy blocks the host). Allocated portable (usable from
/// every context) and not write-combined, as the host also reads them (sampled ids, logprobs).
#[derive(Debug)]
pub struct CudaHostAllocator {
    ctx: Arc<CudaContext>,
}

impl CudaHostAllocator {
    /// An allocator for `ctx`'s device.
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        CudaHostAllocator { ctx }
    }
}

// SAFETY: cuMemHostAlloc returns page-aligned (4096-byte) memory of the requested length that
// stays valid until cuMemFreeHost; regions are zeroed here before they are handed out, are
// page-locked by definition, and are never backed by explicit huge pages.
unsafe impl HostAllocator for CudaHostAllocator {
    fn name(&self) -> &str {
        "cuda-host"
    }

    fn alloc(&self, bytes: usize) -> Result<RawRegion> {
        let err = |e: cudarc::driver::DriverError| {
            Error::Backend(format!(
                "cuMemHostAlloc of {bytes} bytes of page-locked host memory: {e}"
            ))
        };
        self.ctx.bind_to_thread().map_err(err)?;
        // SAFETY: a plain allocation; the pointer is checked below.
        let ptr =
            unsafe { result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(err)?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::Backend("cuMemHostAlloc returned null".into()))?;
        if ptr.as_ptr() as usize % REGION_ALIGN != 0 {
            // SAFETY: just allocated by cuMemHostAlloc, not handed out.
            unsafe {
                let _ = result::free_host(ptr.as_ptr().cast());
            }
            return Err(Error::Backend(format!(
                "cuMemHostAlloc returned memory aligned to less than {REGION_ALIGN} bytes"
            )));
        }
        // SAFETY: the region is `bytes` long and ours alone.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, bytes) };
        Ok(RawRegion {
            ptr,
            len: bytes,
            locked: true,
            huge_pages: false,
        })
    }

    unsafe fn free(&self, region: RawRegion) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the caller passes a region this allocator returned, once.
            let _ = unsafe { result::free_host(region.ptr.as_ptr().cast()) };
        }
    }
}
