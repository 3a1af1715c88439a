//! Continuous HTTP/1.1 load from plain threads (no async runtime needed to drive it), with
//! the client and parser of [`crate::http`].
//!
//! ```ignore
//! let load = Load::start(addr, LoadConfig { keepalive_clients: 8, ..Default::default() });
//! load.assert_flows(100);
//! // ... upgrade the server ...
//! let report = load.stop();
//! report.assert_no_errors();
//! ```
//!
//! With [`LoadConfig::connector`] each connection is wrapped before HTTP is spoken on it (a TLS
//! client); a wrapping that fails counts as an error.
//!
//! A keep-alive client keeps one connection and sends `GET` after `GET` on it, back to back; a
//! response with `Connection: close` makes it reconnect (not an error). A per-request client
//! opens a new connection for each request, sends `Connection: close`, and expects the server to
//! close after the response. Everything else is an error, counted by [`ErrorKind`]; after one, a
//! client pauses ([`LoadConfig::error_pause`]) so that a server that is gone does not turn it
//! into a busy loop.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufReader, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::http::{connect, get_request, read_response, Fail, Stream};
pub use crate::http::{Connector, ErrorKind};
use crate::TIMEOUT;

/// How many error samples each client keeps, and the report.
const SAMPLES_PER_CLIENT: usize = 8;
const SAMPLES: usize = 20;
/// Distinct bodies remembered (per client and in the report).
const DISTINCT_BODIES: usize = 16;
/// Bodies are remembered up to this many bytes.
const BODY_PREFIX: usize = 256;
/// Latencies kept per client (about 16 MB at most).
const LATENCIES_PER_CLIENT: usize = 1_000_000;

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
    /// Pause after a failed request, so that a server that is gone does not turn the client
    /// into a busy loop.
    pub error_pause: Duration,
    /// Keep a [`Record`] of every request, for a caller that analyses each one (the
    /// benchmark); without it the report keeps counts, samples and latencies only.
    pub record_requests: bool,
    /// Wraps each new connection (its timeouts set) before the first request: a TLS
    /// handshake, say. `None`: plain HTTP.
    pub connector: Option<Connector>,
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
            error_pause: Duration::from_millis(10),
            record_requests: false,
            connector: None,
        }
    }
}

impl LoadConfig {
    /// `keepalive` clients of the one kind and `per_request` of the other, the rest as
    /// [`LoadConfig::default`].
    pub fn clients(keepalive: usize, per_request: usize) -> LoadConfig {
        LoadConfig {
            keepalive_clients: keepalive,
            per_request_clients: per_request,
            ..LoadConfig::default()
        }
    }
}

/// One request, with [`LoadConfig::record_requests`].
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// Nanoseconds since the load started: the request began (the connect for a new
    /// connection, else the write) ...
    pub start_ns: u64,
    /// ... and ended (the response read, or the failure).
    pub end_ns: u64,
    /// `Ok` for a complete 2xx answer.
    pub result: Result<(), ErrorKind>,
    /// The response carried `Connection: close`.
    pub close: bool,
    /// The request opened a new connection first.
    pub connected: bool,
}

/// One error, for debugging.
#[derive(Debug, Clone)]
pub struct ErrorSample {
    /// Index of the client in [`LoadReport::clients`].
    pub client: usize,
    /// How it failed.
    pub kind: ErrorKind,
    /// Since the load started.
    pub at: Duration,
    /// Wall clock, to match server logs.
    pub wall: SystemTime,
    /// What happened.
    pub message: String,
}

/// The two kinds of client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// One connection, request after request.
    KeepAlive,
    /// A new connection per request, `Connection: close`.
    PerRequest,
}

/// What one client saw.
#[derive(Debug, Clone)]
pub struct ClientReport {
    /// Which kind of client.
    pub kind: ClientKind,
    /// Requests answered 2xx, completely.
    pub ok: u64,
    /// Failed requests, by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Connections opened.
    pub connections: u64,
    /// Keep-alive responses that carried `Connection: close`.
    pub server_closes: u64,
    /// The body of the last 2xx response (its first 256 bytes, lossy UTF-8).
    pub last_body: Option<String>,
}

impl ClientReport {
    /// Failed requests.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A distinct response body (its first 256 bytes, lossy UTF-8).
#[derive(Debug, Clone)]
pub struct BodySeen {
    /// The body.
    pub body: String,
    /// 2xx responses with this body.
    pub count: u64,
    /// First time it was received, since the load started.
    pub first_at: Duration,
    /// Last time it was received.
    pub last_at: Duration,
}

/// What the load saw, once stopped.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// From the start of the load to its stop.
    pub elapsed: Duration,
    /// Requests answered 2xx, completely.
    pub ok: u64,
    /// Failed requests, by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// The first errors in time (at most 20).
    pub first_errors: Vec<ErrorSample>,
    /// Each client's own account.
    pub clients: Vec<ClientReport>,
    /// Latency of each 2xx request (request written to response read), in
    /// no particular order.
    pub latencies: Vec<Duration>,
    /// The longest of them.
    pub max_latency: Duration,
    /// The first 16 distinct bodies, in the order they first appeared.
    pub bodies: Vec<BodySeen>,
    /// Clients that did not finish within the stop deadline.
    pub stuck_clients: usize,
    /// Every request of every client, by client, with [`LoadConfig::record_requests`].
    pub records: Vec<Record>,
}

impl LoadReport {
    /// Failed requests.
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

    /// Prints the report, and panics unless no request failed, no client got stuck, and at
    /// least `min_ok` requests succeeded (less proves nothing).
    #[track_caller]
    pub fn assert_lost_nothing(&self, min_ok: u64) {
        eprintln!("{self}");
        self.assert_no_errors();
        assert!(
            self.ok >= min_ok,
            "too little load to prove anything (wanted {min_ok} ok): {self}"
        );
    }

    /// Panics unless every successful response carried `body`.
    #[track_caller]
    pub fn assert_every_body(&self, body: &str) {
        let count = self.body(body).map(|b| b.count);
        assert_eq!(
            count,
            Some(self.ok),
            "not every answer was {body:?}: {self}"
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

    /// When the clients started: the origin of [`Record`]'s times.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits until `n` more requests than now have succeeded: proof that traffic flows at this
    /// moment. Panics with the counts after [`TIMEOUT`].
    #[track_caller]
    pub fn assert_flows(&self, n: u64) {
        self.assert_flows_or(n, String::new);
    }

    /// [`Load::assert_flows`], with `context` (what the server or its manager says) in the
    /// panic message.
    #[track_caller]
    pub fn assert_flows_or(&self, n: u64, context: impl FnOnce() -> String) {
        let want = self.ok() + n;
        assert!(
            self.wait_for_ok(want, TIMEOUT),
            "requests stopped flowing within {TIMEOUT:?} ({} ok, {} errors)\n{}",
            self.ok(),
            self.errors(),
            context()
        );
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
        let mut records = Vec::new();
        for c in clients {
            records.extend(c.records);
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
            records,
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
    error_pause: Duration,
    record: bool,
    connector: Option<Connector>,
    shared: Arc<Shared>,
    started: Instant,
    report: ClientReport,
    samples: Vec<ErrorSample>,
    latencies: Vec<Duration>,
    bodies: Vec<Body>,
    records: Vec<Record>,
}

/// A client's connection.
type Connection = BufReader<Box<dyn Stream>>;

/// How one request went: the connection back if it may be reused, whether the response
/// carried `Connection: close`.
struct Exchanged {
    conn: Option<Connection>,
    result: Result<(), ErrorKind>,
    close: bool,
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
        let request = get_request(&cfg.path, &cfg.host, kind == ClientKind::PerRequest);
        Client {
            id,
            addr,
            request,
            io_timeout: cfg.io_timeout,
            max_duration: cfg.max_duration,
            max_requests: cfg.max_requests_per_client.unwrap_or(u64::MAX),
            error_pause: cfg.error_pause,
            record: cfg.record_requests,
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
            records: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut conn: Option<Connection> = None;
        let mut sent = 0;
        let started = self.started;
        let ns = |t: Instant| t.saturating_duration_since(started).as_nanos() as u64;
        while !self.shared.stop.load(Ordering::Relaxed)
            && sent < self.max_requests
            && self.started.elapsed() < self.max_duration
        {
            let start = Instant::now();
            let connected = conn.is_none();
            let done = match conn.take() {
                Some(c) => {
                    sent += 1;
                    self.exchange(c)
                }
                None => match self.connect() {
                    Ok(c) => {
                        sent += 1;
                        self.exchange(c)
                    }
                    Err(f) => {
                        let kind = f.kind;
                        self.fail(f);
                        Exchanged {
                            conn: None,
                            result: Err(kind),
                            close: false,
                        }
                    }
                },
            };
            if self.record {
                self.records.push(Record {
                    start_ns: ns(start),
                    end_ns: ns(Instant::now()),
                    result: done.result,
                    close: done.close,
                    connected,
                });
            }
            conn = done.conn;
            if done.result.is_err() {
                thread::sleep(self.error_pause);
            }
        }
    }

    /// A new connection, wrapped by the connector if there is one.
    fn connect(&mut self) -> Result<Connection, Fail> {
        let s = connect(self.addr, self.io_timeout)?;
        self.report.connections += 1;
        let s: Box<dyn Stream> = match &self.connector {
            None => Box::new(s),
            Some(Connector(wrap)) => wrap(s).map_err(|e| Fail::io("handshake", e))?,
        };
        Ok(BufReader::new(s))
    }

    /// One request on `conn`.
    fn exchange(&mut self, mut conn: Connection) -> Exchanged {
        let t0 = Instant::now();
        let result = conn
            .get_mut()
            .write_all(&self.request)
            .map_err(|e| Fail::io("write request", e))
            .and_then(|()| read_response(&mut conn));
        let latency = t0.elapsed();
        let reply = match result {
            Ok(r) => r,
            Err(f) => return self.failed(f, false),
        };
        let keepalive = self.report.kind == ClientKind::KeepAlive;
        let result = if !(200..300).contains(&reply.status) {
            let body = String::from_utf8_lossy(&reply.body[..reply.body.len().min(BODY_PREFIX)]);
            Err(Fail::new(
                ErrorKind::Status,
                format!("status {}: {body:?}", reply.status),
            ))
        } else if !keepalive && !reply.close {
            Err(Fail::new(
                ErrorKind::Malformed,
                "no `Connection: close` in the answer to a `Connection: close` request",
            ))
        } else {
            Ok(())
        };
        if keepalive {
            // A complete answer leaves the connection usable, whatever its status.
            if reply.close {
                self.report.server_closes += 1;
            }
            let conn = (!reply.close).then_some(conn);
            return match result {
                Ok(()) => {
                    self.succeed(latency, &reply.body);
                    Exchanged {
                        conn,
                        result: Ok(()),
                        close: reply.close,
                    }
                }
                Err(f) => Exchanged {
                    conn,
                    ..self.failed(f, reply.close)
                },
            };
        }
        if let Err(f) = result {
            return self.failed(f, reply.close);
        }
        // Per request: the server must close now. Waiting for its FIN (rather than closing
        // first) leaves TIME_WAIT on the server's side, so the client does not run out of
        // ephemeral ports.
        let mut rest = [0u8; 64];
        match conn.read(&mut rest) {
            Ok(0) => {}
            Ok(n) => {
                let f = Fail::new(
                    ErrorKind::Malformed,
                    format!(
                        "{n} bytes after a `Connection: close` response: {:?}",
                        String::from_utf8_lossy(&rest[..n])
                    ),
                );
                return self.failed(f, true);
            }
            Err(e) => return self.failed(Fail::io("wait for close after response", e), true),
        }
        self.succeed(latency, &reply.body);
        Exchanged {
            conn: None,
            result: Ok(()),
            close: true,
        }
    }

    /// A failed request: counted, and its connection dropped.
    fn failed(&mut self, f: Fail, close: bool) -> Exchanged {
        let kind = f.kind;
        self.fail(f);
        Exchanged {
            conn: None,
            result: Err(kind),
            close,
        }
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;

    /// One keep-alive client that stops after `requests`.
    fn one_client(addr: SocketAddr, requests: u64) -> Load {
        let cfg = LoadConfig {
            max_requests_per_client: Some(requests),
            ..LoadConfig::clients(1, 0)
        };
        Load::start(addr, cfg)
    }

    /// The load client sees the keep-alive race that a server closing idle
    /// keep-alive connections causes, and reports it by kind.
    #[test]
    fn load_reports_a_server_that_closes_keepalive_connections() {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        // Answers exactly one request per connection without `Connection: close`,
        // then closes: every second request of a keep-alive client is lost.
        let server = std::thread::spawn(move || {
            for stream in socket.incoming().take(10) {
                let mut s = stream.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        let load = one_client(addr, 20);
        assert!(load.wait_until(Duration::from_secs(20), |ok, errors| ok + errors >= 20));
        server.join().unwrap();
        let report = load.stop();
        assert_eq!(report.ok, 10, "{report}");
        let lost = report
            .errors
            .get(&ErrorKind::EofBeforeResponse)
            .copied()
            .unwrap_or(0)
            + report.errors.get(&ErrorKind::Reset).copied().unwrap_or(0);
        assert_eq!(lost, 10, "{report}");
        assert!(!report.first_errors.is_empty());
    }

    /// Chunked bodies, `Connection: close` and non-2xx responses are parsed.
    #[test]
    fn load_parses_chunked_and_counts_status_errors() {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let replies: [&[u8]; 3] = [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n",
                b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye",
            ];
            let (mut s, _) = socket.accept().unwrap();
            let mut socket = Some(socket);
            for (i, reply) in replies.into_iter().enumerate() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).unwrap();
                if i == replies.len() - 1 {
                    socket = None; // the reconnect after `Connection: close` is refused
                }
                s.write_all(reply).unwrap();
            }
            drop((s, socket));
        });
        let load = one_client(addr, 4);
        assert!(load.wait_until(Duration::from_secs(20), |_, errors| errors >= 2));
        server.join().unwrap();
        let report = load.stop();
        assert_eq!(report.ok, 2, "{report}");
        assert_eq!(report.errors.get(&ErrorKind::Status), Some(&1), "{report}");
        assert_eq!(report.errors.get(&ErrorKind::Refused), Some(&1), "{report}");
        let bodies: Vec<&str> = report.bodies.iter().map(|b| b.body.as_str()).collect();
        assert_eq!(bodies, ["abcde", "bye"]);
        assert_eq!(report.clients[0].server_closes, 1);
    }
}
