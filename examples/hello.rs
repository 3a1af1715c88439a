//! A minimal web server on handover: `GET /` answers `Welcome to the Home
//! Page!`; `kill -HUP $(cat PIDFILE)` (or `systemctl reload hello`) upgrades
//! it to whatever binary is now at its path, without losing a request.
//!
//! ```text
//! hello [--addr ADDR] [--pid-file PATH] [--control-socket PATH] [--fd-store]
//!       [--upgrade-timeout SECS] [--drain-timeout SECS]
//! ```
//!
//! Defaults: `--addr 127.0.0.1:8081`, no PID file, a control socket only
//! under systemd's `RuntimeDirectory=`. Under systemd or
//! `systemd-socket-activate` it serves the passed socket instead of `--addr`.
//! The greeting comes from `HELLO_GREETING` when set. `GET /hits` counts the
//! requests to it; the count survives upgrades (handed over as state).

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Request, Response, StatusCode};

const DEFAULT_GREETING: &str = "Welcome to the Home Page!";

struct Args {
    addr: String,
    pid_file: Option<String>,
    control_socket: Option<String>,
    fd_store: bool,
    upgrade_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8081".into(),
        pid_file: None,
        control_socket: None,
        fd_store: false,
        upgrade_timeout: None,
        drain_timeout: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let secs = |v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{flag}: {v:?} is not a number of seconds"))
        };
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--pid-file" => args.pid_file = Some(value()?),
            "--control-socket" => args.control_socket = Some(value()?),
            "--fd-store" => args.fd_store = true,
            "--upgrade-timeout" => args.upgrade_timeout = Some(secs(value()?)?),
            "--drain-timeout" => args.drain_timeout = Some(secs(value()?)?),
            "-h" | "--help" => {
                println!(
                    "usage: hello [--addr ADDR] [--pid-file PATH] [--control-socket PATH] [--fd-store] \
                     [--upgrade-timeout SECS] [--drain-timeout SECS]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut builder = handover::Handover::builder();
    if let Some(p) = &args.pid_file {
        builder = builder.pid_file(p);
    }
    if let Some(p) = &args.control_socket {
        builder = builder.control_socket(p);
    }
    builder = builder.fd_store(args.fd_store);
    if let Some(t) = args.upgrade_timeout {
        builder = builder.upgrade_timeout(t);
    }
    if let Some(t) = args.drain_timeout {
        builder = builder.drain_timeout(t);
    }
    let handover = builder.build()?;
    let listener = handover.listen_tcp("http", args.addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");

    // The /hits counter starts where the previous generation left it.
    let start = handover
        .take_state()
        .and_then(|b| String::from_utf8(b).ok()?.parse().ok())
        .unwrap_or(0);
    let hits = Arc::new(AtomicU64::new(start));
    let h = hits.clone();
    handover.set_state(move || h.load(Ordering::SeqCst).to_string().into_bytes());

    let greeting: Arc<str> = std::env::var("HELLO_GREETING")
        .unwrap_or_else(|_| DEFAULT_GREETING.into())
        .into();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let greeting = greeting.clone();
        let hits = hits.clone();
        async move {
            let (status, body) = match req.uri().path() {
                "/" => (StatusCode::OK, format!("{greeting}\n")),
                "/hits" => (
                    StatusCode::OK,
                    format!("{}\n", hits.fetch_add(1, Ordering::SeqCst) + 1),
                ),
                _ => (StatusCode::NOT_FOUND, "Not Found\n".to_owned()),
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok::<_, Infallible>(resp)
        }
    });
    tokio::spawn(handover::http::serve(listener, service, handover.drain()));

    handover.ready().await?;
    handover.wait().await;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = handover::logging::init() {
        eprintln!("hello: {e}");
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hello: {e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the hello server idles at about 2.5 MB RSS this way.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hello: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
