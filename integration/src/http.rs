//! The tests' HTTP/1.1 client, std only: one response parser (a body by `Content-Length`,
//! chunked, or up to the end of the connection; interim 1xx answers skipped), used by the load
//! client and by the tests' own requests, on a fresh connection ([`get`], [`greeting`]) or on
//! a connection the test keeps open ([`Conn`]), plain or wrapped (TLS: [`Connector`]).

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::TIMEOUT;

/// Longest status or header line accepted.
const MAX_LINE: usize = 16 * 1024;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The connection was refused (nothing listening).
    Refused,
    /// Connecting failed otherwise (including a connect timeout).
    Connect,
    /// The connection was reset, or writing hit a closed connection.
    Reset,
    /// The server closed the connection before sending any byte of the response: the
    /// keep-alive race.
    EofBeforeResponse,
    /// The server closed the connection in the middle of a response.
    EofMidResponse,
    /// A read or write timed out.
    Timeout,
    /// The response status was not 2xx (the load client's verdict; the parser accepts any).
    Status,
    /// The response could not be parsed, or the server did not close after answering a
    /// `Connection: close` request.
    Malformed,
    /// Any other IO error.
    Io,
}

/// A failed request: its kind and what happened.
#[derive(Debug, Clone)]
pub struct Fail {
    /// How it failed.
    pub kind: ErrorKind,
    /// What happened, for the report.
    pub message: String,
}

impl Fail {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Fail {
        Fail {
            kind,
            message: message.into(),
        }
    }

    /// An IO error of step `what`, classified.
    pub fn io(what: &str, e: io::Error) -> Fail {
        let kind = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorKind::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
            io::ErrorKind::UnexpectedEof => ErrorKind::EofMidResponse,
            _ => ErrorKind::Io,
        };
        Fail::new(kind, format!("{what}: {e}"))
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// A response as read.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// The body, whole (chunks joined).
    pub body: Vec<u8>,
    /// The server closes the connection after it (`Connection: close`, HTTP/1.0, or a body
    /// delimited by the end of the connection).
    pub close: bool,
}

impl Response {
    /// The body, as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The value of the first header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A request line and headers for `GET path`, closing the connection after the answer or not.
pub fn get_request(path: &str, host: &str, close: bool) -> Vec<u8> {
    let close = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: handover-tests\r\n{close}\r\n")
        .into_bytes()
}

/// Connects to `addr` with `timeout` for the connect and every later read and write.
pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Fail> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            _ => ErrorKind::Connect,
        };
        Fail::new(kind, format!("connect to {addr}: {e}"))
    })?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| Fail::io("socket options", e))?;
    Ok(s)
}

/// A connection as the clients use it: a TCP stream, or a TLS stream over one.
pub trait Stream: Read + Write + Send {}

impl<T: Read + Write + Send> Stream for T {}

/// Wraps each new connection (its timeouts set) before HTTP is spoken on it: a TLS client's
/// handshake, say.
#[derive(Clone)]
pub struct Connector(pub Arc<dyn Fn(TcpStream) -> io::Result<Box<dyn Stream>> + Send + Sync>);

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

/// A connection the test keeps open: requests one after another, a request sent in parts.
/// Every socket operation is bounded by [`TIMEOUT`] (for a wrapped stream, by the timeouts of
/// the TCP stream under it).
pub struct Conn<S: Read + Write = TcpStream> {
    reader: BufReader<S>,
}

impl Conn {
    /// Connects to `addr`; panics if it cannot.
    pub fn open(addr: SocketAddr) -> Conn {
        let s = connect(addr, TIMEOUT).unwrap_or_else(|f| panic!("{f}"));
        Conn::over(s)
    }

    /// The client's own address of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.reader.get_ref().local_addr().unwrap()
    }
}

impl<S: Read + Write> Conn<S> {
    /// HTTP over `stream` (a TLS stream, say).
    pub fn over(stream: S) -> Conn<S> {
        Conn {
            reader: BufReader::new(stream),
        }
    }

    /// Sends `bytes` (a whole request, or part of one).
    pub fn send(&mut self, bytes: &[u8]) {
        let s = self.reader.get_mut();
        s.write_all(bytes)
            .and_then(|()| s.flush())
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// Reads the next response.
    pub fn read(&mut self) -> Response {
        read_response(&mut self.reader).unwrap_or_else(|f| panic!("{f}"))
    }

    /// `GET path`, keeping the connection open, and its response.
    pub fn get(&mut self, path: &str) -> Response {
        self.send(&get_request(path, "test", false));
        self.read()
    }

    /// Whether the server has closed the connection (nothing more to read); panics if more
    /// comes.
    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => true,
            Ok(_) => panic!(
                "more after the response: {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(_) => false,
        }
    }

    /// The stream, for a client that takes over (nothing of a response may be left unread).
    pub fn into_stream(self) -> S {
        assert!(self.reader.buffer().is_empty(), "unread bytes left");
        self.reader.into_inner()
    }
}

/// `GET path` on a fresh connection with `Connection: close`, every operation bounded by
/// `timeout`: the response (any status), or what went wrong.
pub fn try_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Fail> {
    let mut s = BufReader::new(connect(addr, timeout)?);
    s.get_mut()
        .write_all(&get_request(path, "test", true))
        .map_err(|e| Fail::io("send the request", e))?;
    read_response(&mut s)
}

/// `GET path` on a fresh connection with `Connection: close`; panics if there is no answer.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    try_get(addr, path, TIMEOUT).unwrap_or_else(|f| panic!("GET {path} from {addr}: {f}"))
}

/// `GET /` on a fresh connection: the body of a 200 answer without its final newline (what the
/// example servers greet with); panics on anything else.
pub fn greeting(addr: SocketAddr) -> String {
    let r = get(addr, "/");
    assert_eq!(r.status, 200, "GET / from {addr}: {r:?}");
    r.text().trim_end().to_owned()
}

/// `n` connections one after another, each `GET /` with `Connection: close`: how many were
/// refused, and how many answered 200.
pub fn burst(addr: SocketAddr, n: usize) -> (usize, usize) {
    let (mut refused, mut ok) = (0, 0);
    for _ in 0..n {
        match try_get(addr, "/", TIMEOUT) {
            Err(f) if f.kind == ErrorKind::Refused => refused += 1,
            Ok(r) if r.status == 200 => ok += 1,
            _ => {}
        }
    }
    (refused, ok)
}

/// A free TCP port on 127.0.0.1 in 20000..32000, below the ephemeral range (32768-60999
/// here), so that no client's own outgoing port takes it while a server has it unbound. Never
/// hands out the same port twice in one process.
pub fn free_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = (nanos ^ (u64::from(std::process::id()) << 32)) | 1;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        let mut taken = TAKEN.lock().unwrap();
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// Reads one line (up to and including `\n`), bounded.
fn read_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    line.clear();
    let n = Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', line)?;
    if n > 0 && !line.ends_with(b"\n") {
        if n == MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(n)
}

/// Reads one response from `r` (interim 1xx answers other than 101 skipped).
pub fn read_response(r: &mut impl BufRead) -> Result<Response, Fail> {
    loop {
        let (status, http10) = read_status_line(r)?;
        let headers = read_headers(r)?;
        if (100..200).contains(&status) && status != 101 {
            continue; // an interim response; the real one follows
        }
        let mut close = http10;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        for (name, value) in &headers {
            match name.as_str() {
                "content-length" => {
                    length = Some(value.parse().map_err(|_| {
                        Fail::new(
                            ErrorKind::Malformed,
                            format!("bad content-length {value:?}"),
                        )
                    })?)
                }
                "transfer-encoding" => {
                    chunked = value
                        .split(',')
                        .any(|v| v.trim().eq_ignore_ascii_case("chunked"))
                }
                "connection" => {
                    for token in value.split(',').map(str::trim) {
                        if token.eq_ignore_ascii_case("close") {
                            close = true;
                        } else if http10 && token.eq_ignore_ascii_case("keep-alive") {
                            close = false;
                        }
                    }
                }
                _ => {}
            }
        }
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            read_chunked(r)?
        } else if let Some(len) = length {
            read_exactly(r, len)?
        } else {
            // Delimited by the end of the connection.
            close = true;
            let mut body = Vec::new();
            r.read_to_end(&mut body)
                .map_err(|e| Fail::io("read body to EOF", e))?;
            body
        };
        return Ok(Response {
            status,
            headers,
            body,
            close,
        });
    }
}

/// The next line, a `what`: `closed` when the connection ended before it; a line too long, or
/// the IO error (a connection closed in the middle of the line is
/// [`ErrorKind::EofMidResponse`]).
fn next_line(r: &mut impl BufRead, what: &str, closed: Fail) -> Result<String, Fail> {
    let mut line = Vec::new();
    match read_line(r, &mut line) {
        Ok(0) => Err(closed),
        Ok(_) => Ok(String::from_utf8_lossy(&line).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(Fail::new(ErrorKind::Malformed, format!("{what} too long")))
        }
        Err(e) => Err(Fail::io(&format!("read the {what}"), e)),
    }
}

/// The status code, and whether the version is HTTP/1.0.
fn read_status_line(r: &mut impl BufRead) -> Result<(u16, bool), Fail> {
    let closed = Fail::new(
        ErrorKind::EofBeforeResponse,
        "connection closed before any byte of the response",
    );
    let text = next_line(r, "status line", closed)?;
    let mut parts = text.trim_end().splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (version.starts_with("HTTP/1."), code.parse()) {
        (true, Ok(s)) if (100..600).contains(&s) => Ok((s, version == "HTTP/1.0")),
        _ => Err(Fail::new(
            ErrorKind::Malformed,
            format!("bad status line {text:?}"),
        )),
    }
}

/// Header lines up to the empty one: names lowercased, values trimmed.
fn read_headers(r: &mut impl BufRead) -> Result<Vec<(String, String)>, Fail> {
    let mut headers = Vec::new();
    loop {
        let closed = Fail::new(
            ErrorKind::EofMidResponse,
            "connection closed in the headers",
        );
        let h = next_line(r, "header", closed)?;
        let h = h.trim_end();
        if h.is_empty() {
            return Ok(headers);
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(Fail::new(ErrorKind::Malformed, format!("bad header {h:?}")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// Exactly `len` bytes of body.
fn read_exactly(r: &mut impl BufRead, len: u64) -> Result<Vec<u8>, Fail> {
    let mut body = Vec::new();
    let got = Read::take(&mut *r, len)
        .read_to_end(&mut body)
        .map_err(|e| Fail::io("read body", e))?;
    if (got as u64) < len {
        return Err(Fail::new(
            ErrorKind::EofMidResponse,
            format!("connection closed after {got} of {len} body bytes"),
        ));
    }
    Ok(body)
}

fn read_chunked(r: &mut impl BufRead) -> Result<Vec<u8>, Fail> {
    let eof = |what: &str| {
        Fail::new(
            ErrorKind::EofMidResponse,
            format!("connection closed in {what}"),
        )
    };
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        if read_line(r, &mut line).map_err(|e| Fail::io("read chunk size", e))? == 0 {
            return Err(eof("a chunk size"));
        }
        let text = String::from_utf8_lossy(&line);
        let size = text.trim_end().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| Fail::new(ErrorKind::Malformed, format!("bad chunk size {text:?}")))?;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                if read_line(r, &mut line).map_err(|e| Fail::io("read trailers", e))? == 0 {
                    return Err(eof("the trailers"));
                }
                if line == b"\r\n" || line == b"\n" {
                    return Ok(body);
                }
            }
        }
        body.extend(read_exactly(r, size).map_err(|_| eof("a chunk"))?);
        if read_line(r, &mut line).map_err(|e| Fail::io("read chunk end", e))? == 0 {
            return Err(eof("a chunk end"));
        }
        if line != b"\r\n" && line != b"\n" {
            return Err(Fail::new(
                ErrorKind::Malformed,
                "chunk not followed by CRLF",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Response, Fail> {
        read_response(&mut BufReader::new(raw))
    }

    #[test]
    fn responses_parse() {
        let r = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b \r\n\r\nok").unwrap();
        assert_eq!((r.status, r.text().as_str(), r.close), (200, "ok", false));
        assert_eq!(r.header("x-a"), Some("b"));
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n").unwrap();
        assert_eq!(r.text(), "abcde");
        let r = parse(b"HTTP/1.0 503 Busy\r\n\r\nbusy").unwrap();
        assert_eq!((r.status, r.text().as_str(), r.close), (503, "busy", true));
        let r =
            parse(b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(r.close);
    }

    #[test]
    fn broken_responses_say_how() {
        let kind = |raw: &[u8]| parse(raw).unwrap_err().kind;
        assert_eq!(kind(b""), ErrorKind::EofBeforeResponse);
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nContent-"),
            ErrorKind::EofMidResponse
        );
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok"),
            ErrorKind::EofMidResponse
        );
        assert_eq!(kind(b"SSH-2.0\r\n"), ErrorKind::Malformed);
        assert_eq!(
            kind(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            ErrorKind::Malformed
        );
    }
}
