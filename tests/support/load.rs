//! A raw HTTP/1.1 load client for integration tests: std only, one thread
//! per client, so a test needs no async runtime to drive it.
//!
//! Include it with `#[path = "support/load.rs"] mod load;`.
//!
//! ```ignore
//! let load = load::Load::start(addr, load::LoadConfig { keepalive_clients: 8, ..Default::default() });
//! assert!(load.wait_for_ok(100, Duration::from_secs(10)));
//! // ... reload the server ...
//! let report = load.stop();
//! report.assert_no_errors();
//! ```
//!
//! With [`LoadConfig::connector`] each connection is wrapped before HTTP is
//! spoken on it (a TLS client); a wrapping that fails counts as an error.
//!
//! A keep-alive client keeps one connection and sends `GET` after `GET` on
//! it, back to back; a response with `Connection: close` makes it reconnect
//! (not an error). A per-request client opens a new connection for each
//! request, sends `Connection: close`, and expects the server to close after
//! the response. Everything else is an error, counted by [`ErrorKind`].
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// How many error samples each client keeps, and the report.
const SAMPLES_PER_CLIENT: usize = 8;
const SAMPLES: usize = 20;
/// Distinct bodies remembered (per client and in the report).
const DISTINCT_BODIES: usize = 16;
/// Bodies are remembered up to this many bytes.
const BODY_PREFIX: usize = 256;
/// Latencies kept per client (about 16 MB at most).
const LATENCIES_PER_CLIENT: usize = 1_000_000;
/// Longest status or header line accepted.
const MAX_LINE: usize = 16 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Clients that keep their connection open between requests.
    pub keepalive_clients: usize,
    /// Clients that open a connection per request (`Connection: close`).
    pub per_request_clients: usize,
    /// The request path.
    pub path: String,
    /// The `Host` header.
    pub host: String,
    /// Connect, read and write timeout of each socket operation.
    pub io_timeout: Duration,
    /// The clients stop by themselves after this long, even if `stop` is
    /// never called.
    pub max_duration: Duration,
    /// The clients stop by themselves after this many requests each.
    pub max_requests_per_client: Option<u64>,
    /// Pause after a failed connect, so a server that is gone does not turn
    /// the client into a busy loop.
    pub connect_error_pause: Duration,
    /// Wraps each new connection (its timeouts set) before the first
    /// request: a TLS handshake, say. `None`: plain HTTP.
    pub connector: Option<Connector>,
}

/// A connection as the clients use it: plain TCP or a TLS stream over it.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// See [`LoadConfig::connector`].
#[derive(Clone)]
pub struct Connector(pub Arc<dyn Fn(TcpStream) -> io::Result<Box<dyn Stream>> + Send + Sync>);

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            keepalive_clients: 8,
            per_request_clients: 0,
            path: "/".into(),
            host: "localhost".into(),
            io_timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(120),
            max_requests_per_client: None,
            connect_error_pause: Duration::from_millis(10),
            connector: None,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The connection was refused (nothing listening).
    Refused,
    /// Connecting failed otherwise (including a connect timeout).
    Connect,
    /// The connection was reset, or writing hit a closed connection.
    Reset,
    /// The server closed the connection before sending any byte of the
    /// response: the keep-alive race.
    EofBeforeResponse,
    /// The server closed the connection in the middle of a response.
    EofMidResponse,
    /// A read or write timed out.
    Timeout,
    /// The response status was not 2xx.
    Status,
    /// The response could not be parsed, or the server did not close after
    /// answering a `Connection: close` request.
    Malformed,
    /// Any other IO error.
    Io,
}

/// One error, for debugging.
#[derive(Debug, Clone)]
pub struct ErrorSample {
    /// Index of the client in [`LoadReport::clients`].
    pub client: usize,
    pub kind: ErrorKind,
    /// Since the load started.
    pub at: Duration,
    /// Wall clock, to match server logs.
    pub wall: SystemTime,
    pub message: String,
}

/// The two kinds of client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    KeepAlive,
    PerRequest,
}

/// What one client saw.
#[derive(Debug, Clone)]
pub struct ClientReport {
    pub kind: ClientKind,
    /// Requests answered 2xx, completely.
    pub ok: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Connections opened.
    pub connections: u64,
    /// Keep-alive responses that carried `Connection: close`.
    pub server_closes: u64,
    /// The body of the last 2xx response (its first 256 bytes, lossy UTF-8).
    pub last_body: Option<String>,
}

impl ClientReport {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A distinct response body (its first 256 bytes, lossy UTF-8).
#[derive(Debug, Clone)]
pub struct BodySeen {
    pub body: String,
    /// 2xx responses with this body.
    pub count: u64,
    /// First and last time it was received, since the load started.
    pub first_at: Duration,
    pub last_at: Duration,
}

/// What the load saw, once stopped.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub elapsed: Duration,
    /// Requests answered 2xx, completely.
    pub ok: u64,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// The first errors in time (at most 20).
    pub first_errors: Vec<ErrorSample>,
    pub clients: Vec<ClientReport>,
    /// Latency of each 2xx request (request written to response read), in
    /// no particular order.
    pub latencies: Vec<Duration>,
    pub max_latency: Duration,
    /// The first 16 distinct bodies, in the order they first appeared.
    pub bodies: Vec<BodySeen>,
    /// Clients that did not finish within the stop deadline.
    pub stuck_clients: usize,
}

impl LoadReport {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The `p`-th percentile (0.0..=100.0) of the latencies.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut l = self.latencies.clone();
        l.sort_unstable();
        let i = ((p / 100.0) * (l.len() - 1) as f64).round() as usize;
        l[i.min(l.len() - 1)]
    }

    /// Panics with the report if any request failed or a client got stuck.
    #[track_caller]
    pub fn assert_no_errors(&self) {
        assert!(
            self.errors_total() == 0 && self.stuck_clients == 0,
            "load saw errors:\n{self}"
        );
    }

    /// The body seen, by its text.
    pub fn body(&self, text: &str) -> Option<&BodySeen> {
        self.bodies.iter().find(|b| b.body == text)
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ok, {} errors {:?} in {:.2?} ({} clients, {} stuck); latency p50 {:.2?} p99 {:.2?} max {:.2?}",
            self.ok,
            self.errors_total(),
            self.errors,
            self.elapsed,
            self.clients.len(),
            self.stuck_clients,
            self.percentile(50.0),
            self.percentile(99.0),
            self.max_latency,
        )?;
        for (i, c) in self.clients.iter().enumerate() {
            writeln!(
                f,
                "  client {i} {:?}: {} ok, {} errors, {} connections, {} closes by server, last body {:?}",
                c.kind,
                c.ok,
                c.errors_total(),
                c.connections,
                c.server_closes,
                c.last_body
            )?;
        }
        for b in &self.bodies {
            writeln!(
                f,
                "  body {:?}: {} times, {:.2?}..{:.2?}",
                b.body, b.count, b.first_at, b.last_at
            )?;
        }
        for e in &self.first_errors {
            writeln!(
                f,
                "  error at {:.3?} (client {}): {:?}: {}",
                e.at, e.client, e.kind, e.message
            )?;
        }
        Ok(())
    }
}

/// Counters shared with the client threads.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
    waiters: AtomicUsize,
    progress: Mutex<()>,
    progressed: Condvar,
}

impl Shared {
    fn progress(&self, ok: bool) {
        if ok {
            self.ok.fetch_add(1, Ordering::SeqCst);
        } else {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.progress.lock().unwrap();
            self.progressed.notify_all();
        }
    }
}

/// A running load; see the module docs.
pub struct Load {
    shared: Arc<Shared>,
    results: mpsc::Receiver<(usize, Client)>,
    threads: Vec<Option<thread::JoinHandle<()>>>,
    started: Instant,
    io_timeout: Duration,
}

impl Load {
    /// Starts the clients against `addr`.
    pub fn start(addr: SocketAddr, cfg: LoadConfig) -> Load {
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let (tx, results) = mpsc::channel();
        let kinds = std::iter::repeat_n(ClientKind::KeepAlive, cfg.keepalive_clients).chain(
            std::iter::repeat_n(ClientKind::PerRequest, cfg.per_request_clients),
        );
        let threads = kinds
            .enumerate()
            .map(|(id, kind)| {
                let mut client = Client::new(id, kind, addr, &cfg, shared.clone(), started);
                let tx = tx.clone();
                let t = thread::Builder::new()
                    .name(format!("load-{id}"))
                    .spawn(move || {
                        client.run();
                        let _ = tx.send((id, client));
                    })
                    .expect("spawn a load client thread");
                Some(t)
            })
            .collect();
        Load {
            shared,
            results,
            threads,
            started,
            io_timeout: cfg.io_timeout,
        }
    }

    /// 2xx requests so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::SeqCst)
    }

    /// Failed requests so far.
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests succeeded in all; false on timeout.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, |ok, _| ok >= n)
    }

    /// Waits until `done(ok, errors)` holds for the totals so far (checked
    /// after every request); false on timeout.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(u64, u64) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        self.shared.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = self.shared.progress.lock().unwrap();
        let reached = loop {
            if done(self.ok(), self.errors()) {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            g = self
                .shared
                .progressed
                .wait_timeout(g, deadline - now)
                .unwrap()
                .0;
        };
        drop(g);
        self.shared.waiters.fetch_sub(1, Ordering::SeqCst);
        reached
    }

    /// Stops the clients (each finishes its current request), joins them,
    /// and reports. Bounded: a client still blocked after twice the IO
    /// timeout is left behind and counted in `stuck_clients`.
    pub fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.io_timeout * 2 + Duration::from_secs(1);
        let mut clients: Vec<Option<Client>> = (0..self.threads.len()).map(|_| None).collect();
        let mut pending = self.threads.len();
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results.recv_timeout(left) {
                Ok((id, c)) => {
                    if let Some(t) = self.threads[id].take() {
                        let _ = t.join();
                    }
                    clients[id] = Some(c);
                    pending -= 1;
                }
                // Timed out, or a thread panicked (its sender is gone).
                Err(_) => break,
            }
        }
        let elapsed = self.started.elapsed();
        let stuck_clients = clients.iter().filter(|c| c.is_none()).count();
        let clients: Vec<Client> = clients.into_iter().flatten().collect();

        let mut errors = BTreeMap::new();
        let mut first_errors = Vec::new();
        let mut latencies = Vec::new();
        let mut bodies: Vec<BodySeen> = Vec::new();
        let mut reports = Vec::new();
        for c in clients {
            for (k, n) in &c.report.errors {
                *errors.entry(*k).or_insert(0) += n;
            }
            first_errors.extend(c.samples);
            latencies.extend(c.latencies);
            for b in c.bodies {
                let text = String::from_utf8_lossy(&b.body).into_owned();
                match bodies.iter_mut().find(|s| s.body == text) {
                    Some(s) => {
                        s.count += b.count;
                        s.first_at = s.first_at.min(b.first_at);
                        s.last_at = s.last_at.max(b.last_at);
                    }
                    None => bodies.push(BodySeen {
                        body: text,
                        count: b.count,
                        first_at: b.first_at,
                        last_at: b.last_at,
                    }),
                }
            }
            reports.push(c.report);
        }
        first_errors.sort_by_key(|e| e.at);
        first_errors.truncate(SAMPLES);
        bodies.sort_by_key(|b| b.first_at);
        bodies.truncate(DISTINCT_BODIES);
        LoadReport {
            elapsed,
            ok: reports.iter().map(|c| c.ok).sum(),
            errors,
            first_errors,
            max_latency: latencies.iter().copied().max().unwrap_or_default(),
            latencies,
            clients: reports,
            bodies,
            stuck_clients,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A test that panics before `stop` still ends its clients.
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

struct Body {
    body: Vec<u8>,
    count: u64,
    first_at: Duration,
    last_at: Duration,
}

/// One client thread's state.
struct Client {
    id: usize,
    addr: SocketAddr,
    request: Vec<u8>,
    io_timeout: Duration,
    max_duration: Duration,
    max_requests: u64,
    connect_error_pause: Duration,
    connector: Option<Connector>,
    shared: Arc<Shared>,
    started: Instant,
    report: ClientReport,
    samples: Vec<ErrorSample>,
    latencies: Vec<Duration>,
    bodies: Vec<Body>,
}

/// A failed request.
struct Fail {
    kind: ErrorKind,
    message: String,
}

impl Fail {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Fail {
        Fail {
            kind,
            message: message.into(),
        }
    }

    fn io(what: &str, e: io::Error) -> Fail {
        let kind = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorKind::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
            io::ErrorKind::UnexpectedEof => ErrorKind::EofMidResponse,
            _ => ErrorKind::Io,
        };
        Fail::new(kind, format!("{what}: {e}"))
    }
}

/// A parsed response.
struct Reply {
    status: u16,
    close: bool,
    body: Vec<u8>,
}

impl Client {
    fn new(
        id: usize,
        kind: ClientKind,
        addr: SocketAddr,
        cfg: &LoadConfig,
        shared: Arc<Shared>,
        started: Instant,
    ) -> Client {
        let close = match kind {
            ClientKind::KeepAlive => "",
            ClientKind::PerRequest => "Connection: close\r\n",
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: handover-load\r\n{close}\r\n",
            cfg.path, cfg.host
        );
        Client {
            id,
            addr,
            request: request.into_bytes(),
            io_timeout: cfg.io_timeout,
            max_duration: cfg.max_duration,
            max_requests: cfg.max_requests_per_client.unwrap_or(u64::MAX),
            connect_error_pause: cfg.connect_error_pause,
            connector: cfg.connector.clone(),
            shared,
            started,
            report: ClientReport {
                kind,
                ok: 0,
                errors: BTreeMap::new(),
                connections: 0,
                server_closes: 0,
                last_body: None,
            },
            samples: Vec::new(),
            latencies: Vec::new(),
            bodies: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut conn: Option<BufReader<Box<dyn Stream>>> = None;
        let mut sent = 0;
        while !self.shared.stop.load(Ordering::Relaxed)
            && sent < self.max_requests
            && self.started.elapsed() < self.max_duration
        {
            let c = match conn.take() {
                Some(c) => c,
                None => match self.connect() {
                    Ok(c) => c,
                    Err(f) => {
                        self.fail(f);
                        thread::sleep(self.connect_error_pause);
                        continue;
                    }
                },
            };
            sent += 1;
            conn = self.exchange(c);
        }
    }

    fn connect(&mut self) -> Result<BufReader<Box<dyn Stream>>, Fail> {
        let s = TcpStream::connect_timeout(&self.addr, self.io_timeout).map_err(|e| {
            let kind = match e.kind() {
                io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
                _ => ErrorKind::Connect,
            };
            Fail::new(kind, format!("connect: {e}"))
        })?;
        self.report.connections += 1;
        let setup = s
            .set_read_timeout(Some(self.io_timeout))
            .and_then(|()| s.set_write_timeout(Some(self.io_timeout)))
            .and_then(|()| s.set_nodelay(true));
        setup.map_err(|e| Fail::io("socket options", e))?;
        let s: Box<dyn Stream> = match &self.connector {
            None => Box::new(s),
            Some(Connector(wrap)) => wrap(s).map_err(|e| Fail::io("handshake", e))?,
        };
        Ok(BufReader::new(s))
    }

    /// One request on `conn`; returns the connection if it may be reused.
    fn exchange(
        &mut self,
        mut conn: BufReader<Box<dyn Stream>>,
    ) -> Option<BufReader<Box<dyn Stream>>> {
        let t0 = Instant::now();
        let result = conn
            .get_mut()
            .write_all(&self.request)
            .map_err(|e| Fail::io("write request", e))
            .and_then(|()| read_response(&mut conn));
        let latency = t0.elapsed();
        let reply = match result {
            Ok(r) => r,
            Err(f) => {
                self.fail(f);
                return None;
            }
        };
        let keepalive = self.report.kind == ClientKind::KeepAlive;
        if !(200..300).contains(&reply.status) {
            let body = String::from_utf8_lossy(&reply.body[..reply.body.len().min(BODY_PREFIX)]);
            self.fail(Fail::new(
                ErrorKind::Status,
                format!("status {}: {body:?}", reply.status),
            ));
        } else if !keepalive && !reply.close {
            self.fail(Fail::new(
                ErrorKind::Malformed,
                "no `Connection: close` in the answer to a `Connection: close` request",
            ));
        } else {
            self.succeed(latency, &reply.body);
        }
        if keepalive {
            if reply.close {
                self.report.server_closes += 1;
                return None;
            }
            return Some(conn);
        }
        // Per request: the server must close now. Waiting for its FIN (rather
        // than closing first) leaves TIME_WAIT on the server's side, so
        // the client does not run out of ephemeral ports.
        let mut rest = [0u8; 64];
        match conn.read(&mut rest) {
            Ok(0) => {}
            Ok(n) => self.fail(Fail::new(
                ErrorKind::Malformed,
                format!(
                    "{n} bytes after a `Connection: close` response: {:?}",
                    String::from_utf8_lossy(&rest[..n])
                ),
            )),
            Err(e) => self.fail(Fail::io("wait for close after response", e)),
        }
        None
    }

    fn succeed(&mut self, latency: Duration, body: &[u8]) {
        self.report.ok += 1;
        if self.latencies.len() < LATENCIES_PER_CLIENT {
            self.latencies.push(latency);
        }
        let at = self.started.elapsed();
        let key = &body[..body.len().min(BODY_PREFIX)];
        if let Some(b) = self.bodies.iter_mut().find(|b| b.body == key) {
            b.count += 1;
            b.last_at = at;
        } else if self.bodies.len() < DISTINCT_BODIES {
            self.bodies.push(Body {
                body: key.to_vec(),
                count: 1,
                first_at: at,
                last_at: at,
            });
        }
        let changed = self.report.last_body.as_deref().map(str::as_bytes) != Some(key);
        if changed {
            self.report.last_body = Some(String::from_utf8_lossy(key).into_owned());
        }
        self.shared.progress(true);
    }

    fn fail(&mut self, f: Fail) {
        *self.report.errors.entry(f.kind).or_insert(0) += 1;
        if self.samples.len() < SAMPLES_PER_CLIENT {
            self.samples.push(ErrorSample {
                client: self.id,
                kind: f.kind,
                at: self.started.elapsed(),
                wall: SystemTime::now(),
                message: f.message,
            });
        }
        self.shared.progress(false);
    }
}

/// Reads one line (up to and including `\n`), bounded.
fn read_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    line.clear();
    let n = Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', line)?;
    if n > 0 && !line.ends_with(b"\n") {
        if n == MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(n)
}

fn read_response(r: &mut impl BufRead) -> Result<Reply, Fail> {
    let mut line = Vec::new();
    loop {
        let n = read_line(r, &mut line).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => Fail::new(ErrorKind::Malformed, "status line too long"),
            _ => Fail::io("read status line", e),
        })?;
        if n == 0 {
            return Err(Fail::new(
                ErrorKind::EofBeforeResponse,
                "connection closed before any byte of the response",
            ));
        }
        let text = String::from_utf8_lossy(&line);
        let mut parts = text.trim_end().splitn(3, ' ');
        let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let status: u16 = match (version.starts_with("HTTP/1."), code.parse()) {
            (true, Ok(s)) if (100..600).contains(&s) => s,
            _ => {
                return Err(Fail::new(
                    ErrorKind::Malformed,
                    format!("bad status line {text:?}"),
                ))
            }
        };
        let http10 = version == "HTTP/1.0";
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut close = http10;
        loop {
            let n = read_line(r, &mut line).map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => Fail::new(ErrorKind::Malformed, "header too long"),
                io::ErrorKind::UnexpectedEof => Fail::new(
                    ErrorKind::EofMidResponse,
                    "connection closed in the headers",
                ),
                _ => Fail::io("read headers", e),
            })?;
            if n == 0 {
                return Err(Fail::new(
                    ErrorKind::EofMidResponse,
                    "connection closed in the headers",
                ));
            }
            let h = String::from_utf8_lossy(&line);
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                return Err(Fail::new(ErrorKind::Malformed, format!("bad header {h:?}")));
            };
            let (name, value) = (
                name.trim().to_ascii_lowercase(),
                value.trim().to_ascii_lowercase(),
            );
            match name.as_str() {
                "content-length" => {
                    length = Some(value.parse().map_err(|_| {
                        Fail::new(
                            ErrorKind::Malformed,
                            format!("bad content-length {value:?}"),
                        )
                    })?)
                }
                "transfer-encoding" => chunked = value.split(',').any(|v| v.trim() == "chunked"),
                "connection" => {
                    for token in value.split(',').map(str::trim) {
                        match token {
                            "close" => close = true,
                            "keep-alive" if http10 => close = false,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if (100..200).contains(&status) && status != 101 {
            continue; // an interim response; the real one follows
        }
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            read_chunked(r)?
        } else if let Some(len) = length {
            let mut body = Vec::new();
            let got = Read::take(&mut *r, len)
                .read_to_end(&mut body)
                .map_err(|e| Fail::io("read body", e))?;
            if (got as u64) < len {
                return Err(Fail::new(
                    ErrorKind::EofMidResponse,
                    format!("connection closed after {got} of {len} body bytes"),
                ));
            }
            body
        } else {
            // Delimited by the end of the connection.
            close = true;
            let mut body = Vec::new();
            r.read_to_end(&mut body)
                .map_err(|e| Fail::io("read body to EOF", e))?;
            body
        };
        return Ok(Reply {
            status,
            close,
            body,
        });
    }
}

fn read_chunked(r: &mut impl BufRead) -> Result<Vec<u8>, Fail> {
    let eof = |what: &str| {
        Fail::new(
            ErrorKind::EofMidResponse,
            format!("connection closed in {what}"),
        )
    };
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        if read_line(r, &mut line).map_err(|e| Fail::io("read chunk size", e))? == 0 {
            return Err(eof("a chunk size"));
        }
        let text = String::from_utf8_lossy(&line);
        let size = text.trim_end().split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| Fail::new(ErrorKind::Malformed, format!("bad chunk size {text:?}")))?;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                if read_line(r, &mut line).map_err(|e| Fail::io("read trailers", e))? == 0 {
                    return Err(eof("the trailers"));
                }
                if line == b"\r\n" || line == b"\n" {
                    return Ok(body);
                }
            }
        }
        let got = Read::take(&mut *r, size)
            .read_to_end(&mut body)
            .map_err(|e| Fail::io("read chunk", e))?;
        if (got as u64) < size {
            return Err(eof("a chunk"));
        }
        if read_line(r, &mut line).map_err(|e| Fail::io("read chunk end", e))? == 0 {
            return Err(eof("a chunk end"));
        }
        if line != b"\r\n" && line != b"\n" {
            return Err(Fail::new(
                ErrorKind::Malformed,
                "chunk not followed by CRLF",
            ));
        }
    }
}
