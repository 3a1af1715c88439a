//! What the load saw, in bounded memory: each request lands in counters and latency
//! histograms of its class, decided when it ends from the [`Marks`] the benchmark sets as it
//! goes (reload windows, timed probes). Only the times of `Connection: close` answers inside a
//! reload window are kept one by one (at most one per connection and reload).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::hist::Hist;

/// Error messages kept, for the diagnostics.
const SAMPLES: usize = 10;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Connect refused: nothing listening.
    Refused,
    /// Connection reset, or a write into a closed connection.
    Reset,
    /// Closed by the server before the whole response.
    Closed,
    /// A connect, write or read took longer than the timeout.
    Timeout,
    /// A whole response, not 2xx.
    Status,
    /// Bytes that are not the HTTP response expected.
    Bad,
    /// Any other error.
    Other,
}

/// The failures, in the order the output lists them.
pub const FAILURES: [Outcome; 7] = [
    Outcome::Refused,
    Outcome::Reset,
    Outcome::Closed,
    Outcome::Timeout,
    Outcome::Status,
    Outcome::Bad,
    Outcome::Other,
];

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Closed => "closed",
            Outcome::Timeout => "timeout",
            Outcome::Status => "non-2xx",
            Outcome::Bad => "bad response",
            Outcome::Other => "other",
        }
    }

    pub fn of_io(e: &std::io::Error) -> Outcome {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Outcome::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Outcome::Reset,
            K::TimedOut | K::WouldBlock => Outcome::Timeout,
            K::UnexpectedEof => Outcome::Closed,
            _ => Outcome::Other,
        }
    }
}

/// Where the benchmark is, as the load sees it: a reload window (trigger, new PID seen, end)
/// and a timed probe, each a sequence number that only the benchmark's thread moves.
///
/// `window` mod 3: 0 steady, 1 window before the new PID is in the PID file, 2 after; window
/// `k` runs from `3k + 1` to `3k + 3`. `probe`: odd while a probe runs.
#[derive(Default)]
pub struct Marks {
    window: AtomicU64,
    probe: AtomicU64,
    /// The probe running (or last run) is a fresh start of a server, not a `systemctl` query.
    pub probe_fresh: AtomicBool,
}

impl Marks {
    /// A reload was triggered.
    pub fn trigger(&self) {
        let w = self.window.load(Ordering::SeqCst);
        if w % 3 == 0 {
            self.window.store(w + 1, Ordering::SeqCst);
        }
    }
    /// Its new PID is in the PID file.
    pub fn ready(&self) {
        let w = self.window.load(Ordering::SeqCst);
        if w % 3 == 1 {
            self.window.store(w + 1, Ordering::SeqCst);
        }
    }
    /// Its window is over.
    pub fn end(&self) {
        let w = self.window.load(Ordering::SeqCst);
        if w % 3 != 0 {
            self.window.store(w + 3 - w % 3, Ordering::SeqCst);
        }
    }
    /// A probe starts: a fresh start of a server (`fresh`) or a `systemctl` query.
    pub fn probe_begin(&self, fresh: bool) {
        self.probe_fresh.store(fresh, Ordering::SeqCst);
        let p = self.probe.load(Ordering::SeqCst);
        self.probe.store(p | 1, Ordering::SeqCst);
    }
    pub fn probe_end(&self) {
        let p = self.probe.load(Ordering::SeqCst);
        self.probe.store((p + 1) & !1, Ordering::SeqCst);
    }
    /// The window and probe sequence numbers now.
    pub fn now(&self) -> (u64, u64) {
        (
            self.window.load(Ordering::SeqCst),
            self.probe.load(Ordering::SeqCst),
        )
    }
}

/// What the load saw, by class.
#[derive(Default)]
pub struct Tally {
    /// Requests started (connect attempts included), and those answered 2xx.
    pub requests: u64,
    pub ok: u64,
    pub failed: BTreeMap<Outcome, u64>,
    /// The same, for requests whose lifetime overlapped a reload window.
    pub win_requests: u64,
    pub win_failed: BTreeMap<Outcome, u64>,
    /// Latency (ns) of 2xx requests: outside any window and probe, ...
    pub steady: Hist,
    /// ... overlapping a window, split by whether they started before the new PID was in the
    /// PID file and by whether they opened a connection first ...
    pub window: Hist,
    pub win_before: Hist,
    pub win_after: Hist,
    pub win_reused: Hist,
    pub win_connected: Hist,
    /// ... overlapping a fresh start of another server (and no window).
    pub probe: Hist,
    /// Keep-alive: by window, when each `Connection: close` answer was read (ns since the start).
    pub closes: Vec<Vec<u64>>,
    pub connections: u64,
    /// Connections still in a request when the load stopped, left behind.
    pub stuck: usize,
    /// From the start to every connection's first answer, and the first requests that failed
    /// (neither part of the load).
    pub ramp: Duration,
    pub ramp_failed: u64,
    /// The first errors, for the diagnostics.
    pub samples: Vec<String>,
}

/// One request, as the load saw it: times in ns since the load started, the marks when it
/// started and ended.
pub struct Request {
    pub start_ns: u64,
    pub end_ns: u64,
    pub marks_start: (u64, u64),
    pub marks_end: (u64, u64),
    /// A probe was a fresh start of a server (read when the request ended).
    pub probe_fresh: bool,
    /// It opened a connection first.
    pub connected: bool,
    /// Keep close times (keep-alive).
    pub keep_closes: bool,
    /// `Ok(close)` for a whole 2xx answer.
    pub result: Result<bool, (Outcome, String)>,
}

impl Tally {
    /// Counts a request in its class.
    pub fn record(&mut self, r: Request) {
        let ((w0, p0), (w1, p1)) = (r.marks_start, r.marks_end);
        let in_window = w0 % 3 != 0 || w1 != w0;
        let in_probe = p0 % 2 == 1 || p1 != p0;
        self.requests += 1;
        self.win_requests += u64::from(in_window);
        let close = match r.result {
            Err((kind, msg)) => {
                *self.failed.entry(kind).or_insert(0) += 1;
                if in_window {
                    *self.win_failed.entry(kind).or_insert(0) += 1;
                }
                if self.samples.len() < SAMPLES {
                    let at = Duration::from_nanos(r.start_ns);
                    self.samples
                        .push(format!("at {at:.3?}: {}: {msg}", kind.label()));
                }
                return;
            }
            Ok(close) => close,
        };
        self.ok += 1;
        let ns = r.end_ns.saturating_sub(r.start_ns);
        if in_probe {
            if r.probe_fresh && !in_window {
                self.probe.record(ns);
            }
        } else if in_window {
            self.window.record(ns);
            if w0 % 3 == 2 {
                self.win_after.record(ns);
            } else {
                self.win_before.record(ns);
            }
            if r.connected {
                self.win_connected.record(ns);
            } else {
                self.win_reused.record(ns);
            }
        } else {
            self.steady.record(ns);
        }
        if close && in_window && r.keep_closes {
            let k = (w0 / 3) as usize;
            if self.closes.len() <= k {
                self.closes.resize_with(k + 1, Vec::new);
            }
            self.closes[k].push(r.end_ns);
        }
    }

    /// Adds `o`'s counts to these.
    pub fn merge(&mut self, o: Tally) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.win_requests += o.win_requests;
        for (k, n) in o.failed {
            *self.failed.entry(k).or_insert(0) += n;
        }
        for (k, n) in o.win_failed {
            *self.win_failed.entry(k).or_insert(0) += n;
        }
        let hists = [
            (&mut self.steady, &o.steady),
            (&mut self.window, &o.window),
            (&mut self.win_before, &o.win_before),
            (&mut self.win_after, &o.win_after),
            (&mut self.win_reused, &o.win_reused),
            (&mut self.win_connected, &o.win_connected),
            (&mut self.probe, &o.probe),
        ];
        for (a, b) in hists {
            a.merge(b);
        }
        if self.closes.len() < o.closes.len() {
            self.closes.resize_with(o.closes.len(), Vec::new);
        }
        for (a, b) in self.closes.iter_mut().zip(o.closes) {
            a.extend(b);
        }
        self.connections += o.connections;
        self.stuck += o.stuck;
        self.ramp = self.ramp.max(o.ramp);
        self.ramp_failed += o.ramp_failed;
        let room = SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(o.samples.into_iter().take(room));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(marks_start: (u64, u64), marks_end: (u64, u64), ok: bool) -> Request {
        Request {
            start_ns: 1_000,
            end_ns: 3_000,
            marks_start,
            marks_end,
            probe_fresh: true,
            connected: false,
            keep_closes: true,
            result: if ok {
                Ok(true)
            } else {
                Err((Outcome::Reset, "reset".into()))
            },
        }
    }

    #[test]
    fn marks_move_through_windows_and_probes() {
        let m = Marks::default();
        assert_eq!(m.now(), (0, 0));
        m.trigger();
        m.trigger();
        assert_eq!(m.now().0, 1);
        m.ready();
        assert_eq!(m.now().0, 2);
        m.end();
        assert_eq!(m.now().0, 3);
        // A window whose new PID was never seen (a failed reload) still ends.
        m.trigger();
        m.end();
        m.end();
        assert_eq!(m.now().0, 6);
        m.probe_begin(false);
        assert_eq!(m.now().1, 1);
        assert!(!m.probe_fresh.load(Ordering::SeqCst));
        m.probe_end();
        assert_eq!(m.now().1, 2);
    }

    #[test]
    fn requests_land_in_their_class() {
        let mut t = Tally::default();
        // (marks at start, at end): steady; in window 0 before / after the new PID; started
        // before window 1 and ended in it; spanning probe 1; a failure in window 0.
        t.record(req((0, 0), (0, 0), true));
        t.record(req((1, 0), (1, 0), true));
        t.record(req((2, 0), (3, 0), true));
        t.record(req((3, 0), (4, 0), true));
        t.record(req((6, 0), (6, 1), true));
        t.record(req((1, 0), (2, 0), false));
        assert_eq!((t.requests, t.ok, t.win_requests), (6, 5, 4));
        assert_eq!(t.failed.get(&Outcome::Reset), Some(&1));
        assert_eq!(t.win_failed.get(&Outcome::Reset), Some(&1));
        assert_eq!((t.steady.n(), t.window.n(), t.probe.n()), (1, 3, 1));
        assert_eq!((t.win_before.n(), t.win_after.n()), (2, 1));
        assert_eq!((t.win_reused.n(), t.win_connected.n()), (3, 0));
        assert_eq!(t.closes, vec![vec![3_000, 3_000], vec![3_000]]);
        assert_eq!(t.steady.max(), 2_000);
        assert_eq!(t.samples.len(), 1);
        let mut all = Tally::default();
        all.merge(t);
        all.merge(Tally {
            requests: 1,
            closes: vec![vec![], vec![], vec![9]],
            ..Tally::default()
        });
        assert_eq!(all.requests, 7);
        assert_eq!(all.closes.len(), 3);
        assert_eq!(all.window.n(), 3);
    }
}
