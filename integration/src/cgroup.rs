//! The cgroup hierarchies this process is in, and the cgroups the tests make in them: the
//! systemd harness's subtrees ([`crate::systemd`]) and a pids cgroup ([`PidsCgroup`]). Both
//! create and remove directories under [`Lock`], which every test process takes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::skip;

pub(crate) const CGROUP_FS: &str = "/sys/fs/cgroup";
const POLL: Duration = Duration::from_millis(10);

/// One mounted cgroup hierarchy.
#[derive(Clone, Debug)]
pub(crate) struct Hierarchy {
    /// Mount point, e.g. `/sys/fs/cgroup/memory`.
    pub(crate) mount: PathBuf,
    pub(crate) v2: bool,
    /// Controllers and `name=` options (v1).
    controllers: Vec<String>,
    /// This process's cgroup in it, relative to the mount's root (None if unknown).
    pub(crate) own: Option<String>,
    /// The mount's root within the hierarchy (`/` unless it is a bind of a subtree).
    root: String,
}

impl Hierarchy {
    /// The directory of cgroup `rel` (relative to the mount's root).
    pub(crate) fn dir(&self, rel: &str) -> PathBuf {
        self.mount.join(rel.trim_start_matches('/'))
    }

    /// Whether it has controller (or `name=` option) `c`.
    pub(crate) fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

/// The path of `h` in a `/proc/<pid>/cgroup` text, relative to `h`'s mount.
pub(crate) fn proc_cgroup_path(lines: &str, h: &Hierarchy) -> Option<String> {
    lines.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        let matches = if h.v2 {
            ctrls.is_empty()
        } else {
            !ctrls.is_empty()
                && ctrls
                    .split(',')
                    .all(|c| h.controllers.iter().any(|x| x == c))
        };
        if !matches {
            return None;
        }
        // Paths are relative to the mount's root when that is a subtree (bind mount).
        let rel = if h.root == "/" {
            Some(path)
        } else {
            path.strip_prefix(h.root.as_str())
        }?;
        Some(if rel.is_empty() {
            "/".to_string()
        } else {
            rel.to_string()
        })
    })
}

/// The hierarchies, and where the host manager's subtree goes.
pub(crate) struct Layout {
    /// The host manager's base: the test's own cgroup in the memory hierarchy (or cgroup2).
    pub(crate) base: String,
    /// Where the host manager's subtree is created.
    pub(crate) targets: Vec<Hierarchy>,
    /// Every mounted hierarchy.
    pub(crate) all: Vec<Hierarchy>,
}

/// Reads the mounted hierarchies from `/proc/self/mountinfo` and this process's place in each
/// from `/proc/self/cgroup`; chooses where to create the host manager's subtree.
pub(crate) fn layout() -> Result<Layout, String> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
    let own_lines =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let mut all: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 4 || f.len() < 5 {
            continue;
        }
        let (root, mount, fstype, superopts) = (f[3], f[4], f[sep + 1], f[sep + 3]);
        if !(fstype == "cgroup" || fstype == "cgroup2")
            || !(mount == CGROUP_FS || mount.starts_with("/sys/fs/cgroup/"))
            || mount.contains('\\')
        {
            continue;
        }
        let v2 = fstype == "cgroup2";
        let controllers: Vec<String> = if v2 {
            Vec::new()
        } else {
            superopts
                .split(',')
                .filter(|o| {
                    (*o != "rw" && *o != "ro" && !o.contains('=')) || o.starts_with("name=")
                })
                .map(String::from)
                .collect()
        };
        if all
            .iter()
            .any(|h| h.v2 == v2 && h.controllers == controllers)
        {
            continue; // the same hierarchy mounted twice
        }
        let mut h = Hierarchy {
            mount: mount.into(),
            v2,
            controllers,
            own: None,
            root: root.to_owned(),
        };
        h.own = proc_cgroup_path(&own_lines, &h);
        all.push(h);
    }
    let pure_v2 = all.iter().any(|h| h.v2 && h.mount == Path::new(CGROUP_FS));
    let targets: Vec<Hierarchy> = if pure_v2 {
        all.iter()
            .filter(|h| h.v2 && h.mount == Path::new(CGROUP_FS))
            .cloned()
            .collect()
    } else {
        all.iter()
            .filter(|h| h.v2 || h.has("name=systemd") || h.has("pids") || h.has("memory"))
            .cloned()
            .collect()
    };
    if !targets.iter().any(|h| h.v2 || h.has("name=systemd")) {
        return Err("no cgroup2 or name=systemd hierarchy under /sys/fs/cgroup".into());
    }
    if let Some(h) = targets.iter().find(|h| h.own.is_none()) {
        return Err(format!(
            "cannot tell this process's cgroup in {}",
            h.mount.display()
        ));
    }
    let pick =
        |f: &dyn Fn(&Hierarchy) -> bool| targets.iter().find(|h| f(h)).and_then(|h| h.own.clone());
    let base = pick(&|h| h.has("memory"))
        .or_else(|| pick(&|h| h.v2))
        .or_else(|| pick(&|h| h.has("name=systemd")))
        .ok_or("no base cgroup")?;
    for h in &all {
        let Some(p) = h.own.as_deref() else { continue };
        if !p.starts_with('/') || p.contains(char::is_whitespace) || p.split('/').any(|c| c == "..")
        {
            return Err(format!(
                "unusable cgroup path {p:?} in {}",
                h.mount.display()
            ));
        }
    }
    Ok(Layout { base, targets, all })
}

/// `flock` on `/sys/fs/cgroup`, held until dropped: serialises creating and removing the shared
/// parent directories between the cgroups of all test threads and test processes.
pub struct Lock {
    _held: Flock<fs::File>,
}

impl Lock {
    /// Takes the lock, waiting for it.
    pub fn take() -> io::Result<Lock> {
        let mut file = fs::File::open(CGROUP_FS)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(held) => return Ok(Lock { _held: held }),
                Err((f, nix::errno::Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(e.into()),
            }
        }
    }
}

/// Directories of `dir`'s tree, children before parents.
pub(crate) fn dirs_depth_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                dirs_depth_first(&e.path(), out);
            }
        }
    }
    out.push(dir.to_owned());
}

/// Every pid listed in a `cgroup.procs` of the subtrees `roots`.
pub(crate) fn subtree_pids(roots: &[PathBuf]) -> Vec<i32> {
    let mut pids = Vec::new();
    for root in roots {
        let mut dirs = Vec::new();
        if root.is_dir() {
            dirs_depth_first(root, &mut dirs);
        }
        for d in dirs {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs everything in the subtrees `roots` but `except` (and this process) until they are
/// empty or `timeout` has passed; returns the pids it signalled. Without exceptions, first writes
/// `cgroup.kill` where the kernel has it (cgroup v2, Linux 5.14+).
pub(crate) fn kill_subtree(roots: &[PathBuf], except: &[i32], timeout: Duration) -> Vec<i32> {
    if except.is_empty() {
        for root in roots {
            let kill = root.join("cgroup.kill");
            if kill.exists() {
                let _ = fs::write(&kill, "1");
            }
        }
    }
    let me = std::process::id() as i32;
    let deadline = Instant::now() + timeout;
    let mut killed = Vec::new();
    loop {
        let pids: Vec<i32> = subtree_pids(roots)
            .into_iter()
            .filter(|p| *p != me && !except.contains(p))
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            return killed;
        }
        for pid in pids {
            // `pid` was just listed in our own subtree's cgroup.procs: a process of ours, or
            // one the manager started.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            if !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `rmdir`s the subtrees `roots` depth-first (retrying while the kernel still reports them busy).
pub(crate) fn remove_subtree(roots: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    for root in roots {
        if !root.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        dirs_depth_first(root, &mut dirs);
        for d in dirs {
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                    Err(e) => {
                        problems.push(format!("rmdir {}: {e}", d.display()));
                        break;
                    }
                }
            }
        }
    }
    problems
}

/// Removes `base` and its ancestors in `h` while they are empty and neither this process's own
/// cgroup there nor one of its ancestors (i.e. the parent directories the harness, or a manager
/// nested in them, created). Caller holds the [`Lock`].
pub(crate) fn remove_parents(h: &Hierarchy, base: &str) {
    let Some(own) = h.own.as_deref() else { return };
    let mut a = base.trim_end_matches('/').to_string();
    while !a.is_empty() {
        if own == a || own.starts_with(&format!("{a}/")) {
            break;
        }
        match fs::remove_dir(h.dir(&a)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => break, // not empty: still in use by another manager
        }
        a.truncate(a.rfind('/').unwrap_or(0));
    }
}

/// A cgroup of the v1 `pids` controller, nested under this test's own cgroup path (never the
/// root); removed on drop, after killing whatever is still in it.
pub struct PidsCgroup {
    dir: PathBuf,
    /// The directories created for it, parents first.
    created: Vec<PathBuf>,
}

impl PidsCgroup {
    /// Creates one; says why it cannot ([`skip`]) and returns `None` without a v1 `pids`
    /// hierarchy.
    pub fn create() -> Option<PidsCgroup> {
        let layout = layout().unwrap_or_else(|e| panic!("cgroups: {e}"));
        let Some(pids) = layout.all.iter().find(|h| !h.v2 && h.has("pids")) else {
            skip("no cgroup v1 pids hierarchy mounted");
            return None;
        };
        // Our place: in the pids hierarchy if it is not the root there, else our memory
        // cgroup's path (as the systemd harness does).
        let base = pids
            .own
            .clone()
            .filter(|p| p != "/")
            .unwrap_or_else(|| layout.base.clone());
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let leaf = format!("handover-pids-{}-{n}", std::process::id());
        let dir = pids.dir(&base).join(leaf);
        let _lock = Lock::take().unwrap();
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
        missing.reverse();
        let mut created = Vec::new();
        for d in missing {
            fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            created.push(d.to_owned());
        }
        Some(PidsCgroup { dir, created })
    }

    /// Writes `value` to its file `file` (`cgroup.procs`, `pids.max`).
    pub fn write(&self, file: &str, value: &str) {
        fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {file}: {e}"));
    }

    /// Its file `file`, trimmed.
    pub fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("pids.max"), "max");
        kill_subtree(
            std::slice::from_ref(&self.dir),
            &[],
            Duration::from_secs(10),
        );
        let _lock = Lock::take();
        for d in self.created.iter().rev() {
            let end = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < end {
                std::thread::sleep(POLL);
            }
        }
    }
}
