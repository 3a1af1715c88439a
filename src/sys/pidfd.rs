//! A child through its pidfd: signalled, watched and reaped with no risk of
//! hitting another process that got its pid after it was reaped.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::spawn::Started;

const P_PIDFD: libc::idtype_t = 3;
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

/// Sends `signal` to the process behind `pidfd` (no pid reuse race).
pub(crate) fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a null siginfo and no
    // flags; the fd is borrowed for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        // ESRCH: it has exited already, which is what we wanted.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit status {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Reaps our child behind `pidfd` if it has exited (`WNOHANG`). Returns
/// `Ok(None)` while it runs. Fails with `ECHILD` if it is not our child (it
/// was started with `reparent`, so the manager reaps it).
pub(crate) fn reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is a plain C struct filled in by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(P_PIDFD) with a valid, borrowed pidfd and a valid out pointer.
    let r = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(status_of(&info))
}

/// Kills the process `child` started as, and waits (blocking, at most
/// `timeout`) for it to exit; reaps it if it is `ours`. For error paths
/// that cannot wait asynchronously, right after the start. Without a
/// pidfd it is killed by its pid (ours cannot have been reused before we
/// reap it; the manager's only if it exited and was reaped meanwhile, and
/// the pids wrapped around), and only ours is waited for.
pub(crate) fn kill_and_wait(child: &Started, ours: bool, timeout: std::time::Duration) {
    let Some(pidfd) = child.pidfd.as_ref().map(|f| f.as_fd()) else {
        if kill_pid(child.pid, libc::SIGKILL).is_ok() && ours {
            let end = std::time::Instant::now() + timeout;
            while matches!(reap_pid(child.pid), Ok(None)) && std::time::Instant::now() < end {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        return;
    };
    if pidfd_signal(pidfd, libc::SIGKILL).is_err() {
        return;
    }
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [nix::poll::PollFd::new(pidfd, nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut fds, ms).is_ok_and(|n| n > 0) && ours {
        let _ = reap(pidfd);
    }
}

/// Sends `signal` to the process `pid`. Only for a child of ours that has
/// not been reaped (its pid cannot have been reused), or one known alive.
pub(crate) fn kill_pid(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill takes a pid and a signal number, no pointers.
    if unsafe { libc::kill(pid, signal) } == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Reaps our child `pid` if it has exited (`WNOHANG`), as [`reap`] does
/// through a pidfd. `Ok(None)` while it runs.
pub(crate) fn reap_pid(pid: u32) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is a plain C struct filled in by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(P_PID) with a pid and a valid out pointer.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(status_of(&info))
}

/// How the child in `info` (filled by `waitid`) ended; `None` if none had.
fn status_of(info: &libc::siginfo_t) -> Option<ExitStatus> {
    // SAFETY: waitid filled `info` for a child state change (si_pid 0 means none).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return None;
    }
    Some(match info.si_code {
        CLD_EXITED => ExitStatus::Code(status),
        CLD_KILLED | CLD_DUMPED => ExitStatus::Signal(status),
        _ => ExitStatus::Code(status),
    })
}

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3). Race-free only while
/// `pid` cannot be recycled: for a child that has not been reaped yet.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}
