//! A hostile host and hostile users against the hello example run by hand:
//! no thread can be created (a pids cgroup at its limit), symlinks planted
//! by an unprivileged user in shared directories, a full and a read-only
//! file system under the PID file, the fd limit, refused and idle control
//! clients, a stop during an upgrade, and the new process killed while the
//! old one drains. Nothing may wedge, clobber a file it does not own, or take
//! the service down, and every failure must say why.
//!
//! Two run under a real private `systemd --user` manager: a stop during a
//! truthful reload, and the new process killed during the old one's drain.
//!
//! Most of these need root (cgroups, mounts, `setpriv`, the manager); they
//! print `SKIP` and pass without it, and fail under `CI=true`.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use support::cgroup::PidsCgroup;
use support::http::{burst, free_port, get, Conn};
use support::load::{ErrorKind, Load, LoadConfig};
use support::notify::NotifySocket;
use support::process::{alive, fd_count, pid_after, reap, run, signal, terminate};
use support::server::{command, reload, Deployed, Server, NEVER_READY};
use support::systemd::UserManager;
use support::{have, on_each_manager, program, root, skip, units, wait_for, TIMEOUT};

const NOBODY: &str = "65534";

// ---------------------------------------------------------------------------------------------
// helpers

fn setpriv() -> bool {
    have("/usr/bin/setpriv", "util-linux")
}

/// Runs `sh -c script` as user and group 65534 (nobody), no other groups.
fn as_nobody(script: &str) -> Output {
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "sh",
        "-c",
        script,
    ]);
    run(&mut cmd).unwrap_or_else(|e| panic!("as nobody: {e}"))
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A root-owned 0644 file another user must not be able to get changed.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const VICTIM_TEXT: &str = "precious, owned by root\n";

impl Victim {
    fn new() -> Victim {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let path = dir.path().join("victim");
        fs::write(&path, VICTIM_TEXT).unwrap();
        chmod(&path, 0o644);
        Victim { _dir: dir, path }
    }

    #[track_caller]
    fn assert_untouched(&self) {
        let meta = fs::symlink_metadata(&self.path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644, "the victim's mode changed");
        assert_eq!(meta.uid(), 0);
        assert_eq!(fs::read_to_string(&self.path).unwrap(), VICTIM_TEXT);
    }
}

/// hello with its PID file in `dir` and a stand-in manager at `NOTIFY_SOCKET`, listening on a
/// port of its own.
fn hello_notifying(dir: &Path, args: &[&str]) -> (NotifySocket, Server) {
    let notify = NotifySocket::bind();
    let envs = [("NOTIFY_SOCKET", notify.path())];
    let pid_file = dir.join("hello.pid");
    let hello = Server::start_with_pid_file(program!("hello"), Some(&pid_file), args, &envs);
    (notify, hello)
}

/// As root, [`hello_notifying`] with its PID file on a tmpfs of its own, mounted with
/// `options`; `None` (having said why) where that cannot be.
fn hello_on_tmpfs(options: &str, args: &[&str]) -> Option<(Tmpfs, NotifySocket, Server)> {
    if !root() {
        return None;
    }
    let disk = Tmpfs::mount(options)?;
    let (manager, server) = hello_notifying(disk.path(), args);
    Some((disk, manager, server))
}

/// A tmpfs mounted (by root) on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mut mount = Command::new("mount");
        mount.args(["-t", "tmpfs", "-o", options, "handover-test"]);
        match run(mount.arg(dir.path())) {
            Ok(_) => Some(Tmpfs { dir }),
            Err(e) => {
                skip(&format!("cannot mount a tmpfs: {e}"));
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        let mut mount = Command::new("mount");
        mount.args(["-o", &format!("remount,{options}")]);
        run(mount.arg(self.path())).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Fills it up: writes zeros until the file system says ENOSPC.
    fn fill(&self) {
        let mut f = fs::File::create(self.path().join("filler")).unwrap();
        let chunk = [0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).output();
    }
}

const FAILED: &str = "upgrade failed; still serving";

// ---------------------------------------------------------------------------------------------
// no process can be created

/// No process can be created (a pids cgroup at its limit) when SIGHUP
/// comes: the upgrade fails with that reason, ends its `RELOADING=1` with
/// `READY=1` and a `STATUS=` saying why (to a stand-in manager), and once
/// the limit is lifted the very next SIGHUP upgrades. Once: tokio's
/// `spawn_blocking` panicked ("OS can't spawn worker thread"), the phase
/// stayed "upgrading" and every later SIGHUP was coalesced into nothing,
/// for ever; under systemd `systemctl reload` hung.
#[test]
fn an_upgrade_that_cannot_create_a_process_fails_with_a_reason_and_the_next_one_works() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (manager, server) = hello_notifying(dir.path(), &[]);
    let addr = server.addr();
    let old = server.pid().unwrap();
    let Some(cg) = PidsCgroup::create() else {
        return;
    };
    cg.write("cgroup.procs", &old.to_string());
    cg.write("pids.max", &cg.read("pids.current"));

    let (from, sent) = (server.log.len(), manager.len());
    signal(old, Signal::SIGHUP);
    let (_, line) = server.log.wait_line(from, &[FAILED], TIMEOUT);
    assert!(
        line.contains("cannot start") && line.contains("Resource temporarily unavailable"),
        "{line}"
    );
    manager.wait_message(sent, &["RELOADING=1"]);
    let ready = manager.wait_message(sent, &["READY=1\nSTATUS=upgrade to generation 1 failed"]);
    assert!(
        ready.contains("cannot start") && ready.contains("Resource temporarily unavailable"),
        "{ready}"
    );
    assert_eq!(get(addr, "/").status, 200, "the old process serves");
    assert_eq!(server.pid(), Some(old));

    // Resources are back: the very next SIGHUP upgrades.
    cg.write("pids.max", "max");
    let (was, new) = server.upgrade();
    assert_eq!(was, old);
    assert_eq!(reap(old, TIMEOUT), 0);
    assert_eq!(get(addr, "/").status, 200);
    assert_eq!(terminate(new), 0);
}

// ---------------------------------------------------------------------------------------------
// symlinks planted by another user

/// As root, with `setpriv` to act as another user: a victim, and a directory with `mode` that
/// other users may write in; `None` (having said why) where that cannot be.
fn open_to_others(mode: u32) -> Option<(Victim, tempfile::TempDir)> {
    if !root() || !setpriv() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), mode);
    Some((Victim::new(), dir))
}

/// Before: the start-up check and the write opened `.NAME.<pid>.tmp` with
/// `O_CREAT|O_TRUNC`, following symlinks: another user who planted symlinks
/// for the next pids made the root-run service truncate and overwrite any
/// file.
#[test]
fn symlinks_planted_in_a_sticky_pid_file_directory_clobber_nothing() {
    let Some((victim, shared)) = open_to_others(0o1777) else {
        return;
    };
    let pid_file = shared.path().join("hello.pid");
    let plant = |pids: std::ops::Range<u32>| {
        as_nobody(&format!(
            "cd {dir} && ln -s {victim} hello.pid 2>/dev/null; \
             for p in $(seq {} {}); do ln -s {victim} .hello.pid.$p.tmp; done",
            pids.start,
            pids.end - 1,
            dir = shared.path().display(),
            victim = victim.path.display(),
        ));
    };
    // The first process: a shell that waits for the symlinks to be in place, then execs
    // hello (same pid).
    let mut cmd = command("sh");
    cmd.args(["-c", "read _ && exec \"$0\" \"$@\""])
        .arg(program!("hello"))
        .args(["--addr", "127.0.0.1:0", "--pid-file"])
        .arg(&pid_file)
        .stdin(Stdio::piped());
    let mut server = Server::spawn(cmd, Some(&pid_file));
    let first = server.child.id();
    plant(first..first + 1);
    let go = server.child.stdin.take().unwrap();
    (&go).write_all(b"go\n").unwrap();
    server.wait_started();
    victim.assert_untouched();

    // The next processes, whatever pids they get.
    let last: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(first);
    plant(last + 1..last + 1500);
    let (_, new) = server.upgrade_and_reap();
    victim.assert_untouched();
    let meta = fs::symlink_metadata(&pid_file).unwrap();
    assert!(meta.file_type().is_file(), "the PID file is a regular file");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owned by root");
    assert_eq!(fs::read_to_string(&pid_file).unwrap(), format!("{new}\n"));
    assert_eq!(terminate(new), 0);
    victim.assert_untouched();
}

/// Before: each generation `chmod`ed the control socket by path; another
/// user who replaced it with a symlink in a writable directory made the
/// next generation change the mode of any file.
#[test]
fn a_symlink_planted_for_the_control_socket_changes_no_mode() {
    let Some((victim, open)) = open_to_others(0o777) else {
        return;
    };
    let socket = open.path().join("control.sock");
    let args = ["--control-socket", socket.to_str().unwrap()];
    let mut server = Server::start(program!("hello"), &args, &[]);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "created private");

    as_nobody(&format!(
        "rm -f {s} && ln -s {v} {s}",
        s = socket.display(),
        v = victim.path.display()
    ));
    let from = server.log.len();
    let (_, new) = server.upgrade_and_reap();
    victim.assert_untouched();
    let gone = "control socket's file is gone or was replaced";
    server.log.wait_line(from, &[gone], TIMEOUT);
    assert_eq!(terminate(new), 0);
}

// ---------------------------------------------------------------------------------------------
// the PID file's file system full or read-only

/// A full file system under the PID file, under load, with a stand-in
/// manager (so the test can hold the handoff at the barrier):
///
/// - full before the upgrade: the new process's start-up check fails
///   (writing one line needs space; an empty file did not), the old one
///   serves on and its PID file stays;
/// - full only once the new process passed its check (filled while the
///   manager holds the barrier): the new process serves without a PID file
///   and removes the stale one; the old one exits;
/// - room again: the next upgrade writes the PID file.
///
/// Every request is answered. Before: the new process's `ready()` failed
/// after the old one had let go, the example exited, and both generations
/// were gone: port refused, stale PID file.
#[test]
fn a_full_file_system_under_the_pid_file_loses_no_request_during_an_upgrade() {
    let Some((disk, manager, server)) = hello_on_tmpfs("size=64k,mode=0755", &[]) else {
        return;
    };
    let addr = server.addr();
    let old = server.pid().unwrap();
    let load = Load::start(addr, LoadConfig::clients(4, 4));
    load.assert_flows(50);

    // Full before: the new process refuses to start, with the reason.
    disk.fill();
    let from = server.log.len();
    signal(old, Signal::SIGHUP);
    let (_, line) = server.log.wait_line(from, &[FAILED], TIMEOUT);
    assert!(line.contains("No space left on device"), "{line}");
    let _ = reap(pid_after(&line, "new process "), TIMEOUT);
    assert_eq!(server.pid(), Some(old));
    load.assert_flows(50);

    // Full only after the new process's check.
    fs::remove_file(disk.path().join("filler")).unwrap();
    manager.hold_barriers();
    let (from, sent) = (server.log.len(), manager.len());
    signal(old, Signal::SIGHUP);
    manager.wait_message(sent, &["BARRIER=1"]);
    disk.fill();
    manager.release_barriers();
    let (_, done) = server.log.wait_line(from, &["upgrade complete"], TIMEOUT);
    let new = pid_after(&done, "new_pid=");
    let without = "cannot write the PID file; serving without it";
    let (_, warned) = server.log.wait_line(from, &[without], TIMEOUT);
    assert!(warned.contains("No space left on device"), "{warned}");
    assert_eq!(reap(old, TIMEOUT), 0);
    assert!(alive(new), "the new process serves on");
    assert_eq!(server.pid(), None, "no PID file names the old process");
    load.assert_flows(100);

    // Room again.
    fs::remove_file(disk.path().join("filler")).unwrap();
    signal(new, Signal::SIGHUP);
    let third = server.wait_pid("a PID file naming the next process", |pid| {
        pid.filter(|p| *p != new)
    });
    assert_eq!(reap(new, TIMEOUT), 0);
    load.assert_flows(50);
    let report = load.stop();
    report.assert_lost_nothing(1);
    assert_eq!(terminate(third), 0);
}

/// Before: the new process wrote its reason with `try_write` on a stream
/// tokio had not seen writable yet (nothing was written), and the old
/// process reported "exited before it was ready (killed by signal 9)", or
/// "(reaped by the service manager)" under systemd.
#[test]
fn a_read_only_pid_directory_reason_reaches_the_log_status_and_reload_command() {
    let control = tempfile::tempdir().unwrap();
    let socket = control.path().join("control.sock");
    let args = ["--control-socket", socket.to_str().unwrap()];
    let Some((fs_, manager, server)) = hello_on_tmpfs("size=1m,mode=0755", &args) else {
        return;
    };
    let old = server.pid().unwrap();
    manager.wait_message(0, &["READY=1"]);

    fs_.remount("ro");
    let out = reload(program!("test-handover-reload"), &socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    let (_, line) = server.log.wait_line(0, &[FAILED], TIMEOUT);
    assert!(
        line.contains("Read-only file system") && line.contains("PID file"),
        "{line}"
    );
    let status = manager.wait_message(0, &["READY=1", "STATUS=upgrade to generation 1 failed"]);
    assert!(status.contains("Read-only file system"), "{status}");
    // The failed process was our child (CLONE_PARENT under a "manager").
    let _ = reap(pid_after(&line, "new process "), TIMEOUT);
    assert_eq!(server.pid(), Some(old));
    fs_.remount("rw");
    assert_eq!(terminate(old), 0);
}

// ---------------------------------------------------------------------------------------------
// the fd limit, the control socket's clients, a stop during an upgrade

/// Before: at `RLIMIT_NOFILE` the handoff channel could not be created
/// ("cannot start ...: Too many open files"), so a busy server could not be
/// upgraded at all. Now spare fds are closed for the upgrade's steps.
#[test]
fn an_upgrade_starts_at_the_fd_limit() {
    if !have("/usr/bin/prlimit", "util-linux") {
        return;
    }
    let server = Server::start(program!("hello"), &[], &[]);
    let addr = server.addr();
    let old = server.pid().unwrap();
    let limit = fd_count(old) + 8;
    let mut prlimit = Command::new("/usr/bin/prlimit");
    prlimit.args([
        "--pid",
        &old.to_string(),
        &format!("--nofile={limit}:{limit}"),
    ]);
    run(&mut prlimit).unwrap_or_else(|e| panic!("{e}"));

    // Idle connections until the server cannot accept the next one.
    let mut conns = Vec::new();
    let from = server.log.len();
    let full = || {
        let log = server.log.text();
        log.lines()
            .skip(from)
            .any(|l| l.contains("out of resources"))
    };
    while !full() {
        assert!(conns.len() < 64, "the server never hit its fd limit");
        let before = fd_count(old);
        conns.push(std::net::TcpStream::connect(addr).unwrap());
        wait_for(
            "the connection to be accepted or refused for lack of fds",
            TIMEOUT,
            || (fd_count(old) > before || full()).then_some(()),
        );
    }

    let (_, new) = server.upgrade();
    assert_eq!(reap(old, TIMEOUT), 0, "the old process drains and exits");
    drop(conns);
    assert_eq!(get(addr, "/").status, 200);
    assert_eq!(terminate(new), 0);
}

/// An application thread that takes every fd slot the moment it frees (`fd_thief`: it opens
/// `/dev/null` in a loop with no pause and keeps every fd) cannot make an upgrade at the fd
/// limit fail. Before: the spares were closed to free slots right before each step of the
/// upgrade, and the thread took them first ("cannot start ...: Too many open files"). Now the
/// upgrade's objects are made ahead in the spares' slots and put in place with `dup3`, so no
/// slot is ever free. Three upgrades in a row, each with the thief running in the old process,
/// under load: the new process serves, the old one exits 0, no request is lost.
#[test]
fn an_upgrade_at_the_fd_limit_survives_a_thread_that_takes_every_freed_slot() {
    let mut server = Server::start(program!("fd_thief"), &[], &[]);
    let addr = server.addr();
    let load = Load::start(addr, LoadConfig::clients(2, 1));
    load.assert_flows(20);
    for round in 1..=3 {
        let old = server.pid().unwrap();
        let from = server.log.len();
        signal(old, Signal::SIGUSR1);
        let pid = format!("pid={old}");
        server
            .log
            .wait_line(from, &["thief at the limit", &pid], TIMEOUT);
        signal(old, Signal::SIGHUP);
        let (_, line) = server
            .log
            .wait_line(from, &["upgrade ", "outcome="], TIMEOUT);
        assert!(
            line.contains("outcome=\"ok\"") || line.contains("outcome=ok"),
            "round {round}: the upgrade at the fd limit did not succeed: {line}\nlog:\n{}",
            server.log.text()
        );
        let new = server.wait_pid("a new PID in the PID file", |p| p.filter(|p| *p != old));
        assert_eq!(
            server.reap(old),
            0,
            "round {round}: old process {old} exits 0"
        );
        // The thief was there: it took the slots the old process freed once the new one ran.
        let log = server.log.text();
        let lines = || log.lines().skip(from);
        let stolen = lines()
            .filter(|l| l.contains("thief took a freed slot") && l.contains(&pid))
            .count();
        let by_pid = lines()
            .filter(|l| l.contains("following it by its pid"))
            .count();
        eprintln!(
            "round {round}: the thief took {stolen} freed slots; started without a pidfd: {by_pid}"
        );
        assert!(
            stolen > 0,
            "round {round}: the thief took no slot; log:\n{log}"
        );
        load.assert_flows(20);
        assert_eq!(
            get(addr, "/").text(),
            format!("pid {new}\n"),
            "round {round}"
        );
    }
    let report = load.stop();
    report.assert_lost_nothing(60);
    assert_eq!(terminate(server.pid().unwrap()), 0);
}

/// hello from a copy (so the test can replace the binary), with a control socket next to it
/// and the given upgrade timeout.
fn hello_with_control(upgrade_timeout: &str) -> (Deployed, PathBuf, Server) {
    let exe = Deployed::copy(program!("hello"));
    let socket = exe.dir().join("control.sock");
    let args = [
        "--control-socket",
        socket.to_str().unwrap(),
        "--upgrade-timeout",
        upgrade_timeout,
    ];
    let server = Server::start(exe.path(), &args, &[]);
    (exe, socket, server)
}

/// `systemctl stop` during a truthful reload: systemd SIGTERMs the reload
/// command and the service at once. Before: `handover-reload` died of the
/// signal (the unit ended "failed (Result: signal)") and the service logged
/// "upgrade failed; still serving" while it stopped. Now the command exits 0
/// saying "cancelled by stop", whether the signal or the service's
/// `cancelled` answer comes first, and the service logs a cancelled
/// upgrade.
#[test]
fn a_stop_during_a_reload_cancels_it_cleanly() {
    let (exe, socket, server) = hello_with_control("2");
    let old = server.pid().unwrap();
    exe.replace(NEVER_READY, 0o755);
    let spawn_reload = || {
        Command::new(program!("test-handover-reload"))
            .arg("--socket")
            .arg(&socket)
            .args(["--timeout", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // The signal first.
    let reload = spawn_reload();
    let (at, _) = server
        .log
        .wait_line(0, &["waiting for it to be ready"], TIMEOUT);
    signal(reload.id(), Signal::SIGTERM);
    let out = reload.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cancelled by stop"), "{stderr}");
    let needles = [FAILED, "not ready within 2s"];
    server.log.wait_line(at, &needles, TIMEOUT);

    // The service's answer first.
    let reload = spawn_reload();
    let (at, _) = server
        .log
        .wait_line(at + 1, &["waiting for it to be ready"], TIMEOUT);
    signal(old, Signal::SIGTERM);
    let out = reload.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("cancelled by stop: stopped during the upgrade"),
        "{stderr}"
    );
    assert_eq!(reap(old, TIMEOUT), 0);
    let text = server.log.text();
    let after: Vec<&str> = text.lines().skip(at).collect();
    assert!(
        after
            .iter()
            .any(|l| l.contains("upgrade cancelled: stopping")),
        "{text}"
    );
    assert!(
        !after.iter().any(|l| l.contains("upgrade failed")),
        "a stop is not a failed upgrade:\n{text}"
    );
}

/// A stop that reaches only the old process once it has told the manager
/// `MAINPID=<new>` (held here at the barrier; the wait for `serving` is the
/// same window) sends no `STOPPING=1`: the new process is the service now,
/// and under `NotifyAccess=all` a `STOPPING=1` from the old one would stop
/// the whole unit. The handoff stands, the old process finishes and exits
/// 0, and the new one serves. Before: the old process still counted itself
/// main until its drain began, and sent `STOPPING=1` after `MAINPID=<new>`.
#[test]
fn a_stop_after_mainpid_names_the_new_process_sends_no_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, server) = hello_notifying(dir.path(), &[]);
    let addr = server.addr();
    let old = server.pid().unwrap();
    manager.wait_message(0, &["READY=1"]);
    while manager.try_recv().is_some() {}

    manager.hold_barriers();
    let (from, sent) = (server.log.len(), manager.len());
    signal(old, Signal::SIGHUP);
    let announce = manager.wait_message(sent, &["MAINPID="]);
    let new: u32 = support::notify::value(&announce, "MAINPID")
        .parse()
        .unwrap();
    manager.wait_message(sent, &["BARRIER=1"]);
    signal(old, Signal::SIGTERM);
    server.log.wait_line(from, &["stop requested"], TIMEOUT);
    manager.release_barriers();

    assert_eq!(reap(old, TIMEOUT), 0, "the old process finishes and exits");
    server.wait_pid("the PID file to name the new process", |pid| {
        (pid == Some(new)).then_some(())
    });
    assert_eq!(get(addr, "/").status, 200, "the new process serves");
    let mut from_old = Vec::new();
    while let Some(d) = manager.try_recv() {
        if d.sender == old {
            from_old.push(d.text);
        }
    }
    let after_announce: Vec<&String> = from_old
        .iter()
        .skip_while(|t| !t.starts_with("MAINPID="))
        .collect();
    assert!(
        !after_announce.iter().any(|t| t.contains("STOPPING=1")),
        "the old process sent STOPPING=1 after MAINPID={new}: {from_old:#?}"
    );
    assert_eq!(terminate(new), 0);
}

/// A client the control socket refuses (another user) reads "permission
/// denied". Before: the service answered before reading the request and
/// closed it unread, and the client mostly saw "Broken pipe".
#[test]
fn a_refused_control_client_reads_permission_denied() {
    if !root() || !setpriv() {
        return;
    }
    let (exe, socket, server) = hello_with_control("10");
    chmod(exe.dir(), 0o755);
    chmod(&socket, 0o666); // let another user connect at all
    let old = server.pid().unwrap();
    for _ in 0..10 {
        let out = Command::new("/usr/bin/setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                program!("test-handover-reload").to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
            ])
            .env("PADDING", "x".repeat(100_000))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim(),
            "handover-reload: permission denied",
            "the refusal, not a broken connection"
        );
    }
    assert_eq!(server.pid(), Some(old), "nothing was upgraded");
}

/// A control connection that sends nothing does not keep a draining old
/// process alive. Before: it held a drain guard until its 10 s request
/// timeout.
#[test]
fn an_idle_control_connection_does_not_hold_the_old_process() {
    let (_exe, socket, server) = hello_with_control("10");
    let mut idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    // Proof it was accepted: a status request on another connection is
    // answered after it.
    let status = handover::control::request_status(&socket, TIMEOUT).unwrap();
    assert!(status.starts_with("Ready"), "{status}");
    let started = Instant::now();
    let (old, new) = server.upgrade();
    assert_eq!(reap(old, Duration::from_secs(5)), 0);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the old process took {took:?}"
    );
    idle.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut idle, &mut rest).unwrap();
    assert!(rest.is_empty(), "closed unanswered: it never asked");
    assert_eq!(terminate(new), 0);
}

// ---------------------------------------------------------------------------------------------
// the new process dies while the old one drains

/// A keep-alive connection to the serving process with half of its next request sent: work
/// in flight there, which holds its drain.
fn half_sent_request(addr: SocketAddr) -> Conn {
    let mut c = Conn::open(addr);
    c.send(b"GET / HTTP/1.1\r\nHost: test\r\n");
    c
}

/// Run by hand, the old process keeps its listeners (not accepting) while
/// it drains; when the new process is killed (-9) then, the old one
/// accepts again, rewrites the PID file, says so, and can be upgraded
/// again. Before: it had dropped its listeners, and the service was gone
/// (connections refused, a PID file naming a dead process) until someone
/// restarted it.
#[test]
fn the_old_process_takes_the_service_back_when_the_new_one_dies_during_its_drain() {
    let (_exe, socket, server) = hello_with_control("10");
    let addr = server.addr();
    let mut held = half_sent_request(addr);
    let load = Load::start(addr, LoadConfig::clients(2, 2));
    load.assert_flows(50);
    let from = server.log.len();
    let (old, new) = server.upgrade();
    // The PID file comes a moment before `serving`, and the drain after it: a death before
    // that is a failed upgrade, not a taken-back drain.
    server
        .log
        .wait_line(from, &["upgrade complete; draining"], TIMEOUT);
    load.assert_flows(50);
    assert!(alive(old), "the half-sent request holds the old process");

    let from = server.log.len();
    signal(new, Signal::SIGKILL);
    let (_, line) = server.log.wait_line(
        from,
        &["the new process died while this one was draining; took the service back"],
        TIMEOUT,
    );
    assert!(
        line.contains(&format!("new_pid={new}")) && line.contains("killed by signal 9"),
        "{line}"
    );
    assert_eq!(
        server.pid(),
        Some(old),
        "the PID file names the old process"
    );
    assert_eq!(burst(addr, 200), (0, 200), "(refused, answered)");
    load.assert_flows(100);
    let report = load.stop();
    eprintln!("{report}");
    // Requests the killed process had accepted are lost with it; none may
    // find the port closed.
    assert!(
        !report.errors.contains_key(&ErrorKind::Refused) && report.stuck_clients == 0,
        "{report}"
    );

    // Its own work goes on, and the control socket answers again.
    held.send(b"\r\n");
    assert_eq!(held.read().status, 200);
    let status = handover::control::request_status(&socket, TIMEOUT).unwrap();
    assert!(status.starts_with("Ready generation=0"), "{status}");

    // And it upgrades again, this time for good.
    let (was, third) = server.upgrade();
    assert_eq!(was, old);
    drop(held);
    assert_eq!(reap(old, TIMEOUT), 0);
    assert_eq!(get(addr, "/").status, 200);
    assert_eq!(terminate(third), 0);
}

/// A new process stopped (SIGTERM) while the old one drains says so; the
/// old one then does not take the service back: both finish and exit, and
/// the PID file is gone.
#[test]
fn a_stopped_new_process_is_not_replaced_by_its_draining_parent() {
    let server = Server::start(program!("hello"), &[], &[]);
    let addr = server.addr();
    let mut held = half_sent_request(addr);
    let (old, new) = server.upgrade();
    assert!(alive(old));
    signal(new, Signal::SIGTERM);
    // The old process is its parent, and reaps it.
    wait_for("the new process to exit", TIMEOUT, || {
        (!alive(new)).then_some(())
    });
    held.send(b"\r\n");
    assert_eq!(held.read().status, 200);
    assert_eq!(reap(old, TIMEOUT), 0, "the old process finished its drain");
    assert!(!server.log.text().contains("took the service back"));
    assert_eq!(
        server.pid(),
        None,
        "the stopped process removed its PID file"
    );
}

// ---------------------------------------------------------------------------------------------
// the same two under a real service manager

/// Installs the shipped `units/hello.socket` on a free port and `units/hello.service` running
/// `exe --addr <that address> args` (its `handover-reload` the built one), plus `dropin`, and
/// starts them; returns the address.
fn install_units(m: &UserManager, exe: &Path, args: &str, dropin: &str) -> SocketAddr {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exec = format!("{} --addr {addr} {args}", exe.display());
    let reload = program!("test-handover-reload");
    let (socket, service) = units::hello_units(m, "hello.service", &exec, port, reload);
    units::install_hello(m, &socket, &service, dropin);
    m.systemctl_ok(&["start", "hello.socket", "hello.service"]);
    addr
}

/// What the manager logged about hello.service.
fn manager_says(m: &UserManager) -> Vec<String> {
    m.journal_entries(&["USER_UNIT=hello.service"])
        .iter()
        .filter_map(|e| e.get("MESSAGE").cloned())
        .collect()
}

fn logged(m: &UserManager, pid: u32, starts: &str) {
    m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
        e.get("MESSAGE").is_some_and(|m| m.starts_with(starts))
    });
}

/// Under systemd the manager supervises the new process: when it is killed
/// while the old one drains, systemd (252 and 257) counts the main process
/// as failed, SIGTERMs what is left of the unit and waits: the old process
/// is not killed, it finishes its in-flight request and exits by itself
/// (`TimeoutStopSec=` is above the drain timeout). Then `Restart=on-failure`
/// starts the service again on the socket unit's socket, which queued every
/// connection meanwhile: none is refused.
fn under_systemd_the_unit_restarts_after_the_old_process_drained(m: &UserManager) {
    let addr = install_units(m, program!("hello"), "--drain-timeout 20", "");
    let first = m.main_pid("hello.service");
    let mut held = half_sent_request(addr);
    assert_eq!(get(addr, "/").status, 200);
    m.systemctl_ok(&["reload", "hello.service"]);
    let new = m.main_pid("hello.service");
    assert!(new != 0 && new != first, "MainPID {new} after the reload");

    signal(new, Signal::SIGKILL);
    m.wait_until("systemd to stop what is left of the unit", TIMEOUT, || {
        m.show("hello.service", "SubState") == "stop-sigterm"
    });
    logged(m, first, "stop requested");
    assert!(alive(first), "the old process drains on after the SIGTERM");
    // Its in-flight request completes.
    held.send(b"\r\n");
    assert_eq!(held.read().status, 200);
    let mut third = 0;
    m.wait_until("the unit to be restarted", TIMEOUT, || {
        third = m.main_pid("hello.service");
        third != 0 && third != new && m.show("hello.service", "ActiveState") == "active"
    });
    assert!(!alive(first));
    assert_eq!(burst(addr, 50), (0, 50), "(refused, answered)");
    assert_eq!(m.show("hello.socket", "NRefused"), "0");
    logged(
        m,
        first,
        "the new process exited while this one was draining",
    );
    logged(m, first, "drained; exiting");
    let said = manager_says(m);
    eprintln!("manager about hello.service:\n  {}", said.join("\n  "));
    assert!(
        said.iter()
            .any(|l| l.contains("Main process exited, code=killed")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|l| l.contains("Scheduled restart job")),
        "{said:?}"
    );
    for bad in ["Killing", "SIGKILL", "timed out"] {
        assert!(!said.iter().any(|l| l.contains(bad)), "{bad:?} in {said:?}");
    }
}

/// `systemctl stop` while a truthful reload waits for a new process that
/// never becomes ready: the reload is cancelled, the service stops, and the
/// unit's result is `success`. Before: `handover-reload` died of SIGTERM and
/// the unit ended "failed (Result: signal)".
fn under_systemd_a_stop_during_a_truthful_reload_leaves_the_unit_clean(m: &UserManager) {
    let exe = Deployed::copy_into(program!("hello"), &m.scratch_dir());
    let dropin = "Environment=RUST_LOG=info";
    install_units(m, exe.path(), "--upgrade-timeout 60", dropin);
    let first = m.main_pid("hello.service");
    exe.replace(NEVER_READY, 0o755);
    std::thread::scope(|s| {
        let reload = s.spawn(|| m.systemctl(&["reload", "hello.service"]));
        logged(m, first, "new process started");
        m.systemctl_ok(&["stop", "hello.service"]);
        let out = reload.join().unwrap();
        eprintln!(
            "systemctl reload: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let said = manager_says(m);
    eprintln!("manager about hello.service:\n  {}", said.join("\n  "));
    assert_eq!(m.show("hello.service", "ActiveState"), "inactive");
    assert_eq!(m.show("hello.service", "Result"), "success", "{said:?}");
    m.wait_for_journal(&["SYSLOG_IDENTIFIER=handover-reload"], TIMEOUT, |e| {
        e.get("MESSAGE")
            .is_some_and(|m| m.contains("cancelled by stop"))
    });
    logged(m, first, "upgrade cancelled: stopping");
    let old_said = m.journal(&["-o", "cat", &format!("_PID={first}")]);
    assert!(!old_said.contains("upgrade failed"), "{old_said}");
}

on_each_manager!(
    under_systemd_the_unit_restarts_after_the_old_process_drained,
    under_systemd_a_stop_during_a_truthful_reload_leaves_the_unit_clean,
);
