//! The crate's error types.
//!
//! Each error's `Display` is a whole sentence for an operator, its cause
//! included ("cannot bind \"http\" on 127.0.0.1:8081: Address already in
//! use"), so `source()` returns `None`: a report that walks the chain
//! (anyhow's `{:#}` or `{:?}`, eyre) prints the cause once, not twice. The
//! cause is still there for code: every variant that has one keeps it in a
//! public `cause` field.

use std::io;
use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `handover`.
///
/// Each variant says what was being done and carries the underlying cause,
/// so that `Display` alone reads as a complete sentence for an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket-activation environment (`LISTEN_FDS`, `LISTEN_PID`,
    /// `LISTEN_FDNAMES`) or the handoff channel from a parent is malformed.
    /// No inherited fd was touched.
    #[error("invalid socket activation environment: {0}")]
    Activation(String),

    /// An inherited fd is not the kind of socket the caller asked for.
    #[error("inherited fd {fd} named {name:?} {problem}")]
    InheritedSocket {
        /// The listener name that matched.
        name: String,
        /// The fd number as inherited.
        fd: i32,
        /// What is wrong with it.
        problem: String,
    },

    /// Binding a listener failed.
    #[error("cannot bind {name:?} on {addr}: {cause}")]
    Bind {
        /// The listener name.
        name: String,
        /// The address asked for.
        addr: String,
        /// The OS error.
        cause: io::Error,
    },

    /// `listen_*` was called twice with the same name.
    #[error("a listener named {0:?} exists already")]
    DuplicateName(String),

    /// A listener name that cannot travel in `LISTEN_FDNAMES`.
    #[error("invalid listener name {0:?}: use 1-255 characters, no ':' and no control characters")]
    InvalidName(String),

    /// The PID file could not be written or its directory is unusable.
    #[error("PID file {path}: {cause}")]
    PidFile {
        /// The PID file's path.
        path: PathBuf,
        /// The OS error.
        cause: io::Error,
    },

    /// Talking to the service manager's notify socket failed.
    #[error("sd_notify to {socket}: {cause}")]
    Notify {
        /// The `NOTIFY_SOCKET` value.
        socket: String,
        /// The OS error.
        cause: io::Error,
    },

    /// `build()` must run inside a tokio runtime (it starts the signal task).
    #[error("handover must be built inside a tokio runtime")]
    NoRuntime,

    /// An upgrade failed; the old process keeps serving.
    #[error("upgrade failed: {0}")]
    Upgrade(UpgradeError),

    /// A system call failed.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        cause: io::Error,
    },
}

/// Why an upgrade did not happen. In every case the old process still
/// serves on all its listeners, and the new process (if one was started) has
/// been killed and reaped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// Another upgrade is running; this request joined nothing.
    #[error("an upgrade is already in progress")]
    InProgress,
    /// `ready()` has not been called yet, or this process is not (yet) the
    /// service's main process.
    #[error("this process is not ready yet")]
    NotReady,
    /// This process already handed over or is stopping.
    #[error("this process is draining")]
    Draining,
    /// Starting the new process failed before `execve`.
    #[error("cannot start {exe}: {cause}")]
    Spawn {
        /// The executable.
        exe: String,
        /// The OS error.
        cause: io::Error,
    },
    /// `execve` of the new binary failed (for example: not executable).
    #[error("cannot execute {exe}: {cause}")]
    Exec {
        /// The executable.
        exe: String,
        /// The OS error from `execve`.
        cause: io::Error,
    },
    /// The new process reported a failure before it was ready.
    #[error("new process {pid} failed: {reason}")]
    ChildFailed {
        /// Its pid.
        pid: u32,
        /// What it said.
        reason: String,
    },
    /// The new process exited before it was ready.
    #[error("new process {pid} exited before it was ready ({status})")]
    ChildExited {
        /// Its pid.
        pid: u32,
        /// How it ended, as far as this process can know.
        status: String,
    },
    /// The new process was made main, but exited before it said it serves
    /// (its `ready()` done): this process never let go of the service and
    /// serves on, its PID file rewritten (and, under a manager,
    /// `MAINPID=` naming it again).
    #[error("new process {pid} took over but exited before it served ({status})")]
    DiedBeforeServing {
        /// Its pid.
        pid: u32,
        /// How it ended, as far as this process can know.
        status: String,
    },
    /// The new process did not become ready within the upgrade timeout.
    #[error("new process {pid} was not ready within {timeout:?}; killed")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The configured upgrade timeout.
        timeout: std::time::Duration,
    },
    /// The service manager could not be told about the new main process.
    #[error("cannot announce new process {pid} to the service manager: {cause}")]
    Announce {
        /// The new process's pid.
        pid: u32,
        /// The notify error.
        cause: io::Error,
    },
    /// A stop was requested while the upgrade ran.
    #[error("stopped during the upgrade")]
    Stopped,
    /// The state handed to the new process exceeds the configured limit.
    #[error("state of {size} bytes exceeds the limit of {limit} bytes")]
    StateTooLarge {
        /// The size given.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Talking to the new process over the handoff channel failed.
    #[error("handoff channel: {0}")]
    Channel(io::Error),
}

impl From<UpgradeError> for Error {
    fn from(e: UpgradeError) -> Self {
        Error::Upgrade(e)
    }
}

impl Error {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Error {
        Error::Io {
            what,
            cause: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report that walks the chain prints each cause once.
    #[test]
    fn anyhow_prints_the_cause_once() {
        let in_use = || io::Error::from_raw_os_error(libc::EADDRINUSE);
        let denied = || io::Error::from_raw_os_error(libc::EACCES);
        let cases: Vec<(anyhow::Error, String)> = vec![
            (
                Error::Bind {
                    name: "http".into(),
                    addr: "127.0.0.1:8081".into(),
                    cause: in_use(),
                }
                .into(),
                format!("cannot bind \"http\" on 127.0.0.1:8081: {}", in_use()),
            ),
            (
                Error::from(UpgradeError::Exec {
                    exe: "/usr/local/bin/hello".into(),
                    cause: denied(),
                })
                .into(),
                format!(
                    "upgrade failed: cannot execute /usr/local/bin/hello: {}",
                    denied()
                ),
            ),
            (
                anyhow::Error::from(Error::Io {
                    what: "take inherited fds",
                    cause: in_use(),
                })
                .context("starting the service"),
                format!("starting the service: take inherited fds: {}", in_use()),
            ),
        ];
        for (e, sentence) in cases {
            assert_eq!(format!("{e:#}"), sentence);
            let cause = sentence.rsplit(": ").next().unwrap();
            let debug = format!("{e:?}");
            assert_eq!(debug.matches(cause).count(), 1, "{debug}");
        }
    }
}
