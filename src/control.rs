//! The control socket: a truthful `systemctl reload`.
//!
//! With `ExecReload=/bin/kill -HUP $MAINPID`, `systemctl reload` returns
//! before the upgrade has even started. The control socket lets a reload
//! command ask for the upgrade and wait for its outcome. It belongs to the
//! service, not to one process: it is handed to each new generation like any
//! other listener, never unlinked and rebound, so a request that arrives
//! during a handoff waits in the shared backlog.
//!
//! The protocol, one request per connection, one reply line:
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
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::drain::{Drain, DrainReason};
use crate::process::Process;
use crate::upgrade::Spawn;

/// The control socket's file in the service's runtime directory.
const FILE: &str = "handover.sock";

/// Where the control socket is by default: `handover.sock` in
/// `$RUNTIME_DIRECTORY` (its first entry, if absolute), which systemd sets
/// for a unit with `RuntimeDirectory=`. What [`Builder`](crate::Builder)
/// serves and `handover-reload` asks, unless told otherwise.
pub fn default_socket() -> Option<std::path::PathBuf> {
    crate::protocol::env::runtime_directory().map(|d| d.join(FILE))
}

/// The largest environment a reload command may send.
pub const MAX_ENV_BYTES: usize = 256 * 1024;
/// The longest request line.
const MAX_LINE: u64 = 256;
/// How long a peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Encodes an environment as `KEY=VALUE\0...`.
fn encode_env(env: &[(OsString, OsString)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn decode_env(bytes: &[u8]) -> Vec<(OsString, OsString)> {
    bytes
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let eq = e.iter().position(|b| *b == b'=')?;
            (eq > 0).then(|| {
                (
                    OsString::from_vec(e[..eq].to_vec()),
                    OsString::from_vec(e[eq + 1..].to_vec()),
                )
            })
        })
        .collect()
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
    let mut request = Vec::new();
    match env {
        None => request.extend_from_slice(b"upgrade\n"),
        Some(env) => {
            let body = encode_env(env);
            if body.len() > MAX_ENV_BYTES {
                return Err(ControlError::EnvTooLarge { size: body.len() });
            }
            request.extend_from_slice(format!("upgrade env {}\n", body.len()).as_bytes());
            request.extend_from_slice(&body);
        }
    }
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
    exchange(socket, b"status\n", timeout)
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
        .take(64 * 1024)
        .read_line(&mut line);
    match (written, read) {
        (Err(e), _) if line.is_empty() => return Err(io_err(e)),
        (_, Err(e)) if line.is_empty() => return Err(io_err(e)),
        _ => {}
    }
    let line = line.trim_end();
    if let Some(ok) = line.strip_prefix("ok ") {
        Ok(ok.to_owned())
    } else if let Some(e) = line.strip_prefix("error ") {
        Err(ControlError::Refused(e.to_owned()))
    } else if let Some(e) = line.strip_prefix("cancelled ") {
        Err(ControlError::Cancelled(e.to_owned()))
    } else {
        Err(ControlError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the service closed the connection without an answer ({line:?})"),
        )))
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
                tokio::spawn(async move {
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

fn peer_allowed(stream: &tokio::net::UnixStream) -> io::Result<bool> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    Ok(cred.uid() == 0 || cred.uid() == me)
}

/// A request as read from the socket.
enum Request {
    Upgrade(Option<Vec<(OsString, OsString)>>),
    Status,
    /// Answered at once with this error.
    Bad(String),
}

/// Reads one request: its line and, for `upgrade env <n>`, its body.
async fn read_request(stream: &mut BufReader<tokio::net::UnixStream>) -> io::Result<Request> {
    let mut line = String::new();
    let mut limited = (&mut *stream).take(MAX_LINE);
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["upgrade"] => Request::Upgrade(None),
        ["upgrade", "env", n] => match n.parse::<usize>() {
            Ok(n) if n <= MAX_ENV_BYTES => {
                let mut body = vec![0; n];
                tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut body))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "short environment"))??;
                Request::Upgrade(Some(decode_env(&body)))
            }
            Ok(n) => Request::Bad(format!(
                "the environment is {n} bytes, more than the limit of {MAX_ENV_BYTES}"
            )),
            Err(_) => Request::Bad("malformed request".into()),
        },
        ["status"] => Request::Status,
        _ => Request::Bad("unknown request".into()),
    })
}

async fn handle<S: Spawn>(
    stream: tokio::net::UnixStream,
    process: Arc<Process<S>>,
    drain: Drain,
) -> io::Result<()> {
    // A connection counts as in-flight work only once its request starts to
    // arrive: an idle one must not keep a draining process alive.
    let allowed = peer_allowed(&stream)?;
    let mut stream = BufReader::new(stream);
    tokio::time::timeout(REQUEST_TIMEOUT, stream.fill_buf())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let _guard = drain.guard();
    // The request is read in full even from a peer that is refused: closing
    // with it unread would make the peer's write fail (EPIPE) before it can
    // read the answer.
    let request = read_request(&mut stream).await?;
    let reply = match request {
        _ if !allowed => "error permission denied".to_owned(),
        Request::Upgrade(env) => upgrade_reply(&process, env).await,
        Request::Status => format!(
            "ok {:?} generation={} pid={}",
            process.life.phase(),
            process.generation,
            std::process::id()
        ),
        Request::Bad(why) => format!("error {why}"),
    };
    let reply = format!("{}\n", crate::protocol::one_line(&reply));
    match stream.get_mut().write_all(reply.as_bytes()).await {
        // The client went away first (killed by a stop, or timed out).
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            tracing::debug!(%reply, "control client gone before the answer");
            Ok(())
        }
        r => r,
    }
}

async fn upgrade_reply<S: Spawn>(
    process: &Arc<Process<S>>,
    env: Option<Vec<(OsString, OsString)>>,
) -> String {
    tracing::info!(
        with_env = env.is_some(),
        "upgrade requested on the control socket"
    );
    match process.upgrade(env).await {
        Ok(pid) => format!("ok {pid}"),
        // The service is being stopped: not a failed reload.
        Err(e) if process.life.drain().watcher().reason() == Some(DrainReason::Stopped) => {
            format!("cancelled {e}")
        }
        Err(e) => format!("error upgrade failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_round_trips() {
        let env = vec![
            (OsString::from("A"), OsString::from("1")),
            (OsString::from("B"), OsString::from("x=y z")),
            (OsString::from("EMPTY"), OsString::from("")),
        ];
        assert_eq!(decode_env(&encode_env(&env)), env);
        assert!(decode_env(b"=novar\0junk\0").is_empty());
    }

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
