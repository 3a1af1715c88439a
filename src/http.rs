//! An HTTP/1.1 and HTTP/2 accept loop that drains without losing a request.
//!
//! [`serve`] (or [`Server::serve`] with options) runs a hyper service on a
//! [`Listener`] until the [`Drain`] starts, then stops accepting, drops the
//! listener (the socket itself lives on in the new process) and lets every
//! connection finish by these rules:
//!
//! - **HTTP/1**: while draining, every response carries `Connection: close`,
//!   and the connection closes after writing it. This holds for a connection
//!   that is serving a request when the drain starts and for one whose next
//!   request is still in the socket: that request is answered normally. Only
//!   a connection that stays idle (no request in progress, no request bytes
//!   read) for the *idle grace* after the drain started, or after its last
//!   response, whichever is later, is closed.
//! - **HTTP/2**: the connection gets `GOAWAY`; open streams complete. A
//!   connection that has not opened a stream yet gets it only once its first
//!   stream arrives or after the idle grace, so that first request is
//!   served (a client does not retry a request refused on a new connection).
//! - A connection still sending its first bytes (protocol detection) is not
//!   cancelled: it finishes detection and follows the rules above; one that
//!   sends nothing for the idle grace is closed.
//!
//! This is HAProxy's `option idle-close-on-response`. Calling hyper's
//! `graceful_shutdown()` on every connection when the drain starts, as
//! `axum::serve` and hyper-util's auto builder do, closes a keep-alive
//! connection whose next request is already on its way (hyperium/hyper#3792):
//! the client sees the connection close before its response. Here
//! `graceful_shutdown()` is only called on an HTTP/1 connection that has been
//! idle for the whole grace, so a client that sends its next request within
//! the grace is always answered.
//!
//! The cost, as with HAProxy: a client that waits longer than the grace
//! before reusing an idle keep-alive connection may still find it closed (as
//! it would after any server's keep-alive timeout), and an old process with
//! busy keep-alive clients lives until each has sent one more request.
//!
//! Each connection holds a [`DrainGuard`](crate::drain::DrainGuard) until it
//! closes, so [`Drain::idle`] and [`Drain::finished`] tell when the last one is
//! gone. HTTP upgrades (WebSocket) are supported; an upgraded connection
//! leaves the count when it is handed to the application, which drains it
//! itself (for example by holding a guard of its own).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::drain::Drain;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A listening socket the accept loop can take connections from.
///
/// Implemented for [`tokio::net::TcpListener`] (which also turns on
/// `TCP_NODELAY` for each connection) and [`tokio::net::UnixListener`].
pub trait Listener: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer's address, for logs.
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

/// Serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on `listener`
/// with the default [`Server`] options until `drain` starts.
///
/// When the drain starts the accept loop stops, drops the listener and
/// returns `Ok(())`; the connections go on in their own tasks, each holding a
/// [`DrainGuard`](crate::drain::DrainGuard), and close by the rules in the
/// [module docs](self). Wait for them with [`Drain::idle`] or
/// [`Drain::finished`]. An error is returned only when accepting fails for
/// good (the listener is not a listening socket any more); transient errors,
/// including running out of file descriptors, are logged and retried.
///
/// # Example
///
/// A hello server with [`hyper::service::service_fn`]:
///
/// ```no_run
/// use std::convert::Infallible;
///
/// use bytes::Bytes;
/// use handover::drain::{Drain, DrainReason};
/// use http_body_util::Full;
/// use hyper::{Request, Response};
///
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
/// let hello = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("Welcome to the Home Page!\n"))))
/// });
/// let drain = Drain::new();
/// let server = tokio::spawn(handover::http::serve(listener, hello, drain.clone()));
///
/// tokio::signal::ctrl_c().await?;
/// drain.start(DrainReason::Stopped);
/// server.await.expect("accept loop panicked")?; // no longer accepting
/// drain.finished(std::time::Duration::from_secs(30)).await; // connections closed
/// # Ok(()) }
/// ```
///
/// An [axum](https://docs.rs/axum) `Router` (or any tower service) plugs in
/// through [`hyper_util::service::TowerToHyperService`]:
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use hyper_util::service::TowerToHyperService;
///
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let app = Router::new().route("/", get(|| async { "Welcome to the Home Page!\n" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
/// let drain = handover::drain::Drain::new();
/// handover::http::serve(listener, TowerToHyperService::new(app), drain).await
/// # }
/// ```
pub async fn serve<L, S, B>(listener: L, service: S, drain: Drain) -> io::Result<()>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Server::new().serve(listener, service, drain).await
}

/// Options for the accept loop; [`serve`] uses the defaults.
///
/// # Example
///
/// ```no_run
/// # use std::{convert::Infallible, time::Duration};
/// # use bytes::Bytes;
/// # use http_body_util::Full;
/// # use hyper::{body::Incoming, Request, Response};
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// # let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
/// #     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hi"))))
/// # });
/// let drain = handover::drain::Drain::new();
/// let listener = tokio::net::UnixListener::bind("/run/hello/http.sock")?;
/// handover::http::Server::new()
///     .idle_grace(Duration::from_millis(500))
///     .header_read_timeout(Some(Duration::from_secs(10)))
///     .serve(listener, service, drain)
///     .await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Server {
    idle_grace: Duration,
    header_read_timeout: Option<Duration>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// The defaults: an idle grace of 1 s, a header read timeout of 30 s.
    pub fn new() -> Self {
        Server {
            idle_grace: Duration::from_secs(1),
            header_read_timeout: Some(Duration::from_secs(30)),
        }
    }

    /// How long an idle HTTP/1 keep-alive connection is kept open once the
    /// drain started (or after its last response, if that came later) before
    /// it is closed. A request arriving within the grace is answered, with
    /// `Connection: close`. Longer is safer for clients that pause between
    /// requests, shorter lets an old process exit sooner. Default: 1 s.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = grace;
        self
    }

    /// How long a client may take to send a complete HTTP/1 request head
    /// (counted from the first read for it, so it also bounds how long a
    /// keep-alive connection may stay idle), and to send its first bytes on a
    /// new connection. `None` disables it. Default: 30 s, as in hyper.
    pub fn header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Runs the accept loop; see [`serve`]. The returned future is `'static`,
    /// so it can be spawned directly.
    pub fn serve<L, S, B>(
        &self,
        mut listener: L,
        service: S,
        drain: Drain,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static
    where
        L: Listener,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let cfg = Arc::new(self.clone());
        async move {
            let mut backoff = Backoff::default();
            {
                let mut draining = pin!(drain.draining());
                loop {
                    let accepted = tokio::select! {
                        biased;
                        _ = draining.as_mut() => break,
                        r = listener.accept() => r,
                    };
                    match accepted {
                        Ok((io, peer)) => {
                            backoff.reset();
                            let guard = drain.guard();
                            let conn =
                                serve_connection(io, service.clone(), drain.clone(), cfg.clone());
                            tokio::spawn(async move {
                                if let Err(e) = conn.await {
                                    tracing::debug!(?peer, error = %e, "connection ended with an error");
                                }
                                drop(guard);
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
            }
            drop(listener);
            tracing::debug!("drain started: stopped accepting, listener dropped");
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

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug)]
enum Detected {
    /// The first bytes, to be replayed to hyper.
    Protocol(Protocol, Prefix),
    /// The client closed before sending anything.
    Closed,
    /// Nothing was sent during the idle grace after the drain started.
    IdleDrained,
    /// Nothing decisive was sent within the header read timeout.
    TimedOut,
}

#[derive(Debug, Default)]
struct Prefix {
    buf: [u8; 24],
    len: usize,
    pos: usize,
}

/// Reads just enough of the connection to tell HTTP/2's preface from an
/// HTTP/1 request: up to the first byte that differs, or all 24 bytes.
async fn detect<I: AsyncRead + Unpin>(
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

/// Polls a lazily created timer set to `deadline`, resetting it when the
/// deadline moved.
fn poll_timer(
    timer: &mut Option<(Instant, Pin<Box<Sleep>>)>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    match timer {
        Some((at, sleep)) => {
            if *at != deadline {
                *at = deadline;
                sleep.as_mut().reset(deadline);
            }
            sleep.as_mut().poll(cx)
        }
        None => {
            let (_, sleep) = timer.insert((deadline, Box::pin(tokio::time::sleep_until(deadline))));
            sleep.as_mut().poll(cx)
        }
    }
}

async fn serve_connection<I, S, B>(
    mut io: I,
    service: S,
    drain: Drain,
    cfg: Arc<Server>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let accepted = Instant::now();
    let mut drain_at = None;
    let (protocol, prefix) = match detect(&mut io, &drain, &cfg, accepted, &mut drain_at).await? {
        Detected::Protocol(p, prefix) => (p, prefix),
        Detected::Closed => return Ok(()),
        Detected::IdleDrained => {
            tracing::debug!("closing a connection that sent nothing during the idle grace");
            return Ok(());
        }
        Detected::TimedOut => {
            tracing::debug!(
                "closing a connection that sent no request within the header read timeout"
            );
            return Ok(());
        }
    };
    match protocol {
        Protocol::Http1 => serve_h1(io, prefix, service, drain, &cfg, accepted, drain_at).await,
        Protocol::Http2 => serve_h2(io, prefix, service, drain, &cfg, accepted, drain_at).await,
    }
}

async fn serve_h1<I, S, B>(
    io: I,
    prefix: Prefix,
    service: S,
    drain: Drain,
    cfg: &Server,
    accepted: Instant,
    mut drain_at: Option<Instant>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let state = Arc::new(ConnState::new(accepted));
    let io = ConnIo {
        prefix,
        inner: io,
        state: Some(state.clone()),
    };
    let service = H1Service {
        inner: service,
        state: state.clone(),
        drain: drain.clone(),
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true);
    let mut conn = pin!(builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades());
    let mut draining = pin!(drain.draining());
    let mut timer = None;
    let mut closing = false;
    poll_fn(|cx| loop {
        // Poll the connection first: every change of `state` happens inside
        // this call (service, body and IO all run in it), and a request that
        // just arrived is read here before the idle check below can see it.
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(BoxError::from));
        }
        if closing {
            return Poll::Pending;
        }
        let at = match drain_at {
            Some(at) => at,
            None => match draining.as_mut().poll(cx) {
                Poll::Ready(_) => *drain_at.insert(Instant::now()),
                Poll::Pending => return Poll::Pending,
            },
        };
        // While a request is in progress (or its first bytes were read) the
        // response will carry `Connection: close`; nothing to do here.
        let Some(idle_since) = state.idle_since() else {
            return Poll::Pending;
        };
        let deadline = idle_since.max(at) + cfg.idle_grace;
        if Instant::now() >= deadline {
            tracing::debug!("closing a keep-alive connection idle for the whole grace");
            // Safe: hyper has no request of this connection, read or unread.
            conn.as_mut().graceful_shutdown();
            closing = true;
            continue;
        }
        if poll_timer(&mut timer, deadline, cx).is_ready() {
            continue;
        }
        return Poll::Pending;
    })
    .await
}

async fn serve_h2<I, S, B>(
    io: I,
    prefix: Prefix,
    service: S,
    drain: Drain,
    cfg: &Server,
    accepted: Instant,
    mut drain_at: Option<Instant>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = ConnIo {
        prefix,
        inner: io,
        state: None,
    };
    let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = H2Service {
        inner: service,
        opened: opened.clone(),
    };
    let builder = {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new());
        b
    };
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut draining = pin!(drain.draining());
    let mut timer = None;
    let mut closing = false;
    poll_fn(|cx| loop {
        // Streams are accepted (and `opened` set) inside this call.
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(BoxError::from));
        }
        if closing {
            return Poll::Pending;
        }
        if drain_at.is_none() {
            if draining.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            drain_at = Some(Instant::now());
        }
        // A connection that has not opened a stream yet was accepted just
        // before the drain: its first request is on its way. A GOAWAY now
        // would refuse it before it is sent, and clients retry such a
        // request only on a connection that served one before (hyper-util
        // never on a fresh one). As for HTTP/1, wait for it, up to the idle
        // grace.
        if !opened.load(std::sync::atomic::Ordering::Acquire) {
            let deadline = drain_at.expect("set above").max(accepted) + cfg.idle_grace;
            if poll_timer(&mut timer, deadline, cx).is_pending() {
                return Poll::Pending;
            }
        }
        // GOAWAY (hyper sends it in two steps, so streams the client opened
        // before seeing it are still served); open streams complete.
        conn.as_mut().graceful_shutdown();
        closing = true;
    })
    .await
}

/// Notes that the client opened a stream.
struct H2Service<S> {
    inner: S,
    opened: Arc<std::sync::atomic::AtomicBool>,
}

impl<S, R> Service<R> for H2Service<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.opened
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.call(req)
    }
}

/// What an HTTP/1 connection is doing, as seen by its service, response
/// bodies and IO.
#[derive(Debug)]
struct ConnState {
    inner: Mutex<Activity>,
}

#[derive(Debug)]
struct Activity {
    /// Requests whose response has not been fully handed to hyper.
    active: usize,
    /// Bytes were read since the last response ended (or since accept): a
    /// request may have started.
    read_since_idle: bool,
    /// When the last response ended (or the connection was accepted).
    idle_since: Instant,
}

impl ConnState {
    fn new(accepted: Instant) -> Self {
        ConnState {
            inner: Mutex::new(Activity {
                active: 0,
                read_since_idle: false,
                idle_since: accepted,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Activity) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Since when the connection is idle, or `None` if it is not.
    fn idle_since(&self) -> Option<Instant> {
        self.with(|a| (a.active == 0 && !a.read_since_idle).then_some(a.idle_since))
    }
}

/// A request in progress; dropped when its response body is done.
#[derive(Debug)]
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(state: Arc<ConnState>) -> Self {
        state.with(|a| a.active += 1);
        Busy(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.with(|a| {
            a.active -= 1;
            if a.active == 0 {
                a.read_since_idle = false;
                a.idle_since = Instant::now();
            }
        });
    }
}

/// Wraps the user's service on an HTTP/1 connection: counts requests in
/// progress and adds `Connection: close` to responses once draining.
struct H1Service<S> {
    inner: S,
    state: Arc<ConnState>,
    drain: Drain,
}

type ResponseFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody<B>>, E>> + Send + 'static>>;

impl<S, B> Service<Request<Incoming>> for H1Service<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<B, S::Error>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.state.clone());
        let fut = self.inner.call(req);
        let drain = self.drain.clone();
        Box::pin(async move {
            let mut res = fut.await?;
            if drain.is_draining() && res.status() != StatusCode::SWITCHING_PROTOCOLS {
                // hyper closes the connection after writing this response.
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(res.map(|body| TrackedBody {
                inner: Box::pin(body),
                _busy: busy,
            }))
        })
    }
}

/// A response body that ends its request's [`Busy`] when hyper drops it.
struct TrackedBody<B> {
    inner: Pin<Box<B>>,
    _busy: Busy,
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's IO: first replays the bytes read for protocol
/// detection, and on HTTP/1 notes every read in the connection's state.
struct ConnIo<I> {
    prefix: Prefix,
    inner: I,
    state: Option<Arc<ConnState>>,
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
                state.with(|a| a.read_since_idle = true);
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, Semaphore};
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;
    use crate::drain::DrainReason;

    const T: Duration = Duration::from_secs(10);

    /// Lets a test hold requests to `/gate` inside the handler.
    #[derive(Clone)]
    struct Gate {
        entered: mpsc::UnboundedSender<()>,
        open: Arc<Semaphore>,
    }

    fn gate() -> (Gate, mpsc::UnboundedReceiver<()>) {
        let (entered, rx) = mpsc::unbounded_channel();
        (
            Gate {
                entered,
                open: Arc::new(Semaphore::new(0)),
            },
            rx,
        )
    }

    type ResponseFut =
        Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

    /// `/` answers the greeting, `/gate` waits for the gate, `/echo` echoes
    /// the request body.
    #[derive(Clone)]
    struct App {
        greeting: &'static str,
        gate: Gate,
    }

    fn app(greeting: &'static str, gate: Gate) -> App {
        App { greeting, gate }
    }

    impl Service<Request<Incoming>> for App {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = ResponseFut;

        fn call(&self, req: Request<Incoming>) -> Self::Future {
            let App { greeting, gate } = self.clone();
            Box::pin(async move {
                let body = match req.uri().path() {
                    "/gate" => {
                        let _ = gate.entered.send(());
                        gate.open.acquire().await.unwrap().forget();
                        Bytes::from_static(b"released")
                    }
                    "/echo" => req.into_body().collect().await.unwrap().to_bytes(),
                    _ => Bytes::from_static(greeting.as_bytes()),
                };
                Ok(Response::new(Full::new(body)))
            })
        }
    }

    struct Running {
        addr: SocketAddr,
        drain: Drain,
        accept_loop: JoinHandle<io::Result<()>>,
    }

    async fn start_on(server: Server, listener: TcpListener, app: App) -> Running {
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        let accept_loop = tokio::spawn(server.serve(listener, app, drain.clone()));
        Running {
            addr,
            drain,
            accept_loop,
        }
    }

    async fn start(server: Server, app: App) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        start_on(server, listener, app).await
    }

    impl Running {
        /// Starts the drain and checks the accept loop stops.
        async fn drain(&mut self) {
            assert!(self.drain.start(DrainReason::Upgraded));
            timeout(T, &mut self.accept_loop)
                .await
                .expect("accept loop stops")
                .unwrap()
                .unwrap();
        }

        async fn wait_accepted(&self, n: usize) {
            timeout(T, async {
                while self.drain.in_flight() < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("connection accepted");
        }

        async fn idle(&self) {
            timeout(T, self.drain.idle())
                .await
                .expect("all connections closed");
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        close: bool,
        body: String,
    }

    /// A minimal raw HTTP/1.1 client, to see exactly what goes over the wire.
    struct Raw {
        io: BufReader<TcpStream>,
    }

    impl Raw {
        async fn connect(addr: SocketAddr) -> Raw {
            Raw {
                io: BufReader::new(TcpStream::connect(addr).await.unwrap()),
            }
        }

        async fn write(&mut self, bytes: &[u8]) {
            self.io.get_mut().write_all(bytes).await.unwrap();
        }

        async fn send(&mut self, path: &str) {
            let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
            self.write(req.as_bytes()).await;
        }

        /// Reads one response; `Ok(None)` on EOF before any byte of it.
        async fn read(&mut self) -> io::Result<Option<Reply>> {
            timeout(T, async {
                let mut line = String::new();
                if self.io.read_line(&mut line).await? == 0 {
                    return Ok(None);
                }
                let status = line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
                let (mut len, mut close) = (0, false);
                loop {
                    line.clear();
                    if self.io.read_line(&mut line).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let l = line.trim_end().to_ascii_lowercase();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if l.starts_with("connection:") && l.contains("close") {
                        close = true;
                    }
                }
                let mut body = vec![0; len];
                self.io.read_exact(&mut body).await?;
                Ok(Some(Reply {
                    status,
                    close,
                    body: String::from_utf8(body).unwrap(),
                }))
            })
            .await
            .expect("response within the test timeout")
        }

        async fn get(&mut self, path: &str) -> Reply {
            self.send(path).await;
            self.read().await.unwrap().expect("a response")
        }

        /// Asserts the server closed the connection with nothing more to say.
        async fn expect_eof(&mut self) {
            let mut rest = Vec::new();
            let n = timeout(T, self.io.read_to_end(&mut rest))
                .await
                .expect("server closes")
                .unwrap();
            assert_eq!(
                n,
                0,
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }

    fn grace(ms: u64) -> Server {
        Server::new().idle_grace(Duration::from_millis(ms))
    }

    /// (a) A keep-alive connection in use when the drain starts: its next
    /// request is answered normally, with `Connection: close`, then hyper
    /// closes the connection.
    #[tokio::test]
    async fn next_keepalive_request_is_answered_with_close() {
        let (g, _) = gate();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, false, "hello"));
        s.drain().await;
        // Well within the grace: the request must be served.
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "hello"));
        c.expect_eof().await;
        s.idle().await;
    }

    /// (a') A request being handled when the drain starts completes, and its
    /// response carries `Connection: close`.
    #[tokio::test]
    async fn request_in_progress_completes_with_close() {
        let (g, mut entered) = gate();
        let open = g.open.clone();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        c.send("/gate").await;
        entered.recv().await.unwrap();
        s.drain().await;
        assert_eq!(s.drain.in_flight(), 1);
        open.add_permits(1);
        let r = c.read().await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.close, r.body.as_str()),
            (200, true, "released")
        );
        c.expect_eof().await;
        s.idle().await;
    }

    /// (b) A connection accepted before the drain whose request is written
    /// after it started is answered, with `Connection: close`.
    #[tokio::test]
    async fn request_written_after_drain_is_answered() {
        let (g, _) = gate();
        let mut s = start(grace(2_000), app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        s.wait_accepted(1).await;
        s.drain().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "hello"));
        c.expect_eof().await;
        s.idle().await;
    }

    /// A connection whose request was partly read is never closed as idle,
    /// even long after the grace: in detection (one byte of what could be
    /// the HTTP/2 preface) and inside hyper (part of the next request head
    /// on a keep-alive connection, which hyper itself would close on
    /// `graceful_shutdown()`).
    #[tokio::test]
    async fn partial_requests_are_not_closed_as_idle() {
        let (g, _) = gate();
        let mut s = start(grace(100), app("hello", g)).await;
        let mut detecting = Raw::connect(s.addr).await;
        detecting.write(b"P").await;
        let mut in_hyper = Raw::connect(s.addr).await;
        // After a first response (a fresh hyper connection does not count as
        // idle in hyper, a used one does).
        assert_eq!(in_hyper.get("/").await.status, 200);
        in_hyper.write(b"GET / HT").await;
        s.wait_accepted(2).await;
        tokio::time::sleep(Duration::from_millis(50)).await; // let the server read them
        s.drain().await;
        tokio::time::sleep(Duration::from_millis(400)).await; // 4 graces
        detecting
            .write(b"OST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nping")
            .await;
        let r = detecting.read().await.unwrap().unwrap();
        assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "ping"));
        in_hyper.write(b"TP/1.1\r\nHost: t\r\n\r\n").await;
        let r = in_hyper.read().await.unwrap().unwrap();
        assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "hello"));
        detecting.expect_eof().await;
        in_hyper.expect_eof().await;
        s.idle().await;
    }

    /// (c) Idle connections are closed once idle for the grace after the
    /// drain started: a keep-alive connection after its last response, and
    /// one that never sent a byte. Then the drain is idle.
    #[tokio::test]
    async fn idle_connections_close_after_the_grace() {
        let (g, _) = gate();
        let grace_ms = 300;
        let mut s = start(grace(grace_ms), app("hello", g)).await;
        let mut used = Raw::connect(s.addr).await;
        assert_eq!(used.get("/").await.status, 200);
        let mut silent = Raw::connect(s.addr).await;
        s.wait_accepted(2).await;
        let t0 = Instant::now();
        s.drain().await;
        used.expect_eof().await;
        silent.expect_eof().await;
        s.idle().await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(grace_ms)
                && took < Duration::from_millis(grace_ms + 2_000),
            "closed after {took:?}"
        );
    }

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

    /// (d) HTTP/2 (prior knowledge): streams open when the drain starts
    /// complete, then the server closes the connection (GOAWAY).
    #[tokio::test]
    async fn http2_streams_complete_then_goaway() {
        let (g, mut entered) = gate();
        let open = g.open.clone();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let mut responses = Vec::new();
        for _ in 0..3 {
            let mut sender = sender.clone();
            responses.push(tokio::spawn(async move {
                let req = Request::get("http://test/gate")
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                let res = sender.send_request(req).await.unwrap();
                assert_eq!(res.version(), hyper::Version::HTTP_2);
                let status = res.status();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            }));
        }
        for _ in 0..3 {
            entered.recv().await.unwrap();
        }
        s.drain().await;
        open.add_permits(3);
        for r in responses {
            let (status, body) = timeout(T, r).await.unwrap().unwrap();
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"released"[..]));
        }
        // The server went away: the client connection ends by itself.
        timeout(T, conn)
            .await
            .expect("server closes")
            .unwrap()
            .unwrap();
        s.idle().await;
    }

    /// (d') An HTTP/2 connection accepted before the drain whose first
    /// request comes after the drain started (a client that connected, then
    /// took a moment) is served, like an HTTP/1 connection in the same
    /// state: a GOAWAY before any stream would refuse a request the client
    /// has not sent yet, and clients do not retry a request refused on a
    /// fresh connection (hyper-util's legacy client returns `Canceled`).
    #[tokio::test]
    async fn http2_first_request_after_the_drain_is_served() {
        let (g, _) = gate();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        s.wait_accepted(1).await;
        s.drain().await;
        // The client's think time, well within the idle grace.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let req = Request::get("http://test/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let res = timeout(T, sender.send_request(req))
            .await
            .unwrap()
            .expect("the first request is served");
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
        // Then the GOAWAY: the connection ends.
        timeout(T, conn)
            .await
            .expect("server closes")
            .unwrap()
            .unwrap();
        s.idle().await;
    }

    /// hyper-util's legacy client with HTTP/2 prior knowledge is served as
    /// HTTP/2; an idle HTTP/2 connection gets GOAWAY as soon as the drain
    /// starts.
    #[tokio::test]
    async fn http2_via_legacy_client() {
        let (g, _) = gate();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<http_body_util::Empty<Bytes>>();
        let uri: hyper::Uri = format!("http://{}/", s.addr).parse().unwrap();
        let res = client.get(uri).await.unwrap();
        assert_eq!(res.version(), hyper::Version::HTTP_2);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
        let t0 = Instant::now();
        s.drain().await;
        s.idle().await;
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "no idle grace for h2"
        );
    }

    /// (e) Once draining, the accept loop returns and the listener is gone:
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

    /// Unix sockets work the same.
    #[tokio::test]
    async fn serves_a_unix_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("http.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let drain = Drain::new();
        let (g, _) = gate();
        let accept_loop = tokio::spawn(serve(listener, app("unix", g), drain.clone()));
        let mut io = tokio::net::UnixStream::connect(&path).await.unwrap();
        timeout(T, async {
            while drain.in_flight() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
        drain.start(DrainReason::Stopped);
        timeout(T, accept_loop).await.unwrap().unwrap().unwrap();
        io.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        timeout(T, io.read_to_end(&mut got)).await.unwrap().unwrap();
        let got = String::from_utf8(got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\nunix"), "{got}");
        timeout(T, drain.idle()).await.unwrap();
    }

    /// An axum `Router` plugs in through `TowerToHyperService`.
    #[tokio::test]
    async fn serves_an_axum_router() {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "axum" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::new();
        tokio::spawn(serve(
            listener,
            hyper_util::service::TowerToHyperService::new(app),
            drain.clone(),
        ));
        let mut c = Raw::connect(addr).await;
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, false, "axum"));
        drain.start(DrainReason::Stopped);
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "axum"));
        c.expect_eof().await;
    }

    /// The whole point: keep-alive clients sending back to back while the
    /// socket passes from one generation to the next (both serve the same
    /// listening socket, as after a handover) see no error at all, and end
    /// up on the new generation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_request_lost_across_generations() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let tokio_listener =
            |l: &std::net::TcpListener| TcpListener::from_std(l.try_clone().unwrap()).unwrap();
        let (g, _) = gate();
        let mut gens = vec![
            start_on(
                grace(1_000),
                tokio_listener(&std_listener),
                app("gen0", g.clone()),
            )
            .await,
        ];

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        for _ in 0..6 {
            let stop = stop.clone();
            clients.push(tokio::spawn(async move {
                let (mut ok, mut closes, mut last) = (0u64, 0u64, String::new());
                let mut c = Raw::connect(addr).await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.send("/").await;
                    let r = c.read().await.expect("no error").expect("no early EOF");
                    assert_eq!(r.status, 200);
                    ok += 1;
                    last = r.body;
                    if r.close {
                        closes += 1;
                        c.expect_eof().await;
                        c = Raw::connect(addr).await;
                    }
                }
                (ok, closes, last)
            }));
        }
        for (n, name) in ["gen1", "gen2", "gen3"].into_iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(150)).await;
            gens.push(
                start_on(
                    grace(1_000),
                    tokio_listener(&std_listener),
                    app(name, g.clone()),
                )
                .await,
            );
            gens[n].drain().await;
            gens[n].idle().await;
        }
        drop(std_listener);
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            let (ok, closes, last) = timeout(T, c).await.unwrap().unwrap();
            assert!(ok > 3, "{ok} requests");
            assert_eq!(closes, 3, "one Connection: close per drained generation");
            assert_eq!(last, "gen3");
        }
    }

    /// Detection reads no further than the first byte that differs from the
    /// HTTP/2 preface (or the whole preface), in as many reads as it takes.
    #[tokio::test]
    async fn detection_stops_where_it_can_decide() {
        let drain = Drain::new();
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
