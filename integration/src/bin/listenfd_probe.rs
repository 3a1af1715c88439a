//! A program for the interop test (`tests/interop.rs`): it reads its sockets the way a
//! systemd-activated program does, with the `listenfd` and `sd-notify` crates, writes what they
//! found to the file named by `LISTENFD_PROBE_OUT`, and exits with status 3.
//!
//! The test puts it where a handover server's binary was and sends SIGHUP: the server starts
//! it as its new version, so it shows that the handoff environment is the systemd one. It exits
//! without serving, so the old process keeps serving.
//!
//! ```text
//! cp target/debug/hello /tmp/hello
//! LISTENFD_PROBE_OUT=/tmp/probe.txt /tmp/hello --pid-file /tmp/hello.pid &
//! cp target/debug/listenfd_probe /tmp/hello.new && mv /tmp/hello.new /tmp/hello
//! kill -HUP "$(cat /tmp/hello.pid)"   # hello logs "upgrade failed ... exit status 3"
//! cat /tmp/probe.txt                  # sd_notify=3:http, listenfd=0:tcp:127.0.0.1:8081:...
//! ```

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(out) = std::env::var_os("LISTENFD_PROBE_OUT") else {
        eprintln!("listenfd_probe: LISTENFD_PROBE_OUT is not set");
        return ExitCode::from(2);
    };
    let mut report = String::new();
    let mut line = |l: String| {
        report.push_str(&l);
        report.push('\n');
    };
    let pid = std::process::id();
    line(format!(
        "listen_pid_is_mine={}",
        std::env::var("LISTEN_PID").ok() == Some(pid.to_string())
    ));
    // sd-notify first: listenfd removes LISTEN_PID and LISTEN_FDS from the
    // environment (this program has one thread, so that is sound here).
    match sd_notify::listen_fds_with_names() {
        Ok(fds) => {
            for (fd, name) in fds {
                line(format!("sd_notify={fd}:{name}"));
            }
        }
        Err(e) => line(format!("sd_notify_error={e}")),
    }
    let mut fds = listenfd::ListenFd::from_env();
    line(format!("listenfd_len={}", fds.len()));
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => {
                let addr = l.local_addr().map(|a| a.to_string());
                // A listening socket says "would block" when nothing waits;
                // one that is not listening says EINVAL.
                let _ = l.set_nonblocking(true);
                let accept = match l.accept() {
                    Ok(_) => "a connection".to_owned(),
                    Err(e) => format!("{:?}", e.kind()),
                };
                line(format!(
                    "listenfd={i}:tcp:{}:accept={accept}",
                    addr.unwrap_or_else(|e| e.to_string())
                ));
            }
            Ok(None) => line(format!("listenfd={i}:taken")),
            Err(e) => line(format!("listenfd={i}:error:{e}")),
        }
    }
    let written = std::fs::File::create(&out).and_then(|mut f| f.write_all(report.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "listenfd_probe: cannot write {}: {e}",
            out.to_string_lossy()
        );
    }
    eprintln!("listenfd_probe: not a real server, exiting with status 3");
    ExitCode::from(3)
}
