//! Listener specifications as `handover run -l` takes them, and the other
//! values of its command line: pure parsers, tested as tables.
//!
//! | spec | socket |
//! |---|---|
//! | `http=127.0.0.1:8081` | TCP, listening on 127.0.0.1 port 8081 |
//! | `http=[::1]:8081`, `http=localhost:8081` | TCP (a name resolves to its first address) |
//! | `app=/run/app.sock`, `app=./app.sock` | Unix stream socket at that path (made absolute) |
//! | `udp:dns=127.0.0.1:5353` | UDP |
//! | `unix:app=/run/app.sock`, `tcp:http=...` | the kind given explicitly |
//! | `unix-dgram:log=/run/log.sock` | Unix datagram socket |
//!
//! The name travels to the program in `LISTEN_FDNAMES`: 1 to 255
//! characters, no `:` and no control characters, and not
//! `handover-control` (a program built on handover takes a socket of that
//! name as its control socket).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::SupervisorError;

/// What kind of socket a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A listening TCP socket.
    Tcp,
    /// A UDP socket.
    Udp,
    /// A listening Unix stream socket.
    UnixStream,
    /// A Unix datagram socket.
    UnixDatagram,
}

/// Where a listener is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// An IP address and port.
    Inet(SocketAddr),
    /// A path in the file system.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Inet(a) => a.fmt(f),
            ListenAddress::Unix(p) => p.display().fmt(f),
        }
    }
}

/// One socket the supervisor binds (or takes from its own socket
/// activation, by name) and hands to every instance of the program:
/// `[KIND:]NAME=ADDRESS`.
///
/// | spec | socket |
/// |---|---|
/// | `http=127.0.0.1:8081` | TCP, listening on 127.0.0.1 port 8081 |
/// | `http=[::1]:8081`, `http=localhost:8081` | TCP (a name resolves to its first address) |
/// | `app=/run/app.sock`, `app=./app.sock` | Unix stream socket at that path (made absolute) |
/// | `udp:dns=127.0.0.1:5353` | UDP |
/// | `unix:app=/run/app.sock`, `tcp:http=...` | the kind given explicitly |
/// | `unix-dgram:log=/run/log.sock` | Unix datagram socket |
///
/// The name goes to the program in `LISTEN_FDNAMES`: 1 to 255 characters,
/// no `:` and no control characters, and not `handover-control`.
///
/// ```
/// use handover::supervisor::{ListenerSpec, SocketKind};
///
/// let spec: ListenerSpec = "http=127.0.0.1:8081".parse()?;
/// assert_eq!((spec.name.as_str(), spec.kind), ("http", SocketKind::Tcp));
/// let spec: ListenerSpec = "udp:dns=127.0.0.1:5353".parse()?;
/// assert_eq!(spec.kind, SocketKind::Udp);
/// # Ok::<(), handover::supervisor::SupervisorError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// The name in `LISTEN_FDNAMES`.
    pub name: String,
    /// The kind of socket.
    pub kind: SocketKind,
    /// Where it is bound.
    pub address: ListenAddress,
}

/// The name a program built on handover gives its own control socket.
const RESERVED: &str = "handover-control";

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("the name must have 1 to 255 characters".into());
    }
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err("the name may contain no ':' and no control characters".into());
    }
    if name == RESERVED {
        return Err(format!(
            "{RESERVED:?} is reserved for a program's own control socket"
        ));
    }
    Ok(())
}

impl FromStr for ListenerSpec {
    type Err = SupervisorError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |problem: String| SupervisorError::ListenerSpec {
            spec: spec.to_owned(),
            problem,
        };
        let Some((left, address)) = spec.split_once('=') else {
            return Err(bad(
                "expected NAME=ADDRESS, for example http=127.0.0.1:8081".into(),
            ));
        };
        let (kind, name) = match left.split_once(':') {
            Some((kind, name)) => {
                let kind = match kind {
                    "tcp" => SocketKind::Tcp,
                    "udp" => SocketKind::Udp,
                    "unix" => SocketKind::UnixStream,
                    "unix-dgram" => SocketKind::UnixDatagram,
                    other => {
                        return Err(bad(format!(
                            "unknown kind {other:?}: use tcp, udp, unix or unix-dgram"
                        )))
                    }
                };
                (Some(kind), name)
            }
            None => (None, left),
        };
        check_name(name).map_err(bad)?;
        let is_path = address.starts_with('/') || address.starts_with('.');
        let unix_kind = matches!(
            kind,
            Some(SocketKind::UnixStream | SocketKind::UnixDatagram)
        );
        let (kind, address) = if unix_kind || (kind.is_none() && is_path) {
            if !is_path {
                return Err(bad(
                    "a Unix socket's address is a path starting with / or .".into(),
                ));
            }
            let mut path = PathBuf::from(address);
            if path.is_relative() {
                let cwd = std::env::current_dir()
                    .map_err(|e| bad(format!("cannot make the path absolute: {e}")))?;
                path = cwd.join(path);
            }
            (
                kind.unwrap_or(SocketKind::UnixStream),
                ListenAddress::Unix(path),
            )
        } else {
            let addr = match address.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => address
                    .to_socket_addrs()
                    .map_err(|e| bad(format!("{address:?} is not HOST:PORT ({e})")))?
                    .next()
                    .ok_or_else(|| bad(format!("{address:?} resolves to no address")))?,
            };
            (kind.unwrap_or(SocketKind::Tcp), ListenAddress::Inet(addr))
        };
        Ok(ListenerSpec {
            name: name.to_owned(),
            kind,
            address,
        })
    }
}

/// Parses a number of seconds (`30`, `0.5`) as the command line gives it.
pub fn parse_seconds(value: &str) -> Option<Duration> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
}

/// Checks a supervisor name (used in socket file names): 1 to 64 of
/// `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub(super) fn check_supervisor_name(name: &str) -> Result<(), SupervisorError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SupervisorError::Name(name.to_owned()))
    }
}

/// A supervisor name made from a program's file name: the characters
/// [`check_supervisor_name`] refuses become `_`.
pub(super) fn name_from_program(program: &std::ffi::OsStr) -> String {
    let base = std::path::Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = base
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    if name.is_empty() {
        name = "program".into();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inet(s: &str) -> ListenAddress {
        ListenAddress::Inet(s.parse().unwrap())
    }

    #[test]
    fn specs_parse_as_the_table_says() {
        let cwd = std::env::current_dir().unwrap();
        let cases: &[(&str, &str, SocketKind, ListenAddress)] = &[
            (
                "http=127.0.0.1:8081",
                "http",
                SocketKind::Tcp,
                inet("127.0.0.1:8081"),
            ),
            ("h=[::1]:80", "h", SocketKind::Tcp, inet("[::1]:80")),
            ("tcp:h=0.0.0.0:0", "h", SocketKind::Tcp, inet("0.0.0.0:0")),
            (
                "udp:dns=127.0.0.1:5353",
                "dns",
                SocketKind::Udp,
                inet("127.0.0.1:5353"),
            ),
            (
                "app=/run/app.sock",
                "app",
                SocketKind::UnixStream,
                ListenAddress::Unix("/run/app.sock".into()),
            ),
            (
                "app=./app.sock",
                "app",
                SocketKind::UnixStream,
                ListenAddress::Unix(cwd.join("./app.sock")),
            ),
            (
                "unix-dgram:log=/run/log.sock",
                "log",
                SocketKind::UnixDatagram,
                ListenAddress::Unix("/run/log.sock".into()),
            ),
            (
                "web api=127.0.0.1:1",
                "web api",
                SocketKind::Tcp,
                inet("127.0.0.1:1"),
            ),
        ];
        for (spec, name, kind, address) in cases {
            let got: ListenerSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                got,
                ListenerSpec {
                    name: name.to_string(),
                    kind: *kind,
                    address: address.clone()
                },
                "{spec}"
            );
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let cases = [
            ("127.0.0.1:8081", "expected NAME=ADDRESS"),
            ("=127.0.0.1:1", "1 to 255 characters"),
            ("sctp:x=127.0.0.1:1", "unknown kind \"sctp\""),
            ("a:b=127.0.0.1:1", "unknown kind \"a\""),
            ("tcp:b:c=127.0.0.1:1", "no ':'"),
            ("handover-control=/x.sock", "reserved"),
            ("unix:app=127.0.0.1:1", "a path starting with"),
            ("http=not an address", "is not HOST:PORT"),
            ("http=127.0.0.1", "is not HOST:PORT"),
        ];
        for (spec, want) in cases {
            let e = spec.parse::<ListenerSpec>().unwrap_err();
            assert!(
                matches!(e, SupervisorError::ListenerSpec { .. }),
                "{spec}: {e:?}"
            );
            let text = e.to_string();
            assert!(text.contains(want) && text.contains(spec), "{spec}: {text}");
        }
    }

    #[test]
    fn seconds_and_names() {
        assert_eq!(parse_seconds("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_seconds("0"), Some(Duration::ZERO));
        for bad in ["-1", "NaN", "inf", "1s", ""] {
            assert_eq!(parse_seconds(bad), None, "{bad}");
        }
        for good in ["hello", "my-app_2.0"] {
            check_supervisor_name(good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_supervisor_name(bad).is_err(), "{bad}");
        }
        assert_eq!(name_from_program("/usr/bin/hello".as_ref()), "hello");
        assert_eq!(name_from_program("./my app".as_ref()), "my_app");
        assert_eq!(name_from_program(".hidden".as_ref()), "_hidden");
        assert_eq!(name_from_program("/".as_ref()), "program");
    }
}
