//! From a row's tally and reloads to its figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::args::{Mode, Runtime, Variant};
use crate::hist::Hist;
use crate::load::Outcome;
use crate::rows::RowData;
use crate::servers::Reload;
use crate::steps::Steps;

/// Latency figures of a set of requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    pub n: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

fn lat(h: &Hist) -> Lat {
    Lat {
        n: h.n(),
        p50: Duration::from_nanos(h.quantile(0.50)),
        p99: Duration::from_nanos(h.quantile(0.99)),
        max: Duration::from_nanos(h.max()),
    }
}

/// The median and the maximum.
pub fn median_max(v: &[Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    Some((s[(s.len() - 1) / 2], *s.last().unwrap()))
}

/// A row's figures.
pub struct Row {
    pub variant: Variant,
    pub runtime: Runtime,
    pub reloads: usize,
    pub requests: u64,
    pub failed: BTreeMap<Outcome, u64>,
    pub win_requests: u64,
    pub win_failed: BTreeMap<Outcome, u64>,
    pub steady: Lat,
    pub window: Lat,
    /// Keep-alive windows: requests on an open connection, and requests
    /// that opened one (after a `Connection: close`).
    pub win_reused: Lat,
    pub win_connected: Lat,
    /// Requests overlapping a fresh start of another hello (the control).
    pub probe: Lat,
    /// Window requests started before / after the new PID was in the PID
    /// file.
    pub win_before: Lat,
    pub win_after: Lat,
    pub handoff: Vec<Duration>,
    pub windows: Vec<Duration>,
    pub drain: Vec<Duration>,
    /// Keep-alive only: last `Connection: close` response → old process gone.
    pub drain_last: Vec<Duration>,
    pub idle_rss_kb: u64,
    pub peak_rss_kb: u64,
    pub overruns: usize,
    pub elapsed: Duration,
    /// Opening every connection, until each had its first answer.
    pub ramp: Duration,
    pub ramp_failed: u64,
    /// Connections left in a request when the load stopped.
    pub stuck: usize,
    pub loaded_starts: Vec<Duration>,
    /// `systemctl --user show` under the load (systemd rows).
    pub systemctl: Vec<Duration>,
    pub steps: Steps,
    /// The first errors, for the progress output.
    pub samples: Vec<String>,
}

impl Row {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The row's name: how it reloads, and on which runtime if not the first.
    pub fn label(&self, first: Runtime) -> String {
        if self.runtime == first {
            self.variant.label().into()
        } else {
            format!("{}, {}", self.variant.label(), self.runtime.label())
        }
    }
}

/// The figures of a row.
pub fn analyse(d: RowData, mode: Mode) -> Row {
    let ns = |t: Instant| t.saturating_duration_since(d.t0).as_nanos() as u64;
    let t = &d.tally;
    // Keep-alive: every `Connection: close` response comes from a draining old process (a
    // serving one never closes), so the last one of a window before the old process exited is
    // its last request.
    let drain_last = if mode == Mode::KeepAlive {
        d.reloads
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let (from, gone) = (ns(r.trigger), ns(r.gone));
                let last = t
                    .closes
                    .get(i)?
                    .iter()
                    .copied()
                    .filter(|e| (from..=gone).contains(e))
                    .max()?;
                Some(Duration::from_nanos(gone - last))
            })
            .collect()
    } else {
        Vec::new()
    };
    Row {
        variant: d.variant,
        runtime: d.runtime,
        reloads: d.reloads.len(),
        requests: t.requests,
        failed: t.failed.clone(),
        win_requests: t.win_requests,
        win_failed: t.win_failed.clone(),
        steady: lat(&t.steady),
        window: lat(&t.window),
        win_reused: lat(&t.win_reused),
        win_connected: lat(&t.win_connected),
        probe: lat(&t.probe),
        win_before: lat(&t.win_before),
        win_after: lat(&t.win_after),
        handoff: d.reloads.iter().map(|r| r.ready - r.trigger).collect(),
        windows: d.reloads.iter().map(|r| r.end() - r.trigger).collect(),
        drain: d
            .reloads
            .iter()
            .map(|r| r.gone.saturating_duration_since(r.drain_from))
            .collect(),
        drain_last,
        idle_rss_kb: d.idle_rss_kb,
        peak_rss_kb: d.reloads.iter().map(Reload::peak_kb).max().unwrap_or(0),
        overruns: d.overruns,
        elapsed: d.elapsed,
        ramp: t.ramp,
        ramp_failed: t.ramp_failed,
        stuck: t.stuck,
        loaded_starts: d
            .probes
            .iter()
            .filter(|p| !p.systemctl)
            .map(|p| p.took)
            .collect(),
        systemctl: d
            .probes
            .iter()
            .filter(|p| p.systemctl)
            .map(|p| p.took)
            .collect(),
        samples: t.samples.clone(),
        steps: d.steps,
    }
}
