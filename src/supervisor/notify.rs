//! The supervisor's notify socket: the receiving side of `sd_notify(3)`.
//!
//! A Unix datagram socket with `SO_PASSCRED`, so that each message carries
//! its sender's pid, in the supervisor's private runtime directory. The
//! program finds it in `NOTIFY_SOCKET`. What each assignment means here,
//! with systemd's semantics (`NotifyAccess=main`):
//!
//! | assignment | from the main process | from a new instance being started (`--reload restart`) |
//! |---|---|---|
//! | `READY=1` | started, or a reload has ended | ready: it becomes the main process |
//! | `RELOADING=1` | a reload has started; the next `READY=1` ends it | ignored |
//! | `MAINPID=<pid>` | `<pid>` is the main process from now on; it must be a live child of the supervisor (a program built on handover starts its new version with `CLONE_PARENT`, so it is) | ignored |
//! | `STOPPING=1` | the program is stopping; reloads are refused | ignored |
//! | `STATUS=<text>` | logged | logged |
//! | `EXTEND_TIMEOUT_USEC=<µs>` | extends the start or reload deadline to at least that long from now | the same, for its start |
//! | `BARRIER=1` + one fd | the fd is closed once every earlier message has been processed (`sd_notify_barrier(3)`) | the same |
//! | `ERRNO=`, `BUSERROR=` | logged | logged |
//! | anything else (`WATCHDOG=1`, `FDSTORE=1`, `MONOTONIC_USEC=`, ...) | ignored; fds sent along are closed | the same |
//!
//! Messages from any other process are refused (logged), as systemd does
//! with `NotifyAccess=main`, and their fds closed. As in systemd, within
//! one message `MAINPID=` is applied before `READY=1`, and `BARRIER=1` must
//! be alone in its message with exactly one fd.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sockopt, ControlMessageOwned, MsgFlags};

use crate::sys;

/// systemd's limit for one notify message (`NOTIFY_BUFFER_MAX`).
const MAX_MESSAGE: usize = 4096;
/// The most fds one `SCM_RIGHTS` message can carry (`SCM_MAX_FD`).
const MAX_FDS: usize = 253;

/// One message, parsed. Pure data: see [`parse`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Message {
    /// `READY=1`, `RELOADING=1` or `STOPPING=1`: the last one wins, as in
    /// systemd.
    pub(super) change: Option<Change>,
    pub(super) barrier: bool,
    pub(super) main_pid: Option<i32>,
    pub(super) status: Option<String>,
    pub(super) extend_timeout: Option<Duration>,
    pub(super) errno: Option<String>,
    pub(super) bus_error: Option<String>,
    /// Assignments that were malformed, to log.
    pub(super) problems: Vec<String>,
}

/// A change of state a message announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Ready,
    Reloading,
    Stopping,
}

/// Parses one datagram's text: newline-separated `KEY=VALUE` assignments.
/// Unknown keys are ignored; a malformed value is noted in `problems`.
pub(super) fn parse(text: &[u8]) -> Message {
    let mut m = Message::default();
    let mut fields = 0;
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        fields += 1;
        let Ok(line) = std::str::from_utf8(line) else {
            m.problems.push("an assignment is not valid UTF-8".into());
            continue;
        };
        let Some((key, value)) = line.split_once('=') else {
            m.problems.push(format!("{line:?} is not KEY=VALUE"));
            continue;
        };
        let flag = |m: &mut Message| {
            if value != "1" {
                m.problems
                    .push(format!("{key}={value:?}: only 1 is meaningful"));
            }
            value == "1"
        };
        match key {
            "READY" if flag(&mut m) => m.change = Some(Change::Ready),
            "RELOADING" if flag(&mut m) => m.change = Some(Change::Reloading),
            "STOPPING" if flag(&mut m) => m.change = Some(Change::Stopping),
            "BARRIER" => m.barrier |= flag(&mut m),
            "MAINPID" => match value.parse::<i32>() {
                Ok(pid) if pid > 0 && value.bytes().all(|b| b.is_ascii_digit()) => {
                    m.main_pid = Some(pid)
                }
                _ => m
                    .problems
                    .push(format!("MAINPID={value:?} is not a process id")),
            },
            "STATUS" => m.status = Some(value.to_owned()),
            "EXTEND_TIMEOUT_USEC" => match value.parse::<u64>() {
                Ok(us) => m.extend_timeout = Some(Duration::from_micros(us)),
                Err(_) => m
                    .problems
                    .push(format!("EXTEND_TIMEOUT_USEC={value:?} is not a number")),
            },
            "ERRNO" => m.errno = Some(value.to_owned()),
            "BUSERROR" => m.bus_error = Some(value.to_owned()),
            _ => {}
        }
    }
    if m.barrier && fields != 1 {
        // systemd ignores everything in such a message.
        return Message {
            problems: vec!["BARRIER=1 must be alone in its message; ignoring all of it".into()],
            ..Message::default()
        };
    }
    m
}

/// One datagram as received.
#[derive(Debug)]
pub(super) struct Datagram {
    /// The sender's pid (in the supervisor's pid namespace), from its
    /// credentials.
    pub(super) pid: Option<i32>,
    pub(super) text: Vec<u8>,
    /// The fds sent along; closed when the datagram is dropped.
    pub(super) fds: Vec<OwnedFd>,
    /// The message was longer than [`MAX_MESSAGE`] and was cut.
    pub(super) truncated: bool,
}

/// The bound notify socket; removes its file when dropped.
#[derive(Debug)]
pub(super) struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds at `path` (in the private runtime directory; a file left there
    /// by an earlier run is replaced). Must run inside a tokio runtime.
    pub(super) fn bind(path: &Path) -> io::Result<NotifySocket> {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a stale notify socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let std = std::os::unix::net::UnixDatagram::bind(path)?;
        nix::sys::socket::setsockopt(&std, sockopt::PassCred, &true)?;
        std.set_nonblocking(true)?;
        let socket = tokio::net::UnixDatagram::from_std(std)?;
        Ok(NotifySocket {
            socket,
            path: path.to_owned(),
        })
    }

    /// The value for `NOTIFY_SOCKET`.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until a datagram may be waiting.
    pub(super) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives one datagram without waiting; `Ok(None)` when none waits.
    pub(super) fn try_recv(&self) -> io::Result<Option<Datagram>> {
        match self.socket.try_io(tokio::io::Interest::READABLE, || {
            recv(self.socket.as_raw_fd())
        }) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn recv(fd: RawFd) -> io::Result<Datagram> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let len = msg.bytes;
    let mut pid = None;
    let mut fds = Vec::new();
    // The buffer has room for the most fds one message can carry, so the
    // control data is never cut (nix refuses to iterate it if it is).
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::ScmRights(raw) => fds.extend(sys::take_received_fds(&raw)),
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            _ => {}
        }
    }
    buf.truncate(len.min(MAX_MESSAGE));
    Ok(Datagram {
        pid,
        text: buf,
        fds,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_as_systemd_reads_them() {
        let m = parse(b"MAINPID=42\nREADY=1\nSTATUS=serving, generation 1\n");
        assert_eq!(
            (m.main_pid, m.change, m.status.as_deref()),
            (Some(42), Some(Change::Ready), Some("serving, generation 1"))
        );
        assert!(m.problems.is_empty(), "{:?}", m.problems);

        let m = parse(
            b"RELOADING=1\nMONOTONIC_USEC=123\nEXTEND_TIMEOUT_USEC=70000000\nSTATUS=upgrading",
        );
        assert_eq!(m.change, Some(Change::Reloading));
        assert_eq!(m.extend_timeout, Some(Duration::from_secs(70)));

        let m = parse(b"STOPPING=1\nSTATUS=stopping");
        assert_eq!(m.change, Some(Change::Stopping));
        // The last of READY=1, RELOADING=1, STOPPING=1 wins.
        assert_eq!(parse(b"READY=1\nSTOPPING=1").change, Some(Change::Stopping));
        assert_eq!(parse(b"RELOADING=1\nREADY=1").change, Some(Change::Ready));
        let m = parse(b"WATCHDOG=1\nFDSTORE=1\nFDNAME=x\nX_CUSTOM=1");
        assert_eq!(m, Message::default());
        let m = parse(b"ERRNO=2\nBUSERROR=org.x.Failed");
        assert_eq!(
            (m.errno.as_deref(), m.bus_error.as_deref()),
            (Some("2"), Some("org.x.Failed"))
        );
        // A status with '=' keeps everything after the first one.
        assert_eq!(parse(b"STATUS=a=b").status.as_deref(), Some("a=b"));
    }

    #[test]
    fn malformed_assignments_are_noted_and_skipped() {
        let cases: &[(&[u8], &str)] = &[
            (b"READY=2", "only 1 is meaningful"),
            (b"MAINPID=abc", "is not a process id"),
            (b"MAINPID=0", "is not a process id"),
            (b"MAINPID=-5", "is not a process id"),
            (b"MAINPID=+5", "is not a process id"),
            (b"EXTEND_TIMEOUT_USEC=x", "is not a number"),
            (b"garbage", "is not KEY=VALUE"),
            (b"STATUS=\xff\xfe", "not valid UTF-8"),
            (b"BARRIER=1\nREADY=1", "must be alone"),
        ];
        for (text, want) in cases {
            let m = parse(text);
            assert!(
                m.change.is_none() && m.main_pid.is_none(),
                "{text:?}: {m:?}"
            );
            assert!(
                m.problems.iter().any(|p| p.contains(want)),
                "{text:?}: {:?}",
                m.problems
            );
        }
        assert!(parse(b"BARRIER=1").barrier);
        assert!(parse(b"BARRIER=1\n").barrier);
    }

    #[tokio::test]
    async fn receives_credentials_and_fds_and_closes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.notify");
        let rx = NotifySocket::bind(&path).unwrap();
        use crate::notify::{Notifier, NotifyState};
        let tx = Notifier::new(path.to_str().unwrap()).unwrap();
        tx.notify(&[NotifyState::Ready, NotifyState::Status("hi")])
            .unwrap();
        rx.readable().await.unwrap();
        let d = rx.try_recv().unwrap().unwrap();
        assert_eq!(d.pid, Some(std::process::id() as i32));
        assert_eq!(d.text, b"READY=1\nSTATUS=hi");
        assert!(d.fds.is_empty() && !d.truncated);

        // The barrier: its fd arrives, and dropping the datagram releases it.
        let (barrier, ()) = tokio::join!(tx.barrier(Duration::from_secs(10)), async {
            loop {
                rx.readable().await.unwrap();
                if let Some(d) = rx.try_recv().unwrap() {
                    assert_eq!(parse(&d.text), parse(b"BARRIER=1"));
                    assert_eq!(d.fds.len(), 1);
                    break;
                }
            }
        });
        barrier.unwrap();
        assert!(rx.try_recv().unwrap().is_none());

        let long = "x".repeat(MAX_MESSAGE);
        tx.notify(&[NotifyState::Status(&long)]).unwrap();
        rx.readable().await.unwrap();
        let d = rx.try_recv().unwrap().unwrap();
        assert!(d.truncated);
        drop(rx);
        assert!(!path.exists(), "the socket file is removed on drop");
    }
}
