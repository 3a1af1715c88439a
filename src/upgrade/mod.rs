//! The upgrade sequence, and the seam that lets it run without real
//! processes.
//!
//! | step | what | on failure |
//! |---|---|---|
//! | 1 | `Ready` → `Upgrading` ([`phase`]): one upgrade at a time | `NotReady`, `InProgress`, `Draining`; nothing started |
//! | 2 | under a manager: `RELOADING=1`, `MONOTONIC_USEC=`, `EXTEND_TIMEOUT_USEC=` (the upgrade timeout plus the barrier's), `STATUS=` | logged |
//! | 3 | the state from [`set_state`](crate::Handover::set_state)'s provider, within the limit | `StateTooLarge` |
//! | 4 | [`Spawn::start`]: the new process, with every listener | `Spawn`, `Exec` |
//! | 5 | [`NewProcess::wait_ready`], within the upgrade timeout; a stop cancels it | the new process killed (and reaped): `Timeout`, `ChildFailed`, `ChildExited`, `Stopped` |
//! | 6 | under a manager: `MAINPID=<new>` + `READY=1`, then `BARRIER=1` | `Announce`: the new process killed |
//! | 7 | [`NewProcess::confirm_main`]: `main` | `Channel`: killed, and `MAINPID=<this>` again |
//! | 8 | wait for its `serving` (its PID file written, the manager told), at most [`SERVING_WAIT`]; a stop ends the wait | no `serving` in time: the drain starts anyway; it exited: `DiedBeforeServing`, and `MAINPID=<this>` and the PID file again |
//! | 9 | the drain starts: final under a manager (the listeners go), revocable run by hand (they stay, not accepting) | — |
//! | 10 | `upgraded <new>` to this process's own parent, if it still drains; the new process followed until it exits | run by hand: the service taken back if it dies before it let go |
//!
//! Until it reads `main` (step 7), the new process accepts nothing (its
//! drain is held, see [`phase`]): this process accepts for both, so a new
//! process killed at steps 5 to 7 takes no connection with it.
//!
//! Step 8 is there for heavy load: the drain closes every idle keep-alive
//! connection of this process, and their clients reconnect to the new
//! one at once. Started before the new process has finished `ready()`, that
//! flood competes with it for the CPU and delays its last steps by tens of
//! milliseconds at a few thousand connections.
//!
//! A stop cancels the upgrade until step 6 has told the manager
//! `MAINPID=<new>`. From then on the handoff stands: the new process is
//! the service, so this one stops without `STOPPING=1`, which (under
//! `NotifyAccess=all`) would stop the whole unit.
//!
//! Every way out of steps 2 to 8, a panic or a dropped future included,
//! ends in `Ready` with a `RELOADING=1` ended by `READY=1` and a `STATUS=`
//! saying why ([`UpgradeGuard`]), so neither the next upgrade nor
//! `systemctl reload` waits for ever. The old process only keeps what the
//! manager can see: with one, `MAINPID=` and the barrier; run by hand, the
//! listeners and the channel, to take the service back.
//!
//! The processes themselves are behind two traits, [`Spawn`] and
//! [`NewProcess`]: `handoff` implements them with `clone`, pidfds and the
//! handoff channel; the unit tests here with a scripted fake.

pub(crate) mod phase;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::drain::DrainReason;
use crate::error::UpgradeError;
use crate::notify::{self, NotifyState};
use crate::process::Process;
use crate::protocol::channel::FromNew;
use crate::spare::Reserved;
use crate::task;

/// How long the old process waits for the manager to confirm `MAINPID=`.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old process waits for the new one's `serving` before it
/// starts its drain anyway.
pub(crate) const SERVING_WAIT: Duration = Duration::from_secs(1);
/// How long a new process's death may precede the stop that caused it.
const STOP_GRACE: Duration = Duration::from_millis(200);

/// What the new process is started with.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub(crate) generation: u32,
    /// Every listener, in order, by name.
    pub(crate) listeners: &'a [(&'a str, BorrowedFd<'a>)],
    /// The names whose address the configuration decided.
    pub(crate) configured: &'a [&'a str],
    /// The environment instead of this process's own, when `Some`.
    pub(crate) env: Option<&'a [(OsString, OsString)]>,
    /// How many bytes of state [`NewProcess::wait_ready`] will send.
    pub(crate) state_len: usize,
}

/// Starts new processes: the seam between the sequence and the system.
pub(crate) trait Spawn: Send + Sync + 'static {
    /// A started process.
    type Process: NewProcess;

    /// The program the next generation runs, for messages.
    fn program(&self) -> &Path;

    /// Prepares the start on the caller's thread, while `plan` borrows the
    /// listeners, and returns the start itself. `reserved` is what the
    /// start needs at the fd limit, made ahead (see `spare`).
    fn start(
        &self,
        plan: Plan<'_>,
        reserved: Reserved,
    ) -> Result<
        impl Future<Output = Result<Self::Process, UpgradeError>> + Send + 'static,
        UpgradeError,
    >;
}

/// A started new process, from the old one's side.
pub(crate) trait NewProcess: Send + 'static {
    fn pid(&self) -> u32;

    /// Sends `state`, then waits for `ready`. On failure the process has
    /// been killed (and reaped, if ours) and the error says what it said or
    /// how it ended. The caller bounds the wait, and kills it on timeout.
    fn wait_ready(&mut self, state: &[u8])
        -> impl Future<Output = Result<(), UpgradeError>> + Send;

    /// Tells it that it is the main process now (`main`).
    fn confirm_main(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Kills it (a no-op if it is gone), waits for it to exit, and says how
    /// it ended.
    fn kill(&mut self) -> impl Future<Output = String> + Send;

    /// It is the service's main process now: dropping this handle no
    /// longer kills it (until then it does, so that an abandoned upgrade
    /// leaves nothing running).
    fn handed_over(&mut self);

    /// After the handoff: the next thing it says, or its exit once it has
    /// said everything.
    fn next_event(&mut self) -> impl Future<Output = Event> + Send;
}

/// How long the steps of a handoff took, for the log line that ends it
/// (`spawn_us`, `ready_us`, `announce_us`, `confirm_us`, `serving_us`).
#[derive(Debug, Default)]
struct Steps {
    /// From the upgrade's start until the new process runs (step 4).
    spawn: Duration,
    /// Until it said `ready` (step 5; its state sent first).
    ready: Duration,
    /// `MAINPID=` and the barrier (step 6; zero without a manager).
    announce: Duration,
    /// `main` (step 7).
    confirm: Duration,
    /// Until it said `serving` (step 8).
    serving: Duration,
}

impl Steps {
    /// Ends a step: its time is `at.elapsed()`; `at` restarts.
    fn lap(at: &mut Instant) -> Duration {
        let now = Instant::now();
        let took = now.saturating_duration_since(*at);
        *at = now;
        took
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What a new process did after the handoff.
#[derive(Debug)]
pub(crate) enum Event {
    /// It said this (`upgraded <pid>`, `stopping`): it let go of the
    /// service.
    Said(FromNew),
    /// It exited; how, as far as this process can know.
    Exited(String),
}

/// Ends an upgrade on every way out, including a panic or a dropped
/// future: the stage leaves `Upgrading`, and a `RELOADING=1` that was sent
/// is ended with `READY=1`, so that neither the next upgrade nor
/// `systemctl reload` waits for ever.
struct UpgradeGuard<'a, S> {
    process: &'a Process<S>,
    generation: u32,
    /// `RELOADING=1` was sent.
    reloading: bool,
    /// The outcome was logged and told to the manager.
    settled: bool,
}

impl<S> Drop for UpgradeGuard<'_, S> {
    fn drop(&mut self) {
        let p = self.process;
        if !self.settled {
            let generation = self.generation;
            tracing::error!(
                generation,
                outcome = "failed",
                "upgrade interrupted; still serving"
            );
            let draining = p.life.drain().watcher().is_draining();
            if let (true, false, Some(n)) = (self.reloading, draining, &p.notify) {
                let status = format!(
                    "upgrade to generation {generation} interrupted; still serving, pid {}",
                    std::process::id()
                );
                let _ = n.notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            p.keep_spares();
        }
        p.life.end_upgrade();
    }
}

impl<S: Spawn> Process<S> {
    /// The whole sequence; see the module docs.
    pub(crate) async fn upgrade(
        self: &Arc<Self>,
        env: Option<Vec<(OsString, OsString)>>,
    ) -> Result<u32, UpgradeError> {
        self.life.begin_upgrade()?;
        // The upgrade is work in flight: it runs on the crate's thread while
        // `wait()` runs on the application's, and once the handoff starts
        // the drain, a process with nothing else in flight would otherwise
        // exit before this ends (before it told its own draining parent
        // `upgraded`, before its outcome was logged). Dropped last.
        let _in_flight = self.life.drain().watcher().guard();
        let mut guard = UpgradeGuard {
            process: self,
            generation: self.generation + 1,
            reloading: false,
            settled: false,
        };
        let started = Instant::now();
        let old_pid = std::process::id();
        let generation = guard.generation;
        let exe = self.spawn.program().display().to_string();
        tracing::info!(generation, old_pid, exe, "upgrade started");
        if let Some(n) = &self.notify {
            let extend = self.config.upgrade_timeout.saturating_add(BARRIER_TIMEOUT);
            let status = format!("upgrading to generation {generation}");
            let msg = [
                NotifyState::Reloading,
                NotifyState::MonotonicUsec(notify::monotonic_usec()),
                NotifyState::ExtendTimeoutUsec(
                    u64::try_from(extend.as_micros()).unwrap_or(u64::MAX),
                ),
                NotifyState::Status(&status),
            ];
            // From here on, every way out ends the reload with READY=1.
            guard.reloading = true;
            if let Err(e) = n.notify(&msg) {
                tracing::warn!(error = %e, "cannot send RELOADING=1");
            }
        }
        let mut steps = Steps::default();
        let result = self.hand_over(generation, env.as_deref(), &mut steps).await;
        let stopped = || self.life.drain().watcher().reason() == Some(DrainReason::Stopped);
        if let Err(
            UpgradeError::ChildExited { .. }
            | UpgradeError::DiedBeforeServing { .. }
            | UpgradeError::ChildFailed { .. }
            | UpgradeError::Channel(_),
        ) = &result
        {
            // A stop signals every process of the service at once (systemd's
            // KillMode=control-group, Ctrl-C in a terminal): the new process
            // may die of it a moment before this one sees its own. Give that
            // stop a moment to arrive, so it is not reported as a failure.
            let _ = tokio::time::timeout(STOP_GRACE, self.life.drain().watcher().draining()).await;
        }
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(new_pid) => {
                tracing::info!(
                    generation,
                    old_pid,
                    new_pid,
                    elapsed_ms,
                    spawn_us = micros(steps.spawn),
                    ready_us = micros(steps.ready),
                    announce_us = micros(steps.announce),
                    confirm_us = micros(steps.confirm),
                    serving_us = micros(steps.serving),
                    outcome = "ok",
                    "upgrade complete; draining"
                );
            }
            // The stop already told the manager (STOPPING=1).
            Err(e) if stopped() => {
                tracing::info!(generation, old_pid, elapsed_ms, outcome = "cancelled", reason = %e, "upgrade cancelled: stopping");
            }
            Err(e) => {
                tracing::error!(generation, old_pid, elapsed_ms, outcome = "failed", reason = %e, "upgrade failed; still serving");
                if let (true, Some(n)) = (guard.reloading, &self.notify) {
                    let status = format!("upgrade to generation {generation} failed: {e}; still serving, pid {old_pid}");
                    if let Err(e) = n.notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
                        tracing::warn!(error = %e, "cannot send READY=1 after the failed upgrade");
                    }
                }
                self.keep_spares();
            }
        }
        guard.settled = true;
        result
    }

    /// Steps 3 to 10.
    async fn hand_over(
        self: &Arc<Self>,
        generation: u32,
        env: Option<&[(OsString, OsString)]>,
        steps: &mut Steps,
    ) -> Result<u32, UpgradeError> {
        let mut at = Instant::now();
        let state = self.state_for_next();
        let state: &[u8] = (*state).as_ref();
        let limit = self.config.state_limit;
        if state.len() > limit {
            return Err(UpgradeError::StateTooLarge {
                size: state.len(),
                limit,
            });
        }
        // At the fd limit no slot is free: what the next steps need was made
        // ahead, in slots of its own (see `spare`).
        let (start, mut barrier_pipe) = {
            let listeners = self.listeners();
            let handed = listeners.for_handoff();
            let configured = listeners.configured();
            let mut reserved = self.spares.reserve(handed.len());
            let barrier_pipe = reserved.barrier.take();
            let plan = Plan {
                generation,
                listeners: &handed,
                configured: &configured,
                env,
                state_len: state.len(),
            };
            (self.spawn.start(plan, reserved)?, barrier_pipe)
        };
        let mut child = start.await?;
        steps.spawn = Steps::lap(&mut at);
        let new_pid = child.pid();
        tracing::info!(
            generation,
            new_pid,
            "new process started; waiting for it to be ready"
        );
        let timeout = self.config.upgrade_timeout;
        let drain = self.life.drain().watcher();
        tokio::select! {
            r = tokio::time::timeout(timeout, child.wait_ready(state)) => match r {
                Ok(ready) => ready?,
                Err(_) => {
                    child.kill().await;
                    return Err(UpgradeError::Timeout { pid: new_pid, timeout });
                }
            },
            _ = drain.draining() => {
                child.kill().await;
                return Err(UpgradeError::Stopped);
            }
        }
        steps.ready = Steps::lap(&mut at);
        if let Some(n) = &self.notify {
            let status = format!("serving, generation {generation}, pid {new_pid}");
            let announce = [
                NotifyState::MainPid(new_pid),
                NotifyState::Ready,
                NotifyState::Status(&status),
            ];
            if let Err(cause) = n.notify(&announce) {
                child.kill().await;
                return Err(UpgradeError::Announce {
                    pid: new_pid,
                    cause,
                });
            }
            self.life.announced(true);
            if let Err(e) = n.barrier_with(barrier_pipe.take(), BARRIER_TIMEOUT).await {
                tracing::warn!(error = %e, "the manager did not confirm MAINPID=; handing over anyway");
            }
        }
        steps.announce = Steps::lap(&mut at);
        if let Err(cause) = child.confirm_main().await {
            // It died right after saying ready: take the service back.
            self.reclaim_main();
            child.kill().await;
            return Err(UpgradeError::Channel(cause));
        }
        steps.confirm = Steps::lap(&mut at);
        child.handed_over();
        // Lines that neither say `serving` nor let go (one this version does
        // not know) do not end the wait.
        let serving = async {
            loop {
                match child.next_event().await {
                    Event::Said(FromNew::Serving) => break None,
                    Event::Said(FromNew::Unknown(line)) => {
                        tracing::debug!(new_pid, %line, "the new process said something unknown");
                    }
                    other => break Some(other),
                }
            }
        };
        let first = tokio::select! {
            said = tokio::time::timeout(SERVING_WAIT, serving) => said.unwrap_or_else(|_| {
                tracing::warn!(new_pid, wait = ?SERVING_WAIT, "the new process did not say it serves in time; draining anyway");
                None
            }),
            // A stop: the drain starts as one.
            _ = drain.draining() => None,
        };
        steps.serving = Steps::lap(&mut at);
        if let Some(Event::Exited(status)) = first {
            // It died before it served: this process never let go. Draining
            // now would race the take-back (a drain with nothing in flight
            // ends at once, and the process exits): serve on instead.
            self.reclaim_main();
            return Err(UpgradeError::DiedBeforeServing {
                pid: new_pid,
                status,
            });
        }
        // Under a manager, it supervises the new process now: if that dies,
        // the manager decides (Restart=), not us. Run by hand nobody else
        // would restart the service: keep the listeners (not accepting) to
        // take it back.
        let by_hand = self.notify.is_none();
        self.life.handed_over(by_hand);
        if !by_hand {
            self.listeners().clear();
        }
        self.tell_parent(FromNew::Upgraded(new_pid));
        self.follow(child, first);
        Ok(new_pid)
    }

    /// The new process died after it was announced (steps 6 to 8), before
    /// this one let go: `MAINPID=<this>` again under a manager, and the
    /// PID file naming this process again (the new one may have written
    /// its own).
    fn reclaim_main(&self) {
        if let Some(n) = &self.notify {
            let _ = n.notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
            self.life.announced(false);
        }
        if let Some(path) = &self.config.pid_file {
            if let Err(e) = self.write_pid_file(path) {
                tracing::error!(error = %e, "cannot write the PID file after the new process died");
            }
        }
    }

    /// Follows the new process after the handoff until it exits (and reaps
    /// it, if it is ours). If it dies while this process drains, without
    /// having handed the service on or been stopped, this process takes the
    /// service back (run by hand only).
    /// `first` is an event read already.
    fn follow(self: &Arc<Self>, mut child: S::Process, first: Option<Event>) {
        let weak = Arc::downgrade(self);
        task::spawn(async move {
            let pid = child.pid();
            let mut let_go = None;
            let mut first = first;
            let status = loop {
                let event = match first.take() {
                    Some(event) => event,
                    None => child.next_event().await,
                };
                match event {
                    Event::Said(what @ (FromNew::Upgraded(_) | FromNew::Stopping)) => {
                        // It handed over or stops: no taking back from now.
                        if let Some(p) = weak.upgrade() {
                            p.life.settle();
                        }
                        tracing::debug!(new_pid = pid, said = ?what, "the new process let go of the service");
                        let_go = Some(what);
                    }
                    Event::Said(other) => {
                        tracing::debug!(new_pid = pid, said = ?other, "the new process said something that does not let go");
                    }
                    Event::Exited(status) => break status,
                }
            };
            if let Some(p) = weak.upgrade() {
                p.new_process_exited(pid, &status, let_go.as_ref());
            }
        });
    }

    fn new_process_exited(&self, pid: u32, status: &str, let_go: Option<&FromNew>) {
        if let Some(said) = let_go {
            tracing::debug!(new_pid = pid, %status, ?said, "the new process exited");
            return;
        }
        if self.notify.is_some() {
            tracing::warn!(new_pid = pid, %status, "the new process exited while this one was draining; the service manager decides what happens next");
            return;
        }
        if !self.life.take_back() {
            tracing::warn!(new_pid = pid, %status, "the new process exited while this one was stopping; not taking the service back");
            return;
        }
        // Serving again: the accept loops resume on the listeners this
        // process kept; connections that came meanwhile waited in their
        // backlogs.
        if let Some(path) = &self.config.pid_file {
            if let Err(e) = self.write_pid_file(path) {
                tracing::error!(error = %e, "cannot write the PID file after taking the service back");
            }
        }
        self.keep_spares();
        tracing::warn!(
            new_pid = pid,
            %status,
            pid = std::process::id(),
            generation = self.generation,
            "the new process died while this one was draining; took the service back"
        );
    }
}
