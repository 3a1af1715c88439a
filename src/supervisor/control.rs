//! The supervisor's control socket: the same protocol as a program's own
//! (see [`crate::control`]), so `handover reload`, `handover status`,
//! [`crate::control::request_upgrade`] and `handover-reload --socket PATH`
//! all talk to it.
//!
//! | request | reply |
//! |---|---|
//! | `upgrade\n` | `ok <new main pid>\n` once the reload has succeeded, or `error <reason>\n` |
//! | `upgrade env <n>\n` + `n` bytes | the same; the environment is read and not applied (the program keeps the supervisor's environment), which is logged |
//! | `status\n` | `ok <phase> generation=<g> pid=<main pid> reload=<mode>\n` |
//! | anything else | `error unknown request\n` |
//!
//! Only a peer with the supervisor's effective UID, or root, may talk
//! (`SO_PEERCRED`); others get `error permission denied`. The request line
//! may be at most 256 bytes and must arrive within 10 s.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

const MAX_LINE: u64 = 256;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a control connection asks the supervisor's loop.
#[derive(Debug)]
pub(super) enum Request {
    /// Reload; the answer is the new main pid or why it failed.
    Reload(oneshot::Sender<Result<u32, String>>),
    /// The status line (without `ok `).
    Status(oneshot::Sender<String>),
}

/// Accepts connections until the loop is gone.
pub(super) async fn serve(listener: tokio::net::UnixListener, loop_tx: mpsc::Sender<Request>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = loop_tx.closed() => return,
        };
        let tx = loop_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, tx).await {
                tracing::warn!(error = %e, "control request failed");
            }
        });
    }
}

fn peer_allowed(stream: &tokio::net::UnixStream) -> io::Result<bool> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw())
}

async fn handle(stream: tokio::net::UnixStream, tx: mpsc::Sender<Request>) -> io::Result<()> {
    let allowed = peer_allowed(&stream)?;
    let mut stream = BufReader::new(stream);
    if !allowed {
        return stream
            .get_mut()
            .write_all(b"error permission denied\n")
            .await;
    }
    let mut line = String::new();
    let mut limited = (&mut stream).take(MAX_LINE);
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        ["upgrade"] => reload(&tx).await,
        ["upgrade", "env", n] => match n.parse::<usize>() {
            Ok(n) if n <= crate::control::MAX_ENV_BYTES => {
                let mut body = vec![0; n];
                tokio::time::timeout(REQUEST_TIMEOUT, stream.read_exact(&mut body))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "short environment"))??;
                tracing::info!(
                    "the reload request carries an environment; not applied: the program keeps \
                     the supervisor's environment (handover-reload --no-env sends none)"
                );
                reload(&tx).await
            }
            Ok(n) => format!(
                "error the environment is {n} bytes, more than the limit of {}",
                crate::control::MAX_ENV_BYTES
            ),
            Err(_) => "error malformed request".into(),
        },
        ["status"] => {
            let (reply, rx) = oneshot::channel();
            match tx.send(Request::Status(reply)).await {
                Ok(()) => match rx.await {
                    Ok(s) => format!("ok {s}"),
                    Err(_) => "error the supervisor is exiting".into(),
                },
                Err(_) => "error the supervisor is exiting".into(),
            }
        }
        _ => "error unknown request".into(),
    };
    let reply = format!("{}\n", crate::protocol::one_line(&reply));
    stream.get_mut().write_all(reply.as_bytes()).await
}

async fn reload(tx: &mpsc::Sender<Request>) -> String {
    let (reply, rx) = oneshot::channel();
    if tx.send(Request::Reload(reply)).await.is_err() {
        return "error the supervisor is exiting".into();
    }
    match rx.await {
        Ok(Ok(pid)) => format!("ok {pid}"),
        Ok(Err(why)) => format!("error {why}"),
        Err(_) => "error the supervisor is exiting".into(),
    }
}
