//! Server-sent events ([axum](https://docs.rs/axum)) across upgrades: when
//! the drain starts, every event stream ends cleanly, the client's
//! `EventSource` reconnects with `Last-Event-ID`, and the new process goes
//! on from there, so the client gets every event exactly once.
//!
//! ```text
//! cargo build --example sse
//! target/debug/examples/sse --addr 127.0.0.1:8081 --pid-file /tmp/sse.pid &
//! curl -N http://127.0.0.1:8081/events    # id: 1 / data: tick 1 ...
//! kill -HUP "$(cat /tmp/sse.pid)"         # the stream ends; reconnect with
//! curl -N -H 'Last-Event-ID: 42' http://127.0.0.1:8081/events
//! ```
//!
//! `GET /events` is a feed of one event every 20 ms: event `n` has id `n` and
//! data `tick n`, for every process alike, because `n` is the number of
//! periods since the feed's origin, a wall-clock time the first process
//! picks and hands to each new one (`set_state`/`take_state`). A request
//! with `Last-Event-ID: n` first gets the events after `n` that it missed (at
//! most the last minute of them), then the live ones. Each stream starts
//! with `retry: 100` (reconnect after 100 ms) and an event `hello` whose data
//! is the serving process's pid. A stream requested from a process that is
//! already draining ends at once (after those two), and the client
//! reconnects, to the new process. (Answering it with an error status would
//! not do: `EventSource` does not reconnect after one.)
//!
//! `GET /lines?n=N` is the other kind of streaming response: a download of
//! `N` lines, one every 100 ms, that should finish rather than end early. It
//! ignores the drain; the drain timeout bounds it, and one still running
//! then is cut (the log counts it).
//!
//! Options: `--addr ADDR` (default `127.0.0.1:8081`), `--pid-file PATH`,
//! `--drain-timeout SECS` (default 30). Under systemd or
//! `systemd-socket-activate` it serves the passed socket instead of `--addr`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::{stream, Stream, StreamExt};
use handover::DrainSignal;

/// One event per period, in milliseconds.
const PERIOD_MS: u64 = 20;
/// How far back a reconnecting client is replayed: a minute of events.
const BACKLOG: u64 = 3_000;

/// The feed: event `n` is due at `origin + n * PERIOD_MS`.
#[derive(Debug, Clone, Copy)]
struct Feed {
    origin: SystemTime,
}

impl Feed {
    /// The id of the last event due by now.
    fn current(&self) -> u64 {
        let since = SystemTime::now()
            .duration_since(self.origin)
            .unwrap_or_default();
        (since.as_millis() / u128::from(PERIOD_MS)) as u64
    }

    /// Waits until event `n` is due.
    async fn due(&self, n: u64) {
        let at = self.origin + Duration::from_millis(n.saturating_mul(PERIOD_MS));
        if let Ok(wait) = at.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    if let Err(e) = handover::logging::init() {
        eprintln!("sse: {e}");
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
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let secs = |v: &str| v.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0);
        match (flag.as_str(), args.next()) {
            ("--addr", Some(a)) => addr = a,
            ("--pid-file", Some(p)) => builder = builder.pid_file(p),
            ("--drain-timeout", Some(s)) if secs(&s).is_some() => {
                builder = builder.drain_timeout(Duration::from_secs_f64(secs(&s).unwrap()));
            }
            _ => {
                return Err(
                    "usage: sse [--addr ADDR] [--pid-file PATH] [--drain-timeout SECS]".into(),
                )
            }
        }
    }
    let handover = builder.build()?;
    let listener = handover.listen_tcp("http", addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");

    // The feed's origin, in milliseconds since the Unix epoch: from the
    // previous generation, else now. Every generation hands it on.
    let origin_ms = handover
        .take_state()
        .and_then(|b| String::from_utf8(b).ok()?.parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        });
    handover.set_state(move || origin_ms.to_string().into_bytes());
    let feed = Arc::new(Feed {
        origin: UNIX_EPOCH + Duration::from_millis(origin_ms),
    });

    let app = Router::new()
        .route("/", get(|| async { "Welcome to the Home Page!\n" }))
        .route("/events", get(events))
        .route("/lines", get(lines))
        .with_state(feed);
    tokio::spawn(handover::http::serve(listener, app, handover.drain()));

    handover.ready().await?;
    // Returns once every stream of this process has ended, or at the drain
    // timeout; the log says how many ended and how many were cut.
    handover.wait().await;
    Ok(())
}

/// The event stream: missed events after `Last-Event-ID`, then live ones,
/// until the drain starts.
async fn events(
    State(feed): State<Arc<Feed>>,
    Extension(signal): Extension<DrainSignal>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let now = feed.current();
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    // An id from the future is not one of ours: go on from now.
    let first = match last {
        Some(last) => (last.min(now) + 1).max(now.saturating_sub(BACKLOG) + 1),
        None => now + 1,
    };
    let hello = [
        Event::default().retry(Duration::from_millis(100)),
        Event::default()
            .event("hello")
            .data(std::process::id().to_string()),
    ];
    let ticks = stream::unfold(first, move |n| {
        let feed = feed.clone();
        async move {
            feed.due(n).await;
            let event = Event::default().id(n.to_string()).data(format!("tick {n}"));
            Some((event, n + 1))
        }
    });
    // `take_until` checks the signal before each event: a stream asked of a
    // draining process ends at once, and one that is running ends (cleanly,
    // with the last chunk) as soon as the drain starts.
    let stream = stream::iter(hello)
        .chain(ticks)
        .take_until(signal.draining())
        .map(Ok);
    Sse::new(stream)
}

/// A finite streaming response that ignores the drain: the drain timeout
/// bounds it.
async fn lines(uri: Uri) -> impl IntoResponse {
    let n: u32 = uri
        .query()
        .and_then(|q| q.strip_prefix("n=")?.parse().ok())
        .unwrap_or(10);
    let lines = stream::unfold(0, move |i| async move {
        if i == n {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, Infallible>(format!("line {i}\n")), i + 1))
    });
    Body::from_stream(lines)
}
