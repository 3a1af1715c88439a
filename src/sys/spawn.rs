//! Starting a new process: everything `execve` needs is prepared before
//! the clone ([`ExecImage`]), then `clone3` (or legacy `clone`) makes the
//! child, which runs only [`exec::child_exec`](super::exec::child_exec).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;

use super::exec::child_exec;
use super::signal::{empty_set, AllBlocked};

const CLONE_PIDFD: u64 = 0x0000_1000;
const CLONE_PARENT: u64 = 0x0000_8000;

/// Everything `execve` needs, prepared before the fork so that the child
/// allocates nothing.
pub(crate) struct ExecImage {
    pub(super) path: CString,
    _argv: Vec<CString>,
    pub(super) argv_ptrs: Vec<*const c_char>,
    _env: Vec<CString>,
    pub(super) envp_ptrs: Vec<*const c_char>,
    /// `LISTEN_PID=` followed by room for the digits, filled in the child.
    pub(super) listen_pid: Box<[u8; 32]>,
    pub(super) listen_pid_slot: usize,
    /// The fds to hand over, each at or above `3 + fds.len()`, close-on-exec.
    /// The child moves `fds[i]` to `3 + i`.
    fds: Vec<OwnedFd>,
}

// SAFETY: the raw pointers point into heap data the image owns (the
// CStrings and the boxed LISTEN_PID slot), which moves with it; nothing
// else refers to them, so the image may move to another thread.
unsafe impl Send for ExecImage {}

pub(super) const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecImage {
    /// Prepares the image. `env` must not contain `LISTEN_PID`; the image
    /// adds it with the child's pid. `fds` are duplicated above the target
    /// range, so the caller keeps its own.
    pub(crate) fn new<'a>(
        path: &OsStr,
        argv: &[std::ffi::OsString],
        env: impl IntoIterator<Item = (&'a OsStr, &'a OsStr)>,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<ExecImage> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
        };
        let path = cstr(path.as_bytes())?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut env_c = Vec::new();
        for (k, v) in env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env_c.push(cstr(&kv)?);
        }
        let min = 3 + fds.len() as i32;
        let fds = fds
            .iter()
            .map(|fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min)))
            .map(|r| {
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                r.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                    .map_err(io::Error::from)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut listen_pid = Box::new([0u8; 32]);
        listen_pid[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const c_char> = env_c.iter().map(|e| e.as_ptr()).collect();
        let listen_pid_slot = envp_ptrs.len();
        envp_ptrs.push(std::ptr::null()); // the LISTEN_PID slot, set in the child
        envp_ptrs.push(std::ptr::null());
        Ok(ExecImage {
            path,
            _argv: argv,
            argv_ptrs,
            _env: env_c,
            envp_ptrs,
            listen_pid,
            listen_pid_slot,
            fds,
        })
    }
}

/// A started child: its pid and a pidfd that refers to it for good.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
}

/// Starts `image` as a new process with `clone3(CLONE_PIDFD)`.
///
/// With `reparent`, `CLONE_PARENT` makes the new process a child of our
/// own parent (the service manager), which then supervises and reaps it;
/// otherwise it is our child and [`reap`](super::reap) collects it. If the
/// child cannot exec, it writes `spawn <errno>\n` or `exec <errno>\n` to
/// the last fd (by convention the handoff channel). `image` must hold at
/// least one fd.
pub(crate) fn spawn(image: &mut ExecImage, reparent: bool) -> io::Result<Spawned> {
    spawn_with(image, reparent, false)
}

pub(super) fn spawn_with(
    image: &mut ExecImage,
    reparent: bool,
    legacy: bool,
) -> io::Result<Spawned> {
    // The channel's source fd stays open in the child until a successful
    // exec (it is close-on-exec), so failures are reported there.
    let report = image.fds.last().map(|f| f.as_raw_fd()).unwrap_or(-1);
    clone_and_exec(image, reparent, legacy, report)
}

/// Starts `image` as our own child, like [`spawn`] without reparenting
/// (exit signal SIGCHLD), but writes a failure before `execve` (`spawn
/// <errno>` or `exec <errno>`) to `report` instead of the last handed-over
/// fd. `report` is duplicated above the handed-over range, close-on-exec,
/// so the new program never holds it: its other end sees end of file once
/// `execve` succeeded, or the failure line and then end of file.
pub(crate) fn spawn_reporting(
    image: &mut ExecImage,
    report: BorrowedFd<'_>,
) -> io::Result<Spawned> {
    let min = 3 + image.fds.len() as i32;
    let high = nix::fcntl::fcntl(report, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    let high = super::own(high);
    clone_and_exec(image, false, false, high.as_raw_fd())
}

/// The clone and exec behind [`spawn`] and [`spawn_reporting`]: failures
/// before `execve` are written to `report`, which must be close-on-exec and
/// at or above `3 + image.fds.len()`.
fn clone_and_exec(
    image: &mut ExecImage,
    reparent: bool,
    legacy: bool,
    report: RawFd,
) -> io::Result<Spawned> {
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD | if reparent { CLONE_PARENT } else { 0 },
        pidfd: &mut pidfd as *mut RawFd as u64,
        child_tid: 0,
        parent_tid: 0,
        // The kernel refuses any other exit signal with CLONE_PARENT.
        exit_signal: if reparent { 0 } else { libc::SIGCHLD as u64 },
        stack: 0,
        stack_size: 0,
        tls: 0,
    };
    let raw_fds: Vec<RawFd> = image.fds.iter().map(|f| f.as_raw_fd()).collect();
    let none = empty_set();

    let blocked = AllBlocked::new();
    let mut ret = if legacy {
        -1
    } else {
        // SAFETY: clone3 without CLONE_VM gives the child a copy-on-write
        // copy of this address space, like fork(). `args` is a valid
        // clone_args of the version-0 size. Signals are blocked in this
        // thread so that no handler runs in the child before exec.
        unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        }
    };
    if legacy || (ret == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)) {
        // clone3 filtered (seccomp) or missing: legacy clone(2) takes the
        // same flags (CLONE_PIDFD since Linux 5.2) and stores the pidfd
        // through its parent_tid argument.
        ret = legacy_clone(args.flags | args.exit_signal, &mut pidfd);
    }
    if ret == 0 {
        // SAFETY: we are the child of a (possibly multi-threaded) process,
        // right after the clone; `child_exec` only makes async-signal-safe
        // system calls on memory prepared before the clone, and never
        // returns (so `blocked` is never dropped here).
        unsafe { child_exec(image, &raw_fds, report, &none) }
    }
    let err = io::Error::last_os_error();
    drop(blocked);
    if ret < 0 {
        return Err(err);
    }
    Ok(Spawned {
        pid: ret as u32,
        // SAFETY: the kernel stored a new pidfd, owned by nobody else, in `pidfd`.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
    })
}

/// clone(2) with `flags`, no new stack: a fork with flags.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
fn legacy_clone(flags: u64, pidfd: &mut RawFd) -> libc::c_long {
    // SAFETY: as for clone3 above (no CLONE_VM, stack 0 = the caller's,
    // copy-on-write). On these architectures the argument order is
    // (flags, newsp, parent_tid, child_tid, tls); with CLONE_PIDFD the
    // kernel writes the pidfd to parent_tid, which points at `pidfd`.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0usize,
            pidfd as *mut RawFd,
            0usize,
            0usize,
        )
    }
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
fn legacy_clone(_flags: u64, _pidfd: &mut RawFd) -> libc::c_long {
    -1 // errno is still ENOSYS from clone3
}

#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pidfd::{pidfd_signal, reap, ExitStatus};
    use std::os::fd::AsFd;

    #[test]
    fn spawns_with_fds_in_place_and_reaps() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let env = [(OsStr::new("PATH"), OsStr::new("/usr/bin:/bin"))];
        let script = "test \"$LISTEN_PID\" = $$ && test -S /proc/self/fd/3 && exec 3>&- && exit 7";
        let argv: Vec<std::ffi::OsString> = ["sh", "-c", script].iter().map(|s| s.into()).collect();
        let mut image = ExecImage::new(OsStr::new("/bin/sh"), &argv, env, &[b.as_fd()]).unwrap();
        drop(b);
        let child = spawn(&mut image, false).unwrap();
        drop(image);
        // Wait for the exit by reading EOF on our end (the child's copy closes).
        use std::io::Read;
        let mut buf = Vec::new();
        (&a).read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
        let mut fds = [nix::poll::PollFd::new(
            child.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(
            nix::poll::poll(&mut fds, 10_000u16).unwrap(),
            1,
            "child did not exit in 10 s"
        );
        let status = reap(child.pidfd.as_fd()).unwrap();
        assert_eq!(status, Some(ExitStatus::Code(7)));
    }

    #[test]
    fn the_legacy_clone_fallback_works_too() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let argv: Vec<std::ffi::OsString> = ["sh", "-c", "echo \"$LISTEN_PID $$\" >&3"]
            .iter()
            .map(|s| s.into())
            .collect();
        let mut image = ExecImage::new(
            OsStr::new("/bin/sh"),
            &argv,
            std::iter::empty(),
            &[b.as_fd()],
        )
        .unwrap();
        drop(b);
        let child = spawn_with(&mut image, false, true).unwrap();
        drop(image);
        use std::io::Read;
        let mut out = String::new();
        (&a).read_to_string(&mut out).unwrap();
        let pids: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(
            pids,
            [child.pid.to_string(), child.pid.to_string()],
            "{out}"
        );
        let mut fds = [nix::poll::PollFd::new(
            child.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 10_000u16).unwrap(), 1);
        assert_eq!(
            reap(child.pidfd.as_fd()).unwrap(),
            Some(ExitStatus::Code(0))
        );
    }

    #[test]
    fn reports_exec_failure_through_the_last_fd() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let argv = vec![std::ffi::OsString::from("nope")];
        let mut image = ExecImage::new(
            OsStr::new("/nonexistent/binary"),
            &argv,
            std::iter::empty(),
            &[b.as_fd()],
        )
        .unwrap();
        drop(b);
        let child = spawn(&mut image, false).unwrap();
        drop(image);
        use std::io::Read;
        let mut buf = String::new();
        (&a).read_to_string(&mut buf).unwrap();
        assert_eq!(buf, format!("exec {}\n", libc::ENOENT));
        pidfd_signal(child.pidfd.as_fd(), libc::SIGKILL).unwrap();
    }
}
