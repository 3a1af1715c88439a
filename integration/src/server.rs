//! Running the programs from tests: start one (directly, or through a launcher that execs it),
//! watch its log and its PID file, upgrade it, wait for its exit; replace its binary the way a
//! deploy does. Every wait is bounded; whatever the PID file names and the process started are
//! killed by pid when the [`Server`] is dropped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::pidfile::PidFile;
use crate::process::signal;
use crate::{wait_for, TIMEOUT};

/// A program that fails as a new version: says so on stderr and exits 3.
pub const BROKEN_BUILD: &[u8] = b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n";
/// A program that never becomes ready (and never exits by itself within a test).
pub const NEVER_READY: &[u8] = b"#!/bin/sh\nexec sleep 120\n";

/// A command running `program` the way every test runs one: logging at `info` to stderr, with
/// none of the service-manager variables the test itself may have (`NOTIFY_SOCKET`, `LISTEN_*`,
/// `WATCHDOG_*`, `JOURNAL_STREAM`, `INVOCATION_ID`), stdin and stdout on `/dev/null`, stderr
/// captured.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("RUST_LOG", "info");
    for var in [
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The lines a process wrote to a stream (its stderr), collected by a thread.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<Lines>, Condvar)>,
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    /// The stream has ended: every process that held it has exited.
    closed: bool,
}

impl Log {
    /// Collects the lines of `stream` into a new log. `HANDOVER_TEST_ECHO=1` echoes them.
    pub fn capture(stream: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let inner = log.inner.clone();
        std::thread::spawn(move || {
            let (lock, cv) = &*inner;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("HANDOVER_TEST_ECHO").is_some() {
                    eprintln!("  | {line}");
                }
                lock.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        log
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.inner.0.lock().unwrap().lines.join("\n")
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.inner.0.lock().unwrap().lines.len()
    }

    /// Whether nothing was logged yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits (at most `timeout`) until `done` holds for the lines so far.
    fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Lines) -> Option<T>,
    ) -> T {
        let end = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(v) = done(&lines) {
                return v;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what} within {timeout:?}; log:\n{}",
                lines.lines.join("\n")
            );
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits for a line after index `from` that contains every one of `needles`; returns its
    /// index and the line.
    pub fn wait_line(&self, from: usize, needles: &[&str], timeout: Duration) -> (usize, String) {
        self.wait(timeout, &format!("no log line with {needles:?}"), |l| {
            l.lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
                .map(|(i, l)| (i, l.clone()))
        })
    }

    /// Waits until the stream has ended (every process writing to it has exited).
    pub fn wait_closed(&self, timeout: Duration) {
        self.wait(timeout, "the log did not end", |l| l.closed.then_some(()));
    }
}

/// A program started by a test, with its PID file. Its stderr is collected into `log`. A test
/// that starts one becomes the reaper of its orphans
/// ([`crate::process::become_subreaper`]), so that it can wait for every old generation.
pub struct Server {
    /// The process started (the first generation, or the launcher that execs it).
    pub child: Child,
    /// What the processes wrote to stderr (every generation inherits it).
    pub log: Log,
    pid_file: PidFile,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `exe --pid-file <a temporary directory>/server.pid --addr 127.0.0.1:0 args...`
    /// (an example server, on a port of its own: [`Server::addr`]) with `envs` on top of
    /// [`command`]'s environment, and waits until it wrote its PID file.
    pub fn start(exe: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::start_with_pid_file(exe, None, args, envs)
    }

    /// Like [`Server::start`], with the PID file at `pid_file` when given.
    pub fn start_with_pid_file(
        exe: &Path,
        pid_file: Option<&Path>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = pid_file.map_or_else(|| dir.path().join("server.pid"), Path::to_owned);
        let mut cmd = command(exe);
        cmd.arg("--pid-file").arg(&pid_file);
        cmd.args(["--addr", "127.0.0.1:0"]).args(args);
        cmd.envs(envs.iter().copied());
        let server = Server::spawn_in(cmd, &pid_file, dir);
        server.wait_started();
        server
    }

    /// Runs `cmd` (from [`command`]: the program, or a launcher that execs it with the same
    /// pid), whose program writes its PID to `pid_file`, if given. Does not wait.
    pub fn spawn(cmd: Command, pid_file: Option<&Path>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = pid_file.map_or_else(|| dir.path().join("server.pid"), Path::to_owned);
        Server::spawn_in(cmd, &pid_file, dir)
    }

    fn spawn_in(mut cmd: Command, pid_file: &Path, dir: tempfile::TempDir) -> Server {
        // The test reaps the old generations, by hand orphans once their parent has exited.
        crate::process::become_subreaper();
        let pid_file = PidFile::watch(pid_file)
            .unwrap_or_else(|e| panic!("watch {}: {e}", pid_file.display()));
        cmd.stderr(Stdio::piped());
        // A binary the test has just written can be busy for a moment: a process another test
        // thread forks meanwhile holds the writer's fd until its exec closes it (ETXTBSY).
        let mut child = wait_for("the program to be executable", TIMEOUT, || {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
                r => Some(r.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))),
            }
        });
        let log = Log::capture(child.stderr.take().unwrap());
        Server {
            child,
            log,
            pid_file,
            _dir: dir,
        }
    }

    /// Waits until the PID file names the process started (a launcher's exec keeps its pid);
    /// returns that pid.
    pub fn wait_started(&self) -> u32 {
        let first = self.child.id();
        let pid = self.wait_pid("the PID file", |pid| pid);
        assert_eq!(pid, first, "the first process writes its own PID");
        pid
    }

    /// The PID in the PID file, if any.
    pub fn pid(&self) -> Option<u32> {
        self.pid_file.read()
    }

    /// The PID file's path.
    pub fn pid_file(&self) -> &Path {
        self.pid_file.path()
    }

    /// Calls `f` with the PID in the PID file, now and at each change, until it returns
    /// `Some` (at most [`TIMEOUT`]; then panics naming `what`).
    pub fn wait_pid<T>(&self, what: &str, f: impl FnMut(Option<u32>) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        self.pid_file.wait(deadline, f).unwrap_or_else(|| {
            panic!(
                "timed out after {TIMEOUT:?} waiting for {what}; log:\n{}",
                self.log.text()
            )
        })
    }

    /// The address the program logged as its listener (`listening ... addr=...`).
    pub fn addr(&self) -> SocketAddr {
        let (_, line) = self.log.wait_line(0, &["listening"], TIMEOUT);
        let at = line.find("addr=").expect("the listening line has addr=") + 5;
        line[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Sends SIGHUP to the PID in the PID file and waits until the file names another process.
    /// Returns (old, new).
    pub fn upgrade(&self) -> (u32, u32) {
        let old = self.pid().expect("a PID file");
        signal(old, Signal::SIGHUP);
        let new = self.wait_pid("a new PID in the PID file", |pid| pid.filter(|p| *p != old));
        (old, new)
    }

    /// [`Server::upgrade`], then waits for the old generation to exit, which must exit 0 (it
    /// must be this test's child: the first process, a later generation through
    /// `CLONE_PARENT`, or an orphan after [`crate::process::become_subreaper`]).
    #[track_caller]
    pub fn upgrade_and_reap(&mut self) -> (u32, u32) {
        let (old, new) = self.upgrade();
        let code = self.reap(old);
        assert_eq!(code, 0, "old process {old} exited with {code}");
        (old, new)
    }

    /// Waits (at most [`TIMEOUT`]) for the process started to exit; its exit code, 128 + N
    /// for signal N. Kills it and panics if it keeps running.
    pub fn exit_code(&mut self) -> i32 {
        let end = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                return status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(-1);
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                panic!(
                    "{} still runs after {TIMEOUT:?}; log:\n{}",
                    self.child.id(),
                    self.log.text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The exit code of generation `pid` once it has exited: the process started (through its
    /// handle) or a later one (by pid: this test's child, or its orphan after
    /// [`crate::process::become_subreaper`]).
    pub fn reap(&mut self, pid: u32) -> i32 {
        if pid == self.child.id() {
            self.exit_code()
        } else {
            crate::process::reap(pid, TIMEOUT)
        }
    }

    /// Waits for the process started to exit and for its log to end (every process that
    /// shared its stderr has exited too); its exit code ([`Server::exit_code`]) and its log.
    pub fn output(&mut self) -> (i32, String) {
        let code = self.exit_code();
        self.log.wait_closed(TIMEOUT);
        (code, self.log.text())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kill whatever generation serves now, then the first one, by pid.
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the crate's `handover-reload` (`program`) against the control socket `socket`, with a
/// 30 s timeout of its own; its output.
pub fn reload(program: &Path, socket: &Path) -> Output {
    Command::new(program)
        .arg("--socket")
        .arg(socket)
        .args(["--timeout", "30"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

/// Replaces the file at `path` the way a deploy does: write aside, then rename over it.
pub fn deploy(path: &Path, contents: &[u8], mode: u32) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).unwrap();
    std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A copy of a program's binary that a test may replace (a broken build, then the real one
/// again), as a deploy replaces a service's binary.
pub struct Deployed {
    path: PathBuf,
    original: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Deployed {
    /// A copy of `exe`, under its own name, in a fresh temporary directory.
    pub fn copy(exe: &Path) -> Deployed {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Deployed::copy_into(exe, dir.path());
        d._dir = Some(dir);
        d
    }

    /// A copy of `exe`, under its own name, in `dir` (a manager's scratch directory, where
    /// its services see it).
    pub fn copy_into(exe: &Path, dir: &Path) -> Deployed {
        let d = Deployed {
            path: dir.join(exe.file_name().expect("a program's file name")),
            original: exe.to_owned(),
            _dir: None,
        };
        d.restore();
        d
    }

    /// Where the copy is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory it is in.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap()
    }

    /// Deploys `contents` (with `mode`) in its place.
    pub fn replace(&self, contents: &[u8], mode: u32) {
        deploy(&self.path, contents, mode);
    }

    /// Deploys the real program again.
    pub fn restore(&self) {
        let real = std::fs::read(&self.original)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.original.display()));
        self.replace(&real, 0o755);
    }

    /// The real program's bytes.
    pub fn original(&self) -> Vec<u8> {
        std::fs::read(&self.original).unwrap()
    }
}
