//! The hello example run by hand (no systemd): PID file, `kill -HUP`,
//! continuous load, real processes.

#[path = "support/load.rs"]
mod load;
#[path = "support/server.rs"]
mod server;

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use server::{
    alive, become_subreaper, deploy, example, fd_kinds, reap, wait_for, zombie_children, Server,
};

const T: Duration = Duration::from_secs(30);

fn load_config() -> load::LoadConfig {
    load::LoadConfig {
        keepalive_clients: 4,
        per_request_clients: 4,
        ..load::LoadConfig::default()
    }
}

/// Waits until the load has completed `n` more requests than `since`:
/// proof that traffic flows at this moment.
fn traffic_flows(load: &load::Load, n: u64) {
    let since = load.ok();
    wait_for("requests to flow", T, || {
        (load.ok() >= since + n).then_some(())
    });
}

#[test]
fn twenty_sighup_upgrades_under_load_lose_nothing() {
    become_subreaper();
    let hello = example("hello");
    let server = Server::start(&hello, &["--addr", "127.0.0.1:0"], &[]);
    let addr = server.addr();
    let first = server.pid().unwrap();
    let baseline = fd_kinds(first);

    let load = load::Load::start(addr, load_config());
    traffic_flows(&load, 50);
    let mut pids = vec![first];
    for i in 1..=20 {
        let (old, new) = server.upgrade(T);
        assert!(!pids.contains(&new), "upgrade {i}: pid {new} seen before");
        pids.push(new);
        let code = reap(old, T);
        assert_eq!(code, 0, "upgrade {i}: old process {old} exited with {code}");
        traffic_flows(&load, 20);
    }
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_errors();
    assert!(
        report.ok > 1000,
        "too little load to prove anything: {report}"
    );

    let last = *pids.last().unwrap();
    for old in &pids[..pids.len() - 1] {
        assert!(!alive(*old), "old process {old} survived");
    }
    assert!(zombie_children(last).is_empty(), "zombies under {last}");
    // Same fds as the first process once the clients are gone.
    wait_for("the fds to settle to the first process's set", T, || {
        (fd_kinds(last) == baseline).then_some(())
    });

    kill(Pid::from_raw(last as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(last, T), 0);
    assert!(
        server.pid().is_none(),
        "the PID file is removed on a real stop"
    );
}

/// hello run from a copy in a temporary directory (so the test can replace
/// the binary on disk), with the given upgrade timeout in seconds.
fn hello_from_a_copy(
    upgrade_timeout: &str,
) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, Server) {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hello");
    let real = std::fs::read(example("hello")).unwrap();
    deploy(&exe, &real, 0o755);
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--upgrade-timeout",
        upgrade_timeout,
    ];
    let server = Server::start(&exe, &args, &[]);
    (dir, exe, real, server)
}

#[test]
fn failed_upgrades_keep_the_old_process_serving() {
    let (_dir, exe, real, server) = hello_from_a_copy("1");
    let addr = server.addr();
    let pid = server.pid().unwrap();
    let load = load::Load::start(addr, load_config());
    traffic_flows(&load, 50);

    let cases: [(&str, &[u8], u32, &[&str]); 3] = [
        (
            "exits with an error",
            b"#!/bin/sh\necho 'cannot start' >&2\nexit 3\n",
            0o755,
            &["upgrade failed", "exit status 3"],
        ),
        (
            "never becomes ready",
            b"#!/bin/sh\nexec sleep 30\n",
            0o755,
            &["upgrade failed", "not ready within 1s"],
        ),
        (
            "is not executable",
            &real,
            0o644,
            &["upgrade failed", "cannot execute", "Permission denied"],
        ),
    ];
    for (what, contents, mode, needles) in cases {
        deploy(&exe, contents, mode);
        let from = server.log.len();
        kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
        let (_, line) = server.log.wait_line(from, needles, T);
        assert!(line.contains(&format!("old_pid={pid}")), "{what}: {line}");
        assert_eq!(
            server.pid(),
            Some(pid),
            "{what}: the PID file still names the old process"
        );
        assert!(
            zombie_children(pid).is_empty(),
            "{what}: the failed child was not reaped"
        );
        if let Some(at) = line.find("new process ") {
            let child: u32 = line[at + 12..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(!alive(child), "{what}: child {child} survived");
        }
        traffic_flows(&load, 20);
    }

    // The fixed binary goes through, and nothing was lost on the way.
    deploy(&exe, &real, 0o755);
    let (old, _new) = server.upgrade(T);
    assert_eq!(old, pid);
    assert_eq!(reap(old, T), 0);
    traffic_flows(&load, 20);
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_errors();
}

#[test]
fn an_upgrade_during_an_upgrade_is_coalesced() {
    let (_dir, exe, _real, server) = hello_from_a_copy("2");
    let pid = server.pid().unwrap();
    deploy(&exe, b"#!/bin/sh\nexec sleep 30\n", 0o755);
    let from = server.log.len();
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    server
        .log
        .wait_line(from, &["waiting for it to be ready"], T);
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    server
        .log
        .wait_line(from, &["already running; coalesced"], T);
    server
        .log
        .wait_line(from, &["upgrade failed", "not ready within 2s"], T);
    let started = server.log.text().matches("new process started").count();
    assert_eq!(
        started, 1,
        "one SIGHUP during an upgrade must not start a second one"
    );
}

/// A new process can upgrade again as soon as it is ready, while an older
/// generation still drains a slow request (tableflip refuses this, its
/// issue 52); each generation drains on its own clock.
#[test]
fn a_new_process_upgrades_again_while_its_parent_still_drains() {
    use std::io::{Read, Write};
    become_subreaper();
    let server = Server::start(&example("hello"), &["--addr", "127.0.0.1:0"], &[]);
    let addr = server.addr();
    let first = server.pid().unwrap();
    // A keep-alive connection served by the first process (the only one so
    // far), then half of its next request: work in flight there.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(T)).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut first_response = Vec::new();
    while !first_response.ends_with(b"Welcome to the Home Page!\n") {
        let mut buf = [0; 1024];
        let n = slow.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed early: {}",
            String::from_utf8_lossy(&first_response)
        );
        first_response.extend_from_slice(&buf[..n]);
    }
    slow.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n").unwrap();

    let (_, second) = server.upgrade(T);
    let (old, third) = server.upgrade(T);
    assert_eq!(old, second);
    // The second generation is the first one's child, which reaps it.
    wait_for("the second generation to exit", T, || {
        (!alive(second)).then_some(())
    });
    assert!(
        alive(first),
        "the first generation still drains its slow request"
    );

    // The slow request completes on the first process, which then exits.
    slow.write_all(b"\r\n").unwrap();
    let mut response = String::new();
    slow.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert_eq!(reap(first, T), 0);
    assert_eq!(server.pid(), Some(third));
}
