//! A program for the tests: a handover server with a thread that, on SIGUSR1, takes every fd
//! slot of the process and then every slot that frees, the moment it frees (an application
//! loop that retries at once on `EMFILE`, at its harshest: it keeps what it gets).
//!
//! ```text
//! fd_thief --pid-file PATH --addr ADDR
//! ```
//!
//! `GET /` answers `pid <pid>`. On SIGUSR1 it lowers its soft `RLIMIT_NOFILE` to the fds it
//! has open plus 32, and starts the thread: it opens `/dev/null` in a loop with no pause and
//! keeps every fd, logs `thief at the limit` (with `held=` and `pid=`) at its first `EMFILE`,
//! and `thief took a freed slot` (with `fd=`) for each one it takes after that.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Slots above the fds open at SIGUSR1: the thief fills them first.
const HEADROOM: u64 = 32;

/// Lowers the soft fd limit to what is open now plus [`HEADROOM`].
fn lower_the_limit() -> std::io::Result<u64> {
    let open = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let soft = (open + HEADROOM).min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok(soft)
}

/// Takes every fd slot there is, and every one that frees, until the process exits.
fn steal() {
    let pid = std::process::id();
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut full = false;
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => {
                if full {
                    tracing::info!(fd = f.as_raw_fd(), pid, "thief took a freed slot");
                }
                held.push(f.into());
            }
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                if !full {
                    full = true;
                    tracing::info!(held = held.len(), pid, "thief at the limit");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "thief: cannot open /dev/null");
                return;
            }
        }
    }
}

async fn run(flags: HashMap<&'static str, String>) -> Result<(), Box<dyn std::error::Error>> {
    // `flags` has every flag `main` names.
    let (pid_file, addr) = (&flags["pid-file"], &flags["addr"]);

    let handover = handover::Handover::builder().pid_file(pid_file).build()?;
    let listener = handover.listen_tcp("http", addr.as_str())?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
        let body = format!("pid {}\n", std::process::id());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    tokio::spawn(handover::http::serve(listener, service, handover.drain()));
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            match lower_the_limit() {
                Ok(soft) => tracing::info!(soft, "fd limit lowered; the thief starts"),
                Err(e) => tracing::error!(error = %e, "cannot lower the fd limit"),
            }
            if let Err(e) = std::thread::Builder::new()
                .name("thief".into())
                .spawn(steal)
            {
                tracing::error!(error = %e, "cannot start the thief");
            }
        }
    });
    handover.ready().await?;
    handover.wait().await;
    Ok(())
}

fn main() -> ExitCode {
    support::program::main(
        "fd_thief",
        &["pid-file", "addr"],
        "fd_thief --pid-file PATH --addr ADDR",
        run,
    )
}
