//! Protocol detection: HTTP/2 with prior knowledge starts with a fixed
//! 24-byte preface, anything else is HTTP/1. Detection reads no further than
//! the first byte that tells them apart, and gives up on a connection that
//! sends nothing for the idle grace once draining, or nothing decisive
//! within the header read timeout.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::conn::poll_timer;
use super::replay::Prefix;
use super::Server;
use crate::drain::Drain;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug)]
pub(super) enum Detected {
    /// The first bytes, to be replayed to hyper.
    Protocol(Protocol, Prefix),
    /// The client closed before sending anything.
    Closed,
    /// Nothing was sent during the idle grace after the drain started.
    IdleDrained,
    /// Nothing decisive was sent within the header read timeout.
    TimedOut,
}

/// Reads just enough of the connection to tell HTTP/2's preface from an
/// HTTP/1 request: up to the first byte that differs, or all 24 bytes.
pub(super) async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    drain: &Drain,
    cfg: &Server,
    accepted: Instant,
    drain_at: &mut Option<Instant>,
) -> io::Result<Detected> {
    let mut prefix = Prefix::default();
    let mut draining = pin!(drain.draining());
    let header_deadline = cfg.header_read_timeout.map(|t| accepted + t);
    let mut timer: Option<(Instant, Pin<Box<Sleep>>)> = None;
    if drain.is_draining() {
        *drain_at = Some(Instant::now());
    }
    poll_fn(|cx| loop {
        let mut rb = ReadBuf::new(&mut prefix.buf[prefix.len..]);
        match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    // EOF. Partial bytes go to hyper, which reports them.
                    return Poll::Ready(Ok(if prefix.len == 0 {
                        Detected::Closed
                    } else {
                        Detected::Protocol(Protocol::Http1, std::mem::take(&mut prefix))
                    }));
                }
                let start = prefix.len;
                prefix.len += n;
                let got = &prefix.buf[..prefix.len];
                if got[start..] != H2_PREFACE[start..prefix.len] {
                    return Poll::Ready(Ok(Detected::Protocol(
                        Protocol::Http1,
                        std::mem::take(&mut prefix),
                    )));
                }
                if prefix.len == H2_PREFACE.len() {
                    return Poll::Ready(Ok(Detected::Protocol(
                        Protocol::Http2,
                        std::mem::take(&mut prefix),
                    )));
                }
                continue;
            }
            Poll::Pending => {}
        }
        if drain_at.is_none() && draining.as_mut().poll(cx).is_ready() {
            *drain_at = Some(Instant::now());
        }
        // Idle close applies only while nothing at all was received.
        let idle_deadline = match *drain_at {
            Some(at) if prefix.len == 0 => Some(at.max(accepted) + cfg.idle_grace),
            _ => None,
        };
        let deadline = match (idle_deadline, header_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(deadline) = deadline else {
            return Poll::Pending;
        };
        if poll_timer(&mut timer, deadline, cx).is_ready() {
            return Poll::Ready(Ok(if Some(deadline) == idle_deadline {
                Detected::IdleDrained
            } else {
                Detected::TimedOut
            }));
        }
        return Poll::Pending;
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::testing::{app, gate, start, Raw};

    /// Without a drain, a connection that sends nothing is closed after the
    /// header read timeout, and one that sends requests is not.
    #[tokio::test]
    async fn silent_connection_hits_the_header_read_timeout() {
        let (g, _) = gate();
        let s = start(
            Server::new().header_read_timeout(Some(Duration::from_millis(200))),
            app("hello", g),
        )
        .await;
        let mut silent = Raw::connect(s.addr).await;
        let t0 = Instant::now();
        silent.expect_eof().await;
        assert!(t0.elapsed() >= Duration::from_millis(200));
        let mut c = Raw::connect(s.addr).await;
        assert_eq!(c.get("/").await.status, 200);
        s.idle().await;
    }

    /// Detection reads no further than the first byte that differs from the
    /// HTTP/2 preface (or the whole preface), in as many reads as it takes.
    #[tokio::test]
    async fn detection_stops_where_it_can_decide() {
        let trigger = crate::drain::DrainTrigger::new();
        let drain = trigger.watcher();
        let cfg = Server::new();
        for (chunks, want, prefix_len) in [
            (
                &[&b"PRI * HTTP/2.0\r\n"[..], b"\r\nSM\r\n\r\nREST"][..],
                Protocol::Http2,
                24,
            ),
            (
                &[&b"P"[..], b"R", b"I * HTTP/2.0\r\n\r\nSM\r\n\r\nREST"],
                Protocol::Http2,
                24,
            ),
            (&[&b"PRI * HTTP/1.1\r\nREST"[..]], Protocol::Http1, 19),
            (&[&b"P"[..], b"OST"], Protocol::Http1, 4),
            (
                &[&b"GET / HTTP/1.1\r\nHost: a\r\n\r\nREST"[..]],
                Protocol::Http1,
                24,
            ),
        ] {
            let (mut client, mut server) = tokio::io::duplex(64);
            let mut drain_at = None;
            let detect = detect(&mut server, &drain, &cfg, Instant::now(), &mut drain_at);
            let write = async {
                for c in chunks {
                    client.write_all(c).await.unwrap();
                    tokio::task::yield_now().await;
                }
            };
            let (d, ()) = tokio::join!(detect, write);
            match d.unwrap() {
                Detected::Protocol(p, prefix) => {
                    assert_eq!(p, want, "{chunks:?}");
                    // A single read may bring more than needed, never past 24.
                    assert!(
                        prefix.len <= 24 && prefix.len >= prefix_len.min(4),
                        "{chunks:?}"
                    );
                    if want == Protocol::Http2 {
                        assert_eq!(&prefix.buf, H2_PREFACE);
                        drop(client);
                        let mut rest = Vec::new();
                        server.read_to_end(&mut rest).await.unwrap();
                        assert_eq!(rest, b"REST");
                    }
                }
                other => panic!("{chunks:?}: {other:?}"),
            }
        }
    }
}
