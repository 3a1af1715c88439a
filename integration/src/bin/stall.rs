//! A program for the tests: a handover server whose runtime can be stalled on purpose, to show
//! that the crate's own work (signals, the upgrade, the handoff) does not wait for it.
//!
//! ```text
//! stall --pid-file PATH --addr ADDR --release PATH
//! ```
//!
//! `GET /` answers `pid <pid>`. `GET /stall` logs `stalling`, then blocks the one thread of its
//! runtime (as a CPU-bound handler or a blocking call would) until the file at `--release`
//! exists, at most 60 s, and answers `released`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

struct Args {
    pid_file: PathBuf,
    addr: String,
    release: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let (mut pid_file, mut addr, mut release) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--pid-file" => pid_file = Some(value.into()),
            "--addr" => addr = Some(value),
            "--release" => release = Some(value.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (pid_file, addr, release) {
        (Some(pid_file), Some(addr), Some(release)) => Ok(Args {
            pid_file,
            addr,
            release,
        }),
        _ => Err("usage: stall --pid-file PATH --addr ADDR --release PATH".into()),
    }
}

/// Blocks this thread until `release` exists (at most 60 s).
fn stall(release: &Path) {
    let end = Instant::now() + Duration::from_secs(60);
    while !release.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let handover = handover::Handover::builder()
        .pid_file(&args.pid_file)
        .build()?;
    let listener = handover.listen_tcp("http", args.addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let release = std::sync::Arc::new(args.release);
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let release = release.clone();
        async move {
            let body = if req.uri().path() == "/stall" {
                tracing::info!("stalling");
                stall(&release);
                "released\n".to_owned()
            } else {
                format!("pid {}\n", std::process::id())
            };
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        }
    });
    tokio::spawn(handover::http::serve(listener, service, handover.drain()));
    handover.ready().await?;
    handover.wait().await;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = handover::logging::init() {
        eprintln!("stall: {e}");
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stall: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stall: cannot start the runtime: {e}");
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
