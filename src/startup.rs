//! What [`Builder::build`](crate::Builder::build) does, in an order that
//! keeps its promise that a failure leaves the inherited sockets as they
//! were found:
//!
//! 1. everything that needs none of them: the runtime, the whole
//!    activation environment ([`env::read`], every fd checked but
//!    none taken), `NOTIFY_SOCKET`, the PID file's directory, the crate's
//!    own thread ([`side`](crate::side)), the signal handlers (on that
//!    thread's runtime);
//! 2. the fds are taken (close-on-exec from then on);
//! 3. what needs them: the state on the handoff channel, the control
//!    socket. If that fails, the listening sockets are given back (open,
//!    inheritable, owned by nobody).
//!
//! At every step a failure is also told to a parent waiting on the
//! channel (`fail <reason>`), which then reports it as the upgrade's error.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::handoff::{self, Executable, ParentLink, Reexec};
use crate::listeners::{self, Listeners};
use crate::notify::Notifier;
use crate::process::{Parts, Process};
use crate::protocol::env::{self, Found, Vars};
use crate::side::Side;
use crate::{pidfile, signals, sys, Builder, Handover};

pub(crate) fn build(config: Builder) -> Result<Handover> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::NoRuntime);
    }
    let pid = std::process::id();
    let vars = Vars::from_env();
    // A child whose environment is broken still tells its parent why, if
    // it can find the channel at all.
    let report = |e: Error| {
        if let Some(fd) = vars.channel_for(pid) {
            let _ = sys::with_borrowed(fd, |fd| handoff::fail_raw(fd, &e.to_string()));
        }
        e
    };

    // 1. Nothing inherited is touched yet.
    let found = env::read(&vars, pid, config.state_limit).map_err(report)?;
    let notify = Notifier::from_env().map_err(report)?;
    if let Some(p) = &config.pid_file {
        pidfile::check(p).map_err(report)?;
    }
    let side = Side::start().map_err(|e| report(Error::io("start the handover thread", e)))?;
    let signals = match config.signals {
        true => {
            // The signal streams belong to the crate's runtime, whose
            // driver then wakes for them even while the application's is
            // busy.
            let _on_side = side.handle().enter();
            Some(signals::install().map_err(|e| report(Error::io("install signal handlers", e)))?)
        }
        false => None,
    };

    // 2. Taken.
    let (inherited, channel, generation, state_len) = match found {
        Found::Nothing => (Vec::new(), None, 0, 0),
        Found::NotOurs(why) => {
            tracing::warn!("ignoring the socket activation environment: {why}");
            (Vec::new(), None, 0, 0)
        }
        Found::Ours(activation) => {
            let (generation, state_len) = (activation.generation, activation.state_len);
            let (inherited, channel) = listeners::take(activation).map_err(report)?;
            (inherited, channel, generation, state_len)
        }
    };

    // 3. What needs them; the listeners go back on failure.
    let (parent, handed_state) = match channel {
        None => (None, Vec::new()),
        Some(fd) => match ParentLink::new(fd, state_len) {
            Ok((link, state)) => (Some(link), state),
            Err((e, fd)) => {
                let e = Error::io("read the handed-over state", e);
                if let Some(fd) = fd {
                    handoff::fail_raw(fd.as_fd(), &e.to_string());
                }
                listeners::give_back(inherited);
                return Err(e);
            }
        },
    };
    let mut listeners = Listeners::new(inherited);
    let control = match &config.control_socket {
        None => None,
        Some(path) => match control_listener(&mut listeners, path) {
            Ok(l) => Some(l),
            Err(e) => {
                if let Some(link) = &parent {
                    link.fail(&e.to_string());
                }
                listeners::give_back(listeners.into_unclaimed());
                return Err(e);
            }
        },
    };

    let exe = Executable::current();
    tracing::debug!(generation, pid, exe = %exe.path.display(), "handover built");
    let reparent = notify.is_some();
    let process = Arc::new(Process::new(Parts {
        config,
        spawn: Reexec::new(exe, reparent),
        generation,
        notify,
        listeners,
        control,
        parent,
        handed_state,
        side: Some(side),
    }));
    if let Some(installed) = signals {
        process.forward_signals(installed);
    }
    Ok(Handover { inner: process })
}

/// The control socket at `path`. Bound here: created with mode 0600.
/// Inherited: as the first generation created it. Never chmod by path: in
/// a directory others can write to, the path may name another file by now.
fn control_listener(listeners: &mut Listeners, path: &Path) -> Result<UnixListener> {
    let l = listeners.control(path)?;
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        tracing::warn!(
            path = %path.display(),
            "the control socket's file is gone or was replaced; reload commands cannot reach this service there"
        );
    }
    Ok(l)
}
