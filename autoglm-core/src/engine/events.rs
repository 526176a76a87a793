//! The channel that carries one request's events from the engine thread to its stream.
//!
//! A mutex-guarded queue with one waiter (a task's waker or a blocked thread). Unlike a general
//! channel it can batch wake-ups: with a stream interval `k`, the receiver is woken once `k`
//! events are waiting rather than for every event (the first event, a choice's last event and
//! errors wake it at once), so a consumer that writes events out in groups, like the server, also
//! pays for one wake-up per group. Whatever is queued is always handed out when the receiver asks.
//!
//! The receiver takes the whole queue at once: it swaps its own (empty) queue for the shared one
//! under the lock and then hands events out without locking, so a consumer that drains a group
//! locks once per group rather than once per event, and the engine's pushes reuse the swapped-in
//! queue's memory.
//!
//! The queue may be bounded ([`EventReceiver::set_capacity`]). The engine never blocks on it: a
//! send that brings the queue to its capacity still succeeds, says so ([`Sent::Full`]), marks
//! the channel paused and wakes the receiver; the engine then stops generating for that request
//! until the receiver takes the queue, which clears the mark and asks it to resume
//! ([`EventReceiver::take_resume`]). So at most twice the capacity is held: one queue taken and
//! being handed out, one filling.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::RequestOutput;
use crate::error::Result;

type Event = Result<RequestOutput>;

struct State {
    queue: VecDeque<Event>,
    /// The task waiting for the next event.
    waker: Option<Waker>,
    /// A thread waits in `recv`.
    blocked: bool,
    sender_gone: bool,
    receiver_gone: bool,
    /// Wake the receiver once this many events are queued (at least 1).
    interval: usize,
    /// An event was sent already (the first one always wakes the receiver).
    started: bool,
    /// Events queued at most before the sender is told to stop (`usize::MAX`: unbounded).
    capacity: usize,
    /// The queue reached its capacity and the sender stopped; cleared when the receiver takes it.
    paused: bool,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across user code, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the waiter, outside the lock.
    fn wake(&self, mut s: MutexGuard<'_, State>) {
        let waker = s.waker.take();
        let blocked = s.blocked;
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
        if blocked {
            self.cond.notify_one();
        }
    }
}

/// The engine's end; dropping it ends the stream.
pub(crate) struct EventSender(Arc<Shared>);

/// The stream's end; dropping it makes every later send fail.
pub(crate) struct EventReceiver {
    shared: Arc<Shared>,
    /// Events already taken from the shared queue, in order, ahead of it.
    local: VecDeque<Event>,
    /// A full queue was taken: the sender waits to be told to resume.
    resume: bool,
}

/// What a successful send found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Queued, with room for more.
    Queued,
    /// Queued, and the queue is at its capacity: send no more until told to resume.
    Full,
}

/// The receiver is gone.
#[derive(Debug)]
pub(crate) struct Disconnected;

pub(crate) fn channel() -> (EventSender, EventReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            blocked: false,
            sender_gone: false,
            receiver_gone: false,
            interval: 1,
            started: false,
            capacity: usize::MAX,
            paused: false,
        }),
        cond: Condvar::new(),
    });
    let rx = EventReceiver {
        shared: shared.clone(),
        local: VecDeque::new(),
        resume: false,
    };
    (EventSender(shared), rx)
}

impl EventSender {
    /// Queues an event; never blocks. [`Sent::Full`]: the queue is at its capacity, and the
    /// receiver will ask for a resume once it has taken it.
    pub(crate) fn send(&self, ev: Event) -> std::result::Result<Sent, Disconnected> {
        let mut s = self.0.lock();
        if s.receiver_gone {
            return Err(Disconnected);
        }
        let mut urgent = match &ev {
            Ok(out) => out.finish_reason.is_some(),
            Err(_) => true,
        };
        s.queue.push_back(ev);
        let sent = if s.queue.len() >= s.capacity {
            // The receiver must hear of it even while it waits for a fuller batch.
            s.paused = true;
            urgent = true;
            Sent::Full
        } else {
            Sent::Queued
        };
        let first = !std::mem::replace(&mut s.started, true);
        let waiting = s.waker.is_some() || s.blocked;
        if waiting && (urgent || first || s.queue.len() >= s.interval) {
            self.0.wake(s);
        }
        Ok(sent)
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.sender_gone = true;
        self.0.wake(s);
    }
}

impl EventReceiver {
    /// `Some(next)`: the next event, or `Some(None)` when the sender is gone and nothing is
    /// left; `None`: nothing yet. Called once `local` is empty: takes the whole shared queue
    /// (and notes in `resume` when that lifts a pause).
    fn take(
        local: &mut VecDeque<Event>,
        resume: &mut bool,
        s: &mut State,
    ) -> Option<Option<Event>> {
        debug_assert!(local.is_empty());
        std::mem::swap(local, &mut s.queue);
        if std::mem::take(&mut s.paused) {
            *resume = true;
        }
        match local.pop_front() {
            Some(ev) => Some(Some(ev)),
            None if s.sender_gone => Some(None),
            None => None,
        }
    }

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if let Some(ev) = self.local.pop_front() {
            return Poll::Ready(Some(ev));
        }
        let mut s = self.shared.lock();
        if let Some(ev) = Self::take(&mut self.local, &mut self.resume, &mut s) {
            return Poll::Ready(ev);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Like [`poll_recv`](Self::poll_recv) without registering a waker: `Some(next)` (as
    /// `take`), `None` when nothing is queued yet.
    pub(crate) fn try_recv(&mut self) -> Option<Option<Event>> {
        if let Some(ev) = self.local.pop_front() {
            return Some(Some(ev));
        }
        Self::take(&mut self.local, &mut self.resume, &mut self.shared.lock())
    }

    /// Events queued now.
    pub(crate) fn queued(&self) -> usize {
        self.local.len() + self.shared.lock().queue.len()
    }

    pub(crate) fn recv(&mut self) -> Option<Event> {
        if let Some(ev) = self.local.pop_front() {
            return Some(ev);
        }
        let mut s = self.shared.lock();
        loop {
            if let Some(ev) = Self::take(&mut self.local, &mut self.resume, &mut s) {
                return ev;
            }
            s.blocked = true;
            s = self.shared.cond.wait(s).unwrap_or_else(|e| e.into_inner());
            s.blocked = false;
        }
    }

    pub(crate) fn set_interval(&self, k: usize) {
        self.shared.lock().interval = k.max(1);
    }

    /// Bounds the shared queue to `n` events (at least 1).
    pub(crate) fn set_capacity(&self, n: usize) {
        self.shared.lock().capacity = n.max(1);
    }

    /// Whether a full queue was taken since the last call: the sender stopped and should now be
    /// told to resume.
    pub(crate) fn take_resume(&mut self) -> bool {
        std::mem::take(&mut self.resume)
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let queued = {
            let mut s = self.shared.lock();
            s.receiver_gone = true;
            std::mem::take(&mut s.queue)
        };
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::sampling::FinishReason;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn out(i: u32, finish: bool) -> Event {
        Ok(RequestOutput {
            token_ids: vec![i],
            finish_reason: finish.then_some(FinishReason::Length),
            ..Default::default()
        })
    }

    fn id(ev: Option<Event>) -> u32 {
        ev.expect("an event").expect("not an error").token_ids[0]
    }

    #[test]
    fn wakes_once_per_interval_and_delivers_in_order() {
        let (tx, mut rx) = channel();
        rx.set_interval(3);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = || count.0.load(Ordering::SeqCst);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(out(0, false)).unwrap();
        assert_eq!(wakes(), 1, "the first event wakes at once");
        assert_eq!(id(poll_ready(&mut rx, &mut cx)), 0);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(out(1, false)).unwrap();
        tx.send(out(2, false)).unwrap();
        assert_eq!(wakes(), 1, "two of three events: no wake-up yet");
        tx.send(out(3, false)).unwrap();
        assert_eq!(wakes(), 2, "the third one wakes");
        for want in 1..=3 {
            assert_eq!(id(poll_ready(&mut rx, &mut cx)), want);
        }
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(out(4, true)).unwrap();
        assert_eq!(wakes(), 3, "a choice's last event wakes at once");
        assert_eq!(id(poll_ready(&mut rx, &mut cx)), 4);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(Err(Error::EngineShutdown)).unwrap();
        assert_eq!(wakes(), 4, "an error wakes at once");
        assert!(matches!(poll_ready(&mut rx, &mut cx), Some(Err(_))));
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(wakes(), 5, "the end wakes");
        assert!(poll_ready(&mut rx, &mut cx).is_none());
    }

    fn poll_ready(rx: &mut EventReceiver, cx: &mut Context<'_>) -> Option<Event> {
        match rx.poll_recv(cx) {
            Poll::Ready(ev) => ev,
            Poll::Pending => panic!("an event was queued"),
        }
    }

    #[test]
    fn blocking_receiver_across_threads() {
        let (tx, mut rx) = channel();
        rx.set_interval(4);
        let producer = std::thread::spawn(move || {
            for i in 0..1000 {
                tx.send(out(i, i == 999)).unwrap();
            }
        });
        let got: Vec<u32> = std::iter::from_fn(|| rx.recv())
            .map(|e| id(Some(e)))
            .collect();
        producer.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn try_recv_takes_what_is_queued_without_a_waker() {
        let (tx, mut rx) = channel();
        assert!(rx.try_recv().is_none(), "nothing queued yet");
        assert_eq!(rx.queued(), 0);
        for i in 0..3 {
            tx.send(out(i, false)).unwrap();
        }
        assert_eq!(rx.queued(), 3);
        assert_eq!(id(rx.try_recv().expect("queued")), 0);
        assert_eq!(rx.queued(), 2);
        assert_eq!(id(rx.try_recv().expect("queued")), 1);
        drop(tx);
        assert_eq!(
            id(rx.try_recv().expect("queued")),
            2,
            "queued events outlive the sender"
        );
        assert!(matches!(rx.try_recv(), Some(None)), "then the end");
    }

    #[test]
    fn events_sent_while_some_are_taken_keep_their_order() {
        let (tx, mut rx) = channel();
        for i in 0..3 {
            tx.send(out(i, false)).unwrap();
        }
        assert_eq!(id(rx.try_recv().expect("queued")), 0);
        // 1 and 2 were taken together with 0; 3 and 4 queue behind them.
        tx.send(out(3, false)).unwrap();
        tx.send(out(4, true)).unwrap();
        assert_eq!(rx.queued(), 4);
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv().flatten())
            .map(|e| id(Some(e)))
            .collect();
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(rx.try_recv().is_none(), "the sender is still there");
        drop(tx);
        assert!(matches!(rx.try_recv(), Some(None)));
    }

    #[test]
    fn send_fails_once_the_receiver_is_gone() {
        let (tx, rx) = channel();
        tx.send(out(0, false)).unwrap();
        drop(rx);
        assert!(tx.send(out(1, false)).is_err());
    }

    #[test]
    fn a_full_queue_pauses_the_sender_until_taken() {
        let (tx, mut rx) = channel();
        rx.set_capacity(3);
        rx.set_interval(8);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(tx.send(out(0, false)).unwrap(), Sent::Queued);
        assert_eq!(id(poll_ready(&mut rx, &mut cx)), 0);
        assert!(!rx.take_resume(), "nothing was full");
        assert!(rx.poll_recv(&mut cx).is_pending());
        let wakes = count.0.load(Ordering::SeqCst);
        assert_eq!(tx.send(out(1, false)).unwrap(), Sent::Queued);
        assert_eq!(tx.send(out(2, false)).unwrap(), Sent::Queued);
        assert_eq!(tx.send(out(3, false)).unwrap(), Sent::Full);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            wakes + 1,
            "a full queue wakes the receiver before its interval"
        );
        // Sends still succeed (the engine never blocks); the queue is taken whole.
        assert_eq!(tx.send(out(4, false)).unwrap(), Sent::Full);
        assert_eq!(id(poll_ready(&mut rx, &mut cx)), 1);
        assert!(
            rx.take_resume(),
            "taking the full queue lifts the pause once"
        );
        assert!(!rx.take_resume());
        assert_eq!(tx.send(out(5, false)).unwrap(), Sent::Queued);
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv().flatten())
            .map(|e| id(Some(e)))
            .collect();
        assert_eq!(got, [2, 3, 4, 5]);
        assert!(!rx.take_resume());
    }
}
