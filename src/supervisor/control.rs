//! The supervisor's control socket: the protocol of a program's own
//! ([`crate::protocol::control`], read and answered with the same code),
//! so `handover reload`, `handover status`,
//! [`crate::control::request_upgrade`] and `handover-reload --socket PATH`
//! all talk to it. What the supervisor does with each request:
//!
//! | request | reply |
//! |---|---|
//! | `upgrade\n` | `ok <new main pid>\n` once the reload has succeeded, or `error <reason>\n` |
//! | `upgrade env <n>\n` + `n` bytes | the same; the environment is read and not applied (the program keeps the supervisor's environment), which is logged |
//! | `status\n` | `ok <phase> generation=<g> pid=<main pid> reload=<mode>\n` |
//!
//! Who may talk, the limits and the other replies are the protocol's: a
//! peer with the supervisor's effective UID, or root; any other reads
//! `error permission denied` once its request was read.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::protocol::control::{self as protocol, Connection, Reply};

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

async fn handle(stream: tokio::net::UnixStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    let mut conn = Connection::new(stream)?;
    let reply = match conn.request().await? {
        Ok(protocol::Request::Upgrade(env)) => {
            if env.is_some() {
                tracing::info!(
                    "the reload request carries an environment; not applied: the program keeps \
                     the supervisor's environment (handover-reload --no-env sends none)"
                );
            }
            reload(&tx).await
        }
        Ok(protocol::Request::Status) => {
            let (reply, rx) = oneshot::channel();
            match tx.send(Request::Status(reply)).await {
                Ok(()) => match rx.await {
                    Ok(s) => Reply::Ok(s),
                    Err(_) => exiting(),
                },
                Err(_) => exiting(),
            }
        }
        Err(bad) => bad.into(),
    };
    conn.reply(&reply).await
}

async fn reload(tx: &mpsc::Sender<Request>) -> Reply {
    let (reply, rx) = oneshot::channel();
    if tx.send(Request::Reload(reply)).await.is_err() {
        return exiting();
    }
    match rx.await {
        Ok(Ok(pid)) => Reply::Ok(pid.to_string()),
        Ok(Err(why)) => Reply::Error(why),
        Err(_) => exiting(),
    }
}

fn exiting() -> Reply {
    Reply::Error("the supervisor is exiting".into())
}
