//! Spare file descriptors, kept open so that an upgrade can start at the fd
//! limit (`EMFILE`).
//!
//! An upgrade needs a few new fds at once: the handoff channel (2), a copy
//! of each listener and of the channel's far end to move into place (n+1,
//! all numbered at or above 3+n+1), the new process's pidfd (1) and the
//! barrier pipe (2). A busy server at its `RLIMIT_NOFILE` has none free,
//! and its accept loop takes every one that frees up. So `ready()` opens
//! that many spares (on `/dev/null`, numbered at or above 3+n+1 so that
//! the copies fit in their slots), and the upgrade closes them right before
//! the step that needs the slots, with no `await` in between, then opens
//! them again after a failed upgrade (nginx and HAProxy keep a spare fd
//! for `accept` the same way). Another thread of the application that
//! retries at once at `EMFILE` can still take a slot between its closing
//! and its use (the upgrade runs on the crate's own thread): that upgrade
//! then fails with "Too many open files" (see docs/design.md).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// New fds an upgrade needs besides one per listener.
pub(crate) const FIXED: usize = 6;

/// The spare fds of this process.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    fds: Mutex<Vec<OwnedFd>>,
    want: AtomicUsize,
    /// The lowest fd number a spare may have.
    min: AtomicUsize,
}

impl Spares {
    /// Keeps `n` spares numbered at or above `min` from now on, and opens
    /// them (as many as the fd limit allows now; the rest at the next
    /// [`refill`](Self::refill)).
    pub(crate) fn keep(&self, n: usize, min: usize) {
        self.want.store(n, Ordering::Relaxed);
        self.min.store(min, Ordering::Relaxed);
        self.refill();
    }

    /// Opens spares until there are as many as wanted, or none can be
    /// opened.
    pub(crate) fn refill(&self) {
        let want = self.want.load(Ordering::Relaxed);
        let min = i32::try_from(self.min.load(Ordering::Relaxed)).unwrap_or(0);
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        while fds.len() < want {
            match open_at_or_above(min) {
                Ok(fd) => fds.push(fd),
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

/// `/dev/null`, open at an fd number at or above `min`.
fn open_at_or_above(min: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let f: OwnedFd = std::fs::File::open("/dev/null")?.into();
    if f.as_raw_fd() >= min {
        return Ok(f);
    }
    let fd = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    Ok(crate::sys::own(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_takes_and_refills() {
        use std::os::fd::AsRawFd;
        let s = Spares::default();
        s.keep(3, 100);
        let two = s.take(2);
        assert_eq!(two.len(), 2);
        assert!(two.iter().all(|f| f.as_raw_fd() >= 100), "{two:?}");
        assert_eq!(s.take(5).len(), 1);
        assert!(s.take(1).is_empty());
        s.refill();
        assert_eq!(s.take(10).len(), 3);
    }
}
