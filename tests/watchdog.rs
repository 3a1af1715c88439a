//! `WATCHDOG=1` and `EXTEND_TIMEOUT_USEC=` against a notify socket the test
//! owns: each message's sender is read from `SCM_CREDENTIALS`, so the test
//! sees the first process ping, then the new one once it was handed over.

#[path = "support/server.rs"]
mod server;

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;

/// One datagram: sender pid, text, how many fds came with it (closed at
/// once: closing the barrier's fd is what releases it).
fn receive(sock: &UnixDatagram, timeout: Duration) -> (i32, String, usize) {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [std::os::fd::RawFd; 4]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap_or_else(|e| panic!("no notify message within {timeout:?}: {e}"));
    let (mut pid, mut fds) = (0, vec![]);
    for c in msg.cmsgs().unwrap() {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = cred.pid(),
            ControlMessageOwned::ScmRights(raw) => fds.extend(raw),
            _ => {}
        }
    }
    let len = msg.bytes;
    for &fd in &fds {
        nix::unistd::close(fd).unwrap();
    }
    (
        pid,
        String::from_utf8_lossy(&buf[..len]).into_owned(),
        fds.len(),
    )
}

#[test]
fn watchdog_pings_move_to_the_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    setsockopt(&sock, sockopt::PassCred, &true).unwrap();
    let pid_file = dir.path().join("hello.pid");
    let mut child = Command::new(server::example("hello"))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "100000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = child.id() as i32;
    let t = Duration::from_secs(20);

    let (pid, text, _) = receive(&sock, t);
    assert_eq!(
        (pid, text.lines().next()),
        (first, Some("READY=1")),
        "{text}"
    );
    let (pid, text, _) = receive(&sock, t);
    assert_eq!((pid, text.as_str()), (first, "WATCHDOG=1"));

    kill(Pid::from_raw(first), Signal::SIGHUP).unwrap();
    let mut new = 0;
    let mut handed_over = false;
    let end = Instant::now() + t;
    loop {
        assert!(Instant::now() < end, "no WATCHDOG=1 from the new process");
        let (pid, text, fds) = receive(&sock, t);
        if text.starts_with("RELOADING=1") {
            assert!(text.contains("\nEXTEND_TIMEOUT_USEC="), "{text}");
        } else if let Some(rest) = text.strip_prefix("MAINPID=") {
            new = rest.lines().next().unwrap().parse().unwrap();
        } else if text == "BARRIER=1" {
            assert_eq!(fds, 1, "BARRIER=1 carries exactly one fd");
            handed_over = true;
        } else if text == "WATCHDOG=1" && pid == new {
            assert!(handed_over, "the new process pinged before it was main");
            break;
        }
    }
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "the old process exits 0"
    );
    // The new process is a child of ours (CLONE_PARENT: our child's parent).
    kill(Pid::from_raw(new), Signal::SIGTERM).unwrap();
    let status = nix::sys::wait::waitpid(Pid::from_raw(new), None).unwrap();
    assert!(
        matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
        "{status:?}"
    );
}
