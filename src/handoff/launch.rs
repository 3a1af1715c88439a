//! The parent's side of a handoff: the new process prepared, started, and
//! followed through its pidfd and the channel.
//!
//! At the fd limit the clone may find no slot for the pidfd (another thread
//! took the one freed for it, see `spare`): the process is then started
//! without one and followed by its pid and the channel.
//!
//! | | with a pidfd | by pid (no slot for a pidfd) |
//! |---|---|---|
//! | its exit | the pidfd becomes readable | the channel reaches end of file (the new process holds its end until it exits, close-on-exec in anything it starts) |
//! | kill | `pidfd_send_signal` | `kill(pid)`: ours always (its pid is not reused before we reap it), unless the application has the kernel reap its children (SIGCHLD ignored); else only while its channel is open, checked (`POLLHUP`) right before the signal |
//! | reap (ours) | `waitid(P_PIDFD)` when readable | a pidfd opened then if a slot is free, else `waitid(P_PID, WNOHANG)` at growing intervals |

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::Executable;
use crate::error::UpgradeError;
use crate::protocol::channel::{self, FromNew};
use crate::protocol::env::{self, Handoff};
use crate::spare::Reserved;
use crate::upgrade::{Event, NewProcess, Plan};
use crate::{sys, task};

/// Everything needed to start the new process, prepared while the plan
/// borrows the listeners; [`Launch::run`] then clones.
pub(super) struct Launch {
    image: sys::ExecImage,
    ours_end: std::os::unix::net::UnixStream,
    theirs: std::os::unix::net::UnixStream,
    reparent: bool,
    exe: PathBuf,
    /// Closed right before the clone, for the pidfd.
    for_pidfd: Option<OwnedFd>,
}

/// Prepares to start `exe` as `plan` says (see [`env::next_generation`]
/// for its environment); with `reparent`, as the service manager's child.
/// `reserved` holds the channel and the slots for the copies, made ahead
/// (see `spare`); what it lacks is made now.
pub(super) fn prepare(
    exe: &Executable,
    plan: &Plan<'_>,
    reparent: bool,
    reserved: Reserved,
) -> Result<Launch, UpgradeError> {
    let spawn_err = |source| UpgradeError::Spawn {
        exe: exe.path.display().to_string(),
        cause: source,
    };
    let Reserved {
        channel,
        mut slots,
        for_pidfd,
        barrier: _,
    } = reserved;
    let (ours_end, theirs) = match channel {
        Some(pair) => pair,
        None => std::os::unix::net::UnixStream::pair().map_err(spawn_err)?,
    };
    let names: Vec<&str> = plan.listeners.iter().map(|(n, _)| *n).collect();
    let handoff = Handoff {
        names: &names,
        configured: plan.configured,
        generation: plan.generation,
        state_len: plan.state_len,
    };
    let env = env::next_generation(plan.env, &handoff);
    let env = env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str()));
    let mut fds: Vec<BorrowedFd<'_>> = plan.listeners.iter().map(|(_, fd)| *fd).collect();
    fds.push(theirs.as_fd());
    let image = sys::ExecImage::new(exe.path.as_os_str(), &exe.argv, env, &fds, &mut slots)
        .map_err(spawn_err)?;
    Ok(Launch {
        image,
        ours_end,
        theirs,
        reparent,
        exe: exe.path.clone(),
        for_pidfd,
    })
}

impl Launch {
    /// Starts the new process. The slot kept for the pidfd is closed right
    /// before the clone (see [`sys::spawn`]); without a pidfd the process
    /// is followed by its pid (see the module docs).
    ///
    /// The clone blocks the calling thread until the new process has called
    /// `execve` (`CLONE_VFORK`): upgrades run on the crate's own thread
    /// ([`crate::side`]), where that stalls no serving. Nothing is awaited
    /// between the clone and the [`Child`] that kills the process if the
    /// upgrade is abandoned, so no process can be left behind unsupervised.
    pub(super) async fn run(self) -> Result<Child, UpgradeError> {
        let Launch {
            mut image,
            ours_end,
            theirs,
            reparent,
            exe,
            for_pidfd,
        } = self;
        let spawn_err = |source| UpgradeError::Spawn {
            exe: exe.display().to_string(),
            cause: source,
        };
        let spawned = sys::spawn(&mut image, reparent, for_pidfd).map_err(spawn_err)?;
        drop(image);
        // Our copies of the child's fds are gone with the image; the
        // channel's end goes now, so that the child's exit shows as EOF.
        drop(theirs);
        let pid = spawned.pid;
        let channel = ours_end
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(ours_end));
        if spawned.pidfd.is_none() {
            tracing::warn!(
                new_pid = pid,
                "no fd slot for the new process's pidfd (at the fd limit); following it by its pid"
            );
        }
        let (channel, pidfd) = match channel {
            Ok(channel) => match spawned.pidfd.map(sys::async_readable).transpose() {
                Ok(pidfd) => (channel, pidfd),
                Err((e, pidfd)) => {
                    let started = sys::Started {
                        pid,
                        pidfd: Some(pidfd),
                    };
                    sys::kill_and_wait(&started, !reparent, KILL_WAIT);
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
            exe,
            pidfd,
            channel: BufReader::new(channel),
            pending: Vec::new(),
            channel_eof: false,
            ours: !reparent,
            armed: true,
        })
    }
}

/// How long a killed process may take to exit.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long to read what a process that exited left on the channel.
const EXIT_READ: Duration = Duration::from_secs(1);

/// The new process, from the parent's side.
#[derive(Debug)]
pub(crate) struct Child {
    pid: u32,
    /// What it runs, for messages.
    exe: PathBuf,
    /// `None` when no fd slot was free for it: followed by its pid (see the
    /// module docs).
    pidfd: Option<AsyncFd<OwnedFd>>,
    channel: BufReader<UnixStream>,
    /// What `next_event` read of a line not yet complete: kept here, so
    /// that a cancelled `next_event` loses nothing.
    pending: Vec<u8>,
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
        self.send_kill();
        tracing::warn!(pid = self.pid, "upgrade abandoned; new process killed");
        if !self.ours {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(pidfd) = &self.pidfd else {
            let pid = self.pid;
            task::spawn_on(&rt, async move {
                let _ = wait_for_our_child(pid, Some(KILL_WAIT)).await;
            });
            return;
        };
        let Ok(fd) = pidfd.get_ref().try_clone() else {
            return;
        };
        task::spawn_on(&rt, async move {
            if let Ok(fd) = sys::async_readable(fd) {
                if tokio::time::timeout(KILL_WAIT, fd.readable()).await.is_ok() {
                    let _ = sys::reap(fd.get_ref().as_fd());
                }
            }
        });
    }
}

impl NewProcess for Child {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait_ready(&mut self, state: &[u8]) -> Result<(), UpgradeError> {
        let pid = self.pid;
        let exe = self.exe.clone();
        let exe = exe.as_path();
        let mut line = String::new();
        if !state.is_empty() {
            // The child reads the state in build(), before anything else.
            let written = self.channel.get_mut().write_all(state).await;
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
            _ = exited(self.pidfd.as_ref()) => {
                // It exited: whatever it wrote before is in the socket buffer
                // (and partly in `line` already). Bounded, in case something
                // it started still holds its end of the channel.
                match tokio::time::timeout(EXIT_READ, self.channel.read_line(&mut line)).await {
                    Ok(Ok(_)) if !line.trim().is_empty() => Ok(line.trim_end().to_owned()),
                    _ => Err(None),
                }
            }
        };
        if matches!(outcome, Err(None)) {
            self.channel_eof = true;
        }
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

    async fn confirm_main(&mut self) -> io::Result<()> {
        self.channel.get_mut().write_all(channel::main_line()).await
    }

    /// Also reaps it, if it is ours.
    async fn kill(&mut self) -> String {
        self.armed = false;
        self.send_kill();
        let Some(pidfd) = &self.pidfd else {
            if !self.ours {
                return "killed by its pid (no pidfd at the fd limit); reaped by the service manager"
                    .into();
            }
            return wait_for_our_child(self.pid, Some(KILL_WAIT))
                .await
                .unwrap_or_else(|| "did not exit after SIGKILL".into());
        };
        if tokio::time::timeout(KILL_WAIT, pidfd.readable())
            .await
            .is_err()
        {
            return "did not exit after SIGKILL".into();
        }
        self.reap_status()
    }

    fn handed_over(&mut self) {
        self.armed = false;
    }

    /// Reaps it, if it is ours, once it has exited. Cancel-safe: a line
    /// read in part is kept for the next call.
    async fn next_event(&mut self) -> Event {
        loop {
            if let Some(line) = self.complete_line() {
                if !line.trim().is_empty() {
                    return Event::Said(FromNew::parse(&line));
                }
                continue;
            }
            if self.channel_eof {
                let Some(pidfd) = &self.pidfd else {
                    if !self.ours {
                        return Event::Exited(
                            "its channel closed (its exit is not seen without a pidfd)".into(),
                        );
                    }
                    let status = wait_for_our_child(self.pid, None).await;
                    return Event::Exited(status.unwrap_or_default());
                };
                let _ = pidfd.readable().await;
                return Event::Exited(self.reap_status());
            }
            let said = tokio::select! {
                r = self.channel.read_until(b'\n', &mut self.pending) => r,
                _ = exited(self.pidfd.as_ref()) => {
                    // It exited: read what it wrote before, to the end
                    // (bounded, in case something it started holds its end).
                    tokio::time::timeout(EXIT_READ, self.channel.read_until(b'\n', &mut self.pending))
                        .await
                        .unwrap_or(Ok(0))
                }
            };
            if !matches!(said, Ok(n) if n > 0) {
                self.channel_eof = true;
            }
        }
    }
}

impl Child {
    /// The next line read in full (or cut by the end of the channel),
    /// without its newline.
    fn complete_line(&mut self) -> Option<String> {
        let complete = self.pending.last() == Some(&b'\n');
        let cut = self.channel_eof && !self.pending.is_empty();
        if !(complete || cut) {
            return None;
        }
        let line = std::mem::take(&mut self.pending);
        Some(String::from_utf8_lossy(&line).trim_end().to_owned())
    }

    /// SIGKILL, through the pidfd; without one by its pid, only while the
    /// pid can only name it (see `pid_is_still_its_own`).
    fn send_kill(&self) {
        let sent = match &self.pidfd {
            Some(pidfd) => sys::pidfd_signal(pidfd.get_ref().as_fd(), libc::SIGKILL),
            None if self.pid_is_still_its_own() => sys::kill_pid(self.pid, libc::SIGKILL),
            None => Ok(()),
        };
        if let Err(e) = sent {
            tracing::error!(pid = self.pid, error = %e, "cannot kill the new process");
        }
    }

    /// Without a pidfd: whether `pid` can only name the process started.
    /// Ours, while we have not reaped it, unless the application has the
    /// kernel reap its children (SIGCHLD ignored); else only while its
    /// channel is open, checked right before the signal (it holds its end
    /// until it exits; a process it forked without `execve` could hold it
    /// too, which is the one case where the pid could be reused meanwhile).
    fn pid_is_still_its_own(&self) -> bool {
        if self.ours && !sys::children_reaped_by_kernel() {
            return true;
        }
        !self.channel_eof && !sys::hung_up(self.channel.get_ref().as_fd())
    }

    fn reap_status(&self) -> String {
        if !self.ours {
            return "reaped by the service manager".into();
        }
        let Some(pidfd) = &self.pidfd else {
            return match sys::reap_pid(self.pid) {
                Ok(Some(status)) => status.to_string(),
                Ok(None) => "still running".into(),
                Err(e) => format!("cannot reap: {e}"),
            };
        };
        match sys::reap(pidfd.get_ref().as_fd()) {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running".into(),
            Err(e) => format!("cannot reap: {e}"),
        }
    }
}

/// Resolves when the process behind `pidfd` has exited; never without one
/// (its channel's end of file says it then).
async fn exited(pidfd: Option<&AsyncFd<OwnedFd>>) {
    match pidfd {
        Some(fd) => drop(fd.readable().await),
        None => std::future::pending().await,
    }
}

/// Waits for our own child `pid` to exit, at most `bound`, and reaps it;
/// how it ended, or `None` at the bound. Through a pidfd opened now if a
/// slot is free (race-free: the pid is ours until reaped); else by
/// `waitid(WNOHANG)` at growing intervals (1 ms to 1 s): at the fd limit
/// nothing else tells a process without a pidfd that its child exited.
async fn wait_for_our_child(pid: u32, bound: Option<Duration>) -> Option<String> {
    let end = bound.map(|b| tokio::time::Instant::now() + b);
    let before =
        |end: Option<tokio::time::Instant>| end.is_none_or(|e| tokio::time::Instant::now() < e);
    let pidfd = i32::try_from(pid)
        .ok()
        .and_then(|p| sys::pidfd_open(p).ok())
        .and_then(|fd| sys::async_readable(fd).ok());
    if let Some(fd) = pidfd {
        let done = match end {
            Some(end) => tokio::time::timeout_at(end, fd.readable()).await.is_ok(),
            None => fd.readable().await.is_ok(),
        };
        if !done {
            return None;
        }
        return Some(match sys::reap(fd.get_ref().as_fd()) {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running".into(),
            Err(e) => format!("cannot reap: {e}"),
        });
    }
    let mut pause = Duration::from_millis(1);
    loop {
        match sys::reap_pid(pid) {
            Ok(Some(status)) => return Some(status.to_string()),
            Ok(None) => {}
            Err(e) => return Some(format!("cannot reap: {e}")),
        }
        if !before(end) {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
