//! A minimal web server on handover: `GET /` answers `Welcome to the Home
//! Page!`; `kill -HUP $(cat PIDFILE)` (or `systemctl reload hello`) upgrades
//! it to whatever binary is now at its path, without losing a request.
//!
//! ```text
//! hello [--addr ADDR] [--pid-file PATH] [--control-socket PATH] [--fd-store]
//!       [--upgrade-timeout SECS] [--drain-timeout SECS]
//!       [--runtime current|multi] [--state-bytes N]
//! ```
//!
//! Defaults: `--addr 127.0.0.1:8081`, no PID file, a control socket only
//! under systemd's `RuntimeDirectory=`. Under systemd or
//! `systemd-socket-activate` it serves the passed socket instead of `--addr`.
//! The greeting comes from `HELLO_GREETING` when set. `GET /hits` counts the
//! requests to it; the count survives upgrades (handed over as state).
//!
//! - `--runtime`: tokio's single-threaded runtime (`current`, the default:
//!   the smallest footprint) or its multi-threaded one (`multi`, one worker
//!   per CPU, what `#[tokio::main]` gives).
//! - `--state-bytes N`: hands N bytes of state over instead of the counter
//!   (a buffer in a pattern the next process checks: it logs
//!   `state received bytes=N check="ok"`, or fails before it is ready, so
//!   that the old process keeps serving; `/hits` then starts from 0 in each
//!   generation). The buffer is kept as `Bytes` and handed over as it is,
//!   never copied. The state limit is raised to fit. The reload benchmark
//!   times handoffs with it.
//!
//! At start it raises its soft limit on open files to the hard limit (under
//! systemd the soft limit is 1024 unless the unit sets `LimitNOFILE=`; see
//! docs/systemd.md), and it logs its peak memory (`VmHWM`) as it exits.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Request, Response, StatusCode};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

const DEFAULT_GREETING: &str = "Welcome to the Home Page!";

struct Args {
    addr: String,
    pid_file: Option<String>,
    control_socket: Option<String>,
    fd_store: bool,
    upgrade_timeout: Option<Duration>,
    drain_timeout: Option<Duration>,
    multi_thread: bool,
    state_bytes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8081".into(),
        pid_file: None,
        control_socket: None,
        fd_store: false,
        upgrade_timeout: None,
        drain_timeout: None,
        multi_thread: false,
        state_bytes: 0,
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
            "--runtime" => {
                args.multi_thread = match value()?.as_str() {
                    "current" => false,
                    "multi" => true,
                    other => {
                        return Err(format!("--runtime: {other:?} is neither current nor multi"))
                    }
                }
            }
            "--state-bytes" => {
                let v = value()?;
                args.state_bytes = v
                    .parse()
                    .map_err(|_| format!("--state-bytes: {v:?} is not a number of bytes"))?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: hello [--addr ADDR] [--pid-file PATH] [--control-socket PATH] [--fd-store] \
                     [--upgrade-timeout SECS] [--drain-timeout SECS] [--runtime current|multi] \
                     [--state-bytes N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// `--state-bytes`: blocks of this size, each its index (8 bytes, little
/// endian) and then a fixed pattern, so that a truncated, shifted or
/// reordered copy fails the check.
const BLOCK: usize = 4096;

fn pattern_byte(i: usize) -> u8 {
    (i.wrapping_mul(7) ^ 0x5a) as u8
}

/// `len` bytes in the pattern the next process checks.
fn make_payload(len: usize) -> Vec<u8> {
    let fill: Vec<u8> = (8..BLOCK).map(pattern_byte).collect();
    let mut v = Vec::with_capacity(len);
    for k in 0..len.div_ceil(BLOCK) {
        let block_len = (len - k * BLOCK).min(BLOCK);
        let index = (k as u64).to_le_bytes();
        v.extend_from_slice(&index[..block_len.min(8)]);
        v.extend_from_slice(&fill[..block_len.saturating_sub(8)]);
    }
    v
}

/// Whether `payload` is `len` bytes of [`make_payload`]; what is wrong if not.
fn check_payload(payload: &[u8], len: usize) -> Result<(), String> {
    if payload.len() != len {
        return Err(format!("{} bytes, expected {len}", payload.len()));
    }
    let fill: Vec<u8> = (8..BLOCK).map(pattern_byte).collect();
    for (k, block) in payload.chunks(BLOCK).enumerate() {
        let index = (k as u64).to_le_bytes();
        let (head, rest) = block.split_at(block.len().min(8));
        if head != &index[..head.len()] || rest != &fill[..rest.len()] {
            return Err(format!("block {k} (at byte {}) differs", k * BLOCK));
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one; the soft limit
/// before and after, when it was lower.
fn raise_nofile_limit() -> nix::Result<Option<(u64, u64)>> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(Some((soft, hard)))
}

/// This process's peak resident memory (`VmHWM`), kB.
fn peak_memory_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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
    if args.state_bytes > 0 {
        builder = builder.state_limit(args.state_bytes.max(16 << 20));
    }
    let handover = builder.build()?;
    let listener = handover.listen_tcp("http", args.addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");

    let state = handover.take_state();
    let hits = if args.state_bytes == 0 {
        // The /hits counter starts where the previous generation left it.
        let start = state
            .and_then(|b| String::from_utf8(b).ok()?.parse().ok())
            .unwrap_or(0);
        let hits = Arc::new(AtomicU64::new(start));
        let h = hits.clone();
        handover.set_state(move || h.load(Ordering::SeqCst).to_string().into_bytes());
        hits
    } else {
        // The payload is checked, then handed on as it came: `Bytes` takes
        // the buffer over, and each upgrade sends it without a copy.
        let payload = match state {
            None => Bytes::from(make_payload(args.state_bytes)),
            Some(received) => {
                match check_payload(&received, args.state_bytes) {
                    Ok(()) => {
                        tracing::info!(bytes = received.len(), check = "ok", "state received")
                    }
                    Err(e) => {
                        tracing::error!(bytes = received.len(), check = %e, "state received");
                        return Err(format!("the state handed over is wrong: {e}").into());
                    }
                }
                Bytes::from(received)
            }
        };
        handover.set_state(move || payload.clone());
        Arc::new(AtomicU64::new(0))
    };

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
    // The true peak, for the benchmark: this is the last thing it logs.
    tracing::info!(
        pid = std::process::id(),
        vm_hwm_kb = peak_memory_kb().unwrap_or(0),
        "exiting"
    );
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
    match raise_nofile_limit() {
        Ok(Some((from, to))) => tracing::info!(from, to, "raised the soft open-file limit"),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the soft open-file limit"),
    }
    // One thread by default: the smallest footprint.
    let mut rt = if args.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match rt.enable_all().build() {
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
