//! An [axum](https://docs.rs/axum) app on handover: `GET /` answers
//! `Welcome to the Home Page!`, `GET /pid` the pid of the process that
//! served it, `GET /peer` the client's address (axum's `ConnectInfo`). It
//! logs through a `tracing` subscriber of its own, with handover's layer
//! added (journald under systemd, stderr otherwise). `kill -HUP` (or
//! `systemctl reload`) upgrades it to whatever binary is now at its path,
//! without losing a request.
//!
//! ```text
//! cargo build --example axum
//! target/debug/examples/axum --addr 127.0.0.1:8081 --pid-file /tmp/axum.pid &
//! curl http://127.0.0.1:8081/pid          # the first pid
//! curl http://127.0.0.1:8081/peer         # 127.0.0.1:<curl's port>
//! cargo build --example axum              # after a change, or not
//! kill -HUP "$(cat /tmp/axum.pid)"        # the upgrade
//! curl http://127.0.0.1:8081/pid          # a new pid; nothing was refused
//! kill "$(cat /tmp/axum.pid)"             # a graceful stop
//! ```
//!
//! Defaults: `--addr 127.0.0.1:8081`, no PID file. Under systemd or
//! `systemd-socket-activate` it serves the passed socket instead of `--addr`.
//! The app is a plain `Router`; handover owns the accept loop and each
//! connection's drain, so it is served with [`handover::http::serve`], not
//! `axum::serve`, and takes what `axum::serve` takes: the `Router` itself, or
//! here its make-service with `ConnectInfo`.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::{routing::get, Router};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // A subscriber of the app's own (here: a level filter), with the
    // crate's layer added: journald under systemd, stderr otherwise.
    let (layer, report) = handover::logging::layer();
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(layer)
        .init();
    report.warn();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // handover's errors read as a whole sentence, their cause included.
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (mut addr, mut builder) = ("127.0.0.1:8081".to_owned(), handover::Handover::builder());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--addr", Some(a)) => addr = a,
            ("--pid-file", Some(p)) => builder = builder.pid_file(p),
            _ => return Err("usage: axum [--addr ADDR] [--pid-file PATH]".into()),
        }
    }
    let handover = builder.build()?;
    let listener = handover.listen_tcp("http", addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");

    let app = Router::new()
        .route("/", get(|| async { "Welcome to the Home Page!\n" }))
        .route(
            "/pid",
            get(|| async { format!("{}\n", std::process::id()) }),
        )
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("{peer}\n") }),
        );
    // `tokio::spawn(handover::http::serve(listener, app, handover.drain()))`
    // serves the `Router` as it is; `ConnectInfo` needs its make-service,
    // called once per connection with the client's address.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(handover::http::serve(listener, app, handover.drain()));

    handover.ready().await?;
    handover.wait().await;
    Ok(())
}
