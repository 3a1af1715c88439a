//! `handover run`: the supervisor for containers and a developer's
//! terminal, with real processes and sockets.
//!
//! The container tests run the supervisor as PID 1 of a new PID namespace
//! (`unshare --pid --fork --mount-proc`), as `docker run` does; they need
//! root and skip otherwise (and fail under `CI=true`). The terminal tests
//! run it as a plain child of the test, with no root.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use support::http::{free_port, get, greeting, Conn};
use support::load::{Load, LoadConfig};
use support::process::{alive, children, fd_kinds, fd_target, host_pid, zombie_children};
use support::server::{command, Deployed, Log, BROKEN_BUILD, NEVER_READY};
use support::{program, skip, wait_for, TIMEOUT};

const PYTHON: &str = "/usr/bin/python3";

/// The crate's `handover` command.
fn handover() -> &'static Path {
    program!("test-handover")
}

/// Whether this machine can run the supervisor as PID 1 of a new PID namespace; says why not
/// (and fails under `CI=true`).
fn pid1_or_skip() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root for a PID namespace".to_owned())
    } else {
        match Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .output()
        {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "unshare --pid fails: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run unshare: {e}")),
        }
    };
    match why {
        None => true,
        Some(why) => skip(&why),
    }
}

/// A supervisor started by a test, as PID 1 of a new PID namespace or as
/// a plain child. Killed (with everything under it) when dropped.
struct Supervised {
    child: Child,
    /// The supervisor's pid, as this test sees it.
    pid: u32,
    log: Log,
    runtime: PathBuf,
    _dir: tempfile::TempDir,
    in_namespace: bool,
}

/// A fresh runtime directory (mode 0700) for a supervisor and its commands.
fn runtime_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    (dir, runtime)
}

impl Supervised {
    /// `handover run ARGS`, with `XDG_RUNTIME_DIR` in a fresh directory.
    fn start(in_namespace: bool, args: &[&str]) -> Supervised {
        let (dir, runtime) = runtime_dir();
        let mut cmd = if in_namespace {
            let mut c = command("unshare");
            c.args(["--pid", "--fork", "--mount-proc"])
                .arg(handover())
                .arg("run");
            c
        } else {
            let mut c = command(handover());
            c.arg("run");
            c
        };
        cmd.args(args)
            .current_dir(dir.path())
            .env("XDG_RUNTIME_DIR", &runtime);
        let mut child = wait_for("the supervisor to start", TIMEOUT, || match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
            r => Some(r.unwrap()),
        });
        let log = Log::capture(child.stderr.take().unwrap());
        let pid = if in_namespace {
            let unshare = child.id();
            wait_for("unshare's child", TIMEOUT, || {
                children(unshare).first().copied()
            })
        } else {
            child.id()
        };
        Supervised {
            child,
            pid,
            log,
            runtime,
            _dir: dir,
            in_namespace,
        }
    }

    fn wait_ready(&self) {
        self.log.wait_line(0, &["the program is ready"], TIMEOUT);
    }

    /// `handover CMD ARGS` with the same runtime directory.
    fn command(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new(handover())
            .arg(cmd)
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .output()
            .unwrap()
    }

    /// `handover reload`: (exit code, stdout, stderr).
    fn reload(&self) -> (i32, String, String) {
        let out = self.command("reload", &["--timeout", "30"]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A reload that must succeed; returns the new main pid (as the
    /// supervisor sees it).
    fn reload_ok(&self) -> u32 {
        let (code, stdout, stderr) = self.reload();
        assert_eq!(code, 0, "handover reload: {stdout} {stderr}");
        stdout
            .trim()
            .strip_prefix("reloaded: main PID ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected output {stdout:?}"))
    }

    /// The main pid as the supervisor sees it, from `handover status`.
    fn main_pid(&self) -> u32 {
        let out = self.command("status", &[]);
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "status: {line}");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"))
    }

    /// A pid the supervisor reports, as this test sees it.
    fn host(&self, pid: u32) -> u32 {
        if self.in_namespace {
            wait_for("the pid in the namespace", TIMEOUT, || {
                host_pid(self.pid, pid)
            })
        } else {
            pid
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid as i32), signal).unwrap();
    }

    /// Waits (bounded) for the supervisor to exit; its exit code.
    fn wait_exit(&mut self) -> i32 {
        let status = wait_for("the supervisor to exit", TIMEOUT, || {
            self.child.try_wait().unwrap()
        });
        status.code().unwrap_or(-1)
    }

    /// Waits until the only child of the supervisor is `main` and nothing
    /// under it is a zombie.
    fn wait_settled(&self, main: u32) {
        wait_for(
            "the supervisor to have only the main process as child, and no zombie",
            TIMEOUT,
            || (children(self.pid) == [main] && zombie_children(self.pid).is_empty()).then_some(()),
        );
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // As PID 1 of its namespace, its death takes everything in it.
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            if !self.in_namespace {
                for c in children(self.pid) {
                    let _ = kill(Pid::from_raw(c as i32), Signal::SIGKILL);
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A supervisor (as PID 1 of a new namespace or not), ready, running `program` (from a copy
/// the test may replace) on one listening socket `http` at a free port; its address, and the
/// copy. `options` go before the listener, `program_args` after the program.
fn supervise(
    in_namespace: bool,
    program: &Path,
    options: &[&str],
    program_args: &[&str],
) -> (Supervised, SocketAddr, Deployed) {
    let exe = Deployed::copy(program);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = format!("http={addr}");
    let mut args = options.to_vec();
    args.extend(["-l", &listen, "--", exe.path().to_str().unwrap()]);
    let addr_arg = addr.to_string();
    for a in program_args {
        // The program is told the address the supervisor listens on.
        args.push(if *a == "ADDR" { &addr_arg } else { a });
    }
    let sup = Supervised::start(in_namespace, &args);
    sup.wait_ready();
    (sup, addr, exe)
}

/// hello under the supervisor in handoff mode, told the supervisor's address.
fn handoff_hello(in_namespace: bool) -> (Supervised, SocketAddr, Deployed) {
    let options = ["--reload", "handoff"];
    supervise(
        in_namespace,
        program!("hello"),
        &options,
        &["--addr", "ADDR"],
    )
}

#[test]
fn hello_upgrades_itself_twenty_times_under_load_as_pid_1() {
    if !pid1_or_skip() {
        return;
    }
    let (sup, addr, _exe) = handoff_hello(true);
    assert_eq!(greeting(addr), "Welcome to the Home Page!");
    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows(50);
    let mut mains = vec![sup.main_pid()];
    for i in 1..=20 {
        let new = if i % 2 == 0 {
            sup.reload_ok()
        } else {
            // SIGHUP to the supervisor: the same reload, without an answer.
            let old = *mains.last().unwrap();
            sup.signal(Signal::SIGHUP);
            wait_for("a new main process after SIGHUP", TIMEOUT, || {
                Some(sup.main_pid()).filter(|p| *p != old)
            })
        };
        assert!(!mains.contains(&new), "reload {i}: pid {new} seen before");
        // CLONE_PARENT: the new version is the supervisor's own child.
        let host = sup.host(new);
        assert!(children(sup.pid).contains(&host), "reload {i}");
        mains.push(new);
        load.assert_flows(20);
    }
    let report = load.stop();
    report.assert_lost_nothing(1000);

    let main = sup.host(*mains.last().unwrap());
    sup.wait_settled(main);
    sup.log.wait_line(0, &["ready", "generation=20"], TIMEOUT);
    // The terminal is kept: the twentieth generation writes where the supervisor writes.
    for fd in [1, 2] {
        assert_eq!(fd_target(main, fd), fd_target(sup.pid, fd), "fd {fd}");
    }
    let mut sup = sup;
    sup.signal(Signal::SIGINT);
    assert_eq!(sup.wait_exit(), 0, "hello exits 0 after SIGINT");
    assert!(!alive(main));
    eprintln!("hello under handover run as PID 1: 20 reloads (10 handover reload, 10 SIGHUP)");
}

#[test]
fn a_program_not_built_on_handover_restarts_twenty_times_without_a_failed_request() {
    if !pid1_or_skip() {
        return;
    }
    let (sup, addr, _exe) = supervise(true, program!("plain_server"), &[], &[]);
    let fds_at_start = fd_kinds(sup.pid);
    let load = Load::start(addr, LoadConfig::clients(0, 8));
    load.assert_flows(50);
    let mut mains = vec![sup.main_pid()];
    for i in 1..=20 {
        let new = if i < 20 {
            sup.reload_ok()
        } else {
            // The systemd-side command speaks the same protocol (it sends its environment
            // too, which the supervisor does not apply).
            let socket = sup.runtime.join("handover/plain_server.sock");
            let out = Command::new(program!("test-handover-reload"))
                .arg("--socket")
                .arg(&socket)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "handover-reload: {stdout}");
            stdout.trim().rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(!mains.contains(&new), "reload {i}: pid {new} seen before");
        let old = *mains.last().unwrap();
        // The old instance got SIGTERM, drained and exited 0.
        let needles = [
            "old instance exited",
            &format!("pid={old} "),
            "exit status 0",
        ];
        sup.log.wait_line(0, &needles, TIMEOUT);
        mains.push(new);
        load.assert_flows(20);
    }
    let report = load.stop();
    report.assert_lost_nothing(500);
    // Each instance answered some of the requests.
    assert!(report.bodies.len() >= 10, "{report}");
    let main = sup.host(*mains.last().unwrap());
    sup.wait_settled(main);
    // No fd left behind by 20 instances and 20 control connections.
    wait_for(
        "the supervisor's fds to be what they were at start",
        TIMEOUT,
        || (fd_kinds(sup.pid) == fds_at_start).then_some(()),
    );
    let mut sup = sup;
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(), 0);
    eprintln!("plain_server under handover run as PID 1: 20 reloads (19 handover reload, 1 handover-reload --socket)");
}

#[test]
fn a_broken_new_binary_fails_the_reload_and_the_old_keeps_serving() {
    if !pid1_or_skip() {
        return;
    }
    // Restart mode: the supervisor starts the new binary itself.
    let options = ["--ready-timeout", "1"];
    let (sup, addr, exe) = supervise(true, program!("plain_server"), &options, &[]);
    let load = Load::start(addr, LoadConfig::clients(0, 4));
    load.assert_flows(20);
    let main = sup.main_pid();
    let cases: [(&str, &[u8], u32, &str); 3] = [
        (
            "exits",
            BROKEN_BUILD,
            0o755,
            "exited before it was ready: exit status 3",
        ),
        (
            "never ready",
            NEVER_READY,
            0o755,
            "was not ready within 1s; killed",
        ),
        (
            "not executable",
            b"#!/bin/sh\nexit 0\n",
            0o644,
            "cannot execute the program: Permission denied",
        ),
    ];
    for (what, contents, mode, want) in cases {
        exe.replace(contents, mode);
        let (code, stdout, stderr) = sup.reload();
        assert_eq!(code, 1, "{what}: {stdout} {stderr}");
        assert!(stderr.contains(want), "{what}: {stderr}");
        assert_eq!(sup.main_pid(), main, "{what}: the old one is still main");
        load.assert_flows(10);
        eprintln!(
            "restart, new binary {what}: handover reload exit {code}: {}",
            stderr.trim()
        );
    }
    exe.restore();
    let new = sup.reload_ok();
    assert_ne!(new, main);
    load.assert_flows(10);
    let report = load.stop();
    report.assert_no_errors();
    sup.wait_settled(sup.host(new));
    drop(sup);

    // Handoff mode: hello starts the broken binary, which the supervisor reaps (it is its
    // child through CLONE_PARENT).
    let (sup, addr, exe) = handoff_hello(true);
    let main = sup.main_pid();
    exe.replace(BROKEN_BUILD, 0o755);
    let (code, stdout, stderr) = sup.reload();
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(
        stderr.contains("upgrade to generation 1 failed") && stderr.contains("(exit status 3)"),
        "{stderr}"
    );
    eprintln!(
        "handoff, new binary exits: handover reload exit {code}: {}",
        stderr.trim()
    );
    assert_eq!(sup.main_pid(), main);
    assert_eq!(get(addr, "/").status, 200);
    sup.wait_settled(sup.host(main));
    exe.restore();
    assert_ne!(sup.reload_ok(), main, "the next reload works");
}

#[test]
fn sigint_stops_everything_with_the_programs_exit_status() {
    if !pid1_or_skip() {
        return;
    }
    // An old instance still draining a connection when SIGINT arrives: the supervisor waits
    // for it (at most the stop timeout), then exits with the main process's status.
    let options = ["--stop-timeout", "2"];
    let (mut sup, addr, _exe) = supervise(true, program!("plain_server"), &options, &[]);
    // A keep-alive connection to the first instance, which it will drain.
    let mut held = Conn::open(addr);
    assert_eq!(held.get("/").status, 200);
    let old = sup.host(sup.main_pid());
    let new = sup.host(sup.reload_ok());
    assert!(alive(old), "the old instance drains the held connection");
    sup.signal(Signal::SIGINT);
    assert_eq!(sup.wait_exit(), 0, "plain_server exits 0");
    assert!(!alive(old) && !alive(new));
    sup.log.wait_line(
        0,
        &["old instance", "did not exit within the stop timeout"],
        TIMEOUT,
    );
    drop(held);

    // The program's own status comes back: an exit code, and a signal as 128 + its number.
    let cases: [(&str, i32); 2] = [
        ("trap 'exit 7' INT; echo armed >&2; sleep 30 & wait", 7),
        ("echo armed >&2; exec sleep 30", 130),
    ];
    for (script, want) in cases {
        let mut sup = Supervised::start(true, &["--ready", "0", "--", "sh", "-c", script]);
        sup.log.wait_line(0, &["armed"], TIMEOUT);
        sup.wait_ready();
        sup.signal(Signal::SIGINT);
        assert_eq!(sup.wait_exit(), want, "{script}");
        eprintln!("SIGINT to `{script}` under handover run: exit {want}");
    }
}

#[test]
fn orphans_are_reaped_as_pid_1() {
    if !pid1_or_skip() {
        return;
    }
    let script = "(sleep 1 &); echo armed >&2; exec sleep 30";
    let mut sup = Supervised::start(true, &["--ready", "0", "--", "sh", "-c", script]);
    sup.log.wait_line(0, &["armed"], TIMEOUT);
    // The orphaned `sleep 1` is the supervisor's child now...
    wait_for("the orphan to be reparented to PID 1", TIMEOUT, || {
        (children(sup.pid).len() == 2).then_some(())
    });
    // ...and once it exits, it is reaped: no zombie.
    let main = sup.host(sup.main_pid());
    sup.wait_settled(main);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(), 128 + 15);
}

#[test]
fn in_a_terminal_the_program_stays_the_supervisors_child_across_upgrades() {
    // No namespace and no root: handover run in a developer's shell.
    let (mut sup, addr, _exe) = handoff_hello(false);
    let first = sup.main_pid();
    let mut main = first;
    for _ in 0..3 {
        sup.signal(Signal::SIGHUP);
        main = wait_for("a new main process", TIMEOUT, || {
            Some(sup.main_pid()).filter(|p| *p != main)
        });
        assert!(children(sup.pid).contains(&main));
        assert_eq!(get(addr, "/").status, 200);
    }
    sup.wait_settled(main);
    assert!(!alive(first));
    for fd in [1, 2] {
        assert_eq!(fd_target(main, fd), fd_target(sup.pid, fd), "fd {fd}");
    }
    let socket = sup.runtime.join("handover").join("hello.sock");
    assert!(socket.exists(), "{}", socket.display());
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(), 0);
    assert!(!alive(main));
    assert!(!socket.exists(), "the control socket is removed on exit");
    let left: Vec<_> = std::fs::read_dir(sup.runtime.join("handover"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn ctrl_c_in_a_terminal_reaches_the_program_once() {
    // `script` gives the supervisor a terminal; ^C written to it makes the terminal send
    // SIGINT to the foreground process group: the supervisor and the program. The supervisor
    // must not send it a second time.
    if Command::new("script").arg("--version").output().is_err() {
        skip("no `script` command (util-linux / bsdutils)");
        return;
    }
    let (_dir, runtime) = runtime_dir();
    // After the first SIGINT it waits one more second, in which a second one would be counted
    // too; the trap kills the sleep it interrupts.
    let program =
        "trap 'echo got-int; kill \\$! 2>/dev/null' INT; sleep 30 & echo armed; wait; sleep 1 & wait; exit 5";
    let inner = format!(
        "exec {} run --no-control --ready 0 -- sh -c \"{program}\"",
        handover().display()
    );
    let mut cmd = command("script");
    cmd.args(["-qfec", &inner, "/dev/null"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let log = Log::capture(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    log.wait_line(0, &["armed"], TIMEOUT);
    log.wait_line(0, &["the program is ready"], TIMEOUT);
    use std::io::Write;
    stdin.write_all(b"\x03").unwrap();
    stdin.flush().unwrap();
    log.wait_line(
        0,
        &["the terminal sent the signal to the program too"],
        TIMEOUT,
    );
    let status = wait_for("script to exit", TIMEOUT, || child.try_wait().unwrap());
    let text = log.text();
    assert_eq!(
        text.matches("got-int").count(),
        1,
        "one SIGINT, not two:\n{text}"
    );
    assert_eq!(status.code(), Some(5), "{text}");
    drop(stdin);
}

#[test]
fn a_program_that_cannot_notify_is_ready_after_a_delay() {
    // `--ready SECS`: no READY=1 ever; a new instance counts as ready once it has run that
    // long. No root needed.
    let options = ["--ready", "0.3"];
    let (mut sup, addr, _exe) =
        supervise(false, program!("plain_server"), &options, &["--no-notify"]);
    let load = Load::start(addr, LoadConfig::clients(0, 4));
    load.assert_flows(20);
    let mut main = sup.main_pid();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let new = sup.reload_ok();
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "ready only after the delay"
        );
        assert_ne!(new, main);
        main = new;
        load.assert_flows(20);
    }
    let report = load.stop();
    report.assert_no_errors();
    sup.wait_settled(main);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(), 0);
}

/// A client of another user writes its whole request and reads "error permission denied",
/// as from a program's own control socket (`reliability.rs`). Before: the supervisor answered
/// a refused peer before reading its request and closed the connection with it unread, so a
/// client that writes its request before it reads (`sendall`, then `recv`) failed with
/// "Broken pipe". Needs root, `setpriv` to act as user 65534, and Python for that client.
#[test]
fn a_refused_control_client_reads_permission_denied() {
    if !support::root()
        || !support::have("/usr/bin/setpriv", "util-linux")
        || !support::have(PYTHON, "a control client that writes, then reads")
    {
        return;
    }
    // A socket another user can reach: in a directory open to all, the file opened up too
    // (the supervisor's own check is then all that keeps that user out).
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = open.path().join("sup.sock");
    let args = [
        "--control",
        socket.to_str().unwrap(),
        "--ready",
        "0",
        "--",
        "sh",
        "-c",
        "exec sleep 60",
    ];
    let mut sup = Supervised::start(false, &args);
    sup.wait_ready();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let pid = || {
        let status = handover::control::request_status(&socket, TIMEOUT).unwrap();
        status
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no pid in {status:?}"))
    };
    let main = pid();
    let as_nobody = |program: &Path| {
        let mut cmd = Command::new("/usr/bin/setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program)
            .stdin(std::process::Stdio::null());
        cmd
    };
    // An environment near the limit (256 KiB), more than the socket's buffer holds: unless
    // the supervisor reads it, the write cannot complete.
    let client = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
body = b"PADDING=" + b"x" * 250000 + b"\0"
try:
    s.sendall(b"upgrade env %d\n" % len(body) + body)
except OSError as e:
    print("write failed:", e.strerror)
    sys.exit(1)
print(s.makefile("rb").readline().decode().strip())
"#;
    for _ in 0..5 {
        let out = as_nobody(Path::new(PYTHON))
            .arg("-c")
            .arg(client)
            .arg(&socket)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim(),
            "error permission denied",
            "the refusal, after the request was read; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The crate's own client, with an environment of 200 kB.
        let out = as_nobody(program!("test-handover-reload"))
            .arg("--socket")
            .arg(&socket)
            .env("PADDING1", "x".repeat(100_000))
            .env("PADDING2", "x".repeat(100_000))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.trim(), "handover-reload: permission denied");
    }
    assert_eq!(pid(), main, "nothing was reloaded");
    sup.signal(Signal::SIGTERM);
    assert_eq!(
        sup.wait_exit(),
        128 + 15,
        "sleep's status: killed by SIGTERM"
    );
}
