//! HTTP/1.1 as the load generator speaks it: the request, and a pure parser of the bytes
//! received so far that says whether a whole response is there.
//!
//! | response | complete when |
//! |---|---|
//! | 1xx (not 101) | skipped: the real response follows |
//! | 204, 304 | after the head |
//! | `Transfer-Encoding: chunked` | after the last chunk and the trailers |
//! | `Content-Length: N` | N bytes after the head |
//! | neither | at the end of the connection (and the connection closes) |
//!
//! `close`: the server closes the connection after it (`Connection: close`, HTTP/1.0 without
//! `keep-alive`, or a body delimited by the end of the connection).

/// Longest head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// `GET path`, asking the server to close after the answer or not.
pub fn request(path: &str, host: &str, close: bool) -> Vec<u8> {
    let close = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: handover-bench\r\n{close}\r\n")
        .into_bytes()
}

/// What the bytes so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole response yet.
    Partial,
    /// A whole response, `len` bytes long.
    Done {
        status: u16,
        close: bool,
        len: usize,
    },
}

/// Parses the response at the start of `buf`; `eof`: the connection has ended after `buf`.
pub fn parse(buf: &[u8], eof: bool) -> Result<Parsed, String> {
    let Some(head_len) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return if buf.len() > MAX_HEAD {
            Err(format!("no end of the head in {} bytes", buf.len()))
        } else {
            Ok(Parsed::Partial)
        };
    };
    let head = std::str::from_utf8(&buf[..head_len])
        .map_err(|_| "a head that is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    let (mut length, mut chunked, mut close, mut keep_alive) = (None, false, false, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("two different Content-Length headers".into());
                }
                length = Some(n);
            }
            "transfer-encoding" => chunked |= has_token(value, "chunked"),
            "connection" => {
                close |= has_token(value, "close");
                keep_alive |= has_token(value, "keep-alive");
            }
            _ => {}
        }
    }
    close |= http10 && !keep_alive;
    if (100..200).contains(&status) && status != 101 {
        return Ok(match parse(&buf[head_len..], eof)? {
            Parsed::Done { status, close, len } => Parsed::Done {
                status,
                close,
                len: head_len + len,
            },
            Parsed::Partial => Parsed::Partial,
        });
    }
    let done = |len| Ok(Parsed::Done { status, close, len });
    if status == 204 || status == 304 {
        return done(head_len);
    }
    if chunked {
        return match chunks_end(&buf[head_len..])? {
            Some(n) => done(head_len + n),
            None => Ok(Parsed::Partial),
        };
    }
    match length {
        Some(n) if buf.len() >= head_len + n => done(head_len + n),
        Some(_) => Ok(Parsed::Partial),
        None if eof => Ok(Parsed::Done {
            status,
            close: true,
            len: buf.len(),
        }),
        None => Ok(Parsed::Partial),
    }
}

/// The length of a chunked body (chunks, last chunk, trailers), once it is all in `b`.
fn chunks_end(b: &[u8]) -> Result<Option<usize>, String> {
    let mut at = 0;
    loop {
        let Some(eol) = find(&b[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&b[at..at + eol]).unwrap_or("?");
        let hex = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            if b[at..].starts_with(b"\r\n") {
                return Ok(Some(at + 2));
            }
            return Ok(find(&b[at..], b"\r\n\r\n").map(|i| at + i + 4));
        }
        if b.len() < at + size + 2 {
            return Ok(None);
        }
        if &b[at + size..at + size + 2] != b"\r\n" {
            return Err("no CRLF after a chunk".into());
        }
        at += size + 2;
    }
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(status: u16, close: bool, len: usize) -> Result<Parsed, String> {
        Ok(Parsed::Done { status, close, len })
    }

    #[test]
    fn responses() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n";
        let cases: &[(&str, bool, Result<Parsed, String>)] = &[
            (ok, false, done(200, false, ok.len())),
            (&ok[..ok.len() - 1], false, Ok(Parsed::Partial)),
            ("HTTP/1.1 200 OK\r\nContent-Le", false, Ok(Parsed::Partial)),
            (
                "HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n",
                false,
                done(200, true, 57),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                false,
                done(200, true, 38),
            ),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                false,
                done(200, false, 62),
            ),
            (chunked, false, done(200, false, chunked.len())),
            (&chunked[..chunked.len() - 2], false, Ok(Parsed::Partial)),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 1\r\n\r\nx",
                false,
                done(503, false, 66),
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                done(204, false, 27),
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\nuntil the end",
                false,
                Ok(Parsed::Partial),
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\nuntil the end",
                true,
                done(200, true, 32),
            ),
            (
                "SSH-2.0-x\r\n\r\n",
                false,
                Err("bad status line \"SSH-2.0-x\"".into()),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                Err("two different Content-Length headers".into()),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false,
                Err("bad chunk size \"zz\"".into()),
            ),
        ];
        for (input, eof, want) in cases {
            assert_eq!(&parse(input.as_bytes(), *eof), want, "{input:?}");
        }
        assert!(parse(&[b'x'; MAX_HEAD + 1], false).is_err());
    }

    #[test]
    fn requests() {
        assert_eq!(
            request("/", "bench", true),
            b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: handover-bench\r\nConnection: close\r\n\r\n"
        );
        assert!(!String::from_utf8(request("/", "bench", false))
            .unwrap()
            .contains("Connection"));
    }
}
