//! A small service manager for places without systemd (a container, whose
//! PID 1 is the program; a developer's terminal): what the `handover run`
//! command does.
//!
//! It holds the listening sockets across restarts, starts the program with
//! them in systemd's layout (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`)
//! and a `NOTIFY_SOCKET` of its own, follows `READY=1`, `RELOADING=1`,
//! `MAINPID=`, `STOPPING=1`, `STATUS=` and `BARRIER=1` with systemd's
//! semantics, reaps every child (and every orphan, as PID 1 or as a
//! subreaper), forwards SIGTERM, SIGINT and SIGQUIT (and SIGUSR1, SIGUSR2)
//! to the program, reloads on SIGHUP or on its control socket, and exits
//! with the program's status.
//!
//! Two ways to reload ([`ReloadMode`]):
//!
//! - `Restart` (the default; any program, in any language): start a new
//!   instance on the same sockets, wait until it is ready (`READY=1`, or
//!   [`Readiness::After`] for a program that cannot notify), then SIGTERM
//!   the old one and wait for it (at most the stop timeout, then SIGKILL). A
//!   new instance that exits or is not ready in time is killed; the old one
//!   keeps serving.
//! - `Handoff` (a program built on handover, or any program that hands its
//!   sockets to its new version itself): send it SIGHUP and follow
//!   `RELOADING=1`, then `MAINPID=<new>` + `READY=1`. Because
//!   `NOTIFY_SOCKET` is set, handover starts the new process with
//!   `CLONE_PARENT`, so it is the supervisor's child, exactly as it is
//!   systemd's under systemd.
//!
//! The sockets are shared, not re-bound: a connection that arrives during a
//! reload waits in the listening socket's backlog until an instance accepts
//! it, so none is refused.
//!
//! ```no_run
//! use handover::supervisor::{self, Config, ProgramExit};
//!
//! // Call it first thing in `main`, before any other thread starts.
//! let config = Config::new("/usr/local/bin/app")
//!     .arg("--verbose")
//!     .listener("http=127.0.0.1:8081".parse()?);
//! let exit: ProgramExit = supervisor::run(config)?;
//! std::process::exit(exit.code());
//! # Ok::<(), supervisor::SupervisorError>(())
//! ```
//!
//! `docs/containers.md` describes the command, its flags and its logs.

mod control;
mod dir;
mod instance;
mod notify;
mod spec;
mod state;

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;

pub use dir::runtime_dir;
pub use spec::{parse_seconds, ListenAddress, ListenerSpec, SocketKind};

use crate::listeners::{self, Listeners};
use crate::protocol::env::{self, Found};
use crate::sys;

/// How a reload is done; see the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReloadMode {
    /// Start a new instance on the same sockets, then stop the old one.
    #[default]
    Restart,
    /// Send SIGHUP; the program starts its new version itself and
    /// announces it with `MAINPID=` + `READY=1`.
    Handoff,
}

impl std::str::FromStr for ReloadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "restart" => Ok(ReloadMode::Restart),
            "handoff" => Ok(ReloadMode::Handoff),
            other => Err(format!(
                "unknown reload mode {other:?}: use restart or handoff"
            )),
        }
    }
}

/// When a newly started instance counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// When it sends `READY=1` to `NOTIFY_SOCKET`.
    #[default]
    Notify,
    /// When its `execve` has succeeded and it has been running this long
    /// (for programs that cannot notify; `READY=1` counts too). The sockets
    /// are shared, so a connection that arrives before the program accepts
    /// waits in the backlog; what this bets on is that the program does not
    /// fail after that.
    After(Duration),
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramExit {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ProgramExit {
    /// The exit code a shell would report: the status, or 128 + the signal.
    pub fn code(&self) -> i32 {
        match *self {
            ProgramExit::Code(c) => c,
            ProgramExit::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ProgramExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ProgramExit::Code(c) => write!(f, "exit status {c}"),
            ProgramExit::Signal(s) => match Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// Why the supervisor could not start, or gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// A `-l` listener specification is malformed.
    #[error("invalid listener {spec:?}: {problem}")]
    ListenerSpec {
        /// The specification as given.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The supervisor's name (for its socket files) is unusable.
    #[error("invalid name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'")]
    Name(String),
    /// Taking or binding a listener failed (the socket-activation
    /// environment is malformed, an address is in use, ...).
    #[error(transparent)]
    Sockets(#[from] crate::Error),
    /// The runtime directory is unusable.
    #[error("runtime directory {path}: {problem}")]
    RuntimeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The control socket could not be set up.
    #[error("control socket {path}: {problem}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// No control socket was given, and none (or several) were found in
    /// the runtime directory.
    #[error("{0}")]
    NoControlSocket(String),
    /// The program cannot be run.
    #[error("cannot run {program}: {problem}")]
    Program {
        /// The program as given.
        program: String,
        /// What is wrong.
        problem: String,
    },
    /// [`run`] was called while other threads run: it must block its
    /// signals in every thread and read them from a signalfd.
    #[error(
        "the supervisor must start before any other thread ({0} threads run): it blocks its \
         signals in every thread and reads them from a signalfd"
    )]
    Threads(usize),
    /// The program was not ready within the ready timeout; it was stopped.
    #[error("{0}")]
    NotReady(String),
    /// A system call failed.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        cause: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SupervisorError {
    move |source| SupervisorError::Io {
        what,
        cause: source,
    }
}

/// Where the control socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ControlPath {
    /// `<runtime dir>/<name>.sock`.
    Default,
    At(PathBuf),
    Off,
}

/// What to run and how; see [`run`].
#[derive(Debug, Clone)]
pub struct Config {
    program: OsString,
    args: Vec<OsString>,
    listeners: Vec<ListenerSpec>,
    reload: ReloadMode,
    readiness: Readiness,
    ready_timeout: Duration,
    stop_timeout: Duration,
    name: Option<String>,
    control: ControlPath,
}

impl Config {
    /// Runs `program` (a path, or a name looked up in `PATH`) with no
    /// arguments, no listeners of its own (the supervisor's socket
    /// activation, if any, is passed on), restart reloads, `READY=1`
    /// readiness, a 60 s ready timeout, a 30 s stop timeout, and the
    /// control socket at its default path.
    pub fn new(program: impl Into<OsString>) -> Config {
        Config {
            program: program.into(),
            args: Vec::new(),
            listeners: Vec::new(),
            reload: ReloadMode::Restart,
            readiness: Readiness::Notify,
            ready_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
            name: None,
            control: ControlPath::Default,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Config {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = impl Into<OsString>>>(mut self, args: I) -> Config {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds a listener, bound by the supervisor (or taken by name from its
    /// own socket activation) and passed to every instance, in the order
    /// given. With at least one, passed sockets no listener claims are
    /// closed; with none, every passed socket is passed on as it is.
    pub fn listener(mut self, spec: ListenerSpec) -> Config {
        self.listeners.push(spec);
        self
    }

    /// How to reload. Default: [`ReloadMode::Restart`].
    pub fn reload(mut self, mode: ReloadMode) -> Config {
        self.reload = mode;
        self
    }

    /// When a new instance counts as ready. Default: [`Readiness::Notify`].
    pub fn readiness(mut self, readiness: Readiness) -> Config {
        self.readiness = readiness;
        self
    }

    /// How long an instance may take to be ready: the first one (then the
    /// supervisor stops it and fails), and a reload's (then the reload
    /// fails; a new instance is killed). Extended by the program's
    /// `EXTEND_TIMEOUT_USEC=`. Default: 60 s.
    pub fn ready_timeout(mut self, timeout: Duration) -> Config {
        self.ready_timeout = timeout;
        self
    }

    /// How long an old instance (after SIGTERM) and, on a stop, every
    /// instance may take to exit before SIGKILL. Default: 30 s.
    pub fn stop_timeout(mut self, timeout: Duration) -> Config {
        self.stop_timeout = timeout;
        self
    }

    /// The name of the default control socket and of the notify socket in
    /// the runtime directory. Default: the program's file name.
    pub fn name(mut self, name: impl Into<String>) -> Config {
        self.name = Some(name.into());
        self
    }

    /// Serves the control socket at `path` instead of
    /// `<runtime dir>/<name>.sock`.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Config {
        self.control = ControlPath::At(path.into());
        self
    }

    /// No control socket.
    pub fn no_control_socket(mut self) -> Config {
        self.control = ControlPath::Off;
        self
    }

    fn resolved_name(&self) -> Result<String, SupervisorError> {
        match &self.name {
            Some(n) => spec::check_supervisor_name(n).map(|()| n.clone()),
            None => Ok(spec::name_from_program(&self.program)),
        }
    }
}

/// The default control socket of the supervisor named `name`:
/// `<runtime dir>/<name>.sock` (see [`runtime_dir`]).
///
/// # Errors
///
/// [`SupervisorError::Name`] when `name` cannot be a file name here.
pub fn default_control_socket(name: &str) -> Result<PathBuf, SupervisorError> {
    spec::check_supervisor_name(name)?;
    Ok(runtime_dir().join(format!("{name}.sock")))
}

/// The control socket `handover reload` talks to without `--control`:
/// `<runtime dir>/<name>.sock` with a name, else the only `*.sock` in the
/// runtime directory.
///
/// # Errors
///
/// [`SupervisorError::Name`] for an unusable name;
/// [`SupervisorError::NoControlSocket`] when the runtime directory cannot
/// be read, holds no control socket, or several (name one).
pub fn find_control_socket(name: Option<&str>) -> Result<PathBuf, SupervisorError> {
    if let Some(name) = name {
        return default_control_socket(name);
    }
    let dir = runtime_dir();
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            SupervisorError::NoControlSocket(format!(
                "no supervisor found: cannot read {}: {e} (is `handover run` running as this \
                 user? give --control PATH)",
                dir.display()
            ))
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(SupervisorError::NoControlSocket(format!(
            "no supervisor found: no control socket in {} (give --control PATH)",
            dir.display()
        ))),
        _ => Err(SupervisorError::NoControlSocket(format!(
            "several supervisors run: {}; name one",
            found
                .iter()
                .filter_map(|p| p.file_stem())
                .map(|s| s.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The signals the supervisor handles, blocked and read from a signalfd.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// Runs the program under the supervisor until it has exited and every
/// instance is gone; returns how the (last) main process ended. Blocks.
///
/// Call it first thing in `main`, before any other thread starts
/// ([`SupervisorError::Threads`] otherwise): it blocks SIGTERM, SIGINT,
/// SIGQUIT, SIGHUP, SIGCHLD, SIGUSR1 and SIGUSR2 and reads them from a
/// signalfd, which also tells it who sent each one (a Ctrl-C the terminal
/// already delivered to the program is not sent twice). They stay blocked
/// when it returns: exit with the status. It runs its own single-threaded
/// tokio runtime. The instances start with every signal unblocked and
/// default dispositions.
///
/// # Errors
///
/// Before the program starts: [`SupervisorError::Threads`],
/// [`SupervisorError::ListenerSpec`] and [`SupervisorError::Sockets`] (a
/// listener cannot be had), [`SupervisorError::Name`],
/// [`SupervisorError::RuntimeDir`], [`SupervisorError::Control`],
/// [`SupervisorError::Program`] (it cannot be run), [`SupervisorError::Io`].
/// After: [`SupervisorError::NotReady`] when the first instance was not
/// ready within the ready timeout (it was stopped). A program that exits,
/// however it exits, is not an error: its status is the `Ok` value.
pub fn run(config: Config) -> Result<ProgramExit, SupervisorError> {
    let threads = thread_count();
    if threads > 1 {
        return Err(SupervisorError::Threads(threads));
    }
    let mask = handled_signals();
    mask.thread_block()
        .map_err(|e| io_err("block signals")(e.into()))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| io_err("create a signalfd")(e.into()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("start the runtime"))?;
    rt.block_on(supervise(config, signals))
}

/// The fds passed to the supervisor by its own socket activation.
fn inherited() -> Result<Vec<listeners::Inherited>, SupervisorError> {
    let vars = env::Vars::from_env().activation_only();
    match env::read(&vars, std::process::id(), 0)? {
        Found::Nothing => Ok(Vec::new()),
        Found::NotOurs(why) => {
            tracing::warn!("ignoring the socket activation environment: {why}");
            Ok(Vec::new())
        }
        Found::Ours(activation) => Ok(listeners::take(activation)?.0),
    }
}

/// The sockets to hand to every instance, in order.
fn sockets(specs: &[ListenerSpec]) -> Result<Vec<(String, OwnedFd)>, SupervisorError> {
    let passed = inherited()?;
    if specs.is_empty() {
        return Ok(passed.into_iter().map(|p| (p.name, p.fd)).collect());
    }
    let mut l = Listeners::new(passed);
    let mut out = Vec::new();
    for s in specs {
        let fd: OwnedFd = match (s.kind, &s.address) {
            (SocketKind::Tcp, ListenAddress::Inet(a)) => l.tcp(&s.name, *a)?.into(),
            (SocketKind::Udp, ListenAddress::Inet(a)) => l.udp(&s.name, *a)?.into(),
            (SocketKind::UnixStream, ListenAddress::Unix(p)) => l.unix(&s.name, p)?.into(),
            (SocketKind::UnixDatagram, ListenAddress::Unix(p)) => {
                l.unix_datagram(&s.name, p)?.into()
            }
            _ => {
                return Err(SupervisorError::ListenerSpec {
                    spec: s.name.clone(),
                    problem: "the kind does not fit the address".into(),
                })
            }
        };
        // Passed blocking, as systemd passes them: the supervisor never
        // accepts, and a program that expects a blocking socket gets one.
        // (The flag lives on the shared open file description: a program
        // that sets it sets it for every instance.)
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| io_err("read fd flags")(e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| io_err("clear O_NONBLOCK")(e.into()))?;
        tracing::debug!(name = %s.name, address = %s.address, "listener ready");
        out.push((s.name.clone(), fd));
    }
    let unclaimed = l.close_unclaimed();
    if !unclaimed.is_empty() {
        tracing::info!(?unclaimed, "closed passed sockets that no listener claimed");
    }
    Ok(out)
}

/// Binds the control socket (a stale file is replaced, a live one is an
/// error: another supervisor serves there).
fn control_listener(path: &Path) -> Result<tokio::net::UnixListener, SupervisorError> {
    let problem = |p: String| SupervisorError::Control {
        path: path.to_owned(),
        problem: p,
    };
    let std = Listeners::new(Vec::new())
        .unix("control", path)
        .map_err(|e| match e {
            crate::Error::Bind { cause: source, .. }
                if source.kind() == io::ErrorKind::AddrInUse =>
            {
                problem("another supervisor serves there already".into())
            }
            other => problem(other.to_string()),
        })?;
    tokio::net::UnixListener::from_std(std).map_err(|e| problem(e.to_string()))
}

/// Removes the control socket file on the way out, when it is in the
/// supervisor's private directory (a path given elsewhere is left; the
/// next start replaces a stale file).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn supervise(config: Config, signals: SignalFd) -> Result<ProgramExit, SupervisorError> {
    let signals = sys::async_signalfd(signals).map_err(io_err("watch the signalfd"))?;
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans will not be reaped here");
    }
    let name = config.resolved_name()?;
    let program =
        instance::resolve_program(&config.program).map_err(|problem| SupervisorError::Program {
            program: config.program.to_string_lossy().into_owned(),
            problem,
        })?;
    let dir = runtime_dir();
    dir::ensure_private(&dir)?;
    let sockets = sockets(&config.listeners)?;

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (control_path, _remove) = match &config.control {
        ControlPath::Off => (None, RemoveOnDrop(None)),
        ControlPath::Default => {
            let p = dir.join(format!("{name}.sock"));
            (Some(p.clone()), RemoveOnDrop(Some(p)))
        }
        ControlPath::At(p) => (Some(p.clone()), RemoveOnDrop(None)),
    };
    if let Some(path) = &control_path {
        let listener = control_listener(path)?;
        tokio::spawn(control::serve(listener, tx.clone()));
    }
    let notify_path = dir.join(format!("{name}.{}.notify", std::process::id()));
    let notify = notify::NotifySocket::bind(&notify_path).map_err(|e| SupervisorError::Io {
        what: "bind the notify socket",
        cause: e,
    })?;

    let mut argv = vec![config.program.clone()];
    argv.extend(config.args.iter().cloned());
    let launcher = instance::Launcher::new(
        program.clone(),
        argv,
        std::env::vars_os(),
        notify.path(),
        sockets,
    );
    let settings = state::Settings {
        reload: config.reload,
        readiness: config.readiness,
        ready_timeout: config.ready_timeout,
        stop_timeout: config.stop_timeout,
    };
    tracing::info!(
        name,
        control = ?control_path,
        notify = %notify.path().display(),
        pid1 = std::process::id() == 1,
        "supervisor starting"
    );
    let state = state::State::start(settings, launcher).map_err(|e| SupervisorError::Program {
        program: program.display().to_string(),
        problem: e.to_string(),
    })?;
    let outcome = drive(state, &signals, &notify, rx).await?;
    drop(tx);
    match outcome {
        state::Outcome::Exited(status) => {
            tracing::info!(%status, code = status.code(), "supervisor exiting");
            Ok(status)
        }
        state::Outcome::NotReady(why) => Err(SupervisorError::NotReady(why)),
    }
}

async fn drive(
    mut state: state::State,
    signals: &AsyncFd<SignalFd>,
    notify: &notify::NotifySocket,
    mut requests: tokio::sync::mpsc::Receiver<control::Request>,
) -> Result<state::Outcome, SupervisorError> {
    while !state.finished() {
        let deadline = state.next_deadline();
        let exec = state.exec_watch();
        tokio::select! {
            r = signals.readable() => {
                let mut guard = r.map_err(io_err("wait for signals"))?;
                guard.clear_ready();
                // Messages a process sent before it exited are processed
                // before its exit (as systemd dispatches notify messages
                // before SIGCHLD): a MAINPID= right before the old main
                // process exits must not look like the service's end.
                receive_notify(notify, &mut state);
                while let Some(info) = signals
                    .get_ref()
                    .read_signal()
                    .map_err(|e| io_err("read the signalfd")(e.into()))?
                {
                    state.on_signal(info);
                }
            }
            r = notify.readable() => {
                r.map_err(io_err("wait for notify messages"))?;
                receive_notify(notify, &mut state);
            }
            Some(req) = requests.recv() => state.on_request(req),
            _ = async {
                match exec {
                    Some(fd) => instance::exec_readable(fd).await,
                    None => std::future::pending().await,
                }
            } => state.on_exec(),
            _ = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => state.on_timers(),
        }
    }
    Ok(state.outcome())
}

/// Processes every notify message waiting, in order.
fn receive_notify(notify: &notify::NotifySocket, state: &mut state::State) {
    loop {
        match notify.try_recv() {
            Ok(Some(d)) => state.on_datagram(d),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive a notify message");
                return;
            }
        }
    }
}
