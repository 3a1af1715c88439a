//! A notify socket of the test's own, standing in for the service manager: the datagrams a
//! program sends to `$NOTIFY_SOCKET`, each with its sender's pid (`SO_PASSCRED`) and the fds
//! that came with it.
//!
//! A thread reads the socket, as the manager would. Like the manager, it answers a
//! `BARRIER=1` by closing the fd that came with it (which is what the sender waits for), unless
//! the test holds the barriers ([`NotifySocket::hold_barriers`]) to look at the handoff
//! between the barrier and its release.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{
    getsockname, recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn,
    UnixCredentials,
};

use crate::TIMEOUT;

/// An fd that came with a datagram, closed when dropped.
#[derive(Debug)]
pub struct ReceivedFd(RawFd);

impl ReceivedFd {
    /// The IPv4 address the socket is bound to (a stored listener's).
    pub fn local_addr(&self) -> SocketAddr {
        let addr: SockaddrIn = getsockname(self.0).expect("getsockname of a received fd");
        SocketAddr::V4(SocketAddrV4::from(addr))
    }
}

impl Drop for ReceivedFd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

/// One datagram.
#[derive(Debug)]
pub struct Datagram {
    /// The message.
    pub text: String,
    /// The sending process.
    pub sender: u32,
    /// How many fds came with it.
    pub nfds: usize,
    /// Those fds, but a barrier's (closed at once, or held by the socket).
    pub fds: Vec<ReceivedFd>,
}

#[derive(Default)]
struct State {
    /// Every datagram's text, in order of arrival.
    texts: Vec<String>,
    /// The datagrams not taken yet by [`NotifySocket::recv`].
    queue: VecDeque<Datagram>,
    /// `Some`: barrier fds are held here instead of closed.
    held: Option<Vec<ReceivedFd>>,
    /// Control data did not fit (more fds than expected).
    truncated: bool,
}

/// A bound notify socket and its reader; the socket file lives in a temporary directory.
pub struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl NotifySocket {
    /// Binds a socket and starts reading it.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        setsockopt(&sock, sockopt::PassCred, &true).unwrap();
        let shared: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let (reader, s) = (sock.try_clone().unwrap(), shared.clone());
        std::thread::spawn(move || read_datagrams(&reader, &s));
        NotifySocket {
            _dir: dir,
            path,
            sock,
            shared,
        }
    }

    /// The socket's path, the value of `NOTIFY_SOCKET`.
    pub fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temporary path")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        let state = self.shared.0.lock().unwrap();
        assert!(
            !state.truncated,
            "a datagram came with more fds than expected"
        );
        state
    }

    /// The next datagram not taken yet, waiting for it at most [`TIMEOUT`].
    pub fn recv(&self) -> Datagram {
        let end = Instant::now() + TIMEOUT;
        let mut state = self.state();
        loop {
            if let Some(d) = state.queue.pop_front() {
                return d;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no notify datagram within {TIMEOUT:?}");
            state = self.shared.1.wait_timeout(state, left).unwrap().0;
        }
    }

    /// The next datagram not taken yet, if one has arrived.
    pub fn try_recv(&self) -> Option<Datagram> {
        self.state().queue.pop_front()
    }

    /// How many datagrams have arrived.
    pub fn len(&self) -> usize {
        self.state().texts.len()
    }

    /// Whether none has arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits (at most [`TIMEOUT`]) for a datagram after the first `from` that contains every
    /// one of `needles`; returns its text.
    pub fn wait_message(&self, from: usize, needles: &[&str]) -> String {
        let end = Instant::now() + TIMEOUT;
        let mut state = self.state();
        loop {
            if let Some(m) = state
                .texts
                .iter()
                .skip(from)
                .find(|m| needles.iter().all(|n| m.contains(n)))
            {
                return m.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no notify message with {needles:?}; got {:#?}",
                state.texts
            );
            state = self.shared.1.wait_timeout(state, left).unwrap().0;
        }
    }

    /// Holds every `BARRIER=1` from now on, until [`NotifySocket::release_barriers`].
    pub fn hold_barriers(&self) {
        self.state().held.get_or_insert_with(Vec::new);
    }

    /// Answers the held barriers (closes their fds) and holds no more.
    pub fn release_barriers(&self) {
        drop(self.state().held.take());
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        // Wakes the reader with an empty read and no credentials.
        let _ = self.sock.shutdown(std::net::Shutdown::Read);
    }
}

/// The reader thread: every datagram into `shared`, until the socket is shut down.
fn read_datagrams(sock: &UnixDatagram, shared: &(Mutex<State>, Condvar)) {
    loop {
        let mut buf = vec![0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 8]);
        // CLOEXEC: an fd inherited by a process another test spawns would hold a barrier
        // until that process exits.
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        let (mut sender, mut fds) = (0, Vec::new());
        for c in msg.cmsgs().into_iter().flatten() {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => sender = cred.pid() as u32,
                ControlMessageOwned::ScmRights(raw) => fds.extend(raw.into_iter().map(ReceivedFd)),
                _ => {}
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let len = msg.bytes;
        if sender == 0 {
            // No credentials: the socket was shut down (see Drop).
            return;
        }
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let nfds = fds.len();
        let mut state = shared.0.lock().unwrap();
        state.truncated |= truncated;
        if text.starts_with("BARRIER=1") {
            // Closing the fd is the manager's answer; held, it waits.
            if let Some(held) = &mut state.held {
                held.append(&mut fds);
            }
            fds.clear();
        }
        state.texts.push(text.clone());
        state.queue.push_back(Datagram {
            text,
            sender,
            nfds,
            fds,
        });
        shared.1.notify_all();
    }
}

/// The assignments of a notify message the way systemd reads one: newline-separated
/// `KEY=VALUE`, empty lines skipped.
pub fn assignments(text: &str) -> Vec<(&str, &str)> {
    text.split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l:?} in {text:?}"))
        })
        .collect()
}

/// The value of `key` in a notify message.
pub fn value<'a>(text: &'a str, key: &str) -> &'a str {
    assignments(text)
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
        .1
}
