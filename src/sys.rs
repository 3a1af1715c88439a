//! Every `unsafe` block of the crate lives here.
//!
//! Three jobs need raw system calls: taking ownership of the fds a parent or
//! systemd passed us, starting the new process (`clone3` + `execve`, with
//! only async-signal-safe work in between), and watching or killing that
//! process through its pidfd. Each is a small function with a `// SAFETY:`
//! note; the rest of the crate calls them as safe functions.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

const CLONE_PIDFD: u64 = 0x0000_1000;
const CLONE_PARENT: u64 = 0x0000_8000;
const P_PIDFD: libc::idtype_t = 3;
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

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

/// Everything `execve` needs, prepared before the fork so that the child
/// allocates nothing.
pub(crate) struct ExecImage {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _env: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    /// `LISTEN_PID=` followed by room for the digits, filled in the child.
    listen_pid: Box<[u8; 32]>,
    listen_pid_slot: usize,
    /// The fds to hand over, each at or above `3 + fds.len()`, close-on-exec.
    /// The child moves `fds[i]` to `3 + i`.
    fds: Vec<OwnedFd>,
}

// SAFETY: the raw pointers point into heap data the image owns (the
// CStrings and the boxed LISTEN_PID slot), which moves with it; nothing
// else refers to them, so the image may move to another thread.
unsafe impl Send for ExecImage {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

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
/// otherwise it is our child and [`reap`] collects it. If the child cannot
/// exec, it writes `spawn <errno>\n` or `exec <errno>\n` to the last fd (by
/// convention the handoff channel). `image` must hold at least one fd.
pub(crate) fn spawn(image: &mut ExecImage, reparent: bool) -> io::Result<Spawned> {
    spawn_with(image, reparent, false)
}

fn spawn_with(image: &mut ExecImage, reparent: bool, legacy: bool) -> io::Result<Spawned> {
    // The channel's source fd stays open in the child until a successful
    // exec (it is close-on-exec), so failures are reported there.
    let report = image.fds.last().map(|f| f.as_raw_fd()).unwrap_or(-1);
    clone_and_exec(image, reparent, legacy, report)
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

    // SAFETY: sigset_t is a plain C bitset; sigfillset/sigemptyset initialise it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointers are valid sigset_t values owned by this frame.
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }

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
        // SAFETY: we are the child of a (possibly multi-threaded) process;
        // `child_exec` only makes async-signal-safe system calls on memory
        // prepared before the clone, and never returns.
        unsafe { child_exec(image, &raw_fds, report, &none) }
    }
    let err = io::Error::last_os_error();
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
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

/// The child's side of [`spawn`]: async-signal-safe only. No allocation, no
/// locks, no logging.
///
/// # Safety
/// Call only in the child right after the clone.
unsafe fn child_exec(
    image: &mut ExecImage,
    raw_fds: &[RawFd],
    report: RawFd,
    empty: &libc::sigset_t,
) -> ! {
    // LISTEN_PID=<our pid> into the slot prepared for it. No indexing that
    // could panic here: a panic in the child of a multi-threaded process
    // would allocate and take locks.
    let pid = libc::syscall(libc::SYS_getpid) as u64;
    let slot = &mut image.listen_pid;
    let end = match put_decimal(&mut slot[..], LISTEN_PID_PREFIX.len(), pid) {
        Some(end) => end,
        None => fail(report, b"spawn ", libc::E2BIG),
    };
    match (
        slot.get_mut(end),
        image.envp_ptrs.get_mut(image.listen_pid_slot),
    ) {
        (Some(nul), Some(ptr)) => {
            *nul = 0;
            *ptr = slot.as_ptr() as *const c_char;
        }
        _ => fail(report, b"spawn ", libc::E2BIG),
    }

    for (i, &fd) in raw_fds.iter().enumerate() {
        let target = 3 + i as i32;
        // Every source is >= 3 + n, so no dup2 overwrites a later source.
        if libc::dup2(fd, target) == -1 || libc::fcntl(target, libc::F_SETFD, 0) == -1 {
            fail(report, b"spawn ", *libc::__errno_location());
        }
    }

    // Rust's runtime ignores SIGPIPE; the new program expects the default,
    // as std::process::Command arranges. Then unblock everything.
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    libc::pthread_sigmask(libc::SIG_SETMASK, empty, std::ptr::null_mut());

    libc::execve(
        image.path.as_ptr(),
        image.argv_ptrs.as_ptr(),
        image.envp_ptrs.as_ptr(),
    );
    fail(report, b"exec ", *libc::__errno_location())
}

/// Writes `n` in decimal into `buf` from `at`; returns where it ended, or
/// `None` without room. Async-signal-safe, cannot panic.
fn put_decimal(buf: &mut [u8], at: usize, n: u64) -> Option<usize> {
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
unsafe fn fail(fd: RawFd, what: &[u8], errno: i32) -> ! {
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
    libc::write(fd, buf.as_ptr() as *const libc::c_void, len);
    libc::_exit(127)
}

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
    // SAFETY: waitid filled `info` for a child state change (si_pid 0 means none).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        CLD_EXITED => ExitStatus::Code(status),
        CLD_KILLED | CLD_DUMPED => ExitStatus::Signal(status),
        _ => ExitStatus::Code(status),
    }))
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

/// Kills the process behind `child` and waits (blocking, at most `timeout`)
/// for it to exit; reaps it if it is `ours`. For error paths that cannot
/// wait asynchronously.
pub(crate) fn kill_and_wait(child: &Spawned, ours: bool, timeout: std::time::Duration) {
    let pidfd = child.pidfd.as_fd();
    if pidfd_signal(pidfd, libc::SIGKILL).is_err() {
        return;
    }
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [nix::poll::PollFd::new(pidfd, nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut fds, ms).is_ok_and(|n| n > 0) && ours {
        let _ = reap(pidfd);
    }
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
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    clone_and_exec(image, false, false, high.as_raw_fd())
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

#[cfg(test)]
mod tests {
    use super::*;
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
    fn decimals_fit_or_say_so() {
        let mut buf = [0u8; 8];
        assert_eq!(put_decimal(&mut buf, 2, 4096), Some(6));
        assert_eq!(&buf[2..6], b"4096");
        assert_eq!(put_decimal(&mut buf, 0, 0), Some(1));
        assert_eq!(put_decimal(&mut buf, 5, 12345), None);
        let mut slot = [0u8; 32];
        let end = put_decimal(&mut slot, LISTEN_PID_PREFIX.len(), u64::MAX).unwrap();
        assert!(end < slot.len(), "LISTEN_PID= and any pid fit with the NUL");
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
