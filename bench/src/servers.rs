//! The servers under test run by hand, each reloaded its own way: `hello` by SIGHUP, `plain`
//! (or hello) stopped and started again. ([`crate::systemd`] has the systemd ones.) A reload is
//! observed through events: the PID file through inotify, each process's exit through its
//! pidfd.

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::pidfile::{wait_readable, PidFile};
use support::process::memory_kb;

use crate::load::Marks;
use crate::procs::{check_interrupted, exited, hwm, pidfd, Proc};
use crate::steps::{self, Event};

/// Bound on one reload (trigger to old process gone and new one ready).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Watches the PID file at `path`.
pub fn watch(path: &Path) -> Result<PidFile, String> {
    PidFile::watch(path).map_err(|e| format!("watch {}: {e}", path.display()))
}

/// Waits until the PID file names a PID other than `not`; returns it and when it was seen.
pub fn wait_other(
    pw: &PidFile,
    not: Option<u32>,
    deadline: Instant,
) -> Result<(u32, Instant), String> {
    let seen = pw.wait(deadline, |pid| {
        if let Err(e) = check_interrupted() {
            return Some(Err(e));
        }
        pid.filter(|p| Some(*p) != not)
            .map(|p| Ok((p, Instant::now())))
    });
    seen.unwrap_or_else(|| {
        Err(format!(
            "no new PID in {} in time (still {:?})",
            pw.path().display(),
            pw.read()
        ))
    })
}

/// What one reload looked like.
#[derive(Debug, Clone, Copy)]
pub struct Reload {
    pub trigger: Instant,
    /// The new PID appeared in the PID file.
    pub ready: Instant,
    /// The old process exited.
    pub gone: Instant,
    /// The reload command (`systemctl`) returned.
    pub cmd_done: Option<Instant>,
    /// When the old process started draining: the new PID in the PID file
    /// for a handoff (it stops accepting right then), the trigger for a
    /// stop/restart.
    pub drain_from: Instant,
    /// VmHWM of the old process (last read before it exited) and of the new
    /// one at the end of the window, kB.
    pub old_hwm: u64,
    pub new_hwm: u64,
    /// The new process ran alongside the old one (a handoff, not a restart).
    pub handoff: bool,
    pub old_pid: u32,
    pub new_pid: u32,
}

impl Reload {
    /// The end of its window.
    pub fn end(&self) -> Instant {
        self.ready
            .max(self.gone)
            .max(self.cmd_done.unwrap_or(self.gone))
    }
    /// The memory both generations held at once at most (kB).
    pub fn peak_kb(&self) -> u64 {
        if self.handoff {
            self.old_hwm + self.new_hwm
        } else {
            self.old_hwm.max(self.new_hwm)
        }
    }
}

/// A server a row reloads again and again.
pub trait Server {
    fn addr(&self) -> SocketAddr;
    fn current(&self) -> &Proc;
    /// One reload; sets `marks` as it goes (trigger, new PID seen; the caller marks the end).
    fn reload(&mut self, marks: &Marks) -> Result<Reload, String>;
    fn stop(&mut self);
    fn diagnostics(&self) -> String;
    /// What its processes logged (for the handoff's steps).
    fn events(&self) -> Vec<Event>;
    /// Runs one `systemctl` query (systemd rows only), to time the client.
    fn systemctl_probe(&self) -> Option<Result<(), String>> {
        None
    }
}

pub(crate) struct Observed {
    pub new: u32,
    pub ready: Instant,
    pub gone: Instant,
    pub cmd_done: Option<Instant>,
}

/// Waits for the old process to exit, for another PID in the PID file and,
/// if given, for the reload command to finish (failing early if it fails);
/// samples the old process's VmHWM meanwhile.
pub(crate) fn observe(
    pw: &PidFile,
    old: &Proc,
    mut cmd: Option<(&mut Child, &str)>,
    old_hwm: &mut u64,
    marks: &Marks,
) -> Result<Observed, String> {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    let cmd_fd = match &cmd {
        Some((c, _)) => Some(pidfd(c.id())?),
        None => None,
    };
    let (mut ready, mut gone, mut cmd_done) = (None, None, None);
    loop {
        let now = Instant::now();
        if ready.is_none() {
            if let Some(p) = pw.read().filter(|p| *p != old.pid) {
                ready = Some((p, now));
                marks.ready();
            }
        }
        if gone.is_none() {
            if old.exited() {
                gone = Some(now);
            } else if let Some((_, hwm)) = memory_kb(old.pid) {
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
        let mut fds = vec![pw.as_fd(), old.fd.as_fd()];
        fds.extend(cmd_fd.as_ref().map(|f| f.as_fd()));
        wait_readable(&fds, Duration::from_millis(1));
        pw.drain_events();
    }
}

/// A server run by hand, with a PID file: hello upgraded by SIGHUP, or a server (plain)
/// stopped and started again.
pub struct Standalone {
    bin: PathBuf,
    extra: Vec<String>,
    addr: SocketAddr,
    pw: PidFile,
    log: PathBuf,
    cur: Proc,
    restart: bool,
}

/// `BIN --addr ADDR --pid-file PID_FILE EXTRA...`, as the tests run it, its log appended to
/// `log`.
pub fn spawn_server(
    bin: &Path,
    addr: SocketAddr,
    pid_file: &Path,
    log: &Path,
    extra: &[String],
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    support::server::command(bin)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--pid-file")
        .arg(pid_file)
        .args(extra)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))
}

impl Standalone {
    /// Starts `bin` on `addr` with its PID file and log in `dir` named after `tag`;
    /// `restart`: reloaded by a stop and a start instead of SIGHUP.
    pub fn start(
        bin: &Path,
        extra: &[String],
        addr: SocketAddr,
        dir: &Path,
        tag: &str,
        restart: bool,
    ) -> Result<Standalone, String> {
        let pid_file = dir.join(format!("{tag}.pid"));
        let log = dir.join(format!("{tag}.log"));
        let pw = watch(&pid_file)?;
        let child = spawn_server(bin, addr, &pid_file, &log, extra)?;
        let cur = Proc::track(child.id(), true)?;
        let (pid, _) = wait_other(&pw, None, Instant::now() + Duration::from_secs(20))?;
        if pid != cur.pid {
            return Err(format!("the PID file says {pid}, started {}", cur.pid));
        }
        Ok(Standalone {
            bin: bin.to_owned(),
            extra: extra.to_vec(),
            addr,
            pw,
            log,
            cur,
            restart,
        })
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Server for Standalone {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn current(&self) -> &Proc {
        &self.cur
    }

    fn reload(&mut self, marks: &Marks) -> Result<Reload, String> {
        let old = self.cur.clone();
        let mut old_hwm = hwm(old.pid);
        marks.trigger();
        let trigger = Instant::now();
        if !self.restart {
            kill(Pid::from_raw(old.pid as i32), Signal::SIGHUP)
                .map_err(|e| format!("SIGHUP {}: {e}", old.pid))?;
            let Observed {
                new, ready, gone, ..
            } = observe(&self.pw, &old, None, &mut old_hwm, marks)?;
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
                old_pid: old.pid,
                new_pid: new,
            });
        }
        kill(Pid::from_raw(old.pid as i32), Signal::SIGTERM)
            .map_err(|e| format!("SIGTERM {}: {e}", old.pid))?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while !old.exited() {
            if let Some((_, h)) = memory_kb(old.pid) {
                old_hwm = old_hwm.max(h);
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not stop within {RELOAD_TIMEOUT:?}",
                    old.pid
                ));
            }
            wait_readable(&[old.fd.as_fd()], Duration::from_millis(1));
        }
        let gone = Instant::now();
        old.reap();
        let child = spawn_server(&self.bin, self.addr, self.pw.path(), &self.log, &self.extra)?;
        self.cur = Proc::track(child.id(), true)?;
        let (pid, ready) = wait_other(&self.pw, Some(old.pid), Instant::now() + RELOAD_TIMEOUT)?;
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
            old_pid: old.pid,
            new_pid: pid,
        })
    }

    fn stop(&mut self) {
        self.cur.stop(Duration::from_secs(5));
    }

    fn diagnostics(&self) -> String {
        tail_file(&self.log, 3000)
    }

    fn events(&self) -> Vec<Event> {
        steps::read_log(&self.log)
    }
}

pub fn tail_file(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let mut at = s.len().saturating_sub(max);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    format!("{}:\n{}", path.display(), &s[at..])
}
