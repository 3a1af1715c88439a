//! An HTTP/1.1 and HTTP/2 accept loop that drains without losing a request.
//!
//! [`serve`] (or [`Server::serve`] with options) runs an [`App`] on a
//! [`Listener`]: an axum `Router` or any tower service, a make-service such
//! as `router.into_make_service_with_connect_info::<SocketAddr>()` (for
//! axum's `ConnectInfo`), or a hyper service. [`Server::serve_with`] adds a
//! per-connection handshake, such as TLS with tokio-rustls
//! (`examples/tls.rs`). hyper's own HTTP/1 and HTTP/2 settings are set
//! through [`Server::http1`] and [`Server::http2`].
//!
//! It serves until the [`Drain`] starts, then stops accepting, drops the
//! listener once the drain is final (the socket itself lives on in the new
//! process; a drain taken back resumes accepting, see [`Drain::resumed`])
//! and lets every connection finish by these rules:
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
//! - A connection still in its handshake ([`Server::serve_with`]: TLS) when
//!   the drain starts is not cancelled either: it finishes the handshake,
//!   bounded by the handshake timeout, and then follows the rules above.
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
pub mod app;
mod conn;
mod detect;
mod h1;
mod h2;
mod handshake;
mod replay;
#[cfg(test)]
mod testing;

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};

pub use accept::Listener;
pub use app::App;
pub use handshake::Acceptor;

use self::handshake::Plain;
use crate::drain::Drain;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on `listener`
/// with the default [`Server`] options until `drain` starts. It accepts
/// through [`Drain::accept`]: in a new process (one an upgrade started),
/// from the moment its `ready()` was told it is main.
///
/// `app` is what axum users pass to `axum::serve`: a `Router` (or any tower
/// service), or a make-service such as
/// `router.into_make_service_with_connect_info::<SocketAddr>()`, which is
/// called once per connection with the peer's address so that axum's
/// `ConnectInfo` extractor works. A hyper service
/// (`hyper::service::service_fn`) works too; see [`App`].
///
/// When the drain starts the accept loop stops accepting; once the drain is
/// final it drops the listener and returns `Ok(())` (a drain that
/// [`Handover`](crate::Handover) takes back makes it accept again). The
/// connections go on in their own tasks, each holding a
/// [`DrainGuard`](crate::drain::DrainGuard), and close by the rules in the
/// [module docs](self). Wait for them with [`Drain::idle`] or
/// [`Drain::finished`]. An error is returned only when accepting fails for
/// good (the listener is not a listening socket any more) or a make-service
/// fails; transient errors, including running out of file descriptors, are
/// logged and retried.
///
/// # Errors
///
/// When accepting fails for good, or a make-service fails; see above.
///
/// # Cancel safety
///
/// Dropping the future stops accepting and drops the listener; the
/// connections already accepted go on in their own tasks and still count
/// in the drain.
///
/// # Examples
///
/// An [axum](https://docs.rs/axum) `Router`:
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let app = Router::new().route("/", get(|| async { "Welcome to the Home Page!\n" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
/// let trigger = handover::drain::DrainTrigger::new();
/// handover::http::serve(listener, app, trigger.watcher()).await
/// # }
/// ```
///
/// With the client's address in axum's `ConnectInfo`:
///
/// ```no_run
/// use std::net::SocketAddr;
///
/// use axum::{extract::ConnectInfo, routing::get, Router};
///
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// let app = Router::new().route(
///     "/peer",
///     get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("{peer}\n") }),
/// );
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
/// let trigger = handover::drain::DrainTrigger::new();
/// let app = app.into_make_service_with_connect_info::<SocketAddr>();
/// handover::http::serve(listener, app, trigger.watcher()).await
/// # }
/// ```
///
/// A hello server with [`hyper::service::service_fn`], stopped on Ctrl-C
/// (with [`Handover`](crate::Handover), `handover.drain()` and
/// `handover.wait()` do this):
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
pub async fn serve<L, A, K>(listener: L, app: A, drain: Drain) -> io::Result<()>
where
    L: Listener,
    A: App<L::Addr, K>,
{
    Server::new().serve(listener, app, drain).await
}

/// Options for the accept loop; [`serve`] uses the defaults.
///
/// Besides the drain's own settings, hyper's HTTP/1 and HTTP/2 settings
/// (header limits, keep-alive, HTTP/2 streams and pings, window sizes) are
/// set on hyper's own builders, through [`http1`](Self::http1) and
/// [`http2`](Self::http2). A TLS handshake (or any other) runs through
/// [`serve_with`](Self::serve_with), bounded by the
/// [`handshake_timeout`](Self::handshake_timeout).
///
/// # Example
///
/// ```no_run
/// # use std::time::Duration;
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// # let app = axum::Router::new();
/// let trigger = handover::drain::DrainTrigger::new();
/// let drain = trigger.watcher();
/// let listener = tokio::net::UnixListener::bind("/run/hello/http.sock")?;
/// handover::http::Server::new()
///     .idle_grace(Duration::from_millis(500))
///     .header_read_timeout(Some(Duration::from_secs(10)))
///     .http1(|h1| {
///         h1.max_headers(50).max_buf_size(64 * 1024);
///     })
///     .http2(|h2| {
///         h2.max_concurrent_streams(100)
///             .keep_alive_interval(Duration::from_secs(20))
///             .keep_alive_timeout(Duration::from_secs(10));
///     })
///     .serve(listener, app, drain)
///     .await
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    idle_grace: Duration,
    header_read_timeout: Option<Duration>,
    handshake_timeout: Duration,
    http1: Vec<Http1Settings>,
    http2: Vec<Http2Settings>,
}

type Http1Settings = Arc<dyn Fn(&mut http1::Builder) + Send + Sync>;
type Http2Settings = Arc<dyn Fn(&mut http2::Builder<Executor>) + Send + Sync>;

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("idle_grace", &self.idle_grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("http1", &format_args!("{} closures", self.http1.len()))
            .field("http2", &format_args!("{} closures", self.http2.len()))
            .finish()
    }
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// The defaults: an idle grace of 1 s, a header read timeout of 30 s, a
    /// handshake timeout of 10 s, hyper's defaults for the rest (HTTP/1
    /// keep-alive on).
    pub fn new() -> Self {
        Server {
            idle_grace: Duration::from_secs(1),
            header_read_timeout: Some(Duration::from_secs(30)),
            handshake_timeout: Duration::from_secs(10),
            http1: Vec::new(),
            http2: Vec::new(),
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
    /// new connection (after the handshake, if any). `None` disables it.
    /// Default: 30 s, as in hyper.
    pub fn header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// How long the handshake of [`serve_with`](Self::serve_with) (a TLS
    /// handshake, say) may take, from the accept; a connection that has not
    /// finished it by then is closed. Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets hyper's HTTP/1 options on its own [`http1::Builder`] (see its
    /// docs for each): `max_headers`, `max_buf_size`, `keep_alive`,
    /// `half_close`, `title_case_headers`... The closure runs for every
    /// HTTP/1 connection, after this server's settings (a timer, the
    /// [header read timeout](Self::header_read_timeout), keep-alive on), so
    /// what it sets wins; calling `http1` again adds another closure, run
    /// after the first.
    ///
    /// What the drain relies on holds whatever is set here: a response
    /// written once the drain started carries `Connection: close`, and an
    /// idle connection is closed after the idle grace. With
    /// `keep_alive(false)` every connection closes after its first response.
    ///
    /// ```
    /// let server = handover::http::Server::new().http1(|h1| {
    ///     h1.max_headers(50).max_buf_size(64 * 1024).keep_alive(true);
    /// });
    /// ```
    pub fn http1(mut self, settings: impl Fn(&mut http1::Builder) + Send + Sync + 'static) -> Self {
        self.http1.push(Arc::new(settings));
        self
    }

    /// Sets hyper's HTTP/2 options on its own [`http2::Builder`] (see its
    /// docs for each): `max_concurrent_streams`, `keep_alive_interval` and
    /// `keep_alive_timeout` (pings), window and frame sizes,
    /// `max_header_list_size`... The closure runs for every HTTP/2
    /// connection, after this server's own settings (a timer, the
    /// [`Executor`]), so what it sets wins; calling `http2` again adds
    /// another closure, run after the first.
    ///
    /// Leave `enable_connect_protocol` off: the server refuses upgrades
    /// (WebSockets) once draining only on HTTP/1.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let server = handover::http::Server::new().http2(|h2| {
    ///     h2.max_concurrent_streams(100)
    ///         .keep_alive_interval(Duration::from_secs(20))
    ///         .keep_alive_timeout(Duration::from_secs(10));
    /// });
    /// ```
    pub fn http2(
        mut self,
        settings: impl Fn(&mut http2::Builder<Executor>) + Send + Sync + 'static,
    ) -> Self {
        self.http2.push(Arc::new(settings));
        self
    }
}

impl Server {
    /// Runs the accept loop; see [`serve`]. The returned future is
    /// `'static`, so it can be spawned directly.
    ///
    /// # Errors
    ///
    /// As [`serve`](fn@serve).
    ///
    /// # Cancel safety
    ///
    /// As [`serve`](fn@serve).
    pub fn serve<L, A, K>(
        &self,
        listener: L,
        app: A,
        drain: Drain,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static
    where
        L: Listener,
        A: App<L::Addr, K>,
    {
        self.accept_loop(listener, Plain, app, drain)
    }

    /// Runs the accept loop like [`serve`](Self::serve), with a handshake
    /// on each connection before HTTP: TLS, typically. `acceptor` turns an
    /// accepted connection into the stream HTTP is spoken on; it runs in the
    /// connection's task, bounded by the [handshake
    /// timeout](Self::handshake_timeout), so a slow or failed handshake
    /// delays no other connection. A connection counts in the drain from its
    /// accept, handshake included; one still in its handshake when the drain
    /// starts finishes it and is then served by the rules in the [module
    /// docs](self). A failed or timed-out handshake closes the connection
    /// (logged at `debug`).
    ///
    /// # Errors
    ///
    /// As [`serve`](fn@serve); a failed handshake is not an error of the
    /// loop.
    ///
    /// # Cancel safety
    ///
    /// As [`serve`](fn@serve).
    ///
    /// # Example
    ///
    /// TLS with [tokio-rustls](https://docs.rs/tokio-rustls): the
    /// certificate is read at start-up, so an upgrade serves the files on
    /// disk at that moment (`examples/tls.rs` is a complete program).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    ///
    /// use axum::{routing::get, Router};
    /// use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    /// use tokio_rustls::rustls::ServerConfig;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let certs = CertificateDer::pem_file_iter("cert.pem")?.collect::<Result<Vec<_>, _>>()?;
    /// let key = PrivateKeyDer::from_pem_file("key.pem")?;
    /// let mut tls = ServerConfig::builder_with_provider(Arc::new(
    ///     tokio_rustls::rustls::crypto::ring::default_provider(),
    /// ))
    /// .with_safe_default_protocol_versions()?
    /// .with_no_client_auth()
    /// .with_single_cert(certs, key)?;
    /// tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    /// let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    ///
    /// let app = Router::new().route("/", get(|| async { "Welcome to the Home Page!\n" }));
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
    /// let trigger = handover::drain::DrainTrigger::new();
    /// handover::http::Server::new()
    ///     .serve_with(listener, move |tcp| tls.accept(tcp), app, trigger.watcher())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn serve_with<L, H, A, K>(
        &self,
        listener: L,
        acceptor: H,
        app: A,
        drain: Drain,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static
    where
        L: Listener,
        H: Acceptor<L::Io>,
        A: App<L::Addr, K>,
    {
        self.accept_loop(listener, acceptor, app, drain)
    }
}

/// The executor HTTP/2 connections run their streams on: `tokio::spawn`.
/// It appears only as the type parameter of the [`http2::Builder`] given to
/// [`Server::http2`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    use super::testing::{app, gate, grace, start, start_on, Raw, T};
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

    /// An axum `Router` is served as it is, as is its make-service, and so
    /// is one wrapped in hyper-util's `TowerToHyperService` (a hyper
    /// service); each follows the drain's rules.
    #[tokio::test]
    async fn serves_an_axum_router_in_every_form() {
        async fn check<K: 'static>(app: impl App<std::net::SocketAddr, K>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let trigger = DrainTrigger::new();
            let drain = trigger.watcher();
            tokio::spawn(serve(listener, app, drain.clone()));
            let mut c = Raw::connect(addr).await;
            let r = c.get("/").await;
            assert_eq!((r.status, r.close, r.body.as_str()), (200, false, "axum"));
            trigger.start(DrainReason::Stopped);
            let r = c.get("/").await;
            assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "axum"));
            c.expect_eof().await;
            timeout(T, drain.idle()).await.unwrap();
        }
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "axum" }));
        check(app.clone()).await;
        check(app.clone().into_make_service()).await;
        check(hyper_util::service::TowerToHyperService::new(app)).await;
    }

    /// A make-service is called once per connection with the peer's
    /// address: axum's `ConnectInfo` sees each client's own address.
    #[tokio::test]
    async fn connect_info_is_the_peer_address() {
        use axum::extract::ConnectInfo;
        use std::net::SocketAddr;

        let app = axum::Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.to_string()
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        tokio::spawn(serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
            drain.clone(),
        ));
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut c = Raw::connect(addr).await;
            let me = c.local_addr();
            for _ in 0..2 {
                let r = c.get("/peer").await;
                assert_eq!((r.status, r.body), (200, me.to_string()));
            }
            clients.push(c);
        }
        trigger.start(DrainReason::Stopped);
        for mut c in clients {
            let me = c.local_addr();
            let r = c.get("/peer").await;
            assert_eq!((r.status, r.close, r.body), (200, true, me.to_string()));
            c.expect_eof().await;
        }
        timeout(T, drain.idle()).await.unwrap();
    }

    /// A make-service of one's own (tower's `Service<SocketAddr>`): called
    /// once per connection; a connection it fails for is closed without an
    /// answer and leaves the drain, the next one is served.
    #[tokio::test]
    async fn make_service_runs_once_per_connection_and_may_fail() {
        use std::net::SocketAddr;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::{Context, Poll};

        #[derive(Clone)]
        struct Make {
            calls: Arc<AtomicUsize>,
            greeting: axum::Router,
        }
        impl tower_service::Service<SocketAddr> for Make {
            type Response = axum::Router;
            type Error = std::io::Error;
            type Future = std::future::Ready<Result<axum::Router, std::io::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _peer: SocketAddr) -> Self::Future {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                std::future::ready(if n == 2 {
                    Err(std::io::Error::other("the second connection is refused"))
                } else {
                    Ok(self.greeting.clone())
                })
            }
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let make = Make {
            calls: calls.clone(),
            greeting: axum::Router::new().route("/", axum::routing::get(|| async { "made" })),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        tokio::spawn(serve(listener, make, drain.clone()));
        let mut first = Raw::connect(addr).await;
        for _ in 0..3 {
            assert_eq!(first.get("/").await.body, "made");
        }
        let mut refused = Raw::connect(addr).await;
        refused.expect_eof().await;
        let mut third = Raw::connect(addr).await;
        assert_eq!(third.get("/").await.body, "made");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "one call per connection");
        assert_eq!(
            drain.in_flight(),
            2,
            "the refused connection left the drain"
        );
    }

    /// hyper's HTTP/1 settings reach hyper: too many headers get 431.
    #[tokio::test]
    async fn http1_settings_are_applied() {
        let (g, _) = gate();
        let server = grace(1_000).http1(|h1| {
            h1.max_headers(8);
        });
        let s = start(server, app("hello", g)).await;
        let mut c = Raw::connect(s.addr).await;
        assert_eq!(c.get("/").await.status, 200);
        let mut c = Raw::connect(s.addr).await;
        let headers: String = (0..20).map(|i| format!("X-{i}: {i}\r\n")).collect();
        c.write(format!("GET / HTTP/1.1\r\nHost: t\r\n{headers}\r\n").as_bytes())
            .await;
        assert_eq!(c.read().await.unwrap().unwrap().status, 431);
    }

    /// hyper's HTTP/2 settings reach hyper: with keep-alive pings on, a
    /// client that never answers them is closed.
    #[tokio::test]
    async fn http2_settings_are_applied() {
        let (g, _) = gate();
        let server = grace(1_000).http2(|h2| {
            h2.keep_alive_interval(Duration::from_millis(100))
                .keep_alive_timeout(Duration::from_millis(100));
        });
        let s = start(server, app("hello", g)).await;
        // The preface and an empty SETTINGS frame, then silence: no
        // SETTINGS ACK, no PING answer.
        let mut silent = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        silent
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let t0 = tokio::time::Instant::now();
        let mut frames = Vec::new();
        timeout(T, silent.read_to_end(&mut frames))
            .await
            .expect("closed for not answering pings")
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(100));
        // A PING frame (type 6) was among what the server sent.
        let mut at = 0;
        let mut types = Vec::new();
        while at + 9 <= frames.len() {
            let len = u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]) as usize;
            types.push(frames[at + 3]);
            at += 9 + len;
        }
        assert!(types.contains(&6), "frame types sent: {types:?}");
        s.idle().await;
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
