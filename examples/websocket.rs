//! A WebSocket echo server ([axum](https://docs.rs/axum) `ws`) whose sockets
//! survive upgrades: when the drain starts, every socket gets a Close frame
//! with code 1001 "going away", the server waits (bounded) for the client's
//! own Close, and the client reconnects, to the new process.
//!
//! ```text
//! cargo build --example websocket
//! target/debug/examples/websocket --addr 127.0.0.1:8081 --pid-file /tmp/ws.pid &
//! websocat ws://127.0.0.1:8081/ws         # "hello <pid>", then echoes each line
//! kill -HUP "$(cat /tmp/ws.pid)"          # the socket gets 1001; reconnect
//! ```
//!
//! `GET /ws` upgrades to a WebSocket that first says `hello <pid>`, then
//! echoes every text or binary message. The echo is what tells the client a
//! message was handled: RFC 6455 lets no data follow a Close frame, so a
//! message that crosses the server's Close on the wire is not answered, and
//! a client that resends what was not answered (on its next connection)
//! loses nothing. (Another way: send an application-level "reconnect now"
//! message, wait for the client to stop sending and say so, then close.)
//!
//! Options: `--addr ADDR` (default `127.0.0.1:8081`), `--pid-file PATH`,
//! `--drain-timeout SECS` (default 30: how long the old process waits for
//! its sockets to close), `--close-timeout SECS` (default 5: how long one
//! socket waits for the client's Close after sending its own). Under
//! systemd or `systemd-socket-activate` it serves the passed socket instead
//! of `--addr`.

use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use handover::DrainSignal;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    if let Err(e) = handover::logging::init() {
        eprintln!("websocket: {e}");
    }
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
    let mut addr = "127.0.0.1:8081".to_owned();
    let mut builder = handover::Handover::builder();
    let mut close_timeout = Duration::from_secs(5);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let secs = |v: &str| v.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0);
        match (flag.as_str(), args.next()) {
            ("--addr", Some(a)) => addr = a,
            ("--pid-file", Some(p)) => builder = builder.pid_file(p),
            ("--drain-timeout", Some(s)) if secs(&s).is_some() => {
                builder = builder.drain_timeout(Duration::from_secs_f64(secs(&s).unwrap()));
            }
            ("--close-timeout", Some(s)) if secs(&s).is_some() => {
                close_timeout = Duration::from_secs_f64(secs(&s).unwrap());
            }
            _ => {
                return Err("usage: websocket [--addr ADDR] [--pid-file PATH] \
                            [--drain-timeout SECS] [--close-timeout SECS]"
                    .into())
            }
        }
    }
    let handover = builder.build()?;
    let listener = handover.listen_tcp("http", addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");

    let app = Router::new()
        .route("/", get(|| async { "Welcome to the Home Page!\n" }))
        .route(
            "/ws",
            get(
                // The server puts a `DrainSignal` in every request: the
                // handler has it before the upgrade completes.
                move |upgrade: WebSocketUpgrade, Extension(signal): Extension<DrainSignal>| async move {
                    ws(upgrade, signal, close_timeout)
                },
            ),
        );
    tokio::spawn(handover::http::serve(listener, app, handover.drain()));

    handover.ready().await?;
    // Returns once every socket of this process is closed (the upgraded
    // connections count in the drain until dropped), or at the drain
    // timeout; the log says how many were closed and how many cut.
    handover.wait().await;
    Ok(())
}

fn ws(upgrade: WebSocketUpgrade, signal: DrainSignal, close_timeout: Duration) -> Response {
    upgrade.on_upgrade(move |socket| session(socket, signal, close_timeout))
}

/// Echoes until the client leaves or the drain starts; on the drain, says
/// "going away" and waits for the client's Close.
async fn session(mut socket: WebSocket, signal: DrainSignal, close_timeout: Duration) {
    let hello = format!("hello {}", std::process::id());
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    let draining = signal.draining();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            biased;
            _ = &mut draining => break,
            msg = socket.recv() => match msg {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    if socket.send(msg).await.is_err() {
                        return;
                    }
                }
                // The client closed (axum answered its Close), or the
                // connection failed.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {} // ping and pong: axum answers pings itself
            },
        }
    }
    let bye = CloseFrame {
        code: close_code::AWAY,
        reason: "server restarting; reconnect".into(),
    };
    if socket.send(Message::Close(Some(bye))).await.is_err() {
        return;
    }
    // The client answers with its own Close. Messages it sent before it saw
    // ours arrive first; they are not answered (no data after a Close), so
    // the client resends them on its next connection.
    let answered = tokio::time::timeout(close_timeout, async {
        let mut unanswered = 0usize;
        loop {
            match socket.recv().await {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => unanswered += 1,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return unanswered,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    match answered {
        Ok(unanswered) => {
            tracing::debug!(unanswered, "websocket closed: going away");
        }
        Err(_) => tracing::info!(
            ?close_timeout,
            "the client did not answer our Close in time; closing the websocket"
        ),
    }
}
