//! The child's side of a handoff: the channel to the parent, from the
//! state it reads in `build()` to `ready` and `main`, and the line it
//! writes when it fails.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::write_blocking;
use crate::protocol::channel::{self, FromNew};

/// How long the parent may take to send the state.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The handoff channel, from the child's side.
#[derive(Debug)]
pub(crate) struct ParentLink {
    stream: BufReader<UnixStream>,
}

impl ParentLink {
    /// Takes the channel; first reads `state_len` bytes of state the parent
    /// sends right after the start (blocking, bounded by `STATE_TIMEOUT`).
    /// On failure the fd comes back (when it can), to report the error on.
    pub(crate) fn new(
        fd: OwnedFd,
        state_len: usize,
    ) -> Result<(ParentLink, Vec<u8>), (io::Error, Option<OwnedFd>)> {
        let std = std::os::unix::net::UnixStream::from(fd);
        let setup = (|| {
            let mut state = vec![0; state_len];
            if state_len > 0 {
                // Tens of MiB would otherwise take a page fault per 4 KiB.
                crate::sys::prefer_huge_pages(&mut state);
                use std::io::Read;
                std.set_read_timeout(Some(STATE_TIMEOUT))?;
                (&std).read_exact(&mut state)?;
            }
            std.set_nonblocking(true)?;
            Ok(state)
        })();
        let state = match setup {
            Ok(state) => state,
            Err(e) => return Err((e, Some(std.into()))),
        };
        // from_std gives nothing back on failure: keep a copy to report on.
        let copy = std.try_clone().ok();
        let stream = match UnixStream::from_std(std) {
            Ok(stream) => stream,
            Err(e) => return Err((e, copy.map(OwnedFd::from))),
        };
        Ok((
            ParentLink {
                stream: BufReader::new(stream),
            },
            state,
        ))
    }

    /// Says `ready` and waits for `main`. Returns `false` when the parent
    /// went away without saying it (it died, or gave up on us).
    pub(crate) async fn ready(&mut self) -> io::Result<bool> {
        let ready = FromNew::Ready.line();
        self.stream.get_mut().write_all(ready.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        Ok(channel::is_main(line.trim_end()))
    }

    /// The channel, once this process is main: it tells the parent that it
    /// let go of the service (`upgraded`, `stopping`).
    pub(crate) fn into_stream(self) -> UnixStream {
        self.stream.into_inner()
    }

    /// Reports a failure (from `Drop` or an error path): one line, written
    /// on the raw fd, waiting (bounded) until it is in the socket. tokio's
    /// `try_write` on a stream that the reactor has not seen writable yet
    /// writes nothing, and the parent would then only see the exit.
    pub(crate) fn fail(&self, reason: &str) {
        fail_raw(self.stream.get_ref().as_fd(), reason);
    }
}

/// How long a failing child waits for room in the channel for its reason.
const FAIL_WRITE: Duration = Duration::from_secs(1);

/// Reports `reason` on the channel `fd`: `fail <reason>`, one line.
pub(crate) fn fail_raw(fd: BorrowedFd<'_>, reason: &str) {
    let line = FromNew::Fail(reason.to_owned()).line();
    if let Err(e) = write_blocking(fd, line.as_bytes(), FAIL_WRITE) {
        tracing::debug!(error = %e, "cannot tell the parent why");
    }
}
