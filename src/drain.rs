//! The drain: a signal to stop taking new work, and the count of work in
//! flight.
//!
//! Two types, as hyper-util's `GracefulShutdown` and its watchers: a
//! [`DrainTrigger`] starts the drain and is kept by whoever decides (the
//! [`Handover`](crate::Handover) keeps its own, so that only its
//! [`stop`](crate::Handover::stop) and its upgrade start one); [`Drain`]s,
//! handed out by [`DrainTrigger::watcher`] or
//! [`Handover::drain`](crate::Handover::drain), watch it. Accept loops wait
//! on [`Drain::draining`] to stop accepting; every connection or request
//! holds a [`DrainGuard`] while it runs. The process exits as soon as the
//! count of guards reaches zero after the drain started, or when the drain
//! timeout expires, whichever comes first.
//!
//! Work that lasts as long as the client wants (an upgraded connection such
//! as a WebSocket, a streaming response such as server-sent events) does not
//! end by itself when the drain starts: its code must end it. Such work
//! marks its guard [long-lived](DrainGuard::set_long_lived), watches a
//! [`DrainSignal`] and ends when it fires; [`Drain::outcome`] then tells how
//! many long-lived guards ended during the drain and how many were still
//! alive, and so cut, at the drain timeout.
//!
//! A drain [`Handover`](crate::Handover) starts after handing over to a new
//! process run by hand (no service manager) can be *taken back*: if the new
//! process dies while this one drains, this one serves again. So an accept
//! loop that stopped accepting keeps its listener until
//! [`Drain::resumed`] says whether to accept again or to drop it:
//!
//! ```no_run
//! # async fn f(listener: tokio::net::TcpListener, drain: handover::Drain) {
//! loop {
//!     while let Some((accepted, guard)) = drain.accept(listener.accept()).await {
//!         /* serve it, holding `guard` */
//!     }
//!     if !drain.resumed().await {
//!         break; // final: drop the listener
//!     }
//! }
//! # }
//! ```
//!
//! A drain started with [`DrainTrigger::start`] (a stop, or any drain of
//! your own) is final at once.
//!
//! Why not tokio-util's `CancellationToken` and `TaskTracker`: a cancelled
//! token stays cancelled, while a drain can be taken back (and the watchers
//! that hold the old token would never learn it), and it carries no reason;
//! `TaskTracker` needs tokio-util's `rt` feature, which pulls `futures-util`
//! and its macros into every build for what is here one counter and a
//! `Notify`, read under the same lock as the long-lived count so that
//! [`Drain::outcome`] is a consistent snapshot.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Why a drain started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// A new process took over the listeners; this one finishes its work.
    Upgraded,
    /// The process was asked to stop (SIGTERM, SIGINT, `systemctl stop`, or
    /// [`Handover::stop`](crate::Handover::stop)).
    Stopped,
}

/// Where the drain is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    /// Why it started; `None` while serving (before it, or after it was
    /// taken back).
    reason: Option<DrainReason>,
    /// It can no longer be taken back: listeners may go.
    settled: bool,
    /// A new process not yet told it is main: [`Drain::accept`] waits
    /// (its parent accepts for both until then).
    held: bool,
}

#[derive(Debug)]
struct Shared {
    state: watch::Sender<State>,
    in_flight: AtomicUsize,
    idle: Notify,
    long_lived: Mutex<LongLived>,
}

/// The long-lived part of the in-flight count. A long-lived guard updates it
/// and `in_flight` under this lock, so [`Drain::outcome`] reads a
/// consistent snapshot.
#[derive(Debug, Default)]
struct LongLived {
    /// Long-lived guards alive now.
    open: usize,
    /// Long-lived guards dropped after the drain started.
    closed_while_draining: usize,
}

impl Shared {
    fn long_lived(&self) -> std::sync::MutexGuard<'_, LongLived> {
        self.long_lived
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves with what `done` makes of the state once it says `Some`
/// (`None` if the channel closed, which it cannot while `shared` lives).
///
/// The state itself is read at every poll, not only after the watch's
/// wake-up: the watch wakes its receivers shard by shard from the thread
/// that changed the state, so one receiver's wake-up can come milliseconds
/// after the change, while tasks woken before it run. An accept loop that
/// trusted its wake-up alone accepted connections during that time, from
/// clients that had already been told "going away" by this very process.
/// So whatever [`Drain::is_draining`] says, a future waiting here has seen
/// it too when it is next polled.
async fn until<R>(shared: &Shared, done: impl Fn(&State) -> Option<R>) -> Option<R> {
    let mut rx = shared.state.subscribe();
    let mut changed = pin!(rx.wait_for(|s| done(s).is_some()));
    poll_fn(|cx| {
        if let Some(r) = done(&shared.state.borrow()) {
            return Poll::Ready(Some(r));
        }
        match changed.as_mut().poll(cx) {
            Poll::Ready(Ok(s)) => Poll::Ready(done(&s)),
            Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Starts the drain its [`Drain`]s watch. Not `Clone`: whoever holds it
/// decides when the work stops (a [`Handover`](crate::Handover) keeps its
/// own and hands out watchers only).
///
/// Dropping it starts nothing: the watchers then wait for ever.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use handover::drain::{DrainReason, DrainTrigger};
///
/// let trigger = DrainTrigger::new();
/// let drain = trigger.watcher(); // for an accept loop
/// let guard = drain.guard(); // one connection in flight
/// trigger.start(DrainReason::Stopped);
/// assert!(drain.is_draining());
/// drop(guard);
/// drain.idle().await; // resolves at once: nothing is in flight
/// # }
/// ```
#[derive(Debug)]
pub struct DrainTrigger {
    shared: Arc<Shared>,
}

impl Default for DrainTrigger {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainTrigger {
    /// A drain that has not started, with nothing in flight.
    pub fn new() -> Self {
        Self::with(State::default())
    }

    /// The drain of a new process, held until [`release`](Self::release)
    /// (it is main): its [`Drain::accept`]s wait, while its parent accepts
    /// for both.
    pub(crate) fn held() -> Self {
        Self::with(State {
            held: true,
            ..State::default()
        })
    }

    fn with(state: State) -> Self {
        let (state, _) = watch::channel(state);
        DrainTrigger {
            shared: Arc::new(Shared {
                state,
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
                long_lived: Mutex::new(LongLived::default()),
            }),
        }
    }

    /// A watcher of this drain, to hand to accept loops and connections.
    pub fn watcher(&self) -> Drain {
        Drain {
            shared: self.shared.clone(),
        }
    }

    /// Starts the drain, final at once: accept loops drop their listeners.
    /// The first reason wins; a later call only makes a drain that could
    /// still be taken back final. Returns `true` if this call started it.
    pub fn start(&self, reason: DrainReason) -> bool {
        let mut started = false;
        self.shared.state.send_if_modified(|s| match s.reason {
            None => {
                *s = State {
                    reason: Some(reason),
                    settled: true,
                    ..*s
                };
                started = true;
                true
            }
            Some(_) if !s.settled => {
                s.settled = true;
                true
            }
            Some(_) => false,
        });
        started
    }

    /// Starts a drain that [`take_back`](Self::take_back) can still undo,
    /// until [`settle`](Self::settle) or [`start`](Self::start) makes it
    /// final. Returns `true` if this call started it.
    pub(crate) fn start_revocable(&self, reason: DrainReason) -> bool {
        self.shared.state.send_if_modified(|s| {
            let start = s.reason.is_none();
            if start {
                *s = State {
                    reason: Some(reason),
                    settled: false,
                    ..*s
                };
            }
            start
        })
    }

    /// The process is main: [`Drain::accept`]s go ahead.
    pub(crate) fn release(&self) {
        self.shared
            .state
            .send_if_modified(|s| std::mem::take(&mut s.held));
    }

    /// Undoes a drain that is not final: serving again. Returns whether it
    /// did.
    pub(crate) fn take_back(&self) -> bool {
        let undone = self.shared.state.send_if_modified(|s| {
            let undo = s.reason.is_some() && !s.settled;
            if undo {
                *s = State::default();
            }
            undo
        });
        if undone {
            // The next drain's outcome counts from its own start.
            self.shared.long_lived().closed_while_draining = 0;
        }
        undone
    }

    /// Makes a started drain final. Returns `false` when no drain is
    /// running (none started, or it was taken back).
    pub(crate) fn settle(&self) -> bool {
        let mut draining = false;
        self.shared.state.send_if_modified(|s| {
            draining = s.reason.is_some();
            let settle = draining && !s.settled;
            if settle {
                s.settled = true;
            }
            settle
        });
        draining
    }

    /// Resolves when a started drain was taken back.
    pub(crate) async fn taken_back(&self) {
        until(&self.shared, |s| s.reason.is_none().then_some(())).await;
    }
}

/// A watcher of the drain and a handle on the in-flight counter: what
/// accept loops and connections hold. Cheap to clone; it cannot start a
/// drain (only its [`DrainTrigger`] can).
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use handover::drain::{Drain, DrainReason, DrainTrigger};
///
/// async fn connection(drain: Drain) {
///     let _guard = drain.guard(); // counts until the connection ends
///     drain.draining().await; // say goodbye to the client, then end
/// }
///
/// let trigger = DrainTrigger::new();
/// let task = tokio::spawn(connection(trigger.watcher()));
/// trigger.start(DrainReason::Stopped);
/// let unfinished = trigger.watcher().finished(std::time::Duration::from_secs(5)).await;
/// assert_eq!(unfinished, 0);
/// # task.await.unwrap();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

impl Drain {
    /// Whether the drain has started (and was not taken back).
    pub fn is_draining(&self) -> bool {
        self.shared.state.borrow().reason.is_some()
    }

    /// Why the drain started, if it has.
    pub fn reason(&self) -> Option<DrainReason> {
        self.shared.state.borrow().reason
    }

    /// Resolves once the drain has started (at once if it has), with its
    /// reason. The future owns what it needs (`'static`), so it can be moved
    /// into a task or a stream combinator such as `take_until`.
    ///
    /// It agrees with [`is_draining`](Self::is_draining) at every poll:
    /// once the drain has started, the next poll resolves, even if the
    /// task was polled for another reason (a connection to accept) before
    /// the drain's own wake-up reached it. So a loop that polls it first
    /// (`select!` with `biased;`) accepts nothing once the drain started.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: use it in `select!` next to `accept()`. A drain that
    /// started while no future waited is seen by the next one.
    pub fn draining(&self) -> impl Future<Output = DrainReason> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            until(&shared, |s| s.reason)
                .await
                .unwrap_or(DrainReason::Stopped)
        }
    }

    /// After the drain started: resolves with `true` when it was taken back
    /// (the process serves again: accept again) or `false` when it is final
    /// (drop the listener). `true` at once when no drain runs.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches; the next call sees the same state.
    pub async fn resumed(&self) -> bool {
        until(&self.shared, |s| {
            (s.reason.is_none() || s.settled).then_some(s.reason.is_none())
        })
        .await
        .unwrap_or(false)
    }

    /// Runs `accept` (a cancel-safe future that takes a connection, such
    /// as `listener.accept()`) counted in the drain: `Some` with what it
    /// returned and the guard for the connection, `None` once the drain
    /// has started (nothing is accepted then).
    ///
    /// In a new process (one an upgrade started) it first waits until its
    /// [`ready`](crate::Handover::ready) has been told it is main: until
    /// then the old process accepts for both, so a new process killed
    /// before it took over (not ready in time, an upgrade stopped midway)
    /// cuts no connection. A drain that starts meanwhile (a stop) ends the
    /// wait with `None`.
    ///
    /// An accept loop of your own should accept this way instead of taking
    /// a [`guard`](Self::guard) after the accept: on a multi-threaded
    /// runtime the drain could otherwise end (nothing counted) between the
    /// accept on one thread and the guard, and the process exit with the
    /// new connection's request unread, which the kernel answers with a
    /// reset. Each poll takes a guard, then looks at the drain: a drain
    /// started before is seen (`None`), one started after waits for the
    /// guard, which goes with the connection or is dropped while there is
    /// none.
    ///
    /// ```no_run
    /// # async fn f(listener: tokio::net::TcpListener, drain: handover::Drain) {
    /// while let Some((accepted, guard)) = drain.accept(listener.accept()).await {
    ///     let Ok((stream, _peer)) = accepted else { continue };
    ///     tokio::spawn(async move {
    ///         // ... serve `stream` ...
    ///         drop(guard); // the connection is done
    ///     });
    /// }
    /// // draining: stop accepting (see `resumed` for the listener)
    /// # }
    /// ```
    ///
    /// `accept` is counted only while it is polled, and is dropped when
    /// the drain is seen, so it must hand over a connection in the poll
    /// that takes it, as tokio's `accept` does (which is what makes it
    /// cancel-safe). A future that takes a connection and then awaits more
    /// (a TLS handshake, a first read) holds it uncounted between polls,
    /// and is dropped with it when the drain starts: do that work after,
    /// holding the guard.
    ///
    /// # Cancel safety
    ///
    /// As cancel-safe as `accept`: dropping the future drops `accept` and
    /// holds no guard. tokio's `accept` is cancel-safe.
    pub async fn accept<F: Future>(&self, accept: F) -> Option<(F::Output, DrainGuard)> {
        if self.shared.state.borrow().held {
            until(&self.shared, |s| {
                (!s.held || s.reason.is_some()).then_some(())
            })
            .await;
        }
        let mut accept = pin!(accept);
        poll_fn(|cx| {
            let guard = self.guard();
            // Pairs with the fence in `idle`: of a drain started and then
            // counting its guards, and this guard taken and then this look
            // at the drain, one of the two sees the other.
            fence(Ordering::SeqCst);
            if self.is_draining() {
                return Poll::Ready(None);
            }
            match accept.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some((r, guard))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Counts one unit of in-flight work until the guard is dropped.
    pub fn guard(&self) -> DrainGuard {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        DrainGuard {
            shared: self.shared.clone(),
            long_lived: AtomicBool::new(false),
        }
    }

    /// A [`DrainSignal`]: what application code watches to end long-lived
    /// work when the drain starts. It cannot start the drain.
    pub fn signal(&self) -> DrainSignal {
        DrainSignal {
            shared: self.shared.clone(),
        }
    }

    /// How many alive guards are [long-lived](DrainGuard::set_long_lived).
    pub fn long_lived(&self) -> usize {
        self.shared.long_lived().open
    }

    /// How many guards are alive.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when no guard is alive (at once if none is), whether or not
    /// the drain started.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches.
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Pairs with the fence in `accept`: a guard taken before a
            // drain it did not see is counted here.
            fence(Ordering::SeqCst);
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits for the drain to start, then for the in-flight count to reach
    /// zero, at most `timeout` after the start. Returns how many guards were
    /// still alive when it gave up (0 when everything finished).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, but the timeout counts from this call's own view of the
    /// start: a new call after a cancelled one waits up to `timeout` again.
    pub async fn finished(&self, timeout: Duration) -> usize {
        self.outcome(timeout).await.unfinished
    }

    /// Like [`finished`](Self::finished), and also tells what became of the
    /// [long-lived](DrainGuard::set_long_lived) work: how much ended during
    /// the drain and how much was still running at the timeout (work that
    /// exiting now cuts).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use handover::drain::{DrainReason, DrainTrigger};
    ///
    /// let trigger = DrainTrigger::new();
    /// let drain = trigger.watcher();
    /// let websocket = drain.guard();
    /// websocket.set_long_lived();
    /// let stubborn = drain.guard();
    /// stubborn.set_long_lived();
    /// trigger.start(DrainReason::Upgraded);
    /// drop(websocket); // closed on the drain signal
    /// let outcome = drain.outcome(Duration::from_millis(10)).await;
    /// assert_eq!(outcome.unfinished, 1);
    /// assert_eq!((outcome.long_lived_closed, outcome.long_lived_cut), (1, 1));
    /// # drop(stubborn);
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// As [`finished`](Self::finished).
    pub async fn outcome(&self, timeout: Duration) -> DrainOutcome {
        self.draining().await;
        let _ = tokio::time::timeout(timeout, self.idle()).await;
        let long_lived = self.shared.long_lived();
        DrainOutcome {
            unfinished: self.in_flight(),
            long_lived_closed: long_lived.closed_while_draining,
            long_lived_cut: long_lived.open,
        }
    }
}

/// What a drain left behind; see [`Drain::outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainOutcome {
    /// Guards still alive when the drain timeout expired (0 when everything
    /// finished).
    pub unfinished: usize,
    /// [Long-lived](DrainGuard::set_long_lived) guards dropped after the
    /// drain started and before its timeout: connections and streams that
    /// ended in time (closed by the application on the drain signal, or by
    /// their client).
    pub long_lived_closed: usize,
    /// Long-lived guards still alive at the drain timeout: connections and
    /// streams that exiting now cuts. Part of `unfinished`.
    pub long_lived_cut: usize,
}

/// The drain signal as application code sees it: whether and why the drain
/// started, and a future that resolves when it does. Cheap to clone; it
/// holds no place in the drain (dropping or keeping it changes nothing) and
/// cannot start one. See [`Drain::signal`].
///
/// The [`http`](crate::http) server puts one in every request's extensions,
/// so a handler that starts long-lived work (a WebSocket, a stream of
/// server-sent events) has it before the work starts.
///
/// # Example
///
/// End a stream of events when the drain starts:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use handover::drain::{DrainReason, DrainTrigger};
///
/// let trigger = DrainTrigger::new();
/// let signal = trigger.watcher().signal();
/// let ticks = async move {
///     let mut sent = 0;
///     let draining = signal.draining();
///     tokio::pin!(draining);
///     loop {
///         tokio::select! {
///             _ = &mut draining => return sent, // tell the client, then end
///             _ = tokio::time::sleep(std::time::Duration::from_millis(1)) => sent += 1,
///         }
///     }
/// };
/// let task = tokio::spawn(ticks);
/// trigger.start(DrainReason::Upgraded);
/// task.await.unwrap();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DrainSignal {
    shared: Arc<Shared>,
}

impl DrainSignal {
    /// Whether the drain has started (and was not taken back).
    pub fn is_draining(&self) -> bool {
        self.shared.state.borrow().reason.is_some()
    }

    /// Why the drain started, if it has.
    pub fn reason(&self) -> Option<DrainReason> {
        self.shared.state.borrow().reason
    }

    /// Resolves once the drain has started (at once if it has); see
    /// [`Drain::draining`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub fn draining(&self) -> impl Future<Output = DrainReason> + Send + 'static {
        Drain {
            shared: self.shared.clone(),
        }
        .draining()
    }
}

/// One unit of in-flight work; see [`Drain::guard`].
#[derive(Debug)]
#[must_use = "the work counts as in flight only while the guard is alive"]
pub struct DrainGuard {
    shared: Arc<Shared>,
    long_lived: AtomicBool,
}

impl DrainGuard {
    /// Counts this work as long-lived from now on: an upgraded connection
    /// (WebSocket) or a streaming response, work that ends when its code
    /// ends it rather than when a request is answered. It still counts in
    /// [`Drain::in_flight`] as before; [`Drain::outcome`] also reports it as
    /// closed in time or cut. The [`http`](crate::http) server marks its
    /// connections itself. Calling it again does nothing.
    pub fn set_long_lived(&self) {
        if !self.long_lived.swap(true, Ordering::AcqRel) {
            self.shared.long_lived().open += 1;
        }
    }

    /// Whether [`set_long_lived`](Self::set_long_lived) was called.
    pub fn is_long_lived(&self) -> bool {
        self.long_lived.load(Ordering::Acquire)
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        let last = if *self.long_lived.get_mut() {
            let mut long_lived = self.shared.long_lived();
            long_lived.open -= 1;
            if self.shared.state.borrow().reason.is_some() {
                long_lived.closed_while_draining += 1;
            }
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
        } else {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
        };
        if last {
            self.shared.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `accept` hands over its result with a guard already counted, and
    /// accepts nothing once draining (its future is not even polled).
    #[tokio::test]
    async fn accept_counts_the_connection_and_stops_once_draining() {
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let (got, guard) = drain.accept(async { 7 }).await.unwrap();
        assert_eq!((got, drain.in_flight()), (7, 1));
        drop(guard);
        assert_eq!(drain.in_flight(), 0);
        trigger.start(DrainReason::Upgraded);
        let polled = AtomicBool::new(false);
        let after = drain
            .accept(async {
                polled.store(true, Ordering::SeqCst);
            })
            .await;
        assert!(after.is_none());
        assert!(
            !polled.load(Ordering::SeqCst),
            "nothing accepted once draining"
        );
        assert_eq!(drain.in_flight(), 0, "no guard left behind");
    }

    /// `accept` counts its future only while polling it: a future that
    /// took something and hands it over in a later poll (a handshake after
    /// the accept) is not counted in between, and is dropped, with what it
    /// took, once the drain starts. Hence the rule in `accept`'s docs that
    /// the future hand over a connection in the poll that takes it.
    #[tokio::test]
    async fn accept_counts_its_future_only_while_polling_it() {
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let taken = Arc::new(());
        let held = taken.clone();
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut accept = pin!(drain.accept(async move {
            let _connection = held;
            let _ = rx.await; // the rest of a handshake
        }));
        let pending = poll_fn(|cx| Poll::Ready(accept.as_mut().poll(cx).is_pending())).await;
        assert!(pending);
        assert_eq!(
            Arc::strong_count(&taken),
            2,
            "the future holds what it took"
        );
        assert_eq!(drain.in_flight(), 0, "not counted between polls");
        trigger.start(DrainReason::Upgraded);
        assert!(accept.await.is_none());
        assert_eq!(Arc::strong_count(&taken), 1, "dropped with the future");
        assert_eq!(drain.in_flight(), 0);
    }

    /// Polls `f` once: whether it is pending.
    async fn pending_once<F: Future>(mut f: std::pin::Pin<&mut F>) -> bool {
        poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }

    /// A new process's drain is held: `accept` polls nothing until the
    /// process is main, and a stop meanwhile ends it with `None`.
    #[tokio::test]
    async fn a_held_drain_accepts_only_once_released() {
        let polled = Arc::new(AtomicUsize::new(0));
        let counting = |polled: &Arc<AtomicUsize>| {
            let polled = polled.clone();
            poll_fn(move |_| {
                polled.fetch_add(1, Ordering::SeqCst);
                Poll::Ready("a connection")
            })
        };

        let trigger = DrainTrigger::held();
        let drain = trigger.watcher();
        let mut accept = pin!(drain.accept(counting(&polled)));
        assert!(pending_once(accept.as_mut()).await, "held");
        assert_eq!(polled.load(Ordering::SeqCst), 0, "not polled while held");
        trigger.release();
        let (conn, guard) = accept.await.expect("released");
        assert_eq!((conn, drain.in_flight()), ("a connection", 1));
        drop(guard);

        let stopped = DrainTrigger::held();
        let drain = stopped.watcher();
        let mut accept = pin!(drain.accept(counting(&polled)));
        assert!(pending_once(accept.as_mut()).await, "held");
        stopped.start(DrainReason::Stopped);
        assert!(accept.await.is_none(), "a stop ends the wait");
        assert_eq!(polled.load(Ordering::SeqCst), 1, "only the released one");

        let first = DrainTrigger::new().watcher();
        assert!(first.accept(counting(&polled)).await.is_some(), "not held");
    }

    #[tokio::test]
    async fn finishes_when_the_last_guard_drops() {
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let g1 = drain.guard();
        let g2 = drain.guard();
        assert_eq!(drain.in_flight(), 2);
        let waiter = tokio::spawn({
            let d = drain.clone();
            async move { d.finished(Duration::from_secs(10)).await }
        });
        assert!(trigger.start(DrainReason::Upgraded));
        assert!(!trigger.start(DrainReason::Stopped), "first reason wins");
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g2);
        assert_eq!(waiter.await.unwrap(), 0);
        assert_eq!(drain.reason(), Some(DrainReason::Upgraded));
    }

    /// Long-lived guards are counted apart: closed before the drain (not
    /// reported), closed during it, still open at the timeout.
    #[tokio::test(start_paused = true)]
    async fn outcome_counts_long_lived_work() {
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let signal = drain.signal();
        let before = drain.guard();
        before.set_long_lived();
        before.set_long_lived(); // twice counts once
        let during = drain.guard();
        during.set_long_lived();
        let cut = drain.guard();
        cut.set_long_lived();
        let _short = drain.guard();
        assert_eq!((drain.in_flight(), drain.long_lived()), (4, 3));
        drop(before);
        assert!(!signal.is_draining());
        let watcher = tokio::spawn(signal.draining());
        trigger.start(DrainReason::Upgraded);
        assert_eq!(watcher.await.unwrap(), DrainReason::Upgraded);
        assert_eq!(signal.reason(), Some(DrainReason::Upgraded));
        drop(during);
        let outcome = drain.outcome(Duration::from_secs(30)).await;
        assert_eq!(
            outcome,
            DrainOutcome {
                unfinished: 2,
                long_lived_closed: 1,
                long_lived_cut: 1,
            }
        );
        assert!(cut.is_long_lived());
    }

    #[tokio::test]
    async fn a_revocable_drain_is_taken_back_or_settled() {
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        assert!(drain.resumed().await, "nothing to resume from");
        assert!(trigger.start_revocable(DrainReason::Upgraded));
        assert!(drain.is_draining());
        let accept_loop = tokio::spawn({
            let d = drain.clone();
            async move { d.resumed().await }
        });
        tokio::task::yield_now().await;
        assert!(!accept_loop.is_finished(), "neither taken back nor final");
        assert!(trigger.take_back());
        assert!(accept_loop.await.unwrap(), "taken back: accept again");
        assert!(!drain.is_draining() && drain.reason().is_none());
        assert!(!trigger.settle(), "nothing to settle");

        assert!(trigger.start_revocable(DrainReason::Upgraded));
        assert!(!trigger.start(DrainReason::Stopped), "first reason wins");
        assert_eq!(drain.reason(), Some(DrainReason::Upgraded));
        assert!(!trigger.take_back(), "a stop made it final");
        assert!(!drain.resumed().await, "final: drop the listener");
        assert!(trigger.settle());

        let plain = DrainTrigger::new();
        plain.start(DrainReason::Stopped);
        assert!(!plain.take_back(), "a plain start is final");
        assert!(!plain.watcher().resumed().await);
    }

    /// Once the state says draining, every `draining()` future resolves
    /// when polled, even before the watch's own wake-up reached it. The
    /// watch wakes its receivers shard by shard, from the thread that
    /// started the drain; a task woken early (a connection that says
    /// "going away", whose client reconnects at once) runs while later
    /// receivers (the accept loop) are not woken yet. Here each early wake
    /// polls every other `draining()` future at that very moment.
    #[test]
    fn draining_resolves_once_the_state_says_so_even_before_its_wake() {
        use std::sync::atomic::AtomicUsize;
        use std::task::{Context, Poll, Wake, Waker};

        type Watching = Vec<Option<std::pin::Pin<Box<dyn Future<Output = DrainReason> + Send>>>>;
        struct Probe {
            drain: Drain,
            watching: Arc<Mutex<Watching>>,
            behind: Arc<AtomicUsize>,
        }
        impl Wake for Probe {
            fn wake(self: Arc<Self>) {
                assert!(self.drain.is_draining());
                let waker = Waker::noop();
                let mut cx = Context::from_waker(waker);
                let mut watching = self.watching.lock().unwrap();
                for slot in watching.iter_mut() {
                    match slot.as_mut().map(|f| f.as_mut().poll(&mut cx)) {
                        Some(Poll::Pending) => {
                            self.behind.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Poll::Ready(_)) => *slot = None,
                        None => {}
                    }
                }
            }
        }

        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let watching: Arc<Mutex<Watching>> = Arc::default();
        let behind = Arc::new(AtomicUsize::new(0));
        let mut probes = Vec::new();
        for _ in 0..32 {
            let mut f: std::pin::Pin<Box<dyn Future<Output = DrainReason> + Send>> =
                Box::pin(drain.draining());
            let waker = Waker::from(Arc::new(Probe {
                drain: drain.clone(),
                watching: watching.clone(),
                behind: behind.clone(),
            }));
            assert!(f
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            probes.push(f);
        }
        {
            let mut w = watching.lock().unwrap();
            for _ in 0..32 {
                let mut f: std::pin::Pin<Box<dyn Future<Output = DrainReason> + Send>> =
                    Box::pin(drain.draining());
                assert!(f
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                    .is_pending());
                w.push(Some(f));
            }
        }
        trigger.start(DrainReason::Upgraded);
        assert_eq!(
            behind.load(Ordering::Relaxed),
            0,
            "draining() futures pending while the drain had started"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_timeout() {
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let _g = drain.guard();
        trigger.start(DrainReason::Stopped);
        assert_eq!(drain.finished(Duration::from_secs(30)).await, 1);
    }
}
