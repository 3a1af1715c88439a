//! HTTP/1: every response after the drain started carries
//! `Connection: close`, and a keep-alive connection is closed only once it
//! has been idle (no request in progress, no byte of the next one read) for
//! the idle grace. The connection's state is kept by its service, response
//! bodies and IO, and read by the drain skeleton in [`conn`](super::conn).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::conn::drive;
use super::replay::{ConnIo, Prefix};
use super::{BoxError, Server};
use crate::drain::Drain;

pub(super) async fn serve_h1<I, S, B>(
    io: I,
    prefix: Prefix,
    service: S,
    drain: Drain,
    cfg: &Server,
    accepted: Instant,
    drain_at: Option<Instant>,
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
    let io = ConnIo::new(prefix, io, Some(state.clone()));
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
    let conn = pin!(builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades());
    // While a request is in progress (or its first bytes were read) the
    // response will carry `Connection: close`: nothing to close. An idle
    // connection is closed once idle for the grace, counted from the drain
    // or its last response, whichever is later.
    let close_at = |drain_at: Instant| {
        let idle_since = state.idle_since()?;
        Some(idle_since.max(drain_at) + cfg.idle_grace)
    };
    drive(conn, &drain, drain_at, close_at, |conn| {
        tracing::debug!("closing a keep-alive connection idle for the whole grace");
        // Safe: hyper has no request of this connection, read or unread.
        conn.graceful_shutdown();
    })
    .await
}

/// What an HTTP/1 connection is doing, as seen by its service, response
/// bodies and IO.
#[derive(Debug)]
pub(super) struct ConnState {
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

    /// Bytes were read: a request may have started.
    pub(super) fn note_read(&self) {
        self.with(|a| a.read_since_idle = true);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::http::testing::{app, gate, grace, start, Raw};

    /// A keep-alive connection in use when the drain starts: its next
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

    /// A request being handled when the drain starts completes, and its
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

    /// A connection accepted before the drain whose request is written
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

    /// Idle connections are closed once idle for the grace after the
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
}
