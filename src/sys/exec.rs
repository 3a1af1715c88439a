//! The child's side of a clone, up to `execve`: async-signal-safe only. No
//! allocation, no locks, no logging, nothing that could panic (a panic
//! allocates and takes locks), because the parent may be multi-threaded and
//! the child shares its memory (`CLONE_VM`) with one thread of its own.

use std::os::fd::RawFd;
use std::os::raw::c_char;

use super::spawn::{ExecImage, LISTEN_PID_PREFIX};
use crate::protocol::channel::{EXEC_FAILED, SPAWN_FAILED};

/// The child's side of [`spawn`](fn@super::spawn): writes `LISTEN_PID=<pid>`
/// into the slot prepared for it, moves `raw_fds[i]` to `3 + i` without
/// close-on-exec, resets every signal handler and SIGPIPE to the default,
/// clears the signal mask (to `empty`) and executes the image. On failure it writes
/// `spawn <errno>` or `exec <errno>` to `report` and exits 127.
///
/// # Safety
///
/// Call only in the child right after the clone, with an image and fds
/// prepared before it. Every fd in `raw_fds` is at or above
/// `3 + raw_fds.len()`.
pub(super) unsafe fn child_exec(
    image: &mut ExecImage,
    raw_fds: &[RawFd],
    report: RawFd,
    empty: &libc::sigset_t,
) -> ! {
    // LISTEN_PID=<our pid> into the slot prepared for it. No indexing that
    // could panic here.
    // SAFETY: getpid takes no arguments and cannot fail; the raw syscall
    // skips glibc's pid cache, which a raw clone does not update.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) } as u64;
    let slot = &mut image.listen_pid;
    let end = match put_decimal(&mut slot[..], LISTEN_PID_PREFIX.len(), pid) {
        Some(end) => end,
        None => fail(report, SPAWN_FAILED, libc::E2BIG),
    };
    match (
        slot.get_mut(end),
        image.envp_ptrs.get_mut(image.listen_pid_slot),
    ) {
        (Some(nul), Some(ptr)) => {
            *nul = 0;
            *ptr = slot.as_ptr() as *const c_char;
        }
        _ => fail(report, SPAWN_FAILED, libc::E2BIG),
    }

    for (i, &fd) in raw_fds.iter().enumerate() {
        let target = 3 + i as i32;
        // Every source is >= 3 + n, so no dup2 overwrites a later source.
        // SAFETY: dup2 and fcntl(F_SETFD) on fd numbers, no pointers; both
        // are async-signal-safe.
        let moved =
            unsafe { libc::dup2(fd, target) != -1 && libc::fcntl(target, libc::F_SETFD, 0) != -1 };
        if !moved {
            fail(report, SPAWN_FAILED, errno());
        }
    }

    reset_handlers();
    // Rust's runtime ignores SIGPIPE; the new program expects the default,
    // as std::process::Command arranges. Then unblock everything.
    // SAFETY: signal() with a valid signal number and SIG_DFL is
    // async-signal-safe (no handler function is installed).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // SAFETY: `empty` is a valid, initialised sigset_t; a null old-set
    // pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, empty, std::ptr::null_mut()) };

    // SAFETY: the path, argv and envp are NUL-terminated C strings and
    // null-terminated pointer arrays the image owns (the LISTEN_PID slot
    // was just filled and NUL-terminated); they stay alive for the call,
    // which replaces this process image on success.
    unsafe {
        libc::execve(
            image.path.as_ptr(),
            image.argv_ptrs.as_ptr(),
            image.envp_ptrs.as_ptr(),
        )
    };
    fail(report, EXEC_FAILED, errno())
}

/// Every signal with a handler gets the default action back (ignored ones
/// stay ignored, as across `execve`). The parent's handlers must not run
/// here: this process shares its memory until `execve`. Without
/// `CLONE_SIGHAND` the table of handlers is this process's own copy.
fn reset_handlers() {
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, no flags,
    // an empty mask).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    for sig in 1..=libc::SIGRTMAX() {
        // SAFETY: sigaction with valid pointers to values on this stack is
        // async-signal-safe; for a number it cannot change (SIGKILL,
        // SIGSTOP, the C library's own) it fails with EINVAL, harmlessly.
        let had = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
        if had == 0 && old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
            // SAFETY: as above; SIG_DFL installs no function.
            unsafe { libc::sigaction(sig, &default, std::ptr::null_mut()) };
        }
    }
}

/// The calling thread's `errno`.
fn errno() -> i32 {
    // SAFETY: __errno_location returns a valid pointer to this thread's
    // errno, readable at any time. In the child (CLONE_VM, no CLONE_SETTLS)
    // that is the errno of the parent's thread that cloned: harmless, as
    // that thread is suspended until the child execs or exits, and reads
    // errno afterwards only when the clone itself failed.
    unsafe { *libc::__errno_location() }
}

/// Writes `n` in decimal into `buf` from `at`; returns where it ended, or
/// `None` without room. Async-signal-safe, cannot panic.
pub(super) fn put_decimal(buf: &mut [u8], at: usize, n: u64) -> Option<usize> {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut rest = n;
    loop {
        *digits.get_mut(len)? = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut end = at;
    for d in digits.get(..len)?.iter().rev() {
        *buf.get_mut(end)? = *d;
        end += 1;
    }
    Some(end)
}

/// Writes `<what><errno>\n` to `fd` and exits 127. Async-signal-safe.
fn fail(fd: RawFd, what: &[u8], errno: i32) -> ! {
    let mut buf = [0u8; 32];
    let mut len = what.len().min(16);
    if let (Some(to), Some(from)) = (buf.get_mut(..len), what.get(..len)) {
        to.copy_from_slice(from);
    }
    len = put_decimal(&mut buf, len, u64::from(errno.unsigned_abs())).unwrap_or(len);
    if let Some(nl) = buf.get_mut(len) {
        *nl = b'\n';
        len += 1;
    }
    // SAFETY: write() from a buffer on this stack, `len` within it; an
    // invalid `fd` only yields EBADF. Both calls are async-signal-safe.
    unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, len) };
    // SAFETY: _exit ends the process at once, without running atexit
    // handlers or flushing stdio (which a child of a clone must not do).
    unsafe { libc::_exit(127) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_fit_or_say_so() {
        let mut buf = [0u8; 8];
        assert_eq!(put_decimal(&mut buf, 2, 4096), Some(6));
        assert_eq!(&buf[2..6], b"4096");
        assert_eq!(put_decimal(&mut buf, 0, 0), Some(1));
        assert_eq!(put_decimal(&mut buf, 5, 12345), None);
        let mut slot = [0u8; 32];
        let end = put_decimal(&mut slot, LISTEN_PID_PREFIX.len(), u64::MAX).unwrap();
        assert!(end < slot.len(), "LISTEN_PID= and any pid fit with the NUL");
        let name = crate::protocol::env::LISTEN_PID;
        assert_eq!(LISTEN_PID_PREFIX, format!("{name}=").as_bytes());
    }
}
