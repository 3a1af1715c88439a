//! HTTP/2: once draining, the connection gets `GOAWAY` and its open streams
//! complete. A connection that has not opened a stream yet gets it only once
//! its first stream arrives or after the idle grace, so that first request
//! is served. A connection with a response still streaming when the drain
//! starts is long-lived: it ends when the application ends those bodies.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::conn::{drive, ConnGuard};
use super::replay::{ConnIo, Prefix};
use super::{BoxError, Executor, Server};
use crate::drain::{Drain, DrainSignal};

#[allow(clippy::too_many_arguments)]
pub(super) async fn serve_h2<I, S, B>(
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
    let io = ConnIo::new(prefix, io, None, guard.clone());
    let opened = Arc::new(AtomicBool::new(false));
    let streaming = Arc::new(AtomicUsize::new(0));
    let service = H2Service {
        inner: service,
        opened: opened.clone(),
        streaming: streaming.clone(),
        signal: drain.signal(),
        guard: guard.clone(),
    };
    let builder = {
        let mut b = http2::Builder::new(Executor);
        b.timer(TokioTimer::new());
        for settings in &cfg.http2 {
            settings(&mut b);
        }
        b
    };
    let conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    // A response still streaming when the drain starts makes this a
    // long-lived connection. (A body that ends before this runs marks the
    // connection itself; see `CountedBody`.)
    let on_drain = || {
        if streaming.load(Ordering::Acquire) > 0 {
            guard.set_long_lived();
        }
    };
    let close_at = |drain_at: Instant| {
        if opened.load(Ordering::Acquire) {
            return Some(drain_at); // already passed: GOAWAY at once
        }
        // A connection that has not opened a stream yet was accepted just
        // before the drain: its first request is on its way. A GOAWAY now
        // would refuse it before it is sent, and clients retry such a
        // request only on a connection that served one before (hyper-util
        // never on a fresh one). As for HTTP/1, wait for it, up to the idle
        // grace.
        Some(drain_at.max(accepted) + cfg.idle_grace)
    };
    // GOAWAY (hyper sends it in two steps, so streams the client opened
    // before seeing it are still served); open streams complete.
    drive(conn, &drain, drain_at, on_drain, close_at, |conn| {
        conn.graceful_shutdown()
    })
    .await
}

/// Notes that the client opened a stream, hands each request the drain
/// signal, and counts the response bodies being sent.
struct H2Service<S> {
    inner: S,
    opened: Arc<AtomicBool>,
    streaming: Arc<AtomicUsize>,
    signal: DrainSignal,
    guard: ConnGuard,
}

type ResponseFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<CountedBody<B>>, E>> + Send + 'static>>;

impl<S, B> Service<Request<Incoming>> for H2Service<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<B, S::Error>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.opened.store(true, Ordering::Release);
        req.extensions_mut().insert(self.signal.clone());
        let fut = self.inner.call(req);
        let streaming = self.streaming.clone();
        let signal = self.signal.clone();
        let guard = self.guard.clone();
        Box::pin(async move {
            let res = fut.await?;
            streaming.fetch_add(1, Ordering::AcqRel);
            Ok(res.map(|body| CountedBody {
                inner: Box::pin(body),
                streaming,
                before_drain: !signal.is_draining(),
                signal,
                guard,
            }))
        })
    }
}

/// A response body counted in its connection's `streaming` until hyper
/// drops it. hyper sends it from a task of its own, so it may end before
/// the connection's task sees the drain: then it marks the connection
/// long-lived itself if it started before the drain.
struct CountedBody<B> {
    inner: Pin<Box<B>>,
    streaming: Arc<AtomicUsize>,
    before_drain: bool,
    signal: DrainSignal,
    guard: ConnGuard,
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if self.before_drain && self.signal.is_draining() {
            self.guard.set_long_lived();
        }
        self.streaming.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<B: Body> Body for CountedBody<B> {
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

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::{Request, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpStream;
    use tokio::time::{timeout, Instant};

    use crate::http::testing::{app, gate, grace, start, T};

    /// HTTP/2 (prior knowledge): streams open when the drain starts
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

    /// An HTTP/2 connection accepted before the drain whose first
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

    /// A stream still sending its body when the drain starts makes its
    /// HTTP/2 connection long-lived: closed in time when the body ends on
    /// the drain signal, cut when it is still open at the drain timeout.
    #[tokio::test]
    async fn http2_streams_are_long_lived() {
        use crate::drain::DrainOutcome;

        let (g, _) = gate();
        let mut s = start(grace(5_000), app("hello", g)).await;
        let mut bodies = Vec::new();
        for path in ["/stream", "/stream?stubborn"] {
            let tcp = TcpStream::connect(s.addr).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("http://test{path}"))
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let mut body = sender.send_request(req).await.unwrap().into_body();
            let tick = timeout(T, body.frame()).await.unwrap().unwrap().unwrap();
            assert_eq!(tick.into_data().unwrap(), "tick\n");
            bodies.push((sender, body));
        }
        s.drain().await;
        let (_, polite) = bodies.remove(0);
        let rest = timeout(T, polite.collect()).await.unwrap();
        assert!(rest.is_ok(), "the stream ends cleanly: {rest:?}");
        let outcome = timeout(T, s.drain.outcome(Duration::from_millis(500)))
            .await
            .unwrap();
        let want = DrainOutcome {
            unfinished: 1,
            long_lived_closed: 1,
            long_lived_cut: 1,
        };
        assert_eq!(outcome, want);
        drop(bodies);
        s.idle().await;
    }
}
