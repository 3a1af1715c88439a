//! Where a handoff's time goes, from what the servers log: tracing-subscriber's fmt lines on
//! stderr (run by hand: RFC 3339 UTC timestamps in µs), or journal entries (under systemd:
//! the journal's reception time), parsed leniently (a line that does not parse is skipped, a
//! field that is missing gives `n/a`).
//!
//! | step | from | to |
//! |---|---|---|
//! | trigger → started | the benchmark sends the trigger (wall clock) | the old process logs `upgrade started` |
//! | spawn | upgrade start | the new process started (`spawn_us` of `upgrade complete; draining`) |
//! | ready | started | its `ready` read, the state sent (`ready_us`) |
//! | announce | | `MAINPID=`/`READY=1`/`BARRIER=1` to the manager (`announce_us`; 0 run by hand) |
//! | confirm | | `main` written to the new process (`confirm_us`) |
//! | upgrade | `upgrade started` | `upgrade complete; draining` (`elapsed_ms`) |
//! | confirm → PID file | `main` written: `upgrade started` + spawn + ready + announce + confirm (without those fields: when `upgrade complete; draining` was logged) | the benchmark sees the new PID in the PID file (the new process writes it once it has `main`, so this may be negative when the old process logs late) |

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::systemd::JournalEntry;

use crate::servers::Reload;

/// A log line: when (µs since the epoch), its message and its fields (names lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub wall_us: u64,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl Event {
    pub fn num(&self, name: &str) -> Option<u64> {
        self.fields.get(name)?.parse().ok()
    }
}

/// `t` on the wall clock, µs since the epoch (one reading of both clocks as the base).
pub fn wall_us(t: Instant) -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (i0, w0) = *BASE.get_or_init(|| {
        let w = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        (Instant::now(), w)
    });
    if t >= i0 {
        w0 + (t - i0).as_micros() as u64
    } else {
        w0.saturating_sub((i0 - t).as_micros() as u64)
    }
}

/// `2026-12-01T22:24:22.795650Z` (UTC, any number of fraction digits) as µs since the epoch.
pub fn rfc3339_us(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let us: i64 = format!("{:0<6}", &frac[..frac.len().min(6)]).parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000 + us).ok()
}

/// Splits on spaces outside double quotes; quotes removed, `\"` and `\\` unescaped.
fn tokens(s: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut inq, mut esc) = (String::new(), false, false, false);
    for c in s.chars() {
        match c {
            _ if esc => {
                cur.push(c);
                esc = false;
            }
            '\\' if inq => esc = true,
            '"' => {
                inq = !inq;
                quoted = true;
            }
            ' ' if !inq => {
                if !cur.is_empty() || quoted {
                    out.push((std::mem::take(&mut cur), quoted));
                }
                quoted = false;
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() || quoted {
        out.push((cur, quoted));
    }
    out
}

fn is_field_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// One fmt line: `TIMESTAMP LEVEL target: message key=value ...`.
pub fn parse_line(line: &str) -> Option<Event> {
    let mut it = line.split_whitespace();
    let wall_us = rfc3339_us(it.next()?)?;
    let level = it.next()?;
    if !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level) {
        return None;
    }
    let (_, rest) = line.split_once(level)?;
    let rest = rest.trim_start();
    let (_target, rest) = rest.split_once(": ")?;
    let mut message = Vec::new();
    let mut fields = BTreeMap::new();
    for (tok, _) in tokens(rest) {
        match tok.split_once('=') {
            Some((k, v)) if is_field_name(k) && (!fields.is_empty() || !message.is_empty()) => {
                fields.insert(k.to_owned(), v.to_owned());
            }
            _ if fields.is_empty() => message.push(tok),
            _ => {}
        }
    }
    Some(Event {
        wall_us,
        message: message.join(" "),
        fields,
    })
}

/// The events of a log file; unreadable or unparsable lines are skipped.
pub fn read_log(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_line)
        .collect()
}

/// A journal entry written by tracing-journald (fields upper case, no prefix).
pub fn from_journal(e: &JournalEntry) -> Option<Event> {
    let wall_us = e.get("__REALTIME_TIMESTAMP")?.parse().ok()?;
    let message = e.get("MESSAGE")?.clone();
    let fields = e
        .iter()
        .filter(|(k, _)| !k.starts_with('_') && k.as_str() != "MESSAGE")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    Some(Event {
        wall_us,
        message,
        fields,
    })
}

/// A row's handoff steps, one entry per reload where the logs had it.
#[derive(Default)]
pub struct Steps {
    pub to_started: Vec<Duration>,
    pub spawn: Vec<Duration>,
    pub ready: Vec<Duration>,
    pub announce: Vec<Duration>,
    pub confirm: Vec<Duration>,
    pub upgrade: Vec<Duration>,
    /// µs, signed: see the module docs.
    pub to_pid_file: Vec<i64>,
}

/// Matches each reload with its old process's `upgrade started` and `upgrade complete;
/// draining` lines.
pub fn steps(reloads: &[Reload], events: &[Event]) -> Steps {
    let us = Duration::from_micros;
    let by_old = |msg: &str, pid: u32| {
        events
            .iter()
            .find(|e| e.message == msg && e.num("old_pid") == Some(pid as u64))
    };
    let mut s = Steps::default();
    for r in reloads.iter().filter(|r| r.handoff) {
        let started = by_old("upgrade started", r.old_pid);
        if let Some(started) = started {
            let t = wall_us(r.trigger);
            if started.wall_us >= t {
                s.to_started.push(us(started.wall_us - t));
            }
        }
        let Some(done) = by_old("upgrade complete; draining", r.old_pid)
            .filter(|e| e.num("new_pid").is_none_or(|p| p == r.new_pid as u64))
        else {
            continue;
        };
        let parts = ["spawn_us", "ready_us", "announce_us", "confirm_us"].map(|f| done.num(f));
        let lists = [&mut s.spawn, &mut s.ready, &mut s.announce, &mut s.confirm];
        for (v, part) in lists.into_iter().zip(parts) {
            v.extend(part.map(us));
        }
        s.upgrade
            .extend(done.num("elapsed_ms").map(Duration::from_millis));
        let confirmed = match (started, parts) {
            (Some(st), [Some(a), Some(b), Some(c), Some(d)]) => st.wall_us + a + b + c + d,
            _ => done.wall_us,
        };
        s.to_pid_file
            .push(wall_us(r.ready) as i64 - confirmed as i64);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1970-01-01T00:00:00Z", Some(0)),
            ("1970-01-01T00:00:01.5Z", Some(1_500_000)),
            ("2000-03-01T00:00:00.000001Z", Some(951_868_800_000_001)),
            ("2026-12-01T22:24:22.795650Z", Some(1_796_163_862_795_650)),
            (
                "2024-02-29T12:00:00.123456789Z",
                Some(1_709_208_000_123_456),
            ),
            ("2026-12-01T22:24:22.795650", None),
            ("2026-13-01T22:24:22Z", None),
            ("yesterday", None),
        ];
        for (s, want) in cases {
            assert_eq!(rfc3339_us(s), *want, "{s}");
        }
    }

    #[test]
    fn lines() {
        let e = parse_line(
            "2026-12-01T22:24:22.795650Z  INFO handover::upgrade: upgrade complete; draining \
             generation=1 old_pid=13248 new_pid=13255 elapsed_ms=192 spawn_us=700 outcome=\"ok\"",
        )
        .unwrap();
        assert_eq!(e.message, "upgrade complete; draining");
        assert_eq!(e.num("old_pid"), Some(13248));
        assert_eq!(e.num("spawn_us"), Some(700));
        assert_eq!(e.fields["outcome"], "ok");
        assert_eq!(e.num("ready_us"), None);
        let e = parse_line(
            "2026-12-01T22:24:22.603100Z  INFO handover::upgrade: upgrade started generation=1 \
             old_pid=1 exe=\"/a b/hello\"",
        )
        .unwrap();
        assert_eq!(e.message, "upgrade started");
        assert_eq!(e.fields["exe"], "/a b/hello");
        let e = parse_line("2026-12-01T22:24:22Z ERROR hello: the state is wrong: x=1").unwrap();
        assert_eq!(e.message, "the state is wrong:");
        assert_eq!(e.num("x"), Some(1));
        for bad in [
            "",
            "hello: x",
            "2026-12-01T22:24:22Z LOUD x: y",
            "reload_bench: started",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    fn event(wall_us: u64, message: &str, fields: &[(&str, u64)]) -> Event {
        Event {
            wall_us,
            message: message.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn steps_of_a_reload() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let r = Reload {
            trigger: t,
            ready: t + ms(10),
            gone: t + ms(11),
            cmd_done: None,
            drain_from: t + ms(10),
            old_hwm: 0,
            new_hwm: 0,
            handoff: true,
            old_pid: 7,
            new_pid: 8,
        };
        let w = wall_us(t);
        let with_fields = [
            event(w + 300, "upgrade started", &[("old_pid", 7)]),
            event(w + 1_000, "upgrade started", &[("old_pid", 99)]),
            event(
                w + 9_500,
                "upgrade complete; draining",
                &[
                    ("old_pid", 7),
                    ("new_pid", 8),
                    ("elapsed_ms", 9),
                    ("spawn_us", 2_000),
                    ("ready_us", 5_000),
                    ("announce_us", 0),
                    ("confirm_us", 700),
                ],
            ),
        ];
        let s = steps(&[r], &with_fields);
        assert!(
            s.to_started.len() == 1
                && s.to_started[0].abs_diff(Duration::from_micros(300)) <= Duration::from_micros(1)
        );
        assert_eq!(s.spawn, [ms(2)]);
        assert_eq!(s.ready, [ms(5)]);
        assert_eq!(s.announce, [Duration::ZERO]);
        assert_eq!(s.confirm, [Duration::from_micros(700)]);
        assert_eq!(s.upgrade, [ms(9)]);
        // `main` written at 300 + 7,700 µs; the PID file seen at 10 ms.
        // (± 1 µs: the clocks are read in whole µs.)
        let near = |v: &[i64], want: i64| v.len() == 1 && (v[0] - want).abs() <= 1;
        assert!(near(&s.to_pid_file, 2_000), "{:?}", s.to_pid_file);
        // Without the step fields (an older library): only what the lines say.
        let without = [
            event(w + 300, "upgrade started", &[("old_pid", 7)]),
            event(
                w + 10_500,
                "upgrade complete; draining",
                &[("old_pid", 7), ("new_pid", 8), ("elapsed_ms", 10)],
            ),
        ];
        let s = steps(&[r], &without);
        assert!(s.spawn.is_empty() && s.confirm.is_empty());
        assert_eq!(s.upgrade, [ms(10)]);
        assert!(near(&s.to_pid_file, -500), "{:?}", s.to_pid_file);
        // Another reload's lines, or none: nothing.
        let s = steps(&[Reload { old_pid: 5, ..r }], &with_fields);
        assert!(s.to_started.is_empty() && s.upgrade.is_empty());
    }

    #[test]
    fn journal_entries() {
        let mut j = JournalEntry::new();
        j.insert("__REALTIME_TIMESTAMP".into(), "42".into());
        j.insert("MESSAGE".into(), "upgrade started".into());
        j.insert("OLD_PID".into(), "7".into());
        j.insert("_PID".into(), "7".into());
        let e = from_journal(&j).unwrap();
        assert_eq!((e.wall_us, e.message.as_str()), (42, "upgrade started"));
        assert_eq!(e.num("old_pid"), Some(7));
        assert!(!e.fields.contains_key("_pid"));
    }
}
