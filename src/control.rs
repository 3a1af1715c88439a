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
//! | `upgrade\n` | `ok <new pid>\n` or `error <reason>\n` |
//! | `upgrade env <n>\n` then `n` bytes of `KEY=VALUE\0...` | as above; the new process gets this environment (see [`Handover::upgrade_with_env`](crate::Handover::upgrade_with_env)) |
//! | `status\n` | `ok <phase> generation=<g> pid=<pid>\n` |
//!
//! The peer must run as the same user as the service, or as root
//! (`SO_PEERCRED`); the socket file is mode 0600.

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::Handover;

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
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        source: io::Error,
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
pub fn request_status(socket: &Path, timeout: Duration) -> Result<String, ControlError> {
    exchange(socket, b"status\n", timeout)
}

fn exchange(socket: &Path, request: &[u8], timeout: Duration) -> Result<String, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout(timeout),
        _ => ControlError::Io(e),
    };
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.write_all(request).map_err(io_err)?;
    let mut line = String::new();
    io::BufReader::new(stream.take(64 * 1024))
        .read_line(&mut line)
        .map_err(io_err)?;
    let line = line.trim_end();
    if let Some(ok) = line.strip_prefix("ok ") {
        Ok(ok.to_owned())
    } else if let Some(e) = line.strip_prefix("error ") {
        Err(ControlError::Refused(e.to_owned()))
    } else {
        Err(ControlError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the service closed the connection without an answer ({line:?})"),
        )))
    }
}

/// Serves the control socket until the drain starts. Runs in the main
/// process only (started by `ready()`).
pub(crate) async fn serve(listener: tokio::net::UnixListener, handover: Handover) {
    let drain = handover.drain();
    loop {
        let conn = tokio::select! {
            r = listener.accept() => r,
            _ = drain.draining() => break,
        };
        match conn {
            Ok((stream, _)) => {
                let h = handover.clone();
                let guard = drain.guard();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, h).await {
                        tracing::warn!(error = %e, "control request failed");
                    }
                    drop(guard);
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

async fn handle(stream: tokio::net::UnixStream, handover: Handover) -> io::Result<()> {
    let allowed = peer_allowed(&stream)?;
    let mut stream = BufReader::new(stream);
    if !allowed {
        stream
            .get_mut()
            .write_all(b"error permission denied\n")
            .await?;
        return Ok(());
    }
    let mut line = String::new();
    let mut limited = (&mut stream).take(MAX_LINE);
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        ["upgrade"] => upgrade_reply(&handover, None).await,
        ["upgrade", "env", n] => match n.parse::<usize>() {
            Ok(n) if n <= MAX_ENV_BYTES => {
                let mut body = vec![0; n];
                tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut body))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "short environment"))??;
                upgrade_reply(&handover, Some(decode_env(&body))).await
            }
            Ok(n) => format!(
                "error the environment is {n} bytes, more than the limit of {MAX_ENV_BYTES}"
            ),
            Err(_) => "error malformed request".into(),
        },
        ["status"] => format!(
            "ok {:?} generation={} pid={}",
            handover.phase(),
            handover.generation(),
            std::process::id()
        ),
        _ => "error unknown request".into(),
    };
    let reply = format!("{}\n", crate::notify::status_text(&reply));
    stream.get_mut().write_all(reply.as_bytes()).await
}

async fn upgrade_reply(handover: &Handover, env: Option<Vec<(OsString, OsString)>>) -> String {
    tracing::info!(
        with_env = env.is_some(),
        "upgrade requested on the control socket"
    );
    match handover.upgrade_with_env(env).await {
        Ok(pid) => format!("ok {pid}"),
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
