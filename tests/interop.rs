//! Interoperability with the two crates the library does not use
//! (DESIGN §3): a program that reads its sockets with `listenfd` or
//! `sd-notify`, started as our new process, finds them as it would under
//! systemd; and our notify messages parse the same as `sd-notify`'s.

#[path = "support/server.rs"]
mod server;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;

use server::{become_subreaper, deploy, fresh_example, get, reap, Server};

const T: Duration = Duration::from_secs(30);

/// The probe (`examples/listenfd_probe.rs`) is deployed over a running
/// hello and started by a SIGHUP upgrade, exactly as a new version would be.
/// It reports what `sd-notify` and `listenfd` see, then exits 3, so hello
/// keeps serving.
#[test]
fn a_listenfd_program_finds_our_listener_as_under_systemd() {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hello");
    deploy(&exe, &std::fs::read(fresh_example("hello")).unwrap(), 0o755);
    let out = dir.path().join("probe.txt");
    let server = Server::start(
        &exe,
        &["--addr", "127.0.0.1:0"],
        &[("LISTENFD_PROBE_OUT", out.to_str().unwrap())],
    );
    let addr = server.addr();
    let pid = server.pid().unwrap();

    deploy(
        &exe,
        &std::fs::read(fresh_example("listenfd_probe")).unwrap(),
        0o755,
    );
    let from = server.log.len();
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    // It wrote its report before exiting; hello saw the upgrade fail.
    server
        .log
        .wait_line(from, &["upgrade failed", &format!("old_pid={pid}")], T);

    let report = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines,
        [
            "listen_pid_is_mine=true",
            // sd-notify: fd 3, named as in listen_tcp("http", ...).
            "sd_notify=3:http",
            // listenfd: one fd, a TCP listener on hello's address, and
            // listening (accept would block, rather than EINVAL).
            "listenfd_len=1",
            &format!("listenfd=0:tcp:{addr}:accept=WouldBlock"),
        ],
        "{report}"
    );
    assert_eq!(server.pid(), Some(pid), "hello still serves");
    assert_eq!(get(addr, "/").0, 200);
}

/// One datagram received on the test's notify socket.
#[derive(Debug)]
struct Datagram {
    text: String,
    sender: u32,
    /// How many fds came with it.
    nfds: usize,
    /// Those fds, except a barrier's (closed at once).
    fds: Vec<OwnedFd>,
}

/// A notify socket of the test's own, read by a thread: what a service
/// manager would receive. `BARRIER=1` fds are closed as soon as they arrive,
/// as the manager does (the sender waits for that).
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
    rx: mpsc::Receiver<Datagram>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        setsockopt(&sock, sockopt::PassCred, &true).unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = sock.try_clone().unwrap();
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; 4096];
            let (len, sender, mut fds) = {
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [i32; 8]);
                let msg = match recvmsg::<()>(
                    reader.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => panic!("recvmsg: {e}"),
                };
                let (mut sender, mut fds) = (0, vec![]);
                for c in msg.cmsgs().unwrap() {
                    match c {
                        ControlMessageOwned::ScmCredentials(cred) => sender = cred.pid() as u32,
                        ControlMessageOwned::ScmRights(raw) => {
                            use std::os::fd::FromRawFd;
                            // SAFETY: the kernel just installed these fds
                            // in this process, and nothing else owns them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                        _ => {}
                    }
                }
                (msg.bytes, sender, fds)
            };
            if sender == 0 {
                // No credentials: the socket was shut down (see Drop).
                return;
            }
            let text = String::from_utf8(buf[..len].to_vec()).unwrap();
            let nfds = fds.len();
            if text.starts_with("BARRIER=1") {
                // Closing the fd is the manager's answer.
                fds.clear();
            }
            if tx
                .send(Datagram {
                    text,
                    sender,
                    nfds,
                    fds,
                })
                .is_err()
            {
                return;
            }
        });
        NotifySocket {
            _dir: dir,
            path,
            sock,
            rx,
        }
    }

    /// The next datagram that is neither a `WATCHDOG=1` ping nor an
    /// `FDSTORE=1` push: those come on their own clocks and go to `aside`.
    fn next(&self, aside: &mut Aside) -> Datagram {
        let end = std::time::Instant::now() + T;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let d = self
                .rx
                .recv_timeout(left)
                .expect("a notify datagram within the timeout");
            if d.text == "WATCHDOG=1" {
                aside.pings.push(d);
            } else if d.text.starts_with("FDSTORE=1") {
                aside.stored.push(d);
            } else {
                return d;
            }
        }
    }
}

/// Datagrams that do not come in a fixed order.
#[derive(Default)]
struct Aside {
    pings: Vec<Datagram>,
    stored: Vec<Datagram>,
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        // Wakes the reader with an empty read and no credentials.
        let _ = self.sock.shutdown(std::net::Shutdown::Read);
    }
}

/// The assignments of a notify message the way systemd reads one
/// (newline-separated `KEY=VALUE`; empty lines are skipped).
fn assignments(text: &str) -> Vec<(&str, &str)> {
    text.split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l:?} in {text:?}"))
        })
        .collect()
}

fn value<'a>(text: &'a str, key: &str) -> &'a str {
    assignments(text)
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
        .1
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// Messages for `sd_notify_sender`: one `sd_notify::NotifyState` per line
/// as `Variant value`, messages separated by an empty line.
const STATES_ENV: &str = "HANDOVER_INTEROP_SD_NOTIFY_STATES";

/// Not a test of its own: the `sd-notify` side of
/// `our_notify_messages_parse_as_sd_notify_ones`, run by that test in a
/// child process (this test binary, filtered to this function). sd-notify
/// 0.5 only sends to `$NOTIFY_SOCKET` (no function takes a socket path), and
/// setting it in the test process would race with other tests' threads
/// reading the environment; the child gets it from `Command::env`. Without
/// `HANDOVER_INTEROP_SD_NOTIFY_STATES` it does nothing.
#[test]
fn sd_notify_sender() {
    use sd_notify::NotifyState;
    let Ok(spec) = std::env::var(STATES_ENV) else {
        return;
    };
    for message in spec.split("\n\n") {
        let states: Vec<NotifyState<'_>> = message
            .lines()
            .map(|l| {
                let (variant, v) = l.split_once(' ').unwrap_or((l, ""));
                match variant {
                    "Ready" => NotifyState::Ready,
                    "Reloading" => NotifyState::Reloading,
                    "Stopping" => NotifyState::Stopping,
                    "Watchdog" => NotifyState::Watchdog,
                    "Status" => NotifyState::Status(v),
                    "MainPid" => NotifyState::MainPid(v.parse().unwrap()),
                    "MonotonicUsec" => NotifyState::MonotonicUsec(v.parse().unwrap()),
                    "ExtendTimeoutUsec" => NotifyState::ExtendTimeoutUsec(v.parse().unwrap()),
                    other => panic!("unknown state {other:?}"),
                }
            })
            .collect();
        sd_notify::notify(&states).unwrap();
    }
}

/// Runs hello under a notify socket of our own through everything it
/// announces: start with the fd store, watchdog pings, an upgrade, a failed
/// upgrade, a stop. For each message, the test states what it means as
/// `sd_notify::NotifyState`s (values it cannot know, like the time, are
/// taken from our message once checked), has sd-notify send those to the
/// same socket, and compares.
#[test]
fn our_notify_messages_parse_as_sd_notify_ones() {
    become_subreaper();
    let notify = NotifySocket::bind();
    let socket = notify.path.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hello");
    deploy(&exe, &std::fs::read(fresh_example("hello")).unwrap(), 0o755);
    let server = Server::start(
        &exe,
        &[
            "--addr",
            "127.0.0.1:0",
            "--fd-store",
            "--upgrade-timeout",
            "5",
        ],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "200000")],
    );
    let addr = server.addr();
    let p0 = server.child.id();
    // Upgrade timeout plus the 10 s the old process allows for the barrier.
    let extend = "15000000";
    let mut aside = Aside::default();
    // (our message, what it means in sd-notify's terms)
    let mut ours: Vec<(Datagram, String)> = vec![];

    // 1. Ready.
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p0, "{d:?}");
    ours.push((d, format!("Ready\nStatus serving, generation 0, pid {p0}")));

    // 2. An upgrade: RELOADING=1 with the time, MAINPID= + READY=1 from the
    // old process, the barrier, then the new one's own STATUS=.
    let before = monotonic_usec();
    kill(Pid::from_raw(p0 as i32), Signal::SIGHUP).unwrap();
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p0, "{d:?}");
    let usec: u64 = value(&d.text, "MONOTONIC_USEC").parse().unwrap();
    assert!((before..=monotonic_usec()).contains(&usec), "{d:?}");
    ours.push((
        d,
        format!(
            "Reloading\nMonotonicUsec {usec}\nExtendTimeoutUsec {extend}\n\
             Status upgrading to generation 1"
        ),
    ));
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p0, "{d:?}");
    let p1: u32 = value(&d.text, "MAINPID").parse().unwrap();
    ours.push((
        d,
        format!("MainPid {p1}\nReady\nStatus serving, generation 1, pid {p1}"),
    ));
    let d = notify.next(&mut aside);
    assert_eq!(
        (d.text.as_str(), d.sender, d.nfds),
        ("BARRIER=1", p0, 1),
        "alone in its datagram, with one fd (sd_notify_barrier(3)); sd-notify has no barrier"
    );
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p1, "{d:?}");
    ours.push((d, format!("Status serving, generation 1, pid {p1}")));
    assert_eq!(reap(p0, T), 0);
    assert_eq!(server.pid(), Some(p1));

    // 3. A failed upgrade: READY=1 again, with the reason.
    deploy(&exe, b"#!/bin/sh\nexit 3\n", 0o755);
    let from = server.log.len();
    kill(Pid::from_raw(p1 as i32), Signal::SIGHUP).unwrap();
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p1, "{d:?}");
    let usec = value(&d.text, "MONOTONIC_USEC").to_owned();
    ours.push((
        d,
        format!(
            "Reloading\nMonotonicUsec {usec}\nExtendTimeoutUsec {extend}\n\
             Status upgrading to generation 2"
        ),
    ));
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p1, "{d:?}");
    let status = value(&d.text, "STATUS").to_owned();
    assert!(
        status.starts_with("upgrade to generation 2 failed: ")
            && status.ends_with(&format!("; still serving, pid {p1}")),
        "{status}"
    );
    ours.push((d, format!("Ready\nStatus {status}")));
    // The failed process was the test's child (made so for the manager).
    let (_, line) = server
        .log
        .wait_line(from, &["new process started", "generation=2"], T);
    let failed: u32 = line.split("new_pid=").nth(1).unwrap().parse().unwrap();
    assert_eq!(reap(failed, T), 3);

    // 4. A stop.
    kill(Pid::from_raw(p1 as i32), Signal::SIGTERM).unwrap();
    let d = notify.next(&mut aside);
    assert_eq!(d.sender, p1, "{d:?}");
    ours.push((d, "Stopping\nStatus stopping".to_owned()));
    assert_eq!(reap(p1, T), 0);

    // 5. Watchdog pings, from both generations.
    for p in [p0, p1] {
        assert!(
            aside.pings.iter().any(|d| d.sender == p),
            "no WATCHDOG=1 from {p}"
        );
    }
    let ping = aside.pings.swap_remove(0);
    ours.push((ping, "Watchdog".to_owned()));

    // 6. The listener the first process bound itself went to the fd store,
    // from the main process, with the socket attached. sd-notify has
    // FdStore/FdName only behind its `fdstore` feature (not enabled here),
    // so this one is checked against sd_notify(3) only.
    assert!(
        aside.stored.iter().any(|d| d.sender == p0),
        "no FDSTORE=1 from {p0}"
    );
    for d in aside.stored {
        assert_eq!((d.text.as_str(), d.nfds), ("FDSTORE=1\nFDNAME=http", 1));
        assert!([p0, p1].contains(&d.sender), "{d:?}");
        let stored = std::net::TcpListener::from(d.fds.into_iter().next().unwrap());
        assert_eq!(stored.local_addr().unwrap(), addr);
    }

    // Now sd-notify sends the same states to the same socket.
    let spec: Vec<&str> = ours.iter().map(|(_, s)| s.as_str()).collect();
    let mut sender = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sd_notify_sender",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NOTIFY_SOCKET", &socket)
        .env(STATES_ENV, spec.join("\n\n"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sender_pid = sender.id();
    let status = sender.wait().unwrap();
    assert!(status.success(), "the sd-notify sender failed: {status}");
    eprintln!(
        "comparing {} of our messages with sd-notify's ({} watchdog pings seen)",
        ours.len(),
        aside.pings.len() + 1
    );
    for (d, states) in &ours {
        let theirs = notify.next(&mut Aside::default());
        assert_eq!(theirs.sender, sender_pid, "{theirs:?}");
        // What systemd reads: the same assignments, in the same order.
        assert_eq!(
            assignments(&d.text),
            assignments(&theirs.text),
            "ours {:?}, sd-notify's {:?} for {states:?}",
            d.text,
            theirs.text
        );
        // Byte for byte, the one difference: sd-notify ends every
        // assignment with a newline, the last one included; we send none
        // after the last, like the examples in sd_notify(3).
        assert_eq!(format!("{}\n", d.text), theirs.text);
    }
}
