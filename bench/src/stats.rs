//! From the requests and reloads of a row to its figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::load::{ErrorKind, Record};

use crate::args::{Mode, Variant};
use crate::rows::RowData;
use crate::servers::Reload;

/// How a request ended, as the output counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    Refused,
    Reset,
    Closed,
    Timeout,
    Status,
    Other,
}

/// The failures, in the order the output lists them.
pub const FAILURES: [Outcome; 6] = [
    Outcome::Refused,
    Outcome::Reset,
    Outcome::Closed,
    Outcome::Timeout,
    Outcome::Status,
    Outcome::Other,
];

impl Outcome {
    /// The outcome of a recorded request.
    pub fn of(r: &Record) -> Outcome {
        match r.result {
            Ok(()) => Outcome::Ok,
            Err(ErrorKind::Refused) => Outcome::Refused,
            Err(ErrorKind::Reset) => Outcome::Reset,
            Err(ErrorKind::EofBeforeResponse | ErrorKind::EofMidResponse) => Outcome::Closed,
            Err(ErrorKind::Timeout) => Outcome::Timeout,
            Err(ErrorKind::Status) => Outcome::Status,
            Err(ErrorKind::Connect | ErrorKind::Malformed | ErrorKind::Io) => Outcome::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Closed => "closed",
            Outcome::Timeout => "timeout",
            Outcome::Status => "non-2xx",
            Outcome::Other => "other",
        }
    }
}

/// Latency figures of a set of requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

fn lat(mut v: Vec<u64>) -> Lat {
    if v.is_empty() {
        return Lat::default();
    }
    v.sort_unstable();
    let rank = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Duration::from_nanos(v[i])
    };
    Lat {
        n: v.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: Duration::from_nanos(*v.last().unwrap()),
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
    pub loaded_starts: Vec<Duration>,
    /// `systemctl --user show` under the load (systemd rows).
    pub systemctl: Vec<Duration>,
}

impl Row {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// The figures of a row.
pub fn analyse(d: RowData, mode: Mode) -> Row {
    let ns = |t: Instant| t.saturating_duration_since(d.t0).as_nanos() as u64;
    let windows: Vec<(u64, u64)> = d
        .reloads
        .iter()
        .map(|r| (ns(r.trigger), ns(r.end())))
        .collect();
    let readies: Vec<u64> = d.reloads.iter().map(|r| ns(r.ready)).collect();
    let in_window = |r: &Record| {
        let i = windows.partition_point(|w| w.1 < r.start_ns);
        i < windows.len() && windows[i].0 <= r.end_ns
    };
    // Whether a window request started before that window's new PID was in
    // the PID file (the old process still the serving one).
    let before_ready = |r: &Record| {
        let i = windows.partition_point(|w| w.1 < r.start_ns);
        i < windows.len() && r.start_ns < readies[i]
    };
    let excluded: Vec<(u64, u64, bool)> = d
        .probes
        .iter()
        .map(|p| (ns(p.from), ns(p.done), p.systemctl))
        .collect();
    let overlaps = |r: &Record, start_probe: bool| {
        excluded
            .iter()
            .any(|e| e.0 <= r.end_ns && r.start_ns <= e.1 && (!start_probe || !e.2))
    };
    // The control: requests that overlap a fresh start of another hello (no
    // reload at all).
    let mut probe_lat = Vec::new();
    let mut failed = BTreeMap::new();
    let mut win_failed = BTreeMap::new();
    let (mut steady, mut window) = (Vec::new(), Vec::new());
    // Window requests split by whether they opened a connection first.
    let (mut win_reused, mut win_connected) = (Vec::new(), Vec::new());
    // ... and by whether they started before the new PID was in the PID file.
    let (mut win_before, mut win_after) = (Vec::new(), Vec::new());
    let mut win_requests = 0;
    for r in &d.recs {
        let w = in_window(r);
        win_requests += u64::from(w);
        if Outcome::of(r) == Outcome::Ok {
            let l = r.end_ns - r.start_ns;
            if overlaps(r, false) {
                // Overlaps a timed probe: in no latency class.
                if overlaps(r, true) {
                    probe_lat.push(l);
                }
            } else if w {
                window.push(l);
                if before_ready(r) {
                    win_before.push(l)
                } else {
                    win_after.push(l)
                }
                if r.connected {
                    win_connected.push(l)
                } else {
                    win_reused.push(l)
                }
            } else {
                steady.push(l)
            }
        } else {
            *failed.entry(Outcome::of(r)).or_insert(0) += 1;
            if w {
                *win_failed.entry(Outcome::of(r)).or_insert(0) += 1;
            }
        }
    }
    // Keep-alive: every `Connection: close` response comes from a draining
    // old process (a serving one never closes), so the last one before the
    // old process exited is its last request.
    let mut close_ends: Vec<u64> = d
        .recs
        .iter()
        .filter(|r| Outcome::of(r) == Outcome::Ok && r.close)
        .map(|r| r.end_ns)
        .collect();
    close_ends.sort_unstable();
    let drain_last = if mode == Mode::KeepAlive {
        d.reloads
            .iter()
            .filter_map(|r| {
                let (from, gone) = (ns(r.trigger), ns(r.gone));
                let i = close_ends.partition_point(|e| *e <= gone);
                let last = *close_ends[..i].last()?;
                (last >= from).then(|| Duration::from_nanos(gone - last))
            })
            .collect()
    } else {
        Vec::new()
    };
    Row {
        variant: d.variant,
        reloads: d.reloads.len(),
        requests: d.recs.len() as u64,
        failed,
        win_requests,
        win_failed,
        steady: lat(steady),
        window: lat(window),
        win_reused: lat(win_reused),
        win_connected: lat(win_connected),
        probe: lat(probe_lat),
        win_before: lat(win_before),
        win_after: lat(win_after),
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
        loaded_starts: d
            .probes
            .iter()
            .filter(|p| !p.systemctl)
            .map(|p| p.to - p.from)
            .collect(),
        systemctl: d
            .probes
            .iter()
            .filter(|p| p.systemctl)
            .map(|p| p.to - p.from)
            .collect(),
    }
}
