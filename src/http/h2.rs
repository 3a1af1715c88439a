//! HTTP/2: once draining, the connection gets `GOAWAY` and its open streams
//! complete. A connection that has not opened a stream yet gets it only once
//! its first stream arrives or after the idle grace, so that first request
//! is served.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::conn::drive;
use super::replay::{ConnIo, Prefix};
use super::{BoxError, Server};
use crate::drain::Drain;

pub(super) async fn serve_h2<I, S, B>(
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
    let io = ConnIo::new(prefix, io, None);
    let opened = Arc::new(AtomicBool::new(false));
    let service = H2Service {
        inner: service,
        opened: opened.clone(),
    };
    let builder = {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new());
        b
    };
    let conn = pin!(builder.serve_connection(TokioIo::new(io), service));
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
    drive(conn, &drain, drain_at, close_at, |conn| {
        conn.graceful_shutdown()
    })
    .await
}

/// Notes that the client opened a stream.
struct H2Service<S> {
    inner: S,
    opened: Arc<AtomicBool>,
}

impl<S, R> Service<R> for H2Service<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.opened.store(true, Ordering::Release);
        self.inner.call(req)
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
}
