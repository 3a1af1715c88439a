//! HTTP/1: every response after the drain started carries
//! `Connection: close`, and a keep-alive connection is closed only once it
//! has been idle (no request in progress, no byte of the next one read) for
//! the idle grace. The connection's state is kept by its service, response
//! bodies and IO, and read by the drain skeleton in [`conn`](super::conn).
//!
//! Long-lived connections: a `101 Switching Protocols` answer marks the
//! connection long-lived, and hyper hands its IO (which holds the drain
//! guard) to the application. So does a response body that is still being
//! sent when the drain starts. Once draining, an upgrade request is not
//! passed to the application: the process is about to tell every upgraded
//! connection to go away, so the request is answered with
//! [`refused_upgrade`] and the client retries on the new process.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, RETRY_AFTER, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::conn::{drive, ConnGuard};
use super::replay::{ConnIo, Prefix};
use super::{BoxError, Server};
use crate::drain::{Drain, DrainSignal};

#[allow(clippy::too_many_arguments)]
pub(super) async fn serve_h1<I, S, B>(
    io: I,
    prefix: Prefix,
    service: S,
    drain: Drain,
    guard: ConnGuard,
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
    let io = ConnIo::new(prefix, io, Some(state.clone()), guard.clone());
    let service = H1Service {
        inner: service,
        state: state.clone(),
        signal: drain.signal(),
        guard: guard.clone(),
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true);
    for settings in &cfg.http1 {
        settings(&mut builder);
    }
    let conn = pin!(builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades());
    // A response still streaming when the drain starts (server-sent events,
    // a long download) makes this a long-lived connection: it ends when the
    // application ends the body. (A body that ends before this runs marks
    // the connection itself; see `Busy`.)
    let on_drain = || {
        if state.streaming() {
            guard.set_long_lived();
        }
    };
    // While a request is in progress (or its first bytes were read) the
    // response will carry `Connection: close`: nothing to close. An idle
    // connection is closed once idle for the grace, counted from the drain
    // or its last response, whichever is later.
    let close_at = |drain_at: Instant| {
        let idle_since = state.idle_since()?;
        Some(idle_since.max(drain_at) + cfg.idle_grace)
    };
    drive(conn, &drain, drain_at, on_drain, close_at, |conn| {
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
    /// Of those, the ones whose response head went to hyper and whose body
    /// is being sent.
    streaming: usize,
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
                streaming: 0,
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

    /// Whether a response body is being sent.
    fn streaming(&self) -> bool {
        self.with(|a| a.streaming > 0)
    }
}

/// A request in progress; dropped when its response body is done.
#[derive(Debug)]
struct Busy {
    state: Arc<ConnState>,
    streaming: Option<Streaming>,
}

/// A response body being sent, and what it needs to mark its connection
/// long-lived if it outlives the start of the drain.
#[derive(Debug)]
struct Streaming {
    /// Whether the body started before the drain did.
    before_drain: bool,
    signal: DrainSignal,
    guard: ConnGuard,
}

impl Busy {
    fn new(state: Arc<ConnState>) -> Self {
        state.with(|a| a.active += 1);
        Busy {
            state,
            streaming: None,
        }
    }

    /// The response head goes to hyper: its body is being sent from now on.
    fn streaming(mut self, signal: DrainSignal, guard: ConnGuard) -> Self {
        self.state.with(|a| a.streaming += 1);
        self.streaming = Some(Streaming {
            before_drain: !signal.is_draining(),
            signal,
            guard,
        });
        self
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(s) = &self.streaming {
            // It was streaming when the drain started, even if it ends
            // before the connection's task saw the drain.
            if s.before_drain && s.signal.is_draining() {
                s.guard.set_long_lived();
            }
        }
        let streaming = self.streaming.is_some();
        self.state.with(|a| {
            a.active -= 1;
            if streaming {
                a.streaming -= 1;
            }
            if a.active == 0 {
                a.read_since_idle = false;
                a.idle_since = Instant::now();
            }
        });
    }
}

/// Wraps the user's service on an HTTP/1 connection: counts requests in
/// progress, hands each request the drain signal, adds `Connection: close`
/// to responses once draining, marks an upgraded connection long-lived and
/// refuses an upgrade once draining.
struct H1Service<S> {
    inner: S,
    state: Arc<ConnState>,
    signal: DrainSignal,
    guard: ConnGuard,
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

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.state.clone());
        let signal = self.signal.clone();
        let guard = self.guard.clone();
        if signal.is_draining() && asks_for_upgrade(&req) {
            // Not passed on: the connection would be told to go away at
            // once. Dropping the request drops its `OnUpgrade`, so hyper
            // closes the connection after this answer instead of handing
            // it over.
            tracing::debug!("draining: refusing an upgrade, the client retries elsewhere");
            drop(req);
            let res = refused_upgrade().map(|()| TrackedBody {
                inner: None,
                _busy: busy.streaming(signal, guard),
            });
            return Box::pin(async move { Ok(res) });
        }
        req.extensions_mut().insert(signal.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                // hyper hands the IO, and with it the guard, to the
                // application. If the drain started since the request came
                // in, the application finds the signal already fired and
                // closes at once.
                guard.set_long_lived();
            } else if signal.is_draining() {
                // hyper closes the connection after writing this response.
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            let busy = busy.streaming(signal, guard);
            Ok(res.map(|body| TrackedBody {
                inner: Some(Box::pin(body)),
                _busy: busy,
            }))
        })
    }
}

/// Whether hyper would hand this request's connection over if the answer
/// agreed (it put an `OnUpgrade` in the extensions: `Connection: upgrade`,
/// or `CONNECT`), other than an `h2c` offer: a client that offers HTTP/2
/// with `Upgrade: h2c` takes a normal answer as well, and hyper's server
/// never accepts the offer itself.
fn asks_for_upgrade(req: &Request<Incoming>) -> bool {
    if req
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return false;
    }
    let h2c_only = req.headers().get_all(UPGRADE).iter().all(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")))
    });
    req.method() == hyper::Method::CONNECT || !h2c_only
}

/// What a draining process answers to an upgrade request (a WebSocket
/// handshake): `503 Service Unavailable` with `Retry-After: 0` and
/// `Connection: close`, no body. The upgrade never happens here, the
/// connection closes after the answer, and a client that retries (at once,
/// as `Retry-After: 0` says) connects to the new process. A `101` would hand
/// the application a connection it would have to close at once with "going
/// away".
pub(super) fn refused_upgrade() -> Response<()> {
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = res.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    h.insert(RETRY_AFTER, HeaderValue::from_static("0"));
    res
}

/// A response body that ends its request's [`Busy`] when hyper drops it.
/// Without `inner` it is empty (a refused upgrade).
struct TrackedBody<B> {
    inner: Option<Pin<Box<B>>>,
    _busy: Busy,
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match &mut self.inner {
            Some(inner) => inner.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use tokio::time::timeout;

    use crate::drain::DrainOutcome;
    use crate::http::testing::{app, gate, grace, start, Raw, T};

    fn upgrade(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n")
            .into_bytes()
    }

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

    /// An upgraded connection stays in the drain count, marked long-lived,
    /// until the application drops it: here when the drain signal tells it
    /// to say goodbye. Then it counts as closed in time.
    #[tokio::test]
    async fn upgraded_connection_counts_until_the_application_drops_it() {
        let (g, _) = gate();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        c.write(&upgrade("/upgrade")).await;
        let r = c.read().await.unwrap().unwrap();
        assert_eq!(r.status, 101);
        assert_eq!(c.line().await, "upgraded\n");
        // hyper handed the connection over before the application wrote
        // that line, and its task ends right after: the count stays.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!((s.drain.in_flight(), s.drain.long_lived()), (1, 1));
        s.drain().await;
        assert_eq!(c.line().await, "bye\n");
        c.expect_eof().await;
        let outcome = timeout(T, s.drain.outcome(T)).await.unwrap();
        let want = DrainOutcome {
            unfinished: 0,
            long_lived_closed: 1,
            long_lived_cut: 0,
        };
        assert_eq!(outcome, want);
    }

    /// Once draining, an upgrade is not completed: `503` with
    /// `Retry-After: 0` and `Connection: close`, no body, then the
    /// connection closes. The application never sees the request.
    #[tokio::test]
    async fn an_upgrade_while_draining_is_refused() {
        let (g, _) = gate();
        let seen = g.upgrade_requests.clone();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        assert_eq!(c.get("/").await.status, 200);
        s.drain().await;
        c.write(&upgrade("/upgrade")).await;
        let r = c.read().await.unwrap().unwrap();
        assert_eq!((r.status, r.close, r.body.as_str()), (503, true, ""));
        assert!(r.headers.iter().any(|h| h == "retry-after: 0"), "{r:?}");
        assert!(r.headers.iter().any(|h| h == "content-length: 0"), "{r:?}");
        assert!(
            !r.headers.iter().any(|h| h.starts_with("upgrade:")),
            "{r:?}"
        );
        c.expect_eof().await;
        s.idle().await;
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0);
        let outcome = s.drain.outcome(T).await;
        assert_eq!(outcome, DrainOutcome::default());
    }

    /// Long-lived work that ends on the drain signal counts as closed;
    /// work that ignores it is still open at the drain timeout and counts
    /// as cut. A keep-alive connection is not long-lived.
    #[tokio::test]
    async fn long_lived_work_is_closed_or_cut_at_the_timeout() {
        async fn first_tick(c: &mut Raw) {
            let r = c.read().await.unwrap().unwrap();
            assert_eq!((r.status, r.close), (200, false));
            while c.line().await != "tick\n" {}
        }
        let (g, _) = gate();
        let mut s = start(grace(100), app("hello", g)).await;
        let mut keep_alive = Raw::connect(s.addr).await;
        assert_eq!(keep_alive.get("/").await.status, 200);
        let mut polite_up = Raw::connect(s.addr).await;
        polite_up.write(&upgrade("/upgrade")).await;
        assert_eq!(polite_up.read().await.unwrap().unwrap().status, 101);
        assert_eq!(polite_up.line().await, "upgraded\n");
        let mut stubborn_up = Raw::connect(s.addr).await;
        stubborn_up.write(&upgrade("/upgrade?stubborn")).await;
        assert_eq!(stubborn_up.read().await.unwrap().unwrap().status, 101);
        assert_eq!(stubborn_up.line().await, "upgraded\n");
        let mut polite_stream = Raw::connect(s.addr).await;
        polite_stream.send("/stream").await;
        first_tick(&mut polite_stream).await;
        let mut stubborn_stream = Raw::connect(s.addr).await;
        stubborn_stream.send("/stream?stubborn").await;
        first_tick(&mut stubborn_stream).await;

        s.drain().await;
        assert_eq!(polite_up.line().await, "bye\n");
        polite_up.expect_eof().await;
        // The stream ends (the last chunk), then the connection is idle
        // and closes after the grace.
        while polite_stream.line().await != "0\r\n" {}
        assert_eq!(polite_stream.line().await, "\r\n");
        polite_stream.expect_eof().await;
        keep_alive.expect_eof().await;
        let outcome = timeout(T, s.drain.outcome(Duration::from_millis(500)))
            .await
            .unwrap();
        let want = DrainOutcome {
            unfinished: 2,
            long_lived_closed: 2,
            long_lived_cut: 2,
        };
        assert_eq!(outcome, want);
        // Still streaming: the drain only counted it.
        while stubborn_stream.line().await != "tick\n" {}
        drop((stubborn_up, stubborn_stream));
        s.idle().await;
    }
}
