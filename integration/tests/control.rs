//! The control socket and `handover-reload` (a truthful reload), and state handed to the new
//! process, on the hello example run by hand.

use std::os::unix::fs::PermissionsExt;

use support::http::get;
use support::process::reap;
use support::server::{reload, Deployed, Server, BROKEN_BUILD};
use support::{program, TIMEOUT};

#[test]
fn reload_command_returns_only_once_the_new_process_serves() {
    let exe = Deployed::copy(program!("hello"));
    let socket = exe.dir().join("control.sock");
    let s = socket.to_str().unwrap();
    let args = ["--control-socket", s, "--upgrade-timeout", "2"];
    let server = Server::start(exe.path(), &args, &[]);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is private");

    for _ in 0..3 {
        let old = server.pid().unwrap();
        let out = reload(program!("test-handover-reload"), &socket);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new: u32 = stdout.trim().rsplit(' ').next().unwrap().parse().unwrap();
        assert_ne!(new, old);
        // Truthful: by the time the command returned, the new process was main; it writes
        // the PID file right after, so this wait is short.
        server.wait_pid("the new PID in the PID file", |pid| {
            (pid == Some(new)).then_some(())
        });
        assert_eq!(reap(old, TIMEOUT), 0);
    }

    // A broken binary: the command fails, says why, and the old one serves.
    let pid = server.pid().unwrap();
    exe.replace(BROKEN_BUILD, 0o755);
    let out = reload(program!("test-handover-reload"), &socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upgrade failed") && stderr.contains("exit status 3"),
        "{stderr}"
    );
    assert_eq!(server.pid(), Some(pid));
    assert_eq!(get(server.addr(), "/").status, 200);
}

#[test]
fn the_hit_counter_survives_twenty_upgrades() {
    let mut server = Server::start(program!("hello"), &[], &[]);
    let addr = server.addr();
    let mut expected = 0u64;
    for _ in 0..20 {
        expected += 1;
        assert_eq!(get(addr, "/hits").text().trim(), expected.to_string());
        // The old process's own increments during its drain are not carried: wait until it
        // is gone so every request reaches the new one.
        server.upgrade_and_reap();
    }
    assert_eq!(get(addr, "/hits").text().trim(), (expected + 1).to_string());
}
