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

/// The threads of this test process named `handover` (the crate's own thread).
fn handover_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "handover")
        .count()
}

/// A `Handover` built in this test process with a control socket, made ready and dropped (as a
/// program that restarts its server, or a test of the user's, does) leaves nothing behind: its
/// thread ends, its listener and control socket close, and the next one binds the same control
/// socket path. No other test of this file builds one in process, so the threads named
/// `handover` are this test's. Before: the control socket's task on the crate's thread held the
/// process's state alive, which held that thread: the thread, the listener (still taking
/// connections into its backlog) and the control socket stayed for the life of the program,
/// and the second `build()` failed with "Address already in use".
#[test]
fn a_dropped_handover_leaves_no_thread_listener_or_control_socket_behind() {
    // It builds its Handovers in this process, whose environment it cannot clean: a manager's
    // variables there would make them talk to that manager.
    for var in ["NOTIFY_SOCKET", "LISTEN_FDS"] {
        if std::env::var_os(var).is_some() && !support::skip(&format!("{var} is set")) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    for round in 0..3 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = rt.block_on(async {
            let handover = handover::Handover::builder()
                .handle_signals(false)
                .control_socket(&socket)
                .build()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let listener = handover.listen_tcp("http", "127.0.0.1:0").unwrap();
            handover.ready().await.unwrap();
            let status = handover::control::request_status(&socket, TIMEOUT).unwrap();
            assert!(status.starts_with("Ready"), "{status}");
            listener.local_addr().unwrap()
        });
        drop(rt);
        support::wait_for("the crate's thread to end", TIMEOUT, || {
            (handover_threads() == 0).then_some(())
        });
        assert!(
            std::os::unix::net::UnixStream::connect(&socket).is_err(),
            "round {round}: the control socket still accepts"
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "round {round}: the listener still takes connections"
        );
    }
}
