//! Signals: every signal blocked in the thread that clones (so that no
//! handler runs in the child before `execve`), and a signalfd registered
//! with tokio's reactor.

use std::io;

/// Every signal blocked in this thread until dropped, when the mask it
/// replaced comes back. The child of a clone made meanwhile inherits the
/// full mask and clears it itself right before `execve` (it never drops
/// this: its side of the clone does not return).
pub(super) struct AllBlocked {
    old: libc::sigset_t,
}

impl AllBlocked {
    pub(super) fn new() -> AllBlocked {
        // SAFETY: sigset_t is a plain C bitset; sigfillset initialises it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pthread_sigmask fills it with the current mask.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid sigset_t values owned by this
        // frame; blocking signals in this thread cannot fail with a valid
        // `how`.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        AllBlocked { old }
    }
}

impl Drop for AllBlocked {
    fn drop(&mut self) {
        // SAFETY: restores this thread's mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// An empty signal set, for the child to unblock everything with.
pub(super) fn empty_set() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain C bitset; sigemptyset initialises it.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut none) };
    none
}

/// Registers a signalfd with tokio's reactor for readability.
pub(crate) fn async_signalfd(
    fd: nix::sys::signalfd::SignalFd,
) -> io::Result<tokio::io::unix::AsyncFd<nix::sys::signalfd::SignalFd>> {
    // SAFETY: a SignalFd owns its fd (an OwnedFd inside), which stays open
    // and the same description until the AsyncFd drops it, and its
    // as_raw_fd() always returns that fd.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Whether the kernel reaps this process's children itself as they exit
/// (SIGCHLD ignored, or `SA_NOCLDWAIT`): then a child's pid may be free,
/// and reused, before anything of ours waits for it.
pub(crate) fn children_reaped_by_kernel() -> bool {
    // SAFETY: a zeroed sigaction is a valid out-value; sigaction with a
    // null new action only reads the current one into `old`.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above; SIGCHLD is a valid signal number.
    let r = unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) };
    r == 0 && (old.sa_sigaction == libc::SIG_IGN || old.sa_flags & libc::SA_NOCLDWAIT != 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn children_are_not_reaped_by_the_kernel_by_default() {
        // The test harness leaves SIGCHLD at its default disposition.
        assert!(!super::children_reaped_by_kernel());
    }
}
