//! The control socket: a truthful `systemctl reload`.
//!
//! With `ExecReload=/bin/kill -HUP $MAINPID`, `systemctl reload` returns
//! before the upgrade has even started. The control socket lets a reload
//! command ask for the upgrade and wait for its outcome. It belongs to the
//! service, not to one process: it is handed to each new generation like any
//! other listener, never unlinked and rebound, so a request that arrives
//! during a handoff waits in the shared backlog.
//!
//! The protocol, one request per connection, one reply line (all of it,
//! limits included, in `docs/truthful-reload.md`; the code in
//! `src/protocol/control.rs`):
//!
//! | request | reply |
//! |---|---|
//! | `upgrade\n` | `ok <new pid>\n`, `error <reason>\n`, or `cancelled <reason>\n` when the service is being stopped |
//! | `upgrade env <n>\n` then `n` bytes of `KEY=VALUE\0...` | as above; the new process gets this environment (see [`Handover::upgrade_with_env`](crate::Handover::upgrade_with_env)) |
//! | `status\n` | `ok <phase> generation=<g> pid=<pid>\n` |
//!
//! The peer must run as the same user as the service, or as root
//! (`SO_PEERCRED`); any other gets `error permission denied\n` (after its
//! request was read). The socket file is created with mode 0600.

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::drain::{Drain, DrainReason};
use crate::process::Process;
use crate::protocol::control::{Connection, EnvTooLarge, Reply, Request, MAX_REPLY};
use crate::task;
use crate::upgrade::Spawn;

pub use crate::protocol::control::MAX_ENV_BYTES;

/// The control socket's file in the service's runtime directory.
const FILE: &str = "handover.sock";

/// Where the control socket is by default: `handover.sock` in
/// `$RUNTIME_DIRECTORY` (its first entry, if absolute), which systemd sets
/// for a unit with `RuntimeDirectory=`. What [`Builder`](crate::Builder)
/// serves and `handover-reload` asks, unless told otherwise.
pub fn default_socket() -> Option<std::path::PathBuf> {
    crate::protocol::env::runtime_directory().map(|d| d.join(FILE))
}

/// Why a control request failed, as seen by the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Nobody listens at the socket (the service is not running, or has no
    /// control socket).
    #[error("cannot connect to {path}: {cause}")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        cause: io::Error,
    },
    /// The environment to send exceeds [`MAX_ENV_BYTES`].
    #[error("the environment is {size} bytes, more than the limit of {MAX_ENV_BYTES}")]
    EnvTooLarge {
        /// Its size.
        size: usize,
    },
    /// The service answered that it could not do it.
    #[error("{0}")]
    Refused(String),
    /// The service is being stopped; the upgrade did not happen and will
    /// not.
    #[error("cancelled by stop: {0}")]
    Cancelled(String),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed mid-request, or the answer was malformed.
    #[error("control connection: {0}")]
    Io(io::Error),
}

/// Asks the service behind `socket` to upgrade, and waits (at most
/// `timeout`) for the outcome. With `env`, the new process runs with that
/// environment instead of the old process's. Returns the new main PID.
///
/// This is what the `handover-reload` command does for `ExecReload=`.
///
/// # Errors
///
/// [`ControlError::Connect`] when nothing listens at `socket`;
/// [`ControlError::EnvTooLarge`] before sending an environment over
/// [`MAX_ENV_BYTES`]; [`ControlError::Refused`] with the service's reason
/// when the upgrade failed (the service still serves);
/// [`ControlError::Cancelled`] when the service is being stopped;
/// [`ControlError::Timeout`] without an answer within `timeout`;
/// [`ControlError::Io`] when the connection fails or the answer is
/// malformed.
///
/// ```no_run
/// let pid = handover::control::request_upgrade(
///     "/run/hello/handover.sock".as_ref(),
///     None,
///     std::time::Duration::from_secs(90),
/// )?;
/// println!("now served by {pid}");
/// # Ok::<(), handover::control::ControlError>(())
/// ```
pub fn request_upgrade(
    socket: &Path,
    env: Option<&[(OsString, OsString)]>,
    timeout: Duration,
) -> Result<u32, ControlError> {
    let request = Request::Upgrade(env.map(<[_]>::to_vec))
        .encode()
        .map_err(|EnvTooLarge(size)| ControlError::EnvTooLarge { size })?;
    let reply = exchange(socket, &request, timeout)?;
    reply.parse().map_err(|_| {
        ControlError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply {reply:?}"),
        ))
    })
}

/// Asks the service behind `socket` for its state: `<phase> generation=<g>
/// pid=<pid>`.
///
/// # Errors
///
/// As [`request_upgrade`]: `Connect`, `Refused` (a peer of another user),
/// `Timeout`, `Io`.
pub fn request_status(socket: &Path, timeout: Duration) -> Result<String, ControlError> {
    let request = Request::Status
        .encode()
        .map_err(|EnvTooLarge(size)| ControlError::EnvTooLarge { size })?;
    exchange(socket, &request, timeout)
}

fn exchange(socket: &Path, request: &[u8], timeout: Duration) -> Result<String, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        cause: source,
    })?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout(timeout),
        _ => ControlError::Io(e),
    };
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    // If the write fails because the service closed the connection early,
    // its answer may still be there to read: prefer it.
    let written = stream.write_all(request);
    let mut line = String::new();
    let read = io::BufReader::new(&stream)
        .take(MAX_REPLY)
        .read_line(&mut line);
    match (written, read) {
        (Err(e), _) if line.is_empty() => return Err(io_err(e)),
        (_, Err(e)) if line.is_empty() => return Err(io_err(e)),
        _ => {}
    }
    match Reply::parse(line.trim_end()) {
        Some(Reply::Ok(ok)) => Ok(ok),
        Some(Reply::Error(e)) => Err(ControlError::Refused(e)),
        Some(Reply::Cancelled(e)) => Err(ControlError::Cancelled(e)),
        None => Err(ControlError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the service closed the connection without an answer ({line:?})"),
        ))),
    }
}

/// Serves the control socket until the drain starts, and again if the
/// drain is taken back; keeps the listener until the drain is final. Runs
/// in the main process only (started by `ready()`), on the crate's thread.
///
/// It holds the process weakly: the process's state holds that thread,
/// so a strong reference here would keep both (and the listeners) alive
/// for ever once every `Handover` is gone.
pub(crate) async fn serve<S: Spawn>(listener: tokio::net::UnixListener, process: Weak<Process<S>>) {
    let Some(drain) = process.upgrade().map(|p| p.life.drain().watcher()) else {
        return;
    };
    loop {
        let conn = tokio::select! {
            r = listener.accept() => r,
            _ = drain.draining() => {
                if drain.resumed().await {
                    continue;
                }
                break;
            }
        };
        match conn {
            Ok((stream, _)) => {
                let Some(p) = process.upgrade() else { break };
                let drain = drain.clone();
                task::spawn(async move {
                    if let Err(e) = handle(stream, p, drain).await {
                        tracing::warn!(error = %e, "control request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers one connection: reads its request and carries it out.
async fn handle<S: Spawn>(
    stream: tokio::net::UnixStream,
    process: Arc<Process<S>>,
    drain: Drain,
) -> io::Result<()> {
    let mut conn = Connection::new(stream)?;
    // A connection counts as in-flight work only once its request starts to
    // arrive: an idle one must not keep a draining process alive.
    conn.arriving().await?;
    let _guard = drain.guard();
    let reply = match conn.request().await? {
        Ok(Request::Upgrade(env)) => upgrade_reply(&process, env).await,
        Ok(Request::Status) => Reply::Ok(format!(
            "{:?} generation={} pid={}",
            process.life.phase(),
            process.generation,
            std::process::id()
        )),
        Err(bad) => bad.into(),
    };
    conn.reply(&reply).await
}

async fn upgrade_reply<S: Spawn>(
    process: &Arc<Process<S>>,
    env: Option<Vec<(OsString, OsString)>>,
) -> Reply {
    tracing::info!(
        with_env = env.is_some(),
        "upgrade requested on the control socket"
    );
    match process.upgrade(env).await {
        Ok(pid) => Reply::Ok(pid.to_string()),
        // The service is being stopped: not a failed reload.
        Err(e) if process.life.drain().watcher().reason() == Some(DrainReason::Stopped) => {
            Reply::Cancelled(e.to_string())
        }
        Err(e) => Reply::Error(format!("upgrade failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_env_is_refused_before_sending() {
        let big = vec![(
            OsString::from("X"),
            OsString::from("y".repeat(MAX_ENV_BYTES)),
        )];
        let e = request_upgrade(
            Path::new("/nonexistent"),
            Some(&big),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ControlError::EnvTooLarge { .. }), "{e}");
    }

    #[test]
    fn no_service_is_a_connect_error() {
        let e = request_upgrade(
            Path::new("/nonexistent/x.sock"),
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    }
}
