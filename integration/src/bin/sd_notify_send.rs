//! A program for the interop test (`tests/interop.rs`): sends notify messages to
//! `$NOTIFY_SOCKET` with the `sd-notify` crate, so that the test can compare them with the
//! handover crate's own.
//!
//! ```text
//! sd_notify_send MESSAGE...
//! ```
//!
//! Each MESSAGE is one datagram: one `sd_notify::NotifyState` per line, as `Variant value`
//! (`Ready`, `Reloading`, `Stopping`, `Watchdog`, `Status TEXT`, `MainPid PID`,
//! `MonotonicUsec USEC`, `ExtendTimeoutUsec USEC`). sd-notify sends only to `$NOTIFY_SOCKET`
//! (no function takes a socket path), hence a program of its own with that variable set.

use std::process::ExitCode;

use sd_notify::NotifyState;

fn state(line: &str) -> Result<NotifyState<'_>, String> {
    let (variant, v) = line.split_once(' ').unwrap_or((line, ""));
    let bad = |_| format!("{variant}: {v:?} is not a number");
    Ok(match variant {
        "Ready" => NotifyState::Ready,
        "Reloading" => NotifyState::Reloading,
        "Stopping" => NotifyState::Stopping,
        "Watchdog" => NotifyState::Watchdog,
        "Status" => NotifyState::Status(v),
        "MainPid" => NotifyState::MainPid(v.parse().map_err(bad)?),
        "MonotonicUsec" => NotifyState::MonotonicUsec(v.parse().map_err(bad)?),
        "ExtendTimeoutUsec" => NotifyState::ExtendTimeoutUsec(v.parse().map_err(bad)?),
        other => return Err(format!("unknown state {other:?}")),
    })
}

fn main() -> ExitCode {
    for message in std::env::args().skip(1) {
        let states: Result<Vec<NotifyState<'_>>, String> = message.lines().map(state).collect();
        let sent = states.and_then(|s| sd_notify::notify(&s).map_err(|e| e.to_string()));
        if let Err(e) = sent {
            eprintln!("sd_notify_send: {message:?}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
