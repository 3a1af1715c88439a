//! The control socket: a reload command asks a running service for an
//! upgrade, or its status. Both servers speak it through this module, a
//! program's own ([`crate::control`]) and `handover run`'s
//! (`supervisor::control`), and so does the client
//! ([`crate::control::request_upgrade`], `handover-reload`, `handover
//! reload`).
//!
//! One request per connection, one reply line:
//!
//! | request | reply |
//! |---|---|
//! | `upgrade\n` | `ok <new main pid>\n`; `error <reason>\n`; `cancelled <reason>\n` when the service is being stopped |
//! | `upgrade env <n>\n`, then `n` bytes of `KEY=VALUE\0` entries | the same; the environment is for the new process |
//! | `status\n` | `ok <phase> generation=<g> pid=<main pid>\n` (the supervisor adds ` reload=<mode>`) |
//! | anything else | `error unknown request\n` |
//!
//! | rule | |
//! |---|---|
//! | request line | at most [`MAX_LINE`] (256) bytes, its newline included; a longer one gets `error the request line is longer than 256 bytes`. At the end of the stream the newline may be missing |
//! | environment | `n` at most [`MAX_ENV_BYTES`] (256 KiB), else `error the environment is <n> bytes, more than the limit of 262144`; `n` not a number: `error malformed request`; fewer than `n` bytes before the end of the stream: `error the environment ended after <got> of <n> bytes`. Entries without `=` or with an empty name are dropped |
//! | time | the whole request within [`REQUEST_TIMEOUT`] (10 s) of the connection's accept, else it is closed unanswered |
//! | who | a peer with the server's effective UID, or root (`SO_PEERCRED`). Any other gets `error permission denied\n`, once its request was read: closed with the request unread, the peer's write would fail (EPIPE) before it could read why |
//! | reply | one line, at most [`MAX_REPLY`] bytes read by the client; control characters in a reason become spaces ([`one_line`](super::one_line)) |

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{Duration, Instant};

/// The largest environment a reload command may send.
pub const MAX_ENV_BYTES: usize = 256 * 1024;
/// The longest request line, its newline included.
pub(crate) const MAX_LINE: u64 = 256;
/// How long a peer has, from the accept, to send its whole request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest reply line a client reads.
pub(crate) const MAX_REPLY: u64 = 64 * 1024;

const UPGRADE: &str = "upgrade";
const ENV: &str = "env";
const STATUS: &str = "status";
const OK: &str = "ok ";
const ERROR: &str = "error ";
const CANCELLED: &str = "cancelled ";

/// A request, as a client sends it and a server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// `upgrade`, or `upgrade env <n>` with the environment.
    Upgrade(Option<Vec<(OsString, OsString)>>),
    /// `status`
    Status,
}

/// The environment a client wanted to send is over [`MAX_ENV_BYTES`]:
/// its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EnvTooLarge(pub(crate) usize);

impl Request {
    /// The request's bytes: its line and, for an upgrade with an
    /// environment, the environment.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, EnvTooLarge> {
        match self {
            Request::Status => Ok(format!("{STATUS}\n").into_bytes()),
            Request::Upgrade(None) => Ok(format!("{UPGRADE}\n").into_bytes()),
            Request::Upgrade(Some(env)) => {
                let body = encode_env(env);
                if body.len() > MAX_ENV_BYTES {
                    return Err(EnvTooLarge(body.len()));
                }
                let mut out = format!("{UPGRADE} {ENV} {}\n", body.len()).into_bytes();
                out.extend_from_slice(&body);
                Ok(out)
            }
        }
    }
}

/// Why a request gets `error <reason>` without being carried out; the
/// reason is the Display.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadRequest {
    /// The peer is neither the server's user nor root.
    #[error("permission denied")]
    PermissionDenied,
    /// Not a request of this protocol.
    #[error("unknown request")]
    Unknown,
    /// `upgrade env` without a number of bytes.
    #[error("malformed request")]
    Malformed,
    /// No newline within [`MAX_LINE`] bytes.
    #[error("the request line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// `upgrade env <n>` with `n` over [`MAX_ENV_BYTES`].
    #[error("the environment is {0} bytes, more than the limit of {MAX_ENV_BYTES}")]
    EnvTooLarge(usize),
    /// The stream ended within the environment.
    #[error("the environment ended after {got} of {len} bytes")]
    ShortEnv {
        /// The bytes announced.
        len: usize,
        /// The bytes that came.
        got: usize,
    },
}

/// The head of a request: its line, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Upgrade,
    /// `upgrade env <n>`, `n` checked against [`MAX_ENV_BYTES`].
    UpgradeEnv(usize),
    Status,
}

impl Line {
    /// Decodes a request line, without its newline.
    fn parse(line: &[u8]) -> Result<Line, BadRequest> {
        let line = std::str::from_utf8(line).map_err(|_| BadRequest::Unknown)?;
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [UPGRADE] => Ok(Line::Upgrade),
            [STATUS] => Ok(Line::Status),
            [UPGRADE, ENV, n] => match n.parse::<usize>() {
                Ok(n) if n <= MAX_ENV_BYTES => Ok(Line::UpgradeEnv(n)),
                Ok(n) => Err(BadRequest::EnvTooLarge(n)),
                Err(_) => Err(BadRequest::Malformed),
            },
            [UPGRADE, ENV, ..] => Err(BadRequest::Malformed),
            _ => Err(BadRequest::Unknown),
        }
    }
}

/// Encodes an environment as `KEY=VALUE\0...`.
fn encode_env(env: &[(OsString, OsString)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes `KEY=VALUE\0...`; an entry without `=` or with an empty name is
/// dropped.
fn decode_env(bytes: &[u8]) -> Vec<(OsString, OsString)> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|e| {
            let eq = e.iter().position(|b| *b == b'=')?;
            (eq > 0).then(|| {
                (
                    OsString::from_vec(e[..eq].to_vec()),
                    OsString::from_vec(e[eq + 1..].to_vec()),
                )
            })
        })
        .collect()
}

/// Reads one request from `stream`: its line, then its environment if it
/// announces one. From a peer not `allowed`, the request is read all the
/// same (an announced environment up to [`MAX_ENV_BYTES`]) and answered
/// [`BadRequest::PermissionDenied`]. Not bounded in time (the caller is).
async fn read_request<R: AsyncBufRead + Unpin>(
    stream: &mut R,
    allowed: bool,
) -> io::Result<Result<Request, BadRequest>> {
    let mut line = Vec::new();
    (&mut *stream)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    let line = match line.strip_suffix(b"\n") {
        Some(line) => Line::parse(line),
        None if line.len() as u64 == MAX_LINE => Err(BadRequest::LineTooLong),
        // The end of the stream: the peer shut its side down after it.
        None => Line::parse(&line),
    };
    let request = match line {
        Ok(Line::Upgrade) => Ok(Request::Upgrade(None)),
        Ok(Line::Status) => Ok(Request::Status),
        Ok(Line::UpgradeEnv(len)) => {
            let mut body = Vec::with_capacity(len);
            (&mut *stream)
                .take(len as u64)
                .read_to_end(&mut body)
                .await?;
            if body.len() < len {
                Err(BadRequest::ShortEnv {
                    len,
                    got: body.len(),
                })
            } else {
                Ok(Request::Upgrade(Some(decode_env(&body))))
            }
        }
        Err(bad) => Err(bad),
    };
    Ok(if allowed {
        request
    } else {
        Err(BadRequest::PermissionDenied)
    })
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `ok <text>`: the new main pid after an upgrade, or the status.
    Ok(String),
    /// `error <reason>`: not done; the service still serves.
    Error(String),
    /// `cancelled <reason>`: the service is being stopped; the upgrade did
    /// not happen and will not.
    Cancelled(String),
}

impl From<BadRequest> for Reply {
    fn from(bad: BadRequest) -> Reply {
        Reply::Error(bad.to_string())
    }
}

impl Reply {
    /// The reply as one line, newline included: control characters in the
    /// text become spaces, so that it cannot inject another line.
    pub(crate) fn line(&self) -> String {
        let (prefix, text) = match self {
            Reply::Ok(t) => (OK, t),
            Reply::Error(t) => (ERROR, t),
            Reply::Cancelled(t) => (CANCELLED, t),
        };
        format!("{prefix}{}\n", super::one_line(text))
    }

    /// Decodes a reply line (its newline trimmed or not); `None` if it is
    /// no reply of this protocol.
    pub(crate) fn parse(line: &str) -> Option<Reply> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if let Some(t) = line.strip_prefix(OK) {
            Some(Reply::Ok(t.to_owned()))
        } else if let Some(t) = line.strip_prefix(ERROR) {
            Some(Reply::Error(t.to_owned()))
        } else {
            line.strip_prefix(CANCELLED)
                .map(|t| Reply::Cancelled(t.to_owned()))
        }
    }
}

/// Whether the peer of `stream` may talk to this server: it runs with this
/// process's effective UID, or as root (`SO_PEERCRED`: the credentials at
/// its `connect`).
pub(crate) fn peer_allowed(stream: &UnixStream) -> io::Result<bool> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw())
}

/// One accepted connection, from its request to its reply; what both
/// servers do with the bytes. The request's deadline starts here.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: BufReader<UnixStream>,
    allowed: bool,
    deadline: Instant,
}

impl Connection {
    /// A connection just accepted: checks who the peer is.
    pub(crate) fn new(stream: UnixStream) -> io::Result<Connection> {
        Ok(Connection {
            allowed: peer_allowed(&stream)?,
            stream: BufReader::new(stream),
            deadline: Instant::now() + REQUEST_TIMEOUT,
        })
    }

    /// Waits until the request starts to arrive, or the peer shuts its
    /// side down. For a server that counts only connections with a request
    /// as work in flight.
    pub(crate) async fn arriving(&mut self) -> io::Result<()> {
        tokio::time::timeout_at(self.deadline, self.stream.fill_buf())
            .await
            .map_err(|_| timed_out())??;
        Ok(())
    }

    /// Reads the request ([`read_request`]), by the deadline.
    /// `Ok(Err(bad))`: answer `error <bad>` at once (a refused peer gets
    /// [`BadRequest::PermissionDenied`]). `Err`: no request (the deadline,
    /// or the connection failed); close without an answer.
    pub(crate) async fn request(&mut self) -> io::Result<Result<Request, BadRequest>> {
        tokio::time::timeout_at(self.deadline, read_request(&mut self.stream, self.allowed))
            .await
            .map_err(|_| timed_out())?
    }

    /// Writes the reply and closes. A peer already gone (killed, or timed
    /// out) is not an error.
    pub(crate) async fn reply(mut self, reply: &Reply) -> io::Result<()> {
        let line = reply.line();
        match self.stream.get_mut().write_all(line.as_bytes()).await {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!(reply = %line.trim_end(), "control client gone before the answer");
                Ok(())
            }
            r => r,
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no complete request within {REQUEST_TIMEOUT:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// Reads one request from `bytes`; also how many bytes were left unread.
    async fn read(bytes: &[u8], allowed: bool) -> (io::Result<Result<Request, BadRequest>>, usize) {
        let mut rest = bytes;
        let got = read_request(&mut rest, allowed).await;
        (got, rest.len())
    }

    #[test]
    fn env_round_trips() {
        let e = env(&[("A", "1"), ("B", "x=y z"), ("EMPTY", "")]);
        assert_eq!(decode_env(&encode_env(&e)), e);
        assert_eq!(decode_env(b"=novar\0junk\0\0A=1"), env(&[("A", "1")]));
    }

    #[tokio::test]
    async fn requests_round_trip() {
        for (request, want) in [
            (Request::Status, Request::Status),
            (Request::Upgrade(None), Request::Upgrade(None)),
            (
                Request::Upgrade(Some(vec![])),
                Request::Upgrade(Some(vec![])),
            ),
            (
                Request::Upgrade(Some(env(&[("A", "1"), ("B", "x=y\nz"), ("E", "")]))),
                Request::Upgrade(Some(env(&[("A", "1"), ("B", "x=y\nz"), ("E", "")]))),
            ),
            // A NUL ends a value: what follows it is no entry.
            (
                Request::Upgrade(Some(env(&[("A", "1\0B=2"), ("C", "3")]))),
                Request::Upgrade(Some(env(&[("A", "1"), ("B", "2"), ("C", "3")]))),
            ),
        ] {
            let bytes = request.encode().unwrap();
            let (got, left) = read(&bytes, true).await;
            assert_eq!(got.unwrap(), Ok(want), "{bytes:?}");
            assert_eq!(left, 0);
        }
    }

    #[test]
    fn an_oversized_env_is_not_encoded() {
        let e = env(&[("X", &"y".repeat(MAX_ENV_BYTES))]);
        assert_eq!(
            Request::Upgrade(Some(e)).encode(),
            Err(EnvTooLarge(MAX_ENV_BYTES + 3))
        );
        let e = env(&[("X", &"y".repeat(MAX_ENV_BYTES - 3))]);
        assert!(
            Request::Upgrade(Some(e)).encode().is_ok(),
            "the limit itself"
        );
    }

    #[test]
    fn request_lines_decode() {
        for (line, want) in [
            (&b"upgrade"[..], Ok(Line::Upgrade)),
            (b"  upgrade \r", Ok(Line::Upgrade)),
            (b"status", Ok(Line::Status)),
            (b"upgrade env 0", Ok(Line::UpgradeEnv(0))),
            (b"upgrade env 262144", Ok(Line::UpgradeEnv(MAX_ENV_BYTES))),
            (b"upgrade env 262145", Err(BadRequest::EnvTooLarge(262_145))),
            (
                b"upgrade env 99999999999999999999999",
                Err(BadRequest::Malformed),
            ),
            (b"upgrade env", Err(BadRequest::Malformed)),
            (b"upgrade env -1", Err(BadRequest::Malformed)),
            (b"upgrade env x", Err(BadRequest::Malformed)),
            (b"upgrade env 1 2", Err(BadRequest::Malformed)),
            (b"", Err(BadRequest::Unknown)),
            (b"UPGRADE", Err(BadRequest::Unknown)),
            (b"status please", Err(BadRequest::Unknown)),
            (b"stat\xffus", Err(BadRequest::Unknown)),
        ] {
            assert_eq!(
                Line::parse(line),
                want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn malformed_requests_get_a_reason() {
        let long = [b"status".as_slice(), &[b' '; 300], b"\n"].concat();
        for (bytes, want) in [
            (&b"reboot\n"[..], "error unknown request\n"),
            (&long, "error the request line is longer than 256 bytes\n"),
            (
                b"upgrade env 300000\n",
                "error the environment is 300000 bytes, more than the limit of 262144\n",
            ),
            (b"upgrade env\n", "error malformed request\n"),
            (
                b"upgrade env 10\nA=1\0",
                "error the environment ended after 4 of 10 bytes\n",
            ),
        ] {
            let bad = read(bytes, true).await.0.unwrap().unwrap_err();
            assert_eq!(Reply::from(bad).line(), want);
        }
        // Without a newline at the end of the stream: the request still.
        assert_eq!(read(b"status", true).await.0.unwrap(), Ok(Request::Status));
        // The longest line that fits, newline included.
        let longest = [b"status".as_slice(), &[b' '; 249], b"\n"].concat();
        assert_eq!(longest.len() as u64, MAX_LINE);
        assert_eq!(read(&longest, true).await.0.unwrap(), Ok(Request::Status));
    }

    /// A refused peer's request is read to its end, environment included,
    /// before it is answered: closed unread, the peer's write would fail.
    #[tokio::test]
    async fn a_refused_peers_request_is_read_in_full() {
        let e = env(&[("PADDING", &"x".repeat(100_000))]);
        for request in [Request::Status, Request::Upgrade(Some(e))] {
            let bytes = request.encode().unwrap();
            let (got, left) = read(&bytes, false).await;
            assert_eq!(got.unwrap(), Err(BadRequest::PermissionDenied));
            assert_eq!(left, 0, "all of it read");
        }
        let (got, _) = read(b"reboot\n", false).await;
        assert_eq!(
            got.unwrap(),
            Err(BadRequest::PermissionDenied),
            "no other reason"
        );
        assert_eq!(
            Reply::from(BadRequest::PermissionDenied).line(),
            "error permission denied\n"
        );
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Ok("4242".into()),
            Reply::Ok("Ready generation=3 pid=4242".into()),
            Reply::Error("upgrade failed: no such file".into()),
            Reply::Cancelled("stopped during the upgrade".into()),
            Reply::Error(String::new()),
        ] {
            let line = reply.line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(Reply::parse(&line), Some(reply.clone()), "{line:?}");
            assert_eq!(Reply::parse(line.trim_end_matches('\n')), Some(reply));
        }
        for junk in ["", "ok", "OK 1", "errors x", "\n"] {
            assert_eq!(Reply::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_reason_cannot_inject_a_line() {
        let line = Reply::Error("upgrade failed: bad\nok 1\r\n".into()).line();
        assert_eq!(line, "error upgrade failed: bad ok 1  \n");
        assert_eq!(
            Reply::parse(&line),
            Some(Reply::Error("upgrade failed: bad ok 1  ".into()))
        );
    }

    /// A peer that connects and sends nothing, or half a request, is
    /// closed at the deadline: one deadline for the whole request.
    #[tokio::test(start_paused = true)]
    async fn a_request_must_arrive_within_the_timeout() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let started = Instant::now();
        let mut conn = Connection::new(server).unwrap();
        assert!(conn.allowed, "the same user");
        client.write_all(b"upgrade env 10\nA=").await.unwrap();
        conn.arriving().await.unwrap();
        let e = conn.request().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let took = started.elapsed();
        assert!(
            took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_millis(10),
            "{took:?}"
        );

        let (server, _client) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(server).unwrap();
        let e = conn.arriving().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }

    #[tokio::test]
    async fn a_connection_answers_one_line() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(server).unwrap();
        client.write_all(b"status\n").await.unwrap();
        assert_eq!(conn.request().await.unwrap(), Ok(Request::Status));
        conn.reply(&Reply::Ok("Ready\ngeneration=1".into()))
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "ok Ready generation=1\n");

        // The peer gone before the answer: not an error.
        let (server, mut client) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(server).unwrap();
        client.write_all(b"status\n").await.unwrap();
        drop(client);
        assert_eq!(conn.request().await.unwrap(), Ok(Request::Status));
        conn.reply(&Reply::Ok("x".into())).await.unwrap();
    }
}
