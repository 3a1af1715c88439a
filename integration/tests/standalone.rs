//! The hello example run by hand (no systemd): PID file, `kill -HUP`,
//! continuous load, real processes.

use nix::sys::signal::Signal;

use support::http::Conn;
use support::load::{Load, LoadConfig};
use support::process::{
    alive, children, fd_kinds, reap, signal, terminate, zombie_children, Generations,
};
use support::server::{Deployed, Server, BROKEN_BUILD, NEVER_READY};
use support::{program, wait_for, TIMEOUT};

#[test]
fn twenty_sighup_upgrades_under_load_lose_nothing() {
    let mut server = Server::start(program!("hello"), &[], &[]);
    let addr = server.addr();
    let first = server.pid().unwrap();
    // Its fds once it has said "ready": the PID file comes a moment before the last spare fd
    // is open again.
    let ready = format!("ready generation=0 pid={first}");
    server.log.wait_line(0, &[&ready], TIMEOUT);
    let baseline = fd_kinds(first);

    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows(50);
    let mut generations = Generations::new(first);
    for _ in 1..=20 {
        generations.push(server.upgrade_and_reap().1);
        load.assert_flows(20);
    }
    let report = load.stop();
    report.assert_lost_nothing(1000);

    let last = generations.last();
    for old in generations.olds() {
        assert!(!alive(*old), "old process {old} survived");
    }
    assert!(zombie_children(last).is_empty(), "zombies under {last}");
    // Same fds as the first process once the clients are gone.
    wait_for(
        "the fds to settle to the first process's set",
        TIMEOUT,
        || (fd_kinds(last) == baseline).then_some(()),
    );

    assert_eq!(terminate(last), 0);
    assert!(
        server.pid().is_none(),
        "the PID file is removed on a real stop"
    );
}

/// hello run from a copy (so the test can replace the binary on disk), with the given upgrade
/// timeout in seconds.
fn hello_from_a_copy(upgrade_timeout: &str) -> (Deployed, Server) {
    let exe = Deployed::copy(program!("hello"));
    let args = ["--upgrade-timeout", upgrade_timeout];
    let server = Server::start(exe.path(), &args, &[]);
    (exe, server)
}

#[test]
fn failed_upgrades_keep_the_old_process_serving() {
    let (exe, server) = hello_from_a_copy("1");
    let addr = server.addr();
    let pid = server.pid().unwrap();
    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows(50);

    // Every fd but the sockets (the load's connections come and go): the spares (`/dev/null`
    // slots, the barrier pipe), the runtimes' fds, any pidfd. A failed upgrade makes its
    // spares again and leaves nothing else behind.
    let not_sockets = || -> Vec<String> {
        fd_kinds(pid)
            .into_iter()
            .filter(|k| k != "socket")
            .collect()
    };
    let baseline = not_sockets();
    let real = exe.original();
    let cases: [(&str, &[u8], u32, &[&str]); 3] = [
        (
            "exits with an error",
            BROKEN_BUILD,
            0o755,
            &["upgrade failed", "exit status 3"],
        ),
        (
            "never becomes ready",
            NEVER_READY,
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
        exe.replace(contents, mode);
        let from = server.log.len();
        signal(pid, Signal::SIGHUP);
        let (_, line) = server.log.wait_line(from, needles, TIMEOUT);
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
        wait_for(&format!("{what}: the same fds as before"), TIMEOUT, || {
            (not_sockets() == baseline).then_some(())
        });
        load.assert_flows(20);
    }

    // The fixed binary goes through, and nothing was lost on the way.
    exe.restore();
    let (old, _new) = server.upgrade();
    assert_eq!(old, pid);
    assert_eq!(reap(old, TIMEOUT), 0);
    load.assert_flows(20);
    let report = load.stop();
    report.assert_lost_nothing(1);
}

#[test]
fn an_upgrade_during_an_upgrade_is_coalesced() {
    let (exe, server) = hello_from_a_copy("2");
    let pid = server.pid().unwrap();
    exe.replace(NEVER_READY, 0o755);
    let from = server.log.len();
    signal(pid, Signal::SIGHUP);
    let log = &server.log;
    log.wait_line(from, &["waiting for it to be ready"], TIMEOUT);
    signal(pid, Signal::SIGHUP);
    log.wait_line(from, &["already running; coalesced"], TIMEOUT);
    log.wait_line(from, &["upgrade failed", "not ready within 2s"], TIMEOUT);
    let started = server.log.text().matches("new process started").count();
    assert_eq!(
        started, 1,
        "one SIGHUP during an upgrade must not start a second one"
    );
}

/// A new process can upgrade again as soon as it is ready, while an older generation still
/// drains a slow request (tableflip refuses this: tableflip issue 52); each generation drains
/// on its own clock.
#[test]
fn a_new_process_upgrades_again_while_its_parent_still_drains() {
    let server = Server::start(program!("hello"), &[], &[]);
    let addr = server.addr();
    let first = server.pid().unwrap();
    // A keep-alive connection served by the first process (the only one so far), then half of
    // its next request: work in flight there.
    let mut slow = Conn::open(addr);
    assert_eq!(slow.get("/").text(), "Welcome to the Home Page!\n");
    slow.send(b"GET / HTTP/1.1\r\nHost: test\r\n");

    let (_, second) = server.upgrade();
    let (old, third) = server.upgrade();
    assert_eq!(old, second);
    // The second generation is the first one's child, which reaps it.
    wait_for("the second generation to exit", TIMEOUT, || {
        (!alive(second)).then_some(())
    });
    assert!(
        alive(first),
        "the first generation still drains its slow request"
    );

    // The slow request completes on the first process, which then exits.
    slow.send(b"\r\n");
    let response = slow.read();
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.close, "{response:?}");
    assert_eq!(reap(first, TIMEOUT), 0);
    assert_eq!(server.pid(), Some(third));
}

/// Kills (SIGKILL, by pid) the children of a process when dropped by a failing test: the new
/// generation of an upgrade that the test left behind.
struct KillChildren(u32);

impl Drop for KillChildren {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for pid in children(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// A new process takes connections only once its `ready()` was told it is main: until then
/// the old one accepts for both. So a new process that listens and would serve, but is killed
/// before it was ready (here: not ready within the upgrade timeout), takes no connection with it.
/// Before, it accepted from the moment it listened, and every connection it had taken was cut
/// when it was killed.
#[test]
fn a_new_process_killed_before_it_was_ready_took_no_connection() {
    // Long enough for a loaded machine to start the new process and run the checks below.
    let args = ["--new-ready-after", "60", "--upgrade-timeout", "5"];
    let server = Server::start(program!("late_ready"), &args, &[]);
    let (addr, old) = (server.addr(), server.pid().unwrap());
    // Dropped before `server`, while the old process lives: an assertion that fails before the
    // old one has killed the new one would leave that to take over a minute later, for ever.
    let _new = KillChildren(old);
    let from = server.log.len();
    signal(old, Signal::SIGHUP);
    // Its accept loop is spawned before it logs this, and runs from its next await on.
    server
        .log
        .wait_line(from, &["serving; ready later"], TIMEOUT);

    let answered_by = |c: &mut Conn| {
        let r = c.get("/");
        assert_eq!(r.status, 200);
        r.text().trim_end().to_owned()
    };
    let mut conns: Vec<Conn> = (0..16).map(|_| Conn::open(addr)).collect();
    for c in &mut conns {
        assert_eq!(
            answered_by(c),
            format!("pid {old}"),
            "answered by the old process"
        );
    }
    let (_, line) = server
        .log
        .wait_line(from, &["upgrade failed", "not ready within 5s"], TIMEOUT);
    assert!(line.contains(&format!("old_pid={old}")), "{line}");
    // The same connections, after the new process was killed.
    for c in &mut conns {
        assert_eq!(answered_by(c), format!("pid {old}"));
    }
    assert_eq!(server.pid(), Some(old));
    assert_eq!(terminate(old), 0);
}

/// The crate's own work runs on a thread of its own: with the application's only runtime thread
/// blocked in a handler, SIGHUP still starts the upgrade, the new process takes over and serves,
/// and the old one finishes the blocked request once it is released, then exits 0. Before, the
/// signal waited for that runtime, and so did every step of the handoff.
#[test]
fn an_upgrade_completes_while_the_applications_runtime_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let release_arg = release.to_str().unwrap();
    let mut server = Server::start(program!("stall"), &["--release", release_arg], &[]);
    let addr = server.addr();
    let from = server.log.len();
    let blocked = std::thread::spawn(move || support::http::get(addr, "/stall"));
    server.log.wait_line(from, &["stalling"], TIMEOUT);

    let (old, new) = server.upgrade();
    assert!(!blocked.is_finished(), "the old runtime is still blocked");
    assert_eq!(
        support::http::get(addr, "/").text().trim_end(),
        format!("pid {new}"),
        "the new process serves"
    );

    std::fs::write(&release, b"").unwrap();
    let answer = blocked.join().unwrap();
    assert_eq!((answer.status, answer.text().trim_end()), (200, "released"));
    assert_eq!(server.reap(old), 0);
    assert_eq!(terminate(new), 0);
}

/// A state of megabytes (hello's `--state-bytes`: a checked pattern kept as `Bytes` and handed
/// over without a copy) reaches each new generation intact, across upgrades.
#[test]
fn a_state_of_megabytes_reaches_each_generation_intact() {
    let size = (8 << 20).to_string();
    let mut server = Server::start(program!("hello"), &["--state-bytes", &size], &[]);
    let addr = server.addr();
    for generation in 1..=3 {
        let from = server.log.len();
        let (_, new) = server.upgrade_and_reap();
        let (_, line) = server.log.wait_line(from, &["state received"], TIMEOUT);
        assert!(
            line.contains(&format!("bytes={size}")) && line.contains("check=\"ok\""),
            "generation {generation}: {line}"
        );
        assert_eq!(server.pid(), Some(new));
        assert_eq!(support::http::get(addr, "/").status, 200);
    }
    assert_eq!(terminate(server.pid().unwrap()), 0);
}

/// A build that dies right after it took over: says `ready`, takes `main`, writes its PID to the
/// PID file (its argv is the old process's: `--pid-file PATH`) and exits 7, before it ever says
/// `serving`.
const DIES_AFTER_MAIN: &[u8] = b"#!/bin/sh
fd=$HANDOVER_FD
while [ $# -gt 0 ]; do [ \"$1\" = --pid-file ] && pid_file=$2; shift; done
echo ready >&$fd
read line <&$fd
echo $$ > \"$pid_file\"
exit 7
";

/// The old process waits for the new one's `serving` before it drains. A new process that dies
/// in that wait (after `main`) never served: the old one keeps serving, rewrites the PID file,
/// reports the upgrade as failed, and the next upgrade works. Before: it started its drain
/// anyway, with the death already known; with no request in flight the drain ended at once
/// and the old process exited before it could take the service back, so nothing served.
#[test]
fn a_new_process_that_dies_before_it_serves_leaves_the_old_one_serving() {
    let (exe, server) = hello_from_a_copy("5");
    let addr = server.addr();
    let old = server.pid().unwrap();
    exe.replace(DIES_AFTER_MAIN, 0o755);
    let from = server.log.len();
    signal(old, Signal::SIGHUP);
    let (_, line) = server
        .log
        .wait_line(from, &["upgrade failed; still serving"], TIMEOUT);
    assert!(
        line.contains("exited before it served") && line.contains("exit status 7"),
        "{line}"
    );
    let dead = support::process::pid_after(&line, "new process ");
    assert!(!alive(dead) && zombie_children(old).is_empty());
    assert_eq!(
        server.pid(),
        Some(old),
        "the PID file names the old process"
    );
    assert_eq!(support::http::get(addr, "/").status, 200);
    assert!(!server.log.text().contains("drained; exiting"));

    exe.restore();
    let (was, new) = server.upgrade();
    assert_eq!(was, old);
    assert_eq!(reap(old, TIMEOUT), 0);
    assert_eq!(terminate(new), 0);
}

/// Ten upgrades in a row; every other generation holds a request in flight, so that it still
/// drains when its successor (with nothing in flight) upgrades again and exits at once. None
/// takes the service back, each slow request is answered with `Connection: close`, and the PID
/// file names the last generation. Before: the upgrade ran on the crate's thread while `wait()`
/// ran on the application's, so a generation with nothing in flight could finish its drain and
/// exit between starting it and telling its draining parent `upgraded`; that parent then took
/// the service back (accepting again beside the new generation, its PID in the PID file).
#[test]
fn a_chain_of_upgrades_never_gives_the_service_back_to_a_draining_generation() {
    let server = Server::start(program!("hello"), &[], &[]);
    let addr = server.addr();
    let mut pid = server.pid().unwrap();
    let mut held = Vec::new();
    let mut passed = Vec::new();
    for generation in 0..10 {
        if generation % 2 == 0 {
            // A keep-alive connection served by `pid` (the only one accepting), then half of
            // its next request: work in flight there.
            let mut slow = Conn::open(addr);
            let greeting = slow.get("/");
            assert_eq!(greeting.status, 200, "{greeting:?}");
            slow.send(b"GET / HTTP/1.1\r\nHost: test\r\n");
            held.push((pid, slow));
        } else {
            passed.push(pid);
        }
        let from = server.log.len();
        let (old, new) = server.upgrade();
        assert_eq!(old, pid);
        server
            .log
            .wait_line(from, &[&format!("old_pid={old} new_pid={new}")], TIMEOUT);
        pid = new;
    }
    for old in passed {
        // Its parent, still draining, reaps it.
        wait_for(
            "a generation with nothing in flight to exit",
            TIMEOUT,
            || (!alive(old)).then_some(()),
        );
    }
    for (old, mut slow) in held {
        slow.send(b"\r\n");
        let response = slow.read();
        assert_eq!(response.status, 200, "{old}: {response:?}");
        assert!(
            response.close,
            "{old} answered as if it served again: {response:?}\n{}",
            server.log.text()
        );
        assert_eq!(reap(old, TIMEOUT), 0);
    }
    let log = server.log.text();
    assert!(!log.contains("took the service back"), "{log}");
    assert_eq!(server.pid(), Some(pid));
    assert_eq!(terminate(pid), 0);
}
