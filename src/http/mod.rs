//! An HTTP/1.1 and HTTP/2 accept loop that drains without losing a request.
//!
//! [`serve`] (or [`Server::serve`] with options) runs a hyper service on a
//! [`Listener`] until the [`Drain`] starts, then stops accepting, drops the
//! listener once the drain is final (the socket itself lives on in the new
//! process; a drain taken back resumes accepting, see
//! [`Drain::resumed`]) and lets every connection finish by these rules:
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
//! gone.
//!
//! # Long-lived connections: WebSockets, server-sent events, streams
//!
//! The rules above end a connection between two requests. A WebSocket or a
//! stream of server-sent events has no "between": only the application can
//! end it well (a WebSocket `Close` with 1001 "going away", the end of an
//! event stream), so the server gives it what it needs and counts it:
//!
//! - Every request carries a [`DrainSignal`](crate::drain::DrainSignal) in its extensions (axum:
//!   `Extension<DrainSignal>`; hyper: `req.extensions().get::<DrainSignal>()`).
//!   A handler has it before it answers, so a signal that fires while an
//!   upgrade completes is never missed: its future resolves at once.
//! - An upgraded connection (hyper's `with_upgrades`, axum's
//!   `WebSocketUpgrade`) keeps its place in the drain until the application
//!   drops the upgraded IO: the connection's guard travels inside it. The
//!   old process does not exit while such a socket is open, up to the drain
//!   timeout.
//! - A connection that is upgraded, or sending a response body when the drain
//!   starts, counts as [long-lived](crate::drain::DrainGuard::set_long_lived):
//!   [`Handover::wait`](crate::Handover::wait) logs and returns how many of
//!   them ended during the drain and how many were still open at the drain
//!   timeout and so were cut by the exit.
//! - Once draining, an answer `101 Switching Protocols` is not sent: the
//!   upgrade handshake gets `503 Service Unavailable` with `Retry-After: 0`
//!   and `Connection: close` instead (the application's upgrade future
//!   resolves with an error), and the client's retry reaches the new
//!   process. HTTP/1 only: this server does not enable WebSockets over
//!   HTTP/2 (RFC 8441).
//!
//! An axum WebSocket handler that says "going away" when the drain starts:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
//! use axum::response::Response;
//! use axum::Extension;
//! use handover::DrainSignal;
//!
//! async fn ws(upgrade: WebSocketUpgrade, Extension(signal): Extension<DrainSignal>) -> Response {
//!     upgrade.on_upgrade(move |socket| echo(socket, signal))
//! }
//!
//! async fn echo(mut socket: WebSocket, signal: DrainSignal) {
//!     let draining = signal.draining();
//!     tokio::pin!(draining);
//!     loop {
//!         tokio::select! {
//!             _ = &mut draining => break,
//!             msg = socket.recv() => match msg {
//!                 Some(Ok(Message::Text(t))) => {
//!                     if socket.send(Message::Text(t)).await.is_err() {
//!                         return;
//!                     }
//!                 }
//!                 Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
//!                 Some(Ok(_)) => {}
//!             },
//!         }
//!     }
//!     let bye = CloseFrame { code: close_code::AWAY, reason: "restarting".into() };
//!     if socket.send(Message::Close(Some(bye))).await.is_ok() {
//!         // The client answers with its own Close; wait for it, bounded.
//!         let _ = tokio::time::timeout(Duration::from_secs(5), async {
//!             while let Some(Ok(m)) = socket.recv().await {
//!                 if matches!(m, Message::Close(_)) {
//!                     break;
//!                 }
//!             }
//!         })
//!         .await;
//!     }
//! }
//! ```
//!
//! `examples/websocket.rs` and `examples/sse.rs` are complete programs;
//! docs/guide.md says what a client must do so that no message is lost.

// Split by job: `accept` (the accept loop and what an accept error means),
// `detect` (HTTP/1 or HTTP/2 from the first bytes), `replay` (the IO that
// gives hyper back the bytes detection read), `conn` (one connection's life
// and the drain skeleton both protocols share), `h1` and `h2` (what differs
// between them).
mod accept;
mod conn;
mod detect;
mod h1;
mod h2;
mod replay;
#[cfg(test)]
mod testing;

use std::io;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};

pub use accept::Listener;

use crate::drain::Drain;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on `listener`
/// with the default [`Server`] options until `drain` starts.
///
/// When the drain starts the accept loop stops accepting; once the drain is
/// final it drops the listener and returns `Ok(())` (a drain that
/// [`Handover`](crate::Handover) takes back makes it accept again). The
/// connections go on in their own tasks, each holding a
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
/// use handover::drain::{DrainReason, DrainTrigger};
/// use http_body_util::Full;
/// use hyper::{Request, Response};
///
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
/// let hello = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("Welcome to the Home Page!\n"))))
/// });
/// let trigger = DrainTrigger::new();
/// let server = tokio::spawn(handover::http::serve(listener, hello, trigger.watcher()));
///
/// tokio::signal::ctrl_c().await?;
/// trigger.start(DrainReason::Stopped);
/// server.await.expect("accept loop panicked")?; // no longer accepting
/// let drain = trigger.watcher();
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
/// let trigger = handover::drain::DrainTrigger::new();
/// handover::http::serve(listener, TowerToHyperService::new(app), trigger.watcher()).await
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
/// let trigger = handover::drain::DrainTrigger::new();
/// let drain = trigger.watcher();
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    use super::testing::{app, gate, grace, start_on, Raw, T};
    use super::*;
    use crate::drain::{DrainReason, DrainTrigger};

    /// Unix sockets work the same.
    #[tokio::test]
    async fn serves_a_unix_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("http.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
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
        trigger.start(DrainReason::Stopped);
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
        let trigger = DrainTrigger::new();
        tokio::spawn(serve(
            listener,
            hyper_util::service::TowerToHyperService::new(app),
            trigger.watcher(),
        ));
        let mut c = Raw::connect(addr).await;
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, false, "axum"));
        trigger.start(DrainReason::Stopped);
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
}
