//! Streams of a request's deltas: a Python iterator and an async iterator over one
//! [`StreamCore`].
//!
//! The core owns the engine's `RequestStream` behind an async mutex, so one waiter at a time
//! receives; a blocking `__next__` and an asyncio `__anext__` wait the same way. Cancelling
//! (`cancel()`, `close()`, breaking out of a `with` block, or the object being collected) drops
//! the engine stream, which cancels the request and frees its KV blocks at once, even while
//! another thread is waiting on it: the waiter also listens for the cancel signal.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use autoglm_core::engine::RequestId;
use autoglm_core::{RequestOutput as CoreEvent, RequestStream as CoreStream};
use futures::future::{select, Either};
use futures::FutureExt;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::errors::{guard, request_err};
use crate::outputs::{chunk, CompletionChunk};
use crate::prompt::Tokenized;
use crate::wait::{self, CancelSignal};

type Event = autoglm_core::Result<CoreEvent>;

/// One request's events, shared by a Python stream object and whoever is waiting on it.
pub(crate) struct StreamCore {
    /// The engine's id of the request.
    id: RequestId,
    /// Whether the request asked for logprobs (chunks then carry a list, else `None`).
    logprobs: bool,
    /// What the engine was given.
    prompt: Tokenized,
    /// `None` once the request finished, failed or was cancelled.
    stream: Arc<futures::lock::Mutex<Option<CoreStream>>>,
    /// Events received for an `__anext__` whose awaiter gave up, handed to the next one.
    stash: Mutex<VecDeque<Event>>,
    /// Set by `cancel()`; whoever holds the stream next cancels it.
    cancelled: AtomicBool,
    /// Wakes a waiter blocked on the stream when `cancel()` cannot take the lock.
    cancel_signal: CancelSignal,
}

/// The lock on a core's stream, held from receiving an event until it is handed over.
///
/// An asyncio event is handed over on the loop's thread, where it goes back to the stash if its
/// awaiter gave up (a timeout); holding the lock until then keeps a later waiter from receiving
/// the event after it first, so events are never reordered.
pub(crate) type Gate = futures::lock::OwnedMutexGuard<Option<CoreStream>>;

impl StreamCore {
    pub(crate) fn new(stream: CoreStream, prompt: Tokenized, logprobs: bool) -> Arc<Self> {
        Arc::new(StreamCore {
            id: stream.id(),
            logprobs,
            prompt,
            stream: Arc::new(futures::lock::Mutex::new(Some(stream))),
            stash: Mutex::new(VecDeque::new()),
            cancelled: AtomicBool::new(false),
            cancel_signal: CancelSignal::new(),
        })
    }

    fn pop_stash(&self) -> Option<Event> {
        self.stash.lock().ok()?.pop_front()
    }

    fn push_stash(&self, ev: Event) {
        if self.cancelled.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut s) = self.stash.lock() {
            s.push_front(ev);
        }
    }

    /// The next event (`None` at the end or after a cancel), with the lock to release once it
    /// has been handed over (see [`Gate`]).
    ///
    /// The stash is only read with the lock held: an event taken from it without the lock could
    /// go back into it (its awaiter gave up) after another waiter had already received the next
    /// event from the engine, and the two would be handed out in the wrong order.
    pub(crate) async fn next_gated(&self) -> (Option<Event>, Option<Gate>) {
        let mut gate = self.stream.clone().lock_owned().await;
        if let Some(ev) = self.pop_stash() {
            return (Some(ev), Some(gate));
        }
        if self.cancelled.load(Ordering::Acquire) {
            if let Some(mut s) = gate.take() {
                s.cancel();
            }
            return (None, Some(gate));
        }
        let Some(stream) = gate.as_mut() else {
            return (None, Some(gate));
        };
        let got = {
            let cancel = pin!(self.cancel_signal.cancelled());
            let recv = pin!(stream.recv_async());
            match select(cancel, recv).await {
                Either::Left(_) => None,
                Either::Right((ev, _)) => Some(ev),
            }
        };
        let ev = match got {
            // Cancelled while waiting.
            None => {
                if let Some(mut s) = gate.take() {
                    s.cancel();
                }
                None
            }
            Some(Some(Ok(ev))) => {
                if ev.usage.is_some() {
                    // The request's last event: nothing more will come.
                    *gate = None;
                }
                Some(Ok(ev))
            }
            Some(ev) => {
                *gate = None;
                ev
            }
        };
        (ev, Some(gate))
    }

    /// Releases the lock after a hand-over, applying a cancel that came meanwhile.
    pub(crate) fn release(&self, gate: Option<Gate>) {
        if let Some(mut gate) = gate {
            if self.cancelled.load(Ordering::Acquire) {
                if let Some(mut s) = gate.take() {
                    s.cancel();
                }
            }
        }
    }

    /// The next event, for a waiter that hands it over at once.
    pub(crate) async fn next(&self) -> Option<Event> {
        let (ev, gate) = self.next_gated().await;
        self.release(gate);
        ev
    }

    /// Cancels the request now, or as soon as the current waiter wakes (at once: it listens for
    /// the signal) or hands its event over.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        match self.stream.try_lock() {
            Some(mut g) => {
                if let Some(mut s) = g.take() {
                    s.cancel();
                }
            }
            None => self.cancel_signal.cancel(),
        }
        if let Ok(mut s) = self.stash.lock() {
            s.clear();
        }
    }

    fn prompt_token_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, &self.prompt.ids)
    }

    fn to_chunk(&self, py: Python<'_>, ev: Event) -> PyResult<Py<CompletionChunk>> {
        chunk(py, self.id, self.logprobs, ev.map_err(request_err)?)
    }
}

/// The deltas of one request, as a Python iterator of `CompletionChunk`.
///
/// Each `next()` waits for the engine's next step with the GIL released. Breaking out of the
/// loop and dropping the stream, `close()`, `cancel()` or leaving a `with` block cancels the
/// request; `cancel()` may be called from another thread while one is waiting.
#[pyclass(module = "autoglm", frozen)]
pub(crate) struct RequestStream {
    core: Arc<StreamCore>,
}

impl RequestStream {
    pub(crate) fn new(core: Arc<StreamCore>) -> Self {
        RequestStream { core }
    }
}

#[pymethods]
impl RequestStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<CompletionChunk>>> {
        guard(|| {
            let core = self.core.clone();
            match wait::block_on(py, async move { core.next().await })? {
                None => Ok(None),
                Some(ev) => self.core.to_chunk(py, ev).map(Some),
            }
        })
    }

    /// The engine's id of the request.
    #[getter]
    fn request_id(&self) -> u64 {
        self.core.id
    }

    /// The prompt text (the rendered template for chat messages); `None` for token ids.
    #[getter]
    fn prompt(&self) -> Option<String> {
        self.core.prompt.text.clone()
    }

    /// The token ids the engine was given.
    #[getter]
    fn prompt_token_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.core.prompt_token_ids(py)
    }

    /// Cancels the request (no-op once it finished); iteration then stops.
    fn cancel(&self) {
        self.core.cancel();
    }

    /// Same as `cancel()` (the generator protocol's name).
    fn close(&self) {
        self.core.cancel();
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.core.cancel();
        false
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.core.cancel();
    }
}

/// The deltas of one request, as an async iterator of `CompletionChunk` for asyncio.
///
/// Waiting never blocks the event loop. Breaking out of `async for` and dropping the stream,
/// `cancel()`, `aclose()` or leaving an `async with` block cancels the request.
#[pyclass(module = "autoglm", frozen)]
pub(crate) struct AsyncRequestStream {
    core: Arc<StreamCore>,
}

impl AsyncRequestStream {
    pub(crate) fn new(core: Arc<StreamCore>) -> Self {
        AsyncRequestStream { core }
    }
}

/// Settles the future of an `__anext__` with `ev`; if its awaiter gave up, keeps `ev` for the
/// next one.
fn settle_next(
    py: Python<'_>,
    fut: &Bound<'_, PyAny>,
    core: &StreamCore,
    ev: Option<Event>,
) -> PyResult<()> {
    if wait::is_done(fut) {
        if let Some(ev) = ev {
            core.push_stash(ev);
        }
        return Ok(());
    }
    match ev {
        None => wait::set_exception(fut, PyStopAsyncIteration::new_err(())),
        Some(ev) => match core.to_chunk(py, ev) {
            Ok(c) => wait::set_result(fut, c.into_bound(py).into_any()),
            Err(e) => wait::set_exception(fut, e),
        },
    }
}

/// An already-settled `asyncio.Future` holding `None`.
fn done_future(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let fut = wait::running_loop(py)?.call_method0("create_future")?;
    wait::set_result(&fut, py.None().into_bound(py))?;
    Ok(fut)
}

#[pymethods]
impl AsyncRequestStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            let event_loop = wait::running_loop(py)?;
            let fut = event_loop.call_method0("create_future")?;
            // An event already queued needs no trip through the bridge thread.
            if let Some((ev, gate)) = self.core.next_gated().now_or_never() {
                let settled = settle_next(py, &fut, &self.core, ev);
                self.core.release(gate);
                settled?;
                return Ok(fut);
            }
            let (core, settle_core) = (self.core.clone(), self.core.clone());
            wait::spawn(
                event_loop.unbind(),
                fut.clone().unbind(),
                async move { core.next_gated().await },
                move |py, fut, (ev, gate)| {
                    let settled = settle_next(py, fut, &settle_core, ev);
                    settle_core.release(gate);
                    settled
                },
            )?;
            Ok(fut)
        })
    }

    /// The engine's id of the request.
    #[getter]
    fn request_id(&self) -> u64 {
        self.core.id
    }

    /// The prompt text (the rendered template for chat messages); `None` for token ids.
    #[getter]
    fn prompt(&self) -> Option<String> {
        self.core.prompt.text.clone()
    }

    /// The token ids the engine was given.
    #[getter]
    fn prompt_token_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.core.prompt_token_ids(py)
    }

    /// Cancels the request (no-op once it finished); iteration then stops.
    fn cancel(&self) {
        self.core.cancel();
    }

    /// Cancels the request; returns an awaitable (for `contextlib.aclosing`).
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            self.core.cancel();
            done_future(py)
        })
    }

    fn __aenter__<'py>(slf: PyRef<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        guard(|| {
            let fut = wait::running_loop(py)?.call_method0("create_future")?;
            wait::set_result(&fut, slf.into_pyobject(py)?.into_any())?;
            Ok(fut)
        })
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(
        &self,
        py: Python<'py>,
        _exc: &Bound<'py, pyo3::types::PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard(|| {
            self.core.cancel();
            done_future(py)
        })
    }
}

impl Drop for AsyncRequestStream {
    fn drop(&mut self) {
        self.core.cancel();
    }
}
