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

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

/// Blocks this thread until `release` exists (at most 60 s).
fn stall(release: &Path) {
    let end = Instant::now() + Duration::from_secs(60);
    while !release.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn run(flags: HashMap<&'static str, String>) -> Result<(), Box<dyn std::error::Error>> {
    // `flags` has every flag `main` names.
    let (pid_file, addr) = (&flags["pid-file"], &flags["addr"]);
    let release = PathBuf::from(&flags["release"]);

    let handover = handover::Handover::builder().pid_file(pid_file).build()?;
    let listener = handover.listen_tcp("http", addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let release = std::sync::Arc::new(release);
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
    support::program::main(
        "stall",
        &["pid-file", "addr", "release"],
        "stall --pid-file PATH --addr ADDR --release PATH",
        run,
    )
}
