//! The servers on their own, as blocks: exec → ready and idle memory of hello and plain,
//! hello's handoffs without load, with and without state, and their steps.

use std::time::Duration;

use crate::memory::Footprint;
use crate::render::{mb, mm, Block};
use crate::report::{steps_head, steps_row};
use crate::solo::{Solo, STATE_RELOADS, UNLOADED_RELOADS};

/// The servers on their own: starts, memory, reloads without load, with state.
pub fn solo_blocks(solo: &Solo) -> Vec<Block> {
    let mut b = vec![Block::Heading(format!(
        "### On their own, without load ({})",
        solo.runtime.label()
    ))];
    let mem = |f: Option<Footprint>| match f {
        Some(f) => [
            mb(f.private_kb),
            mb(f.private_dirty_kb),
            format!("{} / {}", mb(f.code_resident_kb), mb(f.code_kb)),
            mb(f.pss_kb),
            mb(f.rss_kb),
        ],
        None => [
            "n/a".into(),
            "n/a".into(),
            "n/a".into(),
            "n/a".into(),
            "n/a".into(),
        ],
    };
    let start = |v: &[Duration]| {
        let (m, x) = mm(v);
        format!("{m} / {x}")
    };
    let [hp, hd, hc, hs, hr] = mem(solo.hello_idle);
    let [pp, pd, pc, ps, pr] = mem(solo.plain_idle);
    let pct = |a: u64, b: u64| {
        if b == 0 {
            "n/a".to_string()
        } else {
            format!("{:+.1} %", (a as f64 / b as f64 - 1.0) * 100.0)
        }
    };
    let (private_ratio, dirty_ratio) = match (solo.hello_idle, solo.plain_idle) {
        (Some(h), Some(p)) => (
            pct(h.private_kb, p.private_kb),
            pct(h.private_dirty_kb, p.private_dirty_kb),
        ),
        _ => ("n/a".into(), "n/a".into()),
    };
    b.push(Block::Table(
        [
            "server",
            "exec → ready median / max",
            "idle private",
            "of which dirty",
            "code resident / mapped",
            "idle Pss",
            "idle Rss",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            vec![
                "hello (handover)".into(),
                start(&solo.hello_starts),
                hp,
                hd,
                hc,
                hs,
                hr,
            ],
            vec![
                "plain (no handover)".into(),
                start(&solo.plain_starts),
                pp,
                pd,
                pc,
                ps,
                pr,
            ],
        ],
    ));
    let mut notes = vec![format!(
        "exec → ready over {} starts each; hello's idle private memory is {private_ratio} of plain's, its private dirty memory {dirty_ratio} (the clean part is mostly each binary's own code as read from disk, private because no other process maps that file)",
        solo.hello_starts.len()
    )];
    if let (Some(h), Some(p)) = (solo.hello_idle, solo.plain_idle) {
        let share = |f: Footprint| f.code_resident_kb * 100 / f.code_kb.max(1);
        notes.push(format!(
            "code: {} % of hello's code and {} % of plain's is resident at idle: the kernel maps the 64 KiB around each page a process touches (fault-around), and the code run at start-up is spread over most 64 KiB stretches of a binary. So the size of the code, not what runs, sets most of the clean part: hello's code is {} larger than plain's, of a difference of {} in idle private memory",
            share(h),
            share(p),
            mb(h.code_kb.saturating_sub(p.code_kb)),
            mb(h.private_kb.saturating_sub(p.private_kb)),
        ));
    }
    let handoffs = solo.unloaded.handoffs();
    let mut rows = vec![vec![
        format!("no state ({UNLOADED_RELOADS} reloads)"),
        start(&handoffs),
        med_kb(&solo.unloaded.old_hwm_kb),
        med_kb(&solo.unloaded.new_hwm_kb()),
    ]];
    if let Some((bytes, u)) = &solo.state {
        rows.push(vec![
            format!(
                "{} of state ({STATE_RELOADS} reloads)",
                mb((*bytes as u64) / 1024)
            ),
            start(&u.handoffs()),
            med_kb(&u.old_hwm_kb),
            med_kb(&u.new_hwm_kb()),
        ]);
        notes.push(format!(
            "state check by each new process: {} `check=\"ok\"`, {} wrong, of {} reloads",
            u.checks_ok,
            u.checks_bad,
            u.reloads.len()
        ));
    }
    b.push(Block::Table(
        [
            "hello SIGHUP without load",
            "handoff median / max",
            "old process peak (VmHWM) median",
            "new process VmHWM median",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    ));
    let mut steps = vec![steps_row("no state".into(), &solo.unloaded.steps)];
    if let Some((bytes, u)) = &solo.state {
        steps.push(steps_row(
            format!("{} of state", mb((*bytes as u64) / 1024)),
            &u.steps,
        ));
    }
    b.push(Block::Table(
        steps_head("handoff steps without load (medians)"),
        steps,
    ));
    b.push(Block::List(notes));
    b
}

fn med_kb(v: &[u64]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2)
        .map_or_else(|| "n/a".into(), |&kb| mb(kb))
}
