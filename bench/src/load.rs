//! The load: N connections driven by at most [`THREADS`] threads of the benchmark, each a
//! tokio current-thread runtime with one task per connection, so that 10,000 connections cost
//! 10,000 sockets and small tasks, not 10,000 threads; and 8 connections get a thread each, as
//! a thread-per-client load would (one stalled thread stalls one connection).
//!
//! | mode | a connection |
//! |---|---|
//! | keep-alive | `GET` after `GET`, back to back; a `Connection: close` answer → reconnect (not an error) |
//! | per request | a new connection per `GET` (`Connection: close`); waits for the server to close first, so that `TIME_WAIT` stays on the server's side |
//!
//! A request starts at the connect (for a new connection) or the write, and ends when the
//! response is read or it fails. Failures are counted by [`Outcome`]; after one a connection
//! pauses [`ERROR_PAUSE`] so that a server that is gone does not become a busy loop.
//!
//! The ramp: each connection connects (at most [`RAMP_CONNECTS`] at a time per thread), sends
//! its first request and waits; once every connection has had its first answer (or failed),
//! [`Load::start`] lets them all go and returns. So the measured load starts with every
//! connection open, and opening 10,000 does not compete with 9,000 already hammering the
//! server. Each thread keeps a [`Tally`] (bounded memory), merged when the load stops.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::args::Mode;
pub use crate::tally::{Marks, Outcome, Request, Tally, FAILURES};
use crate::wire::{self, Parsed};

/// Pause after a failed request.
pub const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// First connects in flight at once, per thread.
pub const RAMP_CONNECTS: usize = 128;
/// Threads at most.
pub const THREADS: usize = 8;

/// What to run.
#[derive(Clone)]
pub struct Spec {
    pub addr: SocketAddr,
    pub conns: usize,
    pub mode: Mode,
    pub timeout: Duration,
}

/// What every thread shares.
#[derive(Clone)]
struct Common {
    spec: Spec,
    marks: Arc<Marks>,
    stop: Arc<AtomicBool>,
    started: Instant,
    /// Connections that have had their first answer (or failure).
    up: Arc<AtomicUsize>,
    /// The ramp is over (or the load stops).
    go: watch::Receiver<bool>,
}

/// What one thread's tasks share.
struct Shared {
    c: Common,
    ramp: Semaphore,
    request: Vec<u8>,
    tally: RefCell<Tally>,
}

/// A running load.
pub struct Load {
    c: Common,
    go: watch::Sender<bool>,
    stopped: Vec<oneshot::Sender<()>>,
    threads: Vec<thread::JoinHandle<Tally>>,
}

impl Load {
    /// Starts `spec.conns` connections; returns once each has had an answer (or failed), at
    /// most after `ramp_limit`.
    pub fn start(spec: Spec, ramp_limit: Duration) -> Result<Load, String> {
        let (go, go_rx) = watch::channel(false);
        let c = Common {
            spec,
            marks: Arc::new(Marks::default()),
            stop: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            up: Arc::new(AtomicUsize::new(0)),
            go: go_rx,
        };
        let conns = c.spec.conns;
        let n = conns.clamp(1, THREADS);
        let mut load = Load {
            c: c.clone(),
            go,
            stopped: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n {
            // Connections spread evenly: the first `conns % n` threads take one more.
            let share = conns / n + usize::from(i < conns % n);
            let (tx, rx) = oneshot::channel();
            let c = c.clone();
            let t = thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || run(c, share, rx))
                .map_err(|e| format!("spawn a load thread: {e}"))?;
            load.stopped.push(tx);
            load.threads.push(t);
        }
        let deadline = c.started + ramp_limit;
        while c.up.load(Ordering::SeqCst) < conns {
            if Instant::now() >= deadline {
                return Err(format!(
                    "only {} of {conns} connections had an answer after {ramp_limit:?}",
                    c.up.load(Ordering::SeqCst),
                ));
            }
            if load.threads.iter().any(|t| t.is_finished()) {
                return Err("a load thread ended".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        load.go.send_replace(true);
        Ok(load)
    }

    /// The origin of the tally's times.
    pub fn started(&self) -> Instant {
        self.c.started
    }

    pub fn marks(&self) -> &Marks {
        &self.c.marks
    }

    /// Stops every connection after its current request (those still in one after twice the
    /// timeout are left behind and counted as stuck), and tallies.
    pub fn stop(mut self) -> Tally {
        self.c.stop.store(true, Ordering::SeqCst);
        self.go.send_replace(true);
        for s in self.stopped.drain(..) {
            let _ = s.send(());
        }
        let mut tally = Tally::default();
        for t in self.threads.drain(..) {
            if let Ok(t) = t.join() {
                tally.merge(t);
            }
        }
        tally
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.c.stop.store(true, Ordering::SeqCst);
        self.go.send_replace(true);
        for s in self.stopped.drain(..) {
            let _ = s.send(());
        }
    }
}

/// A load thread: a runtime of its own, one task per connection.
fn run(c: Common, conns: usize, stop_rx: oneshot::Receiver<()>) -> Tally {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reload_bench: load runtime: {e}");
            return Tally::default();
        }
    };
    let io_timeout = c.spec.timeout;
    let shared = Rc::new(Shared {
        request: wire::request("/", "bench", c.spec.mode == Mode::PerRequest),
        c,
        ramp: Semaphore::new(RAMP_CONNECTS),
        tally: RefCell::new(Tally::default()),
    });
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut tasks = JoinSet::new();
        for _ in 0..conns {
            tasks.spawn_local(connection(shared.clone()));
        }
        let _ = stop_rx.await;
        shared.c.stop.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + io_timeout * 2 + Duration::from_secs(1);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {}
        let stuck = tasks.len();
        tasks.abort_all();
        shared.tally.borrow_mut().stuck = stuck;
    });
    drop(local);
    shared.tally.take()
}

/// One connection's life: request after request until the stop.
async fn connection(sh: Rc<Shared>) {
    let c = &sh.c;
    let ns = |t: Instant| t.saturating_duration_since(c.started).as_nanos() as u64;
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(512);
    let mut first = true;
    while !c.stop.load(Ordering::Relaxed) {
        let permit = if first {
            sh.ramp.acquire().await.ok()
        } else {
            None
        };
        let start = Instant::now();
        let marks_start = c.marks.now();
        let connected = conn.is_none();
        let result = exchange(&sh, &mut conn, &mut buf).await;
        let end = Instant::now();
        let marks_end = c.marks.now();
        if first {
            first = false;
            drop(permit);
            {
                let mut t = sh.tally.borrow_mut();
                t.ramp = t.ramp.max(end - c.started);
                t.ramp_failed += u64::from(result.is_err());
            }
            c.up.fetch_add(1, Ordering::SeqCst);
            // The ramp's requests are not part of the load.
            let mut go = c.go.clone();
            let _ = go.wait_for(|&g| g).await;
            continue;
        }
        let failed = result.is_err();
        sh.tally.borrow_mut().record(Request {
            start_ns: ns(start),
            end_ns: ns(end),
            marks_start,
            marks_end,
            probe_fresh: c.marks.probe_fresh.load(Ordering::SeqCst),
            connected,
            keep_closes: c.spec.mode == Mode::KeepAlive,
            result,
        });
        if failed {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
}

/// One request; `Ok(close)` for a whole 2xx answer. Leaves the connection in `conn` if it may
/// be used again.
async fn exchange(
    sh: &Shared,
    conn: &mut Option<TcpStream>,
    buf: &mut Vec<u8>,
) -> Result<bool, (Outcome, String)> {
    let t = sh.c.spec.timeout;
    let mut stream = match conn.take() {
        Some(s) => s,
        None => {
            let s = match timeout(t, TcpStream::connect(sh.c.spec.addr)).await {
                Err(_) => return Err((Outcome::Timeout, "connect: timed out".into())),
                Ok(Err(e)) => return Err((Outcome::of_io(&e), format!("connect: {e}"))),
                Ok(Ok(s)) => s,
            };
            let _ = s.set_nodelay(true);
            sh.tally.borrow_mut().connections += 1;
            s
        }
    };
    let io =
        |what: &'static str| move |e: std::io::Error| (Outcome::of_io(&e), format!("{what}: {e}"));
    let timed_out = |what: &str| (Outcome::Timeout, format!("{what}: timed out"));
    match timeout(t, stream.write_all(&sh.request)).await {
        Err(_) => return Err(timed_out("write")),
        Ok(r) => r.map_err(io("write"))?,
    }
    buf.clear();
    let (status, close, len) = loop {
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        let n = match timeout(t, stream.read_buf(buf)).await {
            Err(_) => return Err(timed_out("read")),
            Ok(r) => r.map_err(io("read"))?,
        };
        match wire::parse(buf, n == 0) {
            Err(e) => return Err((Outcome::Bad, e)),
            Ok(Parsed::Done { status, close, len }) => break (status, close, len),
            Ok(Parsed::Partial) if n == 0 => {
                let what = if buf.is_empty() {
                    "closed before the response"
                } else {
                    "closed in the middle of the response"
                };
                return Err((Outcome::Closed, what.into()));
            }
            Ok(Parsed::Partial) => {}
        }
    };
    if buf.len() > len {
        return Err((
            Outcome::Bad,
            format!("{} bytes after the response", buf.len() - len),
        ));
    }
    if !(200..300).contains(&status) {
        if !close {
            *conn = Some(stream);
        }
        return Err((Outcome::Status, format!("status {status}")));
    }
    if sh.c.spec.mode == Mode::KeepAlive {
        if !close {
            *conn = Some(stream);
        }
        return Ok(close);
    }
    if !close {
        return Err((
            Outcome::Bad,
            "no `Connection: close` in the answer to a `Connection: close` request".into(),
        ));
    }
    // The server closes first.
    let mut rest = [0u8; 64];
    match timeout(t, stream.read(&mut rest)).await {
        Err(_) => Err(timed_out("wait for the close")),
        Ok(Ok(0)) => Ok(true),
        Ok(Ok(n)) => Err((
            Outcome::Bad,
            format!("{n} bytes after a `Connection: close` response"),
        )),
        Ok(Err(e)) => Err(io("wait for the close")(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// Answers every request on every connection; every `close_every`-th answer of a
    /// connection carries `Connection: close` (and the connection closes), as a draining server
    /// does. Stops after `conns` connections.
    fn server(conns: usize, close_every: usize) -> (SocketAddr, thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = thread::spawn(move || {
            for s in l.incoming().take(conns) {
                let mut s = s.unwrap();
                thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    let mut n = 0;
                    while let Ok(len) = s.read(&mut buf) {
                        if len == 0 {
                            return;
                        }
                        n += 1;
                        let close = n % close_every == 0
                            || buf[..len].windows(17).any(|w| w == b"Connection: close");
                        let head = if close { "Connection: close\r\n" } else { "" };
                        let reply = format!("HTTP/1.1 200 OK\r\n{head}Content-Length: 2\r\n\r\nok");
                        if s.write_all(reply.as_bytes()).is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, t)
    }

    fn run_load(addr: SocketAddr, conns: usize, mode: Mode) -> Tally {
        let spec = Spec {
            addr,
            conns,
            mode,
            timeout: Duration::from_secs(5),
        };
        let load = Load::start(spec, Duration::from_secs(10)).unwrap();
        // A reload window, then steady state.
        load.marks().trigger();
        thread::sleep(Duration::from_millis(100));
        load.marks().end();
        thread::sleep(Duration::from_millis(100));
        load.stop()
    }

    #[test]
    fn keep_alive_reconnects_after_connection_close() {
        let (addr, _server) = server(10_000, 3);
        let t = run_load(addr, 20, Mode::KeepAlive);
        assert!(t.ok > 100, "{} ok", t.ok);
        assert!(t.failed.is_empty(), "{:?} {:?}", t.failed, t.samples);
        assert_eq!(t.ramp_failed, 0);
        // One connection per three requests.
        assert!(
            t.connections * 2 > t.requests / 3,
            "{} connections",
            t.connections
        );
        assert!(t.window.n() > 0 && t.steady.n() > 0);
        assert!(!t.closes.is_empty() && !t.closes[0].is_empty());
        assert_eq!(t.stuck, 0);
    }

    #[test]
    fn per_request_opens_a_connection_each() {
        let (addr, _server) = server(10_000, usize::MAX);
        let t = run_load(addr, 10, Mode::PerRequest);
        assert!(t.ok > 50, "{} ok", t.ok);
        assert!(t.failed.is_empty(), "{:?} {:?}", t.failed, t.samples);
        // The ramp's requests (one per connection) are not counted.
        assert_eq!(t.connections, t.requests + 10);
        assert!(t.closes.is_empty());
    }

    #[test]
    fn refused_connects_are_counted() {
        // A port nobody listens on: bound, then closed.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let spec = Spec {
            addr,
            conns: 2,
            mode: Mode::KeepAlive,
            timeout: Duration::from_secs(1),
        };
        let load = Load::start(spec, Duration::from_secs(10)).unwrap();
        thread::sleep(Duration::from_millis(100));
        let t = load.stop();
        assert_eq!(t.ramp_failed, 2);
        assert!(
            t.failed.get(&Outcome::Refused).is_some_and(|&n| n > 2),
            "{:?}",
            t.failed
        );
        assert_eq!(t.ok, 0);
    }
}
