//! Bad input: a broken activation environment, fds that are not sockets, an
//! unusable PID file directory. Each must end in a clear, typed error before
//! anything is served, or (a `LISTEN_PID` that is not ours) be ignored as
//! `sd_listen_fds(3)` does, leaving those fds alone.

#[path = "support/server.rs"]
mod server;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use server::{example, wait_for};

const PYTHON: &str = "/usr/bin/python3";

/// Runs hello through a Python launcher that puts `fd3` ("socket": a
/// listening TCP socket on 127.0.0.1, "file": /dev/null, "none": nothing)
/// at fd 3, sets the given variables (`$PID` becomes the launcher's pid,
/// which exec keeps), and execs hello. Returns the output (hello is killed
/// after `timeout` if it keeps running).
fn launch(fd3: &str, vars: &[(&str, &str)], args: &[&str], timeout: Duration) -> Output {
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
    let exe = example("hello");
    let mut cmd = Command::new(PYTHON);
    cmd.args(["-c", script, fd3, exe.to_str().unwrap(), &args.join(" ")]);
    cmd.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
    cmd.env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let out = child.wait_with_output().unwrap();
    drop(killer);
    out
}

fn have_python() -> bool {
    let ok = std::path::Path::new(PYTHON).exists();
    if !ok {
        eprintln!("SKIP: {PYTHON} is needed to place fds for these tests");
    }
    ok
}

#[track_caller]
fn refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "hello should exit 1; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr should say {needle:?}:\n{stderr}"
    );
    assert!(
        !stderr.contains(" listening addr="),
        "nothing may be served:\n{stderr}"
    );
}

const ADDR: &[&str] = &["--addr", "127.0.0.1:0"];
const T: Duration = Duration::from_secs(20);

#[test]
fn garbage_listen_fds_is_a_typed_error() {
    if !have_python() {
        return;
    }
    let out = launch(
        "socket",
        &[("LISTEN_PID", "$PID"), ("LISTEN_FDS", "two")],
        ADDR,
        T,
    );
    refused(
        &out,
        "invalid socket activation environment: LISTEN_FDS=\"two\" is not a number",
    );
    let out = launch(
        "socket",
        &[("LISTEN_PID", "$PID"), ("LISTEN_FDS", "100000")],
        ADDR,
        T,
    );
    refused(&out, "exceeds the limit");
}

#[test]
fn a_name_count_mismatch_is_a_typed_error() {
    if !have_python() {
        return;
    }
    let vars = [
        ("LISTEN_PID", "$PID"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_FDNAMES", "http:admin"),
    ];
    let out = launch("socket", &vars, ADDR, T);
    refused(&out, "LISTEN_FDNAMES has 2 names for LISTEN_FDS=1");
}

#[test]
fn an_fd_that_is_not_a_socket_is_refused() {
    if !have_python() {
        return;
    }
    let out = launch(
        "file",
        &[("LISTEN_PID", "$PID"), ("LISTEN_FDS", "1")],
        ADDR,
        T,
    );
    refused(&out, "inherited fd 3 named \"unknown\" is not a socket");
    // Nothing passed at fd 3: by the time build() looks, the runtime's own
    // epoll fd sits there. It is close-on-exec, so it cannot have been
    // passed: "is not open", not "is not a socket".
    let out = launch(
        "none",
        &[("LISTEN_PID", "$PID"), ("LISTEN_FDS", "1")],
        ADDR,
        T,
    );
    refused(&out, "inherited fd 3 named \"unknown\" is not open");
}

/// A parent's `HANDOVER_STATE_LEN` is bounded by the receiving process's
/// own state limit (16 MiB in hello): 2^64-1 panicked ("capacity
/// overflow") and 10^12 aborted the process.
#[test]
fn a_huge_state_length_is_a_typed_error() {
    if !have_python() {
        return;
    }
    for len in ["18446744073709551615", "1000000000000"] {
        let vars = [
            ("LISTEN_PID", "$PID"),
            ("LISTEN_FDS", "0"),
            ("HANDOVER_FD", "3"),
            ("HANDOVER_STATE_LEN", len),
        ];
        let out = launch("socket", &vars, ADDR, T);
        refused(
            &out,
            &format!(
                "invalid socket activation environment: HANDOVER_STATE_LEN={len} exceeds this process's state limit of 16777216 bytes"
            ),
        );
    }
}

#[test]
fn a_socket_of_the_wrong_kind_is_refused() {
    if !have_python() {
        return;
    }
    let vars = [
        ("LISTEN_PID", "$PID"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_FDNAMES", "http"),
    ];
    let out = launch("udp", &vars, ADDR, T);
    refused(
        &out,
        "inherited fd 3 named \"http\" is Datagram, not a listening TCP socket",
    );
}

#[test]
fn zero_listen_fds_means_bind_it_yourself() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("hello.pid");
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| {
            launch(
                "none",
                &[("LISTEN_PID", "$PID"), ("LISTEN_FDS", "0")],
                &args,
                T,
            )
        });
        let pid: i32 = wait_for("the PID file", T, || {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        h.join().unwrap()
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("listening"), "{stderr}");
}

#[test]
fn listen_pid_of_another_process_is_ignored_and_its_fds_left_alone() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("hello.pid");
    let pid_arg = pid_file.to_str().unwrap().to_owned();
    let handle = std::thread::spawn(move || {
        launch(
            "socket",
            &[("LISTEN_PID", "1"), ("LISTEN_FDS", "1")],
            &["--addr", "127.0.0.1:0", "--pid-file", &pid_arg],
            Duration::from_secs(10),
        )
    });
    let pid: u32 = wait_for("the PID file", T, || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = handle.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
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
        let out = Command::new(example("hello"))
            .args([
                "--addr",
                "127.0.0.1:0",
                "--pid-file",
                path.to_str().unwrap(),
            ])
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("PID file") && stderr.contains(needle),
            "{stderr}"
        );
        assert!(!stderr.contains(" listening addr="), "{stderr}");
    }
}

#[test]
fn a_malformed_notify_socket_is_a_typed_error() {
    let out = Command::new(example("hello"))
        .args(["--addr", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", "relative/socket")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("sd_notify to relative/socket"), "{stderr}");
}

#[test]
fn a_dead_notify_socket_fails_ready_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    drop(std::os::unix::net::UnixDatagram::bind(&path).unwrap()); // nobody listens any more
    let out = Command::new(example("hello"))
        .args(["--addr", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("sd_notify to") && stderr.contains("Connection refused"),
        "{stderr}"
    );
}

/// A development loop (`systemfd --no-pid -s http::8081 -- cargo watch -x
/// run`) passes listening fds without `LISTEN_PID`: taken only when the
/// developer opts in, otherwise ignored with a warning that names the
/// opt-in.
#[test]
fn fds_without_listen_pid_are_taken_only_with_the_opt_in() {
    if !have_python() {
        return;
    }
    for allow in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("hello.pid");
        let pid_arg = pid_file.to_str().unwrap().to_owned();
        let handle = std::thread::spawn(move || {
            let mut vars = vec![("LISTEN_FDS", "1")];
            if allow {
                vars.push(("HANDOVER_ALLOW_MISSING_LISTEN_PID", "1"));
            }
            launch(
                "socket",
                &vars,
                &["--addr", "127.0.0.1:0", "--pid-file", &pid_arg],
                Duration::from_secs(10),
            )
        });
        let pid: u32 = wait_for("the PID file", T, || {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let out = handle.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
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
