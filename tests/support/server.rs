//! Running the example servers from tests: start, watch their logs and PID
//! file, signal and reap them by pid, inspect their fds. Every wait is
//! bounded; every process started is killed by pid when the guard drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The path of a built example (cargo builds examples before tests).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with cargo test",
        path.display()
    );
    path
}

/// Like [`example`], but refuses a binary older than the crate's sources or
/// the example's own: `cargo test --test NAME` rebuilds the library, the
/// binaries and that test, not the examples, so a test would silently run
/// a stale server (run `cargo build --examples`, or plain `cargo test`).
pub fn fresh_example(name: &str) -> PathBuf {
    fn newest(dir: &Path, found: &mut Option<(std::time::SystemTime, PathBuf)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                newest(&path, found);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                if found.as_ref().is_none_or(|(n, _)| t > *n) {
                    *found = Some((t, path));
                }
            }
        }
    }
    let path = example(name);
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = None;
    newest(&root.join("src"), &mut found);
    let source = root.join("examples").join(format!("{name}.rs"));
    if let Ok(t) = std::fs::metadata(&source).and_then(|m| m.modified()) {
        if found.as_ref().is_none_or(|(n, _)| t > *n) {
            found = Some((t, source));
        }
    }
    if let Some((t, newer)) = found {
        assert!(
            t <= built,
            "{} is older than {}: run `cargo build --examples` (`cargo test --test ...` does not rebuild examples)",
            path.display(),
            newer.display()
        );
    }
    path
}

/// Waits until `f` returns `Some`, polling every 5 ms, at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lines a process wrote to stderr, collected by a thread.
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Log {
    /// Collects the lines of `stream` (a child's stderr) into a new log.
    pub fn capture(stream: impl std::io::Read + Send + 'static) -> Log {
        let log = Log::default();
        log.collect(stream);
        log
    }

    fn collect(&self, stream: impl std::io::Read + Send + 'static) {
        let me = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("HANDOVER_TEST_ECHO").is_some() {
                    eprintln!("  | {line}");
                }
                let (lock, cv) = &*me.lines;
                lock.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// Waits for a line after index `from` that contains every one of
    /// `needles`; returns it and its index.
    pub fn wait_line(&self, from: usize, needles: &[&str], timeout: Duration) -> (usize, String) {
        let end = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some((i, l)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
            {
                return (i, l.clone());
            }
            let now = Instant::now();
            assert!(
                now < end,
                "no log line with {needles:?} within {timeout:?}; log:\n{}",
                lines.join("\n")
            );
            lines = cv.wait_timeout(lines, end - now).unwrap().0;
        }
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.lines.0.lock().unwrap().len()
    }
}

/// A server started by a test. Its stderr is collected into `log`.
pub struct Server {
    pub child: Child,
    pub log: Log,
    pub pid_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Starts `exe` with `--pid-file <tmp>/server.pid` and `args`, and waits
    /// until it wrote its PID file.
    pub fn start(exe: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("server.pid");
        let mut cmd = Command::new(exe);
        cmd.arg("--pid-file").arg(&pid_file).args(args);
        cmd.env("RUST_LOG", "info").env_remove("NOTIFY_SOCKET");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A binary the test has just written can be busy for a moment: a
        // process another test thread forks meanwhile holds the writer's fd
        // until its exec closes it (ETXTBSY).
        let mut child = wait_for(
            "the binary to be executable",
            Duration::from_secs(10),
            || match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
                r => Some(r.unwrap()),
            },
        );
        let log = Log::default();
        log.collect(child.stderr.take().unwrap());
        let server = Server {
            child,
            log,
            pid_file,
            dir,
        };
        let first = server.child.id();
        let pid = wait_for("the PID file", Duration::from_secs(20), || server.pid());
        assert_eq!(pid, first, "the first process writes its own PID");
        server
    }

    /// The PID in the PID file, if any.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The address the server logged as its listener.
    pub fn addr(&self) -> SocketAddr {
        let (_, line) = self
            .log
            .wait_line(0, &["listening"], Duration::from_secs(20));
        let at = line.find("addr=").expect("the listening line has addr=") + 5;
        line[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Sends SIGHUP to the PID in the PID file and waits until the file
    /// names another process. Returns (old, new).
    pub fn upgrade(&self, timeout: Duration) -> (u32, u32) {
        let old = self.pid().expect("a PID file");
        kill(Pid::from_raw(old as i32), Signal::SIGHUP).unwrap();
        let new = wait_for("a new PID in the PID file", timeout, || {
            self.pid().filter(|p| *p != old)
        });
        (old, new)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kill whatever generation serves now, then the first one, by pid.
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes this test process the reaper of orphaned descendants, so that each
/// old generation, once its parent exited, can be waited for by pid.
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

/// Waits (bounded) for the exit of `pid`, which must be our child by now
/// (directly or through the subreaper); returns its exit code.
pub fn reap(pid: u32, timeout: Duration) -> i32 {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    wait_for(&format!("process {pid} to exit"), timeout, || {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(128 + sig as i32),
            Ok(_) => None,
            Err(nix::errno::Errno::ECHILD) => {
                // Not reparented to us yet (its parent is still exiting).
                None
            }
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
    })
}

/// Whether `pid` exists (as anything but a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The zombie children of `pid`.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.first() == Some(&"Z") && rest.get(1) == Some(&pid.to_string().as_str()) {
            out.push(p);
        }
    }
    out
}

/// What each open fd of `pid` points at (`socket:[..]`, `pipe:[..]`, ...),
/// with the inode numbers dropped, sorted.
pub fn fd_kinds(pid: u32) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            target.split(':').next().unwrap_or("").to_owned()
        })
        .collect();
    kinds.sort();
    kinds
}

/// One `GET path` on a fresh connection (`Connection: close`); returns the
/// status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Replaces the file at `path` the way a deploy does (write aside, rename).
pub fn deploy(path: &Path, contents: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A free TCP port on 127.0.0.1 in 20000..32000, below the ephemeral range
/// (32768-60999 here), so no load client's own outgoing port collides with
/// it. Never hands out the same port twice in one test process.
pub fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = (nanos ^ (u64::from(std::process::id()) << 32)) | 1;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        let mut taken = TAKEN.lock().unwrap();
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}
