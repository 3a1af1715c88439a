//! The systemd integration against the real thing: a private `systemd --user`
//! manager (systemd 252 here) running `units/hello.socket` +
//! `units/hello.service`, `systemd-socket-activate`, a `Type=notify-reload`
//! style exchange against a notify socket the test owns, and
//! `systemd-analyze verify` of every unit in `units/`.
//!
//! The manager tests need root and systemd; they skip otherwise (and fail
//! under `CI=true`). Every wait is bounded and waits on a state or an event;
//! every process started is killed by pid.

#[path = "support/load.rs"]
mod load;
#[path = "support/server.rs"]
mod server;
#[path = "support/systemd.rs"]
mod systemd;
#[path = "support/units.rs"]
mod units;

use std::fs;
use std::io::{IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};
use nix::unistd::Pid;

use server::{become_subreaper, free_port, fresh_example, reap, wait_for, Log, Server};
use systemd::{pid_alive, JournalEntry, UserManager};
use units::{repo_unit, set_key};

/// Bound on every wait.
const T: Duration = Duration::from_secs(30);
const GREETING: &str = "Welcome to the Home Page!";

// ---------------------------------------------------------------------------------------------
// helpers

fn load_config() -> load::LoadConfig {
    load::LoadConfig {
        keepalive_clients: 4,
        per_request_clients: 4,
        ..load::LoadConfig::default()
    }
}

/// Waits until the load has completed `n` more requests: traffic flows now.
/// If it does not, stops the load and panics with its report and `context`.
fn traffic_flows(load: &mut Option<load::Load>, n: u64, context: impl FnOnce() -> String) {
    let l = load.as_ref().expect("the load runs");
    let want = l.ok() + n;
    if !l.wait_for_ok(want, T) {
        let report = load.take().unwrap().stop();
        panic!(
            "requests stopped flowing within {T:?}:\n{report}\n{}",
            context()
        );
    }
}

/// What a manager knows, for panic messages.
fn state_of(m: &UserManager) -> String {
    let show = m.systemctl(&[
        "status",
        "--no-pager",
        "-n",
        "0",
        "hello.socket",
        "hello.service",
    ]);
    let journal = m.journal(&["-n", "60", "-o", "short-monotonic"]);
    format!(
        "{}\njournal tail:\n{journal}",
        String::from_utf8_lossy(&show.stdout)
    )
}

/// `GET /` with `Connection: close`; returns the body of a 200 answer.
fn get(addr: SocketAddr) -> String {
    get_within(addr, T).unwrap_or_else(|e| panic!("{e}"))
}

/// `GET /` with `Connection: close`, each socket operation bounded by
/// `timeout`; the body of a 200 answer, or what went wrong.
fn get_within(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read the answer from {addr}: {e}"))?;
    if !reply.starts_with("HTTP/1.1 200 ") {
        return Err(format!("answer from {addr}: {reply:?}"));
    }
    Ok(reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// The value of the first `key=` line.
fn get_key<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
}

/// Installs `hello.socket` on `127.0.0.1:<port>` and `hello.service`
/// running `exe`, both from `units/` otherwise unchanged (so
/// `NotifyAccess=main`, `ExecReload=/bin/kill -HUP $MAINPID`,
/// `KillMode=control-group`).
///
/// As in the shipped pair (`ListenStream=127.0.0.1:8081`, hello's default
/// `--addr`), the program is configured with the address the socket unit
/// listens on, unless `same_addr` is false: then it keeps its default
/// (8081) while the socket unit decides another port.
fn install_hello(m: &UserManager, exe: &Path, port: u16, same_addr: bool) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let socket = set_key(
        &repo_unit("hello.socket"),
        "ListenStream",
        &addr.to_string(),
    );
    let service = repo_unit("hello.service");
    assert_eq!(get_key(&service, "NotifyAccess"), Some("main"));
    assert_eq!(get_key(&service, "Type"), Some("notify"));
    let exec = if same_addr {
        format!("{} --addr {addr}", exe.display())
    } else {
        exe.display().to_string()
    };
    let service = set_key(&service, "ExecStart", &exec);
    m.install_unit("hello.socket", &socket);
    m.install_unit("hello.service", &service);
    m.daemon_reload();
    addr
}

/// Starts `hello.socket`, activates the service with a first request and
/// waits until it is active. Returns its main pid.
fn start_hello(m: &UserManager, addr: SocketAddr) -> u32 {
    m.systemctl_ok(&["start", "hello.socket"]);
    assert_eq!(m.show("hello.socket", "ActiveState"), "active");
    assert_eq!(get(addr).trim_end(), GREETING);
    m.wait_until("hello.service to be active", T, || {
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

/// `systemctl reload hello.service`, then waits until `MainPID` names
/// another process and the old one is gone (reaped by the manager). With
/// `ExecReload=/bin/kill -HUP $MAINPID` the reload command returns before the
/// upgrade is done. Returns the new main pid.
fn reload(m: &UserManager, old: u32) -> u32 {
    m.systemctl_ok(&["reload", "hello.service"]);
    let mut new = 0;
    m.wait_until(&format!("MainPID to change from {old}"), T, || {
        new = m.main_pid("hello.service");
        new != 0 && new != old
    });
    m.wait_until(
        &format!("the old main process {old} to be reaped"),
        T,
        || reaped(old),
    );
    new
}

/// Whether `pid` is gone for good: exited and reaped (not a zombie).
fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The parent pid of `pid`, from `/proc/<pid>/status`.
fn ppid(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PPid in /proc/{pid}/status"))
}

fn message(e: &JournalEntry) -> &str {
    e.get("MESSAGE").map(String::as_str).unwrap_or("")
}

fn field<'a>(e: &'a JournalEntry, name: &str) -> &'a str {
    e.get(name).map(String::as_str).unwrap_or("")
}

/// Fails if the manager ever called a main process an alien.
fn assert_no_alien_warning(m: &UserManager) {
    let manager = m.manager_pid().to_string();
    let text = m.journal(&["-o", "cat", &format!("_PID={manager}")]);
    for bad in ["not our child", "Supervising process"] {
        assert!(!text.contains(bad), "the manager logged {bad:?}:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// the real manager

#[test]
fn twenty_reloads_under_load_lose_nothing() {
    let Some(m) = UserManager::boot_or_skip("reload20") else {
        return;
    };
    let t0 = Instant::now();
    let addr = install_hello(&m, &fresh_example("hello"), free_port(), true);
    let first = start_hello(&m, addr);

    let mut load = Some(load::Load::start(addr, load_config()));
    traffic_flows(&mut load, 50, || state_of(&m));
    let mut pids = vec![first];
    for i in 1..=20 {
        let old = *pids.last().unwrap();
        let new = reload(&m, old);
        assert!(!pids.contains(&new), "reload {i}: pid {new} seen before");
        pids.push(new);
        assert_eq!(
            m.show("hello.service", "ActiveState"),
            "active",
            "reload {i}"
        );
        assert_eq!(m.show("hello.service", "NRestarts"), "0", "reload {i}");
        assert_eq!(m.show("hello.socket", "NRefused"), "0", "reload {i}");
        assert_eq!(
            ppid(new),
            m.manager_pid(),
            "reload {i}: the new main process {new} is the manager's child"
        );
        traffic_flows(&mut load, 20, || state_of(&m));
    }
    let report = load.take().unwrap().stop();
    eprintln!("20 reloads in {:.2?}; {report}", t0.elapsed());
    report.assert_no_errors();
    assert!(
        report.ok > 500,
        "too little load to prove anything: {report}"
    );

    let last = *pids.last().unwrap();
    assert_eq!(m.main_pid("hello.service"), last);
    assert!(
        m.show("hello.service", "StatusText")
            .contains("generation 20"),
        "{}",
        m.show("hello.service", "StatusText")
    );
    assert_no_alien_warning(&m);
}

#[test]
fn a_new_binary_that_fails_leaves_the_old_one_serving() {
    let Some(m) = UserManager::boot_or_skip("failbin") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("hello");
    let aside = dir.path().join("hello.new");
    fs::copy(fresh_example("hello"), &bin).unwrap();
    let addr = install_hello(&m, &bin, free_port(), true);
    let pid = start_hello(&m, addr);

    // Deploy a broken binary the way a deploy tool does: write aside, rename.
    fs::write(&aside, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").unwrap();
    fs::set_permissions(&aside, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&aside, &bin).unwrap();
    m.systemctl_ok(&["reload", "hello.service"]);

    // The old process says why, in the journal, with its own _PID.
    let e = m.wait_for_journal(&[&format!("_PID={pid}")], T, |e| {
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
    let started = m.wait_for_journal(&[&format!("_PID={pid}")], T, |e| {
        message(e).starts_with("new process started")
    });
    let failed: u32 = field(&started, "NEW_PID").parse().unwrap();
    m.wait_until(
        &format!("the failed process {failed} to be reaped"),
        T,
        || reaped(failed),
    );

    // ... and in STATUS=, after READY=1 brought the unit back from `reloading`.
    m.wait_until("StatusText to report the failure", T, || {
        m.show("hello.service", "StatusText").contains("failed")
    });
    m.wait_until("hello.service to be active again", T, || {
        m.show("hello.service", "ActiveState") == "active"
    });
    eprintln!("StatusText: {}", m.show("hello.service", "StatusText"));
    assert_eq!(m.main_pid("hello.service"), pid, "MainPID unchanged");
    assert!(pid_alive(pid));
    assert_eq!(get(addr).trim_end(), GREETING, "still serving");
    assert_eq!(m.show("hello.service", "NRestarts"), "0");

    // Restore the binary: the next reload succeeds.
    fs::copy(fresh_example("hello"), &aside).unwrap();
    fs::rename(&aside, &bin).unwrap();
    let new = reload(&m, pid);
    assert_eq!(get(addr).trim_end(), GREETING);
    assert_eq!(m.show("hello.service", "ActiveState"), "active");
    let status = m.show("hello.service", "StatusText");
    assert!(
        status.contains(&format!("serving, generation 1, pid {new}")),
        "{status}"
    );
    assert_eq!(ppid(new), m.manager_pid());
    assert_no_alien_warning(&m);
}

#[test]
fn stop_under_load_drains_and_socket_activation_restarts() {
    let Some(m) = UserManager::boot_or_skip("stop") else {
        return;
    };
    let addr = install_hello(&m, &fresh_example("hello"), free_port(), true);
    let first = start_hello(&m, addr);
    let mut load = Some(load::Load::start(addr, load_config()));
    traffic_flows(&mut load, 50, || state_of(&m));

    // hello.socket keeps listening: connections queue in its backlog while
    // the service drains and exits, and they start the service again.
    let t = Instant::now();
    let before = monotonic_usec();
    m.systemctl_ok(&["stop", "hello.service"]);
    let stop_took = t.elapsed();
    assert!(reaped(first), "the stop job ended before pid {first} did");

    let mut second = 0;
    m.wait_until("socket activation to start hello.service again", T, || {
        second = m.main_pid("hello.service");
        second != 0 && second != first && m.show("hello.service", "ActiveState") == "active"
    });
    traffic_flows(&mut load, 50, || state_of(&m));
    let report = load.take().unwrap().stop();
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
    // The old process drained, by its own account.
    let e = m.wait_for_journal(&[&format!("_PID={first}")], T, |e| {
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
}

/// The shipped `hello.service` runs hello without `--addr`: the socket
/// unit decides the address. An admin who moves `ListenStream=` to another
/// port must still be able to reload: the new process keeps serving the
/// socket unit's socket (it came from the manager), it does not take the
/// difference from its configured default for a configuration change.
#[test]
fn reload_keeps_serving_the_socket_units_address() {
    let Some(m) = UserManager::boot_or_skip("sockaddr") else {
        return;
    };
    let addr = install_hello(&m, &fresh_example("hello"), free_port(), false);
    let old = start_hello(&m, addr);
    m.systemctl_ok(&["reload", "hello.service"]);
    let mut new = 0;
    let mut failed = None;
    m.wait_until("the upgrade to end", T, || {
        new = m.main_pid("hello.service");
        if new != old {
            return true;
        }
        failed = m
            .journal_entries(&[&format!("_PID={old}"), "OUTCOME=failed"])
            .pop();
        failed.is_some()
    });
    if let Some(e) = failed {
        let log = m.journal(&["-o", "cat", "SYSLOG_IDENTIFIER=hello"]);
        panic!(
            "the upgrade failed: {}\nhello's log:\n{log}",
            field(&e, "REASON")
        );
    }
    m.wait_until("the old main process to exit", T, || !pid_alive(old));
    let log = m.journal(&["-o", "cat", &format!("_PID={new}")]);
    for _ in 0..3 {
        match get_within(addr, Duration::from_secs(5)) {
            Ok(body) => assert_eq!(body.trim_end(), GREETING),
            Err(e) => panic!(
                "the socket unit's port is no longer served ({e}); new process {new}:\n{log}"
            ),
        }
    }
    assert!(!log.contains("binding anew"), "new process {new}:\n{log}");
}

#[test]
fn the_journal_shows_each_process_with_its_own_pid() {
    let Some(m) = UserManager::boot_or_skip("journal") else {
        return;
    };
    let addr = install_hello(&m, &fresh_example("hello"), free_port(), true);
    let old = start_hello(&m, addr);
    let new = reload(&m, old);

    let unit_cg = format!("{}/manager/app.slice/hello.service", m.cgroup_path());
    let ready = |pid: u32, generation: &str| {
        let e = m.wait_for_journal(&[&format!("_PID={pid}")], T, |e| {
            message(e) == "ready" && field(e, "GENERATION") == generation
        });
        assert_eq!(field(&e, "_TRANSPORT"), "journal", "native entry: {e:?}");
        assert_eq!(field(&e, "_SYSTEMD_CGROUP"), unit_cg, "{e:?}");
        e
    };
    ready(old, "0");
    ready(new, "1");

    let done = m.wait_for_journal(&[&format!("_PID={old}")], T, |e| {
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
    assert_no_alien_warning(&m);
}

// ---------------------------------------------------------------------------------------------
// systemd-socket-activate

#[test]
fn socket_activate_then_sighup_under_load() {
    const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
    if !Path::new(ACTIVATE).exists() {
        eprintln!("SKIP socket_activate_then_sighup_under_load: no {ACTIVATE}");
        return;
    }
    // Each old generation's successor is orphaned when it exits: reap them.
    become_subreaper();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("hello.pid");
    let mut child = Command::new(ACTIVATE)
        .args(["-l", &addr.to_string(), "-E", "RUST_LOG=info"])
        .arg(fresh_example("hello"))
        .args(["--addr", &addr.to_string()])
        .arg("--pid-file")
        .arg(&pid_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::capture(child.stderr.take().unwrap());
    let mut server = Server {
        child,
        log,
        pid_file,
        dir,
    };
    server
        .log
        .wait_line(0, &["Listening on", &addr.to_string()], T);
    assert!(
        server.pid().is_none(),
        "nothing runs before the first connection"
    );
    // It execs hello in place on the first connection, which waits meanwhile.
    assert_eq!(get(addr).trim_end(), GREETING);
    let first = wait_for("the PID file", T, || server.pid());
    assert_eq!(
        first,
        server.child.id(),
        "hello runs in place of systemd-socket-activate"
    );

    let mut load = Some(load::Load::start(addr, load_config()));
    traffic_flows(&mut load, 50, || server.log.text());
    let mut pids = vec![first];
    for i in 1..=2 {
        let (old, new) = server.upgrade(T);
        assert!(!pids.contains(&new));
        pids.push(new);
        let code = if old == first {
            wait_for("the first process to exit", T, || {
                server.child.try_wait().unwrap()
            })
            .code()
            .unwrap_or(-1)
        } else {
            reap(old, T)
        };
        assert_eq!(code, 0, "upgrade {i}: old process {old} exited with {code}");
        traffic_flows(&mut load, 50, || server.log.text());
    }
    let report = load.take().unwrap().stop();
    eprintln!("systemd-socket-activate, 2 SIGHUP upgrades: {report}");
    report.assert_no_errors();

    let last = *pids.last().unwrap();
    kill(Pid::from_raw(last as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(last, T), 0);
    assert!(
        server.pid().is_none(),
        "the PID file is removed on a real stop"
    );
}

// ---------------------------------------------------------------------------------------------
// the notify protocol against a socket the test owns

/// One datagram received on the notify socket.
struct Datagram {
    text: String,
    sender: u32,
    fds: Vec<OwnedFd>,
}

/// A notify socket bound in a temp dir, with `SO_PASSCRED` so each message
/// carries its sender's pid.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        setsockopt(&sock, sockopt::PassCred, &true).unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// The next datagram (at most `T`), or `None` if none is pending and
    /// `wait` is false.
    fn try_recv(&self, wait: bool) -> Option<Datagram> {
        let mut buf = vec![0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; 4]);
        // CLOEXEC: a barrier fd inherited by a process another test spawns
        // would hold the barrier until that process exits.
        let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
        if !wait {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        let msg = match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) if !wait => return None,
            Err(e) => panic!("no notify message within {T:?}: {e}"),
        };
        let mut sender = 0;
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => sender = cred.pid() as u32,
                // SAFETY: the kernel just installed these fds in this process
                // for this message; nothing else owns them.
                ControlMessageOwned::ScmRights(raw) => fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                ),
                _ => {}
            }
        }
        let len = msg.bytes;
        assert!(
            !msg.flags.contains(MsgFlags::MSG_CTRUNC),
            "control data truncated"
        );
        Some(Datagram {
            text: String::from_utf8_lossy(&buf[..len]).into_owned(),
            sender,
            fds,
        })
    }

    fn recv(&self) -> Datagram {
        self.try_recv(true).unwrap()
    }
}

/// The assignments of a notify message, in order.
fn assignments(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l:?} in {text:?}"))
        })
        .collect()
}

/// The same message as `sd-notify` 0.5 would send it (one state per line).
fn as_sd_notify(states: &[sd_notify::NotifyState<'_>]) -> String {
    states
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

#[test]
fn notify_reload_sequence_on_a_socket_of_our_own() {
    let notify = NotifySocket::bind();
    let path = notify.path.to_str().unwrap().to_owned();
    let mut server = Server::start(
        &fresh_example("hello"),
        &["--addr", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", &path)],
    );
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
        kill(Pid::from_raw(old as i32), Signal::SIGHUP).unwrap();

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
        assert_eq!(d.fds.len(), 1, "BARRIER=1 carries exactly one fd");
        // Until we close it, the new process is not main: it says nothing and
        // writes no PID file; the old one still serves (so does the new one's
        // accept loop: either answers).
        assert!(
            notify.try_recv(false).is_none(),
            "a message before the barrier was released"
        );
        assert_eq!(server.pid(), Some(old));
        assert!(pid_alive(old) && pid_alive(new));
        assert_eq!(get(addr).trim_end(), GREETING);
        drop(d.fds); // releases the barrier

        // 4. The new process's own STATUS=, now that it is main.
        let d = notify.recv();
        assert_eq!(d.sender, new, "{:?}", d.text);
        assert_eq!(
            d.text,
            as_sd_notify(&[sd_notify::NotifyState::Status(&status)])
        );
        wait_for("the PID file to name the new process", T, || {
            (server.pid() == Some(new)).then_some(())
        });

        // The old process drains and exits 0; it never sends STOPPING=1.
        let code = if old == first {
            wait_for("the first process to exit", T, || {
                server.child.try_wait().unwrap()
            })
            .code()
            .unwrap_or(-1)
        } else {
            reap(old, T)
        };
        assert_eq!(code, 0, "old process {old}");
        assert!(
            notify.try_recv(false).is_none(),
            "the old process sent more"
        );
        assert_eq!(get(addr).trim_end(), GREETING);
        old = new;
    }

    // A real stop: STOPPING=1 from the process that is main, exit 0.
    kill(Pid::from_raw(old as i32), Signal::SIGTERM).unwrap();
    let d = notify.recv();
    assert_eq!(d.sender, old);
    assert_eq!(
        d.text,
        as_sd_notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping")
        ])
    );
    assert_eq!(reap(old, T), 0);
    assert!(server.pid().is_none());
}

// ---------------------------------------------------------------------------------------------
// systemd-analyze verify

/// The built binary or example called `name`, if cargo built it.
fn built(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent()?.parent()?;
    [dir.join(name), dir.join("examples").join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Points the program of every `Exec*=` line that names a program of this
/// crate (`/usr/local/bin/<name>`, `<name>` being a binary or example cargo
/// built) at the built one, keeping prefixes (`-@:+!`) and arguments.
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
                panic!("{key}= runs {program}, but no binary or example {name:?} is built")
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
/// applied to a minimal service running hello). The only stderr line
/// tolerated is systemd 252's "Failed to parse service type, ignoring:
/// notify-reload" (it knows `Type=notify-reload` from 253 on).
#[test]
fn units_verify() {
    const ANALYZE: &str = "/usr/bin/systemd-analyze";
    if !Path::new(ANALYZE).exists() {
        eprintln!("SKIP units_verify: no {ANALYZE}");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    let tmp = tempfile::tempdir().unwrap();
    let units = tmp.path().join("units");
    copy_units(&src, &units);
    let runtime = tmp.path().join("runtime");
    fs::create_dir(&runtime).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();

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
            let exec = server::example("hello");
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
    // One unit at a time, so that each failure names its file.
    let mut failures = Vec::new();
    for (name, unit) in &targets {
        let out = Command::new(ANALYZE)
            .args(["--user", "--no-pager", "verify"])
            .arg(unit)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("SYSTEMD_LOG_COLOR", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let unexpected: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !l.contains("Failed to parse service type, ignoring: notify-reload"))
            .collect();
        eprintln!("verify {name}: {}", out.status);
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
        "systemd-analyze verify:\n{}",
        failures.join("\n")
    );
}
