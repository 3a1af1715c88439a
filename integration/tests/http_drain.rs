//! `handover::http` under the load client: generations of servers take turns on one listening
//! socket (as after a handover) under continuous keep-alive and per-request load, and no
//! request fails.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::time::Duration;

use bytes::Bytes;
use handover::drain::{DrainReason, DrainTrigger};
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use support::load::{ClientKind, Load, LoadConfig};

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
    let load = Load::start(addr, LoadConfig::clients(8, 2));
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
    report.assert_lost_nothing(1);
    let seen: Vec<&str> = report.bodies.iter().map(|b| b.body.as_str()).collect();
    assert_eq!(seen, ["gen0", "gen1", "gen2", "gen3"]);
    for pair in report.bodies.windows(2) {
        // Once a generation has drained, its greeting is never seen again.
        assert!(pair[0].last_at <= pair[1].last_at);
    }
    for c in &report.clients {
        assert_eq!(c.last_body.as_deref(), Some("gen3"), "{report}");
        if c.kind == ClientKind::KeepAlive {
            assert_eq!(c.server_closes, 3, "one close per handover: {report}");
        }
    }
    current.0.start(DrainReason::Stopped);
    rt.block_on(current.1).unwrap().unwrap();
}
