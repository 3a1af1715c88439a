//! The load client against `handover::http`: generations of servers take
//! turns on one listening socket (as after a handover) under continuous
//! keep-alive and per-request load, and no request fails.

#[path = "support/load.rs"]
mod load;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::TcpListener as StdListener;
use std::time::Duration;

use bytes::Bytes;
use handover::drain::{DrainReason, DrainTrigger};
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use load::{ErrorKind, Load, LoadConfig};

fn hello(
    greeting: &'static str,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    hyper::service::service_fn(move |_req: Request<Incoming>| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            greeting.as_bytes(),
        ))))
    })
}

#[test]
fn no_request_lost_across_three_handovers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let socket = StdListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    let generation = |greeting: &'static str| {
        let listener = socket.try_clone().unwrap();
        let trigger = DrainTrigger::new();
        let d = trigger.watcher();
        let server = rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            handover::http::serve(listener, hello(greeting), d).await
        });
        (trigger, server)
    };

    let mut current = generation("gen0");
    let load = Load::start(
        addr,
        LoadConfig {
            keepalive_clients: 8,
            per_request_clients: 2,
            ..LoadConfig::default()
        },
    );
    let greetings = ["gen1", "gen2", "gen3"];
    for greeting in greetings {
        let before = load.ok();
        assert!(
            load.wait_for_ok(before + 300, Duration::from_secs(20)),
            "load flows"
        );
        let next = generation(greeting);
        let (old_drain, old_server) = std::mem::replace(&mut current, next);
        old_drain.start(DrainReason::Upgraded);
        rt.block_on(async {
            old_server.await.unwrap().unwrap();
            // Keep-alive clients send back to back, so all connections close
            // well before the drain timeout.
            let drain = old_drain.watcher();
            assert_eq!(drain.finished(Duration::from_secs(10)).await, 0);
        });
    }
    let before = load.ok();
    assert!(load.wait_for_ok(before + 300, Duration::from_secs(20)));
    let report = load.stop();
    eprintln!("{report}");
    report.assert_no_errors();
    let seen: Vec<&str> = report.bodies.iter().map(|b| b.body.as_str()).collect();
    assert_eq!(seen, ["gen0", "gen1", "gen2", "gen3"]);
    for pair in report.bodies.windows(2) {
        // Once a generation has drained, its greeting is never seen again.
        assert!(pair[0].last_at <= pair[1].last_at);
    }
    for c in &report.clients {
        assert_eq!(c.last_body.as_deref(), Some("gen3"), "{report}");
        if c.kind == load::ClientKind::KeepAlive {
            assert_eq!(c.server_closes, 3, "one close per handover: {report}");
        }
    }
    current.0.start(DrainReason::Stopped);
    rt.block_on(current.1).unwrap().unwrap();
}

/// The load client sees the keep-alive race that a server closing idle
/// keep-alive connections causes, and reports it by kind.
#[test]
fn load_reports_a_server_that_closes_keepalive_connections() {
    let socket = StdListener::bind("127.0.0.1:0").unwrap();
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
    let load = Load::start(
        addr,
        LoadConfig {
            keepalive_clients: 1,
            max_requests_per_client: Some(20),
            ..LoadConfig::default()
        },
    );
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
    let socket = StdListener::bind("127.0.0.1:0").unwrap();
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
    let load = Load::start(
        addr,
        LoadConfig {
            keepalive_clients: 1,
            max_requests_per_client: Some(4),
            ..LoadConfig::default()
        },
    );
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
