//! The connection's IO as hyper sees it: first the bytes protocol detection
//! read, then the socket. On HTTP/1 every read is also noted in the
//! connection's state, so a request whose first bytes arrived is never
//! taken for an idle connection. It also holds the connection's place in the
//! drain: hyper moves this IO into `Upgraded` on an upgrade, so the
//! connection counts until the application drops it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conn::ConnGuard;
use super::h1::ConnState;

/// The bytes read for protocol detection (at most the 24 of HTTP/2's
/// preface), and how many of them hyper has read back.
#[derive(Debug, Default)]
pub(super) struct Prefix {
    pub(super) buf: [u8; 24],
    pub(super) len: usize,
    pub(super) pos: usize,
}

/// The connection's IO: first replays the bytes read for protocol
/// detection, and on HTTP/1 notes every read in the connection's state.
/// Holds the connection's drain guard until dropped.
pub(super) struct ConnIo<I> {
    prefix: Prefix,
    inner: I,
    state: Option<Arc<ConnState>>,
    _guard: ConnGuard,
}

impl<I> ConnIo<I> {
    /// Replays `prefix`, then reads `inner`; notes reads in `state` if given.
    pub(super) fn new(
        prefix: Prefix,
        inner: I,
        state: Option<Arc<ConnState>>,
        guard: ConnGuard,
    ) -> Self {
        ConnIo {
            prefix,
            inner,
            state,
            _guard: guard,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ConnIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if this.prefix.pos < this.prefix.len {
            let rest = &this.prefix.buf[this.prefix.pos..this.prefix.len];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.prefix.pos += n;
        } else {
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        }
        if buf.filled().len() > before {
            if let Some(state) = &this.state {
                state.note_read();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ConnIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
