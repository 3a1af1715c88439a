//! The reload benchmark: how the release-built `hello` example behaves while it is upgraded
//! again and again under load, next to two baselines built from the same binary, all measured
//! in one run.
//!
//! ```text
//! cargo run --release -p handover-bench -- [--reloads N] [--clients C] [--interval-ms MS]
//!     [--mode keepalive|per-request|both] [--baselines plain,systemd|none]
//!     [--markdown docs/benchmarks.md]
//! ```
//!
//! Rows, per load mode:
//! - `handover SIGHUP`: `hello --pid-file` run by hand, `kill -HUP` its PID;
//! - `plain restart`: SIGTERM, wait for the exit, start a new `hello` on the same port (stop
//!   then start);
//! - `systemctl restart`: `hello.socket` + `hello.service` under a private systemd user
//!   manager (root only), `systemctl --user restart`: systemd keeps the socket, the process is
//!   replaced without a handoff;
//! - `handover systemctl reload`: the same units, `systemctl --user reload`
//!   (`ExecReload=/bin/kill -HUP $MAINPID`), i.e. the handoff under systemd.
//!
//! A reload window runs from the trigger (signal sent, or `systemctl` started) until the old
//! process has exited, the new one is in the PID file and `systemctl` (if any) has returned;
//! everything else is steady state. A request belongs to a window when its lifetime (connect
//! or write until the response or error) overlaps it. Handoff time: trigger until a new PID is
//! in the PID file (written by the new process once it is the serving one).
//! [`report::definitions`] has the rest; the output repeats them.
//!
//! The load client, the PID file watch and the systemd harness are the integration tests' own
//! (`support`). Root is needed for the systemd rows (a private user manager); without it they
//! are skipped and the output says why. `HANDOVER_BENCH_TRACE=1` prints, for the systemd rows,
//! the last reloads' timestamps next to the journal, and the fresh starts timed under load.
//!
//! | module | job |
//! |---|---|
//! | [`args`] | the command line |
//! | [`procs`] | the processes started: pidfds, cleanup, Ctrl-C |
//! | [`servers`] | the servers under test and how each reloads |
//! | [`rows`] | a row: load, reloads, probes; hello on its own |
//! | [`stats`] | requests and reloads to figures |
//! | [`report`] | the figures, targets and definitions as text or markdown |

mod args;
mod procs;
mod report;
mod rows;
mod servers;
mod stats;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use support::http::free_port;

use args::{parse_args, Args, Variant};
use procs::{catch_interrupts, check_interrupted, Cleanup};
use report::{definitions, machine, mb, mm, mode_blocks, render, targets, Block};
use rows::{measure_solo, run_row, Ctx, UNLOADED_RELOADS};
use servers::{Server, Standalone, Systemd};
use stats::analyse;

/// The server: `--hello`, else the `hello` example next to this binary (built first under
/// `cargo run`).
fn find_hello(args: &Args) -> Result<PathBuf, String> {
    let path = match &args.hello {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("current_exe: {e}"))?
            .with_file_name("examples")
            .join("hello"),
    };
    // Under `cargo run` (which builds only this package), build the hello example that sits
    // next to this binary too, so that it is never stale.
    let under_cargo = std::env::var_os("CARGO").zip(std::env::var_os("CARGO_MANIFEST_DIR"));
    if let (None, Some((cargo, manifest_dir))) = (&args.hello, under_cargo) {
        let release = path
            .parent()
            .and_then(Path::parent)
            .is_some_and(|p| p.ends_with("release"));
        let mut cmd = Command::new(cargo);
        cmd.arg("build").args(release.then_some("--release"));
        cmd.args(["-p", "handover", "--example", "hello", "--manifest-path"])
            .arg(Path::new(&manifest_dir).join("Cargo.toml"));
        eprintln!("reload_bench: {cmd:?}");
        let status = cmd
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("building hello failed: {status}"));
        }
    }
    if !path.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release --example hello`, or run this \
             benchmark with `cargo run --release -p handover-bench`, which builds it",
            path.display()
        ));
    }
    let path = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
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

fn run(args: &Args) -> Result<(Vec<Block>, usize), String> {
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into())
    };
    let load_before = loadavg();
    let hello = find_hello(args)?;
    let release = hello.components().any(|c| c.as_os_str() == "release");
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let dir = state_dir()?;
    eprintln!("reload_bench: hello = {}", hello.display());
    eprintln!(
        "reload_bench: timing {} fresh starts and {UNLOADED_RELOADS} unloaded reloads",
        args.starts
    );
    let ctx = Ctx {
        hello: &hello,
        dir: dir.path(),
        args,
    };
    let solo = measure_solo(&ctx)?;

    let mut sd_skip = None;
    let sd = if args.systemd {
        eprintln!("reload_bench: booting a private systemd user manager");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        match Systemd::boot(&hello, addr, dir.path()) {
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

    let mut variants = vec![Variant::Sighup];
    if args.plain {
        variants.push(Variant::Plain);
    }
    if args.systemd {
        variants.extend([Variant::SystemdRestart, Variant::SystemdReload]);
    }
    let mut per_mode = Vec::new();
    let mut skipped_per_mode = Vec::new();
    for &mode in &args.modes {
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        for &v in &variants {
            check_interrupted()?;
            eprintln!("reload_bench: {} / {} ...", mode.label(), v.label());
            let data = match v {
                Variant::Sighup | Variant::Plain => {
                    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
                    let tag = format!(
                        "{}-{}",
                        if v == Variant::Plain {
                            "plain"
                        } else {
                            "sighup"
                        },
                        rows.len()
                    );
                    let mut s =
                        Standalone::start(&hello, addr, dir.path(), &tag, v == Variant::Plain)?;
                    let d = run_row(&mut s, v, mode, &ctx);
                    s.stop();
                    d
                }
                Variant::SystemdRestart | Variant::SystemdReload => match &sd {
                    None => {
                        skipped.push((v, sd_skip.clone().unwrap_or_default()));
                        continue;
                    }
                    Some(sd) => {
                        let mut s = sd.fresh(v == Variant::SystemdRestart)?;
                        let d = run_row(&mut s, v, mode, &ctx);
                        if std::env::var_os("HANDOVER_BENCH_TRACE").is_some() {
                            if let Ok(d) = &d {
                                sd.trace(&d.reloads);
                            }
                        }
                        d
                    }
                },
            };
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
                    rows.push(row);
                }
                Err(e) => {
                    check_interrupted()?;
                    eprintln!("reload_bench: {} failed: {e}", v.label());
                    skipped.push((v, format!("failed: {}", e.lines().next().unwrap_or(""))));
                }
            }
        }
        per_mode.push((mode, rows));
        skipped_per_mode.push(skipped);
    }
    drop(sd);

    let mut blocks = vec![Block::Heading("## Results".into())];
    let (sm, sx) = mm(&solo.starts);
    let (uh, ux) = mm(&solo.unloaded_handoff);
    let (uw, _) = mm(&solo.unloaded_window);
    let mut facts = vec![
        format!(
            "server: `{}`{}",
            hello.display(),
            if release { "" } else { " (NOT a release build)" }
        ),
        format!(
            "hello on its own, exec → ready (median / max of {}): {sm} / {sx}",
            solo.starts.len()
        ),
        format!(
            "hello on its own, idle: VmRSS {} kB ({}; {}), VmHWM {} kB",
            solo.idle_rss_kb,
            mb(solo.idle_rss_kb),
            solo.idle_split,
            solo.idle_hwm_kb
        ),
        format!(
            "handover SIGHUP without load (median / max of {UNLOADED_RELOADS}): handoff {uh} / {ux}, window median {uw}"
        ),
        format!(
            "PID file and logs in a tmpfs ({})",
            dir.path().parent().map(|p| p.display().to_string()).unwrap_or_default()
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
    for ((mode, rows), skipped) in per_mode.iter().zip(&skipped_per_mode) {
        blocks.extend(mode_blocks(*mode, rows, skipped, args));
    }
    let (lines, missed) = targets(&per_mode, &solo, args);
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
            "cargo build --release --example hello\n{}{}",
            std::env::args()
                .next()
                .unwrap_or_else(|| "reload_bench".into()),
            rest.trim_start_matches(" --")
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
