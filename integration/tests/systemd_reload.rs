//! `systemctl reload` that tells the truth, environment changes applied by a
//! reload, and the fd store as a crash safety net, all under a real private
//! `systemd --user` manager: each test runs on the host's systemd (252 here)
//! and on systemd 257 (`<name>::host`, `<name>::v257`).
//!
//! - **Truthful reload**: the shipped `units/hello.service` as it is, with
//!   `ExecReload=handover-reload` (the crate's command) and
//!   `RuntimeDirectory=hello`, so the service serves its control socket at
//!   `$RUNTIME_DIRECTORY/handover.sock` and the command finds it there.
//!   `systemctl reload` returns only once the new process is the main PID,
//!   and fails (with the unit still active on the old process) when the new
//!   binary is broken.
//! - **Environment on reload**: a changed `Environment=` (drop-in plus
//!   `daemon-reload`) or `EnvironmentFile=` (edited, no `daemon-reload`)
//!   reaches the new process; the reload command's own `MAINPID` & co do not.
//! - **fd store**: a service without a `.socket` unit, `--fd-store`,
//!   `FileDescriptorStoreMax=`, `Restart=on-failure`: after `kill -9` the
//!   restarted process serves the very same listening socket, and no client
//!   is refused meanwhile.
//!
//! The tests need root and systemd; they skip otherwise (and fail under
//! `CI=true`). Every wait is bounded and waits on a state or an event; every
//! process is signalled by pid.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use support::http::{free_port, greeting};
use support::load::{ErrorKind, Load, LoadConfig};
use support::process::{alive, environ, listening_inode, signal, socket_inodes, Generations};
use support::server::{deploy, Deployed, BROKEN_BUILD};
use support::systemd::{message, UserManager};
use support::units::{self, get_key};
use support::{on_each_manager, program, TIMEOUT};

const GREETING: &str = "Welcome to the Home Page!";
/// The reload command's lines in the journal.
const RELOAD_ID: &str = "SYSLOG_IDENTIFIER=handover-reload";

// ---------------------------------------------------------------------------------------------
// helpers

/// Installs the shipped `units/hello.socket` (on 127.0.0.1:`port`) and
/// `units/hello.service` as they are (running `exe` with `args`; its
/// `ExecReload=handover-reload` pointed at the built command, arguments
/// kept), plus `extra` as a drop-in when not empty.
fn install_truthful(m: &UserManager, exe: &Path, args: &str, port: u16, extra: &str) -> SocketAddr {
    let exec = format!("{} {args}", exe.display());
    let built = program!("test-handover-reload");
    let (socket, service) = units::hello_units(m, "hello.service", &exec, port, built);
    let timeout: u64 = get_key(&service, "TimeoutStartSec")
        .and_then(|v| v.trim().parse().ok())
        .expect("hello.service sets TimeoutStartSec= in seconds");
    assert_eq!(get_key(&service, "RuntimeDirectory"), Some("hello"));
    let reload = get_key(&service, "ExecReload").expect("hello.service sets ExecReload=");
    let (program, reload_args) = reload.split_once(' ').unwrap_or((reload, ""));
    let installed = units::install_reload_command(m, built);
    assert_eq!(Path::new(program), installed, "ExecReload={reload}");
    // The command's own timeout must stay below the manager's.
    let reload_timeout: u64 = reload_args
        .split_whitespace()
        .skip_while(|a| *a != "--timeout")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(90);
    assert!(
        reload_timeout < timeout,
        "handover-reload --timeout {reload_timeout} must be below TimeoutStartSec={timeout}"
    );
    units::install_hello(m, &socket, &service, extra);
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `install_truthful` with `--addr` matching the socket unit and short
/// upgrade and drain timeouts.
fn install_hello(m: &UserManager, exe: &Path, extra: &str) -> SocketAddr {
    let port = free_port();
    install_truthful(
        m,
        exe,
        &format!("--addr 127.0.0.1:{port} --upgrade-timeout 10 --drain-timeout 5"),
        port,
        extra,
    )
}

/// Starts the socket and the service (no activation by a request: `start`
/// waits for `READY=1`); returns the main pid.
fn start_truthful(m: &UserManager) -> u32 {
    m.systemctl_ok(&["start", "hello.socket", "hello.service"]);
    assert_eq!(m.show("hello.service", "ActiveState"), "active");
    let pid = m.main_pid("hello.service");
    assert_ne!(pid, 0);
    let sock = m.runtime_dir().join("hello/handover.sock");
    assert!(sock.exists(), "no control socket at {}", sock.display());
    pid
}

/// `systemctl reload hello.service` with the truthful `ExecReload=`: when it
/// exits 0, `MainPID` is already the new process, which is alive and
/// serving the control socket. Returns the new pid and how long the command
/// took.
fn truthful_reload(m: &UserManager, old: u32) -> (u32, Duration) {
    let (new, took) = units::reload_hello(m, old);
    assert_eq!(m.show("hello.service", "ActiveState"), "active");
    assert_eq!(m.show("hello.service", "SubState"), "running");
    assert_eq!(m.show("hello.service", "ReloadResult"), "success");
    // The control socket now answers from the new process.
    let status = handover::control::request_status(
        &m.runtime_dir().join("hello/handover.sock"),
        Duration::from_secs(5),
    )
    .expect("control socket status");
    assert!(
        status.starts_with("Ready ") && status.ends_with(&format!(" pid={new}")),
        "status {status:?}, main pid {new}"
    );
    (new, took)
}

/// Waits until `pid` is gone (reaped by the manager).
fn wait_gone(m: &UserManager, pid: u32) {
    m.wait_until(&format!("process {pid} to exit"), TIMEOUT, || !alive(pid));
}

on_each_manager!(
    truthful_reload_waits_for_the_new_main_pid_and_reports_failure,
    a_socket_unit_address_other_than_addr_is_kept_across_reloads,
    environment_changes_apply_on_reload,
    fd_store_keeps_the_socket_across_a_crash_restart,
);

// ---------------------------------------------------------------------------------------------
// a truthful reload

fn truthful_reload_waits_for_the_new_main_pid_and_reports_failure(m: &UserManager) {
    let t0 = Instant::now();
    // A copy of hello where the services see it too, so the test can deploy a broken build
    // over it.
    let bin = Deployed::copy_into(program!("hello"), &m.scratch_dir());
    let addr = install_hello(m, bin.path(), "");
    let first = start_truthful(m);
    assert_eq!(greeting(addr), GREETING);

    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows(50);
    let mut generations = Generations::new(first);
    let mut took = Vec::new();
    let mut unattributed = 0;
    for _ in 1..=5 {
        let (new, d) = truthful_reload(m, generations.last());
        generations.push(new);
        took.push(d);
        // The command's own report, in the journal. Matched by its
        // identifier: journald may fail to attribute a line of a process
        // that has already exited to its unit (no `_SYSTEMD_CGROUP`).
        let want = format!("upgraded: main PID {new}");
        let e = m.wait_for_journal(&[RELOAD_ID], TIMEOUT, |e| message(e) == want);
        if !e.contains_key("_SYSTEMD_CGROUP") {
            unattributed += 1;
        }
        load.assert_flows(20);
    }
    eprintln!(
        "5 truthful reloads, systemctl reload took {took:.2?}; {generations:?}; \
         {unattributed} of the command's lines had no _SYSTEMD_CGROUP"
    );

    // A broken build: the reload fails, and says so.
    let serving = generations.last();
    wait_gone(m, *generations.olds().last().unwrap());
    bin.replace(BROKEN_BUILD, 0o755);
    let (out, took) = units::systemctl_reload(m);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "broken build: systemctl reload {} after {took:.2?}; stdout {stdout:?} stderr {stderr:?}",
        out.status,
    );
    assert!(
        !out.status.success(),
        "the reload of a broken build succeeded"
    );
    assert!(
        stderr.contains("hello.service failed"),
        "systemctl says: {stderr}"
    );
    assert_eq!(m.main_pid("hello.service"), serving, "MainPID unchanged");
    assert!(alive(serving));
    assert_eq!(m.show("hello.service", "ActiveState"), "active");
    assert_eq!(m.show("hello.service", "SubState"), "running");
    assert_eq!(m.show("hello.service", "ReloadResult"), "exit-code");
    assert_eq!(m.show("hello.service", "NRestarts"), "0");
    assert_eq!(greeting(addr), GREETING, "still serving");
    let e = m.wait_for_journal(&[RELOAD_ID], TIMEOUT, |e| {
        message(e).starts_with("handover-reload: upgrade failed")
    });
    eprintln!(
        "journal: {:?} (_PID {:?}, _SYSTEMD_CGROUP {:?}, PRIORITY {:?})",
        message(&e),
        e.get("_PID"),
        e.get("_SYSTEMD_CGROUP"),
        e.get("PRIORITY")
    );
    // The old process's reason, relayed: the new one ran `exit 3`.
    assert!(
        message(&e).starts_with("handover-reload: upgrade failed: new process ")
            && message(&e).contains("exited before it was ready"),
        "{e:?}"
    );
    load.assert_flows(20);

    // Fixed build: the next reload succeeds.
    bin.restore();
    let (new, _) = truthful_reload(m, serving);
    assert_eq!(m.show("hello.service", "ReloadResult"), "success");
    wait_gone(m, serving);
    load.assert_flows(20);
    let report = load.stop();
    eprintln!("6 reloads + 1 failed in {:.2?}; {report}", t0.elapsed());
    report.assert_no_errors();
    assert_eq!(m.main_pid("hello.service"), new);
    assert!(m
        .show("hello.service", "StatusText")
        .contains(&format!("generation 6, pid {new}")));
}

/// The `.socket` unit decides the address: when it differs from the
/// program's own `--addr`, the first process serves the socket unit's socket
/// (with a warning), and so must every later generation, on the same socket.
fn a_socket_unit_address_other_than_addr_is_kept_across_reloads(m: &UserManager) {
    let (port, other) = (free_port(), free_port());
    let addr = install_truthful(
        m,
        program!("hello"),
        &format!("--addr 127.0.0.1:{other} --upgrade-timeout 10 --drain-timeout 5"),
        port,
        "",
    );
    let first = start_truthful(m);
    assert_eq!(greeting(addr), GREETING);
    let inode = listening_inode(port).expect("the socket unit listens");
    assert!(socket_inodes(first).contains(&inode));
    let (new, _) = truthful_reload(m, first);
    wait_gone(m, first);
    let bound = listening_inode(other);
    assert!(
        socket_inodes(new).contains(&inode) && bound.is_none(),
        "after the reload, pid {new} does not serve the socket unit's socket {inode} on port \
         {port} (it bound --addr port {other} anew: {bound:?}); connections to {addr} now queue \
         with nobody accepting them\n{}",
        units::hello_state(m)
    );
    assert_eq!(greeting(addr), GREETING);
}

// ---------------------------------------------------------------------------------------------
// the environment is applied on reload

/// Reloads under `load`, waits until the old process is gone, and checks
/// that from then on only `want` is served: the old greeting's last
/// response arrived before that moment, and 20 fresh requests all say
/// `want`. Returns the new pid.
fn reload_to_greeting(
    m: &UserManager,
    load: &Load,
    load_t0: Instant,
    addr: SocketAddr,
    old: u32,
    want: &str,
) -> (u32, Duration) {
    let (new, _) = truthful_reload(m, old);
    wait_gone(m, old);
    let gone_at = load_t0.elapsed();
    for i in 0..20 {
        assert_eq!(greeting(addr), want, "fresh request {i} after {old} exited");
    }
    load.assert_flows(50);
    (new, gone_at)
}

fn environment_changes_apply_on_reload(m: &UserManager) {
    let t0 = Instant::now();
    let env_file = m.runtime_dir().join("hello.env");
    fs::write(&env_file, "UNRELATED=1\n").unwrap();
    let addr = install_hello(
        m,
        program!("hello"),
        &format!(
            "Environment=HELLO_GREETING=one\nEnvironmentFile={}\n",
            env_file.display()
        ),
    );
    let first = start_truthful(m);
    assert_eq!(greeting(addr), "one");
    let env0 = environ(first);

    // `started` of the load lies between these two instants.
    let before_load = Instant::now();
    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows(50);

    // 1. A drop-in + daemon-reload.
    m.install_unit(
        "hello.service.d/greeting.conf",
        "[Service]\nEnvironment=HELLO_GREETING=two\n",
    );
    m.daemon_reload();
    let (second, one_gone) = reload_to_greeting(m, &load, before_load, addr, first, "two");

    // 2. EnvironmentFile= edited, no daemon-reload: systemd reads the file
    //    again for every command it runs, ExecReload= included.
    deploy(&env_file, b"HELLO_GREETING=three\n", 0o644);
    let (third, two_gone) = reload_to_greeting(m, &load, before_load, addr, second, "three");
    let report = load.stop();
    eprintln!("environment reloads in {:.2?}; {report}", t0.elapsed());
    report.assert_no_errors();
    let body = |g: &str| {
        report
            .body(&format!("{g}\n"))
            .unwrap_or_else(|| panic!("the load never saw {g:?}:\n{report}"))
    };
    // Responses read before the poll saw the old process gone; the load's
    // clock started after `before_load`, so these bounds are safe.
    assert!(
        body("one").last_at <= one_gone,
        "\"one\" after its process was gone:\n{report}"
    );
    assert!(
        body("two").last_at <= two_gone,
        "\"two\" after its process was gone:\n{report}"
    );
    assert!(body("three").count > 0);
    assert_eq!(report.bodies.len(), 3, "{report}");

    // What the reload command's environment left in the new process.
    let env = environ(third);
    let keys = |e: &HashMap<String, String>| {
        let mut k: Vec<_> = e.keys().cloned().collect();
        k.sort();
        k.join(" ")
    };
    eprintln!("first process env keys: {}", keys(&env0));
    eprintln!("third process env keys: {}", keys(&env));
    assert_eq!(env.get("HELLO_GREETING").map(String::as_str), Some("three"));
    assert_eq!(
        env.get("UNRELATED"),
        None,
        "the old file's variable is gone"
    );
    assert_eq!(env.get("MAINPID"), None, "MAINPID leaked: {env:?}");
    // The manager is the same for the reload command and the service:
    // MANAGERPID comes from the old process, as the first one had it.
    assert_eq!(env.get("MANAGERPID"), env0.get("MANAGERPID"), "{env:?}");
    assert_eq!(
        env.get("SYSTEMD_EXEC_PID"),
        None,
        "SYSTEMD_EXEC_PID leaked: {env:?}"
    );
    assert_eq!(env.get("LISTEN_PID"), Some(&third.to_string()));
    // The socket unit's listener and the control socket, handed over.
    let names: Vec<&str> = env["LISTEN_FDNAMES"].split(':').collect();
    assert!(names.contains(&"http"), "{names:?}");
    assert!(names.contains(&"handover-control"), "{names:?}");
    assert_eq!(env.get("LISTEN_FDS"), Some(&names.len().to_string()));
    assert!(env.contains_key("NOTIFY_SOCKET"), "{env:?}");
    assert_eq!(env.get("NOTIFY_SOCKET"), env0.get("NOTIFY_SOCKET"));
    // The service's journal stream, not the reload command's own.
    assert_eq!(env.get("JOURNAL_STREAM"), env0.get("JOURNAL_STREAM"));
    assert_eq!(env.get("INVOCATION_ID"), env0.get("INVOCATION_ID"));
    assert_eq!(env.get("RUNTIME_DIRECTORY"), env0.get("RUNTIME_DIRECTORY"));
    // What the first process had from the manager, for the record.
    assert_eq!(env0.get("SYSTEMD_EXEC_PID"), Some(&first.to_string()));
    assert_eq!(env0.get("MAINPID"), None);
}

// ---------------------------------------------------------------------------------------------
// the fd store keeps a self-bound socket across a crash restart

fn fd_store_keeps_the_socket_across_a_crash_restart(m: &UserManager) {
    let t0 = Instant::now();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    m.install_unit(
        "hello.service",
        &format!(
            "[Service]\nType=notify\n\
             ExecStart={} --addr {addr} --fd-store\n\
             FileDescriptorStoreMax=4\n\
             Restart=on-failure\nRestartSec=100ms\n\
             Environment=RUST_LOG=info,handover=debug\n",
            program!("hello").display()
        ),
    );
    m.daemon_reload();
    m.systemctl_ok(&["start", "hello.service"]);
    let first = m.main_pid("hello.service");
    assert_ne!(first, 0);
    assert_eq!(greeting(addr), GREETING);
    let inode = listening_inode(port).expect("hello listens");
    assert!(
        socket_inodes(first).contains(&inode),
        "pid {first} does not hold the listening socket {inode}"
    );
    m.wait_until("the listener in the fd store", TIMEOUT, || {
        m.show("hello.service", "NFileDescriptorStore") == "1"
    });
    let pushed = m.wait_for_journal(&[&format!("_PID={first}")], TIMEOUT, |e| {
        message(e).contains("fd store")
    });
    eprintln!("journal: {:?}", message(&pushed));

    let load = Load::start(addr, LoadConfig::clients(0, 4));
    load.assert_flows(50);
    let killed_at = Instant::now();
    signal(first, Signal::SIGKILL);
    let mut second = 0;
    m.wait_until("the restarted service to be active", TIMEOUT, || {
        second = m.main_pid("hello.service");
        second != 0 && second != first && m.show("hello.service", "ActiveState") == "active"
    });
    let restart = killed_at.elapsed();
    assert_eq!(m.show("hello.service", "NRestarts"), "1");
    assert!(!alive(first));
    assert_eq!(
        listening_inode(port),
        Some(inode),
        "the restarted service listens on another socket"
    );
    assert!(
        socket_inodes(second).contains(&inode),
        "the restarted pid {second} does not hold socket {inode}"
    );
    assert_eq!(m.show("hello.service", "NFileDescriptorStore"), "1");
    let env = environ(second);
    assert_eq!(env.get("LISTEN_FDNAMES").map(String::as_str), Some("http"));
    assert_eq!(env.get("LISTEN_PID"), Some(&second.to_string()));
    let manager = m.manager_pid().to_string();
    let e = m.wait_for_journal(&[&format!("_PID={manager}")], TIMEOUT, |e| {
        message(e).contains("restart counter is at 1")
    });
    eprintln!("manager: {:?}", message(&e));
    load.assert_flows(100);
    let report = load.stop();
    eprintln!(
        "fd store: crash restart in {restart:.2?} (total {:.2?}); {report}",
        t0.elapsed()
    );
    let refused = report.errors.get(&ErrorKind::Refused).copied();
    let connect = report.errors.get(&ErrorKind::Connect).copied();
    assert_eq!(
        refused, None,
        "connections refused during the restart:\n{report}"
    );
    assert_eq!(
        connect, None,
        "connects failed during the restart:\n{report}"
    );
    // Requests the killed process had already accepted die with it: that is
    // the crash, not a loss of the restart.
    eprintln!(
        "fd store: {} requests lost with the crashed process ({:?}), {} refused",
        report.errors_total(),
        report.errors,
        refused.unwrap_or(0)
    );
    assert!(
        report.errors_total() <= 4,
        "more failures than the 4 clients could have had in flight:\n{report}"
    );

    // The store is a crash safety net only: a stop empties it and closes
    // the socket.
    m.systemctl_ok(&["stop", "hello.service"]);
    assert_eq!(m.show("hello.service", "NFileDescriptorStore"), "0");
    assert_eq!(listening_inode(port), None, "the socket outlived the stop");
}
