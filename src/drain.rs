//! The drain signal and the count of in-flight work.
//!
//! A [`Drain`] is a cheap, clonable handle. Accept loops wait on
//! [`Drain::draining`] to stop accepting; every connection or request holds a
//! [`DrainGuard`] while it runs. The process exits as soon as the count of
//! guards reaches zero after the drain started, or when the drain timeout
//! expires, whichever comes first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

#[derive(Debug)]
struct Shared {
    started: watch::Sender<Option<DrainReason>>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// A handle on the drain signal and the in-flight counter.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use handover::drain::{Drain, DrainReason};
///
/// let drain = Drain::new();
/// let guard = drain.guard(); // one connection in flight
/// drain.start(DrainReason::Stopped);
/// assert!(drain.is_draining());
/// drop(guard);
/// drain.idle().await; // resolves at once: nothing is in flight
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain that has not started, with nothing in flight.
    pub fn new() -> Self {
        let (started, _) = watch::channel(None);
        Drain {
            shared: Arc::new(Shared {
                started,
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Starts the drain. The first reason given wins; later calls do nothing.
    /// Returns `true` if this call started it.
    pub fn start(&self, reason: DrainReason) -> bool {
        self.shared.started.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        })
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.started.borrow().is_some()
    }

    /// Why the drain started, if it has.
    pub fn reason(&self) -> Option<DrainReason> {
        *self.shared.started.borrow()
    }

    /// Resolves once the drain has started. Cancel-safe: use it in `select!`
    /// next to `accept()`.
    pub async fn draining(&self) -> DrainReason {
        let mut rx = self.shared.started.subscribe();
        let r = rx.wait_for(Option::is_some).await;
        // The sender lives in `self`, so the channel cannot close here.
        r.map(|r| r.expect("checked by wait_for"))
            .unwrap_or(DrainReason::Stopped)
    }

    /// Counts one unit of in-flight work until the guard is dropped.
    pub fn guard(&self) -> DrainGuard {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        DrainGuard {
            shared: self.shared.clone(),
        }
    }

    /// How many guards are alive.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when no guard is alive.
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits for the drain to start, then for the in-flight count to reach
    /// zero, at most `timeout` after the start. Returns how many guards were
    /// still alive when it gave up (0 when everything finished).
    pub async fn finished(&self, timeout: Duration) -> usize {
        self.draining().await;
        match tokio::time::timeout(timeout, self.idle()).await {
            Ok(()) => 0,
            Err(_) => self.in_flight(),
        }
    }
}

/// One unit of in-flight work; see [`Drain::guard`].
#[derive(Debug)]
#[must_use = "the work counts as in flight only while the guard is alive"]
pub struct DrainGuard {
    shared: Arc<Shared>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finishes_when_the_last_guard_drops() {
        let drain = Drain::new();
        let g1 = drain.guard();
        let g2 = drain.guard();
        assert_eq!(drain.in_flight(), 2);
        let waiter = tokio::spawn({
            let d = drain.clone();
            async move { d.finished(Duration::from_secs(10)).await }
        });
        assert!(drain.start(DrainReason::Upgraded));
        assert!(!drain.start(DrainReason::Stopped), "first reason wins");
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g2);
        assert_eq!(waiter.await.unwrap(), 0);
        assert_eq!(drain.reason(), Some(DrainReason::Upgraded));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_timeout() {
        let drain = Drain::new();
        let _g = drain.guard();
        drain.start(DrainReason::Stopped);
        assert_eq!(drain.finished(Duration::from_secs(30)).await, 1);
    }
}
