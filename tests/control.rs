//! The control socket and `handover-reload` (a truthful reload), and state
//! handed to the new process, on the hello example run by hand.

#[path = "support/server.rs"]
mod server;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use server::{become_subreaper, example, get, reap, Server};

const T: Duration = Duration::from_secs(30);

fn reload(socket: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_handover-reload"))
        .arg("--socket")
        .arg(socket)
        .args(["--timeout", "30"])
        .output()
        .unwrap()
}

#[test]
fn reload_command_returns_only_once_the_new_process_serves() {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hello");
    std::fs::copy(example("hello"), &exe).unwrap();
    let socket = dir.path().join("control.sock");
    let s = socket.to_str().unwrap();
    let server = Server::start(
        &exe,
        &[
            "--addr",
            "127.0.0.1:0",
            "--control-socket",
            s,
            "--upgrade-timeout",
            "2",
        ],
        &[],
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is private");

    for _ in 0..3 {
        let old = server.pid().unwrap();
        let out = reload(&socket);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new: u32 = stdout.trim().rsplit(' ').next().unwrap().parse().unwrap();
        assert_ne!(new, old);
        // Truthful: by the time the command returned, the new process was
        // main; it writes the PID file right after, so this wait is short.
        server::wait_for("the new PID in the PID file", T, || {
            (server.pid() == Some(new)).then_some(())
        });
        assert_eq!(reap(old, T), 0);
    }

    // A broken binary: the command fails, says why, and the old one serves.
    let pid = server.pid().unwrap();
    std::fs::write(dir.path().join("broken"), "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(
        dir.path().join("broken"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::rename(dir.path().join("broken"), &exe).unwrap();
    let out = reload(&socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upgrade failed") && stderr.contains("exit status 3"),
        "{stderr}"
    );
    assert_eq!(server.pid(), Some(pid));
    let addr = server.addr();
    assert_eq!(get(addr, "/").0, 200);
}

#[test]
fn the_hit_counter_survives_twenty_upgrades() {
    become_subreaper();
    let server = Server::start(&example("hello"), &["--addr", "127.0.0.1:0"], &[]);
    let addr = server.addr();
    let mut expected = 0u64;
    for _ in 0..20 {
        expected += 1;
        assert_eq!(get(addr, "/hits").1.trim(), expected.to_string());
        let (old, _) = server.upgrade(T);
        // The old process's own increments during its drain are not carried:
        // wait until it is gone so every request reaches the new one.
        assert_eq!(reap(old, T), 0);
    }
    assert_eq!(get(addr, "/hits").1.trim(), (expected + 1).to_string());
}
