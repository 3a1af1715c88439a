//! The supervisor's loop: one task that owns every piece of state and
//! reacts to four sources, in the order they arrive: signals (a signalfd),
//! notify messages, control requests, and deadlines. It is also the only
//! place that reaps (`waitpid(-1)` on SIGCHLD), so a child's pid cannot be
//! recycled between the moment the loop learns it and the moment it signals
//! it, and every signal goes through a pidfd anyway.
//!
//! Phases: `Starting` (the first instance runs, not ready yet) → `Ready`
//! (reloads accepted; one at a time) → `Stopping` (a stop signal, or the
//! main process exited) → the loop ends once no instance is left, and the
//! supervisor exits with the main process's status.
//!
//! A reload, `--reload restart`: start a new instance on the same sockets;
//! once it is ready (`READY=1`, or `--ready SECS`) it is the main process
//! and the old one gets SIGTERM (then SIGKILL after the stop timeout). If
//! the new one exits or is not ready within the ready timeout, it is killed
//! and the old one keeps serving.
//!
//! A reload, `--reload handoff`: send SIGHUP to the main process and follow
//! `RELOADING=1`, then `MAINPID=<new>` + `READY=1` (success), or `READY=1`
//! with the same main process (failure; its `STATUS=` says why), as systemd
//! does for `Type=notify-reload`.

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::signalfd::siginfo;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::control::Request;
use super::instance::{Exec, Instance, Launcher};
use super::notify::{parse, Change, Datagram, Message};
use super::{ProgramExit, Readiness, ReloadMode};

/// The timeouts and modes the loop runs with.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) reload: ReloadMode,
    pub(super) readiness: Readiness,
    pub(super) ready_timeout: Duration,
    pub(super) stop_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Stopping,
}

type Waiter = oneshot::Sender<Result<u32, String>>;

/// A reload in progress.
#[derive(Debug)]
struct Reload {
    kind: ReloadMode,
    started: Instant,
    deadline: Instant,
    /// The main process when it started.
    old_main: i32,
    /// Control connections waiting for the outcome.
    waiters: Vec<Waiter>,
    /// `RELOADING=1` arrived (handoff).
    reloading_seen: bool,
    /// What asked for it, for the log.
    trigger: &'static str,
    /// Processes the supervisor reaped meanwhile that it did not start or
    /// adopt: under `--reload handoff`, a failed new version of the
    /// program is one (with `CLONE_PARENT` it is our child, so only we
    /// learn its status).
    reaped: Vec<(i32, ProgramExit)>,
}

/// What a process that is no longer the main one (nor the new instance
/// being started) is.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// A main process replaced by a restart: it got SIGTERM.
    OldInstance,
    /// A main process replaced through `MAINPID=`: it drains by itself.
    FormerMain,
    /// A new instance that failed: it got SIGKILL.
    Rejected,
}

impl Role {
    fn describe(self) -> &'static str {
        match self {
            Role::OldInstance => "old instance",
            Role::FormerMain => "former main process",
            Role::Rejected => "rejected new instance",
        }
    }
}

#[derive(Debug)]
struct Retired {
    instance: Instance,
    /// When it gets SIGKILL, if it has not exited by then.
    kill_at: Option<Instant>,
    role: Role,
}

/// Everything the loop knows.
#[derive(Debug)]
pub(super) struct State {
    settings: Settings,
    launcher: Launcher,
    phase: Phase,
    main: Option<Instance>,
    /// The deadline for the first instance to be ready.
    start_deadline: Option<Instant>,
    /// The new instance a restart is starting.
    pending: Option<Instance>,
    /// With `--ready SECS`: when the starting instance counts as ready.
    ready_at: Option<Instant>,
    reload: Option<Reload>,
    retired: Vec<Retired>,
    stop_deadline: Option<Instant>,
    /// The main process's exit status, once it has exited.
    exit: Option<ProgramExit>,
    /// Why the supervisor gave up on the first instance, if it did.
    start_failed: Option<String>,
    /// The next instance's generation.
    next_generation: u32,
    /// The main process sent `STOPPING=1`.
    main_stopping: bool,
    /// The main process's last `STATUS=`.
    status: Option<String>,
}

/// How the loop ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The main process exited with this status.
    Exited(ProgramExit),
    /// The first instance was not ready in time (it was stopped).
    NotReady(String),
}

impl State {
    /// Starts the first instance.
    pub(super) fn start(settings: Settings, launcher: Launcher) -> std::io::Result<State> {
        let first = launcher.spawn(0)?;
        tracing::info!(
            pid = first.pid,
            program = %launcher.path.display(),
            listeners = ?launcher.listener_names(),
            reload = ?settings.reload,
            "started the program"
        );
        let start_deadline = Some(Instant::now() + settings.ready_timeout);
        Ok(State {
            settings,
            launcher,
            phase: Phase::Starting,
            main: Some(first),
            start_deadline,
            pending: None,
            ready_at: None,
            reload: None,
            retired: Vec::new(),
            stop_deadline: None,
            exit: None,
            start_failed: None,
            next_generation: 1,
            main_stopping: false,
            status: None,
        })
    }

    /// No instance is left: the supervisor may exit.
    pub(super) fn finished(&self) -> bool {
        self.main.is_none() && self.pending.is_none() && self.retired.is_empty()
    }

    pub(super) fn outcome(&self) -> Outcome {
        match (&self.start_failed, self.exit) {
            (Some(why), _) => Outcome::NotReady(why.clone()),
            (None, Some(status)) => Outcome::Exited(status),
            // Not reachable: the loop ends only once the main process has
            // exited, which records its status.
            (None, None) => Outcome::Exited(ProgramExit::Code(1)),
        }
    }

    /// The earliest deadline, if any.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let starting = (self.phase == Phase::Starting)
            .then_some(self.start_deadline)
            .flatten();
        [
            starting,
            self.ready_at,
            self.reload.as_ref().map(|r| r.deadline),
            self.stop_deadline,
        ]
        .into_iter()
        .chain(self.retired.iter().map(|r| r.kill_at))
        .flatten()
        .min()
    }

    /// The report pipe of the instance being started, while its exec is
    /// unknown and readiness waits for it (`--ready SECS`).
    pub(super) fn exec_watch(&self) -> Option<&tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        if !matches!(self.settings.readiness, Readiness::After(_)) {
            return None;
        }
        self.starting_instance().and_then(Instance::exec_pending)
    }

    fn starting_instance(&self) -> Option<&Instance> {
        match (&self.pending, self.phase) {
            (Some(p), _) => Some(p),
            (None, Phase::Starting) => self.main.as_ref(),
            _ => None,
        }
    }

    // ---- signals ---------------------------------------------------------

    pub(super) fn on_signal(&mut self, info: siginfo) {
        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
            return;
        };
        let from = info.ssi_pid;
        // SI_KERNEL: the terminal (Ctrl-C, Ctrl-\) sent it to its whole
        // foreground process group, the program included.
        let from_terminal = info.ssi_code == libc::SI_KERNEL;
        match signal {
            Signal::SIGCHLD => self.reap(),
            Signal::SIGHUP => {
                tracing::info!(from, "SIGHUP: reload requested");
                self.request_reload(None, "SIGHUP");
            }
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                self.stop(signal, from_terminal, from)
            }
            Signal::SIGUSR1 | Signal::SIGUSR2 => {
                if let Some(main) = &self.main {
                    tracing::info!(%signal, from, pid = main.pid, "forwarding the signal to the program");
                    if let Err(e) = main.signal(signal) {
                        tracing::warn!(%signal, error = %e, "cannot forward the signal");
                    }
                }
            }
            _ => {}
        }
    }

    fn stop(&mut self, signal: Signal, from_terminal: bool, from: u32) {
        if self.phase != Phase::Stopping {
            tracing::info!(%signal, from, "stopping");
            self.begin_stopping();
            if let Some(p) = self.pending.take() {
                p.kill();
                self.retire(p, Role::Rejected, None);
            }
            self.ready_at = None;
            if self.reload.is_some() {
                self.finish_reload(Err("the supervisor is stopping".into()));
            }
        }
        let Some(main) = &self.main else { return };
        if from_terminal && same_process_group(main.pid) {
            tracing::info!(%signal, pid = main.pid, "the terminal sent the signal to the program too; not sending it again");
        } else if let Err(e) = main.signal(signal) {
            tracing::warn!(%signal, pid = main.pid, error = %e, "cannot forward the signal");
        }
    }

    fn begin_stopping(&mut self) {
        if self.phase != Phase::Stopping {
            self.phase = Phase::Stopping;
            self.start_deadline = None;
            self.stop_deadline = Some(Instant::now() + self.settings.stop_timeout);
        }
    }

    // ---- children --------------------------------------------------------

    /// Reaps every child that has exited: instances, and any orphan the
    /// supervisor inherited as PID 1 or subreaper.
    fn reap(&mut self) {
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
    fn reap_untracked(&mut self) {
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
    fn tracks(&self, pid: i32) -> bool {
        self.main.as_ref().is_some_and(|m| m.pid == pid)
            || self.pending.as_ref().is_some_and(|p| p.pid == pid)
            || self.retired.iter().any(|r| r.instance.pid == pid)
    }

    fn on_exit(&mut self, pid: i32, status: ProgramExit) {
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

    fn main_exited(&mut self, status: ProgramExit) {
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

    fn retire(&mut self, instance: Instance, role: Role, kill_at: Option<Instant>) {
        self.retired.push(Retired {
            instance,
            kill_at,
            role,
        });
    }

    // ---- reloads ---------------------------------------------------------

    fn request_reload(&mut self, waiter: Option<Waiter>, trigger: &'static str) {
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

    fn finish_reload(&mut self, result: Result<u32, String>) {
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
    fn promote(&mut self) {
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

    // ---- notify messages -------------------------------------------------

    pub(super) fn on_datagram(&mut self, d: Datagram) {
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

    fn message_from_main(&mut self, pid: i32, m: Message) {
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

    fn message_from_pending(&mut self, pid: i32, m: Message) {
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
    fn extend(&mut self, d: Duration) {
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

    fn set_main_pid(&mut self, from: i32, new: i32) {
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

    fn main_ready(&mut self) {
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

    fn main_reloading(&mut self) {
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

    // ---- control requests ------------------------------------------------

    pub(super) fn on_request(&mut self, req: Request) {
        match req {
            Request::Reload(reply) => {
                tracing::info!("reload requested on the control socket");
                self.request_reload(Some(reply), "control socket");
            }
            Request::Status(reply) => {
                let phase = match self.phase {
                    Phase::Starting => "Starting",
                    Phase::Ready if self.reload.is_some() => "Reloading",
                    Phase::Ready => "Ready",
                    Phase::Stopping => "Stopping",
                };
                let (pid, generation) = self
                    .main
                    .as_ref()
                    .map(|m| (m.pid, m.generation))
                    .unwrap_or((0, 0));
                let mode = match self.settings.reload {
                    ReloadMode::Restart => "restart",
                    ReloadMode::Handoff => "handoff",
                };
                let _ = reply.send(format!(
                    "{phase} generation={generation} pid={pid} reload={mode}"
                ));
            }
        }
    }

    // ---- exec reports and deadlines --------------------------------------

    /// The starting instance's report pipe may have something.
    pub(super) fn on_exec(&mut self) {
        let Readiness::After(delay) = self.settings.readiness else {
            return;
        };
        let starting = match (&mut self.pending, self.phase) {
            (Some(p), _) => p,
            (None, Phase::Starting) => match &mut self.main {
                Some(m) => m,
                None => return,
            },
            _ => return,
        };
        starting.poll_exec();
        match &starting.exec {
            Exec::Done if self.ready_at.is_none() => {
                let at = (starting.started + delay).max(Instant::now());
                self.ready_at = Some(at);
            }
            // A failure: the exit follows and says why.
            _ => {}
        }
    }

    pub(super) fn on_timers(&mut self) {
        let now = Instant::now();
        if self.ready_at.is_some_and(|t| t <= now) {
            self.ready_at = None;
            if self.pending.is_some() {
                self.promote();
            } else if self.phase == Phase::Starting {
                self.main_ready();
            }
        }
        if self.phase == Phase::Starting && self.start_deadline.is_some_and(|t| t <= now) {
            let why = match self.settings.readiness {
                Readiness::Notify => format!(
                    "the program did not send READY=1 within {:?} (a program that cannot notify \
                     needs --ready SECS)",
                    self.settings.ready_timeout
                ),
                Readiness::After(_) => format!(
                    "the program was not running within {:?}",
                    self.settings.ready_timeout
                ),
            };
            tracing::error!(reason = %why, "start failed; stopping the program");
            self.start_failed = Some(why);
            self.stop(Signal::SIGTERM, false, std::process::id());
        }
        if self.reload.as_ref().is_some_and(|r| r.deadline <= now) {
            let timeout = self.settings.ready_timeout;
            match self.pending.take() {
                Some(p) => {
                    p.kill();
                    let why = format!(
                        "the new instance (pid {}) was not ready within {timeout:?}; killed",
                        p.pid
                    );
                    self.retire(p, Role::Rejected, None);
                    self.ready_at = None;
                    self.finish_reload(Err(why));
                }
                None => self.finish_reload(Err(format!(
                    "the program did not finish the reload (MAINPID= and READY=1) within \
                     {timeout:?}"
                ))),
            }
        }
        for r in &mut self.retired {
            if r.kill_at.is_some_and(|t| t <= now) {
                r.kill_at = None;
                tracing::warn!(
                    pid = r.instance.pid,
                    "{} did not exit within the stop timeout; sending SIGKILL",
                    r.role.describe()
                );
                r.instance.kill();
            }
        }
        if self.stop_deadline.is_some_and(|t| t <= now) {
            self.stop_deadline = None;
            let mut pids: Vec<i32> = self.retired.iter().map(|r| r.instance.pid).collect();
            if let Some(m) = &self.main {
                pids.push(m.pid);
                m.kill();
            }
            for r in &mut self.retired {
                r.kill_at = None;
                r.instance.kill();
            }
            if !pids.is_empty() {
                tracing::warn!(?pids, "the stop timeout expired; sent SIGKILL");
            }
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

/// Whether `pid` is in the supervisor's own process group.
fn same_process_group(pid: i32) -> bool {
    let theirs = nix::unistd::getpgid(Some(Pid::from_raw(pid)));
    let ours = nix::unistd::getpgid(None);
    matches!((theirs, ours), (Ok(a), Ok(b)) if a == b)
}
