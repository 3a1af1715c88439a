//! The reload benchmark: how the release-built `hello` example behaves while
//! it is upgraded again and again under load, next to two baselines built
//! from the same binary, all measured in one run.
//!
//! ```text
//! cargo run --release --example reload_bench -- [--reloads N] [--clients C] [--interval-ms MS]
//!     [--mode keepalive|per-request|both] [--baselines plain,systemd|none]
//!     [--markdown docs/benchmarks.md]
//! ```
//!
//! Rows, per load mode:
//! - `handover SIGHUP`: `hello --pid-file` run by hand, `kill -HUP` its PID;
//! - `plain restart`: SIGTERM, wait for the exit, start a new `hello` on the
//!   same port (stop then start);
//! - `systemctl restart`: `hello.socket` + `hello.service` under a private
//!   systemd user manager (root only), `systemctl --user restart`: systemd
//!   keeps the socket, the process is replaced without a handoff;
//! - `handover systemctl reload`: the same units, `systemctl --user reload`
//!   (`ExecReload=/bin/kill -HUP $MAINPID`), i.e. the handoff under systemd.
//!
//! Definitions (DESIGN.md §7, extended): a reload window runs from the
//! trigger (signal sent, or `systemctl` started) until the old process has
//! exited, the new one is in the PID file and `systemctl` (if any) has
//! returned; everything else is steady state. A request belongs to a window
//! when its lifetime (connect or write until the response or error) overlaps
//! it. Handoff time: trigger until a new PID is in the PID file (written by
//! the new process once it is the serving one). `definitions()` has the
//! rest; the output repeats them.
//!
//! Root is needed for the systemd rows (a private user manager, see
//! `tests/support/systemd.rs`); without it they are skipped and the output
//! says why. `HANDOVER_BENCH_TRACE=1` prints, for the systemd rows, the last
//! reloads' timestamps next to the journal, and the fresh starts timed under
//! load.

#[path = "../tests/support/systemd.rs"]
mod systemd;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const USAGE: &str = "\
usage: reload_bench [--reloads N] [--clients C] [--interval-ms MS]
                    [--mode keepalive|per-request|both] [--baselines plain,systemd|none]
                    [--markdown FILE] [--warmup-ms MS] [--timeout-ms MS] [--starts N]
                    [--hello PATH]

  --reloads N        reloads per row (default 100)
  --clients C        concurrent load clients (default 8)
  --interval-ms MS   one reload every MS ms, trigger to trigger (default 100)
  --mode M           keepalive, per-request or both (default both)
  --baselines LIST   comma-separated: plain, systemd; or none (default plain,systemd)
  --markdown FILE    also write the results, the machine and the command to FILE
  --warmup-ms MS     steady load before the first reload and after the last (default 500)
  --timeout-ms MS    client connect/read/write timeout (default 5000)
  --starts N         fresh starts timed for exec-to-ready (default 21)
  --hello PATH       the server binary (default: hello next to this binary)

Run through `cargo run --release --example reload_bench`: it then builds the
release `hello` too (`cargo build --release --example hello`) before it
starts. Run directly, it uses the `hello` next to its own binary: build it
first with `cargo build --release --examples`.";

/// A client pauses this long after a failed request (a server that is gone
/// must not turn the client into a busy loop), as the test load client does.
const BACKOFF: Duration = Duration::from_millis(10);
/// Bound on one reload (trigger to old process gone and new one ready).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fresh server idles before its RSS is read.
const SETTLE: Duration = Duration::from_millis(300);
/// Reloads timed without load, for reference.
const UNLOADED_RELOADS: usize = 21;
/// After the reloads, with the load still running: fresh starts timed (in a
/// `handover SIGHUP` row) and `systemctl` queries timed (in systemd rows).
const PROBES: usize = 11;
/// Targets from the issue.
const TARGET_RELOADS: usize = 100;
const TARGET_CLIENTS: usize = 8;
const TARGET_HANDOFF_RATIO: f64 = 1.5;
const TARGET_P99_RATIO: f64 = 2.0;
const TARGET_DRAIN: Duration = Duration::from_millis(100);
const TARGET_IDLE_RSS_KB: u64 = 3 * 1024;

// ---------------------------------------------------------------------------------------------
// arguments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    KeepAlive,
    PerRequest,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::PerRequest => "new connection per request",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Sighup,
    Plain,
    SystemdRestart,
    SystemdReload,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Sighup => "handover SIGHUP",
            Variant::Plain => "plain restart",
            Variant::SystemdRestart => "systemctl restart",
            Variant::SystemdReload => "handover systemctl reload",
        }
    }

    fn is_handover(self) -> bool {
        matches!(self, Variant::Sighup | Variant::SystemdReload)
    }
}

#[derive(Debug, Clone)]
struct Args {
    reloads: usize,
    clients: usize,
    interval: Duration,
    modes: Vec<Mode>,
    plain: bool,
    systemd: bool,
    markdown: Option<PathBuf>,
    warmup: Duration,
    timeout: Duration,
    starts: usize,
    hello: Option<PathBuf>,
    raw: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        reloads: 100,
        clients: 8,
        interval: Duration::from_millis(100),
        modes: vec![Mode::KeepAlive, Mode::PerRequest],
        plain: true,
        systemd: true,
        markdown: None,
        warmup: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
        starts: 21,
        hello: None,
        raw: raw.clone(),
    };
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
        };
        match flag.as_str() {
            "--reloads" => a.reloads = num(value()?)? as usize,
            "--clients" => a.clients = (num(value()?)? as usize).max(1),
            "--interval-ms" => a.interval = Duration::from_millis(num(value()?)?),
            "--warmup-ms" => a.warmup = Duration::from_millis(num(value()?)?),
            "--timeout-ms" => a.timeout = Duration::from_millis(num(value()?)?.max(1)),
            "--starts" => a.starts = (num(value()?)? as usize).max(1),
            "--mode" => {
                a.modes = match value()?.as_str() {
                    "keepalive" | "keep-alive" => vec![Mode::KeepAlive],
                    "per-request" => vec![Mode::PerRequest],
                    "both" => vec![Mode::KeepAlive, Mode::PerRequest],
                    other => return Err(format!("--mode: unknown mode {other:?}")),
                }
            }
            "--baselines" => {
                a.plain = false;
                a.systemd = false;
                for b in value()?.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                    match b {
                        "plain" => a.plain = true,
                        "systemd" => a.systemd = true,
                        "none" => {}
                        other => return Err(format!("--baselines: unknown baseline {other:?}")),
                    }
                }
            }
            "--markdown" => a.markdown = Some(value()?.into()),
            "--hello" => a.hello = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C: stop cleanly, so every process started is killed

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// processes: pidfds, a registry killed on exit, reaping

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative return is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_kill(fd: &OwnedFd, sig: Signal) {
    // SAFETY: plain syscall on an fd we own.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// Waits for any of `fds` to be readable, at most `timeout`.
fn poll_in(fds: &[RawFd], timeout: Duration) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `p` is a valid array of `p.len()` pollfds.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
}

/// Whether the process behind `fd` has exited (a zombie counts as exited).
fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLIN != 0 }
}

/// A server process we know of: killed by pidfd when the benchmark ends.
#[derive(Clone)]
struct Proc {
    pid: u32,
    fd: Arc<OwnedFd>,
    /// Ours to reap (standalone generations, through the subreaper).
    reap: bool,
}

static TRACKED: Mutex<Vec<Proc>> = Mutex::new(Vec::new());

impl Proc {
    fn track(pid: u32, reap: bool) -> Result<Proc, String> {
        let fd = pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
        let p = Proc {
            pid,
            fd: Arc::new(fd),
            reap,
        };
        let mut t = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|q| !exited(&q.fd));
        t.push(p.clone());
        Ok(p)
    }

    fn exited(&self) -> bool {
        exited(&self.fd)
    }

    /// Reaps it if it is ours (once it exited), bounded.
    fn reap(&self) {
        if !self.reap {
            return;
        }
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => {}
                Ok(_) | Err(_) => return,
            }
            if Instant::now() >= end {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, wait (bounded), SIGKILL, reap.
    fn stop(&self, grace: Duration) {
        pidfd_kill(&self.fd, Signal::SIGTERM);
        let end = Instant::now() + grace;
        while !self.exited() && Instant::now() < end {
            poll_in(&[self.fd.as_raw_fd()], Duration::from_millis(50));
        }
        if !self.exited() {
            pidfd_kill(&self.fd, Signal::SIGKILL);
            poll_in(&[self.fd.as_raw_fd()], Duration::from_secs(1));
        }
        self.reap();
    }
}

/// Kills (SIGKILL, by pidfd) and reaps every server process still running
/// when the benchmark ends, also on a panic.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let procs = std::mem::take(&mut *TRACKED.lock().unwrap_or_else(|e| e.into_inner()));
        for p in &procs {
            if !p.exited() {
                pidfd_kill(&p.fd, Signal::SIGKILL);
            }
        }
        for p in &procs {
            poll_in(&[p.fd.as_raw_fd()], Duration::from_secs(1));
            p.reap();
        }
    }
}

/// `VmRSS` and `VmHWM` of `pid`, in kB.
fn mem_kb(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------------------------------------
// the PID file, watched with inotify

struct PidWatch {
    path: PathBuf,
    ino: OwnedFd,
}

impl PidWatch {
    fn new(path: &Path) -> Result<PidWatch, String> {
        let dir = path.parent().ok_or("the PID file has no directory")?;
        // SAFETY: plain syscall; a non-negative return is a new fd we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(format!("inotify_init1: {}", io::Error::last_os_error()));
        }
        // SAFETY: see above.
        let ino = unsafe { OwnedFd::from_raw_fd(fd) };
        let cdir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| "a NUL in the state directory")?;
        let mask = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_CREATE | libc::IN_DELETE;
        // SAFETY: valid fd and C string.
        if unsafe { libc::inotify_add_watch(ino.as_raw_fd(), cdir.as_ptr(), mask) } < 0 {
            return Err(format!(
                "inotify_add_watch {}: {}",
                dir.display(),
                io::Error::last_os_error()
            ));
        }
        Ok(PidWatch {
            path: path.to_owned(),
            ino,
        })
    }

    fn read(&self) -> Option<u32> {
        std::fs::read_to_string(&self.path)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn drain_events(&self) {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer we own; the fd is non-blocking.
        while unsafe { libc::read(self.ino.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// Waits until the file names a PID other than `not`; returns it and when
    /// it was seen.
    fn wait_other(&self, not: Option<u32>, deadline: Instant) -> Result<(u32, Instant), String> {
        loop {
            if let Some(p) = self.read().filter(|p| Some(*p) != not) {
                return Ok((p, Instant::now()));
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "no new PID in {} in time (still {:?})",
                    self.path.display(),
                    self.read()
                ));
            }
            poll_in(&[self.ino.as_raw_fd()], Duration::from_millis(5));
            self.drain_events();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the load: std threads, raw HTTP/1.1, one time-stamped record per request

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    Refused,
    Reset,
    Closed,
    Timeout,
    Status,
    Other,
}

const FAILURES: [Outcome; 6] = [
    Outcome::Refused,
    Outcome::Reset,
    Outcome::Closed,
    Outcome::Timeout,
    Outcome::Status,
    Outcome::Other,
];

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Closed => "closed",
            Outcome::Timeout => "timeout",
            Outcome::Status => "non-2xx",
            Outcome::Other => "other",
        }
    }
}

/// One request: nanoseconds since the load started.
#[derive(Debug, Clone, Copy)]
struct Rec {
    start: u64,
    end: u64,
    outcome: Outcome,
    /// The response carried `Connection: close`.
    close: bool,
    /// The request opened a new connection first.
    connected: bool,
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<Rec>>>,
}

struct ClientCfg {
    addr: SocketAddr,
    mode: Mode,
    timeout: Duration,
    t0: Instant,
}

impl Load {
    fn start(addr: SocketAddr, mode: Mode, clients: usize, timeout: Duration, t0: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|i| {
                let stop = stop.clone();
                let cfg = ClientCfg {
                    addr,
                    mode,
                    timeout,
                    t0,
                };
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || client(&cfg, &stop))
                    .expect("spawn a load thread")
            })
            .collect();
        Load { stop, threads }
    }

    fn stop(mut self) -> Vec<Rec> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for t in self.threads.drain(..) {
            if let Ok(recs) = t.join() {
                all.extend(recs);
            }
        }
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn client(cfg: &ClientCfg, stop: &AtomicBool) -> Vec<Rec> {
    let mut recs = Vec::with_capacity(1 << 16);
    let mut conn: Option<BufReader<TcpStream>> = None;
    let ns = |t: Instant| t.duration_since(cfg.t0).as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let connected = conn.is_none();
        let result = exchange(cfg, &mut conn);
        let end = Instant::now();
        let (outcome, close) = match result {
            Ok(close) => (Outcome::Ok, close),
            Err(o) => (o, false),
        };
        recs.push(Rec {
            start: ns(start),
            end: ns(end),
            outcome,
            close,
            connected,
        });
        if outcome != Outcome::Ok {
            conn = None;
            thread::sleep(BACKOFF);
        }
    }
    recs
}

fn io_outcome(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Outcome::Reset,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Outcome::Timeout,
        io::ErrorKind::UnexpectedEof => Outcome::Closed,
        _ => Outcome::Other,
    }
}

/// One request, connecting first if needed. Ok(true) when the response
/// carried `Connection: close`.
fn exchange(cfg: &ClientCfg, conn: &mut Option<BufReader<TcpStream>>) -> Result<bool, Outcome> {
    let c = match conn {
        Some(c) => c,
        None => {
            let s =
                TcpStream::connect_timeout(&cfg.addr, cfg.timeout).map_err(|e| io_outcome(&e))?;
            s.set_nodelay(true)
                .and_then(|()| s.set_read_timeout(Some(cfg.timeout)))
                .and_then(|()| s.set_write_timeout(Some(cfg.timeout)))
                .map_err(|e| io_outcome(&e))?;
            conn.insert(BufReader::new(s))
        }
    };
    let request: &[u8] = match cfg.mode {
        Mode::KeepAlive => b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n",
        Mode::PerRequest => b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
    };
    c.get_mut().write_all(request).map_err(|e| io_outcome(&e))?;
    let (status, close) = read_response(c)?;
    if cfg.mode == Mode::PerRequest {
        // The server closes after the response; wait for its FIN so that the
        // TIME_WAIT stays on the server's side.
        let mut rest = [0u8; 64];
        match c.read(&mut rest) {
            Ok(0) => {}
            Ok(_) => return Err(Outcome::Other),
            Err(e) => return Err(io_outcome(&e)),
        }
        *conn = None;
    } else if close {
        *conn = None;
    }
    if !(200..300).contains(&status) {
        return Err(Outcome::Status);
    }
    Ok(close)
}

/// Reads a response with a `Content-Length` body (what hello sends); returns
/// the status and whether it carried `Connection: close`.
fn read_response(r: &mut BufReader<TcpStream>) -> Result<(u16, bool), Outcome> {
    let mut line = String::new();
    let n = r.read_line(&mut line).map_err(|e| io_outcome(&e))?;
    if n == 0 {
        return Err(Outcome::Closed);
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(Outcome::Other)?;
    let mut length = None;
    let mut close = false;
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| io_outcome(&e))?;
        if n == 0 {
            return Err(Outcome::Closed);
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<u64>().map_err(|_| Outcome::Other)?);
            } else if name.eq_ignore_ascii_case("connection") {
                close |= value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"));
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(len) => {
            let got = Read::take(&mut *r, len)
                .read_to_end(&mut body)
                .map_err(|e| io_outcome(&e))?;
            if (got as u64) < len {
                return Err(Outcome::Closed);
            }
        }
        None => {
            close = true;
            r.read_to_end(&mut body).map_err(|e| io_outcome(&e))?;
        }
    }
    Ok((status, close))
}

// ---------------------------------------------------------------------------------------------
// servers

/// What one reload looked like.
#[derive(Debug, Clone, Copy)]
struct Reload {
    trigger: Instant,
    /// The new PID appeared in the PID file.
    ready: Instant,
    /// The old process exited.
    gone: Instant,
    /// The reload command (`systemctl`) returned.
    cmd_done: Option<Instant>,
    /// When the old process started draining: the new PID in the PID file
    /// for a handoff (it stops accepting right then), the trigger for a
    /// stop/restart.
    drain_from: Instant,
    /// VmHWM of the old process (last read before it exited) and of the new
    /// one at the end of the window, kB.
    old_hwm: u64,
    new_hwm: u64,
    /// The new process ran alongside the old one (a handoff, not a restart).
    handoff: bool,
}

impl Reload {
    fn end(&self) -> Instant {
        self.ready
            .max(self.gone)
            .max(self.cmd_done.unwrap_or(self.gone))
    }
    fn peak_kb(&self) -> u64 {
        if self.handoff {
            self.old_hwm + self.new_hwm
        } else {
            self.old_hwm.max(self.new_hwm)
        }
    }
}

trait Server {
    fn addr(&self) -> SocketAddr;
    fn current(&self) -> &Proc;
    fn reload(&mut self) -> Result<Reload, String>;
    fn stop(&mut self);
    fn diagnostics(&self) -> String;
    /// Runs one `systemctl` query (systemd rows only), to time the client.
    fn systemctl_probe(&self) -> Option<Result<(), String>> {
        None
    }
}

struct Observed {
    new: u32,
    ready: Instant,
    gone: Instant,
    cmd_done: Option<Instant>,
}

/// Waits for the old process to exit, for another PID in the PID file and,
/// if given, for the reload command to finish (failing early if it fails);
/// samples the old process's VmHWM meanwhile.
fn observe(
    pw: &PidWatch,
    old: &Proc,
    mut cmd: Option<(&mut Child, &str)>,
    old_hwm: &mut u64,
) -> Result<Observed, String> {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    let cmd_fd = match &cmd {
        Some((c, _)) => Some(pidfd_open(c.id()).map_err(|e| format!("pidfd_open: {e}"))?),
        None => None,
    };
    let (mut ready, mut gone, mut cmd_done) = (None, None, None);
    loop {
        let now = Instant::now();
        if ready.is_none() {
            if let Some(p) = pw.read().filter(|p| *p != old.pid) {
                ready = Some((p, now));
            }
        }
        if gone.is_none() {
            if old.exited() {
                gone = Some(now);
            } else if let Some((_, hwm)) = mem_kb(old.pid) {
                *old_hwm = (*old_hwm).max(hwm);
            }
        }
        if let (Some((c, verb)), Some(fd), None) = (&mut cmd, &cmd_fd, cmd_done) {
            if exited(fd) {
                cmd_done = Some(now);
                let status = c.wait().map_err(|e| format!("systemctl {verb}: {e}"))?;
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    return Err(format!("systemctl {verb}: {status}: {}", err.trim()));
                }
            }
        }
        if let (Some((new, ready)), Some(gone)) = (ready, gone) {
            if cmd.is_none() || cmd_done.is_some() {
                return Ok(Observed {
                    new,
                    ready,
                    gone,
                    cmd_done,
                });
            }
        }
        check_interrupted()?;
        if now >= deadline {
            return Err(format!(
                "reload not done after {RELOAD_TIMEOUT:?}: old {} {}, PID file says {:?}, command {}",
                old.pid,
                if gone.is_some() {
                    "exited"
                } else {
                    "still running"
                },
                pw.read(),
                if cmd_done.is_some() { "done" } else { "running" },
            ));
        }
        let mut fds = vec![pw.ino.as_raw_fd(), old.fd.as_raw_fd()];
        fds.extend(cmd_fd.as_ref().map(|f| f.as_raw_fd()));
        poll_in(&fds, Duration::from_millis(1));
        pw.drain_events();
    }
}

fn hwm(pid: u32) -> u64 {
    mem_kb(pid).map(|(_, h)| h).unwrap_or(0)
}

/// `hello` run by hand, with a PID file: upgraded by SIGHUP, or stopped and
/// started again (plain restart).
struct Standalone {
    hello: PathBuf,
    addr: SocketAddr,
    pw: PidWatch,
    log: PathBuf,
    cur: Proc,
    plain: bool,
}

fn spawn_hello(
    hello: &Path,
    addr: SocketAddr,
    pid_file: &Path,
    log: &Path,
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    Command::new(hello)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--pid-file")
        .arg(pid_file)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("JOURNAL_STREAM")
        .env_remove("INVOCATION_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", hello.display()))
}

impl Standalone {
    fn start(
        hello: &Path,
        addr: SocketAddr,
        dir: &Path,
        tag: &str,
        plain: bool,
    ) -> Result<Standalone, String> {
        let pid_file = dir.join(format!("{tag}.pid"));
        let log = dir.join(format!("{tag}.log"));
        let pw = PidWatch::new(&pid_file)?;
        let child = spawn_hello(hello, addr, &pid_file, &log)?;
        let cur = Proc::track(child.id(), true)?;
        let (pid, _) = pw.wait_other(None, Instant::now() + Duration::from_secs(20))?;
        if pid != cur.pid {
            return Err(format!("the PID file says {pid}, started {}", cur.pid));
        }
        Ok(Standalone {
            hello: hello.to_owned(),
            addr,
            pw,
            log,
            cur,
            plain,
        })
    }
}

impl Server for Standalone {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn current(&self) -> &Proc {
        &self.cur
    }

    fn reload(&mut self) -> Result<Reload, String> {
        let old = self.cur.clone();
        let mut old_hwm = hwm(old.pid);
        let trigger = Instant::now();
        if !self.plain {
            kill(Pid::from_raw(old.pid as i32), Signal::SIGHUP)
                .map_err(|e| format!("SIGHUP {}: {e}", old.pid))?;
            let Observed {
                new, ready, gone, ..
            } = observe(&self.pw, &old, None, &mut old_hwm)?;
            old.reap();
            self.cur = Proc::track(new, true)?;
            return Ok(Reload {
                trigger,
                ready,
                gone,
                drain_from: ready,
                cmd_done: None,
                old_hwm,
                new_hwm: hwm(new),
                handoff: true,
            });
        }
        kill(Pid::from_raw(old.pid as i32), Signal::SIGTERM)
            .map_err(|e| format!("SIGTERM {}: {e}", old.pid))?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while !old.exited() {
            if let Some((_, h)) = mem_kb(old.pid) {
                old_hwm = old_hwm.max(h);
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not stop within {RELOAD_TIMEOUT:?}",
                    old.pid
                ));
            }
            poll_in(&[old.fd.as_raw_fd()], Duration::from_millis(1));
        }
        let gone = Instant::now();
        old.reap();
        let child = spawn_hello(&self.hello, self.addr, &self.pw.path, &self.log)?;
        self.cur = Proc::track(child.id(), true)?;
        let (pid, ready) = self
            .pw
            .wait_other(Some(old.pid), Instant::now() + RELOAD_TIMEOUT)?;
        if pid != self.cur.pid {
            return Err(format!("the PID file says {pid}, started {}", self.cur.pid));
        }
        Ok(Reload {
            trigger,
            ready,
            gone,
            drain_from: trigger,
            cmd_done: None,
            old_hwm,
            new_hwm: hwm(pid),
            handoff: false,
        })
    }

    fn stop(&mut self) {
        self.cur.stop(Duration::from_secs(5));
    }

    fn diagnostics(&self) -> String {
        tail_file(&self.log, 3000)
    }
}

fn tail_file(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let mut at = s.len().saturating_sub(max);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    format!("{}:\n{}", path.display(), &s[at..])
}

/// `hello.socket` + `hello.service` under a private systemd user manager.
struct Systemd {
    m: systemd::UserManager,
    addr: SocketAddr,
    pw: PidWatch,
}

/// `t` on the journal's clock (CLOCK_MONOTONIC, µs).
fn mono_us(t: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (i0, m0) = *BASE.get_or_init(|| {
        let now = Instant::now();
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        (now, ts)
    });
    if t >= i0 {
        m0 + (t - i0).as_micros() as u64
    } else {
        m0.saturating_sub((i0 - t).as_micros() as u64)
    }
}

impl Systemd {
    /// With `HANDOVER_BENCH_TRACE` set: the last reloads' timestamps next to
    /// the journal (reception time), to see where a systemd reload spends
    /// its time.
    fn trace(&self, reloads: &[Reload]) {
        let last = &reloads[reloads.len().saturating_sub(3)..];
        let Some(first) = last.first() else { return };
        let from = mono_us(first.trigger);
        let mut lines: Vec<(u64, String)> = Vec::new();
        for (i, r) in last.iter().enumerate() {
            lines.push((mono_us(r.trigger), format!("bench: reload {i} trigger")));
            lines.push((
                mono_us(r.ready),
                format!("bench: reload {i} new PID in the PID file"),
            ));
            lines.push((
                mono_us(r.gone),
                format!("bench: reload {i} old process gone"),
            ));
            if let Some(c) = r.cmd_done {
                lines.push((mono_us(c), format!("bench: reload {i} systemctl returned")));
            }
        }
        for e in self.m.journal_entries(&[]) {
            let Some(t) = e
                .get("__MONOTONIC_TIMESTAMP")
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if t + 1000 >= from {
                lines.push((
                    t,
                    format!(
                        "journal: [{}] {}",
                        e.get("_PID").map(String::as_str).unwrap_or("-"),
                        e.get("MESSAGE").map(String::as_str).unwrap_or("")
                    ),
                ));
            }
        }
        lines.sort_by_key(|l| l.0);
        for (t, l) in lines {
            eprintln!("  {:>10.3} ms  {l}", (t as f64 - from as f64) / 1000.0);
        }
    }
}

/// One row's view of the systemd service.
struct SystemdServer<'a> {
    sd: &'a Systemd,
    cur: Proc,
    restart: bool,
}

impl Systemd {
    fn boot(hello: &Path, addr: SocketAddr, dir: &Path) -> Result<Systemd, String> {
        let m = systemd::UserManager::boot(systemd::Manager::Host, "bench")?;
        let pid_file = dir.join("systemd-hello.pid");
        let pw = PidWatch::new(&pid_file)?;
        m.install_unit(
            "hello.socket",
            &format!(
                "[Unit]\nDescription=hello (benchmark socket)\n\n[Socket]\nListenStream={addr}\n\
                 FileDescriptorName=http\nAccept=no\n"
            ),
        );
        m.install_unit(
            "hello.service",
            &format!(
                "[Unit]\nDescription=hello (benchmark)\nRequires=hello.socket\nAfter=hello.socket\n\
                 StartLimitIntervalSec=0\n\n\
                 [Service]\nType=notify\nNotifyAccess=main\n\
                 ExecStart={} --addr {addr} --pid-file {}\n\
                 ExecReload=/bin/kill -HUP $MAINPID\nTimeoutStartSec=90\n\
                 KillMode=control-group\nTimeoutStopSec=45\n",
                hello.display(),
                pid_file.display()
            ),
        );
        m.daemon_reload();
        let out = m.systemctl(&["start", "hello.socket"]);
        if !out.status.success() {
            return Err(format!(
                "systemctl start hello.socket: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Systemd { m, addr, pw })
    }

    fn systemctl(&self, verb: &str) -> Result<Child, String> {
        Command::new("systemctl")
            .args([
                "--user",
                "--no-pager",
                "--no-ask-password",
                verb,
                "hello.service",
            ])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("XDG_RUNTIME_DIR", self.m.runtime_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn systemctl {verb}: {e}"))
    }

    /// (Re)starts the service fresh for a row, waits until it is ready.
    fn fresh(&self, restart: bool) -> Result<SystemdServer<'_>, String> {
        let before = self.pw.read();
        let child = self.systemctl("restart")?;
        finish_systemctl(child, "restart")?;
        let (pid, _) = self
            .pw
            .wait_other(before, Instant::now() + Duration::from_secs(20))?;
        let main = self.m.main_pid("hello.service");
        if main != pid {
            return Err(format!("MainPID {main}, PID file {pid}"));
        }
        Ok(SystemdServer {
            sd: self,
            cur: Proc::track(pid, false)?,
            restart,
        })
    }
}

fn finish_systemctl(mut child: Child, verb: &str) -> Result<(), String> {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("systemctl {verb}: {status}: {}", err.trim()));
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("systemctl {verb} did not finish in time"));
            }
            Err(e) => return Err(format!("systemctl {verb}: {e}")),
        }
    }
}

impl Server for SystemdServer<'_> {
    fn systemctl_probe(&self) -> Option<Result<(), String>> {
        let out = self
            .sd
            .m
            .systemctl(&["show", "-p", "MainPID", "--value", "hello.service"]);
        Some(if out.status.success() {
            Ok(())
        } else {
            Err(format!("systemctl show: {}", out.status))
        })
    }

    fn addr(&self) -> SocketAddr {
        self.sd.addr
    }

    fn current(&self) -> &Proc {
        &self.cur
    }

    fn reload(&mut self) -> Result<Reload, String> {
        let old = self.cur.clone();
        let mut old_hwm = hwm(old.pid);
        let verb = if self.restart { "restart" } else { "reload" };
        let trigger = Instant::now();
        let mut child = self.sd.systemctl(verb)?;
        let o = observe(&self.sd.pw, &old, Some((&mut child, verb)), &mut old_hwm);
        if o.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let Observed {
            new,
            ready,
            gone,
            cmd_done,
        } = o?;
        let new_hwm = hwm(new);
        self.cur = Proc::track(new, false)?;
        Ok(Reload {
            trigger,
            ready,
            gone,
            cmd_done,
            drain_from: if self.restart { trigger } else { ready },
            old_hwm,
            new_hwm,
            handoff: !self.restart,
        })
    }

    fn stop(&mut self) {
        // The service stays up between rows; each row restarts it fresh.
    }

    fn diagnostics(&self) -> String {
        let out = self
            .sd
            .m
            .systemctl(&["status", "hello.service", "hello.socket"]);
        let entries = self.sd.m.unit_journal("hello.service");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        for e in entries.iter().rev().take(30).rev() {
            let _ = writeln!(
                s,
                "{} {}",
                e.get("_PID").map(String::as_str).unwrap_or("-"),
                e.get("MESSAGE").map(String::as_str).unwrap_or("")
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// ports, machine

/// A free port below the ephemeral range, so that a load client's own
/// outgoing connections never take it while a plain restart has it unbound.
fn free_port() -> Result<u16, String> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = u64::from(std::process::id()) ^ u64::from(nanos);
    for i in 0..span as u64 {
        let port = 10_000 + ((seed.wrapping_mul(7919) + i * 7) % span as u64) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port below the ephemeral range".into())
}

fn cmd_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let nproc = thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let mut commit = cmd_line("git", &["rev-parse", "--short", "HEAD"]);
    if dirty && commit != "unknown" {
        commit.push_str(" (with uncommitted changes)");
    }
    vec![
        ("kernel (uname -r)".into(), kernel),
        ("CPUs (nproc)".into(), nproc),
        ("CPU model".into(), cpu),
        ("memory".into(), mem),
        ("rustc".into(), cmd_line("rustc", &["--version"])),
        ("systemd".into(), cmd_line("systemctl", &["--version"])),
        ("commit".into(), commit),
        (
            "date (UTC)".into(),
            cmd_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// one row: a server, a load, N reloads

/// Something timed under load; requests overlapping `from..done` are left
/// out of the latency figures.
struct Probe {
    systemctl: bool,
    from: Instant,
    to: Instant,
    done: Instant,
}

struct RowData {
    variant: Variant,
    recs: Vec<Rec>,
    reloads: Vec<Reload>,
    t0: Instant,
    idle_rss_kb: u64,
    overruns: usize,
    elapsed: Duration,
    /// Things timed while the load ran, after the reloads.
    probes: Vec<Probe>,
}

/// Where the benchmark runs things.
struct Ctx<'a> {
    hello: &'a Path,
    dir: &'a Path,
    args: &'a Args,
}

/// Starts `hello` fresh (nothing else to hand over), times spawn → its PID
/// in the PID file, optionally reads its RSS once settled, and stops it.
struct Started {
    spawn: Instant,
    ready: Instant,
    /// (VmRSS, VmHWM) in kB once settled, when asked for.
    mem: Option<(u64, u64)>,
    /// Its RssAnon and RssFile then.
    split: String,
}

fn time_start(ctx: &Ctx<'_>, tag: &str, rss: bool) -> Result<Started, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let pid_file = ctx.dir.join(format!("{tag}.pid"));
    let pw = PidWatch::new(&pid_file)?;
    let t = Instant::now();
    let child = spawn_hello(ctx.hello, addr, &pid_file, &ctx.dir.join("starts.log"))?;
    let p = Proc::track(child.id(), true)?;
    let waited = pw.wait_other(None, Instant::now() + Duration::from_secs(20));
    let (mut mem, mut split) = (None, String::new());
    if rss && waited.is_ok() {
        thread::sleep(SETTLE);
        mem = mem_kb(p.pid);
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap_or_default();
        split = status
            .lines()
            .filter(|l| l.starts_with("RssAnon:") || l.starts_with("RssFile:"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(", ");
    }
    p.stop(Duration::from_secs(5));
    let (pid, at) = waited?;
    if pid != p.pid {
        return Err(format!("the PID file says {pid}, started {}", p.pid));
    }
    Ok(Started {
        spawn: t,
        ready: at,
        mem,
        split,
    })
}

fn run_row(
    server: &mut dyn Server,
    variant: Variant,
    mode: Mode,
    ctx: &Ctx<'_>,
) -> Result<RowData, String> {
    let args = ctx.args;
    thread::sleep(SETTLE);
    let idle_rss_kb = mem_kb(server.current().pid).map(|(r, _)| r).unwrap_or(0);
    let t0 = Instant::now();
    let load = Load::start(server.addr(), mode, args.clients, args.timeout, t0);
    let result = (|| {
        thread::sleep(args.warmup);
        let mut reloads = Vec::with_capacity(args.reloads);
        let mut overruns = 0;
        let mut next = Instant::now();
        for _ in 0..args.reloads {
            check_interrupted()?;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            let r = server.reload()?;
            next = r.trigger + args.interval;
            if r.end() > next {
                overruns += 1;
                next = r.end();
            }
            reloads.push(r);
        }
        thread::sleep(args.warmup.max(args.interval));
        // The same cold start as `exec → ready` on its own, but under this
        // load: what the handoff competes with for CPU.
        let mut probes = Vec::new();
        if variant == Variant::Sighup {
            for i in 0..PROBES {
                check_interrupted()?;
                let st = time_start(ctx, &format!("loaded-start-{i}"), false)?;
                let done = Instant::now();
                if std::env::var_os("HANDOVER_BENCH_TRACE").is_some() {
                    eprintln!(
                        "  fresh start under load: exec → ready {}, ready → stopped {}",
                        dur(st.ready - st.spawn),
                        dur(done - st.ready)
                    );
                }
                probes.push(Probe {
                    systemctl: false,
                    from: st.spawn,
                    to: st.ready,
                    done,
                });
                thread::sleep(args.interval);
            }
        }
        // How long the `systemctl` client alone takes under this load.
        for _ in 0..PROBES {
            check_interrupted()?;
            let from = Instant::now();
            match server.systemctl_probe() {
                None => break,
                Some(r) => r?,
            }
            let to = Instant::now();
            probes.push(Probe {
                systemctl: true,
                from,
                to,
                done: to,
            });
            thread::sleep(args.interval);
        }
        Ok::<_, String>((reloads, overruns, probes))
    })();
    let recs = load.stop();
    let elapsed = t0.elapsed();
    match result {
        Ok((reloads, overruns, probes)) => Ok(RowData {
            variant,
            recs,
            reloads,
            t0,
            idle_rss_kb,
            overruns,
            elapsed,
            probes,
        }),
        Err(e) => Err(format!("{e}\n{}", server.diagnostics())),
    }
}

// ---------------------------------------------------------------------------------------------
// statistics

#[derive(Debug, Clone, Copy, Default)]
struct Lat {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn lat(mut v: Vec<u64>) -> Lat {
    if v.is_empty() {
        return Lat::default();
    }
    v.sort_unstable();
    let rank = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Duration::from_nanos(v[i])
    };
    Lat {
        n: v.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: Duration::from_nanos(*v.last().unwrap()),
    }
}

fn median_max(v: &[Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    Some((s[(s.len() - 1) / 2], *s.last().unwrap()))
}

struct Row {
    variant: Variant,
    reloads: usize,
    requests: u64,
    failed: BTreeMap<Outcome, u64>,
    win_requests: u64,
    win_failed: BTreeMap<Outcome, u64>,
    steady: Lat,
    window: Lat,
    /// Keep-alive windows: requests on an open connection, and requests
    /// that opened one (after a `Connection: close`).
    win_reused: Lat,
    win_connected: Lat,
    /// Requests overlapping a fresh start of another hello (the control).
    probe: Lat,
    /// Window requests started before / after the new PID was in the PID
    /// file.
    win_before: Lat,
    win_after: Lat,
    handoff: Vec<Duration>,
    windows: Vec<Duration>,
    drain: Vec<Duration>,
    /// Keep-alive only: last `Connection: close` response → old process gone.
    drain_last: Vec<Duration>,
    idle_rss_kb: u64,
    peak_rss_kb: u64,
    overruns: usize,
    elapsed: Duration,
    loaded_starts: Vec<Duration>,
    /// `systemctl --user show` under the load (systemd rows).
    systemctl: Vec<Duration>,
}

impl Row {
    fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

fn analyse(d: RowData, mode: Mode) -> Row {
    let ns = |t: Instant| t.saturating_duration_since(d.t0).as_nanos() as u64;
    let windows: Vec<(u64, u64)> = d
        .reloads
        .iter()
        .map(|r| (ns(r.trigger), ns(r.end())))
        .collect();
    let readies: Vec<u64> = d.reloads.iter().map(|r| ns(r.ready)).collect();
    let in_window = |r: &Rec| {
        let i = windows.partition_point(|w| w.1 < r.start);
        i < windows.len() && windows[i].0 <= r.end
    };
    // Whether a window request started before that window's new PID was in
    // the PID file (the old process still the serving one).
    let before_ready = |r: &Rec| {
        let i = windows.partition_point(|w| w.1 < r.start);
        i < windows.len() && r.start < readies[i]
    };
    let excluded: Vec<(u64, u64, bool)> = d
        .probes
        .iter()
        .map(|p| (ns(p.from), ns(p.done), p.systemctl))
        .collect();
    let overlaps = |r: &Rec, start_probe: bool| {
        excluded
            .iter()
            .any(|e| e.0 <= r.end && r.start <= e.1 && (!start_probe || !e.2))
    };
    // The control: requests that overlap a fresh start of another hello (no
    // reload at all).
    let mut probe_lat = Vec::new();
    let mut failed = BTreeMap::new();
    let mut win_failed = BTreeMap::new();
    let (mut steady, mut window) = (Vec::new(), Vec::new());
    // Window requests split by whether they opened a connection first.
    let (mut win_reused, mut win_connected) = (Vec::new(), Vec::new());
    // ... and by whether they started before the new PID was in the PID file.
    let (mut win_before, mut win_after) = (Vec::new(), Vec::new());
    let mut win_requests = 0;
    for r in &d.recs {
        let w = in_window(r);
        win_requests += u64::from(w);
        if r.outcome == Outcome::Ok {
            let l = r.end - r.start;
            if overlaps(r, false) {
                // Overlaps a timed probe: in no latency class.
                if overlaps(r, true) {
                    probe_lat.push(l);
                }
            } else if w {
                window.push(l);
                if before_ready(r) {
                    win_before.push(l)
                } else {
                    win_after.push(l)
                }
                if r.connected {
                    win_connected.push(l)
                } else {
                    win_reused.push(l)
                }
            } else {
                steady.push(l)
            }
        } else {
            *failed.entry(r.outcome).or_insert(0) += 1;
            if w {
                *win_failed.entry(r.outcome).or_insert(0) += 1;
            }
        }
    }
    // Keep-alive: every `Connection: close` response comes from a draining
    // old process (a serving one never closes), so the last one before the
    // old process exited is its last request.
    let mut close_ends: Vec<u64> = d
        .recs
        .iter()
        .filter(|r| r.outcome == Outcome::Ok && r.close)
        .map(|r| r.end)
        .collect();
    close_ends.sort_unstable();
    let drain_last = if mode == Mode::KeepAlive {
        d.reloads
            .iter()
            .filter_map(|r| {
                let (from, gone) = (ns(r.trigger), ns(r.gone));
                let i = close_ends.partition_point(|e| *e <= gone);
                let last = *close_ends[..i].last()?;
                (last >= from).then(|| Duration::from_nanos(gone - last))
            })
            .collect()
    } else {
        Vec::new()
    };
    Row {
        variant: d.variant,
        reloads: d.reloads.len(),
        requests: d.recs.len() as u64,
        failed,
        win_requests,
        win_failed,
        steady: lat(steady),
        window: lat(window),
        win_reused: lat(win_reused),
        win_connected: lat(win_connected),
        probe: lat(probe_lat),
        win_before: lat(win_before),
        win_after: lat(win_after),
        handoff: d.reloads.iter().map(|r| r.ready - r.trigger).collect(),
        windows: d.reloads.iter().map(|r| r.end() - r.trigger).collect(),
        drain: d
            .reloads
            .iter()
            .map(|r| r.gone.saturating_duration_since(r.drain_from))
            .collect(),
        drain_last,
        idle_rss_kb: d.idle_rss_kb,
        peak_rss_kb: d.reloads.iter().map(Reload::peak_kb).max().unwrap_or(0),
        overruns: d.overruns,
        elapsed: d.elapsed,
        loaded_starts: d
            .probes
            .iter()
            .filter(|p| !p.systemctl)
            .map(|p| p.to - p.from)
            .collect(),
        systemctl: d
            .probes
            .iter()
            .filter(|p| p.systemctl)
            .map(|p| p.to - p.from)
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// output: the same blocks rendered as plain text or markdown

enum Block {
    Heading(String),
    Para(String),
    List(Vec<String>),
    Table(Vec<String>, Vec<Vec<String>>),
}

fn render(blocks: &[Block], markdown: bool) -> String {
    let mut s = String::new();
    for b in blocks {
        match b {
            Block::Heading(h) if markdown => {
                let _ = writeln!(s, "{h}\n");
            }
            Block::Heading(h) => {
                let h = h.trim_start_matches('#').trim();
                let _ = writeln!(s, "{h}\n{}\n", "=".repeat(h.chars().count()));
            }
            Block::Para(p) => {
                let _ = writeln!(s, "{p}\n");
            }
            Block::List(items) => {
                for i in items {
                    let _ = writeln!(s, "- {i}");
                }
                s.push('\n');
            }
            Block::Table(head, rows) => {
                if markdown {
                    let _ = writeln!(s, "| {} |", head.join(" | "));
                    let seps: Vec<&str> = head
                        .iter()
                        .enumerate()
                        .map(|(i, _)| if i == 0 { "---" } else { "---:" })
                        .collect();
                    let _ = writeln!(s, "|{}|", seps.join("|"));
                    for r in rows {
                        let _ = writeln!(s, "| {} |", r.join(" | "));
                    }
                } else {
                    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
                    for r in rows {
                        for (i, c) in r.iter().enumerate() {
                            w[i] = w[i].max(c.chars().count());
                        }
                    }
                    let line = |cells: &[String]| {
                        let mut l = String::new();
                        for (i, c) in cells.iter().enumerate() {
                            let pad = w[i] - c.chars().count();
                            if i == 0 {
                                l.push_str(c);
                                l.push_str(&" ".repeat(pad));
                            } else {
                                l.push_str("  ");
                                l.push_str(&" ".repeat(pad));
                                l.push_str(c);
                            }
                        }
                        l.trim_end().to_owned()
                    };
                    let _ = writeln!(s, "{}", line(head));
                    let total: usize = w.iter().sum::<usize>() + 2 * (w.len() - 1);
                    let _ = writeln!(s, "{}", "-".repeat(total));
                    for r in rows {
                        let _ = writeln!(s, "{}", line(r));
                    }
                }
                s.push('\n');
            }
        }
    }
    s
}

fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn mm(v: &[Duration]) -> (String, String) {
    match median_max(v) {
        Some((m, x)) => (dur(m), dur(x)),
        None => ("n/a".into(), "n/a".into()),
    }
}

fn mb(kb: u64) -> String {
    if kb == 0 {
        "n/a".into()
    } else {
        format!("{:.2} MiB", kb as f64 / 1024.0)
    }
}

fn kinds(m: &BTreeMap<Outcome, u64>) -> String {
    let total: u64 = m.values().sum();
    if total == 0 {
        return "0".into();
    }
    let parts: Vec<String> = FAILURES
        .iter()
        .filter_map(|k| m.get(k).map(|n| format!("{} {n}", k.label())))
        .collect();
    format!("{total} ({})", parts.join(", "))
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        "n/a".into()
    } else {
        format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
    }
}

struct Solo {
    starts: Vec<Duration>,
    idle_rss_kb: u64,
    idle_hwm_kb: u64,
    /// RssAnon / RssFile of the idle server.
    idle_split: String,
    unloaded_handoff: Vec<Duration>,
    unloaded_window: Vec<Duration>,
}

fn measure_solo(ctx: &Ctx<'_>) -> Result<Solo, String> {
    let mut starts = Vec::new();
    let (mut idle_rss_kb, mut idle_hwm_kb) = (0, 0);
    let mut idle_split = String::new();
    for i in 0..ctx.args.starts {
        check_interrupted()?;
        let last = i + 1 == ctx.args.starts;
        let st = time_start(ctx, &format!("start-{i}"), last)?;
        starts.push(st.ready - st.spawn);
        if let Some((rss, hwm)) = st.mem {
            (idle_rss_kb, idle_hwm_kb) = (rss, hwm);
            idle_split = st.split;
        }
    }
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut s = Standalone::start(ctx.hello, addr, ctx.dir, "unloaded", false)?;
    let mut unloaded_handoff = Vec::new();
    let mut unloaded_window = Vec::new();
    for _ in 0..UNLOADED_RELOADS {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(50));
        let r = s.reload()?;
        unloaded_handoff.push(r.ready - r.trigger);
        unloaded_window.push(r.end() - r.trigger);
    }
    s.stop();
    Ok(Solo {
        starts,
        idle_rss_kb,
        idle_hwm_kb,
        idle_split,
        unloaded_handoff,
        unloaded_window,
    })
}

fn definitions() -> Block {
    Block::List(vec![
        "reload window: from the trigger (signal sent, or `systemctl` started) until the old process has exited, the new one is in the PID file and `systemctl` (if any) has returned; steady state is everything else. A request is in a window when its lifetime (connect or write until response or error) overlaps one.".into(),
        "handoff: trigger → a new PID in the PID file (the new process writes it once it is the serving one). For the restarts: trigger → the new process in the PID file.".into(),
        "exec → ready: `hello` started fresh on another port, spawn → its PID in the PID file (the same definition as the handoff); timed without load, and again under each mode's load right after the reloads of the `handover SIGHUP` row. The handoff target compares the two under the same conditions.".into(),
        "drain: for a handoff, new PID in the PID file → old process gone (the old one stops accepting at about that moment, so this bounds `last request served → gone` from above; 0 when the old process was gone before the new one had written the PID file, which happens under systemd, where the new process writes it only after the old one has had `MAINPID=` confirmed); for a restart, trigger → old process gone. `drain after last` (keep-alive only, measured): the old process's last response → old process gone; a serving process never sends `Connection: close`, so the last `Connection: close` response before the exit is the old process's last request.".into(),
        "process gone: its pidfd became readable (exit, before reaping). PID file changes are seen through inotify; both are event-driven, timestamps are taken when the event is seen.".into(),
        "idle RSS: VmRSS of a freshly started server, 0.3 s after ready, before any load. peak RSS: over all reloads, VmHWM of the old process (last read before it exited) plus VmHWM of the new one at the end of the window when both were alive at once, else the larger of the two.".into(),
        "failed requests by kind: refused (connect refused), reset (connection reset or broken pipe), closed (connection closed before the whole response), timeout, non-2xx, other. After a failure a client pauses 10 ms before its next request, so counts of refused connects depend on that pause.".into(),
        "latency: request start (connect for a new connection, else the write) → response read, successful requests only. Requests that overlap the extra timings taken after the reloads (fresh starts of another hello, `systemctl show` queries) are left out of the latency figures (not out of the request and failure counts).".into(),
    ])
}

fn mode_blocks(mode: Mode, rows: &[Row], skipped: &[(Variant, String)], args: &Args) -> Vec<Block> {
    let mut b = vec![Block::Heading(format!(
        "### {}: {} clients, {} reloads every {} ms",
        mode.label(),
        args.clients,
        args.reloads,
        args.interval.as_millis()
    ))];
    b.push(Block::Table(
        vec![
            "".into(),
            "reloads".into(),
            "requests".into(),
            "failed".into(),
            "requests in windows".into(),
            "failed in windows".into(),
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.variant.label().into(),
                    r.reloads.to_string(),
                    r.requests.to_string(),
                    kinds(&r.failed),
                    r.win_requests.to_string(),
                    kinds(&r.win_failed),
                ]
            })
            .collect(),
    ));
    b.push(Block::Table(
        vec![
            "latency".into(),
            "steady p50".into(),
            "steady p99".into(),
            "steady max".into(),
            "window p50".into(),
            "window p99".into(),
            "window max".into(),
            "p99 window/steady".into(),
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.variant.label().into(),
                    dur(r.steady.p50),
                    dur(r.steady.p99),
                    dur(r.steady.max),
                    dur(r.window.p50),
                    dur(r.window.p99),
                    dur(r.window.max),
                    ratio(r.window.p99, r.steady.p99),
                ]
            })
            .collect(),
    ));
    b.push(Block::Table(
        vec![
            "reload".into(),
            "handoff median".into(),
            "handoff max".into(),
            "window median".into(),
            "window max".into(),
            "drain median".into(),
            "drain max".into(),
            "drain after last median / max".into(),
            "idle RSS".into(),
            "peak RSS".into(),
        ],
        rows.iter()
            .map(|r| {
                let (hm, hx) = mm(&r.handoff);
                let (wm, wx) = mm(&r.windows);
                let (dm, dx) = mm(&r.drain);
                let last = if r.drain_last.is_empty() {
                    "n/a".to_string()
                } else {
                    let (lm, lx) = mm(&r.drain_last);
                    format!("{lm} / {lx}")
                };
                vec![
                    r.variant.label().into(),
                    hm,
                    hx,
                    wm,
                    wx,
                    dm,
                    dx,
                    last,
                    mb(r.idle_rss_kb),
                    mb(r.peak_rss_kb),
                ]
            })
            .collect(),
    ));
    let mut notes = Vec::new();
    for r in rows {
        if let (Some((ls, _)), Some((h, _))) =
            (median_max(&r.loaded_starts), median_max(&r.handoff))
        {
            notes.push(format!(
                "{}: a fresh hello started under this same load takes {} from exec to ready (median of {}); the handoff median is {} of that",
                r.variant.label(),
                dur(ls),
                r.loaded_starts.len(),
                ratio(h, ls)
            ));
        }
        if r.probe.n > 0 {
            notes.push(format!(
                "{}: control without any reload: the {} requests that overlapped one of those fresh starts of another hello (on another port, spawn until it exited again) had p50 {}, p99 {} ({} of steady p99), max {}",
                r.variant.label(),
                r.probe.n,
                dur(r.probe.p50),
                dur(r.probe.p99),
                ratio(r.probe.p99, r.steady.p99),
                dur(r.probe.max),
            ));
        }
        if r.variant.is_handover() && r.win_before.n > 0 {
            notes.push(format!(
                "{}: window requests started before the new PID was in the PID file ({}): p50 {}, p99 {}, max {}; after ({}): p50 {}, p99 {}, max {}",
                r.variant.label(),
                r.win_before.n,
                dur(r.win_before.p50),
                dur(r.win_before.p99),
                dur(r.win_before.max),
                r.win_after.n,
                dur(r.win_after.p50),
                dur(r.win_after.p99),
                dur(r.win_after.max),
            ));
        }
        if mode == Mode::KeepAlive && r.win_connected.n > 0 {
            notes.push(format!(
                "{}: in the windows, {} requests on an already open connection: p50 {}, p99 {}, max {}; {} requests that first opened a new connection (after a `Connection: close`): p50 {}, p99 {}, max {}",
                r.variant.label(),
                r.win_reused.n,
                dur(r.win_reused.p50),
                dur(r.win_reused.p99),
                dur(r.win_reused.max),
                r.win_connected.n,
                dur(r.win_connected.p50),
                dur(r.win_connected.p99),
                dur(r.win_connected.max),
            ));
        }
        if let Some((sc, _)) = median_max(&r.systemctl) {
            notes.push(format!(
                "{}: `systemctl --user show` alone takes {} under this same load (median of {}): the client's own start-up is part of every systemd trigger",
                r.variant.label(),
                dur(sc),
                r.systemctl.len()
            ));
        }
        if r.overruns > 0 {
            notes.push(format!(
                "{}: {} of {} windows outlasted the {} ms interval (the next reload waited for the window to close)",
                r.variant.label(),
                r.overruns,
                r.reloads,
                args.interval.as_millis()
            ));
        }
        if mode == Mode::KeepAlive && r.drain_last.len() < r.reloads {
            notes.push(format!(
                "{}: `drain after last` measured for {} of {} reloads (no `Connection: close` response seen in the others' windows)",
                r.variant.label(),
                r.drain_last.len(),
                r.reloads
            ));
        }
    }
    if let Some(h) = rows.iter().find(|r| r.variant == Variant::Sighup) {
        let (hh, hw) = (median_max(&h.handoff), median_max(&h.windows));
        for r in rows.iter().filter(|r| !r.variant.is_handover()) {
            let mut s = format!(
                "{} vs handover SIGHUP: failed requests {} vs {}; window p99 {}, window max {}",
                r.variant.label(),
                r.failed_total(),
                h.failed_total(),
                ratio(r.window.p99, h.window.p99),
                ratio(r.window.max, h.window.max),
            );
            if let (Some((a, _)), Some((b, _))) = (median_max(&r.handoff), hh) {
                let _ = write!(s, ", handoff median {}", ratio(a, b));
            }
            if let (Some((a, _)), Some((b, _))) = (median_max(&r.windows), hw) {
                let _ = write!(s, ", window median {}", ratio(a, b));
            }
            notes.push(s);
        }
    }
    for (v, why) in skipped {
        notes.push(format!("{}: skipped: {why}", v.label()));
    }
    if !notes.is_empty() {
        b.push(Block::List(notes));
    }
    b
}

/// The targets, evaluated on the `handover SIGHUP` rows (and the zero-failure
/// one on `handover systemctl reload` too).
fn targets(per_mode: &[(Mode, Vec<Row>)], solo: &Solo, args: &Args) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut missed = 0;
    let mut verdict = |ok: bool, text: String| {
        if !ok {
            missed += 1;
        }
        lines.push(format!("{}: {text}", if ok { "met" } else { "MISSED" }));
    };
    let scale = if args.reloads >= TARGET_RELOADS && args.clients >= TARGET_CLIENTS {
        String::new()
    } else {
        format!(
            " (this run: {} reloads, {} clients; the target is set at {TARGET_RELOADS} reloads, {TARGET_CLIENTS} clients)",
            args.reloads, args.clients
        )
    };
    for (mode, rows) in per_mode {
        for r in rows.iter().filter(|r| r.variant.is_handover()) {
            verdict(
                r.failed_total() == 0 && r.reloads == args.reloads,
                format!(
                    "0 failed requests, {}, {}: {} failed over {} reloads{scale}",
                    mode.label(),
                    r.variant.label(),
                    kinds(&r.failed),
                    r.reloads
                ),
            );
        }
    }
    // The handoff and a fresh start compared under the same conditions:
    // without load, and under each mode's load (the fresh starts are timed
    // during the same row, right after its reloads).
    let start = median_max(&solo.starts).map(|(m, _)| m).unwrap_or_default();
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    if let Some((h, _)) = median_max(&solo.unloaded_handoff) {
        let x = secs(h) / secs(start);
        verdict(
            x <= TARGET_HANDOFF_RATIO,
            format!(
                "handoff median within {TARGET_HANDOFF_RATIO}× of exec → ready, without load: handoff {} vs exec → ready {} ({x:.2}×)",
                dur(h),
                dur(start),
            ),
        );
    }
    for (mode, rows) in per_mode {
        let Some(r) = rows.iter().find(|r| r.variant == Variant::Sighup) else {
            continue;
        };
        if let (Some((h, _)), Some((ls, _))) =
            (median_max(&r.handoff), median_max(&r.loaded_starts))
        {
            let x = secs(h) / secs(ls);
            verdict(
                x <= TARGET_HANDOFF_RATIO,
                format!(
                    "handoff median within {TARGET_HANDOFF_RATIO}× of exec → ready, both under the {} load: handoff {} vs exec → ready {} ({x:.2}×); the handoff under load against exec → ready without load would be {:.2}×",
                    mode.label(),
                    dur(h),
                    dur(ls),
                    secs(h) / secs(start),
                ),
            );
        }
        let x = r.window.p99.as_secs_f64() / r.steady.p99.as_secs_f64().max(1e-9);
        verdict(
            x <= TARGET_P99_RATIO,
            format!(
                "p99 latency in reload windows at most {TARGET_P99_RATIO}× steady, {}: {} vs {} ({x:.2}×)",
                mode.label(),
                dur(r.window.p99),
                dur(r.steady.p99)
            ),
        );
        let (which, v) = if !r.drain_last.is_empty() {
            ("last response → gone, measured", &r.drain_last)
        } else {
            ("new PID in the PID file → gone, an upper bound", &r.drain)
        };
        if let Some((_, max)) = median_max(v) {
            verdict(
                max <= TARGET_DRAIN,
                format!(
                    "old process gone within {} ms after its last request, {}: max {} ({which})",
                    TARGET_DRAIN.as_millis(),
                    mode.label(),
                    dur(max)
                ),
            );
        }
    }
    verdict(
        solo.idle_rss_kb > 0 && solo.idle_rss_kb <= TARGET_IDLE_RSS_KB,
        format!(
            "idle RSS of hello at most 3 MB (3 MiB = {TARGET_IDLE_RSS_KB} kB): {} kB",
            solo.idle_rss_kb
        ),
    );
    (lines, missed)
}

// ---------------------------------------------------------------------------------------------

fn find_hello(args: &Args) -> Result<PathBuf, String> {
    let path = match &args.hello {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("current_exe: {e}"))?
            .with_file_name("hello"),
    };
    // Under `cargo run` (which builds only this example), build the hello
    // that sits next to this binary too, so that it is never stale.
    let under_cargo = std::env::var_os("CARGO").zip(std::env::var_os("CARGO_MANIFEST_DIR"));
    if let (None, Some((cargo, manifest_dir))) = (&args.hello, under_cargo) {
        let release = path
            .parent()
            .and_then(Path::parent)
            .is_some_and(|p| p.ends_with("release"));
        let mut cmd = Command::new(cargo);
        cmd.arg("build").args(release.then_some("--release"));
        cmd.args(["--example", "hello", "--manifest-path"])
            .arg(Path::new(&manifest_dir).join("Cargo.toml"));
        eprintln!("reload_bench: {cmd:?}");
        let status = cmd
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("building hello failed: {status}"));
        }
    }
    if !path.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release --examples`, or run this \
             benchmark with `cargo run --release --example reload_bench`, which builds it",
            path.display()
        ));
    }
    let path = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn state_dir() -> Result<tempfile::TempDir, String> {
    // A tmpfs, like /run on a normal host, so the PID file's fsync is cheap.
    let base = ["/dev/shm", "/run"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("handover-bench-")
        .tempdir_in(&base)
        .or_else(|_| tempfile::tempdir())
        .map_err(|e| format!("temp dir: {e}"))
}

fn run(args: &Args) -> Result<(Vec<Block>, usize), String> {
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    };
    let load_before = loadavg();
    let hello = find_hello(args)?;
    let release = hello.components().any(|c| c.as_os_str() == "release");
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let dir = state_dir()?;
    eprintln!("reload_bench: hello = {}", hello.display());
    eprintln!(
        "reload_bench: timing {} fresh starts and {UNLOADED_RELOADS} unloaded reloads",
        args.starts
    );
    let ctx = Ctx {
        hello: &hello,
        dir: dir.path(),
        args,
    };
    let solo = measure_solo(&ctx)?;

    let mut sd_skip = None;
    let sd = if args.systemd {
        eprintln!("reload_bench: booting a private systemd user manager");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        match Systemd::boot(&hello, addr, dir.path()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("reload_bench: systemd baseline skipped: {e}");
                sd_skip = Some(e);
                None
            }
        }
    } else {
        None
    };

    let mut variants = vec![Variant::Sighup];
    if args.plain {
        variants.push(Variant::Plain);
    }
    if args.systemd {
        variants.extend([Variant::SystemdRestart, Variant::SystemdReload]);
    }
    let mut per_mode = Vec::new();
    let mut skipped_per_mode = Vec::new();
    for &mode in &args.modes {
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        for &v in &variants {
            check_interrupted()?;
            eprintln!("reload_bench: {} / {} ...", mode.label(), v.label());
            let data = match v {
                Variant::Sighup | Variant::Plain => {
                    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
                    let tag = format!(
                        "{}-{}",
                        if v == Variant::Plain {
                            "plain"
                        } else {
                            "sighup"
                        },
                        rows.len()
                    );
                    let mut s =
                        Standalone::start(&hello, addr, dir.path(), &tag, v == Variant::Plain)?;
                    let d = run_row(&mut s, v, mode, &ctx);
                    s.stop();
                    d
                }
                Variant::SystemdRestart | Variant::SystemdReload => match &sd {
                    None => {
                        skipped.push((v, sd_skip.clone().unwrap_or_default()));
                        continue;
                    }
                    Some(sd) => {
                        let mut s = sd.fresh(v == Variant::SystemdRestart)?;
                        let d = run_row(&mut s, v, mode, &ctx);
                        if std::env::var_os("HANDOVER_BENCH_TRACE").is_some() {
                            if let Ok(d) = &d {
                                sd.trace(&d.reloads);
                            }
                        }
                        d
                    }
                },
            };
            match data {
                Ok(d) => {
                    let row = analyse(d, mode);
                    eprintln!(
                        "reload_bench:   {} requests, {} failed, handoff median {}, in {:.1?}",
                        row.requests,
                        row.failed_total(),
                        mm(&row.handoff).0,
                        row.elapsed
                    );
                    rows.push(row);
                }
                Err(e) => {
                    check_interrupted()?;
                    eprintln!("reload_bench: {} failed: {e}", v.label());
                    skipped.push((v, format!("failed: {}", e.lines().next().unwrap_or(""))));
                }
            }
        }
        per_mode.push((mode, rows));
        skipped_per_mode.push(skipped);
    }
    drop(sd);

    let mut blocks = vec![Block::Heading("## Results".into())];
    let (sm, sx) = mm(&solo.starts);
    let (uh, ux) = mm(&solo.unloaded_handoff);
    let (uw, _) = mm(&solo.unloaded_window);
    let mut facts = vec![
        format!(
            "server: `{}`{}",
            hello.display(),
            if release { "" } else { " (NOT a release build)" }
        ),
        format!(
            "hello on its own, exec → ready (median / max of {}): {sm} / {sx}",
            solo.starts.len()
        ),
        format!(
            "hello on its own, idle: VmRSS {} kB ({}; {}), VmHWM {} kB",
            solo.idle_rss_kb,
            mb(solo.idle_rss_kb),
            solo.idle_split,
            solo.idle_hwm_kb
        ),
        format!(
            "handover SIGHUP without load (median / max of {UNLOADED_RELOADS}): handoff {uh} / {ux}, window median {uw}"
        ),
        format!(
            "PID file and logs in a tmpfs ({})",
            dir.path().parent().map(|p| p.display().to_string()).unwrap_or_default()
        ),
    ];
    facts.push(format!(
        "load average (1, 5, 15 min) when the run started: {load_before}; when it ended: {} (the benchmark's own load included; anything else running on the machine skews the figures)",
        loadavg()
    ));
    if let Some(why) = &sd_skip {
        facts.push(format!("systemd rows skipped: {why}"));
    }
    blocks.push(Block::List(facts));
    for ((mode, rows), skipped) in per_mode.iter().zip(&skipped_per_mode) {
        blocks.extend(mode_blocks(*mode, rows, skipped, args));
    }
    let (lines, missed) = targets(&per_mode, &solo, args);
    blocks.push(Block::Heading("## Targets".into()));
    blocks.push(Block::List(lines));
    blocks.push(Block::Para(if missed == 0 {
        "All targets met.".into()
    } else {
        format!("{missed} target(s) MISSED.")
    }));
    blocks.push(Block::Heading("## Definitions".into()));
    blocks.push(definitions());
    Ok((blocks, missed))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("reload_bench: {e}");
            return ExitCode::from(2);
        }
    };
    install_interrupt_handler();
    let cleanup = Cleanup;
    let result = run(&args);
    drop(cleanup);
    let (blocks, _missed) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reload_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rest = if args.raw.is_empty() {
        String::new()
    } else {
        format!(" -- {}", args.raw.join(" "))
    };
    let command = if std::env::var_os("CARGO").is_some() {
        format!("cargo run --release --example reload_bench{rest}")
    } else {
        format!(
            "cargo build --release --examples\n{}{}",
            std::env::args()
                .next()
                .unwrap_or_else(|| "reload_bench".into()),
            rest.trim_start_matches(" --")
        )
    };
    println!("{}", render(&blocks, false).trim_end());
    if let Some(path) = &args.markdown {
        let mut doc = vec![
            Block::Heading("# Reload benchmark".into()),
            Block::Para(
                "Written by the reload benchmark itself (`examples/reload_bench.rs`); every figure below comes from the run described here. Re-run the command to regenerate this file.".into(),
            ),
            Block::Para(format!("Command:\n\n```sh\n{command}\n```")),
            Block::Heading("## Machine".into()),
            Block::List(machine().into_iter().map(|(k, v)| format!("{k}: {v}")).collect()),
        ];
        doc.extend(blocks);
        let text = render(&doc, true);
        if let Err(e) = std::fs::write(path, text.trim_end().to_owned() + "\n") {
            eprintln!("reload_bench: write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("reload_bench: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
