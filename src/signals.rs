//! Which signal means what: SIGHUP asks for an upgrade, SIGTERM and SIGINT
//! for a graceful stop.
//!
//! The handlers are installed by [`install`], early in `build()`, so a
//! SIGHUP that arrives right after it can no longer kill the process (its
//! default action); the policy (upgrade now, later, or not at all) is the
//! caller's, once it [forwards](Installed::forward) them.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::side::{self, Side};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    Upgrade,
    Stop,
}

/// The handlers, installed, not yet forwarded anywhere.
#[derive(Debug)]
pub(crate) struct Installed {
    hup: Signal,
    term: Signal,
    int: Signal,
}

/// Installs the handlers. From now on these signals no longer kill the
/// process; they queue until [`Installed::forward`].
pub(crate) fn install() -> io::Result<Installed> {
    Ok(Installed {
        hup: signal(SignalKind::hangup())?,
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    })
}

impl Installed {
    /// Forwards each signal to `on` from a task on `side` (the caller's
    /// runtime without one), which ends when `on` returns `false`.
    pub(crate) fn forward(
        self,
        side: Option<&Side>,
        mut on: impl FnMut(Request, &'static str) -> bool + Send + 'static,
    ) {
        let Installed {
            mut hup,
            mut term,
            mut int,
        } = self;
        side::spawn(side, async move {
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
    }
}
