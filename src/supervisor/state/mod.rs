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
//!
//! The state and the loop's entry points are here (signals, control
//! requests, exec reports, deadlines); what it does with children in
//! `children`, with reloads in `reload`, with notify messages in
//! `messages`.

mod children;
mod messages;
mod reload;

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::signalfd::siginfo;
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::control::Request;
use super::instance::{Exec, Instance, Launcher};
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

/// Whether `pid` is in the supervisor's own process group.
fn same_process_group(pid: i32) -> bool {
    let theirs = nix::unistd::getpgid(Some(Pid::from_raw(pid)));
    let ours = nix::unistd::getpgid(None);
    matches!((theirs, ours), (Ok(a), Ok(b)) if a == b)
}
