//! Long-lived connections across upgrades of real processes (no systemd):
//! WebSockets (examples/websocket.rs) and server-sent events and streaming
//! responses (examples/sse.rs), SIGHUP through the PID file, each old
//! generation reaped.
//!
//! What must hold: every WebSocket gets a Close frame with 1001 "going away"
//! when its process drains, none is cut without one, and a client that
//! resends what was not answered loses no message; an event stream ends
//! cleanly and a client that reconnects with `Last-Event-ID` gets every
//! event exactly once; an upgrade request sent to a draining process ends
//! on the new process; at the drain timeout the log counts what was cut.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use support::http::Conn;
use support::process::{alive, reap};
use support::server::Server;
use support::{program, wait_for, TIMEOUT};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The pid a server greets with (`hello <pid>`).
fn greeting_pid(text: &str) -> u32 {
    text.strip_prefix("hello ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a greeting: {text:?}"))
}

/// What the WebSocket clients saw, all together.
#[derive(Default)]
struct WsCounts {
    connections: AtomicU64,
    /// Close frames from the server with code 1001.
    going_away: AtomicU64,
    /// Close frames with any other code, or none.
    other_closes: AtomicU64,
    /// Connections that ended without a Close frame from the server.
    cut: AtomicU64,
    /// Handshakes answered `503` + `Retry-After: 0`: what a draining
    /// process answers an upgrade request on a connection it accepted
    /// before its drain started. Here none may get it: every client is on
    /// a WebSocket when a drain starts and reconnects only once told
    /// "going away", after the drain started, so its new connection is
    /// the new process's. One would mean that the old process accepted a
    /// connection after its drain started. That happened in 4 runs of 30
    /// while `Drain::draining()` waited for its own wake-up, which comes
    /// milliseconds after the drain starts (see `docs/design.md`, "Long-lived
    /// connections").
    refused_while_draining: AtomicU64,
    /// Handshakes that failed otherwise (and were retried).
    failed_connects: AtomicU64,
    sent: AtomicU64,
    resent: AtomicU64,
}

/// One WebSocket client: sends `<client>:<seq>` every 20 ms, takes the
/// echo as the acknowledgement, and on a new connection first resends
/// every message not acknowledged on the previous one. Reports the
/// sequence numbers acknowledged and how many it sent.
async fn ws_client(
    id: usize,
    url: String,
    counts: Arc<WsCounts>,
    pid: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
) -> (BTreeSet<u64>, u64) {
    let mut next = 0u64;
    let mut unacked: VecDeque<u64> = VecDeque::new();
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "client {id} ran too long");
        let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(res))
                if res.status() == 503
                    && res.headers().get("retry-after").is_some_and(|v| v == "0") =>
            {
                counts
                    .refused_while_draining
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) => {
                counts.failed_connects.fetch_add(1, Ordering::Relaxed);
                eprintln!("client {id}: handshake failed ({e}); retrying");
                // A pause between retries, not a wait for readiness.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        match ws.next().await {
            Some(Ok(Message::Text(t))) => pid.store(greeting_pid(&t), Ordering::SeqCst),
            other => panic!("client {id}: no greeting: {other:?}"),
        }
        for seq in &unacked {
            ws.send(Message::text(format!("{id}:{seq}"))).await.unwrap();
            counts.resent.fetch_add(1, Ordering::Relaxed);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut closing = false;
        let ended_well = loop {
            tokio::select! {
                _ = tick.tick(), if !closing && !stop.load(Ordering::SeqCst) => {
                    unacked.push_back(next);
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    // A send that fails leaves the message unacknowledged:
                    // it goes again on the next connection.
                    let _ = ws.send(Message::text(format!("{id}:{next}"))).await;
                    next += 1;
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        let (c, seq) = t.split_once(':').expect("an echo");
                        assert_eq!(c, id.to_string());
                        let seq: u64 = seq.parse().unwrap();
                        unacked.retain(|s| *s != seq);
                        acked.insert(seq);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        // tungstenite answers with our Close as we go on
                        // reading, until the server closes the connection.
                        match frame {
                            Some(f) if f.code == CloseCode::Away => {
                                counts.going_away.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                eprintln!("client {id}: close {other:?}");
                                counts.other_closes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        closing = true;
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(tungstenite::Error::ConnectionClosed)) if closing => break true,
                    Some(Err(e)) if closing => {
                        eprintln!("client {id}: after the close: {e}");
                        break true;
                    }
                    other => {
                        eprintln!("client {id}: connection ended without a close frame: {other:?}");
                        counts.cut.fetch_add(1, Ordering::Relaxed);
                        break false;
                    }
                },
            }
            if !closing && stop.load(Ordering::SeqCst) && unacked.is_empty() {
                // Done: the client closes, as a client may.
                ws.close(None).await.unwrap();
                while let Some(Ok(_)) = ws.next().await {}
                return (acked, next);
            }
        };
        let _ = ended_well;
    }
}

/// `n` old processes logged that they drained, each saying `field`.
#[track_caller]
fn each_drained(server: &Server, n: usize, field: &str) {
    let log = server.log.text();
    let drained: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("drained; exiting"))
        .collect();
    assert_eq!(drained.len(), n, "{log}");
    for line in drained {
        assert!(line.contains(field), "{field}: {line}");
    }
}

/// 20 WebSocket clients across 10 upgrades: each connection open at an
/// upgrade gets 1001 and reconnects to the new process, none is cut, and
/// every message is acknowledged in the end.
#[test]
fn websockets_get_going_away_and_reconnect_across_ten_upgrades() {
    const CLIENTS: usize = 20;
    const UPGRADES: usize = 10;
    let mut server = Server::start(program!("websocket"), &[], &[]);
    let addr = server.addr();
    let url = format!("ws://{addr}/ws");
    let rt = runtime();
    let counts = Arc::new(WsCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pids: Vec<Arc<AtomicU32>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            rt.spawn(ws_client(
                id,
                url.clone(),
                counts.clone(),
                pids[id].clone(),
                stop.clone(),
            ))
        })
        .collect();
    let all_on = |pid: u32| {
        wait_for(&format!("every client on pid {pid}"), TIMEOUT, || {
            pids.iter()
                .all(|p| p.load(Ordering::SeqCst) == pid)
                .then_some(())
        })
    };
    let first = server.pid().unwrap();
    all_on(first);
    // Traffic between upgrades: 400 messages (20 per client, 0.4 s).
    let sent_before = |n: u64| {
        let since = counts.sent.load(Ordering::Relaxed);
        wait_for("messages to flow", TIMEOUT, || {
            (counts.sent.load(Ordering::Relaxed) >= since + n).then_some(())
        })
    };
    sent_before(400);
    let mut olds = Vec::new();
    for _ in 1..=UPGRADES {
        let (old, new) = server.upgrade_and_reap();
        all_on(new);
        sent_before(400);
        olds.push(old);
    }
    stop.store(true, Ordering::SeqCst);
    let mut messages = 0;
    for (id, c) in clients.into_iter().enumerate() {
        let (acked, sent) = rt
            .block_on(async { tokio::time::timeout(TIMEOUT, c).await })
            .expect("client finishes")
            .unwrap();
        let all: BTreeSet<u64> = (0..sent).collect();
        assert_eq!(acked, all, "client {id}: a message was never acknowledged");
        messages += sent;
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "{CLIENTS} clients, {UPGRADES} upgrades: {} connections, {} closes with 1001, \
         {} other closes, {} cut, {} handshakes answered 503 by a draining process, \
         {} failed handshakes; {messages} messages, all acknowledged, {} \
         resent after crossing a Close",
        get(&counts.connections),
        get(&counts.going_away),
        get(&counts.other_closes),
        get(&counts.cut),
        get(&counts.refused_while_draining),
        get(&counts.failed_connects),
        get(&counts.resent),
    );
    assert_eq!(get(&counts.cut), 0, "connections cut without a close frame");
    assert_eq!(get(&counts.other_closes), 0);
    assert_eq!(
        get(&counts.failed_connects),
        0,
        "every reconnection reached a server"
    );
    assert_eq!(
        get(&counts.refused_while_draining),
        0,
        "a draining process accepted reconnections it should have left to the new process"
    );
    assert_eq!(get(&counts.going_away), (CLIENTS * UPGRADES) as u64);
    assert_eq!(get(&counts.connections), (CLIENTS * (UPGRADES + 1)) as u64);
    assert!(messages >= 4_400, "{messages} messages");
    // Each old process says it closed its 20 sockets in time.
    each_drained(&server, UPGRADES, &format!("long_lived_closed={CLIENTS}"));
    let log = server.log.text();
    assert!(!log.contains("drain timeout expired"), "{log}");
    for old in olds {
        assert!(!alive(old));
    }
}

/// Parses an event stream as it comes: complete events, as `(field, value)`
/// lists.
#[derive(Default)]
struct EventParser {
    buf: Vec<u8>,
}

impl EventParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<BTreeMap<String, String>> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let mut event = BTreeMap::new();
            for line in String::from_utf8(block).unwrap().lines() {
                if let Some((k, v)) = line.split_once(':') {
                    event.insert(k.to_owned(), v.trim_start().to_owned());
                }
            }
            events.push(event);
        }
        events
    }
}

#[derive(Default)]
struct SseSeen {
    /// Event ids in the order received.
    ids: Vec<u64>,
    /// The pid of the process serving the current stream.
    pid: u32,
    /// Events received from the current stream.
    on_stream: u64,
    /// Streams that ended cleanly, streams cut (the body failed).
    ended: u64,
    cut: u64,
    /// Streams that ended at once: asked of a process already draining.
    empty: u64,
}

/// An `EventSource`-like client (hyper-util's pooled client, so a new
/// request may reuse a connection to a draining process): on each clean
/// end of the stream it reconnects with `Last-Event-ID`.
/// Resolves once `stop` is set (checked every 50 ms).
async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sse_client(addr: SocketAddr, seen: Arc<Mutex<SseSeen>>, stop: Arc<AtomicBool>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut last: Option<u64> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut req = hyper::Request::get(format!("http://{addr}/events"));
        if let Some(last) = last {
            req = req.header("last-event-id", last.to_string());
        }
        let res = tokio::select! {
            r = tokio::time::timeout(TIMEOUT, client.request(req.body(Empty::new()).unwrap())) => {
                r.expect("the stream's response headers arrive within the bound")
            }
            _ = stopped(&stop) => return,
        };
        let mut body = res.expect("the stream is served").into_body();
        let mut parser = EventParser::default();
        let mut events = 0;
        loop {
            // Dropping `frame()` unfinished loses nothing: it only polls.
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = stopped(&stop) => return,
            };
            match frame {
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    let mut s = seen.lock().unwrap();
                    for e in parser.push(&data) {
                        if e.get("event").map(String::as_str) == Some("hello") {
                            s.pid = e["data"].parse().unwrap();
                            s.on_stream = 0;
                        } else if let Some(id) = e.get("id") {
                            let id: u64 = id.parse().unwrap();
                            assert_eq!(e["data"], format!("tick {id}"));
                            s.ids.push(id);
                            s.on_stream += 1;
                            last = Some(id);
                            events += 1;
                        }
                    }
                }
                Some(Err(e)) => panic!("the stream was cut: {e}"),
                None => {
                    let mut s = seen.lock().unwrap();
                    s.ended += 1;
                    if events == 0 {
                        s.empty += 1;
                    }
                    break;
                }
            }
        }
    }
}

/// One SSE client across 10 upgrades gets every event exactly once, each
/// stream ending cleanly when its process drains.
#[test]
fn server_sent_events_arrive_exactly_once_across_ten_upgrades() {
    const UPGRADES: usize = 10;
    let mut server = Server::start(program!("sse"), &[], &[]);
    let addr = server.addr();
    let rt = runtime();
    let seen = Arc::new(Mutex::new(SseSeen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = rt.spawn(sse_client(addr, seen.clone(), stop.clone()));
    let events_from = |pid: u32| {
        wait_for(&format!("events from pid {pid}"), TIMEOUT, || {
            let s = seen.lock().unwrap();
            (s.pid == pid && s.on_stream >= 10).then_some(())
        })
    };
    events_from(server.pid().unwrap());
    let mut olds = Vec::new();
    for _ in 1..=UPGRADES {
        let (old, new) = server.upgrade_and_reap();
        events_from(new);
        olds.push(old);
    }
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async { tokio::time::timeout(TIMEOUT, client).await })
        .expect("client stops")
        .unwrap();
    let s = seen.lock().unwrap();
    let first = s.ids[0];
    let want: Vec<u64> = (first..first + s.ids.len() as u64).collect();
    assert!(s.ids == want, "ids not continuous: {:?}", gaps(&s.ids));
    eprintln!(
        "{UPGRADES} upgrades: {} events (ids {first}..={}), each exactly once; {} streams \
         ended cleanly ({} of them at once, asked of a draining process on a reused \
         connection), {} cut",
        s.ids.len(),
        s.ids.last().unwrap(),
        s.ended,
        s.empty,
        s.cut,
    );
    assert_eq!(s.cut, 0);
    assert!(s.ended >= UPGRADES as u64);
    each_drained(&server, UPGRADES, "long_lived_closed=1");
}

/// The ids around each gap or repeat, for the failure message.
fn gaps(ids: &[u64]) -> Vec<(u64, u64)> {
    ids.windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect()
}

/// A WebSocket handshake sent on a keep-alive connection of a process that
/// is draining gets `503` + `Retry-After: 0` + `Connection: close`; the
/// client's retry ends on the new process.
#[test]
fn an_upgrade_sent_to_a_draining_process_ends_on_the_new_one() {
    let server = Server::start(program!("websocket"), &[], &[]);
    let addr = server.addr();
    let rt = runtime();
    let mut kept = Conn::open(addr);
    assert_eq!(kept.get("/").status, 200);
    let kept = kept.into_stream();
    kept.set_nonblocking(true).unwrap();
    let mut kept = rt.block_on(async { tokio::net::TcpStream::from_std(kept).unwrap() });
    let from = server.log.len();
    let (old, new) = server.upgrade();
    // The old process has started draining (it logs this after the start).
    server.log.wait_line(
        from,
        &["upgrade complete; draining", &format!("new_pid={new}")],
        TIMEOUT,
    );
    assert!(alive(old), "the kept connection holds the old process");
    let url = format!("ws://{addr}/ws");
    let greeting = rt.block_on(async {
        let refused = tokio_tungstenite::client_async(url.as_str(), &mut kept).await;
        match refused {
            Err(tungstenite::Error::Http(res)) => {
                assert_eq!(res.status(), 503);
                let h = res.headers();
                assert_eq!(h["retry-after"], "0");
                assert_eq!(h["connection"], "close");
            }
            other => panic!("expected 503 from the draining process: {other:?}"),
        }
        let mut rest = Vec::new();
        let n = tokio::time::timeout(TIMEOUT, kept.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "the connection closes after the 503");
        // The retry.
        let (mut ws, res) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        assert_eq!(res.status(), 101);
        let greeting = match ws.next().await {
            Some(Ok(Message::Text(t))) => t.to_string(),
            other => panic!("no greeting: {other:?}"),
        };
        ws.close(None).await.unwrap();
        greeting
    });
    assert_eq!(
        greeting_pid(&greeting),
        new,
        "the retry reached the new process"
    );
    assert_eq!(reap(old, TIMEOUT), 0);
    let (_, line) = server.log.wait_line(from, &["drained; exiting"], TIMEOUT);
    assert!(
        line.contains("long_lived_closed=0"),
        "nothing upgraded there: {line}"
    );
}

/// At the drain timeout the old process exits and cuts what is still open,
/// and says how much: a WebSocket whose client never answers the Close (the
/// close wait is longer than the drain timeout) is cut, one that answers
/// is closed in time; the old process does not exit before the timeout
/// while that socket is open.
#[test]
fn at_the_drain_timeout_the_log_counts_the_websockets_cut() {
    let args = ["--drain-timeout", "2", "--close-timeout", "30"];
    let server = Server::start(program!("websocket"), &args, &[]);
    let addr = server.addr();
    let url = format!("ws://{addr}/ws");
    let rt = runtime();
    let (mut polite, mut silent) = rt.block_on(async {
        let (mut polite, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let (mut silent, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        for ws in [&mut polite, &mut silent] {
            assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
        }
        (polite, silent)
    });
    let from = server.log.len();
    let hup = Instant::now();
    let (old, _new) = server.upgrade();
    // The polite client gets 1001, answers, and its socket closes.
    rt.block_on(async {
        match tokio::time::timeout(TIMEOUT, polite.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected a 1001 close: {other:?}"),
        }
        while let Some(Ok(_)) = polite.next().await {}
    });
    // The silent one reads nothing, so it never answers: the old process
    // stays for the whole drain timeout.
    assert!(alive(old), "exited with a socket still open");
    assert_eq!(reap(old, TIMEOUT), 0);
    let took = hup.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the old process exited {took:?} after the HUP, before its drain timeout"
    );
    let (_, line) = server
        .log
        .wait_line(from, &["drain timeout expired"], TIMEOUT);
    for field in ["unfinished=1", "long_lived_closed=1", "long_lived_cut=1"] {
        assert!(line.contains(field), "{field}: {line}");
    }
    // What the silent client finds when it reads at last: the 1001, then
    // the end of a connection the server could not close properly.
    rt.block_on(async {
        match tokio::time::timeout(TIMEOUT, silent.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected the 1001 close first: {other:?}"),
        }
    });
    eprintln!("drain timeout 2 s: old process exited after {took:?}; {line}");
}

/// At the drain timeout, streaming responses: the event stream ends on the
/// drain (closed in time), a short download finishes within the drain
/// (closed in time), a long one is cut when the process exits, and its
/// client sees the body fail.
#[test]
fn at_the_drain_timeout_the_log_counts_the_streams_cut() {
    let args = ["--drain-timeout", "4"];
    let server = Server::start(program!("sse"), &args, &[]);
    let addr = server.addr();
    let rt = runtime();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let open = |path: &str| {
        let client = client.clone();
        let uri = format!("http://{addr}{path}");
        rt.block_on(async move {
            let res = client.get(uri.parse().unwrap()).await.unwrap();
            assert_eq!(res.status(), 200);
            let mut body = res.into_body();
            // Streaming: the first bytes are there.
            let first = body.frame().await.unwrap().unwrap();
            assert!(first.is_data());
            body
        })
    };
    let events = open("/events");
    // Still running when the drain starts, however slow the upgrade.
    let short = open("/lines?n=25"); // 2.5 s
    let long = open("/lines?n=600"); // 60 s
    let from = server.log.len();
    let hup = Instant::now();
    let (old, _new) = server.upgrade();
    let ends = rt.block_on(async move {
        let f = |b: hyper::body::Incoming| async move {
            tokio::time::timeout(TIMEOUT, b.collect())
                .await
                .unwrap()
                .map(|_| ())
        };
        tokio::join!(f(events), f(short), f(long))
    });
    assert!(
        ends.0.is_ok(),
        "the event stream ends cleanly: {:?}",
        ends.0
    );
    assert!(ends.1.is_ok(), "the short download completes: {:?}", ends.1);
    assert!(ends.2.is_err(), "the long download is cut");
    assert_eq!(reap(old, TIMEOUT), 0);
    let took = hup.elapsed();
    assert!(took >= Duration::from_secs(4), "exited after {took:?}");
    let (_, line) = server
        .log
        .wait_line(from, &["drain timeout expired"], TIMEOUT);
    for field in ["unfinished=1", "long_lived_closed=2", "long_lived_cut=1"] {
        assert!(line.contains(field), "{field}: {line}");
    }
    eprintln!("drain timeout 4 s: old process exited after {took:?}; {line}");
}
