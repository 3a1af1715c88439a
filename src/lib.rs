//! Lossless upgrades of a running tokio service, built around systemd.
//!
//! On `systemctl reload`, SIGHUP or [`Handover::upgrade`], the running
//! process starts the new version of its own binary and hands it every
//! listening socket. The new process initialises and calls
//! [`Handover::ready`]; the old one then tells systemd the new main PID,
//! stops accepting, finishes its in-flight work and exits. If the new
//! process fails, hangs or crashes, the old one keeps serving and says why.
//! No connection is refused and, with the [`http`] helper, no keep-alive
//! request is lost.
//!
//! ```no_run
//! # #[cfg(all(feature = "http", feature = "logging"))]
//! # mod app {
//! use std::process::ExitCode;
//! use std::time::Duration;
//!
//! use axum::{routing::get, Router};
//!
//! #[tokio::main]
//! async fn main() -> ExitCode {
//!     if let Err(e) = handover::logging::init() {
//!         eprintln!("{e}");
//!     }
//!     match run().await {
//!         Ok(()) => ExitCode::SUCCESS,
//!         Err(e) => {
//!             // Display is the whole sentence, its cause included.
//!             tracing::error!("{e}");
//!             ExitCode::FAILURE
//!         }
//!     }
//! }
//!
//! async fn run() -> Result<(), handover::Error> {
//!     let handover = handover::Handover::builder()
//!         .pid_file("/run/hello/hello.pid")
//!         .upgrade_timeout(Duration::from_secs(60))
//!         .drain_timeout(Duration::from_secs(30))
//!         .build()?;
//!     let listener = handover.listen_tcp("http", "127.0.0.1:8081")?;
//!     let app = Router::new().route("/", get(|| async { "hello\n" }));
//!     tokio::spawn(handover::http::serve(listener, app, handover.drain()));
//!     handover.ready().await?;
//!     let exit = handover.wait().await;
//!     tracing::info!(?exit, "bye");
//!     Ok(())
//! }
//! # }
//! # fn main() {}
//! ```
//!
//! Where each behaviour lives (one module per concept): `activation` reads
//! `LISTEN_*` strictly, `listeners` takes or binds sockets, `handoff` starts
//! the new process and speaks the handoff channel, [`notify`] talks to
//! systemd, [`drain`] counts in-flight work, [`http`] serves and drains
//! HTTP/1 and HTTP/2, [`control`] is the control socket for a truthful
//! reload, `pidfile` and `signals` do what they say, [`supervisor`] is the
//! service manager behind the `handover run` command (for containers and a
//! developer's terminal), and `sys` holds every `unsafe` block.
//!
//! # Cargo features
//!
//! Both are on by default. Without them (`default-features = false`) the
//! crate pulls no hyper, hyper-util, h2 or tracing-subscriber; `tracing`
//! itself stays, for the crate's own events.
//!
//! - `http`: the [`http`] module, an HTTP/1 and HTTP/2 accept loop on hyper
//!   that drains without losing a request.
//! - `logging`: the [`logging`] module, a `tracing` subscriber that writes
//!   to journald under systemd and to stderr otherwise.
//!
//! The crate enables only the tokio features it uses itself. The runtime
//! flavour is the application's choice: enable `rt-multi-thread` (what a
//! plain `#[tokio::main]` starts) in its own tokio dependency, or run a
//! `current_thread` runtime.
//!
//! # Platform
//!
//! Linux only: the upgrade is built on Linux system calls and socket
//! options (`clone3`, pidfds, `SO_PEERCRED`) and on systemd's protocols.

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "handover supports Linux only: it starts the new process with clone3 and pidfds and checks \
     the control socket's peers with SO_PEERCRED, which other systems do not have"
);

pub mod control;
pub mod drain;
mod error;
mod handoff;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
mod listeners;
#[cfg(feature = "logging")]
#[cfg_attr(docsrs, doc(cfg(feature = "logging")))]
pub mod logging;
pub mod notify;
mod pidfile;
mod protocol;
mod signals;
mod spare;
pub mod supervisor;
#[allow(unsafe_code)]
mod sys;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use drain::{Drain, DrainGuard, DrainReason, DrainSignal, DrainTrigger};
pub use error::{Error, Result, UpgradeError};

use handoff::{Executable, ParentLink};
use listeners::Listeners;
use notify::{Notifier, NotifyState};
use protocol::channel::FromNew;
use protocol::env::Found;

/// How long the old process waits for the manager to confirm `MAINPID=`.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new process's death may precede the stop that caused it.
const STOP_GRACE: Duration = Duration::from_millis(200);

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Built, listeners being set up; [`Handover::ready`] not called yet.
    Starting,
    /// Serving; upgrades are accepted.
    Ready,
    /// An upgrade is running; a SIGHUP now is coalesced into it.
    Upgrading,
    /// Handed over or stopping: finishing in-flight work, then exiting.
    /// Run by hand, back to `Ready` if the new process dies meanwhile.
    Draining,
}

/// Configures a [`Handover`].
///
/// ```no_run
/// # fn f() -> handover::Result<()> {
/// # let rt = tokio::runtime::Runtime::new().unwrap(); let _g = rt.enter();
/// let handover = handover::Handover::builder()
///     .pid_file("/run/app/app.pid")
///     .upgrade_timeout(std::time::Duration::from_secs(10))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pid_file: Option<PathBuf>,
    upgrade_timeout: Duration,
    drain_timeout: Duration,
    signals: bool,
    control_socket: Option<PathBuf>,
    state_limit: usize,
    fd_store: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            pid_file: None,
            upgrade_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            signals: true,
            control_socket: protocol::env::runtime_directory().map(|d| d.join(CONTROL_SOCKET_FILE)),
            state_limit: DEFAULT_STATE_LIMIT,
            fd_store: false,
        }
    }
}

impl Builder {
    /// Writes the PID of the serving process to `path` (atomically) once it
    /// is ready; each new generation replaces it. Default: none.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// How long a new process may take from start to `ready()` before it is
    /// killed and the upgrade fails. Default: 60 s. Keep systemd's
    /// `TimeoutStartSec=` above it.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// How long in-flight work may take after the drain starts before
    /// [`Handover::wait`] returns anyway. Default: 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Serves the control socket (see [`control`]) at `path`, for a reload
    /// command that waits for the outcome. Default: `handover.sock` in
    /// `$RUNTIME_DIRECTORY` when systemd sets it (`RuntimeDirectory=`),
    /// else none.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_socket = Some(path.into());
        self
    }

    /// No control socket, even under `RuntimeDirectory=`.
    pub fn no_control_socket(mut self) -> Self {
        self.control_socket = None;
        self
    }

    /// The most state (see [`Handover::set_state`]) one upgrade may carry.
    /// Default: 16 MiB.
    pub fn state_limit(mut self, bytes: usize) -> Self {
        self.state_limit = bytes;
        self
    }

    /// Also pushes each socket this process binds itself to systemd's fd
    /// store (`FDSTORE=1`, `FDNAME=<listener name>`; the unit needs
    /// `FileDescriptorStoreMax=`), so that after a crash and
    /// `Restart=on-failure` the service comes back on the same sockets, with
    /// the connections that queued meanwhile. A safety net for crashes, not
    /// the upgrade path. Default: off.
    pub fn fd_store(mut self, yes: bool) -> Self {
        self.fd_store = yes;
        self
    }

    /// Whether SIGHUP (upgrade) and SIGTERM/SIGINT (stop) are handled.
    /// Default: true.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.signals = yes;
        self
    }

    /// Reads the inherited sockets, checks the PID file's directory and
    /// installs the signal handlers. Must run inside a tokio runtime.
    ///
    /// Errors: a malformed activation environment (garbage `LISTEN_FDS`,
    /// a name count that does not match, an fd that is not a socket), an
    /// unusable PID file directory, a malformed `NOTIFY_SOCKET`. No inherited
    /// fd is touched when it fails.
    pub fn build(self) -> Result<Handover> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let pid = std::process::id();
        let vars = protocol::env::Vars::from_env();
        // Everything is validated before any inherited fd is touched.
        let found = protocol::env::read(&vars, pid, self.state_limit)
            .inspect_err(|e| report_to_parent(&vars, pid, e))?;
        let (passed, link, generation, state_len) = match found {
            Found::Nothing => (Vec::new(), None, 0, 0),
            Found::NotOurs(why) => {
                tracing::warn!("ignoring the socket activation environment: {why}");
                (Vec::new(), None, 0, 0)
            }
            Found::Ours(activation) => {
                let (generation, state_len) = (activation.generation, activation.state_len);
                let (inherited, link) =
                    listeners::take(activation).inspect_err(|e| report_to_parent(&vars, pid, e))?;
                (inherited, link, generation, state_len)
            }
        };
        let (link, state) = match link {
            Some(fd) => {
                let (link, state) = ParentLink::new(fd, state_len).map_err(|(e, fd)| {
                    let e = Error::io("read the handed-over state", e);
                    if let Some(fd) = fd {
                        handoff::fail_raw(std::os::fd::AsFd::as_fd(&fd), &e.to_string());
                    }
                    e
                })?;
                (Some(link), state)
            }
            None => (None, Vec::new()),
        };
        let fail = |e: Error| {
            if let Some(l) = &link {
                l.fail(&e.to_string());
            }
            e
        };
        let notify = Notifier::from_env().map_err(fail)?;
        if let Some(p) = &self.pid_file {
            pidfile::check(p).map_err(fail)?;
        }
        let first = link.is_none();
        let mut listeners = Listeners::new(passed);
        let control = match &self.control_socket {
            Some(path) => Some(control_listener(&mut listeners, path).map_err(fail)?),
            None => None,
        };
        let drain = DrainTrigger::new();
        let (phase, _) = watch::channel(Phase::Starting);
        let inner = Arc::new(Inner {
            exe: Executable::current(),
            generation,
            notify,
            listeners: Mutex::new(listeners),
            control: Mutex::new(control),
            state: Mutex::new((!state.is_empty()).then_some(state)),
            state_provider: Mutex::new(None),
            parent: tokio::sync::Mutex::new(link),
            drain,
            phase,
            pending_upgrade: AtomicBool::new(false),
            ready_called: AtomicBool::new(false),
            is_main: AtomicBool::new(first),
            last_error: Mutex::new(None),
            spares: spare::Spares::default(),
            to_parent: Mutex::new(None),
            config: self,
        });
        if inner.config.signals {
            let weak = Arc::downgrade(&inner);
            signals::spawn(move |req, name| on_signal(&weak, req, name))
                .map_err(|e| Error::io("install signal handlers", e))?;
        }
        tracing::debug!(generation, pid, exe = %inner.exe.path.display(), "handover built");
        Ok(Handover { inner })
    }
}

const CONTROL_SOCKET_FILE: &str = "handover.sock";
const DEFAULT_STATE_LIMIT: usize = 16 << 20;

fn control_listener(
    listeners: &mut Listeners,
    path: &Path,
) -> Result<std::os::unix::net::UnixListener> {
    // Bound here: created with mode 0600. Inherited: as the first
    // generation created it. Never chmod by path: in a directory others can
    // write to, the path may name another file by now.
    let l = listeners.control(path)?;
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        tracing::warn!(
            path = %path.display(),
            "the control socket's file is gone or was replaced; reload commands cannot reach this service there"
        );
    }
    Ok(l)
}

type StateProvider = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

/// A child whose environment is broken still tells its parent why, if it
/// can find the channel at all.
fn report_to_parent(vars: &protocol::env::Vars, pid: u32, e: &Error) {
    if let Some(fd) = vars.channel_for(pid) {
        let _ = sys::with_borrowed(fd, |fd| handoff::fail_raw(fd, &e.to_string()));
    }
}

fn on_signal(weak: &Weak<Inner>, req: signals::Request, name: &'static str) -> bool {
    let Some(inner) = weak.upgrade() else {
        return false;
    };
    let handover = Handover { inner };
    match req {
        signals::Request::Stop => {
            tracing::info!(signal = name, "stop requested");
            handover.stop();
        }
        signals::Request::Upgrade => match handover.phase() {
            Phase::Starting => {
                tracing::info!(
                    signal = name,
                    "upgrade requested before ready(); it will run once ready"
                );
                handover
                    .inner
                    .pending_upgrade
                    .store(true, Ordering::Release);
            }
            Phase::Ready => {
                tokio::spawn(async move {
                    let _ = handover.upgrade().await;
                });
            }
            Phase::Upgrading => {
                tracing::info!(signal = name, "an upgrade is already running; coalesced")
            }
            Phase::Draining => tracing::info!(signal = name, "draining; upgrade request ignored"),
        },
    }
    true
}

struct Inner {
    config: Builder,
    exe: Executable,
    generation: u32,
    notify: Option<Notifier>,
    listeners: Mutex<Listeners>,
    control: Mutex<Option<std::os::unix::net::UnixListener>>,
    state: Mutex<Option<Vec<u8>>>,
    state_provider: Mutex<Option<StateProvider>>,
    parent: tokio::sync::Mutex<Option<ParentLink>>,
    drain: DrainTrigger,
    phase: watch::Sender<Phase>,
    pending_upgrade: AtomicBool,
    ready_called: AtomicBool,
    /// Whether the manager knows this process as the service's main one:
    /// from the start for a first process, after the handoff for a new one.
    is_main: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Fds kept free for the next upgrade.
    spares: spare::Spares,
    /// The handoff channel to the parent, once this process is main and
    /// while the parent lives: to tell it that this process let go.
    to_parent: Mutex<Option<Arc<tokio::net::UnixStream>>>,
}

impl Inner {
    /// (Re)opens the spare fds the next upgrade needs (see `spare`).
    fn keep_spares(&self) {
        let n = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .for_handoff()
            .len();
        // The image copies n listeners and the channel to 3+n+1 and above.
        self.spares.keep(n + spare::FIXED, 3 + n + 1);
    }

    /// Keeps the channel to the parent, which drains now, until the parent
    /// closes it (it exited): what `tell_parent` says there tells it not to
    /// take the service back.
    fn keep_parent_link(self: &Arc<Self>, link: ParentLink) {
        let stream = Arc::new(link.into_stream());
        *self.to_parent.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream.clone());
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
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
            if let Some(inner) = weak.upgrade() {
                inner
                    .to_parent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
            }
        });
    }

    /// Tells a parent that still drains that this process let go of the
    /// service (`upgraded <pid>`, `stopping`), once.
    fn tell_parent(&self, msg: FromNew) {
        let link = self
            .to_parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(link) = link {
            let line = msg.line();
            let r = handoff::write_blocking(
                std::os::fd::AsFd::as_fd(&*link),
                line.as_bytes(),
                Duration::from_secs(1),
            );
            if let Err(e) = r {
                tracing::debug!(error = %e, "cannot tell the parent");
            }
        }
    }

    /// Writes this process's PID to the PID file, with a spare fd freed for
    /// it (at the fd limit too).
    fn write_pid_file(&self, path: &Path) -> Result<()> {
        drop(self.spares.take(1));
        let r = pidfile::write(path, std::process::id());
        self.spares.refill();
        r
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("generation", &self.generation)
            .field("exe", &self.exe)
            .field("phase", &*self.phase.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A new process that gives up before ready() tells its parent why:
        // under a service manager the parent cannot see its exit status.
        if let Some(link) = self.parent.get_mut().as_ref() {
            let why = self.last_error.get_mut().map(|e| e.take()).ok().flatten();
            link.fail(&why.unwrap_or_else(|| "exited before it was ready".into()));
        }
    }
}

/// Ends an upgrade on every way out, including a panic or a dropped
/// future: the phase leaves `Upgrading` (back to `Ready`, or `Draining` if
/// a drain started), and a `RELOADING=1` that was sent is ended with
/// `READY=1`, so that neither the next upgrade nor `systemctl reload` waits
/// for ever.
struct UpgradeGuard<'a> {
    inner: &'a Inner,
    generation: u32,
    /// `RELOADING=1` was sent.
    reloading: bool,
    /// The outcome was logged and told to the manager.
    settled: bool,
}

impl Drop for UpgradeGuard<'_> {
    fn drop(&mut self) {
        let draining = self.inner.drain.watcher().is_draining();
        if !self.settled {
            let generation = self.generation;
            tracing::error!(
                generation,
                outcome = "failed",
                "upgrade interrupted; still serving"
            );
            if let (true, false, Some(n)) = (self.reloading, draining, &self.inner.notify) {
                let status = format!(
                    "upgrade to generation {generation} interrupted; still serving, pid {}",
                    std::process::id()
                );
                let _ = n.notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            self.inner.keep_spares();
        }
        self.inner.phase.send_if_modified(|p| {
            let upgrading = *p == Phase::Upgrading;
            if upgrading {
                *p = if draining {
                    Phase::Draining
                } else {
                    Phase::Ready
                };
            }
            upgrading
        });
    }
}

/// How a process's service ended; returned by [`Handover::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Handed over to a new process, or stopped.
    pub reason: DrainReason,
    /// In-flight work still running when the drain timeout expired (0 when
    /// everything finished).
    pub unfinished: usize,
    /// Long-lived connections and streams (upgraded connections such as
    /// WebSockets, streaming responses such as server-sent events; see
    /// [`DrainGuard::set_long_lived`]) that ended during the drain, before
    /// its timeout.
    pub long_lived_closed: usize,
    /// Long-lived connections and streams still open at the drain timeout,
    /// cut when this process exits. Part of `unfinished`.
    pub long_lived_cut: usize,
}

/// The handle on one process's part in the service's life. Cheap to clone;
/// all clones are the same process.
///
/// See the [crate documentation](crate) for a complete program.
#[derive(Debug, Clone)]
pub struct Handover {
    inner: Arc<Inner>,
}

impl Handover {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn record<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if let Ok(mut last) = self.inner.last_error.lock() {
                *last = Some(e.to_string());
            }
        }
        r
    }

    /// Pushes the listeners this process bound itself to the fd store, if
    /// configured (see [`Builder::fd_store`]). Only the main process may.
    fn push_to_fd_store(&self) {
        let (true, Some(n)) = (self.inner.config.fd_store, &self.inner.notify) else {
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

    fn listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A TCP listener named `name`: the inherited one with that name (or the
    /// next unnamed one) if this process was given sockets, else bound on
    /// `addr`. The name travels to the next generation in `LISTEN_FDNAMES`;
    /// under systemd it is the `.socket` unit's `FileDescriptorName=`.
    ///
    /// ```no_run
    /// # async fn f(handover: handover::Handover) -> handover::Result<()> {
    /// let listener = handover.listen_tcp("http", "127.0.0.1:8081")?;
    /// # Ok(()) }
    /// ```
    pub fn listen_tcp(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<tokio::net::TcpListener> {
        let r = resolve(name, addr).and_then(|addr| {
            let l = self.listeners().tcp(name, addr)?;
            tokio::net::TcpListener::from_std(l).map_err(|e| Error::io("register listener", e))
        });
        self.record(r)
    }

    /// A UDP socket named `name`; see [`listen_tcp`](Self::listen_tcp).
    pub fn listen_udp(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<tokio::net::UdpSocket> {
        let r = resolve(name, addr).and_then(|addr| {
            let s = self.listeners().udp(name, addr)?;
            tokio::net::UdpSocket::from_std(s).map_err(|e| Error::io("register socket", e))
        });
        self.record(r)
    }

    /// A Unix stream listener named `name` at `path`; see
    /// [`listen_tcp`](Self::listen_tcp). A stale socket file (nobody
    /// listening) is replaced; a live one is an error.
    pub fn listen_unix(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener> {
        let r = self.listeners().unix(name, path.as_ref()).and_then(|l| {
            tokio::net::UnixListener::from_std(l).map_err(|e| Error::io("register listener", e))
        });
        self.record(r)
    }

    /// A Unix datagram socket named `name` at `path`; see
    /// [`listen_unix`](Self::listen_unix).
    pub fn listen_unix_datagram(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixDatagram> {
        let r = self
            .listeners()
            .unix_datagram(name, path.as_ref())
            .and_then(|s| {
                tokio::net::UnixDatagram::from_std(s).map_err(|e| Error::io("register socket", e))
            });
        self.record(r)
    }

    /// A watcher of this process's drain, with the in-flight counter its
    /// accept loops and connections share. It cannot start the drain: only
    /// [`stop`](Self::stop) and a successful upgrade do.
    pub fn drain(&self) -> Drain {
        self.inner.drain.watcher()
    }

    /// Where this process is in its life.
    pub fn phase(&self) -> Phase {
        *self.inner.phase.borrow()
    }

    /// 0 for a process started by hand or by systemd; the parent's plus one
    /// for a process started by an upgrade.
    pub fn generation(&self) -> u32 {
        self.inner.generation
    }

    /// Whether this process was started by an upgrade (tableflip's
    /// `HasParent`).
    pub fn has_parent(&self) -> bool {
        self.inner.generation > 0
    }

    /// Declares this process initialised: every listener it needs is set up.
    ///
    /// A process started by an upgrade tells its parent and waits until the
    /// parent has made it the service's main process; then it writes the
    /// PID file and accepts upgrades itself. A first process writes the PID
    /// file and sends `READY=1`. Passed fds that no `listen_*` call claimed
    /// are closed, and spare fds are opened for the next upgrade. Calling it
    /// again does nothing.
    ///
    /// Errors: [`Error::PidFile`] (a first process only: a process started
    /// by an upgrade whose parent has let go logs the error, removes a
    /// stale PID file and serves on without one), [`Error::Notify`].
    pub async fn ready(&self) -> Result<()> {
        if self.inner.ready_called.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let pid = std::process::id();
        let link = self.inner.parent.lock().await.take();
        if self.inner.drain.watcher().is_draining() {
            // Stopped before it was ready: a parent must not hand over to us.
            if let Some(link) = &link {
                link.fail("stopped before it was ready");
            }
            return Ok(());
        }
        let mut announced_by_parent = false;
        let had_parent = link.is_some();
        if let Some(mut link) = link {
            match link.ready().await {
                Ok(true) => {
                    announced_by_parent = true;
                    self.inner.keep_parent_link(link);
                }
                Ok(false) => {
                    tracing::warn!("the parent went away before handing over; taking over anyway")
                }
                Err(e) => tracing::warn!(error = %e, "handoff channel failed; taking over anyway"),
            }
        }
        let unclaimed = self.listeners().close_unclaimed();
        if !unclaimed.is_empty() {
            tracing::info!(
                ?unclaimed,
                "closed passed sockets that no listen_* call claimed"
            );
        }
        // Spares first: the PID file says "ready", to people and to tests.
        self.inner.keep_spares();
        let generation = self.inner.generation;
        let mut status = format!("serving, generation {generation}, pid {pid}");
        if let Some(path) = &self.inner.config.pid_file {
            match self.inner.write_pid_file(path) {
                Ok(()) => {}
                // A first process fails before it serves: nothing is lost.
                Err(e) if !had_parent => return self.record(Err(e)),
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
        if let Some(n) = &self.inner.notify {
            let msg: &[NotifyState<'_>] = if announced_by_parent {
                &[NotifyState::Status(&status)]
            } else {
                &[NotifyState::Ready, NotifyState::Status(&status)]
            };
            let r = n.notify(msg).map_err(|source| Error::Notify {
                socket: n.socket_name().to_owned(),
                cause: source,
            });
            self.record(r)?;
        }
        self.inner.is_main.store(true, Ordering::Release);
        self.push_to_fd_store();
        self.start_watchdog();
        let control = self.inner.control.lock().ok().and_then(|mut c| c.take());
        if let Some(l) = control {
            match tokio::net::UnixListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(control::serve(l, self.clone()));
                }
                Err(e) => tracing::error!(error = %e, "cannot serve the control socket"),
            }
        }
        self.inner.phase.send_if_modified(|p| {
            let starting = *p == Phase::Starting;
            if starting {
                *p = Phase::Ready;
            }
            starting
        });
        tracing::info!(generation, pid, "ready");
        if self.inner.pending_upgrade.swap(false, Ordering::AcqRel) {
            let h = self.clone();
            tokio::spawn(async move {
                let _ = h.upgrade().await;
            });
        }
        Ok(())
    }

    fn start_watchdog(&self) {
        let Some(timeout) = protocol::env::watchdog(std::process::id()) else {
            return;
        };
        if self.inner.notify.is_none() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let period = timeout / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                // After a handoff the pings are the new process's job.
                if inner.drain.watcher().reason() == Some(DrainReason::Upgraded) {
                    break;
                }
                if let Some(n) = &inner.notify {
                    if let Err(e) = n.notify(&[NotifyState::Watchdog]) {
                        tracing::warn!(error = %e, "watchdog ping failed");
                    }
                }
            }
        });
    }

    /// Starts the new version of this program, hands it every listener, and
    /// waits until it is ready (at most the upgrade timeout). On success it
    /// returns the new process's pid, and this process starts draining: let
    /// [`wait`](Self::wait) finish. On failure the new process has been
    /// killed and reaped, this process keeps serving, and the error says
    /// why. This is what SIGHUP does.
    ///
    /// Every way out of an upgrade (a panic, or this future dropped,
    /// included) leaves the phase `Ready` or `Draining`, never `Upgrading`,
    /// and ends a `RELOADING=1` with `READY=1`.
    ///
    /// ```no_run
    /// # async fn f(handover: handover::Handover) {
    /// match handover.upgrade().await {
    ///     Ok(pid) => tracing::info!(pid, "handed over"),
    ///     Err(e) => tracing::error!("still serving: {e}"),
    /// }
    /// # }
    /// ```
    pub async fn upgrade(&self) -> Result<u32, UpgradeError> {
        self.upgrade_with_env(None).await
    }

    /// Like [`upgrade`](Self::upgrade), but the new process runs with `env`
    /// instead of this process's environment (when `Some`). This is how
    /// `systemctl reload` applies a changed `Environment=` or
    /// `EnvironmentFile=`: the reload command sends the unit's current
    /// environment. Taken from this process instead, whatever `env` says:
    /// `NOTIFY_SOCKET`, `JOURNAL_STREAM`, `WATCHDOG_USEC` and the handoff's
    /// own `LISTEN_*`/`HANDOVER_*`; dropped: `MAINPID`, `MANAGERPID`,
    /// `SYSTEMD_EXEC_PID`, `WATCHDOG_PID`. The environment is never logged.
    pub async fn upgrade_with_env(
        &self,
        env: Option<Vec<(std::ffi::OsString, std::ffi::OsString)>>,
    ) -> Result<u32, UpgradeError> {
        let mut refused = None;
        self.inner.phase.send_if_modified(|p| match p {
            Phase::Ready => {
                *p = Phase::Upgrading;
                true
            }
            Phase::Starting => {
                refused = Some(UpgradeError::NotReady);
                false
            }
            Phase::Upgrading => {
                refused = Some(UpgradeError::InProgress);
                false
            }
            Phase::Draining => {
                refused = Some(UpgradeError::Draining);
                false
            }
        });
        if let Some(e) = refused {
            return Err(e);
        }
        let mut guard = UpgradeGuard {
            inner: &self.inner,
            generation: self.inner.generation + 1,
            reloading: false,
            settled: false,
        };
        self.run_upgrade(env.as_deref(), &mut guard).await
    }

    async fn run_upgrade(
        &self,
        env: Option<&[(std::ffi::OsString, std::ffi::OsString)]>,
        guard: &mut UpgradeGuard<'_>,
    ) -> Result<u32, UpgradeError> {
        let inner = &*self.inner;
        let started = Instant::now();
        let old_pid = std::process::id();
        let generation = guard.generation;
        let timeout = inner.config.upgrade_timeout;
        tracing::info!(generation, old_pid, exe = %inner.exe.path.display(), "upgrade started");
        if let Some(n) = &inner.notify {
            let extend = timeout.saturating_add(BARRIER_TIMEOUT);
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
        let result = self.handoff(generation, timeout, env).await;
        if let Err(
            UpgradeError::ChildExited { .. }
            | UpgradeError::ChildFailed { .. }
            | UpgradeError::Channel(_),
        ) = &result
        {
            // A stop signals every process of the service at once (systemd's
            // KillMode=control-group, Ctrl-C in a terminal): the new process
            // may die of it a moment before this one sees its own. Give that
            // stop a moment to arrive, so it is not reported as a failure.
            let _ = tokio::time::timeout(STOP_GRACE, inner.drain.watcher().draining()).await;
        }
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(new_pid) => {
                tracing::info!(
                    generation,
                    old_pid,
                    new_pid,
                    elapsed_ms,
                    outcome = "ok",
                    "upgrade complete; draining"
                );
            }
            Err(e) if inner.drain.watcher().reason() == Some(DrainReason::Stopped) => {
                // The stop already told the manager (STOPPING=1).
                tracing::info!(generation, old_pid, elapsed_ms, outcome = "cancelled", reason = %e, "upgrade cancelled: stopping");
            }
            Err(e) => {
                tracing::error!(generation, old_pid, elapsed_ms, outcome = "failed", reason = %e, "upgrade failed; still serving");
                if guard.reloading {
                    let status = format!("upgrade to generation {generation} failed: {e}; still serving, pid {old_pid}");
                    if let Some(n) = &inner.notify {
                        if let Err(e) =
                            n.notify(&[NotifyState::Ready, NotifyState::Status(&status)])
                        {
                            tracing::warn!(error = %e, "cannot send READY=1 after the failed upgrade");
                        }
                    }
                }
                inner.keep_spares();
            }
        }
        guard.settled = true;
        result
    }

    async fn handoff(
        &self,
        generation: u32,
        timeout: Duration,
        env: Option<&[(std::ffi::OsString, std::ffi::OsString)]>,
    ) -> Result<u32, UpgradeError> {
        let inner = &*self.inner;
        let reparent = inner.notify.is_some();
        let state = match &*inner
            .state_provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            Some(f) => f(),
            None => Vec::new(),
        };
        if state.len() > inner.config.state_limit {
            return Err(UpgradeError::StateTooLarge {
                size: state.len(),
                limit: inner.config.state_limit,
            });
        }
        // At the fd limit the next steps need the spares' slots: free them
        // right before each step, with no await in between.
        let mut spares = inner.spares.take(usize::MAX);
        let for_barrier = spares.split_off(spares.len().saturating_sub(2));
        let for_pidfd = spares.pop();
        drop(spares);
        let launch = {
            let listeners = self.listeners();
            handoff::prepare(
                &inner.exe,
                &listeners.for_handoff(),
                &listeners.configured(),
                generation,
                reparent,
                env,
                state.len(),
            )?
        };
        let mut child = launch.run(for_pidfd).await?;
        let new_pid = child.pid;
        tracing::info!(
            generation,
            new_pid,
            "new process started; waiting for it to be ready"
        );
        tokio::select! {
            r = child.wait_ready(&inner.exe.path, timeout, &state) => r?,
            _ = inner.drain.watcher().draining() => {
                child.kill().await;
                return Err(UpgradeError::Stopped);
            }
        }
        if let Some(n) = &inner.notify {
            let status = format!("serving, generation {generation}, pid {new_pid}");
            let announce = [
                NotifyState::MainPid(new_pid),
                NotifyState::Ready,
                NotifyState::Status(&status),
            ];
            if let Err(source) = n.notify(&announce) {
                child.kill().await;
                return Err(UpgradeError::Announce {
                    pid: new_pid,
                    cause: source,
                });
            }
            drop(for_barrier);
            if let Err(e) = n.barrier(BARRIER_TIMEOUT).await {
                tracing::warn!(error = %e, "the manager did not confirm MAINPID=; handing over anyway");
            }
        }
        if let Err(e) = child.confirm_main().await {
            // It died right after saying ready: take the service back.
            if let Some(n) = &inner.notify {
                let _ = n.notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
            }
            child.kill().await;
            return Err(UpgradeError::Channel(e));
        }
        child.handed_over();
        if reparent {
            // The manager supervises the new process now: if it dies, the
            // manager decides (Restart=), not us.
            inner.drain.start(DrainReason::Upgraded);
            self.listeners().clear();
        } else {
            // Run by hand: nobody else would restart the service if the new
            // process died while this one drains. Keep the listeners (not
            // accepting) so that this one can take the service back.
            inner.drain.start_revocable(DrainReason::Upgraded);
        }
        inner.phase.send_replace(Phase::Draining);
        inner.tell_parent(FromNew::Upgraded(new_pid));
        self.watch_new_process(child);
        Ok(new_pid)
    }

    /// Follows the new process after the handoff until it exits (and reaps
    /// it, if it is ours). If it dies while this process drains, without
    /// having handed the service on or been stopped, this process takes the
    /// service back (run by hand only).
    fn watch_new_process(&self, mut child: handoff::Child) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let pid = child.pid;
            let mut let_go = None;
            let status = loop {
                match child.next_event().await {
                    handoff::Event::Said(what) => {
                        // It handed over or stops: no taking back from now.
                        if let Some(inner) = weak.upgrade() {
                            inner.drain.settle();
                        }
                        tracing::debug!(new_pid = pid, said = ?what, "the new process let go of the service");
                        let_go = Some(what);
                    }
                    handoff::Event::Exited(status) => break status,
                }
            };
            let Some(inner) = weak.upgrade() else { return };
            Handover { inner }.new_process_exited(pid, &status, let_go.as_ref());
        });
    }

    fn new_process_exited(&self, pid: u32, status: &str, let_go: Option<&FromNew>) {
        let inner = &*self.inner;
        if let Some(said) = let_go {
            tracing::debug!(new_pid = pid, %status, ?said, "the new process exited");
            return;
        }
        if inner.notify.is_some() {
            tracing::warn!(new_pid = pid, %status, "the new process exited while this one was draining; the service manager decides what happens next");
            return;
        }
        if !inner.drain.take_back() {
            tracing::warn!(new_pid = pid, %status, "the new process exited while this one was stopping; not taking the service back");
            return;
        }
        // Serving again: the accept loops resume on the listeners this
        // process kept; connections that came meanwhile waited in their
        // backlogs.
        if let Some(path) = &inner.config.pid_file {
            if let Err(e) = inner.write_pid_file(path) {
                tracing::error!(error = %e, "cannot write the PID file after taking the service back");
            }
        }
        inner.keep_spares();
        inner.phase.send_replace(Phase::Ready);
        tracing::warn!(
            new_pid = pid,
            %status,
            pid = std::process::id(),
            generation = inner.generation,
            "the new process died while this one was draining; took the service back"
        );
    }

    /// Sets what the next upgrade hands to the new process: `provider` runs
    /// at each upgrade, just before the new process starts, and its bytes
    /// (at most the builder's [`state_limit`](Builder::state_limit)) travel
    /// over the handoff channel only, never through the environment or to
    /// any other child. The new process reads them with
    /// [`take_state`](Self::take_state).
    ///
    /// ```no_run
    /// # async fn f(handover: handover::Handover) {
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    ///
    /// let start = handover
    ///     .take_state()
    ///     .and_then(|b| String::from_utf8(b).ok()?.parse().ok())
    ///     .unwrap_or(0);
    /// let hits = Arc::new(AtomicU64::new(start));
    /// let h = hits.clone();
    /// handover.set_state(move || h.load(Ordering::SeqCst).to_string().into_bytes());
    /// # }
    /// ```
    pub fn set_state(&self, provider: impl Fn() -> Vec<u8> + Send + Sync + 'static) {
        *self
            .inner
            .state_provider
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(provider));
    }

    /// The state the parent handed over, once (`None` without a parent, or
    /// when it handed none).
    pub fn take_state(&self) -> Option<Vec<u8>> {
        self.inner.state.lock().ok()?.take()
    }

    /// Starts a graceful stop: `STOPPING=1`, stop accepting, finish
    /// in-flight work. This is what SIGTERM and SIGINT do. After a handoff
    /// it only makes the drain final, so that this process does not take
    /// the service back (the service lives on in the new process, and
    /// `STOPPING=1` from us would stop it). A process that has a draining
    /// parent tells it that it stops.
    pub fn stop(&self) {
        // Also makes a drain after a handoff final: once asked to stop, this
        // process never takes the service back.
        let started = self.inner.drain.start(DrainReason::Stopped);
        self.inner.tell_parent(FromNew::Stopping);
        if !started {
            return;
        }
        self.inner.phase.send_replace(Phase::Draining);
        // A new process that is not main yet must not: with
        // NotifyAccess=all, STOPPING=1 would stop the whole service.
        let main = self.inner.is_main.load(Ordering::Acquire);
        if let (true, Some(n)) = (main, &self.inner.notify) {
            if let Err(e) = n.notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]) {
                tracing::warn!(error = %e, "cannot send STOPPING=1");
            }
        }
        self.listeners().clear();
    }

    /// Resolves when this process should exit: the drain started (handoff
    /// or stop) and every [`DrainGuard`] is gone, or the drain timeout
    /// expired. On a stop it also removes the PID file if it still holds
    /// this process's PID.
    ///
    /// Run by hand (no service manager), the drain after a handoff is taken
    /// back if the new process dies without having handed the service on or
    /// been stopped: this process then accepts again (the crate's accept
    /// loops resume on the listeners they kept, see [`Drain::resumed`]),
    /// rewrites the PID file, is [`Phase::Ready`], and `wait` waits for the
    /// next drain.
    pub async fn wait(&self) -> Exit {
        let drain = &self.inner.drain;
        let watcher = drain.watcher();
        let timeout = self.inner.config.drain_timeout;
        let (reason, outcome, started) = loop {
            let reason = watcher.draining().await;
            let started = Instant::now();
            let outcome = tokio::select! {
                o = watcher.outcome(timeout) => o,
                () = drain.taken_back() => continue,
            };
            // Final from here on (unless it was taken back just now): the
            // listeners go, and a new process that dies now is not replaced.
            if drain.settle() {
                break (reason, outcome, started);
            }
        };
        self.listeners().clear();
        let drain::DrainOutcome {
            unfinished,
            long_lived_closed,
            long_lived_cut,
        } = outcome;
        if reason == DrainReason::Stopped {
            if let Some(path) = &self.inner.config.pid_file {
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
}

fn resolve(name: &str, addr: impl ToSocketAddrs) -> Result<SocketAddr> {
    let bind_err = |source| Error::Bind {
        name: name.to_owned(),
        addr: "the given address".into(),
        cause: source,
    };
    addr.to_socket_addrs()
        .map_err(bind_err)?
        .next()
        .ok_or_else(|| {
            bind_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address",
            ))
        })
}
