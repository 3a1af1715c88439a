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

#[path = "support/load.rs"]
mod load;
#[path = "support/server.rs"]
mod server;
#[path = "support/systemd.rs"]
mod systemd;
#[path = "support/units.rs"]
mod units;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use server::{alive, become_subreaper, example, reap, wait_for, Log, Server};

/// Bound on every wait.
const T: Duration = Duration::from_secs(30);
const NOBODY: &str = "65534";
const RELOAD_CMD: &str = env!("CARGO_BIN_EXE_handover-reload");

// ---------------------------------------------------------------------------------------------
// helpers

/// Prints why the test cannot run here and returns false; under CI, fails.
fn skip(why: &str) -> bool {
    assert!(!systemd::under_ci(), "cannot run under CI: {why}");
    let thread = std::thread::current();
    systemd::announce(&format!("SKIP {}: {why}", thread.name().unwrap_or("test")));
    false
}

fn root() -> bool {
    nix::unistd::geteuid().is_root() || skip("needs root")
}

fn setpriv() -> bool {
    Path::new("/usr/bin/setpriv").exists() || skip("needs /usr/bin/setpriv (util-linux)")
}

/// Runs `sh -c script` as user and group 65534 (nobody), no other groups.
fn as_nobody(script: &str) -> Output {
    let out = Command::new("/usr/bin/setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as nobody: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
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

/// Starts `exe` with `--pid-file pid_file` and `args`, its stderr captured,
/// and waits until it wrote its PID file.
fn start(exe: &Path, pid_file: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(exe);
    cmd.arg("--pid-file").arg(pid_file).args(args);
    cmd.env("RUST_LOG", "info").env_remove("NOTIFY_SOCKET");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::capture(child.stderr.take().unwrap());
    let server = Server {
        child,
        log,
        pid_file: pid_file.to_owned(),
        dir: tempfile::tempdir().unwrap(),
    };
    let first = server.child.id();
    wait_for("the PID file", T, || {
        (server.pid() == Some(first)).then_some(())
    });
    server
}

/// Waits until the load has completed `n` more requests: traffic flows now.
fn traffic_flows(load: &load::Load, n: u64) {
    let want = load.ok() + n;
    assert!(
        load.wait_for_ok(want, T),
        "requests stopped flowing ({} ok, {} errors)",
        load.ok(),
        load.errors()
    );
}

/// The pid after `key` in a log line (`new_pid=123`, `new process 123`).
fn pid_after(line: &str, key: &str) -> u32 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
        + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no pid after {key:?} in {line}"))
}

fn reload(socket: &Path) -> Output {
    Command::new(RELOAD_CMD)
        .arg("--socket")
        .arg(socket)
        .args(["--timeout", "30"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A tmpfs mounted (by root) on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "handover-test"])
            .arg(dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            skip(&format!(
                "cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount {options}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

/// A notify socket of our own standing in for the service manager: it
/// records every datagram and closes the fds that come with one (which is
/// what releases a `BARRIER=1`), or holds them while told to.
struct FakeManager {
    _dir: tempfile::TempDir,
    path: PathBuf,
    messages: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// `Some`: barrier fds are held here until [`FakeManager::release`].
    held: Arc<Mutex<Option<Vec<std::os::fd::RawFd>>>>,
}

impl FakeManager {
    fn start() -> FakeManager {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let messages: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let held: Arc<Mutex<Option<Vec<std::os::fd::RawFd>>>> = Arc::default();
        let (m, h) = (messages.clone(), held.clone());
        std::thread::spawn(move || loop {
            let mut buf = [0u8; 4096];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let Ok(msg) = nix::sys::socket::recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                break;
            };
            let mut fds = vec![];
            for c in msg.cmsgs().into_iter().flatten() {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            let len = msg.bytes;
            match &mut *h.lock().unwrap() {
                Some(held) => held.extend(fds),
                None => {
                    for fd in fds {
                        let _ = nix::unistd::close(fd);
                    }
                }
            }
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let (lock, cv) = &*m;
            lock.lock().unwrap().push(text);
            cv.notify_all();
        });
        FakeManager {
            _dir: dir,
            path,
            messages,
            held,
        }
    }

    /// Holds every `BARRIER=1` from now on, until [`FakeManager::release`].
    fn hold_barriers(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    /// Processes the held barriers (closes their fds) and holds no more.
    fn release(&self) {
        for fd in self.held.lock().unwrap().take().unwrap_or_default() {
            let _ = nix::unistd::close(fd);
        }
    }

    /// How many messages so far.
    fn len(&self) -> usize {
        self.messages.0.lock().unwrap().len()
    }

    /// Waits for a message after the first `from` that contains every one
    /// of `needles`.
    fn wait_message(&self, from: usize, needles: &[&str]) -> String {
        let end = Instant::now() + T;
        let (lock, cv) = &*self.messages;
        let mut msgs = lock.lock().unwrap();
        loop {
            if let Some(m) = msgs
                .iter()
                .skip(from)
                .find(|m| needles.iter().all(|n| m.contains(n)))
            {
                return m.clone();
            }
            let now = Instant::now();
            assert!(
                now < end,
                "no notify message with {needles:?}; got {msgs:#?}"
            );
            msgs = cv.wait_timeout(msgs, end - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. no thread can be created

/// A pids cgroup of our own (cgroup v1 `pids` controller), nested under
/// this test's own cgroup path, never the root; removed on drop, after
/// killing whatever of ours is still in it.
struct PidsCgroup {
    dir: PathBuf,
    created: Vec<PathBuf>,
}

impl PidsCgroup {
    fn create() -> Option<PidsCgroup> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mountinfo.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let (mount, fstype, opts) = (f.get(4)?, f.get(sep + 1)?, f.get(sep + 3)?);
            (*fstype == "cgroup" && opts.split(',').any(|o| o == "pids"))
                .then(|| PathBuf::from(mount))
        });
        let Some(mount) = mount else {
            skip("no cgroup v1 pids hierarchy mounted");
            return None;
        };
        // Our place: in the pids hierarchy if it is not the root there,
        // else our memory cgroup's path (as the systemd harness does).
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let path_of = |ctrl: &str| {
            own.lines().find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                ctrls.split(',').any(|c| c == ctrl).then(|| path.to_owned())
            })
        };
        let base = path_of("pids")
            .filter(|p| p != "/")
            .or_else(|| path_of("memory"))
            .unwrap_or_else(|| "/".into());
        assert!(!base.contains(".."), "{base}");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let leaf = format!("handover-pids-{}-{n}", std::process::id());
        let dir = mount.join(base.trim_start_matches('/')).join(leaf);
        // The systemd harness creates and removes parents under this lock.
        let _lock = CgroupLock::take();
        let mut created = Vec::new();
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
        missing.reverse();
        for d in missing {
            fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            created.push(d.to_owned());
        }
        Some(PidsCgroup { dir, created })
    }

    fn write(&self, file: &str, value: &str) {
        fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {file}: {e}"));
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn procs(&self) -> Vec<i32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("pids.max"), "max");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = self.procs();
            if procs.is_empty() || Instant::now() > end {
                break;
            }
            for p in procs {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _lock = CgroupLock::take();
        for d in self.created.iter().rev() {
            let end = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `flock` on `/sys/fs/cgroup`, as the systemd harness takes it; held until
/// dropped.
struct CgroupLock(#[allow(dead_code)] Option<nix::fcntl::Flock<fs::File>>);

impl CgroupLock {
    fn take() -> CgroupLock {
        let mut file = fs::File::open("/sys/fs/cgroup").ok();
        while let Some(f) = file.take() {
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
                Ok(lock) => return CgroupLock(Some(lock)),
                Err((f, nix::errno::Errno::EINTR)) => file = Some(f),
                Err(_) => break,
            }
        }
        CgroupLock(None)
    }
}

/// No thread can be created (a pids cgroup at its limit) when SIGHUP
/// comes: the upgrade fails with that reason, ends its `RELOADING=1` with
/// `READY=1` and a `STATUS=` saying why (to a stand-in manager), and once
/// the limit is lifted the very next SIGHUP upgrades. Before: tokio's
/// `spawn_blocking` panicked ("OS can't spawn worker thread"), the phase
/// stayed "upgrading" and every later SIGHUP was coalesced into nothing,
/// for ever; under systemd `systemctl reload` hung.
#[test]
fn an_upgrade_that_cannot_create_a_thread_fails_with_a_reason_and_the_next_one_works() {
    if !root() {
        return;
    }
    become_subreaper();
    let manager = FakeManager::start();
    let notify = manager.path.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        &example("hello"),
        &dir.path().join("hello.pid"),
        &["--addr", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let addr = server.addr();
    let old = server.pid().unwrap();
    let Some(cg) = PidsCgroup::create() else {
        return;
    };
    cg.write("cgroup.procs", &old.to_string());
    cg.write("pids.max", &cg.read("pids.current"));

    let (from, sent) = (server.log.len(), manager.len());
    kill(Pid::from_raw(old as i32), Signal::SIGHUP).unwrap();
    let (_, line) = server
        .log
        .wait_line(from, &["upgrade failed; still serving"], T);
    assert!(
        line.contains("cannot create a thread")
            && line.contains("Resource temporarily unavailable"),
        "{line}"
    );
    manager.wait_message(sent, &["RELOADING=1"]);
    let ready = manager.wait_message(sent, &["READY=1\nSTATUS=upgrade to generation 1 failed"]);
    assert!(ready.contains("cannot create a thread"), "{ready}");
    assert_eq!(server::get(addr, "/").0, 200, "the old process serves");
    assert_eq!(server.pid(), Some(old));

    // Resources are back: the very next SIGHUP upgrades.
    cg.write("pids.max", "max");
    let (was, new) = server.upgrade(T);
    assert_eq!(was, old);
    assert_eq!(reap(old, T), 0);
    assert_eq!(server::get(addr, "/").0, 200);
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(new, T), 0);
}

// ---------------------------------------------------------------------------------------------
// 2. and 3. symlinks planted by another user

/// Before: the start-up check and the write opened `.NAME.<pid>.tmp` with
/// `O_CREAT|O_TRUNC`, following symlinks: another user who planted symlinks
/// for the next pids made the root-run service truncate and overwrite any
/// file.
#[test]
fn symlinks_planted_in_a_sticky_pid_file_directory_clobber_nothing() {
    if !root() || !setpriv() {
        return;
    }
    become_subreaper();
    let victim = Victim::new();
    let shared = tempfile::tempdir().unwrap();
    chmod(shared.path(), 0o1777);
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
    // The first process: a shell that waits for the symlinks to be in
    // place, then execs hello (same pid).
    let hello = example("hello");
    let mut child = Command::new("sh")
        .args(["-c", "read _ && exec \"$0\" \"$@\""])
        .arg(&hello)
        .args(["--addr", "127.0.0.1:0", "--pid-file"])
        .arg(&pid_file)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = child.id();
    plant(first..first + 1);
    let log = Log::capture(child.stderr.take().unwrap());
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let server = Server {
        child,
        log,
        pid_file: pid_file.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    wait_for("the PID file", T, || {
        (server.pid() == Some(first)).then_some(())
    });
    victim.assert_untouched();

    // The next processes, whatever pids they get.
    let last: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(first);
    plant(last + 1..last + 1500);
    let (old, new) = server.upgrade(T);
    assert_eq!(reap(old, T), 0);

    victim.assert_untouched();
    let meta = fs::symlink_metadata(&pid_file).unwrap();
    assert!(meta.file_type().is_file(), "the PID file is a regular file");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owned by root");
    assert_eq!(fs::read_to_string(&pid_file).unwrap(), format!("{new}\n"));
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(new, T), 0);
    victim.assert_untouched();
}

/// Before: each generation `chmod`ed the control socket by path; another
/// user who replaced it with a symlink in a writable directory made the
/// next generation change the mode of any file.
#[test]
fn a_symlink_planted_for_the_control_socket_changes_no_mode() {
    if !root() || !setpriv() {
        return;
    }
    become_subreaper();
    let victim = Victim::new();
    let open = tempfile::tempdir().unwrap();
    chmod(open.path(), 0o777);
    let socket = open.path().join("control.sock");
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--control-socket",
        socket.to_str().unwrap(),
    ];
    let server = Server::start(&example("hello"), &args, &[]);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "created private");

    as_nobody(&format!(
        "rm -f {s} && ln -s {v} {s}",
        s = socket.display(),
        v = victim.path.display()
    ));
    let from = server.log.len();
    let (old, new) = server.upgrade(T);
    assert_eq!(reap(old, T), 0);
    victim.assert_untouched();
    server
        .log
        .wait_line(from, &["control socket's file is gone or was replaced"], T);
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(new, T), 0);
}

// ---------------------------------------------------------------------------------------------
// 4. and 5. the PID file's file system full or read-only

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
    if !root() {
        return;
    }
    become_subreaper();
    let Some(disk) = Tmpfs::mount("size=64k,mode=0755") else {
        return;
    };
    let manager = FakeManager::start();
    let notify = manager.path.to_str().unwrap().to_owned();
    let pid_file = disk.path().join("hello.pid");
    let server = start(
        &example("hello"),
        &pid_file,
        &["--addr", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let addr = server.addr();
    let old = server.pid().unwrap();
    let load = load::Load::start(
        addr,
        load::LoadConfig {
            keepalive_clients: 4,
            per_request_clients: 4,
            ..load::LoadConfig::default()
        },
    );
    traffic_flows(&load, 50);

    // Full before: the new process refuses to start, with the reason.
    disk.fill();
    let from = server.log.len();
    kill(Pid::from_raw(old as i32), Signal::SIGHUP).unwrap();
    let (_, line) = server
        .log
        .wait_line(from, &["upgrade failed; still serving"], T);
    assert!(line.contains("No space left on device"), "{line}");
    let _ = reap(pid_after(&line, "new process "), T);
    assert_eq!(server.pid(), Some(old));
    traffic_flows(&load, 50);

    // Full only after the new process's check.
    fs::remove_file(disk.path().join("filler")).unwrap();
    manager.hold_barriers();
    let (from, sent) = (server.log.len(), manager.len());
    kill(Pid::from_raw(old as i32), Signal::SIGHUP).unwrap();
    manager.wait_message(sent, &["BARRIER=1"]);
    disk.fill();
    manager.release();
    let (_, done) = server.log.wait_line(from, &["upgrade complete"], T);
    let new = pid_after(&done, "new_pid=");
    let (_, warned) =
        server
            .log
            .wait_line(from, &["cannot write the PID file; serving without it"], T);
    assert!(warned.contains("No space left on device"), "{warned}");
    assert_eq!(reap(old, T), 0);
    assert!(alive(new), "the new process serves on");
    assert_eq!(server.pid(), None, "no PID file names the old process");
    traffic_flows(&load, 100);

    // Room again.
    fs::remove_file(disk.path().join("filler")).unwrap();
    kill(Pid::from_raw(new as i32), Signal::SIGHUP).unwrap();
    let third = wait_for("a PID file naming the next process", T, || {
        server.pid().filter(|p| *p != new)
    });
    assert_eq!(reap(new, T), 0);
    traffic_flows(&load, 50);
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_errors();
    kill(Pid::from_raw(third as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(third, T), 0);
}

/// Before: the new process wrote its reason with `try_write` on a stream
/// tokio had not seen writable yet (nothing was written), and the old
/// process reported "exited before it was ready (killed by signal 9)", or
/// "(reaped by the service manager)" under systemd.
#[test]
fn a_read_only_pid_directory_reason_reaches_the_log_status_and_reload_command() {
    if !root() {
        return;
    }
    become_subreaper();
    let Some(fs_) = Tmpfs::mount("size=1m,mode=0755") else {
        return;
    };
    let manager = FakeManager::start();
    let control = tempfile::tempdir().unwrap();
    let socket = control.path().join("control.sock");
    let pid_file = fs_.path().join("hello.pid");
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--control-socket",
        socket.to_str().unwrap(),
    ];
    let notify = manager.path.to_str().unwrap().to_owned();
    let server = start(
        &example("hello"),
        &pid_file,
        &args,
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    let old = server.pid().unwrap();
    manager.wait_message(0, &["READY=1"]);

    fs_.remount("ro");
    let out = reload(&socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    let (_, line) = server
        .log
        .wait_line(0, &["upgrade failed; still serving"], T);
    assert!(
        line.contains("Read-only file system") && line.contains("PID file"),
        "{line}"
    );
    let status = manager.wait_message(0, &["READY=1", "STATUS=upgrade to generation 1 failed"]);
    assert!(status.contains("Read-only file system"), "{status}");
    // The failed process was our child (CLONE_PARENT under a "manager").
    let _ = reap(pid_after(&line, "new process "), T);
    assert_eq!(server.pid(), Some(old));
    fs_.remount("rw");
    kill(Pid::from_raw(old as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(old, T), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. the fd limit, the control socket's clients, a stop during an upgrade

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Before: at `RLIMIT_NOFILE` the handoff channel could not be created
/// ("cannot start ...: Too many open files"), so a busy server could not be
/// upgraded at all. Now spare fds are closed for the upgrade's steps.
#[test]
fn an_upgrade_starts_at_the_fd_limit() {
    if !Path::new("/usr/bin/prlimit").exists() {
        skip("needs /usr/bin/prlimit (util-linux)");
        return;
    }
    become_subreaper();
    let server = Server::start(&example("hello"), &["--addr", "127.0.0.1:0"], &[]);
    let addr = server.addr();
    let old = server.pid().unwrap();
    let limit = fd_count(old) + 8;
    let out = Command::new("/usr/bin/prlimit")
        .args([
            "--pid",
            &old.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Idle connections until the server cannot accept the next one.
    let mut conns = Vec::new();
    let from = server.log.len();
    let full = |log: &Log| {
        log.text()
            .lines()
            .skip(from)
            .any(|l| l.contains("out of resources"))
    };
    while !full(&server.log) {
        assert!(conns.len() < 64, "the server never hit its fd limit");
        let before = fd_count(old);
        conns.push(std::net::TcpStream::connect(addr).unwrap());
        wait_for(
            "the connection to be accepted or refused for lack of fds",
            T,
            || (fd_count(old) > before || full(&server.log)).then_some(()),
        );
    }

    let (_, new) = server.upgrade(T);
    assert_eq!(reap(old, T), 0, "the old process drains and exits");
    drop(conns);
    assert_eq!(server::get(addr, "/").0, 200);
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(new, T), 0);
}

/// hello from a copy in a temporary directory (so the test can replace the
/// binary), with a control socket there and the given upgrade timeout.
fn hello_with_control(upgrade_timeout: &str) -> (tempfile::TempDir, PathBuf, PathBuf, Server) {
    become_subreaper();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hello");
    server::deploy(&exe, &fs::read(example("hello")).unwrap(), 0o755);
    let socket = dir.path().join("control.sock");
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--control-socket",
        socket.to_str().unwrap(),
        "--upgrade-timeout",
        upgrade_timeout,
    ];
    let server = Server::start(&exe, &args, &[]);
    (dir, exe, socket, server)
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
    let (_dir, exe, socket, server) = hello_with_control("2");
    let old = server.pid().unwrap();
    server::deploy(&exe, b"#!/bin/sh\nexec sleep 30\n", 0o755);
    let spawn_reload = || {
        Command::new(RELOAD_CMD)
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
    let (at, _) = server.log.wait_line(0, &["waiting for it to be ready"], T);
    kill(Pid::from_raw(reload.id() as i32), Signal::SIGTERM).unwrap();
    let out = reload.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cancelled by stop"), "{stderr}");
    server.log.wait_line(
        at,
        &["upgrade failed; still serving", "not ready within 2s"],
        T,
    );

    // The service's answer first.
    let reload = spawn_reload();
    let (at, _) = server
        .log
        .wait_line(at + 1, &["waiting for it to be ready"], T);
    kill(Pid::from_raw(old as i32), Signal::SIGTERM).unwrap();
    let out = reload.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("cancelled by stop: stopped during the upgrade"),
        "{stderr}"
    );
    assert_eq!(reap(old, T), 0);
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

/// A client the control socket refuses (another user) reads "permission
/// denied". Before: the service answered before reading the request and
/// closed it unread, and the client mostly saw "Broken pipe".
#[test]
fn a_refused_control_client_reads_permission_denied() {
    if !root() || !setpriv() {
        return;
    }
    let (dir, _exe, socket, server) = hello_with_control("10");
    chmod(dir.path(), 0o755);
    chmod(&socket, 0o666); // let another user connect at all
    let old = server.pid().unwrap();
    for _ in 0..10 {
        let out = Command::new("/usr/bin/setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                RELOAD_CMD,
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
    let (_dir, _exe, socket, server) = hello_with_control("10");
    let mut idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    // Proof it was accepted: a status request on another connection is
    // answered after it.
    let status = handover::control::request_status(&socket, T).unwrap();
    assert!(status.starts_with("Ready"), "{status}");
    let started = Instant::now();
    let (old, new) = server.upgrade(T);
    assert_eq!(reap(old, Duration::from_secs(5)), 0);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the old process took {took:?}"
    );
    idle.set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed unanswered: it never asked");
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(new, T), 0);
}

// ---------------------------------------------------------------------------------------------
// 6. the new process dies while the old one drains

/// A keep-alive connection to the serving process with half of its next
/// request sent: work in flight there, which holds its drain.
fn half_sent_request(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n").unwrap();
    c
}

/// Connections at once, each `GET /` with `Connection: close`: how many
/// were refused, and how many answered 200.
fn burst(addr: std::net::SocketAddr, n: usize) -> (usize, usize) {
    let (mut refused, mut ok) = (0, 0);
    for _ in 0..n {
        match std::net::TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => panic!("connect: {e}"),
            Ok(mut s) => {
                s.set_read_timeout(Some(T)).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                if resp.starts_with("HTTP/1.1 200") {
                    ok += 1;
                }
            }
        }
    }
    (refused, ok)
}

/// Run by hand, the old process keeps its listeners (not accepting) while
/// it drains; when the new process is killed (-9) then, the old one
/// accepts again, rewrites the PID file, says so, and can be upgraded
/// again. Before: it had dropped its listeners, and the service was gone
/// (connections refused, a PID file naming a dead process) until someone
/// restarted it.
#[test]
fn the_old_process_takes_the_service_back_when_the_new_one_dies_during_its_drain() {
    let (_dir, _exe, socket, server) = hello_with_control("10");
    let addr = server.addr();
    let mut held = half_sent_request(addr);
    let load = load::Load::start(
        addr,
        load::LoadConfig {
            keepalive_clients: 2,
            per_request_clients: 2,
            ..load::LoadConfig::default()
        },
    );
    traffic_flows(&load, 50);
    let (old, new) = server.upgrade(T);
    traffic_flows(&load, 50);
    assert!(alive(old), "the half-sent request holds the old process");

    let from = server.log.len();
    kill(Pid::from_raw(new as i32), Signal::SIGKILL).unwrap();
    let (_, line) = server.log.wait_line(
        from,
        &["the new process died while this one was draining; took the service back"],
        T,
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
    traffic_flows(&load, 100);
    let report = load.stop();
    eprintln!("{report}");
    // Requests the killed process had accepted are lost with it; none may
    // find the port closed.
    assert!(
        !report.errors.contains_key(&load::ErrorKind::Refused) && report.stuck_clients == 0,
        "{report}"
    );

    // Its own work goes on, and the control socket answers again.
    held.write_all(b"\r\n").unwrap();
    let mut first = [0u8; 12];
    held.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let status = handover::control::request_status(&socket, T).unwrap();
    assert!(status.starts_with("Ready generation=0"), "{status}");

    // And it upgrades again, this time for good.
    let (was, third) = server.upgrade(T);
    assert_eq!(was, old);
    drop(held);
    assert_eq!(reap(old, T), 0);
    assert_eq!(server::get(addr, "/").0, 200);
    kill(Pid::from_raw(third as i32), Signal::SIGTERM).unwrap();
    assert_eq!(reap(third, T), 0);
}

/// A new process stopped (SIGTERM) while the old one drains says so; the
/// old one then does not take the service back: both finish and exit, and
/// the PID file is gone.
#[test]
fn a_stopped_new_process_is_not_replaced_by_its_draining_parent() {
    become_subreaper();
    let server = Server::start(&example("hello"), &["--addr", "127.0.0.1:0"], &[]);
    let addr = server.addr();
    let mut held = half_sent_request(addr);
    let (old, new) = server.upgrade(T);
    assert!(alive(old));
    kill(Pid::from_raw(new as i32), Signal::SIGTERM).unwrap();
    // The old process is its parent, and reaps it.
    wait_for("the new process to exit", T, || (!alive(new)).then_some(()));
    held.write_all(b"\r\n").unwrap();
    let mut response = String::new();
    held.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(reap(old, T), 0, "the old process finished its drain");
    assert!(!server.log.text().contains("took the service back"));
    assert_eq!(
        server.pid(),
        None,
        "the stopped process removed its PID file"
    );
}

// ---------------------------------------------------------------------------------------------
// the same two under a real service manager

/// Installs the shipped `units/hello.socket` on a free port and
/// `units/hello.service` running `exe --addr <that address> args` (its
/// `handover-reload` pointed at the built one), plus `dropins`, and starts
/// them; returns the address.
fn install_units(
    m: &systemd::UserManager,
    exe: &Path,
    args: &str,
    dropins: &[(&str, &str)],
) -> std::net::SocketAddr {
    let port = server::free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let exec = format!("{} --addr {addr} {args}", exe.display());
    let (socket, service) = units::hello_units("hello.service", &exec, port);
    m.install_unit("hello.socket", &socket);
    m.install_unit("hello.service", &service);
    for (name, contents) in dropins {
        m.install_unit(&format!("hello.service.d/{name}"), contents);
    }
    m.daemon_reload();
    m.systemctl_ok(&["start", "hello.socket"]);
    m.systemctl_ok(&["start", "hello.service"]);
    addr
}

fn manager_says(m: &systemd::UserManager) -> Vec<String> {
    m.journal_entries(&["USER_UNIT=hello.service"])
        .iter()
        .filter_map(|e| e.get("MESSAGE").cloned())
        .collect()
}

fn logged(m: &systemd::UserManager, pid: u32, starts: &str) {
    m.wait_for_journal(&[&format!("_PID={pid}")], T, |e| {
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
fn under_systemd_the_unit_restarts_after_the_old_process_drained(manager: systemd::Manager) {
    let Some(m) = systemd::UserManager::boot_or_skip(manager, "takeback") else {
        return;
    };
    let addr = install_units(&m, &example("hello"), "--drain-timeout 20", &[]);
    let first = m.main_pid("hello.service");
    let mut held = half_sent_request(addr);
    assert_eq!(server::get(addr, "/").0, 200);
    m.systemctl_ok(&["reload", "hello.service"]);
    let new = m.main_pid("hello.service");
    assert!(new != 0 && new != first, "MainPID {new} after the reload");

    kill(Pid::from_raw(new as i32), Signal::SIGKILL).unwrap();
    m.wait_until("systemd to stop what is left of the unit", T, || {
        m.show("hello.service", "SubState") == "stop-sigterm"
    });
    logged(&m, first, "stop requested");
    assert!(
        systemd::pid_alive(first),
        "the old process drains on after the SIGTERM"
    );
    // Its in-flight request completes.
    held.write_all(b"\r\n").unwrap();
    let mut response = String::new();
    held.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let mut third = 0;
    m.wait_until("the unit to be restarted", T, || {
        third = m.main_pid("hello.service");
        third != 0 && third != new && m.show("hello.service", "ActiveState") == "active"
    });
    assert!(!systemd::pid_alive(first));
    assert_eq!(burst(addr, 50), (0, 50), "(refused, answered)");
    assert_eq!(m.show("hello.socket", "NRefused"), "0");
    logged(
        &m,
        first,
        "the new process exited while this one was draining",
    );
    logged(&m, first, "drained; exiting");
    let said = manager_says(&m);
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
fn under_systemd_a_stop_during_a_truthful_reload_leaves_the_unit_clean(manager: systemd::Manager) {
    let Some(m) = systemd::UserManager::boot_or_skip(manager, "stopreload") else {
        return;
    };
    let exe = m.scratch_dir().join("hello");
    server::deploy(&exe, &fs::read(example("hello")).unwrap(), 0o755);
    install_units(
        &m,
        &exe,
        "--upgrade-timeout 60",
        &[("00-test.conf", "[Service]\nEnvironment=RUST_LOG=info\n")],
    );
    let first = m.main_pid("hello.service");
    server::deploy(&exe, b"#!/bin/sh\nexec sleep 120\n", 0o755);
    std::thread::scope(|s| {
        let reload = s.spawn(|| m.systemctl(&["reload", "hello.service"]));
        logged(&m, first, "new process started");
        m.systemctl_ok(&["stop", "hello.service"]);
        let out = reload.join().unwrap();
        eprintln!(
            "systemctl reload: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let said = manager_says(&m);
    eprintln!("manager about hello.service:\n  {}", said.join("\n  "));
    assert_eq!(m.show("hello.service", "ActiveState"), "inactive");
    assert_eq!(m.show("hello.service", "Result"), "success", "{said:?}");
    m.wait_for_journal(&["SYSLOG_IDENTIFIER=handover-reload"], T, |e| {
        e.get("MESSAGE")
            .is_some_and(|m| m.contains("cancelled by stop"))
    });
    logged(&m, first, "upgrade cancelled: stopping");
    let old_said = m.journal(&["-o", "cat", &format!("_PID={first}")]);
    assert!(!old_said.contains("upgrade failed"), "{old_said}");
}

systemd::on_each_manager!(
    under_systemd_the_unit_restarts_after_the_old_process_drained,
    under_systemd_a_stop_during_a_truthful_reload_leaves_the_unit_clean,
);
