//! A per-connection handshake before HTTP: TLS with tokio-rustls or
//! tokio-native-tls, or anything else that turns the accepted stream into
//! another one (a PROXY protocol header, say). It runs in the connection's
//! own task, never in the accept loop, bounded by
//! [`Server::handshake_timeout`](super::Server::handshake_timeout): a slow
//! or failed handshake delays no other connection, and a connection counts
//! in the drain from its accept, handshake included.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// Turns an accepted connection into the stream HTTP is spoken on, for
/// [`Server::serve_with`](super::Server::serve_with).
///
/// Implemented for every `Fn(Io) -> impl Future<Output = io::Result<T>>`
/// that is `Send + Sync + 'static` (its future `Send + 'static`), such as
/// `move |tcp| tls.accept(tcp)` with a `tokio_rustls::TlsAcceptor`.
pub trait Acceptor<Io>: Send + Sync + 'static {
    /// The stream after the handshake.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The handshake.
    type Future: Future<Output = io::Result<Self::Stream>> + Send + 'static;

    /// Starts the handshake on a newly accepted connection.
    fn accept(&self, io: Io) -> Self::Future;
}

impl<Io, F, Fut, T> Acceptor<Io> for F
where
    F: Fn(Io) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<T>> + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = T;
    type Future = Fut;

    fn accept(&self, io: Io) -> Fut {
        self(io)
    }
}

/// No handshake: HTTP on the accepted stream itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plain;

impl<Io> Acceptor<Io> for Plain
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Io;
    type Future = std::future::Ready<io::Result<Io>>;

    fn accept(&self, io: Io) -> Self::Future {
        std::future::ready(Ok(io))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::{timeout, Instant};

    use super::*;
    use crate::drain::{Drain, DrainReason, DrainTrigger};
    use crate::http::testing::{app, gate, grace, Raw, T};
    use crate::http::Server;

    /// A toy handshake: the client says `HELLO\n` first.
    async fn hello(mut io: TcpStream) -> io::Result<TcpStream> {
        let mut said = [0; 6];
        io.read_exact(&mut said).await?;
        if &said != b"HELLO\n" {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no hello"));
        }
        Ok(io)
    }

    async fn start(server: Server) -> (std::net::SocketAddr, DrainTrigger, Drain) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        let (g, _) = gate();
        tokio::spawn(server.serve_with(listener, hello, app("hello", g), drain.clone()));
        (addr, trigger, drain)
    }

    /// A client that never finishes its handshake and one whose handshake
    /// fails delay nobody: the next client is served at once; the failed
    /// one is closed at once, the silent one at the handshake timeout.
    #[tokio::test]
    async fn slow_or_failed_handshakes_stall_no_one() {
        let (addr, _trigger, drain) =
            start(grace(5_000).handshake_timeout(Duration::from_millis(300))).await;
        let t0 = Instant::now();
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"HEL").await.unwrap();
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"NOPE!\n").await.unwrap();
        let mut good = Raw::connect(addr).await;
        good.write(b"HELLO\n").await;
        let r = good.get("/").await;
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        assert!(t0.elapsed() < Duration::from_millis(300), "served at once");
        let mut rest = Vec::new();
        timeout(T, bad.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        for mut c in [silent, slow] {
            timeout(T, c.read_to_end(&mut rest)).await.unwrap().unwrap();
            assert!(rest.is_empty());
        }
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(drain.in_flight(), 1, "only the served connection is left");
    }

    /// A connection in its handshake counts in the drain; when it finishes
    /// after the drain started, its request is served (with
    /// `Connection: close`), then it closes.
    #[tokio::test]
    async fn a_handshake_in_progress_counts_in_the_drain() {
        let (addr, trigger, drain) = start(grace(5_000)).await;
        let mut c = Raw::connect(addr).await;
        c.write(b"HEL").await;
        timeout(T, async {
            while drain.in_flight() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
        trigger.start(DrainReason::Upgraded);
        assert_eq!(drain.in_flight(), 1);
        c.write(b"LO\n").await;
        let r = c.get("/").await;
        assert_eq!((r.status, r.close, r.body.as_str()), (200, true, "hello"));
        c.expect_eof().await;
        timeout(T, drain.idle()).await.unwrap();
    }

    /// Real TLS with tokio-rustls, ALPN choosing HTTP/2 or HTTP/1.1, and a
    /// make-service: axum's `ConnectInfo` has the peer's address; the drain
    /// rules hold on both protocols.
    #[tokio::test]
    async fn tls_serves_both_protocols_with_connect_info() {
        use std::net::SocketAddr;

        use axum::extract::ConnectInfo;
        use bytes::Bytes;
        use http_body_util::{BodyExt, Empty};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use tokio_rustls::rustls::{self, pki_types::ServerName};

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let router = axum::Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.to_string()
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let trigger = DrainTrigger::new();
        let drain = trigger.watcher();
        tokio::spawn(Server::new().serve_with(
            listener,
            move |tcp| acceptor.accept(tcp),
            router.into_make_service_with_connect_info::<SocketAddr>(),
            drain.clone(),
        ));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let connect = |alpn: &'static [u8]| {
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let me = tcp.local_addr().unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                (me, connector.connect(name, tcp).await.unwrap())
            }
        };
        let get = || {
            hyper::Request::get("https://localhost/peer")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };

        let (me2, tls2) = connect(b"h2").await;
        assert_eq!(tls2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut h2, conn2) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls2))
                .await
                .unwrap();
        let conn2 = tokio::spawn(conn2);
        let (me1, tls1) = connect(b"http/1.1").await;
        let (mut h1, conn1) = hyper::client::conn::http1::handshake(TokioIo::new(tls1))
            .await
            .unwrap();
        let conn1 = tokio::spawn(conn1);
        let res = h2.send_request(get()).await.unwrap();
        assert_eq!(res.version(), hyper::Version::HTTP_2);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, me2.to_string());
        let res = h1.send_request(get()).await.unwrap();
        assert_eq!(res.version(), hyper::Version::HTTP_11);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, me1.to_string());

        trigger.start(DrainReason::Upgraded);
        // HTTP/1.1: the next request is answered, with `Connection: close`.
        let res = h1.send_request(get()).await.unwrap();
        assert_eq!(res.headers()["connection"], "close");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, me1.to_string());
        // HTTP/2: GOAWAY, the connection ends.
        timeout(T, conn2).await.unwrap().unwrap().unwrap();
        timeout(T, conn1).await.unwrap().unwrap().unwrap();
        timeout(T, drain.idle()).await.unwrap();
    }
}
