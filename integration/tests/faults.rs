//! Bad input: a broken activation environment, fds that are not sockets, an
//! unusable PID file directory. Each must end in a clear, typed error before
//! anything is served, or (a `LISTEN_PID` that is not ours) be ignored as
//! `sd_listen_fds(3)` does, leaving those fds alone.

use std::path::Path;

use nix::sys::signal::Signal;

use support::process::signal;
use support::server::{command, Server};
use support::{have, program};

const PYTHON: &str = "/usr/bin/python3";

/// Runs hello through a Python launcher that puts `fd3` ("socket": a listening TCP socket on
/// 127.0.0.1, "udp": a UDP socket, "file": /dev/null, "none": nothing) at fd 3, sets the given
/// variables (`$PID` becomes the launcher's pid, which exec keeps), and execs hello with
/// `args`, which name `pid_file` as its PID file when given.
fn launch(fd3: &str, vars: &[(&str, &str)], args: &[&str], pid_file: Option<&Path>) -> Server {
    let script = r#"
import os, socket, sys
kind, exe, args, env = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
if kind == "socket":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
    os.dup2(s.fileno(), 3)
    sys.stderr.write("launcher: fd 3 listens on %s:%d\n" % s.getsockname()); sys.stderr.flush()
elif kind == "udp":
    s = socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
    os.dup2(s.fileno(), 3)
elif kind == "file":
    f = os.open("/dev/null", os.O_RDONLY); os.dup2(f, 3)
if kind == "none":
    try:
        os.close(3)
    except OSError:
        pass
else:
    os.set_inheritable(3, True)
for kv in env:
    k, v = kv.split("=", 1)
    os.environ[k] = v.replace("$PID", str(os.getpid()))
os.execv(exe, [exe] + args)
"#;
    let exe = program!("hello");
    let mut cmd = command(PYTHON);
    cmd.args(["-c", script, fd3, exe.to_str().unwrap(), &args.join(" ")]);
    cmd.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
    Server::spawn(cmd, pid_file)
}

fn have_python() -> bool {
    have(PYTHON, "to place fds for these tests")
}

/// Hello through the launcher (`fd3`, `vars`) exits 1 saying `needle`, having served nothing.
#[track_caller]
fn refused(fd3: &str, vars: &[(&str, &str)], needle: &str) {
    let (code, stderr) = launch(fd3, vars, ADDR, None).output();
    assert_eq!(code, 1, "hello should exit 1; stderr:\n{stderr}");
    assert!(
        stderr.contains(needle),
        "stderr should say {needle:?}:\n{stderr}"
    );
    assert!(
        !stderr.contains(" listening addr="),
        "nothing may be served:\n{stderr}"
    );
}

/// `LISTEN_PID` naming the launcher, which hello will be.
const OURS: (&str, &str) = ("LISTEN_PID", "$PID");
const ADDR: &[&str] = &["--addr", "127.0.0.1:0"];

/// Hello through the launcher, with a PID file: waits until it serves, calls `inspect` with
/// its pid, stops it (SIGTERM), and returns its log once it exited 0.
fn served(fd3: &str, vars: &[(&str, &str)], inspect: impl FnOnce(u32)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("hello.pid");
    let args = [ADDR[0], ADDR[1], "--pid-file", pid_file.to_str().unwrap()];
    let mut server = launch(fd3, vars, &args, Some(&pid_file));
    let pid = server.wait_started();
    inspect(pid);
    signal(pid, Signal::SIGTERM);
    let (code, stderr) = server.output();
    assert_eq!(code, 0, "{stderr}");
    stderr
}

#[test]
fn garbage_listen_fds_is_a_typed_error() {
    if !have_python() {
        return;
    }
    let vars = [OURS, ("LISTEN_FDS", "two")];
    let why = "invalid socket activation environment: LISTEN_FDS=\"two\" is not a number";
    refused("socket", &vars, why);
    refused(
        "socket",
        &[OURS, ("LISTEN_FDS", "100000")],
        "exceeds the limit",
    );
}

#[test]
fn a_name_count_mismatch_is_a_typed_error() {
    if !have_python() {
        return;
    }
    let vars = [OURS, ("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "http:admin")];
    refused(
        "socket",
        &vars,
        "LISTEN_FDNAMES has 2 names for LISTEN_FDS=1",
    );
}

#[test]
fn an_fd_that_is_not_a_socket_is_refused() {
    if !have_python() {
        return;
    }
    let vars = [OURS, ("LISTEN_FDS", "1")];
    refused(
        "file",
        &vars,
        "inherited fd 3 named \"unknown\" is not a socket",
    );
    // Nothing passed at fd 3: by the time build() looks, the runtime's own epoll fd sits there.
    // It is close-on-exec, so it cannot have been passed: "is not open", not "is not a socket".
    refused(
        "none",
        &vars,
        "inherited fd 3 named \"unknown\" is not open",
    );
}

/// A parent's `HANDOVER_STATE_LEN` is bounded by the receiving process's own state limit (16
/// MiB in hello): 2^64-1 panicked ("capacity overflow") and 10^12 aborted the process.
#[test]
fn a_huge_state_length_is_a_typed_error() {
    if !have_python() {
        return;
    }
    for len in ["18446744073709551615", "1000000000000"] {
        let vars = [
            OURS,
            ("LISTEN_FDS", "0"),
            ("HANDOVER_FD", "3"),
            ("HANDOVER_STATE_LEN", len),
        ];
        let why = format!(
            "invalid socket activation environment: HANDOVER_STATE_LEN={len} exceeds this process's state limit of 16777216 bytes"
        );
        refused("socket", &vars, &why);
    }
}

#[test]
fn a_socket_of_the_wrong_kind_is_refused() {
    if !have_python() {
        return;
    }
    let vars = [OURS, ("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "http")];
    let why = "inherited fd 3 named \"http\" is Datagram, not a listening TCP socket";
    refused("udp", &vars, why);
}

#[test]
fn zero_listen_fds_means_bind_it_yourself() {
    if !have_python() {
        return;
    }
    let stderr = served("none", &[OURS, ("LISTEN_FDS", "0")], |_| {});
    assert!(stderr.contains("listening"), "{stderr}");
}

#[test]
fn listen_pid_of_another_process_is_ignored_and_its_fds_left_alone() {
    if !have_python() {
        return;
    }
    let vars = [("LISTEN_PID", "1"), ("LISTEN_FDS", "1")];
    let stderr = served("socket", &vars, |pid| {
        // fd 3 (not ours) is untouched: still open, and not close-on-exec.
        let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/3")).unwrap();
        let flags = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_eq!(
            flags & libc::O_CLOEXEC as u32,
            0,
            "fd 3 was touched: {fdinfo}"
        );
    });
    assert!(
        stderr.contains(
            "ignoring the socket activation environment: LISTEN_PID=1 is not this process"
        ),
        "{stderr}"
    );
    // It served on the address it bound itself.
    let line = stderr.lines().find(|l| l.contains("listening")).unwrap();
    let at = line.find("addr=").unwrap() + 5;
    assert!(line[at..].starts_with("127.0.0.1:"), "{line}");
}

/// Hello run directly with `args` and `NOTIFY_SOCKET` set to `notify` when given.
fn hello(args: &[&str], notify: Option<&str>) -> Server {
    let mut cmd = command(program!("hello"));
    cmd.args(args);
    if let Some(path) = notify {
        cmd.env("NOTIFY_SOCKET", path);
    }
    Server::spawn(cmd, None)
}

#[test]
fn an_unusable_pid_file_directory_fails_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    for (path, needle) in [
        (
            dir.path().join("missing/dir/hello.pid"),
            "No such file or directory",
        ),
        (file.join("hello.pid"), "Not a directory"),
    ] {
        let args = [ADDR[0], ADDR[1], "--pid-file", path.to_str().unwrap()];
        let (code, stderr) = hello(&args, None).output();
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("PID file") && stderr.contains(needle),
            "{stderr}"
        );
        assert!(!stderr.contains(" listening addr="), "{stderr}");
    }
}

#[test]
fn a_malformed_notify_socket_is_a_typed_error() {
    let (code, stderr) = hello(ADDR, Some("relative/socket")).output();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("sd_notify to relative/socket"), "{stderr}");
}

#[test]
fn a_dead_notify_socket_fails_ready_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    drop(std::os::unix::net::UnixDatagram::bind(&path).unwrap()); // nobody listens any more
    let (code, stderr) = hello(ADDR, Some(path.to_str().unwrap())).output();
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("sd_notify to") && stderr.contains("Connection refused"),
        "{stderr}"
    );
}

/// A development loop (`systemfd --no-pid -s http::8081 -- cargo watch -x run`) passes
/// listening fds without `LISTEN_PID`: taken only when the developer opts in, otherwise ignored
/// with a warning that names the opt-in.
#[test]
fn fds_without_listen_pid_are_taken_only_with_the_opt_in() {
    if !have_python() {
        return;
    }
    for allow in [false, true] {
        let mut vars = vec![("LISTEN_FDS", "1")];
        if allow {
            vars.push(("HANDOVER_ALLOW_MISSING_LISTEN_PID", "1"));
        }
        let stderr = served("socket", &vars, |_| {});
        let passed = stderr
            .lines()
            .find_map(|l| l.strip_prefix("launcher: fd 3 listens on "))
            .expect("the launcher says where fd 3 listens")
            .trim()
            .to_owned();
        let served_passed = stderr.contains(&format!("addr={passed}"));
        assert_eq!(served_passed, allow, "opt-in {allow}:\n{stderr}");
        if !allow {
            assert!(
                stderr.contains("ignoring the socket activation environment: LISTEN_FDS is set without LISTEN_PID (to take the fds anyway, as under `systemfd --no-pid`, set HANDOVER_ALLOW_MISSING_LISTEN_PID=1)"),
                "{stderr}"
            );
        }
    }
}
