//! The servers under test, each reloaded its own way: `hello` run by hand (SIGHUP, or stop and
//! start again), and `hello.socket` + `hello.service` under a private systemd user manager
//! (`systemctl restart`, `systemctl reload`). A reload is observed through events: the PID file
//! through inotify, each process's exit through its pidfd.

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::pidfile::{wait_readable, PidFile};
use support::process::memory_kb;
use support::systemd::{Manager, UserManager};

use crate::procs::{check_interrupted, exited, hwm, pidfd, Proc};

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
    pw: &PidFile,
    old: &Proc,
    mut cmd: Option<(&mut Child, &str)>,
    old_hwm: &mut u64,
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

/// `hello` run by hand, with a PID file: upgraded by SIGHUP, or stopped and
/// started again (plain restart).
pub struct Standalone {
    hello: PathBuf,
    addr: SocketAddr,
    pw: PidFile,
    log: PathBuf,
    cur: Proc,
    plain: bool,
}

/// `hello --addr ADDR --pid-file PID_FILE`, as the tests run it, its log appended to `log`.
pub fn spawn_hello(
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
    support::server::command(hello)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--pid-file")
        .arg(pid_file)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", hello.display()))
}

impl Standalone {
    /// Starts hello on `addr` with its PID file and log in `dir` named after `tag`; `plain`:
    /// reloaded by a stop and a start instead of SIGHUP.
    pub fn start(
        hello: &Path,
        addr: SocketAddr,
        dir: &Path,
        tag: &str,
        plain: bool,
    ) -> Result<Standalone, String> {
        let pid_file = dir.join(format!("{tag}.pid"));
        let log = dir.join(format!("{tag}.log"));
        let pw = watch(&pid_file)?;
        let child = spawn_hello(hello, addr, &pid_file, &log)?;
        let cur = Proc::track(child.id(), true)?;
        let (pid, _) = wait_other(&pw, None, Instant::now() + Duration::from_secs(20))?;
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
        let child = spawn_hello(&self.hello, self.addr, self.pw.path(), &self.log)?;
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
pub struct Systemd {
    m: UserManager,
    addr: SocketAddr,
    pw: PidFile,
}

/// `t` on the journal's clock (CLOCK_MONOTONIC, µs).
fn mono_us(t: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (i0, m0) = *BASE.get_or_init(|| {
        let now = Instant::now();
        (now, support::process::monotonic_usec())
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
    pub fn trace(&self, reloads: &[Reload]) {
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
pub struct SystemdServer<'a> {
    sd: &'a Systemd,
    cur: Proc,
    restart: bool,
}

impl Systemd {
    /// Boots the host's systemd as a private user manager with the benchmark's units: the
    /// socket on `addr`, hello's PID file in `dir`.
    pub fn boot(hello: &Path, addr: SocketAddr, dir: &Path) -> Result<Systemd, String> {
        let m = UserManager::boot(Manager::Host, "bench")?;
        let pid_file = dir.join("systemd-hello.pid");
        let pw = watch(&pid_file)?;
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
    pub fn fresh(&self, restart: bool) -> Result<SystemdServer<'_>, String> {
        let before = self.pw.read();
        let child = self.systemctl("restart")?;
        finish_systemctl(child, "restart")?;
        let (pid, _) = wait_other(&self.pw, before, Instant::now() + Duration::from_secs(20))?;
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
