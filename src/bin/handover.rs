//! `handover`: run a program under a small service manager that holds its
//! sockets and reloads it without losing a connection, where there is no
//! systemd (a container, a developer's terminal); and ask that manager to
//! reload.
//!
//! ```text
//! handover run [OPTIONS] [--] PROGRAM [ARGS...]
//! handover reload [NAME] [--control PATH] [--timeout SECS]
//! handover status [NAME] [--control PATH] [--timeout SECS]
//! ```
//!
//! See `handover --help` and `docs/containers.md`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use handover::supervisor::{self, parse_seconds, Config, Readiness, SupervisorError};

const HELP: &str = "\
handover: run a program so that it can be reloaded without losing a connection

usage:
  handover run [OPTIONS] [--] PROGRAM [ARGS...]
  handover reload [NAME] [--control PATH] [--timeout SECS]
  handover status [NAME] [--control PATH] [--timeout SECS]

handover run holds the listening sockets, starts PROGRAM with them (LISTEN_FDS,
LISTEN_FDNAMES, LISTEN_PID, and a NOTIFY_SOCKET of its own), reaps every child,
forwards SIGTERM, SIGINT, SIGQUIT, SIGUSR1 and SIGUSR2 to the program, reloads
on SIGHUP or `handover reload`, and exits with the program's status.

run options:
  -l, --listen [KIND:]NAME=ADDRESS
        a socket to hold and pass to the program (repeatable, in fd order):
        http=127.0.0.1:8081 (TCP), app=/run/app.sock (Unix stream),
        udp:dns=127.0.0.1:5353, unix-dgram:log=/run/log.sock.
        Without any, the sockets of handover's own socket activation are
        passed on as they are.
  --reload restart|handoff
        restart (default): start a new instance on the same sockets, wait
        until it is ready, then SIGTERM the old one.
        handoff: send SIGHUP to the program, which starts its new version
        itself and announces it (MAINPID= and READY=1), as a program built
        on the handover crate does.
  --ready notify|SECS
        when a new instance is ready: when it sends READY=1 (default), or
        once it has run SECS seconds (for programs that cannot notify).
  --ready-timeout SECS   how long an instance may take to be ready (60)
  --stop-timeout SECS    how long an instance may take to exit after
                         SIGTERM before SIGKILL (30)
  --name NAME            the name of the control socket (default: the
                         program's file name)
  --control PATH         serve the control socket at PATH instead of
                         RUNTIME/NAME.sock
  --no-control           no control socket

reload and status talk to the control socket: --control PATH, or
RUNTIME/NAME.sock, or the only socket in RUNTIME. RUNTIME is
$XDG_RUNTIME_DIR/handover, else /run/handover for root, else
/tmp/handover-UID. reload returns once the reload has succeeded (exit 0,
printing the new main PID) or failed (exit 1, printing why).

exit status of run: the program's (128+N if a signal N killed it); 2 for
bad usage; 127 if PROGRAM cannot be run; 125 if handover itself failed.
";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(command) = args.next() else {
        eprint!("{HELP}");
        return ExitCode::from(2);
    };
    let rest: Vec<OsString> = args.collect();
    match command.to_str() {
        Some("run") => run(rest),
        Some("reload") => talk(rest, Talk::Reload),
        Some("status") => talk(rest, Talk::Status),
        Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("handover {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => usage(&format!("unknown command {command:?}")),
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("handover: {problem} (try handover --help)");
    ExitCode::from(2)
}

/// Parses `handover run`'s arguments.
fn parse_run(args: Vec<OsString>) -> Result<Config, String> {
    let mut it = args.into_iter();
    let mut config: Option<Config> = None;
    let mut listeners = Vec::new();
    let mut settings: Vec<Box<dyn FnOnce(Config) -> Config>> = Vec::new();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.to_str().filter(|a| a.starts_with('-')) else {
            config = Some(Config::new(arg));
            break;
        };
        if flag == "--" {
            let program = it.next().ok_or("no PROGRAM after --")?;
            config = Some(Config::new(program));
            break;
        }
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (flag.to_owned(), None),
        };
        let mut value = || -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        let secs = |v: String| {
            parse_seconds(&v).ok_or_else(|| format!("{flag}: {v:?} is not a number of seconds"))
        };
        match flag.as_str() {
            "-l" | "--listen" => listeners.push(
                value()?
                    .parse()
                    .map_err(|e: SupervisorError| e.to_string())?,
            ),
            "--reload" => {
                let mode = value()?.parse()?;
                settings.push(Box::new(move |c| c.reload(mode)));
            }
            "--ready" => {
                let v = value()?;
                let r = if v == "notify" {
                    Readiness::Notify
                } else {
                    Readiness::After(secs(v)?)
                };
                settings.push(Box::new(move |c| c.readiness(r)));
            }
            "--ready-timeout" => {
                let t = secs(value()?)?;
                if t.is_zero() {
                    return Err("--ready-timeout must be more than 0".into());
                }
                settings.push(Box::new(move |c| c.ready_timeout(t)));
            }
            "--stop-timeout" => {
                let t = secs(value()?)?;
                settings.push(Box::new(move |c| c.stop_timeout(t)));
            }
            "--name" => {
                let n = value()?;
                settings.push(Box::new(move |c| c.name(n)));
            }
            "--control" => {
                let p = PathBuf::from(value()?);
                settings.push(Box::new(move |c| c.control_socket(p)));
            }
            "--no-control" => settings.push(Box::new(|c| c.no_control_socket())),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let mut config = config.ok_or("no PROGRAM given")?.args(it);
    for s in settings {
        config = s(config);
    }
    for l in listeners {
        config = config.listener(l);
    }
    Ok(config)
}

fn run(args: Vec<OsString>) -> ExitCode {
    let config = match parse_run(args) {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    if let Err(e) = handover::logging::init() {
        eprintln!("handover: {e}");
    }
    match supervisor::run(config) {
        Ok(exit) => ExitCode::from(exit.code().clamp(0, 255) as u8),
        Err(e) => {
            tracing::error!("{e}");
            let code = match e {
                SupervisorError::Program { .. } => 127,
                SupervisorError::ListenerSpec { .. } | SupervisorError::Name(_) => 2,
                _ => 125,
            };
            ExitCode::from(code)
        }
    }
}

enum Talk {
    Reload,
    Status,
}

fn talk(args: Vec<OsString>, what: Talk) -> ExitCode {
    let mut name: Option<String> = None;
    let mut control: Option<PathBuf> = None;
    let mut timeout = Duration::from_secs(90);
    let mut it = args.into_iter().map(|a| a.into_string());
    while let Some(arg) = it.next() {
        let Ok(arg) = arg else {
            return usage("arguments must be valid UTF-8");
        };
        match arg.as_str() {
            "--control" => match it.next() {
                Some(Ok(p)) => control = Some(p.into()),
                _ => return usage("--control needs a path"),
            },
            "--timeout" => match it
                .next()
                .and_then(|v| v.ok())
                .and_then(|v| parse_seconds(&v))
                .filter(|t| !t.is_zero())
            {
                Some(t) => timeout = t,
                None => return usage("--timeout needs a number of seconds"),
            },
            a if a.starts_with('-') => return usage(&format!("unknown option {a:?}")),
            a if name.is_none() => name = Some(a.to_owned()),
            a => return usage(&format!("unexpected argument {a:?}")),
        }
    }
    let socket = match control {
        Some(p) => p,
        None => match supervisor::find_control_socket(name.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("handover: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let result = match what {
        Talk::Reload => handover::control::request_upgrade(&socket, None, timeout)
            .map(|pid| format!("reloaded: main PID {pid}")),
        Talk::Status => handover::control::request_status(&socket, timeout),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("handover: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn run_arguments_parse() {
        let c = parse_run(args(&[
            "-l",
            "http=127.0.0.1:8081",
            "--listen=udp:dns=127.0.0.1:5353",
            "--reload",
            "handoff",
            "--ready=2.5",
            "--stop-timeout",
            "0",
            "--",
            "prog",
            "--flag",
            "-l",
        ]))
        .unwrap();
        let text = format!("{c:?}");
        for want in [
            "program: \"prog\"",
            "args: [\"--flag\", \"-l\"]",
            "reload: Handoff",
            "After(2.5s)",
            "stop_timeout: 0ns",
            "name: \"http\"",
            "name: \"dns\"",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        // The program is the first argument that is not an option.
        let c = parse_run(args(&["prog", "--ready", "x"])).unwrap();
        assert!(format!("{c:?}").contains("args: [\"--ready\", \"x\"]"));
    }

    #[test]
    fn bad_run_arguments_say_why() {
        for (a, want) in [
            (&["--bogus", "prog"][..], "unknown option"),
            (&["-l"][..], "-l needs a value"),
            (&["-l", "nonsense", "prog"][..], "invalid listener"),
            (&["--reload", "magic", "prog"][..], "unknown reload mode"),
            (&["--ready", "soon", "prog"][..], "not a number of seconds"),
            (&["--ready-timeout", "0", "prog"][..], "more than 0"),
            (&["--"][..], "no PROGRAM"),
            (&[][..], "no PROGRAM"),
        ] {
            let e = parse_run(args(a)).unwrap_err();
            assert!(e.contains(want), "{a:?}: {e}");
        }
    }
}
