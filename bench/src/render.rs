//! The output's building blocks, rendered as plain text or markdown, and how figures read.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::load::{Outcome, FAILURES};
use crate::stats::{median_max, Lat};

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
pub fn spread(l: &Lat) -> String {
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

pub fn kinds(m: &BTreeMap<Outcome, u64>) -> String {
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

pub fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        "n/a".into()
    } else {
        format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
    }
}
