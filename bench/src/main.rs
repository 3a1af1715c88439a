//! The reload benchmark: how the release-built `hello` example behaves while it is upgraded
//! again and again under load (8 to 10,000 connections, keep-alive or a new connection per
//! request, on tokio's current-thread and multi-thread runtimes), next to baselines, all
//! measured in one run; and what the crate costs, against `plain`, the same service without
//! handover.
//!
//! ```text
//! cargo run --release -p handover-bench -- [--conns 8,2000,10000] [--reloads N[,N...]]
//!     [--mode keepalive|per-request|both] [--runtime current,multi]
//!     [--baselines plain,systemd|none] [--state-bytes N] [--markdown docs/benchmarks.md]
//! ```
//!
//! Rows, per connection count and load mode:
//! - `handover SIGHUP`: `hello --pid-file` run by hand, `kill -HUP` its PID (one row per
//!   runtime);
//! - `plain restart`: `plain` (no handover) run by hand: SIGTERM, wait for the exit, start it
//!   again on the same port;
//! - `systemctl restart`: `hello.socket` + `hello.service` under a private systemd user
//!   manager (root only), `systemctl --user restart`: systemd keeps the socket, the process is
//!   replaced without a handoff;
//! - `handover systemctl reload`: the same units, `systemctl --user reload`
//!   (`ExecReload=/bin/kill -HUP $MAINPID`), i.e. the handoff under systemd.
//!
//! On their own, without load: exec → ready and idle memory of hello and plain; hello's
//! reloads, and its reloads handing over `--state-bytes` of state.
//!
//! A reload window runs from the trigger (signal sent, or `systemctl` started) until the old
//! process has exited, the new one is in the PID file and `systemctl` (if any) has returned;
//! everything else is steady state. A request belongs to a window when its lifetime (connect
//! or write until the response or error) overlaps it. Handoff time: trigger until a new PID is
//! in the PID file (written by the new process once it is the serving one).
//! [`report::definitions`] has the rest; the output repeats them.
//!
//! The PID file watch and the systemd harness are the integration tests' own (`support`); the
//! load is the benchmark's own ([`load`]). Root is needed for the systemd rows (a private user
//! manager); without it they are skipped and the output says why. `HANDOVER_BENCH_TRACE=1`
//! prints, for the systemd rows, the last reloads' timestamps next to the journal, and the
//! fresh starts timed under load.
//!
//! | module | job |
//! |---|---|
//! | [`args`] | the command line |
//! | [`procs`] | the processes started: pidfds, cleanup, Ctrl-C; the open-file limit |
//! | [`servers`] | the servers run by hand and how each reloads |
//! | [`systemd`] | the servers under a private systemd user manager |
//! | [`load`] | the load: N connections on a few threads of their own |
//! | [`tally`] | what the load saw, by class, in bounded memory; the marks it classes by |
//! | [`wire`] | the load's HTTP/1.1: its request, a pure response parser |
//! | [`hist`] | latency histograms in bounded memory |
//! | [`rows`] | a row: load, reloads, probes; a fresh start timed |
//! | [`solo`] | the servers on their own: starts, idle memory, reloads with and without state |
//! | [`solo_report`] | those figures as blocks |
//! | [`memory`] | private memory, Pss and Rss from `smaps_rollup` |
//! | [`steps`] | the servers' log lines, and where a handoff's time goes |
//! | [`stats`] | a row's tally and reloads to figures |
//! | [`render`] | text or markdown blocks; how durations and sizes read |
//! | [`report`] | the figures and definitions as blocks; the machine |
//! | [`targets`] | the targets, met or MISSED |

mod args;
mod hist;
mod load;
mod memory;
mod procs;
mod render;
mod report;
mod rows;
mod servers;
mod solo;
mod solo_report;
mod stats;
mod steps;
mod systemd;
mod tally;
mod targets;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use support::http::free_port;

use args::{parse_args, Args, Runtime, Variant};
use procs::{catch_interrupts, check_interrupted, raise_nofile, Cleanup};
use report::{definitions, machine, mm, mode_blocks, render, Block};
use rows::{hello_args, run_row, Ctx};
use servers::{Server, Standalone};
use solo::measure_solo;
use solo_report::solo_blocks;
use stats::analyse;
use systemd::Systemd;
use targets::targets;

/// The examples `hello` and `plain`: `--hello`/`--plain`, else next to this binary (built
/// first under `cargo run`).
fn find_examples(args: &Args) -> Result<(PathBuf, PathBuf), String> {
    let next_to_us = |name: &str| {
        std::env::current_exe()
            .map(|p| p.with_file_name("examples").join(name))
            .map_err(|e| format!("current_exe: {e}"))
    };
    let hello = match &args.hello {
        Some(p) => p.clone(),
        None => next_to_us("hello")?,
    };
    let plain = match &args.plain_bin {
        Some(p) => p.clone(),
        None => next_to_us("plain")?,
    };
    // Under `cargo run` (which builds only this package), build the examples that sit next to
    // this binary too, so that they are never stale.
    let under_cargo = std::env::var_os("CARGO").zip(std::env::var_os("CARGO_MANIFEST_DIR"));
    let mut build = Vec::new();
    if args.hello.is_none() {
        build.extend(["--example", "hello"]);
    }
    if args.plain_bin.is_none() {
        build.extend(["--example", "plain"]);
    }
    if let (false, Some((cargo, manifest_dir))) = (build.is_empty(), under_cargo) {
        let release = hello
            .parent()
            .and_then(Path::parent)
            .is_some_and(|p| p.ends_with("release"));
        let mut cmd = Command::new(cargo);
        cmd.arg("build").args(release.then_some("--release"));
        cmd.args(["-p", "handover"])
            .args(&build)
            .arg("--manifest-path")
            .arg(Path::new(&manifest_dir).join("Cargo.toml"));
        eprintln!("reload_bench: {cmd:?}");
        let status = cmd
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("building the examples failed: {status}"));
        }
    }
    let check = |path: PathBuf| {
        if !path.is_file() {
            return Err(format!(
                "{} not found: build it with `cargo build --release --example hello --example plain`, or run this \
                 benchmark with `cargo run --release -p handover-bench`, which builds them",
                path.display()
            ));
        }
        path.canonicalize()
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    Ok((check(hello)?, check(plain)?))
}

fn state_dir() -> Result<tempfile::TempDir, String> {
    // A tmpfs, like /run on a normal host, so the PID file's fsync is cheap.
    let base = ["/dev/shm", "/run"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("handover-bench-")
        .tempdir_in(&base)
        .or_else(|_| tempfile::tempdir())
        .map_err(|e| format!("temp dir: {e}"))
}

/// One server of a row, started fresh.
fn row_server<'a>(
    v: Variant,
    runtime: Runtime,
    ctx: &Ctx<'_>,
    sd: Option<&'a Systemd>,
    tag: &str,
) -> Result<Box<dyn Server + 'a>, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let extra = hello_args(runtime);
    Ok(match (v, sd) {
        (Variant::Sighup, _) => Box::new(Standalone::start(
            ctx.hello, &extra, addr, ctx.dir, tag, false,
        )?),
        (Variant::Plain, _) => Box::new(Standalone::start(
            ctx.plain, &extra, addr, ctx.dir, tag, true,
        )?),
        (_, Some(sd)) => Box::new(sd.fresh(v == Variant::SystemdRestart)?),
        (_, None) => return Err("no systemd manager".into()),
    })
}

fn run(args: &Args) -> Result<(Vec<Block>, usize), String> {
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    };
    let load_before = loadavg();
    let max_conns = args.conns.iter().copied().max().unwrap_or(0);
    // The connections, and a margin for everything else the benchmark opens.
    let nofile = raise_nofile(max_conns as u64 + 256);
    eprintln!("reload_bench: {nofile}");
    let (hello, plain) = find_examples(args)?;
    let release = hello.components().any(|c| c.as_os_str() == "release");
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let dir = state_dir()?;
    eprintln!(
        "reload_bench: hello = {}, plain = {}",
        hello.display(),
        plain.display()
    );
    let ctx = Ctx {
        hello: &hello,
        plain: &plain,
        dir: dir.path(),
        args,
    };
    let first = args.runtimes[0];
    let solo = measure_solo(&ctx, first)?;

    let mut sd_skip = None;
    let sd = if args.systemd {
        eprintln!("reload_bench: booting a private systemd user manager");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        match Systemd::boot(&hello, &hello_args(first), addr, dir.path()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("reload_bench: systemd baseline skipped: {e}");
                sd_skip = Some(e);
                None
            }
        }
    } else {
        None
    };

    let mut plan: Vec<(Variant, Runtime)> = args
        .runtimes
        .iter()
        .map(|&r| (Variant::Sighup, r))
        .collect();
    if args.plain {
        plan.push((Variant::Plain, first));
    }
    if args.systemd {
        plan.extend([
            (Variant::SystemdRestart, first),
            (Variant::SystemdReload, first),
        ]);
    }
    let mut sets = Vec::new();
    let mut skipped_sets = Vec::new();
    let mut tags = 0;
    for (&conns, &reloads) in args.conns.iter().zip(&args.reloads) {
        for &mode in &args.modes {
            let mut rows = Vec::new();
            let mut skipped = Vec::new();
            for &(v, runtime) in &plan {
                check_interrupted()?;
                if v != Variant::Sighup && conns > args.baselines_up_to {
                    continue;
                }
                eprintln!(
                    "reload_bench: {conns} connections, {} / {} ({}), {reloads} reloads ...",
                    mode.label(),
                    v.label(),
                    runtime.label()
                );
                let sd_row = matches!(v, Variant::SystemdRestart | Variant::SystemdReload);
                if sd_row && sd.is_none() {
                    skipped.push((v, sd_skip.clone().unwrap_or_default()));
                    continue;
                }
                tags += 1;
                let tag = format!("row-{tags}");
                let data = row_server(v, runtime, &ctx, sd.as_ref(), &tag).and_then(|mut s| {
                    let d = run_row(&mut *s, (v, runtime), (mode, conns, reloads), &ctx);
                    if let (Ok(d), Some(sd), true) =
                        (&d, &sd, std::env::var_os("HANDOVER_BENCH_TRACE").is_some())
                    {
                        if sd_row {
                            sd.trace(&d.reloads);
                        }
                    }
                    s.stop();
                    d
                });
                match data {
                    Ok(d) => {
                        let row = analyse(d, mode);
                        eprintln!(
                            "reload_bench:   {} requests, {} failed, handoff median {}, in {:.1?}",
                            row.requests,
                            row.failed_total(),
                            mm(&row.handoff).0,
                            row.elapsed
                        );
                        for s in &row.samples {
                            eprintln!("reload_bench:     {s}");
                        }
                        rows.push(row);
                    }
                    Err(e) => {
                        check_interrupted()?;
                        eprintln!("reload_bench: {} failed: {e}", v.label());
                        skipped.push((v, format!("failed: {}", e.lines().next().unwrap_or(""))));
                    }
                }
            }
            sets.push(((conns, mode, reloads), rows));
            skipped_sets.push(skipped);
        }
    }
    drop(sd);

    let mut blocks = vec![Block::Heading("## Results".into())];
    let per_conns: Vec<String> = args
        .conns
        .iter()
        .zip(&args.reloads)
        .map(|(c, r)| format!("{r} at {c} connections"))
        .collect();
    let mut facts = vec![
        format!(
            "servers: `{}` and `{}`{}",
            hello.display(),
            plain.display(),
            if release { "" } else { " (NOT release builds)" }
        ),
        format!(
            "reloads per row: {}, one every {} ms",
            per_conns.join(", "),
            args.interval.as_millis()
        ),
        format!(
            "baselines (plain, systemd) at up to {} connections",
            args.baselines_up_to
        ),
        format!("open-file limit: {nofile}"),
        format!(
            "PID file and logs in a tmpfs ({})",
            dir.path()
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    ];
    facts.push(format!(
        "load average (1, 5, 15 min) when the run started: {load_before}; when it ended: {} (the benchmark's own load included; anything else running on the machine skews the figures)",
        loadavg()
    ));
    if let Some(why) = &sd_skip {
        facts.push(format!("systemd rows skipped: {why}"));
    }
    blocks.push(Block::List(facts));
    blocks.extend(solo_blocks(&solo));
    for ((key, rows), skipped) in sets.iter().zip(&skipped_sets) {
        blocks.extend(mode_blocks(*key, rows, skipped, args));
    }
    let (lines, missed) = targets(&sets, &solo, args);
    blocks.push(Block::Heading("## Targets".into()));
    blocks.push(Block::List(lines));
    blocks.push(Block::Para(if missed == 0 {
        "All targets met.".into()
    } else {
        format!("{missed} target(s) MISSED.")
    }));
    blocks.push(Block::Heading("## Definitions".into()));
    blocks.push(definitions());
    Ok((blocks, missed))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("reload_bench: {e}");
            return ExitCode::from(2);
        }
    };
    catch_interrupts();
    let cleanup = Cleanup;
    let result = run(&args);
    drop(cleanup);
    let (blocks, _missed) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reload_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rest = if args.raw.is_empty() {
        String::new()
    } else {
        format!(" -- {}", args.raw.join(" "))
    };
    let command = if std::env::var_os("CARGO").is_some() {
        format!("cargo run --release -p handover-bench{rest}")
    } else {
        format!(
            "cargo build --release --example hello --example plain\n{}{}",
            std::env::args()
                .next()
                .unwrap_or_else(|| "reload_bench".into()),
            rest.strip_prefix(" --").unwrap_or(&rest)
        )
    };
    println!("{}", render(&blocks, false).trim_end());
    if let Some(path) = &args.markdown {
        let mut doc = vec![
            Block::Heading("# Reload benchmark".into()),
            Block::Para(
                "Written by the reload benchmark itself (`bench/`); every figure below comes from the run described here. Re-run the command to regenerate this file.".into(),
            ),
            Block::Para(format!("Command:\n\n```sh\n{command}\n```")),
            Block::Heading("## Machine".into()),
            Block::List(machine().into_iter().map(|(k, v)| format!("{k}: {v}")).collect()),
        ];
        doc.extend(blocks);
        let text = render(&doc, true);
        if let Err(e) = std::fs::write(path, text.trim_end().to_owned() + "\n") {
            eprintln!("reload_bench: write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("reload_bench: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
