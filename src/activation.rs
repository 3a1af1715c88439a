//! Reading the socket-activation environment strictly.
//!
//! systemd (and our own parent, which speaks the same protocol) passes
//! listening sockets at fds `3..3+LISTEN_FDS`, names them in
//! `LISTEN_FDNAMES`, and says whom they are for in `LISTEN_PID`. A parent of
//! ours also passes the handoff channel right after them, in
//! `HANDOVER_FD`.
//!
//! Why not `listenfd` or `sd-notify` here: `listenfd` 1.0 accepts a missing
//! `LISTEN_PID`, ignores a garbage `LISTEN_FDS` and knows no names, and
//! `sd_notify::listen_fds` sets `FD_CLOEXEC` before it has checked the names
//! and has no upper bound. This module validates everything first and
//! touches no fd unless all of it is right (see `docs/design.md`).

use std::ffi::OsStr;
use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::sys;

/// The first passed fd, per `sd_listen_fds(3)`.
pub(crate) const FIRST_FD: RawFd = 3;
/// More inherited listeners than this is a sign of a broken environment.
pub(crate) const MAX_FDS: usize = 1024;
/// The name systemd gives an fd without `FileDescriptorName=`.
pub(crate) const UNNAMED: &str = "unknown";

/// Env var carrying the handoff channel's fd number (set by our parent).
pub(crate) const ENV_CHANNEL: &str = "HANDOVER_FD";
/// Env var carrying the length of the state that follows on the channel.
pub(crate) const ENV_STATE_LEN: &str = "HANDOVER_STATE_LEN";
/// Env var carrying the generation number (0 for a process nobody handed to).
pub(crate) const ENV_GENERATION: &str = "HANDOVER_GENERATION";
/// Env var naming (`:`-separated) the passed listeners whose address this
/// program decided (bound from its configuration by some generation), as
/// opposed to those whose address a `.socket` unit or
/// `systemd-socket-activate` decided. Set by our parent.
pub(crate) const ENV_BOUND: &str = "HANDOVER_BOUND";
/// Env var a developer sets to `1` to take passed fds whose `LISTEN_PID` is
/// missing or empty, as `systemfd --no-pid` passes them through
/// `cargo watch` (whose child cannot know its pid in advance). Never on by
/// default: without `LISTEN_PID` nothing says the fds are for this process.
/// A `LISTEN_PID` naming another process is ignored whatever it says.
pub(crate) const ENV_ALLOW_NO_PID: &str = "HANDOVER_ALLOW_MISSING_LISTEN_PID";

/// The activation variables as found in the environment.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Vars<'a> {
    pub(crate) listen_pid: Option<&'a OsStr>,
    pub(crate) listen_fds: Option<&'a OsStr>,
    pub(crate) listen_fdnames: Option<&'a OsStr>,
    pub(crate) channel: Option<&'a OsStr>,
    pub(crate) generation: Option<&'a OsStr>,
    pub(crate) state_len: Option<&'a OsStr>,
    /// [`ENV_ALLOW_NO_PID`] is `1`.
    pub(crate) allow_missing_pid: bool,
}

/// What was passed to this process, validated but not yet taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Passed {
    /// `(fd, name)` in fd order.
    pub(crate) fds: Vec<(RawFd, String)>,
    /// The handoff channel from a parent of ours.
    pub(crate) channel: Option<RawFd>,
    /// Our generation (the parent's plus one; 0 without a parent).
    pub(crate) generation: u32,
    /// How many bytes of state follow on the channel.
    pub(crate) state_len: usize,
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
    Passed(Passed),
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
pub(crate) fn read(vars: Vars<'_>, pid: u32, state_limit: usize) -> Result<Found> {
    let Some(fds_var) = vars.listen_fds else {
        return Ok(Found::Nothing);
    };
    match vars.listen_pid.filter(|p| !p.is_empty()) {
        Some(p) => {
            let target = number("LISTEN_PID", p)?;
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
                "{missing} (to take the fds anyway, as under `systemfd --no-pid`, set {ENV_ALLOW_NO_PID}=1)"
            )));
        }
    }
    let n = number("LISTEN_FDS", fds_var)?;
    if n > MAX_FDS as u64 {
        return Err(Error::Activation(format!(
            "LISTEN_FDS={n} exceeds the limit of {MAX_FDS}"
        )));
    }
    let n = n as usize;
    let names: Vec<String> = match vars.listen_fdnames {
        None => vec![UNNAMED.to_owned(); n],
        Some(v) => {
            let s = utf8("LISTEN_FDNAMES", v)?;
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
            names
                .into_iter()
                .map(|s| if s.is_empty() { UNNAMED.to_owned() } else { s })
                .collect()
        }
    };
    let channel = match vars.channel {
        None => None,
        Some(v) => {
            let fd = number(ENV_CHANNEL, v)?;
            let expected = FIRST_FD as u64 + n as u64;
            if fd != expected {
                return Err(Error::Activation(format!(
                    "{ENV_CHANNEL}={fd}, expected {expected} (right after the LISTEN_FDS)"
                )));
            }
            Some(fd as RawFd)
        }
    };
    let generation = match (channel, vars.generation) {
        (Some(_), Some(g)) => {
            let g = number(ENV_GENERATION, g)?;
            u32::try_from(g)
                .map_err(|_| Error::Activation(format!("{ENV_GENERATION}={g} is out of range")))?
        }
        _ => 0,
    };
    let state_len = match (channel, vars.state_len) {
        (Some(_), Some(v)) => {
            let len = number(ENV_STATE_LEN, v)?;
            match usize::try_from(len) {
                Ok(len) if len <= state_limit => len,
                _ => {
                    return Err(Error::Activation(format!(
                        "{ENV_STATE_LEN}={len} exceeds this process's state limit of {state_limit} bytes"
                    )))
                }
            }
        }
        _ => 0,
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
        if !sys::fd_is_open(fd) {
            return Err(Error::InheritedSocket {
                name: name.to_owned(),
                fd,
                problem: "is not open".into(),
            });
        }
        // Nothing was passed there: an fd this process opened since (say,
        // the runtime's epoll fd, which took the lowest free number).
        if sys::fd_is_cloexec(fd) {
            return Err(Error::InheritedSocket {
                name: name.to_owned(),
                fd,
                problem: "is not open (nothing was passed there; this process has opened it since it started)".into(),
            });
        }
        match sys::fd_is_socket(fd) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::InheritedSocket {
                    name: name.to_owned(),
                    fd,
                    problem: "is not a socket".into(),
                })
            }
            Err(e) => {
                return Err(Error::InheritedSocket {
                    name: name.to_owned(),
                    fd,
                    problem: format!("cannot be inspected: {e}"),
                })
            }
        }
    }
    Ok(Found::Passed(Passed {
        fds,
        channel,
        generation,
        state_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pid: &'a str, fds: &'a str, names: Option<&'a str>) -> Vars<'a> {
        Vars {
            listen_pid: Some(OsStr::new(pid)),
            listen_fds: Some(OsStr::new(fds)),
            listen_fdnames: names.map(OsStr::new),
            ..Vars::default()
        }
    }

    #[test]
    fn nothing_without_listen_fds() {
        assert_eq!(read(Vars::default(), 42, 0).unwrap(), Found::Nothing);
    }

    #[test]
    fn another_pid_is_left_alone() {
        let found = read(vars("41", "garbage", None), 42, 0).unwrap();
        assert!(
            matches!(found, Found::NotOurs(ref why) if why.contains("41")),
            "{found:?}"
        );
        let found = read(
            Vars {
                listen_pid: None,
                ..vars("", "1", None)
            },
            42,
            0,
        )
        .unwrap();
        assert!(matches!(found, Found::NotOurs(_)));
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
                listen_pid: pid.map(OsStr::new),
                allow_missing_pid: allow,
                ..vars("", "0", None)
            };
            let found = read(v, 42, 0).unwrap();
            assert_eq!(
                matches!(found, Found::Passed(_)),
                ours,
                "LISTEN_PID={pid:?} allowed={allow}: {found:?}"
            );
            if let (Found::NotOurs(why), None | Some("")) = (&found, pid) {
                assert!(why.contains(ENV_ALLOW_NO_PID), "{why}");
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
            let err = read(vars(pid, fds, names), 42, 0).unwrap_err();
            assert!(matches!(err, Error::Activation(_)), "{err:?}");
            assert!(
                err.to_string().contains(want),
                "{err} should contain {want}"
            );
        }
    }

    #[test]
    fn zero_fds_is_fine() {
        let found = read(vars("42", "0", None), 42, 0).unwrap();
        assert_eq!(
            found,
            Found::Passed(Passed {
                fds: vec![],
                channel: None,
                generation: 0,
                state_len: 0,
            })
        );
    }

    // Fds 3.. in a test process belong to the harness, so the fd checks are
    // exercised end to end in tests/faults.rs, where a real process gets a
    // non-socket at fd 3. Here: the channel must sit right after the fds.
    #[test]
    fn channel_must_follow_the_listeners() {
        let v = Vars {
            channel: Some(OsStr::new("9")),
            ..vars("42", "0", None)
        };
        let err = read(v, 42, 0).unwrap_err();
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
                channel: Some(OsStr::new("3")),
                state_len: Some(OsStr::new(len)),
                ..vars("42", "0", None)
            };
            let err = read(v, 42, 1024).unwrap_err();
            assert!(matches!(err, Error::Activation(_)), "{err:?}");
            assert!(
                err.to_string().contains(want),
                "{err} should contain {want}"
            );
        }
    }
}
