//! A strict `sd_notify(3)` client: path and abstract (`@`) sockets, and
//! `BARRIER=1`.
//!
//! `sd-notify` 0.5 has neither the barrier nor abstract sockets, and writes
//! `STATUS=` text raw (a newline would inject other fields), so the crate
//! speaks the protocol itself here, on `nix`. The messages carry the same
//! assignments as `sd-notify`'s, in the same order (`sd-notify` also ends
//! the last one with a newline); `tests/interop.rs` checks that.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use crate::error::Error;

/// A connection to the service manager's notify socket (`NOTIFY_SOCKET`).
///
/// # Example
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use handover::notify::Notifier;
///
/// if let Some(n) = Notifier::from_env()? {
///     n.send(&format!("STATUS={}", handover::notify::status_text("warming caches")))?;
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
    pub fn from_env() -> Result<Option<Notifier>, Error> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v.to_string_lossy()).map(Some),
        }
    }

    /// A notifier for the socket named like `NOTIFY_SOCKET`: an absolute
    /// path, or `@name` for an abstract socket.
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

    /// Sends one datagram of newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.send_with(message.as_bytes(), &[])
    }

    /// Sends `message` with `fds` attached (`SCM_RIGHTS`), as `FDSTORE=1`
    /// needs.
    pub fn send_with_fds(
        &self,
        message: &str,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.send_with(message.as_bytes(), &[ControlMessage::ScmRights(&raw)])
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
    /// fresh pipe and waits for the read end to see the hang-up.
    pub async fn barrier(&self, timeout: Duration) -> io::Result<()> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let fds = [write.as_fd().as_raw_fd()];
        self.send_with(b"BARRIER=1", &[ControlMessage::ScmRights(&fds)])?;
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

/// Makes `text` safe as a `STATUS=` value: control characters (a newline
/// would start a new assignment) become spaces.
///
/// ```
/// assert_eq!(handover::notify::status_text("a\nREADY=1"), "a READY=1");
/// ```
pub fn status_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
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
        n.send("READY=1\nSTATUS=ok").unwrap();
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
        n.send("WATCHDOG=1").unwrap();
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
        let err = n.send("READY=1").unwrap_err();
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

    #[test]
    fn status_text_has_no_newlines() {
        assert_eq!(status_text("x\r\ny\tz"), "x  y z");
    }
}
