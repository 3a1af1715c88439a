//! The environment: every variable the crate reads or writes, read strictly
//! and written in one place.
//!
//! | variable | set by | for | meaning |
//! |---|---|---|---|
//! | `LISTEN_FDS` | systemd, a parent of ours, `handover run` | the new process | `n` listening sockets at fds `3..3+n` |
//! | `LISTEN_FDNAMES` | the same | the new process | their names, `:`-separated (`unknown` for an unnamed one); optional |
//! | `LISTEN_PID` | the same (written in the child after the clone) | the new process | the pid the fds are for: any other process leaves them alone |
//! | `LISTEN_PIDFDID` | systemd (v256+) | the new process | describes one process: never passed on |
//! | `HANDOVER_FD` | a parent of ours | the new process | the handoff channel's fd, exactly `3+n` (see [`channel`](super::channel)) |
//! | `HANDOVER_GENERATION` | a parent of ours | the new process | the parent's generation plus one |
//! | `HANDOVER_STATE_LEN` | a parent of ours, when there is state | the new process | how many bytes of state come first on the channel; checked against the receiver's own limit |
//! | `HANDOVER_CONFIGURED` | a parent of ours | the new process | the names (`:`-separated) of the passed listeners whose address the program's configuration decided, as opposed to a socket unit's; `HANDOVER_BOUND` in version 0.1, still read |
//! | `HANDOVER_ALLOW_MISSING_LISTEN_PID` | a developer (`1`) | any process | take fds passed without `LISTEN_PID` (`systemfd --no-pid`) |
//! | `NOTIFY_SOCKET` | systemd, `handover run` | the main process | where `sd_notify(3)` messages go; kept for each new generation |
//! | `WATCHDOG_USEC`, `WATCHDOG_PID` | systemd | the main process | the watchdog's timeout, and whom it is for |
//! | `RUNTIME_DIRECTORY` | systemd (`RuntimeDirectory=`) | `Builder`, `handover-reload` | where the control socket lives by default |
//!
//! Reading: [`Vars::from_env`] takes a snapshot, [`read`] validates all of
//! it (numbers, bounds, name count, that every fd is open, inherited and a
//! socket) before any fd is touched, the way `sd_listen_fds(3)` decides
//! whether the fds are for this process. Writing: [`next_generation`] and
//! [`supervised`] build each child's environment explicitly (the process's
//! own is never modified: `set_var` races with `getenv` in other threads),
//! which is how the per-process variables are "removed" for a child.
//!
//! Why not `listenfd` or `sd-notify` here: `listenfd` 1.0 accepts a missing
//! `LISTEN_PID`, ignores a garbage `LISTEN_FDS` and knows no names, and
//! `sd_notify::listen_fds` sets `FD_CLOEXEC` before it has checked the names
//! and has no upper bound.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys;

pub(crate) const LISTEN_PID: &str = "LISTEN_PID";
pub(crate) const LISTEN_FDS: &str = "LISTEN_FDS";
pub(crate) const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
const LISTEN_PIDFDID: &str = "LISTEN_PIDFDID";
pub(crate) const HANDOVER_FD: &str = "HANDOVER_FD";
pub(crate) const HANDOVER_GENERATION: &str = "HANDOVER_GENERATION";
pub(crate) const HANDOVER_STATE_LEN: &str = "HANDOVER_STATE_LEN";
pub(crate) const HANDOVER_CONFIGURED: &str = "HANDOVER_CONFIGURED";
/// [`HANDOVER_CONFIGURED`]'s name in version 0.1: a parent of that version
/// still sets it.
const HANDOVER_CONFIGURED_0_1: &str = "HANDOVER_BOUND";
pub(crate) const HANDOVER_ALLOW_MISSING_LISTEN_PID: &str = "HANDOVER_ALLOW_MISSING_LISTEN_PID";
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";
const SYSTEMD_EXEC_PID: &str = "SYSTEMD_EXEC_PID";
const MAINPID: &str = "MAINPID";
const MANAGERPID: &str = "MANAGERPID";
const JOURNAL_STREAM: &str = "JOURNAL_STREAM";
const RUNTIME_DIRECTORY: &str = "RUNTIME_DIRECTORY";

/// The first passed fd, per `sd_listen_fds(3)`.
pub(crate) const FIRST_FD: RawFd = 3;
/// More inherited listeners than this is a sign of a broken environment.
pub(crate) const MAX_FDS: usize = 1024;
/// The name systemd gives an fd without `FileDescriptorName=`.
pub(crate) const UNNAMED: &str = "unknown";

/// Variables that describe one process, not the service: no child gets
/// them as they are.
const PER_PROCESS: &[&str] = &[
    LISTEN_PID,
    LISTEN_FDS,
    LISTEN_FDNAMES,
    LISTEN_PIDFDID,
    WATCHDOG_PID,
    SYSTEMD_EXEC_PID,
    HANDOVER_FD,
    HANDOVER_GENERATION,
    HANDOVER_STATE_LEN,
    HANDOVER_CONFIGURED,
    HANDOVER_CONFIGURED_0_1,
];
/// Variables of a reload command's environment that describe that command,
/// not the service: the old process's own replace them.
const FROM_OLD_PROCESS: &[&str] = &[NOTIFY_SOCKET, JOURNAL_STREAM, WATCHDOG_USEC, MANAGERPID];
/// Variables of a reload command's environment dropped outright.
const RELOAD_COMMAND_ONLY: &[&str] = &[MAINPID, SYSTEMD_EXEC_PID];
/// Variables that describe this process's own service manager: a program
/// that `handover run` supervises has the supervisor as its manager.
const OF_THE_MANAGER: &[&str] = &[NOTIFY_SOCKET, WATCHDOG_USEC, MAINPID, MANAGERPID];

fn is_one_of(key: &OsStr, list: &[&str]) -> bool {
    list.iter().any(|k| OsStr::new(k) == key)
}

/// The variables [`read`] looks at, as found in the environment.
#[derive(Debug, Default, Clone)]
pub(crate) struct Vars {
    pub(crate) listen_pid: Option<OsString>,
    pub(crate) listen_fds: Option<OsString>,
    pub(crate) listen_fdnames: Option<OsString>,
    pub(crate) channel: Option<OsString>,
    pub(crate) generation: Option<OsString>,
    pub(crate) state_len: Option<OsString>,
    pub(crate) configured: Option<OsString>,
    /// `HANDOVER_ALLOW_MISSING_LISTEN_PID` is `1`.
    pub(crate) allow_missing_pid: bool,
}

impl Vars {
    /// This process's variables.
    pub(crate) fn from_env() -> Vars {
        let env = std::env::var_os;
        Vars {
            listen_pid: env(LISTEN_PID),
            listen_fds: env(LISTEN_FDS),
            listen_fdnames: env(LISTEN_FDNAMES),
            channel: env(HANDOVER_FD),
            generation: env(HANDOVER_GENERATION),
            state_len: env(HANDOVER_STATE_LEN),
            configured: env(HANDOVER_CONFIGURED).or_else(|| env(HANDOVER_CONFIGURED_0_1)),
            allow_missing_pid: env(HANDOVER_ALLOW_MISSING_LISTEN_PID).is_some_and(|v| v == "1"),
        }
    }

    /// Only systemd's activation variables: for a process that no parent
    /// of ours starts (the supervisor).
    pub(crate) fn activation_only(self) -> Vars {
        Vars {
            channel: None,
            generation: None,
            state_len: None,
            configured: None,
            ..self
        }
    }

    /// The handoff channel, when these variables are for `pid` and name
    /// one that was passed to this process and is a socket, whether or not
    /// the rest is valid: where a process whose environment is broken
    /// still tells its parent why. Never an fd this process opened itself
    /// (the number may name the runtime's epoll fd or signal pipe instead),
    /// which must not get a stray line.
    pub(crate) fn channel_for(&self, pid: u32) -> Option<RawFd> {
        let parse = |v: &Option<OsString>| v.as_deref()?.to_str()?.parse::<u32>().ok();
        if parse(&self.listen_pid) != Some(pid) {
            return None;
        }
        let fd = RawFd::try_from(parse(&self.channel)?).ok()?;
        let passed = !sys::fd_is_cloexec(fd) && sys::fd_is_socket(fd).unwrap_or(false);
        passed.then_some(fd)
    }
}

/// What was passed to this process, validated but not yet taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Activation {
    /// `(fd, name)` in fd order.
    pub(crate) fds: Vec<(RawFd, String)>,
    /// The handoff channel from a parent of ours.
    pub(crate) channel: Option<RawFd>,
    /// Our generation (the parent's plus one; 0 without a parent).
    pub(crate) generation: u32,
    /// How many bytes of state come first on the channel.
    pub(crate) state_len: usize,
    /// The passed listeners whose address the program's configuration
    /// decided (from a parent of ours; none from systemd).
    pub(crate) configured: Vec<String>,
}

/// The outcome of reading the environment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// No activation variables: bind everything ourselves.
    Nothing,
    /// The variables are for another process (`LISTEN_PID` is not ours, or
    /// missing); they were left alone, as `sd_listen_fds(3)` does.
    NotOurs(String),
    /// Fds for us.
    Ours(Activation),
}

fn utf8<'a>(name: &str, v: &'a OsStr) -> Result<&'a str> {
    v.to_str()
        .ok_or_else(|| Error::Activation(format!("{name} is not valid UTF-8")))
}

fn number(name: &str, v: &OsStr) -> Result<u64> {
    let s = utf8(name, v)?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Activation(format!("{name}={s:?} is not a number")));
    }
    s.parse()
        .map_err(|_| Error::Activation(format!("{name}={s:?} is out of range")))
}

/// Reads and validates the variables for the process `pid`, which accepts
/// at most `state_limit` bytes of state. Checks that every fd is open,
/// inherited and a socket; takes nothing.
pub(crate) fn read(vars: &Vars, pid: u32, state_limit: usize) -> Result<Found> {
    let Some(fds_var) = vars.listen_fds.as_deref() else {
        return Ok(Found::Nothing);
    };
    match vars.listen_pid.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => {
            let target = number(LISTEN_PID, p)?;
            if target != u64::from(pid) {
                return Ok(Found::NotOurs(format!(
                    "LISTEN_PID={target} is not this process ({pid})"
                )));
            }
        }
        None if vars.allow_missing_pid => {}
        None => {
            let missing = if vars.listen_pid.is_some() {
                "LISTEN_PID is empty"
            } else {
                "LISTEN_FDS is set without LISTEN_PID"
            };
            return Ok(Found::NotOurs(format!(
                "{missing} (to take the fds anyway, as under `systemfd --no-pid`, set {HANDOVER_ALLOW_MISSING_LISTEN_PID}=1)"
            )));
        }
    }
    let n = number(LISTEN_FDS, fds_var)?;
    if n > MAX_FDS as u64 {
        return Err(Error::Activation(format!(
            "LISTEN_FDS={n} exceeds the limit of {MAX_FDS}"
        )));
    }
    let n = n as usize;
    let names = names(vars.listen_fdnames.as_deref(), n)?;
    let channel = match vars.channel.as_deref() {
        None => None,
        Some(v) => {
            let fd = number(HANDOVER_FD, v)?;
            let expected = FIRST_FD as u64 + n as u64;
            if fd != expected {
                return Err(Error::Activation(format!(
                    "{HANDOVER_FD}={fd}, expected {expected} (right after the LISTEN_FDS)"
                )));
            }
            Some(fd as RawFd)
        }
    };
    let generation = match from_parent(&vars.generation, channel) {
        Some(g) => {
            let g = number(HANDOVER_GENERATION, g)?;
            u32::try_from(g).map_err(|_| {
                Error::Activation(format!("{HANDOVER_GENERATION}={g} is out of range"))
            })?
        }
        None => 0,
    };
    let state_len = match from_parent(&vars.state_len, channel) {
        Some(v) => {
            let len = number(HANDOVER_STATE_LEN, v)?;
            match usize::try_from(len) {
                Ok(len) if len <= state_limit => len,
                _ => {
                    return Err(Error::Activation(format!(
                        "{HANDOVER_STATE_LEN}={len} exceeds this process's state limit of {state_limit} bytes"
                    )))
                }
            }
        }
        None => 0,
    };
    let configured = match from_parent(&vars.configured, channel) {
        Some(v) => utf8(HANDOVER_CONFIGURED, v)?
            .split(':')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    let fds: Vec<(RawFd, String)> = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (FIRST_FD + i as RawFd, name))
        .collect();
    for (fd, name) in fds
        .iter()
        .map(|(fd, n)| (*fd, n.as_str()))
        .chain(channel.map(|c| (c, "handoff channel")))
    {
        check_passed(fd, name)?;
    }
    Ok(Found::Ours(Activation {
        fds,
        channel,
        generation,
        state_len,
        configured,
    }))
}

/// A variable only a parent of ours sets: read only with its channel.
fn from_parent(v: &Option<OsString>, channel: Option<RawFd>) -> Option<&OsStr> {
    v.as_deref().filter(|_| channel.is_some())
}

/// `LISTEN_FDNAMES` for `n` fds: one name each, `unknown` when unset.
fn names(var: Option<&OsStr>, n: usize) -> Result<Vec<String>> {
    let Some(v) = var else {
        return Ok(vec![UNNAMED.to_owned(); n]);
    };
    let s = utf8(LISTEN_FDNAMES, v)?;
    let names: Vec<String> = if s.is_empty() && n == 0 {
        Vec::new()
    } else {
        s.split(':').map(str::to_owned).collect()
    };
    if names.len() != n {
        return Err(Error::Activation(format!(
            "LISTEN_FDNAMES has {} names for LISTEN_FDS={n}",
            names.len()
        )));
    }
    Ok(names
        .into_iter()
        .map(|s| if s.is_empty() { UNNAMED.to_owned() } else { s })
        .collect())
}

/// Checks that `fd` (named `name`, for messages) was passed to this
/// process and is a socket.
fn check_passed(fd: RawFd, name: &str) -> Result<()> {
    let problem = if !sys::fd_is_open(fd) {
        "is not open".to_owned()
    } else if sys::fd_is_cloexec(fd) {
        // Nothing was passed there: an fd this process opened since (say,
        // the runtime's epoll fd, which took the lowest free number).
        "is not open (nothing was passed there; this process has opened it since it started)"
            .to_owned()
    } else {
        match sys::fd_is_socket(fd) {
            Ok(true) => return Ok(()),
            Ok(false) => "is not a socket".to_owned(),
            Err(e) => format!("cannot be inspected: {e}"),
        }
    };
    Err(Error::InheritedSocket {
        name: name.to_owned(),
        fd,
        problem,
    })
}

/// What a parent tells the next generation about the fds it passes.
#[derive(Debug)]
pub(crate) struct Handoff<'a> {
    /// The listeners' names, in fd order from [`FIRST_FD`]; the channel
    /// follows them.
    pub(crate) names: &'a [&'a str],
    /// The names whose address the program's configuration decided.
    pub(crate) configured: &'a [&'a str],
    pub(crate) generation: u32,
    pub(crate) state_len: usize,
}

impl Handoff<'_> {
    /// The variables, except `LISTEN_PID` (the child writes it after the
    /// clone).
    fn vars(&self) -> Vec<(&'static str, String)> {
        let n = self.names.len();
        let mut vars = vec![
            (LISTEN_FDS, n.to_string()),
            (LISTEN_FDNAMES, self.names.join(":")),
            (HANDOVER_FD, (FIRST_FD as usize + n).to_string()),
            (HANDOVER_GENERATION, self.generation.to_string()),
            (HANDOVER_CONFIGURED, self.configured.join(":")),
        ];
        if self.state_len > 0 {
            vars.push((HANDOVER_STATE_LEN, self.state_len.to_string()));
        }
        vars
    }
}

/// The environment of the next generation: `base` (when `Some`, the one a
/// reload command sent; else this process's own) without the per-process
/// variables, plus the handoff's. From a reload command's environment, what
/// describes the command itself is replaced by this process's own
/// (`NOTIFY_SOCKET`, `JOURNAL_STREAM`, `WATCHDOG_USEC`, `MANAGERPID`) or
/// dropped (`MAINPID`, `SYSTEMD_EXEC_PID`).
pub(crate) fn next_generation(
    base: Option<&[(OsString, OsString)]>,
    handoff: &Handoff<'_>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = match base {
        None => std::env::vars_os()
            .filter(|(k, _)| !is_one_of(k, PER_PROCESS))
            .collect(),
        Some(given) => given
            .iter()
            .filter(|(k, _)| {
                !is_one_of(k, PER_PROCESS)
                    && !is_one_of(k, FROM_OLD_PROCESS)
                    && !is_one_of(k, RELOAD_COMMAND_ONLY)
            })
            .cloned()
            .chain(std::env::vars_os().filter(|(k, _)| is_one_of(k, FROM_OLD_PROCESS)))
            .collect(),
    };
    env.extend(
        handoff
            .vars()
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );
    env
}

/// The environment of a program `handover run` supervises: `base` (the
/// supervisor's own) without the per-process variables and those of the
/// supervisor's own manager, plus its notify socket and, when there are
/// listeners, `LISTEN_FDS` and `LISTEN_FDNAMES` (the child writes
/// `LISTEN_PID`).
pub(crate) fn supervised(
    base: impl IntoIterator<Item = (OsString, OsString)>,
    notify_socket: &Path,
    names: &[&str],
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = base
        .into_iter()
        .filter(|(k, _)| !is_one_of(k, PER_PROCESS) && !is_one_of(k, OF_THE_MANAGER))
        .collect();
    env.push((NOTIFY_SOCKET.into(), notify_socket.as_os_str().to_owned()));
    if !names.is_empty() {
        env.push((LISTEN_FDS.into(), names.len().to_string().into()));
        env.push((LISTEN_FDNAMES.into(), names.join(":").into()));
    }
    env
}

/// The watchdog timeout systemd set for this process (`WATCHDOG_USEC`,
/// when `WATCHDOG_PID` is unset or names `pid`); `None` without one.
pub(crate) fn watchdog(pid: u32) -> Option<Duration> {
    let usec = std::env::var(WATCHDOG_USEC).ok()?.parse::<u64>().ok()?;
    let for_us = std::env::var(WATCHDOG_PID)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == pid);
    (usec > 0 && for_us).then(|| Duration::from_micros(usec))
}

/// The service's runtime directory (`RuntimeDirectory=`): the first entry
/// of `RUNTIME_DIRECTORY`, if it is absolute.
pub(crate) fn runtime_directory() -> Option<PathBuf> {
    let dirs = std::env::var_os(RUNTIME_DIRECTORY)?;
    std::env::split_paths(&dirs)
        .next()
        .filter(|d| d.is_absolute())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pid: &str, fds: &str, names: Option<&str>) -> Vars {
        Vars {
            listen_pid: Some(pid.into()),
            listen_fds: Some(fds.into()),
            listen_fdnames: names.map(OsString::from),
            ..Vars::default()
        }
    }

    #[test]
    fn nothing_without_listen_fds() {
        assert_eq!(read(&Vars::default(), 42, 0).unwrap(), Found::Nothing);
    }

    #[test]
    fn another_pid_is_left_alone() {
        let found = read(&vars("41", "garbage", None), 42, 0).unwrap();
        assert!(
            matches!(found, Found::NotOurs(ref why) if why.contains("41")),
            "{found:?}"
        );
        let v = Vars {
            listen_pid: None,
            ..vars("", "1", None)
        };
        assert!(matches!(read(&v, 42, 0).unwrap(), Found::NotOurs(_)));
    }

    #[test]
    fn a_missing_listen_pid_is_taken_only_when_allowed() {
        for (pid, allow, ours) in [
            (None, false, false),
            (Some(""), false, false),
            (None, true, true),
            (Some(""), true, true),
            // Allowing a missing LISTEN_PID never takes another process's.
            (Some("41"), true, false),
        ] {
            let v = Vars {
                listen_pid: pid.map(OsString::from),
                allow_missing_pid: allow,
                ..vars("", "0", None)
            };
            let found = read(&v, 42, 0).unwrap();
            assert_eq!(
                matches!(found, Found::Ours(_)),
                ours,
                "LISTEN_PID={pid:?} allowed={allow}: {found:?}"
            );
            if let (Found::NotOurs(why), None | Some("")) = (&found, pid) {
                assert!(why.contains(HANDOVER_ALLOW_MISSING_LISTEN_PID), "{why}");
            }
        }
    }

    #[test]
    fn garbage_is_a_typed_error() {
        for (pid, fds, names, want) in [
            ("42", "abc", None, "LISTEN_FDS=\"abc\" is not a number"),
            ("42", "-1", None, "is not a number"),
            ("42", "99999999999999999999999", None, "out of range"),
            ("42", "2000", None, "exceeds the limit"),
            ("4x2", "1", None, "LISTEN_PID=\"4x2\" is not a number"),
            ("42", "0", Some("a:b"), "has 2 names for LISTEN_FDS=0"),
        ] {
            let err = read(&vars(pid, fds, names), 42, 0).unwrap_err();
            assert!(matches!(err, Error::Activation(_)), "{err:?}");
            assert!(
                err.to_string().contains(want),
                "{err} should contain {want}"
            );
        }
    }

    #[test]
    fn zero_fds_is_fine() {
        let found = read(&vars("42", "0", None), 42, 0).unwrap();
        assert_eq!(
            found,
            Found::Ours(Activation {
                fds: vec![],
                channel: None,
                generation: 0,
                state_len: 0,
                configured: vec![],
            })
        );
    }

    // Fds 3.. in a test process belong to the harness, so the fd checks are
    // exercised end to end in integration/tests/faults.rs, where a real process gets a
    // non-socket at fd 3. Here: the channel must sit right after the fds.
    #[test]
    fn channel_must_follow_the_listeners() {
        let v = Vars {
            channel: Some("9".into()),
            ..vars("42", "0", None)
        };
        let err = read(&v, 42, 0).unwrap_err();
        assert!(err.to_string().contains("expected 3"), "{err}");
    }

    // The length is checked before any fd: a channel at fd 3 that is not
    // even open still fails on the length first. 2^64-1 once panicked
    // ("capacity overflow") and 10^12 aborted the process.
    #[test]
    fn the_state_length_is_bounded_by_the_receivers_limit() {
        for (len, want) in [
            (
                "18446744073709551615",
                "exceeds this process's state limit of 1024 bytes",
            ),
            (
                "1000000000000",
                "exceeds this process's state limit of 1024 bytes",
            ),
            ("99999999999999999999999", "out of range"),
            ("-1", "is not a number"),
        ] {
            let v = Vars {
                channel: Some("3".into()),
                state_len: Some(len.into()),
                ..vars("42", "0", None)
            };
            let err = read(&v, 42, 1024).unwrap_err();
            assert!(matches!(err, Error::Activation(_)), "{err:?}");
            assert!(
                err.to_string().contains(want),
                "{err} should contain {want}"
            );
        }
    }

    /// What a parent writes is what a child reads back (the fd checks
    /// aside, which need real fds: see integration/tests/faults.rs).
    #[test]
    fn the_handoff_variables_round_trip() {
        let handoff = Handoff {
            names: &["http", "admin"],
            configured: &["admin"],
            generation: 7,
            state_len: 12,
        };
        let written: Vec<(OsString, OsString)> = next_generation(Some(&[]), &handoff);
        let get = |k: &str| {
            written
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let v = Vars {
            listen_pid: Some("42".into()),
            listen_fds: get(LISTEN_FDS),
            listen_fdnames: get(LISTEN_FDNAMES),
            channel: get(HANDOVER_FD),
            generation: get(HANDOVER_GENERATION),
            state_len: get(HANDOVER_STATE_LEN),
            configured: get(HANDOVER_CONFIGURED),
            allow_missing_pid: false,
        };
        assert_eq!(v.channel.as_deref(), Some(OsStr::new("5")));
        // Fds 3 and 4 are not ours to pass here: the read stops at the
        // fd check, after every variable was parsed.
        let err = read(&v, 42, 1024).unwrap_err();
        assert!(matches!(err, Error::InheritedSocket { fd: 3, .. }), "{err}");
        assert_eq!(
            names(v.listen_fdnames.as_deref(), 2).unwrap(),
            ["http", "admin"]
        );
    }

    #[test]
    fn a_reload_commands_environment_is_cleaned() {
        let given: Vec<(OsString, OsString)> = [
            ("APP_MODE", "blue"),
            ("MAINPID", "1"),
            ("SYSTEMD_EXEC_PID", "9"),
            ("LISTEN_FDS", "9"),
            ("HANDOVER_BOUND", "x"),
            ("NOTIFY_SOCKET", "/run/reload-command-only"),
        ]
        .iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let handoff = Handoff {
            names: &["http"],
            configured: &[],
            generation: 1,
            state_len: 0,
        };
        let env = next_generation(Some(&given), &handoff);
        let keys: Vec<&OsStr> = env.iter().map(|(k, _)| k.as_os_str()).collect();
        assert!(keys.contains(&OsStr::new("APP_MODE")));
        for gone in [
            "MAINPID",
            "SYSTEMD_EXEC_PID",
            "HANDOVER_BOUND",
            HANDOVER_STATE_LEN,
        ] {
            assert!(!keys.contains(&OsStr::new(gone)), "{gone} in {keys:?}");
        }
        let fds: Vec<_> = env.iter().filter(|(k, _)| k == LISTEN_FDS).collect();
        assert_eq!(fds, [&(OsString::from(LISTEN_FDS), OsString::from("1"))]);
        assert!(!env
            .iter()
            .any(|(k, v)| k == NOTIFY_SOCKET && v == "/run/reload-command-only"));
    }
}
