//! The command line.

use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "\
usage: reload_bench [--conns N[,N...]] [--reloads N[,N...]] [--interval-ms MS]
                    [--mode keepalive|per-request|both] [--runtime current,multi]
                    [--baselines plain,systemd|none] [--baselines-up-to N] [--state-bytes N]
                    [--markdown FILE] [--warmup-ms MS] [--timeout-ms MS] [--starts N]
                    [--hello PATH] [--plain PATH]

  --conns LIST       load connections, one set of rows per entry (default 8,2000,10000)
  --reloads LIST     reloads per row: one number for every --conns entry, or one each
                     (default 100 up to 100 connections, 10 above)
  --interval-ms MS   one reload every MS ms, trigger to trigger (default 100)
  --mode M           keepalive, per-request or both (default both)
  --runtime LIST     hello's tokio runtime: current, multi or current,multi (default
                     current,multi); the baselines run on the first
  --baselines LIST   comma-separated: plain, systemd; or none (default plain,systemd)
  --baselines-up-to N  run the baselines only at up to N connections (default 2000)
  --state-bytes N    also time handoffs of hello handing over N bytes of state, without
                     load (default 67108864, 64 MiB; 0: skip)
  --markdown FILE    also write the results, the machine and the command to FILE
  --warmup-ms MS     steady load before the first reload and after the last (default 500)
  --timeout-ms MS    connect, write and read timeout of the load (default 5000)
  --starts N         fresh starts timed for exec-to-ready, of hello and plain (default 21)
  --hello PATH       the server (default: examples/hello next to this binary)
  --plain PATH       the same service without handover (default: examples/plain next to
                     this binary)

Run through `cargo run --release -p handover-bench`: it then builds the
release `hello` and `plain` examples too before it starts. Run directly, it
uses the examples next to its own binary: build them first with
`cargo build --release --example hello --example plain`.";

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

/// hello's tokio runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Current,
    Multi,
}

impl Runtime {
    /// hello's `--runtime` value.
    pub fn arg(self) -> &'static str {
        match self {
            Runtime::Current => "current",
            Runtime::Multi => "multi",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Runtime::Current => "current-thread",
            Runtime::Multi => "multi-thread",
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
    pub conns: Vec<usize>,
    /// Reloads per row, one per `conns` entry.
    pub reloads: Vec<usize>,
    pub interval: Duration,
    pub modes: Vec<Mode>,
    pub runtimes: Vec<Runtime>,
    pub plain: bool,
    pub systemd: bool,
    pub baselines_up_to: usize,
    pub state_bytes: usize,
    pub markdown: Option<PathBuf>,
    pub warmup: Duration,
    pub timeout: Duration,
    pub starts: usize,
    pub hello: Option<PathBuf>,
    pub plain_bin: Option<PathBuf>,
    pub raw: Vec<String>,
}

/// Reloads per row by default: fewer where each row is heavy.
fn default_reloads(conns: usize) -> usize {
    if conns <= 100 {
        100
    } else {
        10
    }
}

fn list(flag: &str, v: &str) -> Result<Vec<u64>, String> {
    let l = v
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.replace('_', "")
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {x:?} is not a whole number"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if l.is_empty() {
        return Err(format!("{flag} needs at least one number"));
    }
    Ok(l)
}

/// Parses the command line; `--help` prints the usage and exits.
pub fn parse_args() -> Result<Args, String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        conns: vec![8, 2000, 10_000],
        reloads: Vec::new(),
        interval: Duration::from_millis(100),
        modes: vec![Mode::KeepAlive, Mode::PerRequest],
        runtimes: vec![Runtime::Current, Runtime::Multi],
        plain: true,
        systemd: true,
        baselines_up_to: 2000,
        state_bytes: 64 << 20,
        markdown: None,
        warmup: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
        starts: 21,
        hello: None,
        plain_bin: None,
        raw: raw.clone(),
    };
    let mut reloads = None;
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
        };
        match flag.as_str() {
            "--conns" | "--clients" => {
                a.conns = list(&flag, &value()?)?
                    .into_iter()
                    .map(|n| (n as usize).max(1))
                    .collect()
            }
            "--reloads" => reloads = Some(list(&flag, &value()?)?),
            "--interval-ms" => a.interval = Duration::from_millis(num(value()?)?),
            "--warmup-ms" => a.warmup = Duration::from_millis(num(value()?)?),
            "--timeout-ms" => a.timeout = Duration::from_millis(num(value()?)?.max(1)),
            "--starts" => a.starts = (num(value()?)? as usize).max(1),
            "--state-bytes" => a.state_bytes = num(value()?)? as usize,
            "--baselines-up-to" => a.baselines_up_to = num(value()?)? as usize,
            "--mode" => {
                a.modes = match value()?.as_str() {
                    "keepalive" | "keep-alive" => vec![Mode::KeepAlive],
                    "per-request" => vec![Mode::PerRequest],
                    "both" => vec![Mode::KeepAlive, Mode::PerRequest],
                    other => return Err(format!("--mode: unknown mode {other:?}")),
                }
            }
            "--runtime" => {
                a.runtimes.clear();
                for r in value()?.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                    let r = match r {
                        "current" => Runtime::Current,
                        "multi" => Runtime::Multi,
                        other => return Err(format!("--runtime: unknown runtime {other:?}")),
                    };
                    if !a.runtimes.contains(&r) {
                        a.runtimes.push(r);
                    }
                }
                if a.runtimes.is_empty() {
                    return Err("--runtime needs current, multi or both".into());
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
            "--plain" => a.plain_bin = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    a.reloads = match reloads {
        None => a.conns.iter().map(|&c| default_reloads(c)).collect(),
        Some(r) if r.len() == 1 => vec![r[0] as usize; a.conns.len()],
        Some(r) if r.len() == a.conns.len() => r.into_iter().map(|n| n as usize).collect(),
        Some(r) => {
            return Err(format!(
                "--reloads: {} numbers for {} --conns entries (give one, or one each)",
                r.len(),
                a.conns.len()
            ))
        }
    };
    Ok(a)
}
