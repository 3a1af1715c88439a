//! `handover-reload`: the `ExecReload=` command that makes
//! `systemctl reload` wait for the upgrade and tell the truth.
//!
//! ```text
//! handover-reload [--socket PATH] [--timeout SECS] [--no-env]
//! ```
//!
//! It asks the service's control socket (default:
//! `$RUNTIME_DIRECTORY/handover.sock`) for an upgrade and exits 0 once the
//! new process is the service's main process, printing its PID; on failure
//! it exits 1 with the reason on stderr. It sends its own environment (the
//! unit's current `Environment=`/`EnvironmentFile=`, as systemd runs
//! `ExecReload=` with it) for the new process, unless `--no-env`.
//!
//! `systemctl stop` during a reload sends it SIGTERM (and the service
//! answers `cancelled`): it then exits 0 with "cancelled by stop", so that
//! the unit's result stays `success` instead of `signal`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!("usage: handover-reload [--socket PATH] [--timeout SECS] [--no-env]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut socket: Option<PathBuf> = handover::control::default_socket();
    let mut timeout = Duration::from_secs(90);
    let mut send_env = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => match args.next() {
                Some(p) => socket = Some(p.into()),
                None => return usage(),
            },
            "--timeout" => match args
                .next()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
            {
                Some(s) => timeout = Duration::from_secs_f64(s),
                None => return usage(),
            },
            "--no-env" => send_env = false,
            _ => return usage(),
        }
    }
    let Some(socket) = socket else {
        eprintln!("handover-reload: no --socket and no $RUNTIME_DIRECTORY");
        return ExitCode::from(2);
    };
    if let Err(e) = exit_cleanly_on_sigterm() {
        eprintln!("handover-reload: cannot handle SIGTERM: {e}");
    }
    let env: Vec<_> = std::env::vars_os().collect();
    let env = send_env.then_some(env.as_slice());
    match handover::control::request_upgrade(&socket, env, timeout) {
        Ok(pid) => {
            println!("upgraded: main PID {pid}");
            ExitCode::SUCCESS
        }
        Err(e @ handover::control::ControlError::Cancelled(_)) => {
            eprintln!("handover-reload: {e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("handover-reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM is what `systemctl stop` sends to a running `ExecReload=`
/// command: say so and exit 0 instead of dying of it (the unit would end
/// up "failed (Result: signal)"). The signal is blocked in every thread and
/// taken by a thread of its own with `sigwait`.
fn exit_cleanly_on_sigterm() -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let waiter = std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            if set.wait().is_ok() {
                eprintln!("handover-reload: cancelled by stop (SIGTERM)");
                std::process::exit(0);
            }
        });
    if let Err(e) = waiter {
        // No thread to take it: let SIGTERM kill as before.
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)?;
        return Err(e);
    }
    Ok(())
}
