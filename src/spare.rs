//! Spare file descriptors, kept open so that an upgrade can start at the fd
//! limit (`EMFILE`).
//!
//! An upgrade needs a few new fds at once: the handoff channel (2), a copy
//! of each listener to move into place (n), the new process's pidfd (1) and
//! the barrier pipe (2). A busy server at its `RLIMIT_NOFILE` has none free,
//! and its accept loop takes every one that frees up. So `ready()` opens
//! that many spares (on `/dev/null`), and the upgrade closes them right
//! before the step that needs the slots, with no `await` in between, then
//! opens them again afterwards (nginx and HAProxy keep a spare fd for
//! `accept` the same way).

use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// New fds an upgrade needs besides one per listener.
pub(crate) const FIXED: usize = 5;

/// The spare fds of this process.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    fds: Mutex<Vec<OwnedFd>>,
    want: std::sync::atomic::AtomicUsize,
}

impl Spares {
    /// Keeps `n` spares from now on, and opens them (as many as the fd
    /// limit allows now; the rest at the next [`refill`](Self::refill)).
    pub(crate) fn keep(&self, n: usize) {
        self.want.store(n, std::sync::atomic::Ordering::Relaxed);
        self.refill();
    }

    /// Opens spares until there are as many as wanted, or none can be
    /// opened.
    pub(crate) fn refill(&self) {
        let want = self.want.load(std::sync::atomic::Ordering::Relaxed);
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        while fds.len() < want {
            match std::fs::File::open("/dev/null") {
                Ok(f) => fds.push(f.into()),
                Err(e) => {
                    tracing::debug!(error = %e, held = fds.len(), want, "cannot open a spare fd");
                    break;
                }
            }
        }
    }

    /// Takes up to `n` spares out, for the caller to close right before it
    /// needs the slots.
    pub(crate) fn take(&self, n: usize) -> Vec<OwnedFd> {
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        let at = fds.len().saturating_sub(n);
        fds.split_off(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_takes_and_refills() {
        let s = Spares::default();
        s.keep(3);
        assert_eq!(s.take(2).len(), 2);
        assert_eq!(s.take(5).len(), 1);
        assert!(s.take(1).is_empty());
        s.refill();
        assert_eq!(s.take(10).len(), 3);
    }
}
