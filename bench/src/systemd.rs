//! `hello.socket` + `hello.service` under a private systemd user manager (root only):
//! `systemctl restart` (systemd keeps the socket, the process is replaced) and `systemctl
//! reload` (`ExecReload=/bin/kill -HUP $MAINPID`: the handoff under systemd).

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::pidfile::PidFile;
use support::systemd::{Manager, UserManager};

use crate::load::Marks;
use crate::procs::{hwm, Proc};
use crate::servers::{observe, wait_other, watch, Observed, Reload, Server, RELOAD_TIMEOUT};
use crate::steps::{self, Event};

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
    pub fn boot(
        hello: &Path,
        extra: &[String],
        addr: SocketAddr,
        dir: &Path,
    ) -> Result<Systemd, String> {
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
                 ExecStart={} --addr {addr} --pid-file {} {}\n\
                 ExecReload=/bin/kill -HUP $MAINPID\nTimeoutStartSec=90\n\
                 KillMode=control-group\nTimeoutStopSec=45\n",
                hello.display(),
                pid_file.display(),
                extra.join(" ")
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

    fn reload(&mut self, marks: &Marks) -> Result<Reload, String> {
        let old = self.cur.clone();
        let mut old_hwm = hwm(old.pid);
        let verb = if self.restart { "restart" } else { "reload" };
        marks.trigger();
        let trigger = Instant::now();
        let mut child = self.sd.systemctl(verb)?;
        let o = observe(
            &self.sd.pw,
            &old,
            Some((&mut child, verb)),
            &mut old_hwm,
            marks,
        );
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
            old_pid: old.pid,
            new_pid: new,
        })
    }

    fn events(&self) -> Vec<Event> {
        self.sd
            .m
            .unit_journal("hello.service")
            .iter()
            .filter_map(steps::from_journal)
            .collect()
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
