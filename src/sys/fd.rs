//! Raw fds: whether a number is open, inherited, a socket; taking ownership
//! of fds this process inherited, received or just created; registering an
//! owned fd with tokio's reactor.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `fd` is an open file descriptor of this process.
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor table; an fd number that is
    // not open yields EBADF and nothing else happens.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Whether `fd` is open and close-on-exec: then it cannot have been
/// inherited across `execve` (which closed every such fd); this process
/// opened it since it started.
pub(crate) fn fd_is_cloexec(fd: RawFd) -> bool {
    // SAFETY: as in fd_is_open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags != -1 && flags & libc::FD_CLOEXEC != 0
}

/// Whether the open fd `fd` is a socket (`S_ISSOCK`).
pub(crate) fn fd_is_socket(fd: RawFd) -> io::Result<bool> {
    // SAFETY: `st` is a plain C struct that fstat fills in; a zeroed value is
    // a valid initial state, and the pointer is valid for the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above; fstat does not take ownership of `fd`.
    if unsafe { libc::fstat(fd, &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// Owns `fd`, which `fcntl(F_DUPFD_CLOEXEC)` (or the like) just returned.
pub(crate) fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller got `fd` from a call that created it; nothing else
    // owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Makes the number of `slot`, an fd this process owns, refer to what
/// `src` refers to, close-on-exec (`dup3`): the slot's old file is closed
/// and the new one put in its place in one step, so the number is never
/// free for another thread to take. Needs no free slot (at `EMFILE` too).
pub(crate) fn dup_onto(src: BorrowedFd<'_>, slot: &mut OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup3 on two open fds: `src` is borrowed for the call, and the
    // number of `slot` is owned (and borrowed mutably) by the caller, so no
    // other part of the process uses it while its file is replaced. The
    // OwnedFd keeps owning that number, now for the new file.
    let r = unsafe { libc::dup3(src.as_raw_fd(), slot.as_raw_fd(), libc::O_CLOEXEC) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the fds passed to this process (by systemd or by our
/// parent). Succeeds once per process; the caller has checked that each fd
/// is open.
pub(crate) fn take_inherited(fds: &[RawFd]) -> io::Result<Vec<OwnedFd>> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the inherited fds were taken already",
        ));
    }
    for &fd in fds {
        if !fd_is_open(fd) {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
    }
    Ok(fds
        .iter()
        // SAFETY: the activation protocol hands these fds to this process;
        // nothing in the process owned them before (the crate takes them
        // once, guarded by TAKEN), and each was checked to be open.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// Borrows a raw fd that the caller knows to be open for the duration of
/// `f`. Used only for fds this process inherited and has not taken yet.
pub(crate) fn with_borrowed<T>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> T) -> Option<T> {
    if !fd_is_open(fd) {
        return None;
    }
    // SAFETY: `fd` is open (checked just above) and stays open while `f`
    // runs: this process does not close inherited fds it has not taken.
    Some(f(unsafe { BorrowedFd::borrow_raw(fd) }))
}

/// Takes ownership of fds this process has just received in an
/// `SCM_RIGHTS` message, so that dropping them closes them.
pub(crate) fn take_received_fds(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        // SAFETY: recvmsg installed each of these as a new fd of this
        // process; nothing else knows its number, and the caller takes each
        // one once (right after the recvmsg that returned it).
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Registers an owned fd with tokio's reactor for readability. On failure
/// the fd comes back with the error.
pub(crate) fn async_readable(
    fd: OwnedFd,
) -> Result<tokio::io::unix::AsyncFd<OwnedFd>, (io::Error, OwnedFd)> {
    // SAFETY: an OwnedFd is open, owned by the AsyncFd from here on (so it
    // stays open and the same description until the AsyncFd is dropped),
    // and always returns the same number from as_raw_fd().
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| {
            let (fd, e) = e.into_parts();
            (e, fd)
        })
}

/// Whether the peer of the stream socket `fd` has closed its end (every
/// copy of it): `poll` says `POLLHUP`, at once.
pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn a_socket_hangs_up_once_every_copy_of_its_peer_is_closed() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let copy = theirs.try_clone().unwrap();
        assert!(!super::hung_up(ours.as_fd()), "peer open");
        drop(theirs);
        assert!(
            !super::hung_up(ours.as_fd()),
            "a copy of the peer still open"
        );
        drop(copy);
        assert!(super::hung_up(ours.as_fd()), "peer closed");
    }
}
