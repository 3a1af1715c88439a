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
//! # Modules
//!
//! The [`Handover`] (made by a [`Builder`]) is the whole life of one
//! process: its listeners, `ready()`, upgrades, the drain, `wait()`. Around
//! it:
//!
//! - [`drain`]: the drain's watchers ([`Drain`]), the in-flight count
//!   ([`DrainGuard`]) and the signal application code watches
//!   ([`DrainSignal`]);
//! - [`http`]: an HTTP/1 and HTTP/2 accept loop that drains without losing a
//!   request;
//! - [`notify`]: a strict `sd_notify(3)` client with typed messages and
//!   `BARRIER=1`;
//! - [`control`]: the control socket, for a reload command that waits for
//!   the outcome (`handover-reload`);
//! - [`logging`]: a `tracing` subscriber for journald or stderr;
//! - [`supervisor`]: the service manager behind `handover run`, for
//!   containers and a developer's terminal.
//!
//! How the crate is built inside (which module does what, and which way the
//! calls go) is in `docs/design.md` in the repository.
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
//! options (`CLONE_PIDFD`, pidfds, `SO_PEERCRED`) and on systemd's protocols.

#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "handover supports Linux only: it starts the new process with clone and pidfds and checks \
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
mod process;
mod protocol;
mod side;
mod signals;
mod spare;
mod startup;
pub mod supervisor;
#[allow(unsafe_code)]
mod sys;
mod task;
mod upgrade;

use std::ffi::OsString;
use std::future::Future;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use drain::{Drain, DrainGuard, DrainReason, DrainSignal, DrainTrigger};
pub use error::{Error, Result, UpgradeError};

use handoff::Reexec;
use process::Process;

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
            control_socket: control::default_socket(),
            state_limit: 16 << 20,
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

    /// Reads the inherited sockets, checks the PID file's directory, starts
    /// the crate's own thread (named `handover`: the signals, `ready()`,
    /// upgrades and the control socket run there) and installs the signal
    /// handlers. Must run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a tokio runtime;
    /// [`Error::Activation`] for a malformed activation environment (garbage
    /// `LISTEN_FDS`, a name count that does not match, a state length over
    /// the [`state_limit`](Self::state_limit));
    /// [`Error::InheritedSocket`] for a passed fd that is not open or not a
    /// socket; [`Error::Notify`] for a malformed `NOTIFY_SOCKET`;
    /// [`Error::PidFile`] for an unusable PID file directory;
    /// [`Error::Io`] when the crate's thread, the signal handlers, the
    /// handed-over state or the control socket cannot be had ([`Error::Bind`] when its path is
    /// taken).
    ///
    /// When it fails, the inherited listening sockets are left as they were
    /// found: everything that can be checked without them is checked before
    /// any of them is taken, and the few steps that need them give them
    /// back (open and inheritable) when they fail. A parent waiting on the
    /// handoff channel is told why.
    pub fn build(self) -> Result<Handover> {
        startup::build(self)
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
    inner: Arc<Process<Reexec>>,
}

impl Handover {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
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
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::DuplicateName`];
    /// [`Error::InheritedSocket`] when the passed socket of that name is not
    /// a listening TCP socket; [`Error::Bind`] when binding fails;
    /// [`Error::Io`] when tokio cannot register it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `TcpListener::from_std` does).
    pub fn listen_tcp(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<tokio::net::TcpListener> {
        self.inner.listen(|l| {
            let l = l.tcp(name, listeners::resolve(name, addr)?)?;
            tokio::net::TcpListener::from_std(l).map_err(|e| Error::io("register listener", e))
        })
    }

    /// A UDP socket named `name`; see [`listen_tcp`](Self::listen_tcp).
    ///
    /// # Errors
    ///
    /// As [`listen_tcp`](Self::listen_tcp), for a UDP socket.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn listen_udp(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<tokio::net::UdpSocket> {
        self.inner.listen(|l| {
            let s = l.udp(name, listeners::resolve(name, addr)?)?;
            tokio::net::UdpSocket::from_std(s).map_err(|e| Error::io("register socket", e))
        })
    }

    /// A Unix stream listener named `name` at `path`; see
    /// [`listen_tcp`](Self::listen_tcp). A stale socket file (nobody
    /// listening) is replaced; a live one is an error.
    ///
    /// # Errors
    ///
    /// As [`listen_tcp`](Self::listen_tcp), for a listening Unix stream
    /// socket; [`Error::Bind`] also when a live socket is at `path`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn listen_unix(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener> {
        self.inner.listen(|l| {
            let l = l.unix(name, path.as_ref())?;
            tokio::net::UnixListener::from_std(l).map_err(|e| Error::io("register listener", e))
        })
    }

    /// A Unix datagram socket named `name` at `path`; see
    /// [`listen_unix`](Self::listen_unix).
    ///
    /// # Errors
    ///
    /// As [`listen_unix`](Self::listen_unix), for a Unix datagram socket.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn listen_unix_datagram(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixDatagram> {
        self.inner.listen(|l| {
            let s = l.unix_datagram(name, path.as_ref())?;
            tokio::net::UnixDatagram::from_std(s).map_err(|e| Error::io("register socket", e))
        })
    }

    /// A watcher of this process's drain, with the in-flight counter its
    /// accept loops and connections share. It cannot start the drain: only
    /// [`stop`](Self::stop) and a successful upgrade do.
    pub fn drain(&self) -> Drain {
        self.inner.life.drain().watcher()
    }

    /// Where this process is in its life.
    pub fn phase(&self) -> Phase {
        self.inner.life.phase()
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
    /// parent has made it the service's main process; then its
    /// [`Drain::accept`]s go ahead (until then they wait, and the parent
    /// accepts for both), and it writes the PID file and accepts upgrades
    /// itself. A first process writes the PID file and sends `READY=1`.
    /// Passed fds that no `listen_*` call claimed are closed, and the fds
    /// the next upgrade needs are made ahead. A SIGHUP that came before runs
    /// its upgrade now. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::PidFile`] (a first process only: a process started by an
    /// upgrade whose parent has let go logs the error, removes a stale PID
    /// file and serves on without one); [`Error::Notify`] when the manager's
    /// notify socket refuses `READY=1`.
    ///
    /// # Cancel safety
    ///
    /// It runs on the crate's own thread (so that a busy runtime does not
    /// slow the handoff down); dropping the future does not cancel it: it
    /// runs to its end all the same, and only its error is lost (a second
    /// call does nothing). Await it to know.
    pub async fn ready(&self) -> Result<()> {
        self.ready_task().await
    }

    /// [`ready`](Self::ready)'s work, made here (see [`Entry`]).
    #[inline(never)]
    fn ready_task(&self) -> Entry<Result<()>> {
        let p = self.inner.clone();
        let done = side::run(p.side.as_ref(), {
            let p = p.clone();
            async move { p.ready().await }
        });
        Box::pin(async move { done.await.map_err(|e| Error::io("become ready", e))? })
    }

    /// Starts the new version of this program, hands it every listener, and
    /// waits until it is ready (at most the upgrade timeout, then up to 10 s
    /// for a manager's barrier and 1 s for its `serving`). On success it
    /// returns the new process's pid, and this process starts draining: let
    /// [`wait`](Self::wait) finish. On failure the new process has been
    /// killed and reaped, this process keeps serving, and the error says
    /// why. This is what SIGHUP does.
    ///
    /// ```no_run
    /// # async fn f(handover: handover::Handover) {
    /// match handover.upgrade().await {
    ///     Ok(pid) => tracing::info!(pid, "handed over"),
    ///     Err(e) => tracing::error!("still serving: {e}"),
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`]: refused at once ([`NotReady`](UpgradeError::NotReady),
    /// [`InProgress`](UpgradeError::InProgress),
    /// [`Draining`](UpgradeError::Draining)), or why the new process did not
    /// take over. In every case this process still serves on all its
    /// listeners.
    ///
    /// # Cancel safety
    ///
    /// The upgrade runs on the crate's own thread, as one started by SIGHUP
    /// does; dropping the future does not cancel it: it runs to its end
    /// (bounded as above) and logs its outcome. Should it
    /// panic, it is abandoned cleanly (the new process killed and reaped,
    /// the phase back to `Ready`, a `RELOADING=1` ended with `READY=1`) and
    /// the panic is resumed here.
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
    ///
    /// # Errors
    ///
    /// As [`upgrade`](Self::upgrade).
    ///
    /// # Cancel safety
    ///
    /// As [`upgrade`](Self::upgrade).
    pub async fn upgrade_with_env(
        &self,
        env: Option<Vec<(OsString, OsString)>>,
    ) -> Result<u32, UpgradeError> {
        self.upgrade_task(env).await
    }

    /// [`upgrade_with_env`](Self::upgrade_with_env)'s work, made here (see
    /// [`Entry`]).
    #[inline(never)]
    fn upgrade_task(
        &self,
        env: Option<Vec<(OsString, OsString)>>,
    ) -> Entry<Result<u32, UpgradeError>> {
        let p = self.inner.clone();
        let done = side::run(p.side.as_ref(), {
            let p = p.clone();
            async move { p.upgrade(env).await }
        });
        Box::pin(async move { done.await.map_err(UpgradeError::Channel)? })
    }

    /// Sets what the next upgrade hands to the new process: `provider` runs
    /// at each upgrade, just before the new process starts, and its bytes
    /// (at most the builder's [`state_limit`](Builder::state_limit)) travel
    /// over the handoff channel only, never through the environment or to
    /// any other child. The new process reads them with
    /// [`take_state`](Self::take_state). It runs on the crate's own thread.
    ///
    /// The provider returns anything that holds bytes: a `Vec<u8>` made
    /// for the occasion, or, for a large state, a cheap handle on bytes kept
    /// ready (`bytes::Bytes`, `Arc<[u8]>`), which are then sent as they are,
    /// not copied first.
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
    pub fn set_state<B>(&self, provider: impl Fn() -> B + Send + Sync + 'static)
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        self.inner
            .set_state_provider(Box::new(move || Box::new(provider()) as process::State));
    }

    /// The state the parent handed over, once (`None` without a parent, or
    /// when it handed none).
    pub fn take_state(&self) -> Option<Vec<u8>> {
        self.inner.take_handed_state()
    }

    /// Starts a graceful stop: `STOPPING=1`, stop accepting, finish
    /// in-flight work. This is what SIGTERM and SIGINT do. After a handoff
    /// it only makes the drain final, so that this process does not take
    /// the service back (the service lives on in the new process, and
    /// `STOPPING=1` from us would stop it). A process that has a draining
    /// parent tells it that it stops. `STOPPING=1` comes only from the
    /// service's main process.
    pub fn stop(&self) {
        self.inner.stop()
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
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only watches. Once it has returned, the drain is
    /// final and the listeners are gone.
    pub async fn wait(&self) -> Exit {
        self.wait_task().await
    }

    /// [`wait`](Self::wait)'s work, made here (see [`Entry`]).
    #[inline(never)]
    fn wait_task(&self) -> Entry<Exit> {
        let p = self.inner.clone();
        Box::pin(async move { p.wait().await })
    }
}

/// What a public `async fn` of [`Handover`] awaits: its work as a future
/// made by a non-generic, never-inlined function of this crate, so that the
/// machinery behind it (the upgrade, the handoff, the drain) is compiled
/// here once. Without the box, a program awaiting `ready()` carried a
/// second copy of all of it, compiled in its own crate (measured on
/// `examples/hello.rs`: the upgrade's state machine twice, 80 KB of code).
type Entry<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A state provider that panics makes the upgrade panic on the crate's
    /// thread, before any process starts. As `upgrade()` documents, the
    /// panic is resumed in its caller, and the upgrade is abandoned
    /// cleanly: the phase is `Ready` again, and the next upgrade runs (here
    /// refused at its state step, so that nothing is started).
    #[tokio::test]
    async fn a_panicking_upgrade_is_resumed_in_the_caller_and_leaves_the_process_ready() {
        const T: Duration = Duration::from_secs(10);
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            eprintln!("SKIP: NOTIFY_SOCKET is set; this test must not talk to a manager");
            return;
        }
        let handover = Handover::builder()
            .no_control_socket()
            .handle_signals(false)
            .state_limit(16)
            .build()
            .unwrap();
        let _listener = handover.listen_tcp("http", "127.0.0.1:0").unwrap();
        tokio::time::timeout(T, handover.ready())
            .await
            .unwrap()
            .unwrap();
        handover.set_state(|| -> Vec<u8> { panic!("the provider's own words") });
        let upgrade = tokio::spawn({
            let handover = handover.clone();
            async move { handover.upgrade().await }
        });
        let e = tokio::time::timeout(T, upgrade).await.unwrap().unwrap_err();
        assert!(e.is_panic(), "{e}");
        let panic = e.into_panic();
        assert_eq!(
            panic.downcast_ref::<&str>().copied(),
            Some("the provider's own words")
        );
        assert_eq!(handover.phase(), Phase::Ready);
        handover.set_state(|| vec![0u8; 17]);
        let again = tokio::time::timeout(T, handover.upgrade()).await.unwrap();
        assert!(
            matches!(
                again,
                Err(UpgradeError::StateTooLarge {
                    size: 17,
                    limit: 16
                })
            ),
            "{again:?}"
        );
        assert_eq!(handover.phase(), Phase::Ready);
    }
}
