//! The accept loop: takes connections from a [`Listener`] until the drain
//! starts, hands each to its own task, and decides what an accept error
//! means (retry at once, pause, or stop). It keeps the listener until the
//! drain is final, and accepts again if the drain is taken back.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::app::App;
use super::conn::serve_connection;
use super::handshake::Acceptor;
use super::Server;
use crate::drain::Drain;
use crate::task;

/// A listening socket the accept loop can take connections from.
///
/// Implemented for [`tokio::net::TcpListener`] (which also turns on
/// `TCP_NODELAY` for each connection) and [`tokio::net::UnixListener`].
pub trait Listener: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer's address: for logs, and what a make-service is called
    /// with (see [`App`]).
    type Addr: std::fmt::Debug + Send + 'static;

    /// Accepts the next connection. Must be cancel-safe: the accept loop
    /// drops this future when the drain starts.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Addr)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(peer = %addr, error = %e, "cannot set TCP_NODELAY");
        }
        Ok((stream, addr))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Addr)> {
        tokio::net::UnixListener::accept(self).await
    }
}
impl Server {
    /// The accept loop of [`Server::serve`] and [`Server::serve_with`].
    pub(super) fn accept_loop<L, H, A, K>(
        &self,
        mut listener: L,
        acceptor: H,
        mut app: A,
        drain: Drain,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static
    where
        L: Listener,
        H: Acceptor<L::Io>,
        A: App<L::Addr, K>,
    {
        let cfg = Arc::new(self.clone());
        let acceptor = Arc::new(acceptor);
        async move {
            let mut backoff = Backoff::default();
            // Serves until the drain starts; keeps the listener (not
            // accepting) until the drain is final, and serves again if it is
            // taken back (the process that took over died).
            loop {
                let mut draining = pin!(drain.draining());
                loop {
                    // A make-service that is not ready holds the next
                    // accept back (tower's back-pressure); the others
                    // always are.
                    let ready = tokio::select! {
                        biased;
                        _ = draining.as_mut() => break,
                        r = poll_fn(|cx| app.poll_ready(cx)) => r,
                    };
                    if let Err(e) = ready {
                        tracing::error!(error = %e, "the make-service failed, stopping the accept loop");
                        return Err(io::Error::other(e));
                    }
                    // The drain first: `draining()` reads the state at
                    // every poll, so nothing is accepted once it started;
                    // and an accept in progress is counted in the drain
                    // (see `Drain::accept`).
                    let accepted = tokio::select! {
                        biased;
                        _ = draining.as_mut() => break,
                        r = drain.accept(listener.accept()) => r,
                    };
                    let Some((accepted, guard)) = accepted else {
                        break;
                    };
                    match accepted {
                        Ok((io, peer)) => {
                            backoff.reset();
                            // The guard goes with the connection's IO: an
                            // upgraded connection keeps it until the
                            // application drops the upgraded IO.
                            let conn = serve_connection(
                                io,
                                acceptor.clone(),
                                app.make(&peer),
                                drain.clone(),
                                cfg.clone(),
                                guard,
                            );
                            task::spawn(async move {
                                if let Err(e) = conn.await {
                                    tracing::debug!(?peer, error = %e, "connection ended with an error");
                                }
                            });
                        }
                        Err(e) => match classify_accept_error(&e) {
                            AcceptError::Transient => {
                                tracing::debug!(error = %e, "accept failed, continuing");
                            }
                            AcceptError::Resources => {
                                let pause = backoff.next();
                                tracing::error!(error = %e, ?pause, "accept failed, out of resources; pausing");
                                tokio::select! {
                                    biased;
                                    _ = draining.as_mut() => break,
                                    _ = tokio::time::sleep(pause) => {}
                                }
                            }
                            AcceptError::Fatal => {
                                tracing::error!(error = %e, "accept failed for good, stopping the accept loop");
                                return Err(e);
                            }
                        },
                    }
                }
                tracing::debug!("drain started: stopped accepting");
                if !drain.resumed().await {
                    break;
                }
                tracing::info!("drain taken back: accepting again");
            }
            drop(listener);
            tracing::debug!("drain final: listener dropped");
            Ok(())
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum AcceptError {
    /// Something about one connection: try the next one at once.
    Transient,
    /// Out of file descriptors or memory: pause, then try again.
    Resources,
    /// The listener itself is broken.
    Fatal,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Resources,
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT) => {
            AcceptError::Fatal
        }
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EINTR
            | libc::EAGAIN
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ETIMEDOUT,
        ) => AcceptError::Transient,
        // Unknown: keep serving, but do not spin on it.
        _ => AcceptError::Resources,
    }
}

/// Exponential pause after accept errors for lack of resources: 5 ms to 1 s.
#[derive(Debug, Default)]
struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = match self.last {
            None => Duration::from_millis(5),
            Some(d) => (d * 2).min(Duration::from_secs(1)),
        };
        self.last = Some(d);
        d
    }

    fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;
    use crate::http::testing::{app, gate, start, Raw};

    /// Once draining, the accept loop returns and the listener is gone:
    /// a new connection is refused.
    #[tokio::test]
    async fn accept_loop_returns_and_drops_the_listener() {
        let (g, _) = gate();
        let mut s = start(Server::new(), app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        assert_eq!(c.get("/").await.status, 200);
        s.drain().await;
        let e = TcpStream::connect(s.addr).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// A listener whose accept starts the drain right as it returns a
    /// connection (as a drain started on another thread during the
    /// `accept` system call), and notes what the drain counted then.
    struct DrainsAsItAccepts {
        inner: tokio::net::TcpListener,
        trigger: crate::drain::DrainTrigger,
        counted_then: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl Listener for DrainsAsItAccepts {
        type Io = TcpStream;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> io::Result<(TcpStream, std::net::SocketAddr)> {
            let accepted = self.inner.accept().await?;
            self.trigger.start(crate::drain::DrainReason::Upgraded);
            let drain = self.trigger.watcher();
            self.counted_then.lock().unwrap().push(drain.in_flight());
            Ok(accepted)
        }
    }

    /// A drain that starts while a connection is being accepted cannot end
    /// before that connection is served: the accept was counted all along
    /// (else its process could exit in between, closing the connection
    /// with its request unread: a reset).
    #[tokio::test]
    async fn a_drain_starting_during_an_accept_waits_for_that_connection() {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let trigger = crate::drain::DrainTrigger::new();
        let drain = trigger.watcher();
        let counted_then = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = DrainsAsItAccepts {
            inner,
            trigger,
            counted_then: counted_then.clone(),
        };
        let (g, _) = gate();
        let accept_loop =
            tokio::spawn(Server::new().serve(listener, app("hello", g), drain.clone()));
        let mut c = Raw::connect(addr).await;
        assert_eq!(
            c.get("/").await.status,
            200,
            "the connection accepted is served"
        );
        assert_eq!(
            *counted_then.lock().unwrap(),
            [1],
            "the accept was counted in the drain"
        );
        drop(c);
        tokio::time::timeout(crate::http::testing::T, drain.idle())
            .await
            .expect("the drain ends once the connection is closed");
        drop(accept_loop);
    }

    #[test]
    fn accept_errors_are_classified() {
        let c = |n| classify_accept_error(&io::Error::from_raw_os_error(n));
        assert_eq!(c(libc::EMFILE), AcceptError::Resources);
        assert_eq!(c(libc::ENFILE), AcceptError::Resources);
        assert_eq!(c(libc::ECONNABORTED), AcceptError::Transient);
        assert_eq!(c(libc::EPERM), AcceptError::Transient);
        assert_eq!(c(libc::EINVAL), AcceptError::Fatal);
        assert_eq!(c(libc::EBADF), AcceptError::Fatal);
        let mut b = Backoff::default();
        let seq: Vec<_> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(seq, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(5));
    }
}
