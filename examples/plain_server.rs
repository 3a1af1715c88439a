//! A server that knows nothing of handover, as `handover run` reloads it:
//! the few lines any program (in any language) needs to be reloaded without
//! losing a connection.
//!
//! 1. Take the listening socket from `LISTEN_FDS` (here with the `listenfd`
//!    crate; bind it yourself only when none was passed).
//! 2. Send `READY=1` to `NOTIFY_SOCKET` once it accepts (here with the
//!    `sd-notify` crate).
//! 3. On SIGTERM (or SIGINT), stop accepting and finish the connections in
//!    flight, then exit 0. The socket stays open in the supervisor and in
//!    the new instance, so connections that arrive meanwhile wait in its
//!    backlog.
//!
//! ```text
//! cargo build --example plain_server --bin handover
//! target/debug/handover run -l http=127.0.0.1:8082 -- target/debug/examples/plain_server
//! curl http://127.0.0.1:8082/          # Hello from pid ...
//! target/debug/handover reload         # a new instance serves; the old one drains
//! ```
//!
//! Options: `--addr ADDR` (used when no socket is passed; default
//! 127.0.0.1:8082), `--no-notify` (never send `READY=1`: for
//! `handover run --ready SECS`), `--drain-timeout SECS` (default 10).
//!
//! Every connection serves HTTP/1.1 requests until the client closes it or
//! sends `Connection: close`. When the drain starts, a keep-alive
//! connection stays open until the drain timeout: programs that want zero
//! errors with keep-alive clients answer the next request with
//! `Connection: close` (see the handover crate's `http` module).

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

struct Args {
    addr: String,
    notify: bool,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8082".into(),
        notify: true,
        drain_timeout: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--addr" => args.addr = it.next().ok_or("--addr needs a value")?,
            "--no-notify" => args.notify = false,
            "--drain-timeout" => {
                let v = it.next().ok_or("--drain-timeout needs a value")?;
                let s: f64 = v.parse().map_err(|_| format!("{v:?} is not a number"))?;
                args.drain_timeout = Duration::from_secs_f64(s.max(0.0));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("plain_server: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread starts: `listenfd` removes the variables it read
    // from the environment.
    let listener = match listenfd::ListenFd::from_env().take_tcp_listener(0) {
        Ok(Some(l)) => l,
        Ok(None) => match std::net::TcpListener::bind(&args.addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("plain_server: cannot bind {}: {e}", args.addr);
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!("plain_server: bad LISTEN_FDS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(serve(listener, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plain_server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listener: std::net::TcpListener, args: Args) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let pid = std::process::id();
    eprintln!(
        "plain_server: pid {pid} serving on {}",
        listener.local_addr()?
    );
    if args.notify {
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            eprintln!("plain_server: cannot send READY=1: {e}");
        }
    }
    let greeting: Arc<str> = format!("Hello from pid {pid}\n").into();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, _) = match r {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("plain_server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let greeting = greeting.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let body = Bytes::from(greeting.as_bytes().to_vec());
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Stop accepting: this process's copy of the socket closes; the socket
    // itself lives on in the supervisor and the new instance.
    drop(listener);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let n = connections.len();
    eprintln!("plain_server: pid {pid} draining {n} connections");
    let drained = tokio::time::timeout(args.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "plain_server: pid {pid}: {} connections still open after the drain timeout",
            connections.len()
        );
    }
    eprintln!("plain_server: pid {pid} exiting");
    Ok(())
}
