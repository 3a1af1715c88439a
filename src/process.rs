//! One process's part in the service's life: what every clone of a
//! [`Handover`](crate::Handover) shares, and what it does outside an
//! upgrade: `ready()`, `stop()`, `wait()`, the signals, the watchdog, the fd
//! store. The upgrade itself is in [`upgrade`](crate::upgrade); building
//! one, in [`startup`](crate::startup).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::drain::{DrainOutcome, DrainReason};
use crate::error::{Error, Result};
use crate::handoff::ParentLink;
use crate::listeners::Listeners;
use crate::notify::{Notifier, NotifyState};
use crate::protocol::channel::FromNew;
use crate::side::{self, Side};
use crate::spare::Spares;
use crate::upgrade::phase::{Lifecycle, OnHup, ReadyStep};
use crate::upgrade::Spawn;
use crate::{control, pidfile, protocol, signals, spare, task, Builder, Exit};

pub(crate) type StateProvider = Box<dyn Fn() -> State + Send + Sync>;
/// The bytes a state provider returned, as it returned them (not copied).
pub(crate) type State = Box<dyn AsRef<[u8]> + Send>;

/// How long a new process waits for room in the channel to tell its parent
/// that it let go.
const TELL_PARENT: Duration = Duration::from_secs(1);

/// What one process shares between its [`Handover`](crate::Handover)s.
pub(crate) struct Process<S> {
    pub(crate) config: Builder,
    /// How the next generation starts (the seam the unit tests fake).
    pub(crate) spawn: S,
    pub(crate) generation: u32,
    pub(crate) notify: Option<Notifier>,
    pub(crate) listeners: Mutex<Listeners>,
    pub(crate) life: Lifecycle,
    /// Fds kept free for the next upgrade.
    pub(crate) spares: Spares,
    /// The crate's own thread, where `ready()`, the signals, the control
    /// socket and upgrades run (`None` in unit tests: the caller's runtime).
    pub(crate) side: Option<Side>,
    state_provider: Mutex<Option<StateProvider>>,
    /// The state the parent handed over, until taken.
    handed_state: Mutex<Option<Vec<u8>>>,
    /// The control socket, until `ready()` serves it.
    control: Mutex<Option<std::os::unix::net::UnixListener>>,
    /// The handoff channel to the parent, until `ready()` says `ready`.
    parent: tokio::sync::Mutex<Option<ParentLink>>,
    /// Why this process gives up, for a parent still waiting for `ready`
    /// (see `Drop`).
    reason_for_parent: Mutex<Option<String>>,
    /// The channel to the parent once this process is main, while the
    /// parent drains: to tell it that this process let go.
    to_parent: Mutex<Option<Arc<tokio::net::UnixStream>>>,
}

/// What [`Process::new`] is made of, as `startup` found it.
pub(crate) struct Parts<S> {
    pub(crate) config: Builder,
    pub(crate) spawn: S,
    pub(crate) generation: u32,
    pub(crate) notify: Option<Notifier>,
    pub(crate) listeners: Listeners,
    pub(crate) control: Option<std::os::unix::net::UnixListener>,
    pub(crate) parent: Option<ParentLink>,
    pub(crate) handed_state: Vec<u8>,
    pub(crate) side: Option<Side>,
}

/// Writes one line to the parent (bounded by `TELL_PARENT`); a parent that
/// is gone is not an error worth more than a debug line.
fn say_to_parent(link: &tokio::net::UnixStream, msg: &FromNew) {
    let line = msg.line();
    if let Err(e) = crate::handoff::write_blocking(link.as_fd(), line.as_bytes(), TELL_PARENT) {
        tracing::debug!(error = %e, "cannot tell the parent");
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S> Process<S> {
    pub(crate) fn new(parts: Parts<S>) -> Process<S> {
        let first = parts.parent.is_none();
        Process {
            config: parts.config,
            spawn: parts.spawn,
            generation: parts.generation,
            notify: parts.notify,
            listeners: Mutex::new(parts.listeners),
            life: Lifecycle::new(first),
            spares: Spares::default(),
            side: parts.side,
            state_provider: Mutex::new(None),
            handed_state: Mutex::new(
                (!parts.handed_state.is_empty()).then_some(parts.handed_state),
            ),
            control: Mutex::new(parts.control),
            parent: tokio::sync::Mutex::new(parts.parent),
            reason_for_parent: Mutex::new(None),
            to_parent: Mutex::new(None),
        }
    }

    pub(crate) fn listeners(&self) -> MutexGuard<'_, Listeners> {
        lock(&self.listeners)
    }

    /// Runs `f` on the listeners (a `listen_*` call); see
    /// [`note_for_parent`](Self::note_for_parent).
    pub(crate) fn listen<T>(&self, f: impl FnOnce(&mut Listeners) -> Result<T>) -> Result<T> {
        let r = f(&mut self.listeners());
        self.note_for_parent(r)
    }

    /// Passes `r` through; if it failed, keeps its error as the reason this
    /// process gives its parent should it exit before `ready()` (the
    /// parent is told on `Drop`: under a service manager it cannot see the
    /// exit status).
    pub(crate) fn note_for_parent<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            *lock(&self.reason_for_parent) = Some(e.to_string());
        }
        r
    }

    pub(crate) fn set_state_provider(&self, provider: StateProvider) {
        *lock(&self.state_provider) = Some(provider);
    }

    pub(crate) fn take_handed_state(&self) -> Option<Vec<u8>> {
        lock(&self.handed_state).take()
    }

    /// The state for the next generation, from the provider.
    pub(crate) fn state_for_next(&self) -> State {
        lock(&self.state_provider)
            .as_ref()
            .map_or_else(|| Box::new(Vec::new()) as State, |f| f())
    }

    /// (Re)opens the spare fds the next upgrade needs (see `spare`).
    pub(crate) fn keep_spares(&self) {
        let n = self.listeners().for_handoff().len();
        // The image copies n listeners and the channel to 3+n+1 and above.
        self.spares.keep(n + spare::FIXED_SLOTS, 3 + n + 1);
    }

    /// Writes this process's PID to the PID file, with a spare fd freed for
    /// it (at the fd limit too).
    pub(crate) fn write_pid_file(&self, path: &Path) -> Result<()> {
        drop(self.spares.take(1));
        let r = pidfile::write(path, std::process::id());
        self.spares.refill();
        r
    }

    /// Tells a parent that still drains that this process let go of the
    /// service (`upgraded <pid>`, `stopping`), once.
    pub(crate) fn tell_parent(&self, msg: FromNew) {
        if let Some(link) = lock(&self.to_parent).take() {
            say_to_parent(&link, &msg);
        }
    }

    /// Tells a parent that waits for it that `ready()` is done (`serving`);
    /// the link stays, for what `tell_parent` says later.
    fn tell_parent_serving(&self) {
        let link = lock(&self.to_parent).clone();
        if let Some(link) = link {
            say_to_parent(&link, &FromNew::Serving);
        }
    }

    /// Keeps the channel to the parent, which drains now, until the parent
    /// closes it (it exited): what `tell_parent` says there tells it not to
    /// take the service back.
    fn keep_parent_link(self: &Arc<Self>, link: ParentLink)
    where
        S: Send + Sync + 'static,
    {
        let stream = Arc::new(link.into_stream());
        *lock(&self.to_parent) = Some(stream.clone());
        let weak = Arc::downgrade(self);
        task::spawn(async move {
            // The parent says nothing after `main`: readable means gone.
            let mut buf = [0u8; 64];
            loop {
                if stream.readable().await.is_err() {
                    break;
                }
                match stream.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            if let Some(p) = weak.upgrade() {
                lock(&p.to_parent).take();
            }
        });
    }

    /// Starts a graceful stop; see [`Handover::stop`](crate::Handover::stop).
    pub(crate) fn stop(&self) {
        // In flight until the stop has said all it says: `wait()` may run on
        // another thread, and a drain with nothing in flight would let the
        // process exit before `stopping` reached a draining parent (which
        // would then take the service back) or `STOPPING=1` the manager.
        let _in_flight = self.life.drain().watcher().guard();
        let stop = self.life.stop();
        self.tell_parent(FromNew::Stopping);
        if !stop.started {
            return;
        }
        // A new process that is not main yet must not: with
        // NotifyAccess=all, STOPPING=1 would stop the whole service.
        if let (true, Some(n)) = (stop.main, &self.notify) {
            if let Err(e) = n.notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]) {
                tracing::warn!(error = %e, "cannot send STOPPING=1");
            }
        }
        self.listeners().clear();
    }

    /// Waits for the drain to end; see [`Handover::wait`](crate::Handover::wait).
    pub(crate) async fn wait(&self) -> Exit {
        let drain = self.life.drain().watcher();
        let timeout = self.config.drain_timeout;
        let (reason, outcome, started) = loop {
            let reason = drain.draining().await;
            let started = Instant::now();
            let outcome = tokio::select! {
                o = drain.outcome(timeout) => o,
                () = self.life.drain().taken_back() => continue,
            };
            // Final from here on (unless it was taken back just now): the
            // listeners go, and a new process that dies now is not replaced.
            if self.life.settle() {
                break (reason, outcome, started);
            }
        };
        self.listeners().clear();
        let DrainOutcome {
            unfinished,
            long_lived_closed,
            long_lived_cut,
        } = outcome;
        if reason == DrainReason::Stopped {
            if let Some(path) = &self.config.pid_file {
                if let Err(e) = pidfile::remove_if_ours(path, std::process::id()) {
                    tracing::warn!(error = %e, "cannot remove the PID file");
                }
            }
        }
        let drain_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if unfinished > 0 {
            tracing::warn!(
                ?reason,
                unfinished,
                long_lived_closed,
                long_lived_cut,
                drain_ms,
                "drain timeout expired; exiting with work in flight"
            );
        } else {
            tracing::info!(?reason, drain_ms, long_lived_closed, "drained; exiting");
        }
        Exit {
            reason,
            unfinished,
            long_lived_closed,
            long_lived_cut,
        }
    }

    /// Pushes the listeners this process bound itself to the fd store, if
    /// configured (see [`Builder::fd_store`]). Only the main process may.
    fn push_to_fd_store(&self) {
        let (true, Some(n)) = (self.config.fd_store, &self.notify) else {
            return;
        };
        let listeners = self.listeners();
        for (name, fd) in listeners.for_handoff() {
            if !listeners.bound_here(name) {
                continue;
            }
            match n.notify_with_fds(&[NotifyState::FdStore { name }], &[fd]) {
                Ok(()) => tracing::debug!(name, "listener pushed to the fd store"),
                Err(e) => {
                    tracing::warn!(name, error = %e, "cannot push the listener to the fd store")
                }
            }
        }
    }
}

impl<S: Spawn> Process<S> {
    /// Becomes ready; see [`Handover::ready`](crate::Handover::ready).
    pub(crate) async fn ready(self: &Arc<Self>) -> Result<()> {
        match self.life.begin_ready() {
            ReadyStep::Go => {}
            ReadyStep::Again => return Ok(()),
            ReadyStep::Stopped => {
                // A parent must not hand over to a process that stops.
                if let Some(link) = self.parent.lock().await.take() {
                    link.fail("stopped before it was ready");
                }
                return Ok(());
            }
        }
        let pid = std::process::id();
        let link = self.parent.lock().await.take();
        let had_parent = link.is_some();
        let mut announced_by_parent = false;
        if let Some(mut link) = link {
            match link.ready().await {
                Ok(true) => {
                    announced_by_parent = true;
                    self.keep_parent_link(link);
                }
                Ok(false) => {
                    tracing::warn!("the parent went away before handing over; taking over anyway")
                }
                Err(e) => tracing::warn!(error = %e, "handoff channel failed; taking over anyway"),
            }
            self.life.now_main();
        }
        let unclaimed = self.listeners().close_unclaimed();
        if !unclaimed.is_empty() {
            tracing::info!(
                ?unclaimed,
                "closed passed sockets that no listen_* call claimed"
            );
        }
        // Spares first: the PID file says "ready", to people and to tests.
        self.keep_spares();
        let generation = self.generation;
        let mut status = format!("serving, generation {generation}, pid {pid}");
        if let Some(path) = &self.config.pid_file {
            match self.write_pid_file(path) {
                Ok(()) => {}
                // A first process fails before it serves: nothing is lost.
                Err(e) if !had_parent => return self.note_for_parent(Err(e)),
                // A new process: its parent has let go and is draining. An
                // error now would take the whole service down; serve without
                // the PID file instead, and make sure it names nobody else.
                Err(e) => {
                    let stale = pidfile::remove_if_other(path, pid);
                    tracing::error!(error = %e, removed_stale = ?stale, "cannot write the PID file; serving without it");
                    status.push_str(&format!("; {e}"));
                }
            }
        }
        if let Some(n) = &self.notify {
            let msg: &[NotifyState<'_>] = if announced_by_parent {
                &[NotifyState::Status(&status)]
            } else {
                &[NotifyState::Ready, NotifyState::Status(&status)]
            };
            let r = n.notify(msg).map_err(|cause| Error::Notify {
                socket: n.socket_name().to_owned(),
                cause,
            });
            self.note_for_parent(r)?;
        }
        self.push_to_fd_store();
        self.start_watchdog();
        let control = lock(&self.control).take();
        if let Some(l) = control {
            match tokio::net::UnixListener::from_std(l) {
                Ok(l) => {
                    task::spawn(control::serve(l, Arc::downgrade(self)));
                }
                Err(e) => tracing::error!(error = %e, "cannot serve the control socket"),
            }
        }
        let upgrade_asked = self.life.end_ready();
        // The parent starts its drain on this: its connections come here now.
        self.tell_parent_serving();
        tracing::info!(generation, pid, "ready");
        if upgrade_asked {
            let p = self.clone();
            task::spawn(async move {
                let _ = p.upgrade(None).await;
            });
        }
        Ok(())
    }

    fn start_watchdog(self: &Arc<Self>) {
        let Some(timeout) = protocol::env::watchdog(std::process::id()) else {
            return;
        };
        if self.notify.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        // On the application's runtime: a runtime too wedged to run this
        // must show as missed pings.
        side::spawn_on_app(self.side.as_ref(), async move {
            let mut tick = tokio::time::interval(timeout / 2);
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { break };
                // After a handoff the pings are the new process's job.
                if p.life.drain().watcher().reason() == Some(DrainReason::Upgraded) {
                    break;
                }
                if let Some(n) = &p.notify {
                    if let Err(e) = n.notify(&[NotifyState::Watchdog]) {
                        tracing::warn!(error = %e, "watchdog ping failed");
                    }
                }
            }
        });
    }

    /// Forwards SIGHUP, SIGTERM and SIGINT (installed already) to this
    /// process for as long as it lives.
    pub(crate) fn forward_signals(self: &Arc<Self>, installed: signals::Installed) {
        let weak = Arc::downgrade(self);
        installed.forward(self.side.as_ref(), move |req, name| {
            on_signal(&weak, req, name)
        });
    }
}

fn on_signal<S: Spawn>(weak: &Weak<Process<S>>, req: signals::Request, name: &'static str) -> bool {
    let Some(p) = weak.upgrade() else {
        return false;
    };
    match req {
        signals::Request::Stop => {
            tracing::info!(signal = name, "stop requested");
            p.stop();
        }
        signals::Request::Upgrade => match p.life.on_hup() {
            OnHup::Later => tracing::info!(
                signal = name,
                "upgrade requested before ready(); it will run once ready"
            ),
            OnHup::Now => {
                task::spawn(async move {
                    let _ = p.upgrade(None).await;
                });
            }
            OnHup::Coalesced => {
                tracing::info!(signal = name, "an upgrade is already running; coalesced")
            }
            OnHup::Ignored => tracing::info!(signal = name, "draining; upgrade request ignored"),
        },
    }
    true
}

impl<S> std::fmt::Debug for Process<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("generation", &self.generation)
            .field("phase", &self.life.phase())
            .finish_non_exhaustive()
    }
}

impl<S> Drop for Process<S> {
    fn drop(&mut self) {
        // A new process that gives up before ready() tells its parent why:
        // under a service manager the parent cannot see its exit status.
        if let Some(link) = self.parent.get_mut().as_ref() {
            let why = self.reason_for_parent.get_mut().ok().and_then(Option::take);
            link.fail(&why.unwrap_or_else(|| "exited before it was ready".into()));
        }
    }
}
