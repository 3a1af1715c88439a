//! Reloads: one at a time, by restart or by handoff, and their outcome
//! told to every waiting control connection.

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::{Phase, Reload, Role, State, Waiter};
use crate::supervisor::ReloadMode;

impl State {
    pub(super) fn request_reload(&mut self, waiter: Option<Waiter>, trigger: &'static str) {
        let refused = match self.phase {
            Phase::Stopping => Some("the supervisor is stopping"),
            _ if self.main_stopping => Some("the program is stopping"),
            Phase::Starting => Some("the program is not ready yet"),
            Phase::Ready if self.reload.is_some() => Some("a reload is already in progress"),
            Phase::Ready => None,
        };
        if let Some(why) = refused {
            tracing::info!(trigger, "reload refused: {why}");
            if let Some(w) = waiter {
                let _ = w.send(Err(why.into()));
            }
            return;
        }
        let Some(main) = &self.main else { return };
        let old_main = main.pid;
        let now = Instant::now();
        match self.settings.reload {
            ReloadMode::Restart => {
                let generation = self.next_generation;
                self.next_generation += 1;
                match self.launcher.spawn(generation) {
                    Ok(new) => {
                        tracing::info!(
                            trigger,
                            old_pid = old_main,
                            new_pid = new.pid,
                            generation,
                            "reload: started a new instance; waiting for it to be ready"
                        );
                        self.pending = Some(new);
                        self.ready_at = None;
                    }
                    Err(e) => {
                        let why = format!("cannot start {}: {e}", self.launcher.path.display());
                        tracing::error!(trigger, reason = %why, "reload failed; the old instance keeps serving");
                        if let Some(w) = waiter {
                            let _ = w.send(Err(why));
                        }
                        return;
                    }
                }
            }
            ReloadMode::Handoff => {
                if let Err(e) = main.signal(Signal::SIGHUP) {
                    let why = format!("cannot send SIGHUP to the program (pid {old_main}): {e}");
                    tracing::error!(trigger, reason = %why, "reload failed");
                    if let Some(w) = waiter {
                        let _ = w.send(Err(why));
                    }
                    return;
                }
                tracing::info!(
                    trigger,
                    pid = old_main,
                    "reload: sent SIGHUP to the program; waiting for MAINPID= and READY=1"
                );
            }
        }
        self.reload = Some(Reload {
            kind: self.settings.reload,
            started: now,
            deadline: now + self.settings.ready_timeout,
            old_main,
            waiters: waiter.into_iter().collect(),
            reloading_seen: false,
            trigger,
            reaped: Vec::new(),
        });
    }

    pub(super) fn finish_reload(&mut self, result: Result<u32, String>) {
        let Some(r) = self.reload.take() else { return };
        let result = match result {
            Err(why) if r.kind == ReloadMode::Handoff && !r.reaped.is_empty() => {
                let reaped: Vec<String> = r
                    .reaped
                    .iter()
                    .map(|(pid, status)| format!("pid {pid} ({status})"))
                    .collect();
                Err(format!(
                    "{why}; the supervisor reaped meanwhile: {}",
                    reaped.join(", ")
                ))
            }
            other => other,
        };
        let elapsed_ms = r.started.elapsed().as_millis() as u64;
        match &result {
            Ok(new_pid) => tracing::info!(
                trigger = r.trigger,
                old_pid = r.old_main,
                new_pid,
                elapsed_ms,
                outcome = "ok",
                "reload complete"
            ),
            Err(why) => tracing::error!(
                trigger = r.trigger,
                old_pid = r.old_main,
                elapsed_ms,
                outcome = "failed",
                reason = %why,
                "reload failed"
            ),
        }
        for w in r.waiters {
            let _ = w.send(result.clone());
        }
    }

    /// The new instance is ready: it becomes the main process, and the old
    /// one is told to stop.
    pub(super) fn promote(&mut self) {
        let Some(new) = self.pending.take() else {
            return;
        };
        self.ready_at = None;
        let new_pid = new.pid;
        let Some(old) = self.main.replace(new) else {
            return;
        };
        self.status = None;
        if let Err(e) = old.signal(Signal::SIGTERM) {
            tracing::warn!(pid = old.pid, error = %e, "cannot send SIGTERM to the old instance");
        }
        tracing::info!(
            old_pid = old.pid,
            new_pid,
            "the new instance is ready and now the main process; sent SIGTERM to the old one"
        );
        let kill_at = Instant::now() + self.settings.stop_timeout;
        self.retire(old, Role::OldInstance, Some(kill_at));
        self.finish_reload(Ok(new_pid as u32));
    }
}
