//! The processes the benchmark starts or watches: each tracked by a pidfd (its exit is an
//! event, its signals cannot reach a recycled pid), all killed when the benchmark ends, also on
//! a panic or Ctrl-C.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rustix::process::{pidfd_open, pidfd_send_signal, PidfdFlags};
use support::pidfile::wait_readable;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// From now on SIGINT and SIGTERM only set a flag ([`check_interrupted`]), so that the
/// benchmark stops cleanly and kills what it started. A thread of its own waits for them (with
/// tokio's handlers: the signals stay unblocked, so the programs the benchmark starts get them
/// as usual).
pub fn catch_interrupts() {
    use tokio::signal::unix::{signal, SignalKind};
    let (registered, wait) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return registered.send(Err(e.to_string())),
        };
        rt.block_on(async {
            let streams = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
            let (mut int, mut term) = match streams {
                Ok(s) => s,
                Err(e) => return registered.send(Err(e.to_string())),
            };
            let _ = registered.send(Ok(()));
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        })
    });
    if let Ok(Err(e)) | Err(e) = wait.recv().map_err(|e| e.to_string()) {
        eprintln!("reload_bench: cannot catch SIGINT and SIGTERM ({e}); Ctrl-C kills at once");
    }
}

/// `Err("interrupted")` once SIGINT or SIGTERM came.
pub fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// A process of the benchmark (a server generation): killed by pidfd when the benchmark ends.
#[derive(Clone)]
pub struct Proc {
    pub pid: u32,
    pub fd: Arc<OwnedFd>,
    /// Ours to reap (standalone generations, through the subreaper).
    reap: bool,
}

static TRACKED: Mutex<Vec<Proc>> = Mutex::new(Vec::new());

/// A pidfd for `pid`.
pub fn pidfd(pid: u32) -> Result<OwnedFd, String> {
    let p = rustix::process::Pid::from_raw(pid as i32).ok_or("pid 0")?;
    pidfd_open(p, PidfdFlags::empty()).map_err(|e| format!("pidfd_open({pid}): {e}"))
}

/// Whether the process behind the pidfd `fd` has exited (a zombie counts as exited).
pub fn exited(fd: impl AsFd) -> bool {
    let fd = fd.as_fd();
    let mut polled = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    nix::poll::poll(&mut polled, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

impl Proc {
    /// Tracks `pid`; `reap`: it is ours to reap.
    pub fn track(pid: u32, reap: bool) -> Result<Proc, String> {
        let p = Proc {
            pid,
            fd: Arc::new(pidfd(pid)?),
            reap,
        };
        let mut t = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|q| !exited(&*q.fd));
        t.push(p.clone());
        Ok(p)
    }

    pub fn exited(&self) -> bool {
        exited(&*self.fd)
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let _ = pidfd_send_signal(&*self.fd, signal);
    }

    /// Waits until it has exited, at most `timeout`.
    fn wait(&self, timeout: Duration) {
        wait_readable(&[self.fd.as_fd()], timeout);
    }

    /// Reaps it if it is ours (once it exited), bounded.
    pub fn reap(&self) {
        if !self.reap {
            return;
        }
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => {}
                Ok(_) | Err(_) => return,
            }
            if Instant::now() >= end {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, wait (bounded), SIGKILL, reap.
    pub fn stop(&self, grace: Duration) {
        self.signal(rustix::process::Signal::TERM);
        self.wait(grace);
        if !self.exited() {
            self.signal(rustix::process::Signal::KILL);
            self.wait(Duration::from_secs(1));
        }
        self.reap();
    }
}

/// Kills (SIGKILL, by pidfd) and reaps every server process still running when dropped: at the
/// end of the benchmark, also on a panic.
pub struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let procs = std::mem::take(&mut *TRACKED.lock().unwrap_or_else(|e| e.into_inner()));
        for p in procs.iter().filter(|p| !p.exited()) {
            p.signal(rustix::process::Signal::KILL);
        }
        for p in &procs {
            p.wait(Duration::from_secs(1));
            p.reap();
        }
    }
}

/// `VmHWM` of `pid` in kB, 0 when it cannot be read.
pub fn hwm(pid: u32) -> u64 {
    support::process::memory_kb(pid)
        .map(|(_, h)| h)
        .unwrap_or(0)
}

/// Raises this process's soft limit on open files to the hard one (the servers it starts
/// inherit it, and raise their own anyway); what it did, and whether `need` fits.
pub fn raise_nofile(need: u64) -> String {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => return format!("cannot read RLIMIT_NOFILE: {e}"),
    };
    let mut s = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => format!("soft RLIMIT_NOFILE raised from {soft} to the hard limit {hard}"),
            Err(e) => format!("soft RLIMIT_NOFILE {soft}, hard {hard}; raising it failed: {e}"),
        }
    } else {
        format!("RLIMIT_NOFILE {soft} (soft = hard)")
    };
    let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |l| l.0);
    if now < need {
        s.push_str(&format!(
            "; BELOW the about {need} this run needs: connections will fail (raise the hard limit, e.g. `ulimit -Hn`, or run fewer --conns)"
        ));
    }
    s
}
