//! The supervisor's children: reaped here only (`waitpid(-1)` on SIGCHLD),
//! each exit matched to its role.

use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{Phase, Retired, Role, State};
use crate::supervisor::instance::Instance;
use crate::supervisor::ProgramExit;

impl State {
    /// Reaps every child that has exited: instances, and any orphan the
    /// supervisor inherited as PID 1 or subreaper.
    pub(super) fn reap(&mut self) {
        // Bounded, in case a kernel ever kept reporting the same child.
        for _ in 0..100_000 {
            let flags = WaitPidFlag::WNOHANG | WaitPidFlag::__WALL;
            match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(flags)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.on_exit(pid.as_raw(), ProgramExit::Code(code))
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.on_exit(pid.as_raw(), ProgramExit::Signal(signal as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            }
        }
    }

    /// Reaps the exited children the loop does not track, without
    /// touching an instance's exit (which `reap` handles in its turn).
    /// Best effort: it stops at the first exited child it tracks.
    pub(super) fn reap_untracked(&mut self) {
        use nix::sys::wait::{waitid, Id};
        let peek = WaitPidFlag::WEXITED
            | WaitPidFlag::WNOHANG
            | WaitPidFlag::WNOWAIT
            | WaitPidFlag::__WALL;
        for _ in 0..64 {
            let pid = match waitid(Id::All, peek) {
                Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)) => pid,
                _ => return,
            };
            if self.tracks(pid.as_raw()) {
                return;
            }
            let flags = WaitPidFlag::WNOHANG | WaitPidFlag::__WALL;
            match nix::sys::wait::waitpid(pid, Some(flags)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.on_exit(pid.as_raw(), ProgramExit::Code(code))
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.on_exit(pid.as_raw(), ProgramExit::Signal(signal as i32))
                }
                _ => return,
            }
        }
    }

    /// Whether `pid` is an instance the loop watches.
    pub(super) fn tracks(&self, pid: i32) -> bool {
        self.main.as_ref().is_some_and(|m| m.pid == pid)
            || self.pending.as_ref().is_some_and(|p| p.pid == pid)
            || self.retired.iter().any(|r| r.instance.pid == pid)
    }

    pub(super) fn on_exit(&mut self, pid: i32, status: ProgramExit) {
        if self.main.as_ref().is_some_and(|m| m.pid == pid) {
            self.main_exited(status);
        } else if self.pending.as_ref().is_some_and(|p| p.pid == pid) {
            let mut p = self.pending.take().expect("checked above");
            self.ready_at = None;
            let why = p.describe_exit(status);
            self.finish_reload(Err(format!(
                "the new instance (pid {pid}) exited before it was ready: {why}"
            )));
        } else if let Some(i) = self.retired.iter().position(|r| r.instance.pid == pid) {
            let mut r = self.retired.remove(i);
            let why = r.instance.describe_exit(status);
            tracing::info!(pid, status = %why, "{} exited", r.role.describe());
        } else {
            if status == ProgramExit::Code(0) {
                tracing::debug!(pid, %status, "reaped a process");
            } else {
                tracing::info!(pid, %status, "reaped a process");
            }
            if let Some(r) = &mut self.reload {
                if r.reaped.len() < 8 {
                    r.reaped.push((pid, status));
                }
            }
        }
    }

    pub(super) fn main_exited(&mut self, status: ProgramExit) {
        let mut main = self.main.take().expect("called for the main process");
        let why = main.describe_exit(status);
        self.exit = Some(status);
        self.ready_at = None;
        if let Some(p) = self.pending.take() {
            p.kill();
            self.retire(p, Role::Rejected, None);
        }
        if self.reload.is_some() {
            self.finish_reload(Err(format!(
                "the program (pid {}) exited during the reload: {why}",
                main.pid
            )));
        }
        match self.phase {
            Phase::Stopping => tracing::info!(pid = main.pid, status = %why, "the program exited"),
            Phase::Starting => {
                tracing::error!(pid = main.pid, status = %why, "the program exited before it was ready")
            }
            Phase::Ready if self.main_stopping => {
                tracing::info!(pid = main.pid, status = %why, "the program exited")
            }
            Phase::Ready => {
                tracing::warn!(pid = main.pid, status = %why, "the program exited on its own; stopping")
            }
        }
        self.begin_stopping();
    }

    pub(super) fn retire(&mut self, instance: Instance, role: Role, kill_at: Option<Instant>) {
        self.retired.push(Retired {
            instance,
            kill_at,
            role,
        });
    }
}
