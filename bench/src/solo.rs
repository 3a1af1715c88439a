//! The servers on their own, without load: fresh starts of hello and of plain (exec → ready,
//! idle memory), hello's reloads, and hello's reloads handing over `--state-bytes` of state.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use support::http::free_port;

use crate::args::Runtime;
use crate::load::Marks;
use crate::memory::Footprint;
use crate::procs::check_interrupted;
use crate::rows::{hello_args, time_start, Ctx};
use crate::servers::{Reload, Server, Standalone};
use crate::steps::{read_log, steps, Steps};

/// Reloads timed without load, with and without state.
pub const UNLOADED_RELOADS: usize = 21;
pub const STATE_RELOADS: usize = 11;
/// The last starts whose idle memory is read; the median is reported.
const MEM_STARTS: usize = 5;

/// hello's reloads without load.
pub struct Unloaded {
    pub reloads: Vec<Reload>,
    pub steps: Steps,
    /// The old processes' peak memory, from their last log line (kB).
    pub old_hwm_kb: Vec<u64>,
    /// `state received` lines that said `check="ok"`, and that did not.
    pub checks_ok: usize,
    pub checks_bad: usize,
}

impl Unloaded {
    pub fn handoffs(&self) -> Vec<Duration> {
        self.reloads.iter().map(|r| r.ready - r.trigger).collect()
    }
    pub fn new_hwm_kb(&self) -> Vec<u64> {
        self.reloads.iter().map(|r| r.new_hwm).collect()
    }
}

/// The servers on their own.
pub struct Solo {
    pub runtime: Runtime,
    pub hello_starts: Vec<Duration>,
    pub plain_starts: Vec<Duration>,
    pub hello_idle: Option<Footprint>,
    pub plain_idle: Option<Footprint>,
    pub unloaded: Unloaded,
    /// With `--state-bytes` (its value and the reloads).
    pub state: Option<(usize, Unloaded)>,
}

/// Fresh starts, one after the other: their exec → ready, and the median idle memory of
/// the last [`MEM_STARTS`].
fn starts(
    bin: &std::path::Path,
    extra: &[String],
    ctx: &Ctx<'_>,
    name: &str,
) -> Result<(Vec<Duration>, Option<Footprint>), String> {
    // A binary just built is still dirty in the page cache, and smaps counts
    // its mapped pages as Private_Dirty until they are written back: flush
    // it first, so that "dirty" means what the process wrote.
    std::fs::File::open(bin)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("flush {}: {e}", bin.display()))?;
    let mut took = Vec::new();
    let mut mems = Vec::new();
    for i in 0..ctx.args.starts {
        check_interrupted()?;
        let measured = i + MEM_STARTS >= ctx.args.starts;
        if measured {
            // The kernel maps the pages around each one a process touches
            // (fault-around) only if they are in the page cache: read the
            // whole binary first, so that every start finds the same.
            std::fs::read(bin).map_err(|e| format!("read {}: {e}", bin.display()))?;
        }
        let st = time_start(bin, extra, ctx, &format!("{name}-start-{i}"), measured)?;
        took.push(st.ready - st.spawn);
        mems.extend(st.mem);
    }
    Ok((took, median_footprint(mems)))
}

/// Of the footprints, the one with the median private memory.
fn median_footprint(mut all: Vec<Footprint>) -> Option<Footprint> {
    all.sort_by_key(|f| f.private_kb);
    all.get(all.len() / 2).copied()
}

/// hello started with `extra`, reloaded `n` times without load.
fn reloads(ctx: &Ctx<'_>, extra: &[String], tag: &str, n: usize) -> Result<Unloaded, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut s = Standalone::start(ctx.hello, extra, addr, ctx.dir, tag, false)?;
    let marks = Marks::default();
    let mut done = Vec::new();
    let result = (|| {
        for _ in 0..n {
            check_interrupted()?;
            thread::sleep(Duration::from_millis(50));
            let r = s.reload(&marks);
            marks.end();
            done.push(r?);
        }
        Ok::<_, String>(())
    })();
    s.stop();
    if let Err(e) = result {
        return Err(format!("{e}\n{}", s.diagnostics()));
    }
    let events = read_log(s.log());
    let exiting = |pid: u32| {
        events
            .iter()
            .find(|e| e.message == "exiting" && e.num("pid") == Some(pid as u64))
            .and_then(|e| e.num("vm_hwm_kb"))
    };
    let old_hwm_kb = done.iter().filter_map(|r| exiting(r.old_pid)).collect();
    let checks: Vec<bool> = events
        .iter()
        .filter(|e| e.message == "state received")
        .map(|e| e.fields.get("check").is_some_and(|c| c == "ok"))
        .collect();
    Ok(Unloaded {
        steps: steps(&done, &events),
        reloads: done,
        old_hwm_kb,
        checks_ok: checks.iter().filter(|&&ok| ok).count(),
        checks_bad: checks.iter().filter(|&&ok| !ok).count(),
    })
}

/// Everything measured without load, on `runtime`.
pub fn measure_solo(ctx: &Ctx<'_>, runtime: Runtime) -> Result<Solo, String> {
    let extra = hello_args(runtime);
    eprintln!(
        "reload_bench: timing {} fresh starts of hello and of plain, {UNLOADED_RELOADS} reloads without load",
        ctx.args.starts
    );
    let (hello_starts, hello_idle) = starts(ctx.hello, &extra, ctx, "hello")?;
    let (plain_starts, plain_idle) = starts(ctx.plain, &extra, ctx, "plain")?;
    let unloaded = reloads(ctx, &extra, "unloaded", UNLOADED_RELOADS)?;
    let bytes = ctx.args.state_bytes;
    let state = if bytes > 0 {
        eprintln!("reload_bench: {STATE_RELOADS} reloads handing over {bytes} bytes of state");
        let mut extra = extra.clone();
        extra.extend(["--state-bytes".into(), bytes.to_string()]);
        Some((bytes, reloads(ctx, &extra, "state", STATE_RELOADS)?))
    } else {
        None
    };
    Ok(Solo {
        runtime,
        hello_starts,
        plain_starts,
        hello_idle,
        plain_idle,
        unloaded,
        state,
    })
}
