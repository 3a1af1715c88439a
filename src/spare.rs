//! What an upgrade needs at the fd limit (`EMFILE`), made ahead of time.
//!
//! A busy server at its `RLIMIT_NOFILE` has no free fd slot, and any thread
//! of the application (an accept loop that retries at once on `EMFILE`)
//! takes each slot the moment it frees. So an upgrade never frees a slot
//! for a step to use: what it needs is made while slots exist (by
//! `ready()`, and again after an upgrade that failed) and kept in slots of
//! its own:
//!
//! | the upgrade needs | kept as | how it is used |
//! |---|---|---|
//! | the handoff channel (2 fds) | the socket pair itself | taken as it is |
//! | the barrier pipe (2) | the pipe itself | taken as it is |
//! | a copy of each listener and of the channel's far end, numbered at or above 3+n+1 (n+1) | `/dev/null` slots numbered that high | each copy put onto a slot with `dup3`, which replaces the slot's file in one step and needs no free slot |
//! | the new process's pidfd (1) | a `/dev/null` slot | closed right before the clone; if another thread took it first, the process is started without a pidfd (see `handoff`) |
//! | the PID file, when the old process takes the service back (1) | a `/dev/null` slot | closed right before the write |
//!
//! A pidfd cannot be made ahead (its process does not exist yet), and a
//! file cannot be opened onto a chosen number: those two steps alone free
//! a slot. Every other new fd an upgrade makes is made ahead.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// `/dev/null` slots an upgrade needs besides one per listener: the
/// channel's far end, the pidfd and the PID file.
pub(crate) const FIXED_SLOTS: usize = 3;

/// What one upgrade takes out of the [`Spares`].
#[derive(Debug, Default)]
pub(crate) struct Reserved {
    /// The handoff channel: our end, the new process's end.
    pub(crate) channel: Option<(UnixStream, UnixStream)>,
    /// Slots for the copies of the listeners and of the channel's far end.
    pub(crate) slots: Vec<OwnedFd>,
    /// A slot to close right before the clone, for the pidfd.
    pub(crate) for_pidfd: Option<OwnedFd>,
    /// The barrier pipe: read end, write end (close-on-exec, non-blocking).
    pub(crate) barrier: Option<(OwnedFd, OwnedFd)>,
}

#[derive(Debug, Default)]
struct Held {
    slots: Vec<OwnedFd>,
    channel: Option<(UnixStream, UnixStream)>,
    barrier: Option<(OwnedFd, OwnedFd)>,
}

/// The spares of this process.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    held: Mutex<Held>,
    want: AtomicUsize,
    /// The lowest fd number a slot may have.
    min: AtomicUsize,
}

impl Spares {
    /// Keeps `n` slots numbered at or above `min`, a channel and a barrier
    /// pipe from now on, and makes them (as many as the fd limit allows now;
    /// the rest at the next [`refill`](Self::refill)).
    pub(crate) fn keep(&self, n: usize, min: usize) {
        self.want.store(n, Ordering::Relaxed);
        self.min.store(min, Ordering::Relaxed);
        self.refill();
    }

    /// Makes what is missing, until all is there or nothing more can be
    /// made. A slot numbered below the minimum (the listeners grew) is
    /// replaced.
    pub(crate) fn refill(&self) {
        let want = self.want.load(Ordering::Relaxed);
        let min = i32::try_from(self.min.load(Ordering::Relaxed)).unwrap_or(0);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.slots.retain(|f| f.as_raw_fd() >= min);
        if held.channel.is_none() {
            match UnixStream::pair() {
                Ok(pair) => held.channel = Some(pair),
                Err(e) => tracing::debug!(error = %e, "cannot make a spare channel"),
            }
        }
        if held.barrier.is_none() {
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
                Ok(pipe) => held.barrier = Some(pipe),
                Err(e) => tracing::debug!(error = %e, "cannot make a spare barrier pipe"),
            }
        }
        while held.slots.len() < want {
            match open_at_or_above(min) {
                Ok(fd) => held.slots.push(fd),
                Err(e) => {
                    tracing::debug!(error = %e, held = held.slots.len(), want, "cannot open a spare fd");
                    break;
                }
            }
        }
    }

    /// Takes out what an upgrade handing over `listeners` listeners needs;
    /// the slot for the PID file stays.
    pub(crate) fn reserve(&self, listeners: usize) -> Reserved {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let at = held.slots.len().saturating_sub(listeners + 2);
        let mut slots = held.slots.split_off(at);
        let for_pidfd = slots.pop();
        Reserved {
            channel: held.channel.take(),
            slots,
            for_pidfd,
            barrier: held.barrier.take(),
        }
    }

    /// Takes up to `n` slots out, for the caller to close right before it
    /// needs the fds.
    pub(crate) fn take(&self, n: usize) -> Vec<OwnedFd> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let at = held.slots.len().saturating_sub(n);
        held.slots.split_off(at)
    }
}

/// `/dev/null`, open at an fd number at or above `min`.
fn open_at_or_above(min: i32) -> std::io::Result<OwnedFd> {
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
    fn keeps_reserves_takes_and_refills() {
        let s = Spares::default();
        // Two listeners: 2 + FIXED_SLOTS slots.
        s.keep(2 + FIXED_SLOTS, 100);
        let r = s.reserve(2);
        assert!(r.channel.is_some() && r.barrier.is_some());
        assert_eq!(r.slots.len(), 3, "two listeners and the channel's far end");
        assert!(r.for_pidfd.is_some());
        assert!(r.slots.iter().all(|f| f.as_raw_fd() >= 100), "{r:?}");
        // The PID file's slot stays.
        assert_eq!(s.take(5).len(), 1);
        assert!(s.take(1).is_empty());
        let again = s.reserve(2);
        assert!(again.channel.is_none() && again.barrier.is_none() && again.slots.is_empty());
        s.refill();
        let r = s.reserve(2);
        assert!(r.channel.is_some() && r.barrier.is_some());
        assert_eq!(r.slots.len(), 3);
    }

    #[test]
    fn slots_below_a_raised_minimum_are_replaced() {
        let s = Spares::default();
        s.keep(2, 100);
        s.keep(2, 300);
        assert!(s.take(2).iter().all(|f| f.as_raw_fd() >= 300));
    }
}
