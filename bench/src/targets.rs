//! The targets the figures are held to, each printed as `met` or `MISSED`.
//!
//! | target | rows |
//! |---|---|
//! | 0 failed requests | every handover row: each connection count, mode and runtime |
//! | handoff median ≤ 22 ms | `handover SIGHUP`, 2,000 keep-alive connections, each runtime |
//! | handoff median ≤ 1.5× exec → ready, both under the same load | `handover SIGHUP`, 8 connections; and without load |
//! | window p99 ≤ 2× steady p99, old process gone ≤ 100 ms after its last request | `handover SIGHUP`, 8 connections |
//! | hello's idle private memory ≤ 1.1× plain's | on their own |
//! | 64 MiB of state handed over in < 100 ms (median) | on their own, `--state-bytes` |

use std::time::Duration;

use crate::args::{Args, Mode, Variant};
use crate::render::{dur, kinds, mb};
use crate::solo::Solo;
use crate::stats::{median_max, Row};

/// Where the targets are set.
const TARGET_SMALL_CONNS: usize = 8;
const TARGET_SMALL_RELOADS: usize = 100;
const TARGET_LARGE_CONNS: usize = 2000;
const TARGET_LARGE_HANDOFF: Duration = Duration::from_millis(22);
const TARGET_HANDOFF_RATIO: f64 = 1.5;
const TARGET_P99_RATIO: f64 = 2.0;
const TARGET_DRAIN: Duration = Duration::from_millis(100);
const TARGET_PRIVATE_RATIO: f64 = 1.10;
const TARGET_STATE_BYTES: usize = 64 << 20;
const TARGET_STATE_HANDOFF: Duration = Duration::from_millis(100);

/// A set of rows: connections, mode, reloads per row.
pub type Set = ((usize, Mode, usize), Vec<Row>);

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// The verdicts, and how many were missed.
pub fn targets(sets: &[Set], solo: &Solo, args: &Args) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut missed = 0;
    let mut verdict = |ok: bool, text: String| {
        if !ok {
            missed += 1;
        }
        lines.push(format!("{}: {text}", if ok { "met" } else { "MISSED" }));
    };
    let first = args.runtimes[0];
    for ((conns, mode, reloads), rows) in sets {
        for r in rows.iter().filter(|r| r.variant.is_handover()) {
            let scale = if *conns == TARGET_SMALL_CONNS && *reloads < TARGET_SMALL_RELOADS {
                format!(" (the target is set at {TARGET_SMALL_RELOADS} reloads)")
            } else {
                String::new()
            };
            verdict(
                r.failed_total() == 0 && r.stuck == 0 && r.reloads == *reloads,
                format!(
                    "0 failed requests, {conns} connections, {}, {}: {} failed over {} reloads{scale}",
                    mode.label(),
                    r.label(first),
                    kinds(&r.failed),
                    r.reloads
                ),
            );
        }
    }
    for ((conns, mode, _), rows) in sets {
        if *conns != TARGET_LARGE_CONNS || *mode != Mode::KeepAlive {
            continue;
        }
        for r in rows.iter().filter(|r| r.variant == Variant::Sighup) {
            if let Some((h, _)) = median_max(&r.handoff) {
                verdict(
                    h <= TARGET_LARGE_HANDOFF,
                    format!(
                        "handoff median at most {} ms at {conns} keep-alive connections, {}: {}",
                        TARGET_LARGE_HANDOFF.as_millis(),
                        r.label(first),
                        dur(h)
                    ),
                );
            }
        }
    }
    // The handoff and a fresh start compared under the same conditions: without load, and
    // under each 8-connection load (the fresh starts are timed during the same row, right
    // after its reloads).
    let start = median_max(&solo.hello_starts)
        .map(|(m, _)| m)
        .unwrap_or_default();
    if let Some((h, _)) = median_max(&solo.unloaded.handoffs()) {
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
    for ((conns, mode, _), rows) in sets {
        if *conns != TARGET_SMALL_CONNS {
            continue;
        }
        for r in rows.iter().filter(|r| r.variant == Variant::Sighup) {
            let label = r.label(first);
            if let (Some((h, _)), Some((ls, _))) =
                (median_max(&r.handoff), median_max(&r.loaded_starts))
            {
                let x = secs(h) / secs(ls);
                verdict(
                    x <= TARGET_HANDOFF_RATIO,
                    format!(
                        "handoff median within {TARGET_HANDOFF_RATIO}× of exec → ready, both under the {conns}-connection {} load, {label}: handoff {} vs exec → ready {} ({x:.2}×)",
                        mode.label(),
                        dur(h),
                        dur(ls),
                    ),
                );
            }
            let x = secs(r.window.p99) / secs(r.steady.p99);
            verdict(
                x <= TARGET_P99_RATIO,
                format!(
                    "p99 latency in reload windows at most {TARGET_P99_RATIO}× steady, {conns} connections, {}, {label}: {} vs {} ({x:.2}×)",
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
                        "old process gone within {} ms after its last request, {conns} connections, {}, {label}: max {} ({which})",
                        TARGET_DRAIN.as_millis(),
                        mode.label(),
                        dur(max)
                    ),
                );
            }
        }
    }
    match (solo.hello_idle, solo.plain_idle) {
        (Some(h), Some(p)) => {
            let x = h.private_kb as f64 / (p.private_kb as f64).max(1.0);
            verdict(
                x <= TARGET_PRIVATE_RATIO,
                format!(
                    "hello's idle private memory within {:.0} % of plain's: {} vs {} ({:+.1} %)",
                    (TARGET_PRIVATE_RATIO - 1.0) * 100.0,
                    mb(h.private_kb),
                    mb(p.private_kb),
                    (x - 1.0) * 100.0
                ),
            );
        }
        _ => verdict(false, "idle private memory: could not be read".into()),
    }
    if let Some((bytes, u)) = &solo.state {
        let scale = if *bytes == TARGET_STATE_BYTES {
            String::new()
        } else {
            format!(" (this run: {bytes} bytes; the target is set at 64 MiB)")
        };
        if let Some((h, _)) = median_max(&u.handoffs()) {
            verdict(
                h < TARGET_STATE_HANDOFF && u.checks_bad == 0 && u.checks_ok == u.reloads.len(),
                format!(
                    "64 MiB of state handed over in less than {} ms (handoff median, without load; every new process's check ok): {}, {} of {} checks ok{scale}",
                    TARGET_STATE_HANDOFF.as_millis(),
                    dur(h),
                    u.checks_ok,
                    u.reloads.len()
                ),
            );
        }
    }
    (lines, missed)
}
