//! Waiting on the engine: detached for blocking calls, on a bridge thread for asyncio.
//!
//! Blocking calls ([`block_on`]) poll the future detached from the interpreter, so other Python
//! threads run meanwhile; every [`TICK`] they re-attach to run Python's signal handlers, so Ctrl-C
//! interrupts a long `generate` (dropping the future cancels its requests).
//!
//! asyncio calls ([`spawn`]) hand the future to one process-wide bridge thread (a one-thread
//! `futures` pool) and return an `asyncio.Future`. The engine thread only wakes the bridge (it
//! never waits for the GIL); the bridge attaches to schedule the result on the event loop with
//! `call_soon_threadsafe`, and the result is converted to Python objects on the loop's thread.
//! The cost is one thread and one `call_soon_threadsafe` per awaited event.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use futures::executor::ThreadPool;
use futures::FutureExt;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::errors::{guard, panic_err, Kind};

/// How often a blocking wait re-attaches to check for signals.
const TICK: Duration = Duration::from_millis(100);

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on this thread for at most `dur`; `None` if it is still pending.
fn poll_for<F: Future>(mut fut: Pin<&mut F>, dur: Duration) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let deadline = Instant::now() + dur;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::park_timeout(deadline - now);
    }
}

/// Runs `fut` to completion detached from the interpreter, checking for signals every [`TICK`]
/// (a `KeyboardInterrupt` drops the future and is returned).
pub(crate) fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut fut = pin!(fut);
    loop {
        let fut = fut.as_mut();
        if let Some(v) = py.detach(|| poll_for(fut, TICK)) {
            return Ok(v);
        }
        py.check_signals()?;
    }
}

/// [`block_on`] until `deadline` at most: `None` if `fut` is still pending then (it is dropped).
pub(crate) fn block_on_until<F>(
    py: Python<'_>,
    fut: F,
    deadline: Option<Instant>,
) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    let Some(deadline) = deadline else {
        return block_on(py, fut).map(Some);
    };
    let mut fut = pin!(fut);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let fut = fut.as_mut();
        if let Some(v) = py.detach(|| poll_for(fut, left.min(TICK))) {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

fn pool() -> PyResult<&'static ThreadPool> {
    static POOL: OnceLock<Result<ThreadPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        ThreadPool::builder()
            .pool_size(1)
            .name_prefix("autoglm-asyncio-")
            .create()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| {
        crate::errors::new_err(
            Kind::Backend,
            format!("cannot start the asyncio bridge thread: {e}"),
        )
    })
}

/// `asyncio.get_running_loop()`.
pub(crate) fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET.import(py, "asyncio", "get_running_loop")?.call0()
}

/// Whether an `asyncio.Future` is done (settled or cancelled).
pub(crate) fn is_done(fut: &Bound<'_, PyAny>) -> bool {
    fut.call_method0("done")
        .and_then(|d| d.extract::<bool>())
        .unwrap_or(true)
}

/// `fut.set_result(value)` unless it is done.
pub(crate) fn set_result(fut: &Bound<'_, PyAny>, value: Bound<'_, PyAny>) -> PyResult<()> {
    if !is_done(fut) {
        fut.call_method1("set_result", (value,))?;
    }
    Ok(())
}

/// `fut.set_exception(err)` unless it is done.
pub(crate) fn set_exception(fut: &Bound<'_, PyAny>, err: PyErr) -> PyResult<()> {
    if !is_done(fut) {
        fut.call_method1("set_exception", (err.into_value(fut.py()),))?;
    }
    Ok(())
}

type Settle = Box<dyn FnOnce(Python<'_>, &Bound<'_, PyAny>) -> PyResult<()> + Send>;

/// Settles an `asyncio.Future` on its loop's thread (scheduled by `call_soon_threadsafe`).
#[pyclass]
struct Deliver {
    fut: Py<PyAny>,
    settle: Mutex<Option<Settle>>,
}

#[pymethods]
impl Deliver {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        guard(|| {
            let settle = self.settle.lock().ok().and_then(|mut s| s.take());
            let fut = self.fut.bind(py);
            if let Some(settle) = settle {
                if let Err(e) = settle(py, fut) {
                    set_exception(fut, e)?;
                }
            }
            Ok(())
        })
    }
}

/// Runs `work` on the bridge thread, then `settle(py, fut, output)` on the thread of
/// `event_loop`. A panic in `work` sets `AutoglmError` on `fut`.
pub(crate) fn spawn<W, S>(event_loop: Py<PyAny>, fut: Py<PyAny>, work: W, settle: S) -> PyResult<()>
where
    W: Future + Send + 'static,
    W::Output: Send + 'static,
    S: FnOnce(Python<'_>, &Bound<'_, PyAny>, W::Output) -> PyResult<()> + Send + 'static,
{
    pool()?.spawn_ok(async move {
        let out = AssertUnwindSafe(work).catch_unwind().await;
        let settle: Settle = Box::new(move |py, fut| match out {
            Ok(v) => settle(py, fut, v),
            Err(payload) => set_exception(fut, panic_err(&*payload)),
        });
        Python::attach(|py| {
            let deliver = Deliver {
                fut,
                settle: Mutex::new(Some(settle)),
            };
            // Fails only when the loop is closed: nobody is left to tell.
            if let Ok(deliver) = Py::new(py, deliver) {
                let _ = event_loop.call_method1(py, "call_soon_threadsafe", (deliver,));
            }
        });
    });
    Ok(())
}

/// A one-shot cancellation signal for work on the bridge thread.
#[derive(Clone)]
pub(crate) struct CancelSignal {
    tx: flume::Sender<()>,
    rx: flume::Receiver<()>,
}

impl CancelSignal {
    pub(crate) fn new() -> Self {
        let (tx, rx) = flume::bounded(1);
        CancelSignal { tx, rx }
    }

    pub(crate) fn cancel(&self) {
        let _ = self.tx.try_send(());
    }

    /// Whether [`CancelSignal::cancel`] was called.
    pub(crate) fn is_cancelled(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Resolves once [`CancelSignal::cancel`] was called.
    pub(crate) async fn cancelled(&self) {
        let _ = self.rx.recv_async().await;
        // Leave the signal set for anyone else waiting.
        let _ = self.tx.try_send(());
    }
}

/// Added as a done-callback of an `asyncio.Future`: cancelling the future cancels the work.
#[pyclass]
pub(crate) struct CancelOnDone {
    pub(crate) signal: CancelSignal,
}

#[pymethods]
impl CancelOnDone {
    fn __call__(&self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        guard(|| {
            if fut.call_method0("cancelled")?.extract::<bool>()? {
                self.signal.cancel();
            }
            Ok(())
        })
    }
}
