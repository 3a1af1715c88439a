//! Logging set-up: journald's native protocol under systemd, stderr
//! otherwise.
//!
//! Under systemd, stdout and stderr lines carry the PID of the process that
//! opened the stream (the first generation), which is wrong after a
//! handoff; native journald entries carry the true `_PID`. "Under systemd"
//! means `JOURNAL_STREAM` or `INVOCATION_ID` is set: journald's socket also
//! exists when the program is run by hand on a systemd host, and then the
//! person running it expects its output on the terminal.
//!
//! Two ways in:
//!
//! | you have | call | you get |
//! |---|---|---|
//! | no subscriber of your own | [`init`] | a global subscriber filtered by `RUST_LOG`, and a [`Report`] of what it could not do (also logged as warnings) |
//! | your own subscriber (filters, OpenTelemetry, ...) | [`layer`] | a [`Layer`] to add to it, and the same [`Report`] for you to log |
//!
//! Journald fields are written without a prefix, so a query reads
//! `journalctl NEW_PID=1234`.

use std::fmt;
use std::io;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::{SubscriberInitExt, TryInitError};
use tracing_subscriber::Layer;

/// Where the logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// journald, through its native socket.
    Journald,
    /// Standard error.
    Stderr,
}

/// What [`layer`] or [`init`] chose, and what it could not do.
#[derive(Debug)]
#[non_exhaustive]
pub struct Report {
    /// Where the logs go.
    pub destination: Destination,
    /// Why journald was not used although the process runs under systemd
    /// (the logs then go to stderr, which systemd also sends to the journal,
    /// but with the first generation's `_PID`).
    pub journald_error: Option<io::Error>,
    /// `RUST_LOG` when it is set but is not a filter [`init`] understands
    /// (it then filters at `info`). Always `None` from [`layer`], which
    /// leaves filtering to your subscriber.
    pub bad_filter: Option<String>,
}

impl Report {
    /// Logs each thing that could not be done as a warning, through whatever
    /// subscriber is installed. [`init`] calls it for you.
    pub fn warn(&self) {
        if let Some(e) = &self.journald_error {
            tracing::warn!(error = %e, "cannot log to journald; logging to stderr");
        }
        if let Some(v) = &self.bad_filter {
            tracing::warn!(rust_log = %v, "RUST_LOG is not a valid filter; logging at info");
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = match self.destination {
            Destination::Journald => "journald",
            Destination::Stderr => "stderr",
        };
        write!(f, "logging to {to}")?;
        if let Some(e) = &self.journald_error {
            write!(f, " (journald: {e})")?;
        }
        if let Some(v) = &self.bad_filter {
            write!(f, " (RUST_LOG={v:?} is not a valid filter; at info)")?;
        }
        Ok(())
    }
}

/// A [`Layer`] boxed so that either destination has one type.
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// Whether this process was started by systemd with its output connected
/// to the journal.
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// A layer that writes to journald under systemd and to stderr otherwise,
/// for a subscriber of your own. It does not filter: your subscriber does.
///
/// # Example
///
/// ```no_run
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::util::SubscriberInitExt;
///
/// let (layer, report) = handover::logging::layer();
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::filter::LevelFilter::DEBUG)
///     .with(layer)
///     .init();
/// report.warn(); // says so if journald was wanted but unreachable
/// ```
pub fn layer<S>() -> (BoxedLayer<S>, Report)
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let mut journald_error = None;
    if under_systemd() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let report = Report {
                    destination: Destination::Journald,
                    journald_error: None,
                    bad_filter: None,
                };
                return (Box::new(layer.with_field_prefix(None)), report);
            }
            Err(e) => journald_error = Some(e),
        }
    }
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal());
    let report = Report {
        destination: Destination::Stderr,
        journald_error,
        bad_filter: None,
    };
    (Box::new(fmt), report)
}

/// Installs a global `tracing` subscriber with [`layer`], filtered by
/// `RUST_LOG` (default `info`; the `Targets` syntax: `debug`, or
/// `info,handover=debug`), then logs what it could not do (an unreachable
/// journald, a `RUST_LOG` it does not understand) as warnings.
///
/// # Errors
///
/// When a global subscriber is already installed; nothing is changed then.
///
/// # Example
///
/// ```no_run
/// match handover::logging::init() {
///     Ok(report) => tracing::info!(%report, "logging set up"),
///     Err(e) => eprintln!("logging was set up already: {e}"),
/// }
/// ```
pub fn init() -> Result<Report, TryInitError> {
    // `Targets`, not `EnvFilter`: the same syntax for levels and targets,
    // without a regex engine in every service's binary and memory.
    let (filter, bad_filter) = filter_from(std::env::var("RUST_LOG").ok());
    let (layer, mut report) = layer();
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()?;
    report.bad_filter = bad_filter;
    report.warn();
    Ok(report)
}

/// The filter for `RUST_LOG`'s value, and the value itself when it does not
/// parse.
fn filter_from(rust_log: Option<String>) -> (Targets, Option<String>) {
    let default = || Targets::new().with_default(LevelFilter::INFO);
    match rust_log {
        None => (default(), None),
        Some(v) if v.trim().is_empty() => (default(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(_) => (default(), Some(v)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_values() {
        let cases: &[(Option<&str>, bool)] = &[
            (None, false),
            (Some(""), false),
            (Some("debug"), false),
            (Some("info,handover=trace"), false),
            (Some("handover=loud"), true),
            (Some("=="), true),
        ];
        for (value, bad) in cases {
            let (_, reported) = filter_from(value.map(str::to_owned));
            assert_eq!(reported.is_some(), *bad, "RUST_LOG={value:?}");
        }
    }

    #[test]
    fn report_reads_as_a_sentence() {
        let r = Report {
            destination: Destination::Stderr,
            journald_error: Some(io::Error::from(io::ErrorKind::NotFound)),
            bad_filter: Some("x=y=z".into()),
        };
        let s = r.to_string();
        assert!(s.starts_with("logging to stderr (journald: "), "{s}");
        assert!(
            s.ends_with("(RUST_LOG=\"x=y=z\" is not a valid filter; at info)"),
            "{s}"
        );
    }
}
