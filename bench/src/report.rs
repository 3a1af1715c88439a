//! The output: the same blocks rendered as plain text or markdown; the figures, the targets,
//! the definitions and the machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::args::{Args, Mode, Variant};
use crate::rows::Solo;
use crate::stats::{median_max, Lat, Outcome, Row, FAILURES};

/// The targets the figures are held to.
const TARGET_RELOADS: usize = 100;
const TARGET_CLIENTS: usize = 8;
const TARGET_HANDOFF_RATIO: f64 = 1.5;
const TARGET_P99_RATIO: f64 = 2.0;
const TARGET_DRAIN: Duration = Duration::from_millis(100);
const TARGET_IDLE_RSS_KB: u64 = 3 * 1024;

/// A piece of the output.
pub enum Block {
    Heading(String),
    Para(String),
    List(Vec<String>),
    Table(Vec<String>, Vec<Vec<String>>),
}

/// `blocks` as plain text, or as markdown.
pub fn render(blocks: &[Block], markdown: bool) -> String {
    let mut s = String::new();
    for b in blocks {
        match b {
            Block::Heading(h) if markdown => {
                let _ = writeln!(s, "{h}\n");
            }
            Block::Heading(h) => {
                let h = h.trim_start_matches('#').trim();
                let _ = writeln!(s, "{h}\n{}\n", "=".repeat(h.chars().count()));
            }
            Block::Para(p) => {
                let _ = writeln!(s, "{p}\n");
            }
            Block::List(items) => {
                for i in items {
                    let _ = writeln!(s, "- {i}");
                }
                s.push('\n');
            }
            Block::Table(head, rows) => {
                if markdown {
                    let _ = writeln!(s, "| {} |", head.join(" | "));
                    let seps: Vec<&str> = head
                        .iter()
                        .enumerate()
                        .map(|(i, _)| if i == 0 { "---" } else { "---:" })
                        .collect();
                    let _ = writeln!(s, "|{}|", seps.join("|"));
                    for r in rows {
                        let _ = writeln!(s, "| {} |", r.join(" | "));
                    }
                } else {
                    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
                    for r in rows {
                        for (i, c) in r.iter().enumerate() {
                            w[i] = w[i].max(c.chars().count());
                        }
                    }
                    let line = |cells: &[String]| {
                        let mut l = String::new();
                        for (i, c) in cells.iter().enumerate() {
                            let pad = w[i] - c.chars().count();
                            if i == 0 {
                                l.push_str(c);
                                l.push_str(&" ".repeat(pad));
                            } else {
                                l.push_str("  ");
                                l.push_str(&" ".repeat(pad));
                                l.push_str(c);
                            }
                        }
                        l.trim_end().to_owned()
                    };
                    let _ = writeln!(s, "{}", line(head));
                    let total: usize = w.iter().sum::<usize>() + 2 * (w.len() - 1);
                    let _ = writeln!(s, "{}", "-".repeat(total));
                    for r in rows {
                        let _ = writeln!(s, "{}", line(r));
                    }
                }
                s.push('\n');
            }
        }
    }
    s
}

/// A duration in the unit that reads best.
pub fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// `p50 X, p99 Y, max Z`.
fn spread(l: &Lat) -> String {
    format!("p50 {}, p99 {}, max {}", dur(l.p50), dur(l.p99), dur(l.max))
}

/// Median and maximum, as text.
pub fn mm(v: &[Duration]) -> (String, String) {
    match median_max(v) {
        Some((m, x)) => (dur(m), dur(x)),
        None => ("n/a".into(), "n/a".into()),
    }
}

/// kB as MiB.
pub fn mb(kb: u64) -> String {
    if kb == 0 {
        "n/a".into()
    } else {
        format!("{:.2} MiB", kb as f64 / 1024.0)
    }
}

fn kinds(m: &BTreeMap<Outcome, u64>) -> String {
    let total: u64 = m.values().sum();
    if total == 0 {
        return "0".into();
    }
    let parts: Vec<String> = FAILURES
        .iter()
        .filter_map(|k| m.get(k).map(|n| format!("{} {n}", k.label())))
        .collect();
    format!("{total} ({})", parts.join(", "))
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        "n/a".into()
    } else {
        format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
    }
}
/// What the figures mean.
pub fn definitions() -> Block {
    Block::List(vec![
        "reload window: from the trigger (signal sent, or `systemctl` started) until the old process has exited, the new one is in the PID file and `systemctl` (if any) has returned; steady state is everything else. A request is in a window when its lifetime (connect or write until response or error) overlaps one.".into(),
        "handoff: trigger → a new PID in the PID file (the new process writes it once it is the serving one). For the restarts: trigger → the new process in the PID file.".into(),
        "exec → ready: `hello` started fresh on another port, spawn → its PID in the PID file (the same definition as the handoff); timed without load, and again under each mode's load right after the reloads of the `handover SIGHUP` row. The handoff target compares the two under the same conditions.".into(),
        "drain: for a handoff, new PID in the PID file → old process gone (the old one stops accepting at about that moment, so this bounds `last request served → gone` from above; 0 when the old process was gone before the new one had written the PID file, which happens under systemd, where the new process writes it only after the old one has had `MAINPID=` confirmed); for a restart, trigger → old process gone. `drain after last` (keep-alive only, measured): the old process's last response → old process gone; a serving process never sends `Connection: close`, so the last `Connection: close` response before the exit is the old process's last request.".into(),
        "process gone: its pidfd became readable (exit, before reaping). PID file changes are seen through inotify; both are event-driven, timestamps are taken when the event is seen.".into(),
        "idle RSS: VmRSS of a freshly started server, 0.3 s after ready, before any load. peak RSS: over all reloads, VmHWM of the old process (last read before it exited) plus VmHWM of the new one at the end of the window when both were alive at once, else the larger of the two.".into(),
        "failed requests by kind: refused (connect refused), reset (connection reset or broken pipe), closed (connection closed before the whole response), timeout, non-2xx, other. After a failure a client pauses 10 ms before its next request, so counts of refused connects depend on that pause.".into(),
        "latency: request start (connect for a new connection, else the write) → response read, successful requests only. Requests that overlap the extra timings taken after the reloads (fresh starts of another hello, `systemctl show` queries) are left out of the latency figures (not out of the request and failure counts).".into(),
    ])
}

/// The tables and notes of one load mode.
pub fn mode_blocks(
    mode: Mode,
    rows: &[Row],
    skipped: &[(Variant, String)],
    args: &Args,
) -> Vec<Block> {
    let mut b = vec![Block::Heading(format!(
        "### {}: {} clients, {} reloads every {} ms",
        mode.label(),
        args.clients,
        args.reloads,
        args.interval.as_millis()
    ))];
    b.push(Block::Table(
        vec![
            "".into(),
            "reloads".into(),
            "requests".into(),
            "failed".into(),
            "requests in windows".into(),
            "failed in windows".into(),
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.variant.label().into(),
                    r.reloads.to_string(),
                    r.requests.to_string(),
                    kinds(&r.failed),
                    r.win_requests.to_string(),
                    kinds(&r.win_failed),
                ]
            })
            .collect(),
    ));
    b.push(Block::Table(
        vec![
            "latency".into(),
            "steady p50".into(),
            "steady p99".into(),
            "steady max".into(),
            "window p50".into(),
            "window p99".into(),
            "window max".into(),
            "p99 window/steady".into(),
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.variant.label().into(),
                    dur(r.steady.p50),
                    dur(r.steady.p99),
                    dur(r.steady.max),
                    dur(r.window.p50),
                    dur(r.window.p99),
                    dur(r.window.max),
                    ratio(r.window.p99, r.steady.p99),
                ]
            })
            .collect(),
    ));
    b.push(Block::Table(
        vec![
            "reload".into(),
            "handoff median".into(),
            "handoff max".into(),
            "window median".into(),
            "window max".into(),
            "drain median".into(),
            "drain max".into(),
            "drain after last median / max".into(),
            "idle RSS".into(),
            "peak RSS".into(),
        ],
        rows.iter()
            .map(|r| {
                let (hm, hx) = mm(&r.handoff);
                let (wm, wx) = mm(&r.windows);
                let (dm, dx) = mm(&r.drain);
                let last = if r.drain_last.is_empty() {
                    "n/a".to_string()
                } else {
                    let (lm, lx) = mm(&r.drain_last);
                    format!("{lm} / {lx}")
                };
                vec![
                    r.variant.label().into(),
                    hm,
                    hx,
                    wm,
                    wx,
                    dm,
                    dx,
                    last,
                    mb(r.idle_rss_kb),
                    mb(r.peak_rss_kb),
                ]
            })
            .collect(),
    ));
    let mut notes = Vec::new();
    for r in rows {
        if let (Some((ls, _)), Some((h, _))) =
            (median_max(&r.loaded_starts), median_max(&r.handoff))
        {
            notes.push(format!(
                "{}: a fresh hello started under this same load takes {} from exec to ready (median of {}); the handoff median is {} of that",
                r.variant.label(),
                dur(ls),
                r.loaded_starts.len(),
                ratio(h, ls)
            ));
        }
        if r.probe.n > 0 {
            notes.push(format!(
                "{}: control without any reload: the {} requests that overlapped one of those fresh starts of another hello (on another port, spawn until it exited again) had p50 {}, p99 {} ({} of steady p99), max {}",
                r.variant.label(),
                r.probe.n,
                dur(r.probe.p50),
                dur(r.probe.p99),
                ratio(r.probe.p99, r.steady.p99),
                dur(r.probe.max),
            ));
        }
        if r.variant.is_handover() && r.win_before.n > 0 {
            notes.push(format!(
                "{}: window requests started before the new PID was in the PID file ({}): {}; after ({}): {}",
                r.variant.label(),
                r.win_before.n,
                spread(&r.win_before),
                r.win_after.n,
                spread(&r.win_after),
            ));
        }
        if mode == Mode::KeepAlive && r.win_connected.n > 0 {
            notes.push(format!(
                "{}: in the windows, {} requests on an already open connection: {}; {} requests that first opened a new connection (after a `Connection: close`): {}",
                r.variant.label(),
                r.win_reused.n,
                spread(&r.win_reused),
                r.win_connected.n,
                spread(&r.win_connected),
            ));
        }
        if let Some((sc, _)) = median_max(&r.systemctl) {
            notes.push(format!(
                "{}: `systemctl --user show` alone takes {} under this same load (median of {}): the client's own start-up is part of every systemd trigger",
                r.variant.label(),
                dur(sc),
                r.systemctl.len()
            ));
        }
        if r.overruns > 0 {
            notes.push(format!(
                "{}: {} of {} windows outlasted the {} ms interval (the next reload waited for the window to close)",
                r.variant.label(),
                r.overruns,
                r.reloads,
                args.interval.as_millis()
            ));
        }
        if mode == Mode::KeepAlive && r.drain_last.len() < r.reloads {
            notes.push(format!(
                "{}: `drain after last` measured for {} of {} reloads (no `Connection: close` response seen in the others' windows)",
                r.variant.label(),
                r.drain_last.len(),
                r.reloads
            ));
        }
    }
    if let Some(h) = rows.iter().find(|r| r.variant == Variant::Sighup) {
        let (hh, hw) = (median_max(&h.handoff), median_max(&h.windows));
        for r in rows.iter().filter(|r| !r.variant.is_handover()) {
            let mut s = format!(
                "{} vs handover SIGHUP: failed requests {} vs {}; window p99 {}, window max {}",
                r.variant.label(),
                r.failed_total(),
                h.failed_total(),
                ratio(r.window.p99, h.window.p99),
                ratio(r.window.max, h.window.max),
            );
            if let (Some((a, _)), Some((b, _))) = (median_max(&r.handoff), hh) {
                let _ = write!(s, ", handoff median {}", ratio(a, b));
            }
            if let (Some((a, _)), Some((b, _))) = (median_max(&r.windows), hw) {
                let _ = write!(s, ", window median {}", ratio(a, b));
            }
            notes.push(s);
        }
    }
    for (v, why) in skipped {
        notes.push(format!("{}: skipped: {why}", v.label()));
    }
    if !notes.is_empty() {
        b.push(Block::List(notes));
    }
    b
}

/// The targets, evaluated on the `handover SIGHUP` rows (and the zero-failure
/// one on `handover systemctl reload` too).
pub fn targets(per_mode: &[(Mode, Vec<Row>)], solo: &Solo, args: &Args) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut missed = 0;
    let mut verdict = |ok: bool, text: String| {
        if !ok {
            missed += 1;
        }
        lines.push(format!("{}: {text}", if ok { "met" } else { "MISSED" }));
    };
    let scale = if args.reloads >= TARGET_RELOADS && args.clients >= TARGET_CLIENTS {
        String::new()
    } else {
        format!(
            " (this run: {} reloads, {} clients; the target is set at {TARGET_RELOADS} reloads, {TARGET_CLIENTS} clients)",
            args.reloads, args.clients
        )
    };
    for (mode, rows) in per_mode {
        for r in rows.iter().filter(|r| r.variant.is_handover()) {
            verdict(
                r.failed_total() == 0 && r.reloads == args.reloads,
                format!(
                    "0 failed requests, {}, {}: {} failed over {} reloads{scale}",
                    mode.label(),
                    r.variant.label(),
                    kinds(&r.failed),
                    r.reloads
                ),
            );
        }
    }
    // The handoff and a fresh start compared under the same conditions:
    // without load, and under each mode's load (the fresh starts are timed
    // during the same row, right after its reloads).
    let start = median_max(&solo.starts).map(|(m, _)| m).unwrap_or_default();
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    if let Some((h, _)) = median_max(&solo.unloaded_handoff) {
        let x = secs(h) / secs(start);
        verdict(
            x <= TARGET_HANDOFF_RATIO,
            format!(
                "handoff median within {TARGET_HANDOFF_RATIO}× of exec → ready, without load: handoff {} vs exec → ready {} ({x:.2}×)",
                dur(h),
                dur(start),
            ),
        );
    }
    for (mode, rows) in per_mode {
        let Some(r) = rows.iter().find(|r| r.variant == Variant::Sighup) else {
            continue;
        };
        if let (Some((h, _)), Some((ls, _))) =
            (median_max(&r.handoff), median_max(&r.loaded_starts))
        {
            let x = secs(h) / secs(ls);
            verdict(
                x <= TARGET_HANDOFF_RATIO,
                format!(
                    "handoff median within {TARGET_HANDOFF_RATIO}× of exec → ready, both under the {} load: handoff {} vs exec → ready {} ({x:.2}×); the handoff under load against exec → ready without load would be {:.2}×",
                    mode.label(),
                    dur(h),
                    dur(ls),
                    secs(h) / secs(start),
                ),
            );
        }
        let x = r.window.p99.as_secs_f64() / r.steady.p99.as_secs_f64().max(1e-9);
        verdict(
            x <= TARGET_P99_RATIO,
            format!(
                "p99 latency in reload windows at most {TARGET_P99_RATIO}× steady, {}: {} vs {} ({x:.2}×)",
                mode.label(),
                dur(r.window.p99),
                dur(r.steady.p99)
            ),
        );
        let (which, v) = if !r.drain_last.is_empty() {
            ("last response → gone, measured", &r.drain_last)
        } else {
            ("new PID in the PID file → gone, an upper bound", &r.drain)
        };
        if let Some((_, max)) = median_max(v) {
            verdict(
                max <= TARGET_DRAIN,
                format!(
                    "old process gone within {} ms after its last request, {}: max {} ({which})",
                    TARGET_DRAIN.as_millis(),
                    mode.label(),
                    dur(max)
                ),
            );
        }
    }
    verdict(
        solo.idle_rss_kb > 0 && solo.idle_rss_kb <= TARGET_IDLE_RSS_KB,
        format!(
            "idle RSS of hello at most 3 MB (3 MiB = {TARGET_IDLE_RSS_KB} kB): {} kB",
            solo.idle_rss_kb
        ),
    );
    (lines, missed)
}

fn cmd_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The machine the benchmark ran on.
pub fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let nproc = thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let mut commit = cmd_line("git", &["rev-parse", "--short", "HEAD"]);
    if dirty && commit != "unknown" {
        commit.push_str(" (with uncommitted changes)");
    }
    vec![
        ("kernel (uname -r)".into(), kernel),
        ("CPUs (nproc)".into(), nproc),
        ("CPU model".into(), cpu),
        ("memory".into(), mem),
        ("rustc".into(), cmd_line("rustc", &["--version"])),
        ("systemd".into(), cmd_line("systemctl", &["--version"])),
        ("commit".into(), commit),
        (
            "date (UTC)".into(),
            cmd_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ),
    ]
}
