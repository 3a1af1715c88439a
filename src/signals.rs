//! Which signal means what: SIGHUP asks for an upgrade, SIGTERM and SIGINT
//! for a graceful stop.
//!
//! The handlers are installed before [`spawn`] returns, so a SIGHUP that
//! arrives right after `build()` can no longer kill the process (its default
//! action); the policy (upgrade now, later, or not at all) is the caller's.

use std::io;

use tokio::signal::unix::{signal, SignalKind};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    Upgrade,
    Stop,
}

/// Installs the handlers, then forwards each signal to `on` from a task.
/// The task ends when `on` returns `false`.
pub(crate) fn spawn(
    mut on: impl FnMut(Request, &'static str) -> bool + Send + 'static,
) -> io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let (req, name) = tokio::select! {
                Some(()) = hup.recv() => (Request::Upgrade, "SIGHUP"),
                Some(()) = term.recv() => (Request::Stop, "SIGTERM"),
                Some(()) = int.recv() => (Request::Stop, "SIGINT"),
                else => break,
            };
            if !on(req, name) {
                break;
            }
        }
    });
    Ok(())
}
