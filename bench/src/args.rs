//! The command line.

use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "\
usage: reload_bench [--reloads N] [--clients C] [--interval-ms MS]
                    [--mode keepalive|per-request|both] [--baselines plain,systemd|none]
                    [--markdown FILE] [--warmup-ms MS] [--timeout-ms MS] [--starts N]
                    [--hello PATH]

  --reloads N        reloads per row (default 100)
  --clients C        concurrent load clients (default 8)
  --interval-ms MS   one reload every MS ms, trigger to trigger (default 100)
  --mode M           keepalive, per-request or both (default both)
  --baselines LIST   comma-separated: plain, systemd; or none (default plain,systemd)
  --markdown FILE    also write the results, the machine and the command to FILE
  --warmup-ms MS     steady load before the first reload and after the last (default 500)
  --timeout-ms MS    client connect/read/write timeout (default 5000)
  --starts N         fresh starts timed for exec-to-ready (default 21)
  --hello PATH       the server binary (default: examples/hello next to this binary)

Run through `cargo run --release -p handover-bench`: it then builds the
release `hello` example too (`cargo build --release --example hello`) before
it starts. Run directly, it uses the `examples/hello` next to its own binary:
build it first with `cargo build --release --example hello`.";

/// How the load clients use their connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    PerRequest,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::PerRequest => "new connection per request",
        }
    }
}

/// One row: how the server is reloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Sighup,
    Plain,
    SystemdRestart,
    SystemdReload,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Sighup => "handover SIGHUP",
            Variant::Plain => "plain restart",
            Variant::SystemdRestart => "systemctl restart",
            Variant::SystemdReload => "handover systemctl reload",
        }
    }

    pub fn is_handover(self) -> bool {
        matches!(self, Variant::Sighup | Variant::SystemdReload)
    }
}

/// The command line.
#[derive(Debug, Clone)]
pub struct Args {
    pub reloads: usize,
    pub clients: usize,
    pub interval: Duration,
    pub modes: Vec<Mode>,
    pub plain: bool,
    pub systemd: bool,
    pub markdown: Option<PathBuf>,
    pub warmup: Duration,
    pub timeout: Duration,
    pub starts: usize,
    pub hello: Option<PathBuf>,
    pub raw: Vec<String>,
}

/// Parses the command line; `--help` prints the usage and exits.
pub fn parse_args() -> Result<Args, String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        reloads: 100,
        clients: 8,
        interval: Duration::from_millis(100),
        modes: vec![Mode::KeepAlive, Mode::PerRequest],
        plain: true,
        systemd: true,
        markdown: None,
        warmup: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
        starts: 21,
        hello: None,
        raw: raw.clone(),
    };
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
        };
        match flag.as_str() {
            "--reloads" => a.reloads = num(value()?)? as usize,
            "--clients" => a.clients = (num(value()?)? as usize).max(1),
            "--interval-ms" => a.interval = Duration::from_millis(num(value()?)?),
            "--warmup-ms" => a.warmup = Duration::from_millis(num(value()?)?),
            "--timeout-ms" => a.timeout = Duration::from_millis(num(value()?)?.max(1)),
            "--starts" => a.starts = (num(value()?)? as usize).max(1),
            "--mode" => {
                a.modes = match value()?.as_str() {
                    "keepalive" | "keep-alive" => vec![Mode::KeepAlive],
                    "per-request" => vec![Mode::PerRequest],
                    "both" => vec![Mode::KeepAlive, Mode::PerRequest],
                    other => return Err(format!("--mode: unknown mode {other:?}")),
                }
            }
            "--baselines" => {
                a.plain = false;
                a.systemd = false;
                for b in value()?.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                    match b {
                        "plain" => a.plain = true,
                        "systemd" => a.systemd = true,
                        "none" => {}
                        other => return Err(format!("--baselines: unknown baseline {other:?}")),
                    }
                }
            }
            "--markdown" => a.markdown = Some(value()?.into()),
            "--hello" => a.hello = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(a)
}
