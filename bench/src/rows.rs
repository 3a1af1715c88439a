//! Measuring: a row (a server, a load, N reloads, then probes under the same load), and the
//! figures of hello on its own (fresh starts, idle memory, reloads without load).

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::http::free_port;
use support::load::{Load, LoadConfig, Record};
use support::process::memory_kb;

use crate::args::{Args, Mode, Variant};
use crate::procs::{check_interrupted, Proc};
use crate::report::dur;
use crate::servers::{spawn_hello, wait_other, watch, Reload, Server, Standalone};

/// How long a fresh server idles before its RSS is read.
const SETTLE: Duration = Duration::from_millis(300);
/// Reloads timed without load, for reference.
pub const UNLOADED_RELOADS: usize = 21;
/// After the reloads, with the load still running: fresh starts timed (in a
/// `handover SIGHUP` row) and `systemctl` queries timed (in systemd rows).
const PROBES: usize = 11;

/// Something timed under load; requests overlapping `from..done` are left
/// out of the latency figures.
pub struct Probe {
    pub systemctl: bool,
    pub from: Instant,
    pub to: Instant,
    pub done: Instant,
}

/// What one row measured.
pub struct RowData {
    pub variant: Variant,
    /// Every request, its times relative to `t0`.
    pub recs: Vec<Record>,
    pub reloads: Vec<Reload>,
    pub t0: Instant,
    pub idle_rss_kb: u64,
    pub overruns: usize,
    pub elapsed: Duration,
    /// Things timed while the load ran, after the reloads.
    pub probes: Vec<Probe>,
}

/// Where the benchmark runs things.
pub struct Ctx<'a> {
    pub hello: &'a Path,
    pub dir: &'a Path,
    pub args: &'a Args,
}

/// Starts `hello` fresh (nothing else to hand over), times spawn → its PID
/// in the PID file, optionally reads its RSS once settled, and stops it.
struct Started {
    spawn: Instant,
    ready: Instant,
    /// (VmRSS, VmHWM) in kB once settled, when asked for.
    mem: Option<(u64, u64)>,
    /// Its RssAnon and RssFile then.
    split: String,
}

fn time_start(ctx: &Ctx<'_>, tag: &str, rss: bool) -> Result<Started, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let pid_file = ctx.dir.join(format!("{tag}.pid"));
    let pw = watch(&pid_file)?;
    let t = Instant::now();
    let child = spawn_hello(ctx.hello, addr, &pid_file, &ctx.dir.join("starts.log"))?;
    let p = Proc::track(child.id(), true)?;
    let waited = wait_other(&pw, None, Instant::now() + Duration::from_secs(20));
    let (mut mem, mut split) = (None, String::new());
    if rss && waited.is_ok() {
        thread::sleep(SETTLE);
        mem = memory_kb(p.pid);
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap_or_default();
        split = status
            .lines()
            .filter(|l| l.starts_with("RssAnon:") || l.starts_with("RssFile:"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(", ");
    }
    p.stop(Duration::from_secs(5));
    let (pid, at) = waited?;
    if pid != p.pid {
        return Err(format!("the PID file says {pid}, started {}", p.pid));
    }
    Ok(Started {
        spawn: t,
        ready: at,
        mem,
        split,
    })
}

/// The load of `mode`: `clients` clients, recording every request.
fn load(addr: SocketAddr, mode: Mode, args: &Args) -> Load {
    let (keepalive, per_request) = match mode {
        Mode::KeepAlive => (args.clients, 0),
        Mode::PerRequest => (0, args.clients),
    };
    Load::start(
        addr,
        LoadConfig {
            host: "bench".into(),
            io_timeout: args.timeout,
            max_duration: Duration::MAX,
            record_requests: true,
            ..LoadConfig::clients(keepalive, per_request)
        },
    )
}

/// Runs a row on `server`: load, warm-up, `--reloads` reloads at `--interval-ms`, warm-up,
/// probes.
pub fn run_row(
    server: &mut dyn Server,
    variant: Variant,
    mode: Mode,
    ctx: &Ctx<'_>,
) -> Result<RowData, String> {
    let args = ctx.args;
    thread::sleep(SETTLE);
    let idle_rss_kb = memory_kb(server.current().pid).map(|(r, _)| r).unwrap_or(0);
    let load = load(server.addr(), mode, args);
    let t0 = load.started();
    let result = (|| {
        thread::sleep(args.warmup);
        let mut reloads = Vec::with_capacity(args.reloads);
        let mut overruns = 0;
        let mut next = Instant::now();
        for _ in 0..args.reloads {
            check_interrupted()?;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            let r = server.reload()?;
            next = r.trigger + args.interval;
            if r.end() > next {
                overruns += 1;
                next = r.end();
            }
            reloads.push(r);
        }
        thread::sleep(args.warmup.max(args.interval));
        // The same cold start as `exec → ready` on its own, but under this
        // load: what the handoff competes with for CPU.
        let mut probes = Vec::new();
        if variant == Variant::Sighup {
            for i in 0..PROBES {
                check_interrupted()?;
                let st = time_start(ctx, &format!("loaded-start-{i}"), false)?;
                let done = Instant::now();
                if std::env::var_os("HANDOVER_BENCH_TRACE").is_some() {
                    eprintln!(
                        "  fresh start under load: exec → ready {}, ready → stopped {}",
                        dur(st.ready - st.spawn),
                        dur(done - st.ready)
                    );
                }
                probes.push(Probe {
                    systemctl: false,
                    from: st.spawn,
                    to: st.ready,
                    done,
                });
                thread::sleep(args.interval);
            }
        }
        // How long the `systemctl` client alone takes under this load.
        for _ in 0..PROBES {
            check_interrupted()?;
            let from = Instant::now();
            match server.systemctl_probe() {
                None => break,
                Some(r) => r?,
            }
            let to = Instant::now();
            probes.push(Probe {
                systemctl: true,
                from,
                to,
                done: to,
            });
            thread::sleep(args.interval);
        }
        Ok::<_, String>((reloads, overruns, probes))
    })();
    let recs = load.stop().records;
    let elapsed = t0.elapsed();
    match result {
        Ok((reloads, overruns, probes)) => Ok(RowData {
            variant,
            recs,
            reloads,
            t0,
            idle_rss_kb,
            overruns,
            elapsed,
            probes,
        }),
        Err(e) => Err(format!("{e}\n{}", server.diagnostics())),
    }
}

/// hello on its own.
pub struct Solo {
    pub starts: Vec<Duration>,
    pub idle_rss_kb: u64,
    pub idle_hwm_kb: u64,
    /// RssAnon / RssFile of the idle server.
    pub idle_split: String,
    pub unloaded_handoff: Vec<Duration>,
    pub unloaded_window: Vec<Duration>,
}

/// Fresh starts (the last one's idle memory), and reloads without load.
pub fn measure_solo(ctx: &Ctx<'_>) -> Result<Solo, String> {
    let mut starts = Vec::new();
    let (mut idle_rss_kb, mut idle_hwm_kb) = (0, 0);
    let mut idle_split = String::new();
    for i in 0..ctx.args.starts {
        check_interrupted()?;
        let last = i + 1 == ctx.args.starts;
        let st = time_start(ctx, &format!("start-{i}"), last)?;
        starts.push(st.ready - st.spawn);
        if let Some((rss, hwm)) = st.mem {
            (idle_rss_kb, idle_hwm_kb) = (rss, hwm);
            idle_split = st.split;
        }
    }
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut s = Standalone::start(ctx.hello, addr, ctx.dir, "unloaded", false)?;
    let mut unloaded_handoff = Vec::new();
    let mut unloaded_window = Vec::new();
    for _ in 0..UNLOADED_RELOADS {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(50));
        let r = s.reload()?;
        unloaded_handoff.push(r.ready - r.trigger);
        unloaded_window.push(r.end() - r.trigger);
    }
    s.stop();
    Ok(Solo {
        starts,
        idle_rss_kb,
        idle_hwm_kb,
        idle_split,
        unloaded_handoff,
        unloaded_window,
    })
}
