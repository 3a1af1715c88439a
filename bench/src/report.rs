//! The output: the figures of each set of rows, of the servers on their own, what they mean,
//! and the machine.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::args::{Args, Mode, Runtime, Variant};
pub use crate::render::{dur, kinds, mb, mm, ratio, render, spread, Block};
use crate::stats::{median_max, Row};
use crate::steps::Steps;

/// What the figures mean.
pub fn definitions() -> Block {
    Block::List(vec![
        "rows: `handover SIGHUP` runs `examples/hello --pid-file` by hand and sends its PID SIGHUP, on each runtime of `--runtime` (`current-thread`, or `multi-thread`: one worker per CPU). `plain restart` runs `examples/plain` (the same service without handover: binds, serves, exits on SIGTERM after hyper's graceful shutdown): SIGTERM, wait for the exit, start it again. `systemctl restart` and `handover systemctl reload` run hello as `hello.socket` + `hello.service` (Type=notify) under a private systemd user manager: `systemctl --user restart` (systemd keeps the socket, the process is replaced without a handoff) and `systemctl --user reload` (`ExecReload=/bin/kill -HUP $MAINPID`: the handoff under systemd). The baselines run on the first runtime of `--runtime`.".into(),
        "load: N connections over 127.0.0.1, driven by up to 8 threads of the benchmark, each a tokio current-thread runtime with one task per connection (so 8 connections get a thread each, like the thread-per-client load of the integration tests that earlier runs of this benchmark used, and 10,000 cost no more than 8 threads). keep-alive: `GET /` after `GET /` on each connection, back to back; a `Connection: close` answer makes it reconnect (not an error). new connection per request: each `GET /` on a new connection with `Connection: close`, the server closing first. Ramp: every connection connects (128 at a time per thread), sends one request and waits; once all have an answer they all go, and the warm-up starts. `connections up in`: from the start of the ramp until every connection had its first answer; the ramp's requests are not counted.".into(),
        "reload window: from the trigger (signal sent, or `systemctl` started) until the old process has exited, the new one is in the PID file and `systemctl` (if any) has returned; steady state is everything else. A request is in a window when its lifetime (connect or write until response or error) overlaps one.".into(),
        "handoff: trigger → a new PID in the PID file (the new process writes it once it is the serving one). For the restarts: trigger → the new process in the PID file.".into(),
        "handoff steps (medians over the reloads whose log lines were found): trigger → `upgrade started` (the benchmark's wall clock at the trigger against the timestamp of the old process's log line; under systemd the journal's reception time); spawn (upgrade start → new process started), ready (→ its `ready` read, the state sent), announce (`MAINPID=`, `READY=1`, `BARRIER=1` to the service manager; 0 run by hand) and confirm (`main` written to the new process), from the fields `spawn_us`, `ready_us`, `announce_us`, `confirm_us` of the old process's `upgrade complete; draining` line (n/a when the library does not log them); upgrade: that line's `elapsed_ms`; confirm → PID file: `main` written (the `upgrade started` timestamp plus spawn, ready, announce and confirm; without those fields, the `upgrade complete; draining` line's timestamp) → the new PID seen in the PID file (negative when the old process logged after the new one had written it).".into(),
        "exec → ready: a server started fresh on another port, spawn → its PID in the PID file (the same definition as the handoff); timed without load (hello and plain), and again under each load right after the reloads of each `handover SIGHUP` row. The handoff target compares the two under the same conditions.".into(),
        "drain: for a handoff, new PID in the PID file → old process gone (the old one stops accepting at about that moment, so this bounds `last request served → gone` from above; 0 when the old process was gone before the new one had written the PID file, which happens under systemd, where the new process writes it only after the old one has had `MAINPID=` confirmed); for a restart, trigger → old process gone. `drain after last` (keep-alive only, measured): the old process's last response → old process gone; a serving process never sends `Connection: close`, so the last `Connection: close` response before the exit is the old process's last request.".into(),
        "process gone: its pidfd became readable (exit, before reaping). PID file changes are seen through inotify; both are event-driven, timestamps are taken when the event is seen.".into(),
        "memory on its own: private = `Private_Clean + Private_Dirty` of `/proc/PID/smaps_rollup` (what the process costs by itself; the clean part is mostly the binary's code and read-only data read from disk, private because no other process maps that file, shared with the next generation during a handoff; the dirty part is what it wrote: heap, stacks, relocated data), Pss (its share of everything it maps), Rss (VmRSS: mostly file pages shared with any other process of the same binary), of a server started fresh, 0.3 s after ready, before any load: the median of its last 5 fresh starts, each after the whole binary was read into the page cache (the kernel maps the cached pages around each page a process touches, so a binary partly evicted gives less). idle RSS (rows): VmRSS of the row's server before its load. peak RSS: over all reloads, VmHWM of the old process (last read before it exited) plus VmHWM of the new one at the end of the window when both were alive at once, else the larger of the two. With state: the old process's VmHWM as it logs it in its last line (its true peak), the new one's VmHWM at the end of the window.".into(),
        "failed requests by kind: refused (connect refused), reset (connection reset or broken pipe), closed (connection closed before the whole response), timeout (connect, write or read longer than `--timeout-ms`), non-2xx, bad response (not the HTTP expected), other. After a failure a connection pauses 10 ms before its next request, so counts of refused connects depend on that pause.".into(),
        "latency: request start (connect for a new connection, else the write) → response read, successful requests only, in histograms of 1.6 % resolution (the maximum exact). Requests that overlap the extra timings taken after the reloads (fresh starts of another hello, `systemctl show` queries) are left out of the latency figures (not out of the request and failure counts).".into(),
    ])
}

pub fn med(v: &[Duration]) -> String {
    median_max(v).map_or_else(|| "n/a".into(), |(m, _)| dur(m))
}

/// The median of signed µs.
fn med_us(v: &[i64]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    match v.get(v.len().saturating_sub(1) / 2) {
        None => "n/a".into(),
        Some(&m) if m < 0 => format!("-{}", dur(Duration::from_micros(m.unsigned_abs()))),
        Some(&m) => dur(Duration::from_micros(m as u64)),
    }
}

/// A row of [`steps_head`].
pub fn steps_row(label: String, s: &Steps) -> Vec<String> {
    vec![
        label,
        med(&s.to_started),
        med(&s.spawn),
        med(&s.ready),
        med(&s.announce),
        med(&s.confirm),
        med(&s.upgrade),
        med_us(&s.to_pid_file),
    ]
}

/// The handoff steps of the rows that hand over.
fn steps_table(rows: &[Row], first: Runtime) -> Block {
    Block::Table(
        steps_head("handoff steps (medians)"),
        rows.iter()
            .filter(|r| r.variant.is_handover())
            .map(|r| steps_row(r.label(first), &r.steps))
            .collect(),
    )
}

pub fn steps_head(first: &str) -> Vec<String> {
    [
        first,
        "trigger → `upgrade started`",
        "spawn",
        "ready",
        "announce",
        "confirm",
        "upgrade",
        "confirm → PID file",
    ]
    .map(String::from)
    .to_vec()
}

/// The tables and notes of one load mode.
pub fn mode_blocks(
    (conns, mode, reloads): (usize, Mode, usize),
    rows: &[Row],
    skipped: &[(Variant, String)],
    args: &Args,
) -> Vec<Block> {
    let first = args.runtimes[0];
    let mut b = vec![Block::Heading(format!(
        "### {}: {conns} connections, {reloads} reloads every {} ms",
        mode.label(),
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
            "connections up in".into(),
        ],
        rows.iter()
            .map(|r| {
                vec![
                    r.label(first),
                    r.reloads.to_string(),
                    r.requests.to_string(),
                    kinds(&r.failed),
                    r.win_requests.to_string(),
                    kinds(&r.win_failed),
                    dur(r.ramp),
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
                    r.label(first),
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
                    r.label(first),
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
                r.label(first),
                dur(ls),
                r.loaded_starts.len(),
                ratio(h, ls)
            ));
        }
        if r.probe.n > 0 {
            notes.push(format!(
                "{}: control without any reload: the {} requests that overlapped one of those fresh starts of another hello (on another port, spawn until it exited again) had p50 {}, p99 {} ({} of steady p99), max {}",
                r.label(first),
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
                r.label(first),
                r.win_before.n,
                spread(&r.win_before),
                r.win_after.n,
                spread(&r.win_after),
            ));
        }
        if mode == Mode::KeepAlive && r.win_connected.n > 0 {
            notes.push(format!(
                "{}: in the windows, {} requests on an already open connection: {}; {} requests that first opened a new connection (after a `Connection: close`): {}",
                r.label(first),
                r.win_reused.n,
                spread(&r.win_reused),
                r.win_connected.n,
                spread(&r.win_connected),
            ));
        }
        if let Some((sc, _)) = median_max(&r.systemctl) {
            notes.push(format!(
                "{}: `systemctl --user show` alone takes {} under this same load (median of {}): the client's own start-up is part of every systemd trigger",
                r.label(first),
                dur(sc),
                r.systemctl.len()
            ));
        }
        if r.overruns > 0 {
            notes.push(format!(
                "{}: {} of {} windows outlasted the {} ms interval (the next reload waited for the window to close)",
                r.label(first),
                r.overruns,
                r.reloads,
                args.interval.as_millis()
            ));
        }
        if mode == Mode::KeepAlive && r.drain_last.len() < r.reloads {
            notes.push(format!(
                "{}: `drain after last` measured for {} of {} reloads (no `Connection: close` response seen in the others' windows)",
                r.label(first),
                r.drain_last.len(),
                r.reloads
            ));
        }
    }
    b.push(steps_table(rows, first));
    for r in rows.iter().filter(|r| r.ramp_failed > 0) {
        notes.push(format!(
            "{}: {} of the {conns} first requests (opening the connections, before the load) failed",
            r.label(first),
            r.ramp_failed
        ));
    }
    for r in rows.iter().filter(|r| r.stuck > 0) {
        notes.push(format!(
            "{}: {} connections were still in a request when the load stopped, after twice the timeout, and were left behind",
            r.label(first),
            r.stuck
        ));
    }
    if let Some(h) = rows
        .iter()
        .find(|r| r.variant == Variant::Sighup && r.runtime == first)
    {
        let (hh, hw) = (median_max(&h.handoff), median_max(&h.windows));
        for r in rows.iter().filter(|r| r.variant != Variant::Sighup) {
            let mut s = format!(
                "{} vs {}: failed requests {} vs {}; window p99 {}, window max {}",
                r.label(first),
                h.label(first),
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
