//! A program for the tests: a handover server whose new generations (the ones an upgrade starts)
//! serve from the moment they listen but call `ready()` only `--new-ready-after` seconds later,
//! as a program that warms a cache after it binds. Its first generation is ready at once.
//!
//! ```text
//! late_ready --pid-file PATH --addr ADDR --new-ready-after SECS --upgrade-timeout SECS
//! ```
//!
//! `GET /` answers `pid <pid>`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

fn secs(flags: &HashMap<&'static str, String>, name: &str) -> Result<Duration, String> {
    let v = &flags[name];
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("--{name}: {v:?} is not a number of seconds"))
}

async fn run(flags: HashMap<&'static str, String>) -> Result<(), Box<dyn std::error::Error>> {
    // `flags` has every flag `main` names.
    let (pid_file, addr) = (&flags["pid-file"], &flags["addr"]);
    let late = secs(&flags, "new-ready-after")?;
    let upgrade_timeout = secs(&flags, "upgrade-timeout")?;

    let handover = handover::Handover::builder()
        .pid_file(pid_file)
        .upgrade_timeout(upgrade_timeout)
        .build()?;
    let listener = handover.listen_tcp("http", addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, generation = handover.generation(), "listening");
    let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
        let body = format!("pid {}\n", std::process::id());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    tokio::spawn(handover::http::serve(listener, service, handover.drain()));
    if handover.generation() > 0 {
        tracing::info!(after = ?late, "serving; ready later");
        tokio::time::sleep(late).await;
    }
    handover.ready().await?;
    handover.wait().await;
    Ok(())
}

fn main() -> ExitCode {
    support::program::main(
        "late_ready",
        &["pid-file", "addr", "new-ready-after", "upgrade-timeout"],
        "late_ready --pid-file PATH --addr ADDR --new-ready-after SECS --upgrade-timeout SECS",
        run,
    )
}
