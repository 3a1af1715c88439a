//! A row: a server under a load of N connections, reloaded again and again, then probes under
//! the same load; and timing a fresh start of a server.

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::http::free_port;
use support::process::memory_kb;

use crate::args::{Args, Mode, Runtime, Variant};
use crate::load::{Load, Spec, Tally};
use crate::memory::{footprint, Footprint};
use crate::procs::{check_interrupted, Proc};
use crate::report::dur;
use crate::servers::{spawn_server, wait_other, watch, Reload, Server};
use crate::steps::{steps, Steps};

/// How long a fresh server idles before its memory is read.
pub const SETTLE: Duration = Duration::from_millis(300);
/// After the reloads, with the load still running: fresh starts timed (in a `handover
/// SIGHUP` row) and `systemctl` queries timed (in systemd rows).
const PROBES: usize = 11;
/// Bound on opening all the connections of a row.
const RAMP_LIMIT: Duration = Duration::from_secs(60);

/// Something timed under load.
pub struct Probe {
    pub systemctl: bool,
    pub took: Duration,
}

/// What one row measured.
pub struct RowData {
    pub variant: Variant,
    pub runtime: Runtime,
    pub tally: Tally,
    pub reloads: Vec<Reload>,
    /// The origin of the tally's times.
    pub t0: Instant,
    pub idle_rss_kb: u64,
    pub overruns: usize,
    pub elapsed: Duration,
    /// Things timed while the load ran, after the reloads.
    pub probes: Vec<Probe>,
    pub steps: Steps,
}

/// Where the benchmark runs things.
pub struct Ctx<'a> {
    pub hello: &'a Path,
    pub plain: &'a Path,
    pub dir: &'a Path,
    pub args: &'a Args,
}

/// A server started fresh (nothing to hand over): spawn → its PID in the PID file.
pub struct Started {
    pub spawn: Instant,
    pub ready: Instant,
    /// Its memory once settled, when asked for.
    pub mem: Option<Footprint>,
}

/// Starts `bin EXTRA...` fresh on a port of its own, times it, optionally reads its memory
/// once settled, and stops it.
pub fn time_start(
    bin: &Path,
    extra: &[String],
    ctx: &Ctx<'_>,
    tag: &str,
    mem: bool,
) -> Result<Started, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let pid_file = ctx.dir.join(format!("{tag}.pid"));
    let pw = watch(&pid_file)?;
    let t = Instant::now();
    let child = spawn_server(bin, addr, &pid_file, &ctx.dir.join("starts.log"), extra)?;
    let p = Proc::track(child.id(), true)?;
    let waited = wait_other(&pw, None, Instant::now() + Duration::from_secs(20));
    let mut read = None;
    if mem && waited.is_ok() {
        thread::sleep(SETTLE);
        read = footprint(p.pid);
    }
    p.stop(Duration::from_secs(5));
    let (pid, at) = waited?;
    if pid != p.pid {
        return Err(format!("the PID file says {pid}, started {}", p.pid));
    }
    Ok(Started {
        spawn: t,
        ready: at,
        mem: read,
    })
}

/// hello's arguments for `runtime`.
pub fn hello_args(runtime: Runtime) -> Vec<String> {
    vec!["--runtime".into(), runtime.arg().into()]
}

/// Runs a row on `server`: `conns` connections, warm-up, `reloads` reloads at
/// `--interval-ms`, warm-up, probes.
pub fn run_row(
    server: &mut dyn Server,
    (variant, runtime): (Variant, Runtime),
    (mode, conns, reloads): (Mode, usize, usize),
    ctx: &Ctx<'_>,
) -> Result<RowData, String> {
    let args = ctx.args;
    thread::sleep(SETTLE);
    let idle_rss_kb = memory_kb(server.current().pid).map(|(r, _)| r).unwrap_or(0);
    let spec = Spec {
        addr: server.addr(),
        conns,
        mode,
        timeout: args.timeout,
    };
    let load =
        Load::start(spec, RAMP_LIMIT).map_err(|e| format!("{e}\n{}", server.diagnostics()))?;
    let t0 = load.started();
    let marks = load.marks();
    let result = (|| {
        thread::sleep(args.warmup);
        let mut done = Vec::with_capacity(reloads);
        let mut overruns = 0;
        let mut next = Instant::now();
        for _ in 0..reloads {
            check_interrupted()?;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            let r = server.reload(marks);
            marks.end();
            let r = r?;
            next = r.trigger + args.interval;
            if r.end() > next {
                overruns += 1;
                next = r.end();
            }
            done.push(r);
        }
        thread::sleep(args.warmup.max(args.interval));
        // The same cold start as `exec → ready` on its own, but under this load: what the
        // handoff competes with for CPU.
        let mut probes = Vec::new();
        if variant == Variant::Sighup {
            for i in 0..PROBES {
                check_interrupted()?;
                marks.probe_begin(true);
                let st = time_start(
                    ctx.hello,
                    &hello_args(runtime),
                    ctx,
                    &format!("loaded-start-{i}"),
                    false,
                );
                marks.probe_end();
                let st = st?;
                if std::env::var_os("HANDOVER_BENCH_TRACE").is_some() {
                    eprintln!(
                        "  fresh start under load: exec → ready {}",
                        dur(st.ready - st.spawn)
                    );
                }
                probes.push(Probe {
                    systemctl: false,
                    took: st.ready - st.spawn,
                });
                thread::sleep(args.interval);
            }
        }
        // How long the `systemctl` client alone takes under this load.
        for _ in 0..PROBES {
            check_interrupted()?;
            marks.probe_begin(false);
            let from = Instant::now();
            let r = server.systemctl_probe();
            let took = from.elapsed();
            marks.probe_end();
            match r {
                None => break,
                Some(r) => r?,
            }
            probes.push(Probe {
                systemctl: true,
                took,
            });
            thread::sleep(args.interval);
        }
        Ok::<_, String>((done, overruns, probes))
    })();
    let tally = load.stop();
    let elapsed = t0.elapsed();
    match result {
        Ok((reloads, overruns, probes)) => {
            let steps = steps(&reloads, &server.events());
            Ok(RowData {
                variant,
                runtime,
                tally,
                reloads,
                t0,
                idle_rss_kb,
                overruns,
                elapsed,
                probes,
                steps,
            })
        }
        Err(e) => Err(format!("{e}\n{}", server.diagnostics())),
    }
}
