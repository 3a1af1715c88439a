//! Processes by pid: signals, reaping, and what `/proc` says about them.
//!
//! PID 1 on the test machines is not always an init that reaps promptly, so a zombie counts as
//! gone here ([`alive`]); a test that wants an old generation's exit status makes itself the
//! reaper of its orphans first ([`become_subreaper`]).

use std::collections::HashMap;
use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::{wait_for, TIMEOUT};

/// Runs `cmd` to its end (stdin on /dev/null): its output if it exited 0, else what went
/// wrong (how it ended, and its stderr).
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(out);
    }
    Err(format!(
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Sends `signal` to `pid`; panics if it cannot (the process is gone, or not ours to signal).
pub fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

/// SIGTERM to `pid`, which must be this process's child (or orphan, see [`become_subreaper`]),
/// and its exit code once it has exited ([`reap`]).
pub fn terminate(pid: u32) -> i32 {
    signal(pid, Signal::SIGTERM);
    reap(pid, TIMEOUT)
}

/// Makes this test process the reaper of orphaned descendants, so that each old generation,
/// once its parent exited, can be waited for by pid.
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

/// Waits (at most `timeout`) for the exit of `pid`, which must be this process's child by now
/// (directly or through the subreaper); returns its exit code, 128 + N for signal N.
pub fn reap(pid: u32, timeout: Duration) -> i32 {
    wait_for(&format!("process {pid} to exit"), timeout, || {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(128 + sig as i32),
            Ok(_) => None,
            // Not reparented to us yet (its parent is still exiting).
            Err(Errno::ECHILD) => None,
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
    })
}

/// The generations of a server that a test has seen, in order: each a process never seen
/// before.
#[derive(Debug)]
pub struct Generations(Vec<u32>);

impl Generations {
    /// The first generation.
    pub fn new(first: u32) -> Generations {
        Generations(vec![first])
    }

    /// Records `pid` as the next generation; panics if it served before.
    #[track_caller]
    pub fn push(&mut self, pid: u32) {
        assert!(
            !self.0.contains(&pid),
            "generation {}: pid {pid} seen before",
            self.0.len()
        );
        self.0.push(pid);
    }

    /// The generation serving now.
    pub fn last(&self) -> u32 {
        *self.0.last().unwrap()
    }

    /// Every generation but the last.
    pub fn olds(&self) -> &[u32] {
        &self.0[..self.0.len() - 1]
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether `pid` exists as anything but a zombie.
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// Whether `pid` is gone for good: exited and reaped (not even a zombie).
pub fn reaped(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The parent of `pid`.
pub fn ppid(pid: u32) -> u32 {
    stat_fields(pid)
        .and_then(|f| f.get(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no parent in /proc/{pid}/stat"))
}

/// The children of `pid` (zombies included), sorted; with `zombies_only`, only the zombies.
fn children_of(pid: u32, zombies_only: bool) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p).is_some_and(|f| {
                f.get(1) == Some(&pid.to_string()) && (!zombies_only || f[0] == "Z")
            })
        })
        .collect();
    out.sort_unstable();
    out
}

/// The children of `pid`, in any state.
pub fn children(pid: u32) -> Vec<u32> {
    children_of(pid, false)
}

/// The zombie children of `pid`.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    children_of(pid, true)
}

/// `/proc/<pid>/environ` as a map.
pub fn environ(pid: u32) -> HashMap<String, String> {
    let raw = fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/environ: {e}"));
    raw.split(|b| *b == 0)
        .filter_map(|e| {
            let s = String::from_utf8_lossy(e);
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// What each open fd of `pid` points at, in order of the fds.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut fds: Vec<(u32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds.into_iter().map(|(_, t)| t).collect()
}

/// What each open fd of `pid` points at (`socket`, `pipe`, `anon_inode`, a path ...), the
/// inode numbers dropped, sorted: two processes with the same set have the same kinds of fds.
pub fn fd_kinds(pid: u32) -> Vec<String> {
    let mut kinds: Vec<String> = fd_targets(pid)
        .into_iter()
        .map(|t| t.split(':').next().unwrap_or("").to_owned())
        .collect();
    kinds.sort();
    kinds
}

/// How many fds `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    fd_targets(pid).len()
}

/// What fd `fd` of `pid` points at, or why it cannot be read.
pub fn fd_target(pid: u32, fd: u32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

/// The socket inodes among `pid`'s open fds.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    fd_targets(pid)
        .iter()
        .filter_map(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// The inode of the socket listening on 127.0.0.1:`port` (`/proc/net/tcp`, state `0A`).
pub fn listening_inode(port: u16) -> Option<u64> {
    let table = fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[3] == "0A")
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

/// The pid of the process that `ns_pid` names in the PID namespace of `anchor`, as this test
/// sees it.
pub fn host_pid(anchor: u32, ns_pid: u32) -> Option<u32> {
    let ns = fs::read_link(format!("/proc/{anchor}/ns/pid")).ok()?;
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let p: u32 = e.file_name().to_str()?.parse().ok()?;
        if fs::read_link(format!("/proc/{p}/ns/pid")).ok()? != ns {
            return None;
        }
        let status = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        let last = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .last()?
            .parse::<u32>()
            .ok()?;
        (last == ns_pid).then_some(p)
    })
}

/// `VmRSS` and `VmHWM` of `pid`, in kB.
pub fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The pid after `key` in a log line (`new_pid=123`, `new process 123`).
pub fn pid_after(line: &str, key: &str) -> u32 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"))
        + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no pid after {key:?} in {line}"))
}

/// `CLOCK_MONOTONIC` in microseconds: the clock of systemd's `MONOTONIC_USEC=` and of the
/// journal's `__MONOTONIC_TIMESTAMP`.
pub fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}
