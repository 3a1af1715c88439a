//! The handoff channel: a Unix stream socket pair between the old process
//! and the new one, the new one's end at fd `3+n` (`HANDOVER_FD`).
//!
//! First the state, raw bytes from the old process (`HANDOVER_STATE_LEN`
//! of them, read before anything else), then one line per message:
//!
//! | from | line | meaning |
//! |---|---|---|
//! | new | `ready` | initialised, listening; waiting to be told it is main |
//! | new | `fail <reason>` | giving up before `ready` (then exits); the reason on one line |
//! | new, before `execve` | `spawn <errno>` | moving an fd into place failed |
//! | new, before `execve` | `exec <errno>` | `execve` failed |
//! | old | `main` | the manager knows the new process as main PID: take over |
//! | new, once main | `serving` | `ready()` is done (PID file, `READY=1`/`STATUS=`, control socket): the old process starts its drain now |
//! | new, once main | `upgraded <pid>` | it handed the service on to `<pid>` |
//! | new, once main | `stopping` | it was asked to stop |
//!
//! End of file on either side means the other is gone. The channel stays
//! open while the old process drains: run by hand, an old process whose new
//! process dies without saying `upgraded` or `stopping` takes the service
//! back. The `spawn`/`exec` lines are written by the child of the clone
//! itself, without allocating (`sys`), from [`SPAWN_FAILED`] and
//! [`EXEC_FAILED`].

use std::io;
use std::path::Path;

use crate::error::UpgradeError;

/// The prefix of the line a child writes when moving an fd into place
/// failed before `execve`, followed by the errno.
pub(crate) const SPAWN_FAILED: &[u8] = SPAWN.as_bytes();
/// The prefix of the line a child writes when `execve` failed, followed by
/// the errno.
pub(crate) const EXEC_FAILED: &[u8] = EXEC.as_bytes();

const SPAWN: &str = "spawn ";
const EXEC: &str = "exec ";
const READY: &str = "ready";
const FAIL: &str = "fail ";
const MAIN: &str = "main";
const UPGRADED: &str = "upgraded ";
const STOPPING: &str = "stopping";
const SERVING: &str = "serving";

/// A line from the new process to the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromNew {
    /// `ready`
    Ready,
    /// `fail <reason>`
    Fail(String),
    /// `spawn <errno>`
    SpawnFailed(i32),
    /// `exec <errno>`
    ExecFailed(i32),
    /// `serving`
    Serving,
    /// `upgraded <pid>`
    Upgraded(u32),
    /// `stopping`
    Stopping,
    /// A line this version does not know, as it came.
    Unknown(String),
}

impl FromNew {
    /// Decodes one line (without its newline).
    pub(crate) fn parse(line: &str) -> FromNew {
        let errno = |s: &str| s.trim().parse().unwrap_or(libc::EIO);
        if line == READY {
            FromNew::Ready
        } else if line == STOPPING {
            FromNew::Stopping
        } else if line == SERVING {
            FromNew::Serving
        } else if let Some(reason) = line.strip_prefix(FAIL) {
            FromNew::Fail(reason.to_owned())
        } else if let Some(e) = line.strip_prefix(EXEC) {
            FromNew::ExecFailed(errno(e))
        } else if let Some(e) = line.strip_prefix(SPAWN) {
            FromNew::SpawnFailed(errno(e))
        } else if let Some(pid) = line.strip_prefix(UPGRADED).and_then(|p| p.parse().ok()) {
            FromNew::Upgraded(pid)
        } else {
            FromNew::Unknown(line.to_owned())
        }
    }

    /// Encodes the message as one line, newline included. A `fail` reason
    /// is made one line (see [`one_line`](super::one_line)).
    pub(crate) fn line(&self) -> String {
        match self {
            FromNew::Ready => format!("{READY}\n"),
            FromNew::Fail(reason) => format!("{FAIL}{}\n", super::one_line(reason)),
            FromNew::SpawnFailed(e) => format!("{SPAWN}{e}\n"),
            FromNew::ExecFailed(e) => format!("{EXEC}{e}\n"),
            FromNew::Upgraded(pid) => format!("{UPGRADED}{pid}\n"),
            FromNew::Stopping => format!("{STOPPING}\n"),
            FromNew::Serving => format!("{SERVING}\n"),
            FromNew::Unknown(line) => format!("{}\n", super::one_line(line)),
        }
    }

    /// What a line other than `ready`, said before it, means for the
    /// upgrade of `exe` to the new process `pid`.
    pub(crate) fn into_failure(self, pid: u32, exe: &Path) -> UpgradeError {
        let exe = exe.display().to_string();
        match self {
            FromNew::ExecFailed(e) => UpgradeError::Exec {
                exe,
                cause: io::Error::from_raw_os_error(e),
            },
            FromNew::SpawnFailed(e) => UpgradeError::Spawn {
                exe,
                cause: io::Error::from_raw_os_error(e),
            },
            FromNew::Fail(reason) => UpgradeError::ChildFailed { pid, reason },
            other => UpgradeError::ChildFailed {
                pid,
                reason: format!(
                    "unexpected message on the handoff channel: {:?}",
                    other.line().trim_end()
                ),
            },
        }
    }
}

/// The one line the old process says: `main`, newline included.
pub(crate) fn main_line() -> &'static [u8] {
    b"main\n"
}

/// Whether `line` (without its newline) is the old process's `main`.
pub(crate) fn is_main(line: &str) -> bool {
    line == MAIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for msg in [
            FromNew::Ready,
            FromNew::Fail("no config".into()),
            FromNew::SpawnFailed(9),
            FromNew::ExecFailed(13),
            FromNew::Upgraded(4242),
            FromNew::Stopping,
        ] {
            let line = msg.line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(FromNew::parse(line.trim_end()), msg, "{line:?}");
        }
        assert!(is_main(
            std::str::from_utf8(main_line()).unwrap().trim_end()
        ));
    }

    /// The child of a clone writes its prefix and digits by hand: the
    /// parser reads them as the encoder writes them.
    #[test]
    fn the_pre_exec_prefixes_match_the_lines() {
        let mut raw = EXEC_FAILED.to_vec();
        raw.extend_from_slice(b"2");
        assert_eq!(
            FromNew::parse(std::str::from_utf8(&raw).unwrap()),
            FromNew::ExecFailed(2)
        );
        assert_eq!(
            FromNew::SpawnFailed(2).line().as_bytes()[..6],
            *SPAWN_FAILED
        );
    }

    #[test]
    fn a_reason_cannot_inject_a_line() {
        let line = FromNew::Fail("bad\nready".into()).line();
        assert_eq!(line, "fail bad ready\n");
    }

    #[test]
    fn failures_decode_to_typed_errors() {
        let exe = Path::new("/x");
        let e = FromNew::parse("exec 13").into_failure(1, exe);
        assert!(
            matches!(e, UpgradeError::Exec { ref cause, .. } if cause.raw_os_error() == Some(13))
        );
        let e = FromNew::parse("fail no config").into_failure(1, exe);
        assert!(matches!(e, UpgradeError::ChildFailed { ref reason, .. } if reason == "no config"));
        let e = FromNew::parse("bogus").into_failure(1, exe);
        assert!(
            matches!(e, UpgradeError::ChildFailed { ref reason, .. } if reason.contains("\"bogus\"")),
            "{e}"
        );
        assert_eq!(
            FromNew::parse("upgraded x"),
            FromNew::Unknown("upgraded x".into())
        );
    }
}
