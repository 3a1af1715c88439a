//! hello's service without handover: the same routes and bodies (`GET /`
//! answers `Welcome to the Home Page!`, `GET /hits` counts), on hyper's
//! HTTP/1 and HTTP/2 (hyper-util's auto builder), logging with
//! `handover::logging`, but none of handover's lifecycle: it binds its
//! address (or takes the socket systemd or `systemd-socket-activate`
//! passes), writes its PID file once it listens, serves, and on SIGTERM or
//! SIGINT stops accepting, lets the connections finish (hyper's graceful
//! shutdown) and exits. Restarting it loses the connections that arrive
//! while no process listens.
//!
//! ```text
//! plain [--addr ADDR] [--pid-file PATH] [--runtime current|multi]
//!       [--drain-timeout SECS]
//! ```
//!
//! It exists to be compared with hello: the reload benchmark measures what
//! handover costs (memory, start-up time) against it, and restarts it as the
//! baseline without handover.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

const DEFAULT_GREETING: &str = "Welcome to the Home Page!";
/// The listen backlog handover uses for the sockets it binds: SOMAXCONN,
/// 4096 on Linux since 5.4 (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 4096;

struct Args {
    addr: String,
    pid_file: Option<PathBuf>,
    multi_thread: bool,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:8081".into(),
        pid_file: None,
        multi_thread: false,
        drain_timeout: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--pid-file" => args.pid_file = Some(value()?.into()),
            "--runtime" => {
                args.multi_thread = match value()?.as_str() {
                    "current" => false,
                    "multi" => true,
                    other => {
                        return Err(format!("--runtime: {other:?} is neither current nor multi"))
                    }
                }
            }
            "--drain-timeout" => {
                let v = value()?;
                args.drain_timeout = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("--drain-timeout: {v:?} is not a number of seconds"))?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: plain [--addr ADDR] [--pid-file PATH] [--runtime current|multi] \
                     [--drain-timeout SECS]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// `addr` bound here, with handover's backlog.
fn bind(addr: &str) -> Result<TcpListener, Box<dyn std::error::Error>> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("--addr {addr:?}: {e}"))?;
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(BACKLOG)?)
}

/// Writes our PID to `path` atomically (a temporary file renamed into
/// place), so a reader never sees half of it.
fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
    writeln!(tmp, "{}", std::process::id())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Removes the PID file if it still holds our PID.
fn remove_pid_file(path: &Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(path);
    }
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

async fn run(
    args: Args,
    passed: Option<std::net::TcpListener>,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = match passed {
        Some(l) => {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => bind(&args.addr)?,
    };
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    if let Some(p) = &args.pid_file {
        write_pid_file(p).map_err(|e| format!("PID file {}: {e}", p.display()))?;
    }

    let hits = Arc::new(AtomicU64::new(0));
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
    // The settings handover's server gives hyper's HTTP/1.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, say: the connection waits in the backlog.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("stopping: no longer accepting, finishing the connections");
    if tokio::time::timeout(args.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?args.drain_timeout, "connections still open at the drain timeout");
    }
    if let Some(p) = &args.pid_file {
        remove_pid_file(p);
    }
    tracing::info!(
        pid = std::process::id(),
        vm_hwm_kb = peak_memory_kb().unwrap_or(0),
        "exiting"
    );
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = handover::logging::init() {
        eprintln!("plain: {e}");
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("plain: {e}");
            return ExitCode::from(2);
        }
    };
    // As hello does.
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "cannot raise the soft open-file limit");
            }
        }
    }
    // Before any thread starts: `listenfd` removes the variables it read.
    let passed = match listenfd::ListenFd::from_env().take_tcp_listener(0) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the socket passed in LISTEN_FDS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rt = if args.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plain: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, passed)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
