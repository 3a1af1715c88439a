//! Interoperability with the two crates the library does not use: a program that reads its
//! sockets with `listenfd` or `sd-notify`, started as our new process, finds them as it would
//! under systemd; and our notify messages parse the same as `sd-notify`'s.

use nix::sys::signal::Signal;

use support::http::get;
use support::notify::{assignments, value, Datagram, NotifySocket};
use support::process::{monotonic_usec, reap, signal};
use support::server::{Deployed, Server, BROKEN_BUILD};
use support::{program, TIMEOUT};

/// The probe (`src/bin/listenfd_probe.rs`) is deployed over a running hello and started by a
/// SIGHUP upgrade, exactly as a new version would be. It reports what `sd-notify` and
/// `listenfd` see, then exits 3, so hello keeps serving.
#[test]
fn a_listenfd_program_finds_our_listener_as_under_systemd() {
    let exe = Deployed::copy(program!("hello"));
    let out = exe.dir().join("probe.txt");
    let server = Server::start(
        exe.path(),
        &[],
        &[("LISTENFD_PROBE_OUT", out.to_str().unwrap())],
    );
    let addr = server.addr();
    let pid = server.pid().unwrap();

    exe.replace(&std::fs::read(program!("listenfd_probe")).unwrap(), 0o755);
    let from = server.log.len();
    signal(pid, Signal::SIGHUP);
    // It wrote its report before exiting; hello saw the upgrade fail.
    let needles = ["upgrade failed", &format!("old_pid={pid}")];
    server.log.wait_line(from, &needles, TIMEOUT);

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
    assert_eq!(get(addr, "/").status, 200);
}

/// The next datagram that is neither a `WATCHDOG=1` ping nor an `FDSTORE=1` push: those come
/// on their own clocks and go to `aside`.
fn next(notify: &NotifySocket, aside: &mut Aside) -> Datagram {
    loop {
        let d = notify.recv();
        if d.text == "WATCHDOG=1" {
            aside.pings.push(d);
        } else if d.text.starts_with("FDSTORE=1") {
            aside.stored.push(d);
        } else {
            return d;
        }
    }
}

/// [`next`], which must come from `sender`.
#[track_caller]
fn next_from(notify: &NotifySocket, aside: &mut Aside, sender: u32) -> Datagram {
    let d = next(notify, aside);
    assert_eq!(d.sender, sender, "{d:?}");
    d
}

/// What a `RELOADING=1` of the upgrade to `generation` means in sd-notify's terms, the time
/// taken from the message (checked apart): the extended timeout is hello's upgrade timeout (5 s)
/// plus the 10 s the old process allows for the barrier.
fn reloading(d: &Datagram, generation: u32) -> String {
    let usec = value(&d.text, "MONOTONIC_USEC");
    format!(
        "Reloading\nMonotonicUsec {usec}\nExtendTimeoutUsec 15000000\n\
         Status upgrading to generation {generation}"
    )
}

/// Datagrams that do not come in a fixed order.
#[derive(Default)]
struct Aside {
    pings: Vec<Datagram>,
    stored: Vec<Datagram>,
}

/// Runs hello under a notify socket of our own through everything it
/// announces: start with the fd store, watchdog pings, an upgrade, a failed
/// upgrade, a stop. For each message, the test states what it means as
/// `sd_notify::NotifyState`s (values it cannot know, like the time, are
/// taken from our message once checked), has sd-notify send those to the
/// same socket, and compares.
#[test]
fn our_notify_messages_parse_as_sd_notify_ones() {
    let notify = NotifySocket::bind();
    let socket = notify.path();
    let exe = Deployed::copy(program!("hello"));
    let server = Server::start(
        exe.path(),
        &["--fd-store", "--upgrade-timeout", "5"],
        &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "200000")],
    );
    let addr = server.addr();
    let p0 = server.child.id();
    let mut aside = Aside::default();
    // (our message, what it means in sd-notify's terms)
    let mut ours: Vec<(Datagram, String)> = vec![];

    // 1. Ready.
    let d = next_from(&notify, &mut aside, p0);
    ours.push((d, format!("Ready\nStatus serving, generation 0, pid {p0}")));

    // 2. An upgrade: RELOADING=1 with the time, MAINPID= + READY=1 from the
    // old process, the barrier, then the new one's own STATUS=.
    let before = monotonic_usec();
    signal(p0, Signal::SIGHUP);
    let d = next_from(&notify, &mut aside, p0);
    let usec: u64 = value(&d.text, "MONOTONIC_USEC").parse().unwrap();
    assert!((before..=monotonic_usec()).contains(&usec), "{d:?}");
    let meaning = reloading(&d, 1);
    ours.push((d, meaning));
    let d = next_from(&notify, &mut aside, p0);
    let p1: u32 = value(&d.text, "MAINPID").parse().unwrap();
    ours.push((
        d,
        format!("MainPid {p1}\nReady\nStatus serving, generation 1, pid {p1}"),
    ));
    let d = next(&notify, &mut aside);
    assert_eq!(
        (d.text.as_str(), d.sender, d.nfds),
        ("BARRIER=1", p0, 1),
        "alone in its datagram, with one fd (sd_notify_barrier(3)); sd-notify has no barrier"
    );
    let d = next_from(&notify, &mut aside, p1);
    ours.push((d, format!("Status serving, generation 1, pid {p1}")));
    assert_eq!(reap(p0, TIMEOUT), 0);
    assert_eq!(server.pid(), Some(p1));

    // 3. A failed upgrade: READY=1 again, with the reason.
    exe.replace(BROKEN_BUILD, 0o755);
    let from = server.log.len();
    signal(p1, Signal::SIGHUP);
    let d = next_from(&notify, &mut aside, p1);
    let meaning = reloading(&d, 2);
    ours.push((d, meaning));
    let d = next_from(&notify, &mut aside, p1);
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
        .wait_line(from, &["new process started", "generation=2"], TIMEOUT);
    let failed: u32 = line.split("new_pid=").nth(1).unwrap().parse().unwrap();
    assert_eq!(reap(failed, TIMEOUT), 3);

    // 4. A stop.
    signal(p1, Signal::SIGTERM);
    let d = next_from(&notify, &mut aside, p1);
    ours.push((d, "Stopping\nStatus stopping".to_owned()));
    assert_eq!(reap(p1, TIMEOUT), 0);

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
        assert_eq!(d.fds[0].local_addr(), addr);
    }

    // Now sd-notify sends the same states to the same socket.
    let mut sender = support::server::command(program!("sd_notify_send"));
    sender
        .args(ours.iter().map(|(_, s)| s))
        .env("NOTIFY_SOCKET", socket);
    let mut sender = Server::spawn(sender, None);
    let sender_pid = sender.child.id();
    let (code, stderr) = sender.output();
    assert_eq!(code, 0, "the sd-notify sender failed: {stderr}");
    eprintln!(
        "comparing {} of our messages with sd-notify's ({} watchdog pings seen)",
        ours.len(),
        aside.pings.len() + 1
    );
    for (d, states) in &ours {
        let theirs = next(&notify, &mut Aside::default());
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
