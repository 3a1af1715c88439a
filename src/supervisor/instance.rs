//! Starting instances of the program, and the handle on each one.
//!
//! Each instance gets the listeners at fds `3..3+n` (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, and `LISTEN_PID` written in the child after the clone,
//! without allocating), the supervisor's `NOTIFY_SOCKET`, and the
//! supervisor's own environment otherwise, without the variables that
//! describe one process. A failure between the clone and `execve` comes
//! back on a close-on-exec pipe that the program never holds: its end of
//! file means `execve` succeeded.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tokio::time::Instant;

use tokio::io::unix::AsyncFd;

use crate::handoff::{find_in_path, is_executable};
use crate::protocol::channel::FromNew;
use crate::protocol::env;
use crate::sys;

use super::ProgramExit;

/// Finds `program` as `execve` will run it: a path (made absolute against
/// the current directory) or a bare name looked up in `PATH`.
pub(super) fn resolve_program(program: &OsStr) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    if program.as_bytes().contains(&b'/') {
        let path = Path::new(program);
        let path = if path.is_absolute() {
            path.to_owned()
        } else {
            std::env::current_dir()
                .map_err(|e| format!("cannot read the current directory: {e}"))?
                .join(path)
        };
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("{} is not an executable file", path.display()))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    find_in_path(program, &search).ok_or_else(|| format!("{:?} is not found in PATH", program))
}

/// What every instance is started with.
#[derive(Debug)]
pub(super) struct Launcher {
    pub(super) path: PathBuf,
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    listeners: Vec<(String, OwnedFd)>,
}

impl Launcher {
    /// `argv[0]` is the program as given; `base_env` the supervisor's own.
    pub(super) fn new(
        path: PathBuf,
        argv: Vec<OsString>,
        base_env: impl IntoIterator<Item = (OsString, OsString)>,
        notify_socket: &Path,
        listeners: Vec<(String, OwnedFd)>,
    ) -> Launcher {
        let names: Vec<&str> = listeners.iter().map(|(n, _)| n.as_str()).collect();
        let env = env::supervised(base_env, notify_socket, &names);
        Launcher {
            path,
            argv,
            env,
            listeners,
        }
    }

    /// The names of the listeners, in fd order.
    pub(super) fn listener_names(&self) -> Vec<&str> {
        self.listeners.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Starts one instance, our own child. Must run inside a tokio runtime.
    pub(super) fn spawn(&self, generation: u32) -> io::Result<Instance> {
        let fds: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        let env = self.env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str()));
        let mut image = sys::ExecImage::new(
            self.path.as_os_str(),
            &self.argv,
            env,
            &fds,
            &mut Vec::new(),
        )?;
        let (report_rx, report_tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let spawned = sys::spawn_reporting(&mut image, report_tx.as_fd())?;
        // Only the child holds the write end now, until its execve.
        drop(report_tx);
        drop(image);
        let pidfd = spawned.pidfd;
        let report = sys::async_readable(report_rx).map_err(|(e, _)| e)?;
        Ok(Instance {
            pid: spawned.pid as i32,
            pidfd,
            exec: Exec::Unknown(report, Vec::new()),
            started: Instant::now(),
            generation,
        })
    }
}

/// Whether an instance's `execve` succeeded.
#[derive(Debug)]
pub(super) enum Exec {
    /// Not known yet: the report pipe, and what was read from it so far.
    Unknown(AsyncFd<OwnedFd>, Vec<u8>),
    /// It runs the program (or it was adopted through `MAINPID=`).
    Done,
    /// It could not: why.
    Failed(String),
}

/// One process the supervisor watches: an instance it started, or a
/// process a program announced with `MAINPID=`.
#[derive(Debug)]
pub(super) struct Instance {
    pub(super) pid: i32,
    pidfd: OwnedFd,
    pub(super) exec: Exec,
    pub(super) started: Instant,
    pub(super) generation: u32,
}

impl Instance {
    /// A process announced with `MAINPID=`, already checked to be a live,
    /// unreaped child of ours (so its pid cannot have been recycled).
    pub(super) fn adopt(pid: i32, generation: u32) -> io::Result<Instance> {
        Ok(Instance {
            pid,
            pidfd: sys::pidfd_open(pid)?,
            exec: Exec::Done,
            started: Instant::now(),
            generation,
        })
    }

    /// Sends `signal` through the pidfd (a no-op once it has exited).
    pub(super) fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        sys::pidfd_signal(self.pidfd.as_fd(), signal as i32)
    }

    /// Sends SIGKILL, logging a failure.
    pub(super) fn kill(&self) {
        if let Err(e) = self.signal(nix::sys::signal::Signal::SIGKILL) {
            tracing::error!(pid = self.pid, error = %e, "cannot kill");
        }
    }

    /// The report pipe while the outcome of `execve` is unknown.
    pub(super) fn exec_pending(&self) -> Option<&AsyncFd<OwnedFd>> {
        match &self.exec {
            Exec::Unknown(fd, _) => Some(fd),
            _ => None,
        }
    }

    /// Reads what the report pipe holds, without waiting (after
    /// [`exec_readable`] said it may hold something); settles
    /// [`Exec`] once the pipe is at its end.
    pub(super) fn poll_exec(&mut self) {
        let Exec::Unknown(fd, got) = &mut self.exec else {
            return;
        };
        let mut buf = [0u8; 64];
        let outcome = loop {
            match nix::unistd::read(fd.get_ref().as_fd(), &mut buf) {
                Ok(0) => break Some(std::mem::take(got)),
                Ok(n) if got.len() < 256 => got.extend_from_slice(&buf[..n]),
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => break None,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => break Some(format!("read {e}").into_bytes()),
            }
        };
        if let Some(line) = outcome {
            self.exec = if line.is_empty() {
                Exec::Done
            } else {
                Exec::Failed(describe_failure(&String::from_utf8_lossy(&line)))
            };
        }
    }

    /// Why it failed to start, if it did (reads the report pipe first).
    pub(super) fn exec_failure(&mut self) -> Option<String> {
        self.poll_exec();
        match &self.exec {
            Exec::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// How it ended, for a log line: the status, and why `execve` failed
    /// if it did.
    pub(super) fn describe_exit(&mut self, status: ProgramExit) -> String {
        match self.exec_failure() {
            Some(why) => format!("{why} ({status})"),
            None => status.to_string(),
        }
    }
}

/// Waits until the report pipe may hold something (or is at its end), and
/// clears the readiness first: [`Instance::poll_exec`] then reads until it
/// would block, so nothing that arrives later is missed.
pub(super) async fn exec_readable(fd: &AsyncFd<OwnedFd>) {
    if let Ok(mut guard) = fd.readable().await {
        guard.clear_ready();
    }
}

/// Turns the child's `exec <errno>` / `spawn <errno>` line (see
/// [`channel`](crate::protocol::channel), written by
/// `sys::spawn_reporting`) into a sentence.
fn describe_failure(line: &str) -> String {
    let line = line.trim_end();
    let errno = |e: i32| io::Error::from_raw_os_error(e);
    match FromNew::parse(line) {
        FromNew::ExecFailed(e) => format!("cannot execute the program: {}", errno(e)),
        FromNew::SpawnFailed(e) => format!("cannot set up the new process: {}", errno(e)),
        _ => format!("the new process failed before exec: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launcher(program: &str, argv: &[&str], listeners: Vec<(String, OwnedFd)>) -> Launcher {
        Launcher::new(
            program.into(),
            argv.iter().map(OsString::from).collect(),
            [
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("LISTEN_PID".into(), "1".into()),
                ("NOTIFY_SOCKET".into(), "/elsewhere".into()),
                ("KEEP".into(), "yes".into()),
            ],
            Path::new("/run/x.notify"),
            listeners,
        )
    }

    /// The fds of this process that a child inherits (no `O_CLOEXEC` in
    /// `/proc/self/fdinfo`).
    fn inheritable_fds() -> Vec<u32> {
        let mut out = vec![];
        for e in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            let Ok(fd) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let flags = std::fs::read_to_string(e.path()).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            });
            if flags.is_some_and(|f| f & libc::O_CLOEXEC as u32 == 0) {
                out.push(fd);
            }
        }
        out
    }

    async fn wait_exec(i: &mut Instance) {
        while let Some(fd) = i.exec_pending() {
            exec_readable(fd).await;
            i.poll_exec();
        }
    }

    #[tokio::test]
    async fn an_instance_gets_the_listeners_and_the_environment_and_no_report_fd() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let script = format!(
            "exec > {}; echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES $NOTIFY_SOCKET $KEEP\"; \
             ls /proc/$$/fd",
            out.display()
        );
        let l = launcher(
            "/bin/sh",
            &["sh", "-c", &script],
            vec![("http".into(), l.into())],
        );
        let mut i = l.spawn(1).unwrap();
        wait_exec(&mut i).await;
        assert!(matches!(i.exec, Exec::Done), "{:?}", i.exec);
        // It is our child: reap it.
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(i.pid), None).unwrap();
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            format!("{0} {0} 1 http /run/x.notify yes", i.pid)
        );
        // 0, 1, 2, the listener at 3, and whatever this test process holds
        // without FD_CLOEXEC (cargo's jobserver pipes): no report pipe.
        let mut fds: Vec<u32> = lines.map(|l| l.parse().unwrap()).collect();
        fds.sort();
        let mut want = vec![0, 1, 2, 3];
        want.extend(inheritable_fds().into_iter().filter(|fd| *fd > 3));
        want.sort();
        want.dedup();
        assert_eq!(fds, want, "{text}");
    }

    #[tokio::test]
    async fn an_exec_failure_comes_back_as_a_sentence() {
        let l = launcher("/nonexistent/program", &["program"], vec![]);
        let mut i = l.spawn(1).unwrap();
        wait_exec(&mut i).await;
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(i.pid), None);
        match &i.exec {
            Exec::Failed(why) => assert!(
                why.contains("cannot execute the program") && why.contains("No such file"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn programs_resolve_like_a_shell_finds_them() {
        assert_eq!(
            resolve_program("/bin/sh".as_ref()).unwrap(),
            PathBuf::from("/bin/sh")
        );
        let sh = resolve_program("sh".as_ref()).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        let e = resolve_program("no-such-program-here".as_ref()).unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
        let e = resolve_program("/etc/passwd".as_ref()).unwrap_err();
        assert!(e.contains("not an executable file"), "{e}");
        assert!(resolve_program("".as_ref()).is_err());
    }

    #[test]
    fn failures_read_as_sentences() {
        assert_eq!(
            describe_failure("exec 13\n"),
            "cannot execute the program: Permission denied (os error 13)"
        );
        assert_eq!(
            describe_failure("spawn 24"),
            "cannot set up the new process: Too many open files (os error 24)"
        );
        assert_eq!(
            describe_failure("bogus"),
            "the new process failed before exec: \"bogus\""
        );
        // Read from the pipe failed: not a line of the child's.
        assert!(describe_failure("read EBADF").contains("\"read EBADF\""));
    }
}
