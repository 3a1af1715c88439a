//! A strict `sd_notify(3)` client: typed messages ([`NotifyState`]),
//! path and abstract (`@`) sockets, and `BARRIER=1`.
//!
//! `sd-notify` 0.5 has neither the barrier nor abstract sockets, and writes
//! `STATUS=` text raw (a newline would inject other fields), so the crate
//! speaks the protocol itself here, on `nix`. The messages carry the same
//! assignments as `sd-notify`'s, in the same order (`sd-notify` also ends
//! the last one with a newline); `integration/tests/interop.rs` checks that.
//!
//! What the crate sends, and when:
//!
//! | when | message |
//! |---|---|
//! | `ready()` of a first process | `READY=1`, `STATUS=` |
//! | `ready()` of a new process, once main | `STATUS=` (its parent sent `READY=1` for it) |
//! | an upgrade starts | `RELOADING=1`, `MONOTONIC_USEC=`, `EXTEND_TIMEOUT_USEC=`, `STATUS=` |
//! | the new process is ready | `MAINPID=<new>`, `READY=1`, `STATUS=`; then `BARRIER=1` alone, with a pipe's write end |
//! | an upgrade failed | `READY=1`, `STATUS=<why>` |
//! | a stop, from the main process only | `STOPPING=1`, `STATUS=stopping` |
//! | every half `WATCHDOG_USEC` | `WATCHDOG=1` |
//! | [`Builder::fd_store`](crate::Builder::fd_store) | `FDSTORE=1`, `FDNAME=<listener>`, with the socket |

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use crate::error::Error;
use crate::protocol::one_line;

/// One assignment of a notify message (two for [`FdStore`](Self::FdStore)),
/// as `sd_notify(3)` describes them. A message is a slice of them, sent in
/// one datagram with [`Notifier::notify`]; values are written so that no
/// text can inject another assignment.
///
/// ```
/// use handover::notify::NotifyState;
///
/// let msg = [NotifyState::Ready, NotifyState::Status("warm\nSTOPPING=1")];
/// assert_eq!(NotifyState::encode(&msg), "READY=1\nSTATUS=warm STOPPING=1");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotifyState<'a> {
    /// `READY=1`: started, or a reload has ended.
    Ready,
    /// `RELOADING=1`: a reload has started; [`Ready`](Self::Ready) ends it.
    /// Send [`MonotonicUsec`](Self::MonotonicUsec) with it
    /// (`Type=notify-reload` requires it).
    Reloading,
    /// `STOPPING=1`: the service is stopping. Only ever from the main
    /// process, and never after a handoff: systemd would stop the service.
    Stopping,
    /// `MONOTONIC_USEC=`: `CLOCK_MONOTONIC` in microseconds when the reload
    /// started (see [`monotonic_usec`]).
    MonotonicUsec(u64),
    /// `STATUS=`: a line for `systemctl status`. Control characters
    /// (newlines included) are sent as spaces.
    Status(&'a str),
    /// `MAINPID=`: the service's main process is this pid from now on.
    MainPid(u32),
    /// `WATCHDOG=1`: the watchdog keep-alive ping.
    Watchdog,
    /// `EXTEND_TIMEOUT_USEC=`: the current start, reload or stop may take
    /// this many microseconds more from now.
    ExtendTimeoutUsec(u64),
    /// `FDSTORE=1` and `FDNAME=<name>`: keep the fds sent along (with
    /// [`Notifier::notify_with_fds`]) in the fd store under `name`. Control
    /// characters in `name` are sent as spaces; systemd accepts up to 255
    /// printable characters without `:`, as listener names are.
    FdStore {
        /// The name the fds are stored (and passed back) under.
        name: &'a str,
    },
    /// `BARRIER=1`: only through [`Notifier::barrier`], which sends it alone
    /// with the fd it needs.
    Barrier,
}

impl NotifyState<'_> {
    /// The message `states` make: their assignments, one per line, in
    /// order (no newline after the last one).
    pub fn encode(states: &[NotifyState<'_>]) -> String {
        let lines: Vec<String> = states.iter().map(NotifyState::assignment).collect();
        lines.join("\n")
    }

    fn assignment(&self) -> String {
        match self {
            NotifyState::Ready => "READY=1".into(),
            NotifyState::Reloading => "RELOADING=1".into(),
            NotifyState::Stopping => "STOPPING=1".into(),
            NotifyState::MonotonicUsec(us) => format!("MONOTONIC_USEC={us}"),
            NotifyState::Status(text) => format!("STATUS={}", one_line(text)),
            NotifyState::MainPid(pid) => format!("MAINPID={pid}"),
            NotifyState::Watchdog => "WATCHDOG=1".into(),
            NotifyState::ExtendTimeoutUsec(us) => format!("EXTEND_TIMEOUT_USEC={us}"),
            NotifyState::FdStore { name } => format!("FDSTORE=1\nFDNAME={}", one_line(name)),
            NotifyState::Barrier => "BARRIER=1".into(),
        }
    }
}

/// A connection to the service manager's notify socket (`NOTIFY_SOCKET`).
///
/// # Example
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use handover::notify::{Notifier, NotifyState};
///
/// if let Some(n) = Notifier::from_env()? {
///     n.notify(&[NotifyState::Status("warming caches")])?;
///     n.barrier(std::time::Duration::from_secs(5)).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: UnixAddr,
    name: String,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` if it is set. `Ok(None)` when it is unset
    /// or empty (not running under a manager that listens): notifying is then
    /// a no-op for the caller, not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] when `NOTIFY_SOCKET` is neither an absolute path nor
    /// `@` and a name, or no socket can be created.
    pub fn from_env() -> Result<Option<Notifier>, Error> {
        match std::env::var_os(crate::protocol::env::NOTIFY_SOCKET) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v.to_string_lossy()).map(Some),
        }
    }

    /// A notifier for the socket named like `NOTIFY_SOCKET`: an absolute
    /// path, or `@name` for an abstract socket.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] when `socket` is neither, or no socket can be
    /// created.
    pub fn new(socket: &str) -> Result<Notifier, Error> {
        let err = |source| Error::Notify {
            socket: socket.to_owned(),
            cause: source,
        };
        let addr = if let Some(abs) = socket.strip_prefix('@') {
            UnixAddr::new_abstract(abs.as_bytes()).map_err(|e| err(e.into()))?
        } else if socket.starts_with('/') {
            UnixAddr::new(std::ffi::OsStr::new(socket).as_bytes()).map_err(|e| err(e.into()))?
        } else {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET must be an absolute path or start with '@'",
            )));
        };
        let socket_fd = UnixDatagram::unbound().map_err(err)?;
        Ok(Notifier {
            socket: socket_fd,
            addr,
            name: socket.to_owned(),
        })
    }

    /// The socket's name as given (`/run/...` or `@...`).
    pub fn socket_name(&self) -> &str {
        &self.name
    }

    /// Sends `states` in one datagram.
    ///
    /// # Errors
    ///
    /// The OS error when the datagram cannot be sent (`ECONNREFUSED`: nobody
    /// listens any more); `InvalidInput` for [`FdStore`](NotifyState::FdStore)
    /// (it needs fds: [`notify_with_fds`](Self::notify_with_fds)) and
    /// [`Barrier`](NotifyState::Barrier) (it needs its own fd:
    /// [`barrier`](Self::barrier)).
    pub fn notify(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        self.notify_with_fds(states, &[])
    }

    /// Sends `states` with `fds` attached (`SCM_RIGHTS`), as
    /// [`FdStore`](NotifyState::FdStore) needs.
    ///
    /// # Errors
    ///
    /// As [`notify`](Self::notify); `FdStore` without fds is `InvalidInput`.
    pub fn notify_with_fds(
        &self,
        states: &[NotifyState<'_>],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        let invalid = |why: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()));
        if states.contains(&NotifyState::Barrier) {
            return invalid("BARRIER=1 goes alone with its own fd: use Notifier::barrier");
        }
        let stores = states
            .iter()
            .any(|s| matches!(s, NotifyState::FdStore { .. }));
        if stores && fds.is_empty() {
            return invalid("FDSTORE=1 needs the fds to store");
        }
        let message = NotifyState::encode(states);
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if raw.is_empty() {
            self.send_with(message.as_bytes(), &[])
        } else {
            self.send_with(message.as_bytes(), &[ControlMessage::ScmRights(&raw)])
        }
    }

    fn send_with(&self, message: &[u8], cmsgs: &[ControlMessage<'_>]) -> io::Result<()> {
        let iov = [IoSlice::new(message)];
        let n = sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.addr),
        )?;
        if n != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to the notify socket",
            ));
        }
        Ok(())
    }

    /// Waits until the manager has processed every message sent before
    /// (`sd_notify_barrier(3)`): sends `BARRIER=1` with the write end of a
    /// fresh pipe and waits for the read end to see the hang-up. It proves
    /// the order, not that the manager accepted the messages.
    ///
    /// # Errors
    ///
    /// The OS error when the pipe cannot be made or the message not sent;
    /// `TimedOut` when the manager has not processed it within `timeout`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future only stops the wait (the manager
    /// may still process the barrier; nothing depends on it).
    pub async fn barrier(&self, timeout: Duration) -> io::Result<()> {
        self.barrier_with(None, timeout).await
    }

    /// [`barrier`](Self::barrier) with `pipe` (read end, write end;
    /// close-on-exec) made ahead of time, so that it needs no fd slot now
    /// (see `spare`); a fresh pipe without one.
    pub(crate) async fn barrier_with(
        &self,
        pipe: Option<(OwnedFd, OwnedFd)>,
        timeout: Duration,
    ) -> io::Result<()> {
        let (read, write) = match pipe {
            Some(pipe) => pipe,
            None => {
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?
            }
        };
        let fds = [write.as_fd().as_raw_fd()];
        let barrier = NotifyState::encode(&[NotifyState::Barrier]);
        self.send_with(barrier.as_bytes(), &[ControlMessage::ScmRights(&fds)])?;
        drop(write);
        let read = crate::sys::async_readable(read).map_err(|(e, _)| e)?;
        match tokio::time::timeout(timeout, read.readable()).await {
            Ok(guard) => guard.map(drop),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the manager did not process BARRIER=1 within {timeout:?}"),
            )),
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    // clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux; 0 if it did.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let usecs = u64::try_from(ts.tv_nsec()).unwrap_or(0) / 1_000;
            secs.saturating_mul(1_000_000).saturating_add(usecs)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        (dir, sock, path.to_str().unwrap().to_owned())
    }

    #[test]
    fn sends_to_a_path_socket() {
        let (_d, rx, path) = receiver();
        let n = Notifier::new(&path).unwrap();
        n.notify(&[NotifyState::Ready, NotifyState::Status("ok")])
            .unwrap();
        let mut buf = [0; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("handover-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        use std::os::linux::net::SocketAddrExt;
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.notify(&[NotifyState::Watchdog]).unwrap();
        let mut buf = [0; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn refuses_a_relative_socket_and_reports_a_dead_one() {
        assert!(matches!(
            Notifier::new("relative/path"),
            Err(Error::Notify { .. })
        ));
        let (_d, rx, path) = receiver();
        drop(rx);
        let n = Notifier::new(&path).unwrap();
        let err = n.notify(&[NotifyState::Ready]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[tokio::test]
    async fn barrier_waits_for_the_receiver_to_close_the_fd() {
        let (_d, rx, path) = receiver();
        let n = Notifier::new(&path).unwrap();
        let manager = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = nix::sys::socket::recvmsg::<()>(
                rx.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .unwrap();
            let mut fds = vec![];
            for c in msg.cmsgs().unwrap() {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            let len = msg.bytes;
            assert_eq!(&buf[..len], b"BARRIER=1");
            assert_eq!(fds.len(), 1);
            // Closing the fd is what tells the sender the barrier passed.
            nix::unistd::close(fds[0]).unwrap();
        });
        n.barrier(Duration::from_secs(10)).await.unwrap();
        manager.join().unwrap();
    }

    #[tokio::test]
    async fn barrier_times_out_when_nobody_processes_it() {
        let (_d, _rx, path) = receiver();
        let n = Notifier::new(&path).unwrap();
        let err = n.barrier(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// Every assignment as systemd spells it; no value can start a line.
    #[test]
    fn messages_encode_as_sd_notify_spells_them() {
        use NotifyState::*;
        let msg = [
            MainPid(42),
            Ready,
            Status("a\nSTOPPING=1"),
            Reloading,
            MonotonicUsec(7),
            ExtendTimeoutUsec(9),
            Stopping,
            Watchdog,
            FdStore {
                name: "http\nREADY=1",
            },
        ];
        assert_eq!(
            NotifyState::encode(&msg),
            "MAINPID=42\nREADY=1\nSTATUS=a STOPPING=1\nRELOADING=1\nMONOTONIC_USEC=7\n\
             EXTEND_TIMEOUT_USEC=9\nSTOPPING=1\nWATCHDOG=1\nFDSTORE=1\nFDNAME=http READY=1"
        );
    }

    #[test]
    fn a_barrier_or_a_store_without_fds_is_refused() {
        let (_d, rx, path) = receiver();
        let n = Notifier::new(&path).unwrap();
        for msg in [
            &[NotifyState::Barrier][..],
            &[NotifyState::FdStore { name: "x" }],
        ] {
            let err = n.notify(msg).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        }
        let file = std::fs::File::open("/dev/null").unwrap();
        n.notify_with_fds(&[NotifyState::FdStore { name: "x" }], &[file.as_fd()])
            .unwrap();
        let mut buf = [0; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=x");
    }
}
