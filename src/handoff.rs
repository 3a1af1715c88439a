//! Starting the new process and talking to it over the handoff channel
//! (see [`protocol`](crate::protocol) for what is said): the parent's side
//! ([`prepare`], [`Launch`], [`Child`]) and the child's ([`ParentLink`]).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::UpgradeError;
use crate::protocol::channel::{self, FromNew};
use crate::protocol::env::{self, Handoff};
use crate::sys;

/// The binary to run for the next generation, resolved at start-up.
#[derive(Debug, Clone)]
pub(crate) struct Executable {
    pub(crate) path: PathBuf,
    pub(crate) argv: Vec<OsString>,
}

impl Executable {
    /// `argv[0]` made absolute against the start directory (or found in
    /// `PATH` when it is a bare name), so that a binary replaced on disk, or
    /// a flipped `current -> releases/N` symlink, is what runs next.
    /// `/proc/self/exe` only as a fallback: it names the old file.
    pub(crate) fn current() -> Executable {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let path = argv
            .first()
            .and_then(|a0| resolve(Path::new(a0)))
            .or_else(|| std::fs::read_link("/proc/self/exe").ok())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        Executable { path, argv }
    }
}

fn resolve(argv0: &Path) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.as_os_str().as_bytes().contains(&b'/') {
        return if argv0.is_absolute() {
            Some(argv0.to_owned())
        } else {
            std::env::current_dir().ok().map(|d| d.join(argv0))
        };
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(argv0))
        .find(|p| is_executable(p))
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
            }
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The new process, from the parent's side.
#[derive(Debug)]
pub(crate) struct Child {
    pub(crate) pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    channel: BufReader<UnixStream>,
    /// The channel reached end of file: the child said all it will.
    channel_eof: bool,
    /// Our own child (standalone), which we must reap; otherwise the
    /// manager's.
    ours: bool,
    /// Killed when dropped: set until it was killed or handed over.
    armed: bool,
}

impl Drop for Child {
    /// An upgrade abandoned half-way (its future dropped, or a panic) must
    /// not leave the new process running unsupervised: kill it, and reap it
    /// in the background if it is ours.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = sys::pidfd_signal(self.pidfd.get_ref().as_fd(), libc::SIGKILL);
        tracing::warn!(pid = self.pid, "upgrade abandoned; new process killed");
        if !self.ours {
            return;
        }
        let (Ok(rt), Ok(fd)) = (
            tokio::runtime::Handle::try_current(),
            self.pidfd.get_ref().try_clone(),
        ) else {
            return;
        };
        rt.spawn(async move {
            if let Ok(fd) = sys::async_readable(fd) {
                if tokio::time::timeout(KILL_WAIT, fd.readable()).await.is_ok() {
                    let _ = sys::reap(fd.get_ref().as_fd());
                }
            }
        });
    }
}

/// Everything needed to start the new process, prepared on the caller's
/// thread (cheap); [`Launch::run`] then clones on a thread of its own, so
/// the copy of the page tables does not stall a runtime thread that serves.
pub(crate) struct Launch {
    image: sys::ExecImage,
    ours_end: std::os::unix::net::UnixStream,
    theirs: std::os::unix::net::UnixStream,
    reparent: bool,
    exe: PathBuf,
}

/// Prepares to start `exe` with `listeners` handed over. `env` replaces the
/// old process's environment (see [`env::next_generation`]); `state_len`
/// bytes of state follow on the channel.
pub(crate) fn prepare(
    exe: &Executable,
    listeners: &[(&str, BorrowedFd<'_>)],
    configured: &[&str],
    generation: u32,
    reparent: bool,
    env: Option<&[(OsString, OsString)]>,
    state_len: usize,
) -> Result<Launch, UpgradeError> {
    let spawn_err = |source| UpgradeError::Spawn {
        exe: exe.path.display().to_string(),
        cause: source,
    };
    let (ours_end, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
    let names: Vec<&str> = listeners.iter().map(|(n, _)| *n).collect();
    let handoff = Handoff {
        names: &names,
        configured,
        generation,
        state_len,
    };
    let env = env::next_generation(env, &handoff);
    let env = env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str()));
    let mut fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| *fd).collect();
    fds.push(theirs.as_fd());
    let image =
        sys::ExecImage::new(exe.path.as_os_str(), &exe.argv, env, &fds).map_err(spawn_err)?;
    Ok(Launch {
        image,
        ours_end,
        theirs,
        reparent,
        exe: exe.path.clone(),
    })
}

/// The stack of the thread that clones: it only makes a few system calls
/// (the new process runs on a copy of it until `execve`).
const SPAWN_STACK: usize = 64 * 1024;

impl Launch {
    /// Starts the new process. `spare` (an fd kept free for this moment,
    /// see [`crate::spare`]) is closed right before the clone, so that the
    /// pidfd finds a free slot even at the fd limit.
    ///
    /// The clone runs on a thread made for it with
    /// `std::thread::Builder`, which fails with an error where tokio's
    /// `spawn_blocking` would panic (no thread can be created: a pids limit,
    /// no memory): the upgrade then fails with that reason and the next one
    /// can start.
    pub(crate) async fn run(self, spare: Option<OwnedFd>) -> Result<Child, UpgradeError> {
        let Launch {
            mut image,
            ours_end,
            theirs,
            reparent,
            exe,
        } = self;
        let spawn_err = |source| UpgradeError::Spawn {
            exe: exe.display().to_string(),
            cause: source,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("handover-spawn".into())
            .stack_size(SPAWN_STACK)
            .spawn(move || {
                drop(spare);
                let spawned = sys::spawn(&mut image, reparent);
                drop(image);
                if let Err(Ok(orphan)) = tx.send(spawned) {
                    // The upgrade was abandoned meanwhile: nobody would
                    // ever kill or reap this process.
                    sys::kill_and_wait(&orphan, !reparent, KILL_WAIT);
                }
            })
            .map_err(|e| {
                spawn_err(io::Error::new(
                    e.kind(),
                    format!("cannot create a thread to start it: {e}"),
                ))
            })?;
        let spawned = rx
            .await
            .map_err(|_| spawn_err(io::Error::other("the thread starting it died")))?
            .map_err(spawn_err)?;
        // Our copies of the child's fds are gone with the image; the
        // channel's end goes now, so that the child's exit shows as EOF.
        drop(theirs);
        let pid = spawned.pid;
        let channel = ours_end
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(ours_end));
        let (channel, pidfd) = match channel {
            Ok(channel) => match sys::async_readable(spawned.pidfd) {
                Ok(pidfd) => (channel, pidfd),
                Err((e, pidfd)) => {
                    sys::kill_and_wait(&sys::Spawned { pid, pidfd }, !reparent, KILL_WAIT);
                    return Err(spawn_err(e));
                }
            },
            Err(e) => {
                sys::kill_and_wait(&spawned, !reparent, KILL_WAIT);
                return Err(spawn_err(e));
            }
        };
        Ok(Child {
            pid,
            pidfd,
            channel: BufReader::new(channel),
            channel_eof: false,
            ours: !reparent,
            armed: true,
        })
    }
}

const KILL_WAIT: Duration = Duration::from_secs(5);
const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to read what a process that exited left on the channel.
const EXIT_READ: Duration = Duration::from_secs(1);

impl Child {
    /// Waits for `ready`, at most `timeout`. On any failure the child is
    /// killed and (if ours) reaped before this returns.
    pub(crate) async fn wait_ready(
        &mut self,
        exe: &Path,
        timeout: Duration,
        state: &[u8],
    ) -> Result<(), UpgradeError> {
        let pid = self.pid;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut line = String::new();
        if !state.is_empty() {
            // The child reads the state in build(), before anything else.
            let written = tokio::select! {
                r = self.channel.get_mut().write_all(state) => r,
                _ = &mut deadline => {
                    self.kill().await;
                    return Err(UpgradeError::Timeout { pid, timeout });
                }
            };
            if written.is_err() {
                // It died first (EPIPE): say why, if it left a reason.
                let said = tokio::time::timeout(EXIT_READ, self.channel.read_line(&mut line)).await;
                let status = self.kill().await;
                return Err(match said {
                    Ok(Ok(_)) if !line.trim().is_empty() => {
                        FromNew::parse(line.trim_end()).into_failure(pid, exe)
                    }
                    _ => UpgradeError::ChildExited { pid, status },
                });
            }
        }
        let outcome = tokio::select! {
            r = self.channel.read_line(&mut line) => match r {
                Ok(0) => Err(None),
                Ok(_) => Ok(line.trim_end().to_owned()),
                // It exited without reading the state we wrote: Linux then
                // reports ECONNRESET instead of EOF (anything it wrote before
                // was read first).
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(None),
                Err(e) => Err(Some(UpgradeError::Channel(e))),
            },
            _ = self.pidfd.readable() => {
                // It exited: whatever it wrote before is in the socket buffer
                // (and partly in `line` already). Bounded, in case something
                // it started still holds its end of the channel.
                match tokio::time::timeout(EXIT_READ, self.channel.read_line(&mut line)).await {
                    Ok(Ok(_)) if !line.trim().is_empty() => Ok(line.trim_end().to_owned()),
                    _ => Err(None),
                }
            }
            _ = &mut deadline => {
                self.kill().await;
                return Err(UpgradeError::Timeout { pid, timeout });
            }
        };
        let err = match outcome.map(|line| FromNew::parse(&line)) {
            Ok(FromNew::Ready) => return Ok(()),
            Ok(msg) => msg.into_failure(pid, exe),
            Err(Some(e)) => e,
            Err(None) => UpgradeError::ChildExited {
                pid,
                status: String::new(),
            },
        };
        let status = self.kill().await;
        Err(match err {
            UpgradeError::ChildExited { pid, .. } => UpgradeError::ChildExited { pid, status },
            e => e,
        })
    }

    /// Tells the child it is the main process now.
    pub(crate) async fn confirm_main(&mut self) -> io::Result<()> {
        self.channel.get_mut().write_all(channel::main_line()).await
    }

    /// Kills the child (a no-op if it is gone), waits for it to exit, reaps
    /// it if it is ours, and says how it ended.
    pub(crate) async fn kill(&mut self) -> String {
        self.armed = false;
        if let Err(e) = sys::pidfd_signal(self.pidfd.get_ref().as_fd(), libc::SIGKILL) {
            tracing::error!(pid = self.pid, error = %e, "cannot kill the new process");
        }
        if tokio::time::timeout(KILL_WAIT, self.pidfd.readable())
            .await
            .is_err()
        {
            return "did not exit after SIGKILL".into();
        }
        self.reap_status()
    }

    fn reap_status(&self) -> String {
        if !self.ours {
            return "reaped by the service manager".into();
        }
        match sys::reap(self.pidfd.get_ref().as_fd()) {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running".into(),
            Err(e) => format!("cannot reap: {e}"),
        }
    }

    /// The child is the main process now: dropping this no longer kills
    /// it.
    pub(crate) fn handed_over(&mut self) {
        self.armed = false;
    }

    /// After the handoff: the next line the new process says, or its exit
    /// (reaped here if it is ours) once it has said everything.
    pub(crate) async fn next_event(&mut self) -> Event {
        loop {
            if self.channel_eof {
                let _ = self.pidfd.readable().await;
                return Event::Exited(self.reap_status());
            }
            let mut line = String::new();
            let said = tokio::select! {
                r = self.channel.read_line(&mut line) => r,
                _ = self.pidfd.readable() => {
                    // It exited: read what it wrote before, to the end
                    // (bounded, in case something it started holds its end).
                    tokio::time::timeout(EXIT_READ, self.channel.read_line(&mut line))
                        .await
                        .unwrap_or(Ok(0))
                }
            };
            match said {
                Ok(n) if n > 0 => {
                    if !line.trim().is_empty() {
                        return Event::Said(FromNew::parse(line.trim_end()));
                    }
                }
                _ => self.channel_eof = true,
            }
        }
    }
}

/// What a new process did after the handoff.
#[derive(Debug)]
pub(crate) enum Event {
    /// It said this (`upgraded <pid>`, `stopping`).
    Said(FromNew),
    /// It exited; how, as far as this process can know.
    Exited(String),
}

/// The handoff channel, from the child's side.
#[derive(Debug)]
pub(crate) struct ParentLink {
    stream: BufReader<UnixStream>,
}

impl ParentLink {
    /// Takes the channel; first reads `state_len` bytes of state the parent
    /// sends right after the start (blocking, bounded by `STATE_TIMEOUT`).
    /// On failure the fd comes back (when it can), to report the error on.
    pub(crate) fn new(
        fd: OwnedFd,
        state_len: usize,
    ) -> Result<(ParentLink, Vec<u8>), (io::Error, Option<OwnedFd>)> {
        let std = std::os::unix::net::UnixStream::from(fd);
        let setup = (|| {
            let mut state = vec![0; state_len];
            if state_len > 0 {
                use std::io::Read;
                std.set_read_timeout(Some(STATE_TIMEOUT))?;
                (&std).read_exact(&mut state)?;
            }
            std.set_nonblocking(true)?;
            Ok(state)
        })();
        let state = match setup {
            Ok(state) => state,
            Err(e) => return Err((e, Some(std.into()))),
        };
        // from_std gives nothing back on failure: keep a copy to report on.
        let copy = std.try_clone().ok();
        let stream = match UnixStream::from_std(std) {
            Ok(stream) => stream,
            Err(e) => return Err((e, copy.map(OwnedFd::from))),
        };
        Ok((
            ParentLink {
                stream: BufReader::new(stream),
            },
            state,
        ))
    }

    /// Says `ready` and waits for `main`. Returns `false` when the parent
    /// went away without saying it (it died, or gave up on us).
    pub(crate) async fn ready(&mut self) -> io::Result<bool> {
        let ready = FromNew::Ready.line();
        self.stream.get_mut().write_all(ready.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        Ok(channel::is_main(line.trim_end()))
    }

    /// The channel, once this process is main: it tells the parent that it
    /// let go of the service (`upgraded`, `stopping`).
    pub(crate) fn into_stream(self) -> UnixStream {
        self.stream.into_inner()
    }

    /// Reports a failure (from `Drop` or an error path): one line, written
    /// on the raw fd, waiting (bounded) until it is in the socket. tokio's
    /// `try_write` on a stream that the reactor has not seen writable yet
    /// writes nothing, and the parent would then only see the exit.
    pub(crate) fn fail(&self, reason: &str) {
        fail_raw(self.stream.get_ref().as_fd(), reason);
    }
}

/// How long a failing child waits for room in the channel for its reason.
const FAIL_WRITE: Duration = Duration::from_secs(1);

/// Reports `reason` on the channel `fd`: `fail <reason>`, one line.
pub(crate) fn fail_raw(fd: BorrowedFd<'_>, reason: &str) {
    let line = FromNew::Fail(reason.to_owned()).line();
    if let Err(e) = write_blocking(fd, line.as_bytes(), FAIL_WRITE) {
        tracing::debug!(error = %e, "cannot tell the parent why");
    }
}

/// Writes all of `buf` to the socket `fd`, blocking or not, waiting for room
/// at most `timeout`; never raises SIGPIPE.
pub(crate) fn write_blocking(
    fd: BorrowedFd<'_>,
    mut buf: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::sys::socket::{send, MsgFlags};
    let end = std::time::Instant::now() + timeout;
    while !buf.is_empty() {
        match send(
            fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let left = end.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
                match nix::poll::poll(&mut fds, ms) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_and_bare_names() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(resolve(Path::new("target/x")), Some(cwd.join("target/x")));
        assert_eq!(
            resolve(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        let sh = resolve(Path::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        assert_eq!(resolve(Path::new("")), None);
    }
}
