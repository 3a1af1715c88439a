//! What the HTTP tests share: an app whose handler can be held, a server on
//! a fresh port, and a raw HTTP/1.1 client that shows exactly what goes over
//! the wire.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::Server;
use crate::drain::{Drain, DrainReason, DrainSignal, DrainTrigger};

pub(super) const T: Duration = Duration::from_secs(10);

/// Lets a test hold requests to `/gate` inside the handler, and counts the
/// upgrade requests the application saw.
#[derive(Clone)]
pub(super) struct Gate {
    pub(super) entered: mpsc::UnboundedSender<()>,
    pub(super) open: Arc<Semaphore>,
    pub(super) upgrade_requests: Arc<AtomicUsize>,
}

pub(super) fn gate() -> (Gate, mpsc::UnboundedReceiver<()>) {
    let (entered, rx) = mpsc::unbounded_channel();
    (
        Gate {
            entered,
            open: Arc::new(Semaphore::new(0)),
            upgrade_requests: Arc::new(AtomicUsize::new(0)),
        },
        rx,
    )
}

type TestBody = BoxBody<Bytes, Infallible>;

pub(super) type ResponseFut =
    Pin<Box<dyn Future<Output = Result<Response<TestBody>, Infallible>> + Send>>;

/// `/` answers the greeting, `/gate` waits for the gate, `/echo` echoes
/// the request body. Long-lived work, which ends on the drain signal unless
/// the query is `?stubborn`: `/upgrade` upgrades to a raw protocol that says
/// `upgraded\n`, then `bye\n` when the drain starts and closes; `/stream`
/// sends `tick\n` every 20 ms and ends when the drain starts.
#[derive(Clone)]
pub(super) struct App {
    greeting: &'static str,
    gate: Gate,
}

pub(super) fn app(greeting: &'static str, gate: Gate) -> App {
    App { greeting, gate }
}

impl Service<Request<Incoming>> for App {
    type Response = Response<TestBody>;
    type Error = Infallible;
    type Future = ResponseFut;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let App { greeting, gate } = self.clone();
        let signal = req
            .extensions()
            .get::<DrainSignal>()
            .cloned()
            .expect("the server hands every request the drain signal");
        let stubborn = req.uri().query() == Some("stubborn");
        Box::pin(async move {
            let body = match req.uri().path() {
                "/gate" => {
                    let _ = gate.entered.send(());
                    gate.open.acquire().await.unwrap().forget();
                    Bytes::from_static(b"released")
                }
                "/echo" => req.into_body().collect().await.unwrap().to_bytes(),
                "/upgrade" => return Ok(upgrade(&mut req, gate, signal, stubborn)),
                "/stream" => return Ok(stream(signal, stubborn)),
                _ => Bytes::from_static(greeting.as_bytes()),
            };
            Ok(Response::new(Full::new(body).boxed()))
        })
    }
}

fn upgrade(
    req: &mut Request<Incoming>,
    gate: Gate,
    signal: DrainSignal,
    stubborn: bool,
) -> Response<TestBody> {
    gate.upgrade_requests.fetch_add(1, Ordering::SeqCst);
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let _ = io.write_all(b"upgraded\n").await;
        if stubborn {
            // Holds the connection until the client closes it.
            let _ = io.read_to_end(&mut Vec::new()).await;
            return;
        }
        signal.draining().await;
        let _ = io.write_all(b"bye\n").await;
        let _ = io.shutdown().await;
    });
    let mut res = Response::new(Full::new(Bytes::new()).boxed());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    res.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    res.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("test"));
    res
}

fn stream(signal: DrainSignal, stubborn: bool) -> Response<TestBody> {
    let ticks = futures_util::stream::unfold(signal, move |signal| async move {
        if stubborn {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else {
            tokio::select! {
                _ = signal.draining() => return None,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let tick = Frame::data(Bytes::from_static(b"tick\n"));
        Some((Ok::<_, Infallible>(tick), signal))
    });
    Response::new(StreamBody::new(ticks).boxed())
}

pub(super) struct Running {
    pub(super) addr: SocketAddr,
    pub(super) drain: Drain,
    trigger: DrainTrigger,
    accept_loop: JoinHandle<io::Result<()>>,
}

pub(super) async fn start_on(server: Server, listener: TcpListener, app: App) -> Running {
    let addr = listener.local_addr().unwrap();
    let trigger = DrainTrigger::new();
    let drain = trigger.watcher();
    let accept_loop = tokio::spawn(server.serve(listener, app, drain.clone()));
    Running {
        addr,
        drain,
        trigger,
        accept_loop,
    }
}

pub(super) async fn start(server: Server, app: App) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(server, listener, app).await
}

impl Running {
    /// Starts the drain and checks the accept loop stops.
    pub(super) async fn drain(&mut self) {
        assert!(self.trigger.start(DrainReason::Upgraded));
        timeout(T, &mut self.accept_loop)
            .await
            .expect("accept loop stops")
            .unwrap()
            .unwrap();
    }

    pub(super) async fn wait_accepted(&self, n: usize) {
        timeout(T, async {
            while self.drain.in_flight() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("connection accepted");
    }

    pub(super) async fn idle(&self) {
        timeout(T, self.drain.idle())
            .await
            .expect("all connections closed");
    }
}

#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) close: bool,
    pub(super) body: String,
    /// Header lines, lowercased, as `name: value`.
    pub(super) headers: Vec<String>,
}

/// A minimal raw HTTP/1.1 client, to see exactly what goes over the wire.
pub(super) struct Raw {
    io: BufReader<TcpStream>,
}

impl Raw {
    pub(super) async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            io: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    /// The client's own address, as the server sees it.
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.io.get_ref().local_addr().unwrap()
    }

    pub(super) async fn write(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
    }

    pub(super) async fn send(&mut self, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.write(req.as_bytes()).await;
    }

    /// Reads one response; `Ok(None)` on EOF before any byte of it.
    pub(super) async fn read(&mut self) -> io::Result<Option<Reply>> {
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
            let (mut len, mut close, mut headers) = (0, false, Vec::new());
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
                headers.push(l);
            }
            let mut body = vec![0; len];
            self.io.read_exact(&mut body).await?;
            Ok(Some(Reply {
                status,
                close,
                body: String::from_utf8(body).unwrap(),
                headers,
            }))
        })
        .await
        .expect("response within the test timeout")
    }

    pub(super) async fn get(&mut self, path: &str) -> Reply {
        self.send(path).await;
        self.read().await.unwrap().expect("a response")
    }

    /// Reads one line (after a response head: bytes of an upgraded
    /// protocol or of a chunked body); empty at EOF.
    pub(super) async fn line(&mut self) -> String {
        let mut line = String::new();
        timeout(T, self.io.read_line(&mut line))
            .await
            .expect("a line within the test timeout")
            .unwrap();
        line
    }

    /// Asserts the server closed the connection with nothing more to say.
    pub(super) async fn expect_eof(&mut self) {
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

/// The default options with an idle grace of `ms` milliseconds.
pub(super) fn grace(ms: u64) -> Server {
    Server::new().idle_grace(Duration::from_millis(ms))
}
