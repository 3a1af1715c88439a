//! The systemd integration against the real thing, on the host's systemd (252 here) and on
//! systemd 257 from a Debian trixie root on a pure cgroup v2 hierarchy (see
//! `support::systemd`): a private `systemd --user` manager running the shipped
//! `units/hello.socket` with `units/hello.service` (and, on 257,
//! `units/hello-notify-reload.service`), the reload alternatives the docs describe,
//! `systemd-socket-activate`, a `Type=notify-reload` style exchange against a notify socket the
//! test owns, and `systemd-analyze verify` of every unit in `units/` by both systemds.
//!
//! Each manager test is one function run on each manager, as `<name>::host` and
//! `<name>::v257`. They need root; they skip otherwise (and fail under `CI=true`). Every wait
//! is bounded and waits on a state or an event; every process started is killed by pid.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use support::http::{free_port, greeting, try_get};
use support::load::{Load, LoadConfig};
use support::notify::{assignments, NotifySocket};
use support::process::{
    alive, environ, monotonic_usec, ppid, reap, reaped, signal, terminate, Generations,
};
use support::server::{command, Deployed, Server, BROKEN_BUILD};
use support::systemd::{field, message, UserManager};
use support::units::{self, get_key, repo_unit, set_key, with_reload_command, without_keys};
use support::{announce, have, on_each_manager, program, TIMEOUT};

const GREETING: &str = "Welcome to the Home Page!";

/// For each function `body(m: &UserManager, service: &str)` named, a module of the same name with
/// three tests: `host` and `v257` run it with `units/hello.service` on each manager,
/// `notify_reload_v257` with `units/hello-notify-reload.service` (`Type=notify-reload`: systemd
/// 253 and later) on 257.
macro_rules! on_each_hello_unit {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            use support::systemd::{Manager, UserManager};

            fn run(kind: Manager, service: &str) {
                UserManager::run(kind, stringify!($body), |m| super::$body(m, service))
            }
            #[test]
            fn host() {
                run(Manager::Host, "hello.service")
            }
            #[test]
            fn v257() {
                run(Manager::V257, "hello.service")
            }
            #[test]
            fn notify_reload_v257() {
                run(Manager::V257, "hello-notify-reload.service")
            }
        }
    )+};
}

on_each_hello_unit!(
    twenty_reloads_under_load_lose_nothing,
    a_new_binary_that_fails_leaves_the_old_one_serving,
);

on_each_manager!(
    stop_after_a_handoff_drains_and_socket_activation_restarts,
    reload_keeps_serving_the_socket_units_address,
    the_journal_shows_each_process_with_its_own_pid,
    an_apps_own_subscriber_with_the_crate_layer_writes_to_the_journal,
    watchdog_pings_follow_the_new_main_process,
    what_each_reload_alternative_tells_the_operator,
    the_dropin_turns_a_plain_service_into_a_handover_one,
    units_verify,
);

// ---------------------------------------------------------------------------------------------
// helpers

/// Installs the shipped `units/hello.socket` on `127.0.0.1:<port>` and `units/<service>` as
/// `hello.service`, running `exe`, both otherwise unchanged (so `NotifyAccess=main`,
/// `RuntimeDirectory=hello`, `ExecReload=handover-reload` the built command,
/// `KillMode=control-group`); `extra` (unit lines) goes into a drop-in when not empty.
///
/// As in the shipped pair (`ListenStream=127.0.0.1:8081`, hello's default `--addr`), the
/// program is configured with the address the socket unit listens on, unless `same_addr` is
/// false: then it keeps its default (8081) while the socket unit decides another port.
fn install_hello(
    m: &UserManager,
    service: &str,
    exe: &Path,
    port: u16,
    same_addr: bool,
    extra: &str,
) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exec = if same_addr {
        format!("{} --addr {addr}", exe.display())
    } else {
        exe.display().to_string()
    };
    let reload = program!("test-handover-reload");
    let (socket, unit) = units::hello_units(m, service, &exec, port, reload);
    assert_eq!(get_key(&unit, "NotifyAccess"), Some("main"));
    assert_eq!(get_key(&unit, "RuntimeDirectory"), Some("hello"));
    units::install_hello(m, &socket, &unit, extra);
    addr
}

/// Starts `hello.socket`, activates the service with a first request and
/// waits until it is active. Returns its main pid.
fn start_hello(m: &UserManager, addr: SocketAddr) -> u32 {
    m.systemctl_ok(&["start", "hello.socket"]);
    assert_eq!(m.show("hello.socket", "ActiveState"), "active");
    assert_eq!(greeting(addr), GREETING);
    m.wait_until("hello.service to be active", TIMEOUT, || {
        m.show("hello.service", "ActiveState") == "active"
    });
    let pid = m.main_pid("hello.service");
    assert_ne!(pid, 0);
    assert_eq!(
        ppid(pid),
        m.manager_pid(),
        "the first process is the manager's child"
    );
    pid
}

/// [`units::reload_hello`], then waits until the old process is gone (reaped by the manager).
fn reload(m: &UserManager, old: u32) -> (u32, Duration) {
    let (new, took) = units::reload_hello(m, old);
    m.wait_until(
        &format!("the old main process {old} to be reaped"),
        TIMEOUT,
        || reaped(old),
    );
    (new, took)
}

/// Fails if the manager ever called a main process an alien.
fn assert_no_alien_warning(m: &UserManager) {
    let manager = m.manager_pid().to_string();
    let text = m.journal(&["-o", "cat", &format!("_PID={manager}")]);
    for bad in ["not our child", "Supervising process"] {
        assert!(!text.contains(bad), "the manager logged {bad:?}:\n{text}");
    }
}

/// A copy of the built hello in the manager's scratch directory (visible to its services), so a
/// test can deploy a broken build over it.
fn hello_copy(m: &UserManager) -> Deployed {
    Deployed::copy_into(program!("hello"), &m.scratch_dir())
}

/// The `generation N` in hello's `StatusText` (the number of upgrades so far).
fn generation(m: &UserManager) -> u32 {
    let status = m.show("hello.service", "StatusText");
    status
        .split_once("generation ")
        .and_then(|(_, r)| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation in StatusText {status:?}"))
}

// ---------------------------------------------------------------------------------------------
// the real manager

/// 20 `systemctl reload`s of `units/<service>` under load: each exits 0 with `MainPID`
/// already moved to a new process, the manager's child; exactly one upgrade per reload; no
/// request fails.
fn twenty_reloads_under_load_lose_nothing(m: &UserManager, service: &str) {
    let t0 = Instant::now();
    let addr = install_hello(m, service, program!("hello"), free_port(), true, "");
    let first = start_hello(m, addr);

    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows_or(50, || units::hello_state(m));
    let mut generations = Generations::new(first);
    let mut took = Vec::new();
    for i in 1..=20 {
        let (new, d) = reload(m, generations.last());
        generations.push(new);
        took.push(d);
        assert_eq!(
            m.show("hello.service", "ActiveState"),
            "active",
            "reload {i}"
        );
        assert_eq!(m.show("hello.service", "ReloadResult"), "success");
        assert_eq!(m.show("hello.service", "NRestarts"), "0", "reload {i}");
        assert_eq!(m.show("hello.socket", "NRefused"), "0", "reload {i}");
        assert_eq!(
            ppid(new),
            m.manager_pid(),
            "reload {i}: the new main process {new} is the manager's child"
        );
        load.assert_flows_or(20, || units::hello_state(m));
    }
    let report = load.stop();
    let avg = took.iter().sum::<Duration>() / took.len() as u32;
    let max = took.iter().max().unwrap();
    announce(&format!(
        "  systemd {} ({}): units/{service}: 20 systemctl reloads under load, all exit 0 with MainPID moved; \
         reload took avg {avg:.2?}, max {max:.2?}; {} requests, {} failed; all in {:.2?}",
        m.major(),
        m.kind().label(),
        report.ok,
        report.errors_total(),
        t0.elapsed()
    ));
    report.assert_lost_nothing(500);

    assert_eq!(m.main_pid("hello.service"), generations.last());
    // One upgrade per reload, not two: the reload signal did not start another.
    assert_eq!(
        generation(m),
        20,
        "{}",
        m.show("hello.service", "StatusText")
    );
    assert_no_alien_warning(m);
}

/// With `units/<service>` alone, a broken new binary makes `systemctl reload` fail; the old
/// process stays main and serving and says why; a good one then reloads with exit code 0.
fn a_new_binary_that_fails_leaves_the_old_one_serving(m: &UserManager, service: &str) {
    let bin = hello_copy(m);
    let addr = install_hello(m, service, bin.path(), free_port(), true, "");
    let pid = start_hello(m, addr);

    // Deploy a broken binary the way a deploy tool does: write aside, rename.
    bin.replace(BROKEN_BUILD, 0o755);
    let (out, took) = units::systemctl_reload(m);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    announce(&format!(
        "  systemd {} ({}): units/{service}, broken new binary: systemctl reload exits {} after {took:.2?} ({:?}); ReloadResult={}",
        m.major(),
        m.kind().label(),
        out.status.code().map_or("by a signal".into(), |c| c.to_string()),
        stderr.lines().next().unwrap_or(""),
        m.show("hello.service", "ReloadResult"),
    ));
    assert!(
        !out.status.success(),
        "the reload of a broken build exited 0\n{}",
        units::hello_state(m)
    );
    assert_eq!(m.show("hello.service", "ReloadResult"), "exit-code");
    assert_eq!(m.main_pid("hello.service"), pid, "MainPID unchanged");
    assert!(alive(pid));
    assert_eq!(m.show("hello.service", "ActiveState"), "active");
    assert_eq!(m.show("hello.service", "SubState"), "running");
    assert_eq!(greeting(addr), GREETING, "still serving");
    assert_eq!(m.show("hello.service", "NRestarts"), "0");

    // The old process says why, in the journal, with its own _PID.
    let e = m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
        field(e, "OUTCOME") == "failed"
    });
    eprintln!(
        "failure entry: MESSAGE={:?} REASON={:?} GENERATION={:?}",
        message(&e),
        field(&e, "REASON"),
        field(&e, "GENERATION")
    );
    assert!(message(&e).contains("upgrade failed"), "{e:?}");
    // The old process cannot see the exit status of a process the manager
    // reaps; it must still say that the new one exited.
    assert!(
        field(&e, "REASON").contains("exited before it was ready"),
        "REASON={:?}",
        field(&e, "REASON")
    );
    assert_eq!(field(&e, "GENERATION"), "1", "{e:?}");
    // The manager reaped the failed process: no zombie is left.
    let started = m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
        message(e).starts_with("new process started")
    });
    let failed: u32 = field(&started, "NEW_PID").parse().unwrap();
    m.wait_until(
        &format!("the failed process {failed} to be reaped"),
        TIMEOUT,
        || reaped(failed),
    );
    // ... and in STATUS=, after READY=1 brought the unit back from `reloading`.
    let status = m.show("hello.service", "StatusText");
    eprintln!("StatusText: {status}");
    assert!(status.contains("failed"), "{status}");
    // The reload command's own account.
    let e = m.wait_for_journal(&["SYSLOG_IDENTIFIER=handover-reload"], TIMEOUT, |e| {
        message(e).starts_with("handover-reload: upgrade failed")
    });
    assert!(message(&e).contains("exited before it was ready"), "{e:?}");

    // Restore the binary: the next reload succeeds.
    bin.restore();
    let (new, _) = reload(m, pid);
    assert_eq!(greeting(addr), GREETING);
    assert_eq!(m.show("hello.service", "ActiveState"), "active");
    assert_eq!(m.show("hello.service", "ReloadResult"), "success");
    let status = m.show("hello.service", "StatusText");
    assert!(
        status.contains(&format!("serving, generation 1, pid {new}")),
        "{status}"
    );
    assert_eq!(ppid(new), m.manager_pid());
    assert_no_alien_warning(m);
}

fn stop_after_a_handoff_drains_and_socket_activation_restarts(m: &UserManager) {
    let addr = install_hello(m, "hello.service", program!("hello"), free_port(), true, "");
    let first = start_hello(m, addr);
    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows_or(50, || units::hello_state(m));
    // The process to stop is the one the handoff made: the manager must treat it as its own.
    let (main, _) = reload(m, first);
    load.assert_flows_or(50, || units::hello_state(m));

    // hello.socket keeps listening: connections queue in its backlog while
    // the service drains and exits, and they start the service again.
    let t = Instant::now();
    let before = monotonic_usec();
    m.systemctl_ok(&["stop", "hello.service"]);
    let stop_took = t.elapsed();
    assert!(reaped(main), "the stop job ended before pid {main} did");

    let mut second = 0;
    m.wait_until(
        "socket activation to start hello.service again",
        TIMEOUT,
        || {
            second = m.main_pid("hello.service");
            second != 0 && second != main && m.show("hello.service", "ActiveState") == "active"
        },
    );
    load.assert_flows_or(50, || units::hello_state(m));
    let report = load.stop();
    eprintln!("stop took {stop_took:.2?}; restarted as {second}; {report}");
    // It did become inactive in between (CLOCK_MONOTONIC, like ours).
    let usec = |p: &str| -> u64 { m.show("hello.service", p).parse().unwrap() };
    let (inactive, active) = (
        usec("InactiveEnterTimestampMonotonic"),
        usec("ActiveEnterTimestampMonotonic"),
    );
    assert!(
        before < inactive && inactive < active,
        "stop at {before}, inactive at {inactive}, active again at {active}"
    );

    // The manager's own account of the stop: a clean exit, no kill.
    let about: Vec<String> = m
        .journal_entries(&["USER_UNIT=hello.service"])
        .iter()
        .map(|e| message(e).to_owned())
        .collect();
    eprintln!("manager about hello.service:\n  {}", about.join("\n  "));
    assert!(
        about.iter().any(|l| l.starts_with("Stopped hello.service")),
        "{about:?}"
    );
    for bad in [
        "Failed with result",
        "code=killed",
        "SIGKILL",
        "timed out",
        "Killing",
    ] {
        assert!(
            !about.iter().any(|l| l.contains(bad)),
            "{bad:?} in {about:?}"
        );
    }
    // The handed-over process drained, by its own account.
    let e = m.wait_for_journal(&[&format!("_PID={main}")], TIMEOUT, |e| {
        message(e).starts_with("drained")
    });
    eprintln!(
        "drain entry: {:?} DRAIN_MS={}",
        message(&e),
        field(&e, "DRAIN_MS")
    );
    assert!(
        stop_took < Duration::from_secs(10),
        "stop took {stop_took:?}"
    );
    report.assert_no_errors();
    assert_eq!(m.show("hello.socket", "NRefused"), "0");
    assert_no_alien_warning(m);
}

/// The shipped `hello.service` runs hello without `--addr`: the socket
/// unit decides the address. An admin who moves `ListenStream=` to another
/// port must still be able to reload: the new process keeps serving the
/// socket unit's socket (it came from the manager), it does not take the
/// difference from its configured default for a configuration change.
fn reload_keeps_serving_the_socket_units_address(m: &UserManager) {
    let addr = install_hello(
        m,
        "hello.service",
        program!("hello"),
        free_port(),
        false,
        "",
    );
    let old = start_hello(m, addr);
    let (new, _) = reload(m, old);
    let log = m.journal(&["-o", "cat", &format!("_PID={new}")]);
    for _ in 0..3 {
        match try_get(addr, "/", Duration::from_secs(5)) {
            Ok(r) => assert_eq!((r.status, r.text().trim_end()), (200, GREETING)),
            Err(e) => panic!(
                "the socket unit's port is no longer served ({e}); new process {new}:\n{log}"
            ),
        }
    }
    assert!(!log.contains("binding anew"), "new process {new}:\n{log}");
}

fn the_journal_shows_each_process_with_its_own_pid(m: &UserManager) {
    let addr = install_hello(m, "hello.service", program!("hello"), free_port(), true, "");
    let old = start_hello(m, addr);
    let (new, _) = reload(m, old);

    let unit_cg = m.unit_cgroup("hello.service");
    let ready = |pid: u32, generation: &str| {
        let e = m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
            message(e) == "ready" && field(e, "GENERATION") == generation
        });
        assert_eq!(field(&e, "_TRANSPORT"), "journal", "native entry: {e:?}");
        assert_eq!(field(&e, "_SYSTEMD_CGROUP"), unit_cg, "{e:?}");
        if m.tags_user_units() {
            assert_eq!(field(&e, "_SYSTEMD_USER_UNIT"), "hello.service", "{e:?}");
        }
        e
    };
    ready(old, "0");
    ready(new, "1");

    let done = m.wait_for_journal(&[&format!("_PID={old}")], TIMEOUT, |e| {
        message(e).starts_with("upgrade complete")
    });
    eprintln!("upgrade entry: {done:?}");
    assert_eq!(field(&done, "NEW_PID"), new.to_string(), "{done:?}");
    assert_eq!(field(&done, "OLD_PID"), old.to_string(), "{done:?}");
    assert_eq!(field(&done, "OUTCOME"), "ok", "{done:?}");
    assert_eq!(field(&done, "GENERATION"), "1", "{done:?}");
    assert!(
        field(&done, "ELAPSED_MS").parse::<u64>().is_ok(),
        "{done:?}"
    );
    // A query by field works as documented: `journalctl NEW_PID=<pid>`.
    let by_field = m.journal_entries(&[&format!("NEW_PID={new}")]);
    assert!(
        by_field
            .iter()
            .any(|e| message(e).starts_with("upgrade complete")),
        "{by_field:?}"
    );
    for e in &by_field {
        assert_eq!(field(e, "_PID"), old.to_string(), "{e:?}");
    }
    if m.tags_user_units() {
        // The documented queries for a user unit: `journalctl --user -u hello.service` and
        // `journalctl _SYSTEMD_USER_UNIT=hello.service OUTCOME=ok` (not `_SYSTEMD_UNIT=`, which
        // is a system unit's).
        let by_unit = m.journal_entries(&["--user", "-u", "hello.service"]);
        for pid in [old, new] {
            assert!(
                by_unit
                    .iter()
                    .any(|e| message(e) == "ready" && field(e, "_PID") == pid.to_string()),
                "journalctl --user -u hello.service lacks pid {pid}'s ready entry"
            );
        }
        let outcome = m.journal_entries(&["_SYSTEMD_USER_UNIT=hello.service", "OUTCOME=ok"]);
        assert_eq!(outcome.len(), 1, "{outcome:?}");
        assert_eq!(field(&outcome[0], "NEW_PID"), new.to_string());
        assert!(m
            .journal_entries(&["_SYSTEMD_UNIT=hello.service"])
            .is_empty());
    } else {
        eprintln!(
            "systemd {}: no _SYSTEMD_USER_UNIT= here (the harness's cgroup is not under slices \
             only); matched by _PID and _SYSTEMD_CGROUP",
            m.version()
        );
    }
    assert_no_alien_warning(m);
}

/// The axum example installs a subscriber of its own with `handover::logging::layer()` added:
/// its own events and the crate's arrive in the journal as native entries with the true
/// `_PID`, before and after a reload.
fn an_apps_own_subscriber_with_the_crate_layer_writes_to_the_journal(m: &UserManager) {
    let addr = install_hello(m, "hello.service", program!("axum"), free_port(), true, "");
    let old = start_hello(m, addr);
    let (new, _) = reload(m, old);
    for (pid, generation) in [(old, "0"), (new, "1")] {
        for (what, wanted) in [
            ("the app's own event", "listening"),
            ("the crate's", "ready"),
        ] {
            let e = m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
                message(e) == wanted && field(e, "GENERATION") == generation
            });
            assert_eq!(field(&e, "_TRANSPORT"), "journal", "{what}: {e:?}");
        }
    }
    // Nothing on stderr: the layer chose journald, and journald was reachable.
    let stderr = m.journal_entries(&[&format!("_PID={old}"), "_TRANSPORT=stdout"]);
    assert!(stderr.is_empty(), "{stderr:?}");
}

/// `WatchdogSec=` on the shipped unit: after each handoff the new main process feeds the
/// watchdog (systemd takes `WATCHDOG=1` from the main process only), so the service lives on
/// through a whole watchdog period after the old process is gone, with no restart.
fn watchdog_pings_follow_the_new_main_process(m: &UserManager) {
    const WATCHDOG_USEC: u64 = 1_000_000;
    let addr = install_hello(
        m,
        "hello.service",
        program!("hello"),
        free_port(),
        true,
        "WatchdogSec=1s",
    );
    let first = start_hello(m, addr);
    assert_eq!(m.show("hello.service", "WatchdogUSec"), "1s");
    let pinged = |m: &UserManager| -> u64 {
        m.show("hello.service", "WatchdogTimestampMonotonic")
            .parse()
            .unwrap()
    };
    let mut main = first;
    for i in 1..=3 {
        let (new, _) = reload(m, main);
        let gone = monotonic_usec();
        let env = environ(new);
        assert_eq!(
            env.get("WATCHDOG_USEC").map(String::as_str),
            Some("1000000"),
            "reload {i}"
        );
        assert_eq!(env.get("WATCHDOG_PID"), None, "reload {i}: {env:?}");
        // Fed for a whole period after the old process was gone: only the new one can have.
        m.wait_until(
            &format!("reload {i}: a watchdog ping a whole period after pid {main} exited"),
            TIMEOUT,
            || pinged(m) > gone + WATCHDOG_USEC,
        );
        assert_eq!(m.main_pid("hello.service"), new, "reload {i}");
        assert_eq!(m.show("hello.service", "ActiveState"), "active");
        assert_eq!(m.show("hello.service", "NRestarts"), "0", "reload {i}");
        main = new;
    }
    let about = m.journal(&["-o", "cat", "USER_UNIT=hello.service"]);
    assert!(!about.contains("atchdog timeout"), "{about}");
    assert_eq!(greeting(addr), GREETING);
}

/// The `ExecReload=` alternatives the docs describe, each with a broken and then a good new
/// binary: what `systemctl reload` tells the operator.
fn what_each_reload_alternative_tells_the_operator(m: &UserManager) {
    let bin = hello_copy(m);
    let port = free_port();
    let exec = format!("{} --addr 127.0.0.1:{port}", bin.path().display());
    let reload = program!("test-handover-reload");
    let (socket, shipped) = units::hello_units(m, "hello.service", &exec, port, reload);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    m.install_unit("hello.socket", &socket);

    // (unit, what it is, whether a failed upgrade fails the reload, whether systemctl reload
    // waits for the new main process)
    let mut variants = vec![(
        set_key(&shipped, "ExecReload", "/bin/kill -HUP $MAINPID"),
        "Type=notify + ExecReload=/bin/kill -HUP $MAINPID",
        false,
        false,
    )];
    if m.major() >= 253 {
        let (_, notify_reload) =
            units::hello_units(m, "hello-notify-reload.service", &exec, port, reload);
        variants.push((
            without_keys(&notify_reload, &["ExecReload", "ReloadSignal"]),
            "Type=notify-reload alone (systemd sends SIGHUP)",
            false,
            true,
        ));
    }
    for (unit, what, reports_failure, waits) in variants {
        m.install_unit("hello.service", &unit);
        m.daemon_reload();
        m.systemctl_ok(&["start", "hello.socket"]);
        m.systemctl_ok(&["restart", "hello.service"]);
        let pid = m.main_pid("hello.service");
        assert_eq!(greeting(addr), GREETING);

        bin.replace(BROKEN_BUILD, 0o755);
        let (out, _) = units::systemctl_reload(m);
        // The upgrade's end, whatever the reload said.
        m.wait_until("the failed upgrade to be reported", TIMEOUT, || {
            m.show("hello.service", "StatusText").contains("failed")
                && m.show("hello.service", "SubState") == "running"
        });
        let broken_rc = out.status.code();
        assert_eq!(m.main_pid("hello.service"), pid, "{what}");
        assert_eq!(greeting(addr), GREETING, "{what}: still serving");
        assert_eq!(
            !out.status.success(),
            reports_failure,
            "{what}: systemctl reload of a broken build exited {:?}",
            broken_rc
        );

        bin.restore();
        let (out, took) = units::systemctl_reload(m);
        let at_return = m.main_pid("hello.service");
        assert!(out.status.success(), "{what}: {out:?}");
        m.wait_until("MainPID to move", TIMEOUT, || {
            m.main_pid("hello.service") != pid
        });
        if waits {
            assert_ne!(
                at_return, pid,
                "{what}: systemctl reload returned before the handoff"
            );
        }
        announce(&format!(
            "  systemd {} ({}): {what}: broken new binary -> systemctl reload exits {}; good one -> exits 0 after {took:.2?}, MainPID {} when it returns",
            m.major(),
            m.kind().label(),
            broken_rc.map_or("by a signal".into(), |c| c.to_string()),
            if at_return == pid { "not yet moved" } else { "already moved" },
        ));
        m.systemctl_ok(&["stop", "hello.service"]);
    }

    // And why the shipped notify-reload unit sets ReloadSignal=SIGCONT: with SIGHUP, systemd's
    // signal and handover-reload each ask for an upgrade.
    if m.major() >= 253 {
        let (_, notify_reload) =
            units::hello_units(m, "hello-notify-reload.service", &exec, port, reload);
        assert_eq!(get_key(&notify_reload, "ReloadSignal"), Some("SIGCONT"));
        m.install_unit(
            "hello.service",
            &without_keys(&notify_reload, &["ReloadSignal"]),
        );
        m.daemon_reload();
        m.systemctl_ok(&["restart", "hello.service"]);
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let before = generation(m);
            let (out, _) = units::systemctl_reload(m);
            m.wait_until("the unit to settle", TIMEOUT, || {
                m.show("hello.service", "SubState") == "running"
                    && !m
                        .show("hello.service", "StatusText")
                        .starts_with("upgrading")
            });
            let upgrades = generation(m) - before;
            outcomes.push((out.status.code(), upgrades));
            assert!(
                !out.status.success() || upgrades == 2,
                "with ReloadSignal=SIGHUP and handover-reload: exit {:?} after {upgrades} upgrade(s)",
                out.status.code()
            );
        }
        announce(&format!(
            "  systemd {} ({}): Type=notify-reload + handover-reload with the default ReloadSignal=SIGHUP: (exit code, upgrades) per reload {outcomes:?}",
            m.major(),
            m.kind().label(),
        ));
    }
}

/// `units/handover-dropin.conf` on a plain service that runs a handover program (`ExecStart=`
/// only), with the shipped socket unit: the reload waits for the new main process, and fails
/// when the new binary is broken, as with `units/hello.service`.
fn the_dropin_turns_a_plain_service_into_a_handover_one(m: &UserManager) {
    let bin = hello_copy(m);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    m.install_unit(
        "hello.socket",
        &set_key(
            &repo_unit("hello.socket"),
            "ListenStream",
            &addr.to_string(),
        ),
    );
    m.install_unit(
        "hello.service",
        &format!(
            "[Unit]\nRequires=hello.socket\nAfter=hello.socket\n\n[Service]\nExecStart={} --addr {addr}\n",
            bin.path().display()
        ),
    );
    let reload_command = units::install_reload_command(m, program!("test-handover-reload"));
    let dropin = with_reload_command(&repo_unit("handover-dropin.conf"), &reload_command);
    m.install_unit("hello.service.d/handover.conf", &dropin);
    m.daemon_reload();
    assert_eq!(m.show("hello.service", "Type"), "notify");
    let first = start_hello(m, addr);
    let (second, _) = reload(m, first);

    bin.replace(BROKEN_BUILD, 0o755);
    let (out, _) = units::systemctl_reload(m);
    assert!(!out.status.success(), "a broken build reloaded with exit 0");
    assert_eq!(m.show("hello.service", "ReloadResult"), "exit-code");
    assert_eq!(m.main_pid("hello.service"), second);
    assert_eq!(greeting(addr), GREETING);

    bin.restore();
    reload(m, second);
    assert_eq!(greeting(addr), GREETING);
    assert_no_alien_warning(m);
}

// ---------------------------------------------------------------------------------------------
// systemd-socket-activate

#[test]
fn socket_activate_then_sighup_under_load() {
    const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
    if !have(ACTIVATE, "systemd") {
        return;
    }
    // Each old generation's successor is orphaned when it exits: reap them.
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("hello.pid");
    let mut cmd = command(ACTIVATE);
    cmd.args(["-l", &addr.to_string(), "-E", "RUST_LOG=info"])
        .arg(program!("hello"))
        .args(["--addr", &addr.to_string()])
        .arg("--pid-file")
        .arg(&pid_file);
    let mut server = Server::spawn(cmd, Some(&pid_file));
    let listening = ["Listening on", &addr.to_string()];
    server.log.wait_line(0, &listening, TIMEOUT);
    assert!(
        server.pid().is_none(),
        "nothing runs before the first connection"
    );
    // It execs hello in place on the first connection, which waits meanwhile.
    assert_eq!(greeting(addr), GREETING);
    let first = server.wait_started();

    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows_or(50, || server.log.text());
    let mut generations = Generations::new(first);
    for _ in 1..=2 {
        generations.push(server.upgrade_and_reap().1);
        load.assert_flows_or(50, || server.log.text());
    }
    eprintln!("systemd-socket-activate, 2 SIGHUP upgrades:");
    load.stop().assert_lost_nothing(1);
    assert_eq!(terminate(generations.last()), 0);
    assert!(
        server.pid().is_none(),
        "the PID file is removed on a real stop"
    );
}

// ---------------------------------------------------------------------------------------------
// the notify protocol against a socket the test owns

/// The same message as `sd-notify` 0.5 would send it (one state per line).
fn as_sd_notify(states: &[sd_notify::NotifyState<'_>]) -> String {
    states
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn notify_reload_sequence_on_a_socket_of_our_own() {
    let notify = NotifySocket::bind();
    // The test answers each barrier itself, once it has looked at the state before.
    notify.hold_barriers();
    let envs = [("NOTIFY_SOCKET", notify.path())];
    let mut server = Server::start(program!("hello"), &[], &envs);
    let addr = server.addr();
    let first = server.child.id();

    let d = notify.recv();
    assert_eq!(d.sender, first);
    let status0 = format!("serving, generation 0, pid {first}");
    assert_eq!(
        d.text,
        as_sd_notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status0)
        ])
    );
    assert!(d.fds.is_empty());

    let mut old = first;
    for generation in 1..=2u32 {
        // What systemd >= 253 does for Type=notify-reload: note the time,
        // send the reload signal.
        let before = monotonic_usec();
        signal(old, Signal::SIGHUP);

        // 1. RELOADING=1 with a MONOTONIC_USEC not older than the signal.
        let d = notify.recv();
        assert_eq!(d.sender, old, "{:?}", d.text);
        let a = assignments(&d.text);
        assert_eq!(a[0], ("RELOADING", "1"), "{:?}", d.text);
        assert_eq!(a[1].0, "MONOTONIC_USEC", "{:?}", d.text);
        let usec: u64 = a[1].1.parse().unwrap();
        assert!(
            usec >= before,
            "MONOTONIC_USEC={usec} is older than the signal ({before})"
        );
        assert!(usec <= monotonic_usec());
        let extend: u32 = a
            .iter()
            .find(|(k, _)| *k == "EXTEND_TIMEOUT_USEC")
            .map(|(_, v)| v.parse().unwrap())
            .expect("EXTEND_TIMEOUT_USEC");
        let status = format!("upgrading to generation {generation}");
        assert_eq!(
            d.text,
            as_sd_notify(&[
                sd_notify::NotifyState::Reloading,
                sd_notify::NotifyState::MonotonicUsec(usec as i128),
                sd_notify::NotifyState::ExtendTimeoutUsec(extend),
                sd_notify::NotifyState::Status(&status),
            ])
        );
        assert!(d.fds.is_empty());

        // 2. MAINPID=<new> + READY=1 in one datagram, from the old process.
        let d = notify.recv();
        assert_eq!(d.sender, old, "{:?}", d.text);
        let a = assignments(&d.text);
        assert_eq!(a[0].0, "MAINPID", "{:?}", d.text);
        let new: u32 = a[0].1.parse().unwrap();
        assert_ne!(new, old);
        let status = format!("serving, generation {generation}, pid {new}");
        assert_eq!(
            d.text,
            as_sd_notify(&[
                sd_notify::NotifyState::MainPid(new),
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ])
        );
        assert!(d.fds.is_empty());
        // CLONE_PARENT: the new process is the old one's sibling, our child.
        assert_eq!(ppid(new), std::process::id());

        // 3. BARRIER=1, alone, with exactly one fd.
        let d = notify.recv();
        assert_eq!(d.sender, old);
        assert_eq!(d.text, "BARRIER=1");
        assert_eq!(d.nfds, 1, "BARRIER=1 carries exactly one fd");
        // Until we close it, the new process is not main: it says nothing and
        // writes no PID file; the old one still serves (so does the new one's
        // accept loop: either answers).
        assert!(
            notify.try_recv().is_none(),
            "a message before the barrier was released"
        );
        assert_eq!(server.pid(), Some(old));
        assert!(alive(old) && alive(new));
        assert_eq!(greeting(addr), GREETING);
        notify.release_barriers();
        notify.hold_barriers();

        // 4. The new process's own STATUS=, now that it is main.
        let d = notify.recv();
        assert_eq!(d.sender, new, "{:?}", d.text);
        assert_eq!(
            d.text,
            as_sd_notify(&[sd_notify::NotifyState::Status(&status)])
        );
        server.wait_pid("the PID file to name the new process", |pid| {
            (pid == Some(new)).then_some(())
        });

        // The old process drains and exits 0; it never sends STOPPING=1.
        assert_eq!(server.reap(old), 0, "old process {old}");
        assert!(notify.try_recv().is_none(), "the old process sent more");
        assert_eq!(greeting(addr), GREETING);
        old = new;
    }

    // A real stop: STOPPING=1 from the process that is main, exit 0.
    signal(old, Signal::SIGTERM);
    let d = notify.recv();
    assert_eq!(d.sender, old);
    assert_eq!(
        d.text,
        as_sd_notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping")
        ])
    );
    assert_eq!(reap(old, TIMEOUT), 0);
    assert!(server.pid().is_none());
}

// ---------------------------------------------------------------------------------------------
// systemd-analyze verify

/// The built program that the shipped units call `/usr/local/bin/<name>`.
fn built(name: &str) -> Option<&'static Path> {
    match name {
        "hello" => Some(program!("hello")),
        "handover-reload" => Some(program!("test-handover-reload")),
        "handover" => Some(program!("test-handover")),
        _ => None,
    }
}

/// Points the program of every `Exec*=` line that names a program of this crate
/// (`/usr/local/bin/<name>`) at the built one, keeping prefixes (`-@:+!`) and arguments.
fn point_exec_lines(text: &str) -> String {
    let mut out: String = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            let Some((key, value)) = t.split_once('=') else {
                return l.to_owned();
            };
            let value = value.trim();
            if !key.starts_with("Exec") || value.is_empty() {
                return l.to_owned();
            }
            let flags_len = value
                .find(|c: char| !"-@:+!".contains(c))
                .unwrap_or(value.len());
            let (flags, rest) = value.split_at(flags_len);
            let (program, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let Some(name) = program.strip_prefix("/usr/local/bin/") else {
                return l.to_owned(); // a system program such as /bin/kill
            };
            let built = built(name).unwrap_or_else(|| {
                panic!("{key}= runs {program}, which is not a program of this crate")
            });
            format!("{key}={flags}{} {args}", built.display())
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

fn copy_units(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_units(&e.path(), &dest);
        } else {
            let text = fs::read_to_string(e.path()).unwrap();
            fs::write(&dest, point_exec_lines(&text)).unwrap();
        }
    }
}

const UNIT_SUFFIXES: &[&str] = &[
    ".service", ".socket", ".target", ".timer", ".path", ".mount", ".slice", ".scope",
];

/// `systemd-analyze verify` of every unit in `units/` (with the drop-ins in
/// `<unit>.d/` next to it) and of every stand-alone drop-in (`units/*.conf`,
/// applied to a minimal service running hello), by the manager's own
/// systemd. The only stderr lines tolerated are systemd 252's "Failed to parse
/// service type, ignoring: notify-reload" and "Unknown key 'ReloadSignal'"
/// (253 knows both).
fn units_verify(m: &UserManager) {
    let src = units::repo_dir();
    // Where the manager's tools see it too.
    let tmp = tempfile::tempdir_in(m.scratch_dir()).unwrap();
    let units = tmp.path().join("units");
    copy_units(&src, &units);
    let mut files: Vec<PathBuf> = fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut targets = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap().to_owned();
        if UNIT_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            targets.push((name, f.clone()));
        } else if name.ends_with(".conf") {
            // A drop-in for any service: apply it to a minimal one.
            let stem = name.trim_end_matches(".conf");
            let unit = units.join(format!("dropin-{stem}.service"));
            let dir = units.join(format!("dropin-{stem}.service.d"));
            fs::create_dir_all(&dir).unwrap();
            fs::copy(f, dir.join(&name)).unwrap();
            let exec = program!("hello");
            fs::write(&unit, format!("[Service]\nExecStart={}\n", exec.display())).unwrap();
            targets.push((name, unit));
        } else {
            panic!("units/{name}: neither a unit nor a drop-in (*.conf)");
        }
    }
    assert!(
        targets.iter().any(|(n, _)| n.ends_with(".service")),
        "{targets:?}"
    );
    let tolerated: &[&str] = if m.major() < 253 {
        &[
            "Failed to parse service type, ignoring: notify-reload",
            "Unknown key 'ReloadSignal'",
        ]
    } else {
        &[]
    };
    // One unit at a time, so that each failure names its file.
    let mut failures = Vec::new();
    for (name, unit) in &targets {
        let out = m
            .command("systemd-analyze")
            .args(["--user", "--no-pager", "verify"])
            .arg(unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let unexpected: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !tolerated.iter().any(|t| l.contains(t)))
            .collect();
        eprintln!("systemd {}: verify {name}: {}", m.version(), out.status);
        if !out.status.success() || !unexpected.is_empty() {
            failures.push(format!(
                "{name}: {}\n  {}",
                out.status,
                unexpected.join("\n  ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "systemd-analyze verify (systemd {}):\n{}",
        m.version(),
        failures.join("\n")
    );
}
