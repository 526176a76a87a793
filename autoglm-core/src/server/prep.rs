//! Request preparation off the async HTTP workers: tokenizing prompts and rendering chat
//! templates (which also decodes images' base64) run on a pool of pinned threads of their own,
//! so health checks, metrics and streams never wait behind one large prompt.
//!
//! At most `queue` jobs are queued or running at once; later requests wait for a slot
//! asynchronously, holding no thread. A job runs to its end even when its client has gone (it
//! cannot be interrupted), and keeps its slot until then.

use std::sync::Arc;

use tokio::sync::{oneshot, Semaphore};

use super::error::ApiError;
use crate::error::Result;

/// Bodies up to this size are prepared on the HTTP worker that read them.
pub(crate) const INLINE_BODY_BYTES: usize = 16 << 10;

pub(crate) struct PrepPool {
    pool: rayon::ThreadPool,
    slots: Arc<Semaphore>,
}

impl PrepPool {
    pub(crate) fn new(threads: usize, cores: &[usize], queue: usize) -> Result<Self> {
        let threads = match threads {
            0 => crate::threading::allowed_cores().len().clamp(1, 4),
            n => n,
        };
        Ok(PrepPool {
            pool: crate::threading::build_pool("autoglm-prep", cores, threads)?,
            slots: Arc::new(Semaphore::new(queue.max(1))),
        })
    }

    /// Runs `f` on the pool when the request is `big` (its body is over [`INLINE_BODY_BYTES`]), on
    /// the calling worker otherwise: a small request's preparation takes microseconds, less than
    /// the hand-off.
    pub(crate) async fn run_for<T: Send + 'static>(
        &self,
        body_bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::result::Result<T, ApiError> {
        if body_bytes <= INLINE_BODY_BYTES {
            return Ok(f());
        }
        self.run(f).await
    }

    /// Runs `f` on the pool and waits for it without blocking the calling worker.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::result::Result<T, ApiError> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::overloaded("The server is shutting down."))?;
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            drop(slot);
            let _ = tx.send(r);
        });
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(ApiError::internal(
                "Preparing the request failed inside the server; see its log.",
            )),
        }
    }
}
