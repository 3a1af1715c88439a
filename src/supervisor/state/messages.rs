//! Notify messages, with systemd's semantics (see `supervisor::notify`):
//! from the main process, from a new instance being started, or refused.

use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{Phase, Reload, Role, State};
use crate::supervisor::instance::Instance;
use crate::supervisor::notify::{parse, Change, Datagram, Message};
use crate::supervisor::ReloadMode;

impl State {
    pub(in crate::supervisor) fn on_datagram(&mut self, d: Datagram) {
        // The fds (a barrier's pipe) are closed when `d` is dropped at the
        // end of this function: after this message and every earlier one.
        let Some(pid) = d.pid else {
            tracing::warn!("notify message without sender credentials; refused");
            return;
        };
        if d.truncated {
            tracing::warn!(pid, "notify message longer than 4096 bytes; ignored");
            return;
        }
        let m = parse(&d.text);
        if m.barrier {
            // Like systemd, a barrier is honoured from any sender: closing
            // its fd (below) says every earlier message was processed.
            tracing::debug!(pid, "barrier");
        }
        for p in &m.problems {
            tracing::warn!(pid, "notify message: {p}");
        }
        match (m.barrier, d.fds.len()) {
            (true, 1) | (false, 0) => {}
            (true, n) => {
                tracing::warn!(pid, fds = n, "BARRIER=1 needs exactly one fd; closing them")
            }
            (false, n) => tracing::debug!(
                pid,
                fds = n,
                "closing the fds sent with a notify message (no fd store here)"
            ),
        }
        let main_pid = self.main.as_ref().map(|m| m.pid);
        if Some(pid) == main_pid {
            self.message_from_main(pid, m);
        } else if self.pending.as_ref().is_some_and(|p| p.pid == pid) {
            self.message_from_pending(pid, m);
        } else if let Some(r) = self.retired.iter().find(|r| r.instance.pid == pid) {
            // An old instance saying STOPPING=1 on its way out: expected.
            tracing::debug!(pid, "notify message from the {} ignored", r.role.describe());
        } else if m != Message::default() && !m.barrier {
            tracing::warn!(
                pid,
                main_pid,
                "notify message refused: only the main process may send (NotifyAccess=main)"
            );
        }
        drop(d);
    }

    pub(super) fn message_from_main(&mut self, pid: i32, m: Message) {
        if let Some(new) = m.main_pid {
            self.set_main_pid(pid, new);
        }
        if let Some(s) = m.status {
            if self.status.as_deref() != Some(s.as_str()) {
                tracing::info!(pid, status = %s, "program status");
            }
            self.status = Some(s);
        }
        if let Some(e) = &m.errno {
            tracing::warn!(pid, errno = %e, "the program reports an error (ERRNO=)");
        }
        if let Some(e) = &m.bus_error {
            tracing::warn!(pid, bus_error = %e, "the program reports an error (BUSERROR=)");
        }
        if let Some(d) = m.extend_timeout {
            self.extend(d);
        }
        match m.change {
            Some(Change::Ready) => self.main_ready(),
            Some(Change::Reloading) => self.main_reloading(),
            Some(Change::Stopping) => {
                if !self.main_stopping {
                    tracing::info!(pid, "the program is stopping");
                }
                self.main_stopping = true;
                if self
                    .reload
                    .as_ref()
                    .is_some_and(|r| r.kind == ReloadMode::Handoff)
                {
                    self.finish_reload(Err("the program is stopping".into()));
                }
            }
            None => {}
        }
    }

    pub(super) fn message_from_pending(&mut self, pid: i32, m: Message) {
        if let Some(s) = &m.status {
            tracing::info!(pid, status = %s, "new instance status");
        }
        if let Some(d) = m.extend_timeout {
            self.extend(d);
        }
        if m.main_pid.is_some() {
            tracing::warn!(
                pid,
                "MAINPID= from a new instance that is not ready yet; ignored"
            );
        }
        match m.change {
            Some(Change::Ready) => self.promote(),
            Some(c) => {
                tracing::warn!(pid, change = ?c, "ignored from a new instance that is not ready yet")
            }
            None => {}
        }
    }

    /// `EXTEND_TIMEOUT_USEC=`: the start or reload deadline is at least
    /// `d` from now.
    pub(super) fn extend(&mut self, d: Duration) {
        let at = Instant::now() + d;
        if self.phase == Phase::Starting {
            if let Some(dl) = &mut self.start_deadline {
                *dl = (*dl).max(at);
            }
        }
        if let Some(r) = &mut self.reload {
            r.deadline = r.deadline.max(at);
        }
    }

    pub(super) fn set_main_pid(&mut self, from: i32, new: i32) {
        if new == from {
            return;
        }
        let refuse = |why: &str| {
            tracing::warn!(from, new_pid = new, "MAINPID={new} refused: {why}");
        };
        if self.phase == Phase::Stopping {
            return refuse("the supervisor is stopping");
        }
        if self.pending.is_some() {
            return refuse("a restart is in progress");
        }
        if self.retired.iter().any(|r| r.instance.pid == new) {
            return refuse("it is an old instance");
        }
        if !is_live_child(new) {
            return refuse(
                "it is not a running child of the supervisor (a program that hands over \
                 starts its new process with CLONE_PARENT, as handover does when \
                 NOTIFY_SOCKET is set)",
            );
        }
        let generation = self.next_generation;
        let adopted = match Instance::adopt(new, generation) {
            Ok(i) => i,
            Err(e) => return refuse(&format!("pidfd_open: {e}")),
        };
        self.next_generation += 1;
        let Some(old) = self.main.replace(adopted) else {
            return;
        };
        tracing::info!(
            old_pid = old.pid,
            new_pid = new,
            generation,
            "main process changed"
        );
        self.retire(old, Role::FormerMain, None);
    }

    pub(super) fn main_ready(&mut self) {
        let Some(main) = &self.main else { return };
        let pid = main.pid;
        match self.phase {
            Phase::Starting => {
                let elapsed_ms = main.started.elapsed().as_millis() as u64;
                self.phase = Phase::Ready;
                self.start_deadline = None;
                self.ready_at = None;
                tracing::info!(pid, elapsed_ms, "the program is ready");
            }
            Phase::Ready => {
                let Some(r) = &self.reload else { return };
                if pid != r.old_main {
                    self.finish_reload(Ok(pid as u32));
                } else if r.kind == ReloadMode::Handoff && r.reloading_seen {
                    // The failed new process has exited before the program
                    // said so: collect its status for the report.
                    self.reap_untracked();
                    let why = match &self.status {
                        Some(s) => format!("the program is still the main process: {s}"),
                        None => "the program reported READY=1 without a new main process".into(),
                    };
                    self.finish_reload(Err(why));
                }
            }
            Phase::Stopping => {}
        }
    }

    pub(super) fn main_reloading(&mut self) {
        match &mut self.reload {
            Some(r) if r.kind == ReloadMode::Handoff => r.reloading_seen = true,
            Some(_) => tracing::warn!(
                "RELOADING=1 from the program while a restart is in progress; ignored"
            ),
            None if self.phase == Phase::Ready && !self.main_stopping => {
                let Some(main) = &self.main else { return };
                tracing::info!(pid = main.pid, "the program started a reload by itself");
                let now = Instant::now();
                self.reload = Some(Reload {
                    kind: ReloadMode::Handoff,
                    started: now,
                    deadline: now + self.settings.ready_timeout,
                    old_main: main.pid,
                    waiters: Vec::new(),
                    reloading_seen: true,
                    trigger: "the program",
                    reaped: Vec::new(),
                });
            }
            None => {}
        }
    }
}

/// Whether `pid` is a running child of ours that has not been reaped.
fn is_live_child(pid: i32) -> bool {
    use nix::sys::wait::{waitid, Id};
    let flags =
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT | WaitPidFlag::__WALL;
    matches!(
        waitid(Id::Pid(Pid::from_raw(pid)), flags),
        Ok(WaitStatus::StillAlive)
    )
}
