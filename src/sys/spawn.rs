//! Starting a new process: everything `execve` needs is prepared before
//! the clone ([`ExecImage`]), then `clone(CLONE_VM | CLONE_VFORK)` makes
//! the child, which runs only [`exec::child_exec`](super::exec::child_exec)
//! on a stack of its own.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;

use super::exec::child_exec;
use super::signal::{empty_set, AllBlocked};

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
    /// range, so the caller keeps its own: each onto one of `slots` (fds
    /// the caller keeps open for this, taken from the vector) whose number
    /// is at or above `3 + fds.len()`, with `dup3`, which needs no free
    /// slot; with `F_DUPFD_CLOEXEC` when no such slot is left.
    pub(crate) fn new<'a>(
        path: &OsStr,
        argv: &[std::ffi::OsString],
        env: impl IntoIterator<Item = (&'a OsStr, &'a OsStr)>,
        fds: &[BorrowedFd<'_>],
        slots: &mut Vec<OwnedFd>,
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
            .map(|fd| copy_above(*fd, min, slots))
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

/// A copy of `fd` numbered at or above `min`, close-on-exec: put onto one
/// of `slots` numbered high enough (taken from the vector), else a new fd.
fn copy_above(fd: BorrowedFd<'_>, min: RawFd, slots: &mut Vec<OwnedFd>) -> io::Result<OwnedFd> {
    if let Some(i) = slots.iter().position(|s| s.as_raw_fd() >= min) {
        let mut slot = slots.swap_remove(i);
        super::dup_onto(fd, &mut slot)?;
        return Ok(slot);
    }
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    Ok(super::own(raw))
}

/// A child started by [`spawn`]: its pid, and a pidfd that refers to it
/// for good unless none could be made (`EMFILE`: no free fd slot).
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: u32,
    pub(crate) pidfd: Option<OwnedFd>,
}

#[cfg(test)]
impl Started {
    fn expect_pidfd(self) -> Spawned {
        Spawned {
            pid: self.pid,
            pidfd: self.pidfd.expect("a pidfd"),
        }
    }
}

/// A started child: its pid and a pidfd that refers to it for good.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
}

/// Starts `image` as a new process with `clone(CLONE_VM | CLONE_VFORK |
/// CLONE_PIDFD)`.
///
/// With `reparent`, `CLONE_PARENT` makes the new process a child of our
/// own parent (the service manager), which then supervises and reaps it;
/// otherwise it is our child and [`reap`](super::reap) collects it. If the
/// child cannot exec, it writes `spawn <errno>\n` or `exec <errno>\n` to
/// the last fd (by convention the handoff channel). `image` must hold at
/// least one fd.
///
/// The pidfd (`CLONE_PIDFD`) is the one new fd the start needs. `slot`, a
/// spare fd, is closed right before the clone so that it finds a slot at
/// the fd limit; if another thread took that slot first (the clone then
/// fails with `EMFILE` and starts nothing), the process is started without
/// a pidfd, which needs no slot: [`Started::pidfd`] is `None`.
///
/// The child shares this address space until its `execve` (as
/// `posix_spawn` does), on a stack of its own, while the calling thread
/// waits: no page table is copied, so the time this takes does not grow
/// with the memory of a busy process, and no memory is committed twice.
pub(crate) fn spawn(
    image: &mut ExecImage,
    reparent: bool,
    slot: Option<OwnedFd>,
) -> io::Result<Started> {
    // The channel's source fd stays open in the child until a successful
    // exec (it is close-on-exec), so failures are reported there.
    let report = image.fds.last().map(|f| f.as_raw_fd()).unwrap_or(-1);
    drop(slot);
    let (pid, pidfd) = match clone_and_exec(image, reparent, report, true) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            clone_and_exec(image, reparent, report, false)?
        }
        r => r?,
    };
    Ok(Started { pid, pidfd })
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
    let (pid, pidfd) = clone_and_exec(image, false, high.as_raw_fd(), true)?;
    let pidfd = pidfd.ok_or_else(|| io::Error::other("clone returned no pidfd"))?;
    Ok(Spawned { pid, pidfd })
}

/// The child's stack, above a guard page: `child_exec` needs a few
/// hundred bytes of its own, `execve` and `sigaction` a few kilobytes.
const CHILD_STACK: usize = 64 * 1024;

/// What the child of the clone runs with (it shares our memory).
struct ChildArgs<'a> {
    image: &'a mut ExecImage,
    raw_fds: &'a [RawFd],
    report: RawFd,
    empty: &'a libc::sigset_t,
}

/// The child's entry point, on its own stack.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `clone_and_exec` passed, alive
    // on the parent's stack: the parent's thread is suspended
    // (CLONE_VFORK) until this child has called `execve` or exited.
    let args = unsafe { &mut *(arg as *mut ChildArgs<'_>) };
    // SAFETY: we are the child of the clone, sharing the parent's memory
    // on a stack of our own; `child_exec` only makes async-signal-safe
    // system calls on memory prepared before the clone (no other thread
    // touches the image), resets every signal handler before it unblocks
    // signals, and never returns.
    unsafe { child_exec(args.image, args.raw_fds, args.report, args.empty) }
}

/// The clone and exec behind [`spawn`] and [`spawn_reporting`]: failures
/// before `execve` are written to `report`, which must be close-on-exec and
/// at or above `3 + image.fds.len()`. With `pidfd`, `CLONE_PIDFD` too.
fn clone_and_exec(
    image: &mut ExecImage,
    reparent: bool,
    report: RawFd,
    pidfd: bool,
) -> io::Result<(u32, Option<OwnedFd>)> {
    let want_pidfd = pidfd;
    let stack = Stack::new(CHILD_STACK)?;
    let raw_fds: Vec<RawFd> = image.fds.iter().map(|f| f.as_raw_fd()).collect();
    let none = empty_set();
    let mut args = ChildArgs {
        image,
        raw_fds: &raw_fds,
        report,
        empty: &none,
    };
    let mut pidfd: libc::c_int = -1;
    let pidfd_flag = if want_pidfd { libc::CLONE_PIDFD } else { 0 };
    // The kernel refuses any other exit signal with CLONE_PARENT.
    let exit_signal = if reparent { 0 } else { libc::SIGCHLD };
    let flags = libc::CLONE_VM
        | libc::CLONE_VFORK
        | pidfd_flag
        | if reparent { libc::CLONE_PARENT } else { 0 }
        | exit_signal;

    // Blocked in this thread, so that no handler of ours runs in the child
    // (which would touch our memory) before it has reset them all.
    let blocked = AllBlocked::new();
    // SAFETY: glibc's clone starts `child_entry` on `stack.top()`, a
    // mapping of ours that outlives the child's use of it: with
    // CLONE_VFORK this call returns only once the child has called
    // `execve` (its memory is its own from then on) or exited. `args` and
    // everything it points to live on this frame for as long. With
    // CLONE_PIDFD the kernel stores the pidfd through the parent_tid
    // argument, which points at `pidfd` (without it, that argument is
    // unused).
    let ret = unsafe {
        libc::clone(
            child_entry,
            stack.top(),
            flags,
            &mut args as *mut ChildArgs<'_> as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        )
    };
    let err = io::Error::last_os_error();
    drop(blocked);
    drop(stack);
    if ret < 0 {
        return Err(err);
    }
    let pidfd = want_pidfd.then(|| {
        // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd, owned by
        // nobody else, in `pidfd`.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    });
    Ok((ret as u32, pidfd))
}

/// A stack for the child: an anonymous mapping whose lowest page is a
/// guard (no access), unmapped when dropped.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    /// At least `size` usable bytes above a guard page of the system's
    /// page size (4 KiB on x86-64, up to 64 KiB on arm64 kernels: a guard
    /// of a hard-coded 4 KiB there would protect a whole 64 KiB page, most
    /// of the stack).
    fn new(size: usize) -> io::Result<Stack> {
        let page = super::page_size();
        let len = size.div_ceil(page) * page + page;
        // SAFETY: a new private anonymous mapping; no existing memory is
        // touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the first page of the mapping just made, which nothing
        // uses yet. Stacks grow down: this is below the lowest usable byte.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address, where a downward-growing stack starts (16-byte
    /// aligned: the mapping is page-aligned and `len` a multiple of pages).
    fn top(&self) -> *mut libc::c_void {
        self.base.wrapping_byte_add(self.len)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used by anyone (the
        // child is past `execve` or gone).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::pidfd::{pidfd_signal, reap, ExitStatus};
    use std::os::fd::AsFd;

    /// An image of `program` with `argv`, handed one end of a socket pair
    /// (its fd 3 once started), and the other end, ours.
    fn image_with_channel(
        program: &str,
        argv: &[&str],
    ) -> (ExecImage, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let argv: Vec<std::ffi::OsString> = argv.iter().map(|s| s.into()).collect();
        let env = [(OsStr::new("PATH"), OsStr::new("/usr/bin:/bin"))];
        let image = ExecImage::new(
            OsStr::new(program),
            &argv,
            env,
            &[theirs.as_fd()],
            &mut Vec::new(),
        )
        .unwrap();
        (image, ours)
    }

    /// The child has its fd at 3 and `LISTEN_PID` naming itself, and the
    /// pid the parent got is that same process, which it reaps.
    #[test]
    fn spawns_with_fds_in_place_and_reaps() {
        let script = "test \"$LISTEN_PID\" = $$ && test -S /proc/self/fd/3 && echo $$ >&3 && exec 3>&- && exit 7";
        let (mut image, ours) = image_with_channel("/bin/sh", &["sh", "-c", script]);
        let child = spawn(&mut image, false, None).unwrap().expect_pidfd();
        drop(image);
        // Wait for the exit by reading EOF on our end (the child's copy closes).
        use std::io::Read;
        let mut out = String::new();
        (&ours).read_to_string(&mut out).unwrap();
        assert_eq!(out.trim_end(), child.pid.to_string(), "{out:?}");
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

    /// Every byte of the requested size under the top is writable, and
    /// the byte below that is the guard's (not checked: it would fault).
    #[test]
    fn the_child_stack_has_its_full_size_above_the_guard() {
        let stack = Stack::new(CHILD_STACK).unwrap();
        let top = stack.top() as *mut u8;
        for i in 1..=CHILD_STACK {
            // SAFETY: within the mapping, above the guard page (which the
            // assertion is about: a write into it would fault).
            unsafe { top.sub(i).write_volatile(1) };
        }
    }

    /// The copies go onto the slots given (high enough), not onto new
    /// fds; a slot numbered too low is left to the caller.
    #[test]
    fn copies_go_onto_the_slots_given() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let null = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        let high = |f: OwnedFd| {
            let raw = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(200)).unwrap();
            crate::sys::own(raw)
        };
        let low = null();
        let (s1, s2) = (high(null()), high(null()));
        let mut numbers = vec![s1.as_raw_fd(), s2.as_raw_fd()];
        let low_number = low.as_raw_fd();
        let mut slots = vec![s1, low, s2];
        let argv: Vec<std::ffi::OsString> = vec!["true".into()];
        let image = ExecImage::new(
            OsStr::new("/bin/true"),
            &argv,
            std::iter::empty(),
            &[a.as_fd(), b.as_fd()],
            &mut slots,
        )
        .unwrap();
        let mut got: Vec<RawFd> = image.fds.iter().map(|f| f.as_raw_fd()).collect();
        got.sort_unstable();
        numbers.sort_unstable();
        assert_eq!(got, numbers, "onto the high slots");
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].as_raw_fd(), low_number, "the low one is left");
        let ino = |fd: RawFd| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino()
        };
        use std::os::unix::fs::MetadataExt;
        let mut want = vec![ino(a.as_raw_fd()), ino(b.as_raw_fd())];
        let mut have: Vec<u64> = image.fds.iter().map(|f| ino(f.as_raw_fd())).collect();
        want.sort_unstable();
        have.sort_unstable();
        assert_eq!(have, want, "the slots now hold the sockets");
        assert!(image
            .fds
            .iter()
            .all(|f| crate::sys::fd_is_cloexec(f.as_raw_fd())));
    }

    #[test]
    fn reports_exec_failure_through_the_last_fd() {
        let (mut image, ours) = image_with_channel("/nonexistent/binary", &["nope"]);
        let child = spawn(&mut image, false, None).unwrap().expect_pidfd();
        drop(image);
        use std::io::Read;
        let mut buf = String::new();
        (&ours).read_to_string(&mut buf).unwrap();
        assert_eq!(buf, format!("exec {}\n", libc::ENOENT));
        pidfd_signal(child.pidfd.as_fd(), libc::SIGKILL).unwrap();
    }
}

/// A signal sent to the child between the clone and `execve` must not run
/// a handler of ours there: the child shares our memory, so a handler
/// (tokio's for SIGHUP, say) would act on a signal sent to the new
/// process as if it were ours.
#[cfg(test)]
mod signal_tests {
    use super::*;
    use crate::sys::pidfd::{reap, ExitStatus};
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    static HANDLED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_usr1(_: libc::c_int) {
        HANDLED.store(true, Ordering::SeqCst);
    }

    /// The pid in the `LISTEN_PID=` slot at `slot`, once the child has
    /// written all of it (it ends the digits with a NUL; the test filled
    /// the slot with `x` before the clone).
    fn written_pid(slot: *const u8) -> Option<i32> {
        let mut pid: i32 = 0;
        for i in LISTEN_PID_PREFIX.len()..32 {
            // SAFETY: within the 32-byte slot, which outlives the watcher
            // (the test joins it before dropping the image). The child
            // writes it meanwhile, hence volatile byte reads; a read that
            // sees the NUL but not yet every digit sees an `x` there, and
            // is refused below.
            match unsafe { slot.add(i).read_volatile() } {
                0 => return (pid > 0).then_some(pid),
                d @ b'0'..=b'9' => pid = pid.checked_mul(10)?.checked_add(i32::from(d - b'0'))?,
                _ => return None,
            }
        }
        None
    }

    #[test]
    fn a_signal_to_the_child_before_exec_runs_no_handler_of_ours() {
        // SAFETY: an all-zero sigaction is valid; the handler only stores
        // to an atomic (async-signal-safe).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: a valid sigaction for SIGUSR1, which no other test uses.
        let installed = unsafe { libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) };
        assert_eq!(installed, 0);
        // Until one signal lands before `execve` (on a busy machine the
        // watcher can miss the window): the child then dies of it, by the
        // default action, and never runs the program.
        for _ in 0..20 {
            let Some((status, out)) = signal_the_child_early() else {
                return;
            };
            assert!(
                !HANDLED.load(Ordering::SeqCst),
                "our SIGUSR1 handler ran for a signal sent to the child ({status:?}, said {out:?})"
            );
            if status == Some(ExitStatus::Signal(libc::SIGUSR1)) && out.is_empty() {
                return;
            }
        }
        panic!("no signal reached the child before execve in 20 tries");
    }

    /// Starts `sh -c 'echo exec >&3'` with thousands of fds to move (the
    /// child spends a millisecond or more before it resets the handlers)
    /// while a thread sends SIGUSR1 to it as soon as its pid is in the
    /// `LISTEN_PID=` slot. Returns how it ended and what it said; `None`
    /// (having said why) when this process may not open that many fds.
    fn signal_the_child_early() -> Option<(Option<ExitStatus>, String)> {
        let n = 3000;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fds = vec![b.as_fd(); n];
        let argv: Vec<std::ffi::OsString> = ["sh", "-c", "echo exec >&3"]
            .iter()
            .map(|s| s.into())
            .collect();
        let mut image = match ExecImage::new(
            OsStr::new("/bin/sh"),
            &argv,
            std::iter::empty(),
            &fds,
            &mut Vec::new(),
        ) {
            Ok(image) => image,
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                eprintln!("SKIP: {n} fds need a higher RLIMIT_NOFILE: {e}");
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        drop(b);
        image.listen_pid[LISTEN_PID_PREFIX.len()..].fill(b'x');
        let slot = image.listen_pid.as_ptr() as usize;
        let me = std::process::id().to_string();
        let watcher = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                let Some(pid) = written_pid(slot as *const u8) else {
                    std::hint::spin_loop();
                    continue;
                };
                // Only our own unreaped child (its pid cannot be reused).
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
                if ppid != me {
                    return None;
                }
                // SAFETY: kill with a pid and a signal number.
                unsafe { libc::kill(pid, libc::SIGUSR1) };
                return Some(pid);
            }
            None
        });
        let child = spawn(&mut image, false, None).unwrap().expect_pidfd();
        let signalled = watcher.join().unwrap();
        drop(image);
        use std::io::Read;
        let mut out = String::new();
        (&a).read_to_string(&mut out).unwrap();
        let mut fds = [nix::poll::PollFd::new(
            child.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 10_000u16).unwrap(), 1);
        let status = reap(child.pidfd.as_fd()).unwrap();
        assert_eq!(
            signalled,
            Some(child.pid as i32),
            "the watcher saw the child"
        );
        Some((status, out))
    }
}
