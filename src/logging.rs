//! Logging set-up: journald's native protocol under systemd, stderr
//! otherwise.
//!
//! Under systemd, stdout and stderr lines carry the PID of the process that
//! opened the stream (the first generation), which is wrong after a
//! handoff; native journald entries carry the true `_PID`. "Under systemd"
//! means `JOURNAL_STREAM` or `INVOCATION_ID` is set: journald's socket also
//! exists when the program is run by hand on a systemd host, and then the
//! person running it expects its output on the terminal.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where [`init`] sent the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// journald, through its native socket.
    Journald,
    /// Standard error.
    Stderr,
}

/// Whether this process was started by systemd with its output connected
/// to the journal.
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Installs a global `tracing` subscriber, filtered by `RUST_LOG` (default
/// `info`; the `Targets` syntax: `debug`, or `info,handover=debug`). Journald fields are written without prefix, so a query reads
/// `journalctl NEW_PID=1234`.
///
/// # Example
///
/// ```no_run
/// let dest = handover::logging::init();
/// tracing::info!(?dest, "logging set up");
/// ```
pub fn init() -> Destination {
    // `Targets`, not `EnvFilter`: the same syntax for levels and targets,
    // without a regex engine in every service's binary and memory.
    let filter = || {
        std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| v.parse::<Targets>().ok())
            .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
    };
    if under_systemd() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer.with_field_prefix(None);
            if tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .try_init()
                .is_ok()
            {
                return Destination::Journald;
            }
        }
    }
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt)
        .try_init();
    Destination::Stderr
}
