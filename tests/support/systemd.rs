//! A private systemd user manager, with its own journald, for integration tests.
//!
//! Include it from a test crate with
//! `#[path = "support/systemd.rs"] mod systemd;` and boot one manager per test:
//!
//! ```ignore
//! let Some(m) = systemd::UserManager::boot_or_skip("hello") else { return };
//! m.install_unit("hello.service", "[Service]\nType=notify\nExecStart=/path/to/bin\n");
//! m.daemon_reload();
//! assert!(m.systemctl(&["start", "hello.service"]).status.success());
//! let pid = m.main_pid("hello.service");
//! m.wait_for_journal(&[&format!("_PID={pid}")], Duration::from_secs(5), |e| {
//!     e.get("MESSAGE").is_some_and(|m| m.contains("ready"))
//! });
//! // dropping `m` kills everything it started and removes its cgroups and files
//! ```
//!
//! How it works (see DESIGN.md §6): `unshare --mount --propagation private sh -c BOOT_SCRIPT`
//! mounts private tmpfs on `/run/systemd` (with `/run/systemd/system`, without which systemd
//! refuses to start a user manager), `/run/log` and, when it exists, `/var/log/journal`; moves
//! itself into `<sub>/journal`, starts `systemd-journald` there, moves itself into `<sub>/manager`,
//! waits for `/run/systemd/journal/socket` and `exec`s `systemd --user` (so the pid of the spawned
//! child is the manager's pid). `<sub>` is `<the test's own cgroup in the memory hierarchy>/
//! handover-sd-<pid>-<n>-<tag>`, created at that same path in the `name=systemd`, unified
//! (cgroup2), `pids` and `memory` hierarchies that exist (or in the single hierarchy of a pure
//! cgroup v2 host), so nothing the manager starts escapes the machine's accounting and nothing
//! ever runs in a root cgroup. `XDG_RUNTIME_DIR` is a fresh private directory; units go to
//! `$XDG_RUNTIME_DIR/systemd/user/`. `systemctl --user` is run from outside the namespace with only
//! `PATH` and `XDG_RUNTIME_DIR` set: it then talks to `$XDG_RUNTIME_DIR/systemd/private` directly
//! (no D-Bus daemon). `journalctl` runs inside the namespace (`nsenter -m -t <journald pid>`).
//!
//! Facts about systemd 252 on these machines worth knowing when writing tests:
//! - A service's own stdout/stderr and native journal entries carry `_PID`, `_SYSTEMD_CGROUP`
//!   (`<sub>/manager/app.slice/<unit>`) but **no** `_SYSTEMD_USER_UNIT`/`_SYSTEMD_UNIT` (the cgroup
//!   path is not under `user@.service`), so `journalctl --user-unit` finds only the manager's
//!   own messages about the unit (field `USER_UNIT=`). Use [`UserManager::unit_journal`] or match
//!   on `_PID=`.
//! - `systemctl --user is-system-running` prints `offline` from outside the namespace (it
//!   short-circuits on "not booted with systemd"); use `show -p SystemState --value`.
//! - `journalctl --sync` does not guarantee that a line a service has just written to its stdout
//!   stream is already indexed: poll with [`UserManager::wait_for_journal`].
//!
//! All methods are blocking (they run processes); in async tests call them from a blocking
//! context (`spawn_blocking`) if the same runtime must keep serving meanwhile.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Bound on every wait the harness does by itself (boot, journald socket, teardown kills).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long teardown lets `systemctl --user stop` of the installed units take before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

const SYSTEMD: &str = "/usr/lib/systemd/systemd";
const JOURNALD: &str = "/usr/lib/systemd/systemd-journald";
const CGROUP_FS: &str = "/sys/fs/cgroup";
/// Prefix of every cgroup and temp directory the harness creates: `handover-sd-<pid>-<n>-<tag>`.
const NAME_PREFIX: &str = "handover-sd-";

/// Runs in the private mount namespace, as the process that becomes the manager.
/// Parameters come from the environment (paths checked for whitespace beforehand).
const BOOT_SCRIPT: &str = r#"set -eu
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal
mkdir -p /run/log
mount -t tmpfs -o mode=0755 tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
for d in $HSD_JOURNAL_CG; do echo $$ > "$d/cgroup.procs"; done
/usr/lib/systemd/systemd-journald </dev/null >>"$HSD_STATE/journald.log" 2>&1 &
jpid=$!
echo "$jpid" > "$HSD_STATE/journald.pid"
for d in $HSD_MANAGER_CG; do echo $$ > "$d/cgroup.procs"; done
n=0
while [ ! -S /run/systemd/journal/socket ]; do
  if ! kill -0 "$jpid" 2>/dev/null; then echo "handover harness: journald exited" >&2; exit 1; fi
  n=$((n+1))
  if [ "$n" -gt 2000 ]; then
    echo "handover harness: no /run/systemd/journal/socket after 20 s" >&2; exit 1
  fi
  sleep 0.01
done
unset HSD_JOURNAL_CG HSD_MANAGER_CG HSD_STATE
exec /usr/lib/systemd/systemd --user
"#;

/// One parsed journal entry: field name to value (binary fields decoded lossily; when a field
/// occurs several times in one entry, the last value wins).
pub type JournalEntry = HashMap<String, String>;

/// A running private `systemd --user` manager plus its journald. Dropping it tears everything
/// down (see [`Drop`] impl); teardown also runs when the test panics.
pub struct UserManager {
    /// `handover-sd-<pid>-<n>-<tag>`
    name: String,
    /// Parent of the subtree, relative to each hierarchy root, e.g. `/process_api/<hash>`.
    base: String,
    /// `<base>/<name>`
    cgroup: String,
    /// Hierarchies the subtree was created in.
    targets: Vec<Hierarchy>,
    /// Every mounted cgroup hierarchy (systemd may create directories in any of them).
    all: Vec<Hierarchy>,
    tools: &'static Tools,
    state: Option<tempfile::TempDir>,
    state_path: PathBuf,
    runtime: PathBuf,
    manager: Option<Child>,
    manager_pid: u32,
    journald_pid: u32,
    units: Mutex<Vec<String>>,
}

enum BootError {
    /// The machine cannot host a private manager: tests may skip.
    Unsupported(String),
    /// It should have worked and did not: always a failure.
    Failed(String),
}

impl UserManager {
    /// Boots journald + a `systemd --user` manager in a private mount namespace and a private
    /// cgroup subtree, and waits (at most [`BOOT_TIMEOUT`]) until the manager reports
    /// `running` (or `degraded`). `tag` (sanitised, at most 16 chars) goes into the names of the
    /// cgroup and the temp directory to ease debugging. Returns `Err(reason)` when it cannot
    /// (not root, no `/usr/lib/systemd/systemd`, no mount namespaces, boot failed, ...).
    pub fn boot(tag: &str) -> Result<UserManager, String> {
        boot_inner(tag).map_err(|e| match e {
            BootError::Unsupported(s) => s,
            BootError::Failed(s) => s,
        })
    }

    /// Like [`UserManager::boot`], but when the machine cannot host a manager (not root,
    /// systemd missing, no mount namespaces, unusable cgroups): with env `CI` set (and not
    /// `0`/`false`) panics with the reason, otherwise prints `SKIP <test>: <reason>` to stderr and
    /// returns `None`. A boot that was possible but failed always panics.
    pub fn boot_or_skip(tag: &str) -> Option<UserManager> {
        match boot_inner(tag) {
            Ok(m) => Some(m),
            Err(BootError::Failed(reason)) => panic!("systemd harness: {reason}"),
            Err(BootError::Unsupported(reason)) => {
                let ci = std::env::var("CI")
                    .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
                    .unwrap_or(false);
                if ci {
                    panic!("systemd harness cannot run here (CI is set): {reason}");
                }
                let thread = std::thread::current();
                eprintln!("SKIP {}: {reason}", thread.name().unwrap_or(tag));
                None
            }
        }
    }

    /// The manager's `XDG_RUNTIME_DIR` (private, mode 0700; `%t` in unit files). Removed on drop.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime
    }

    /// Pid of the `systemd --user` process.
    pub fn manager_pid(&self) -> u32 {
        self.manager_pid
    }

    /// Pid of the private `systemd-journald`.
    pub fn journald_pid(&self) -> u32 {
        self.journald_pid
    }

    /// The subtree's path relative to each hierarchy root, e.g.
    /// `/process_api/<hash>/handover-sd-<pid>-<n>-<tag>`; the manager itself lives in
    /// `<this>/manager`, so a user service's cgroup is `<this>/manager/app.slice/<unit>`.
    pub fn cgroup_path(&self) -> &str {
        &self.cgroup
    }

    /// The subtree's directory in every mounted hierarchy (existing or not): after drop none of
    /// them exists.
    pub fn subtree_dirs(&self) -> Vec<PathBuf> {
        self.all.iter().map(|h| h.dir(&self.cgroup)).collect()
    }

    /// Writes `$XDG_RUNTIME_DIR/systemd/user/<name>`, creating parent directories, so drop-ins
    /// work too (`"hello.service.d/override.conf"`). Call [`UserManager::daemon_reload`] after
    /// changing a unit that was already loaded. Units installed here are stopped on drop.
    pub fn install_unit(&self, name: &str, contents: &str) {
        assert!(
            !name.starts_with('/')
                && !name
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".."),
            "install_unit: bad unit file name {name:?}"
        );
        let path = self.runtime.join("systemd/user").join(name);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        if !name.contains('/') {
            let mut units = self.units.lock().unwrap_or_else(|e| e.into_inner());
            if !units.iter().any(|u| u == name) {
                units.push(name.to_string());
            }
        }
    }

    /// `systemctl --user daemon-reload`; panics if it fails.
    pub fn daemon_reload(&self) {
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// Runs `systemctl --user --no-pager <args>` from outside the namespace with only `PATH` and
    /// `XDG_RUNTIME_DIR` in its environment. Does not check the exit status.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        Command::new(&self.tools.systemctl)
            .args(["--user", "--no-pager", "--no-ask-password"])
            .args(args)
            .env_clear()
            .env("PATH", path_env())
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn systemctl: {e}"))
    }

    /// Like [`UserManager::systemctl`], but panics (with stdout and stderr) unless it exits 0;
    /// returns stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        if !out.status.success() {
            panic!(
                "systemctl --user {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl --user show -p <property> --value <unit>`, without the trailing newline.
    /// An empty `unit` reads a property of the manager itself (e.g. `SystemState`).
    pub fn show(&self, unit: &str, property: &str) -> String {
        let mut args = vec!["show", "-p", property, "--value"];
        if !unit.is_empty() {
            args.push(unit);
        }
        let mut v = self.systemctl_ok(&args);
        if v.ends_with('\n') {
            v.pop();
        }
        v
    }

    /// The unit's `MainPID` (0 when it has none).
    pub fn main_pid(&self, unit: &str) -> u32 {
        let v = self.show(unit, "MainPID");
        v.parse()
            .unwrap_or_else(|_| panic!("MainPID of {unit} is not a number: {v:?}"))
    }

    /// Polls `f` every 10 ms until it returns true; panics with `what`, the manager's failed or
    /// pending units and the journal's tail once `timeout` has passed. Only for manager state
    /// that has no event to wait on.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if f() {
                return;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs `journalctl --no-pager <args>` on this manager's private journal (inside its mount
    /// namespace), after `journalctl --sync`. Panics if journalctl fails.
    pub fn journal(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.journal_bytes(args)).into_owned()
    }

    /// The journal entries matching `matches` (journalctl match syntax, e.g. `["_PID=42"]`,
    /// `["USER_UNIT=x.service", "+", "_PID=42"]`, or options such as `["-n", "20"]`), parsed
    /// from `journalctl -o export`.
    pub fn journal_entries(&self, matches: &[&str]) -> Vec<JournalEntry> {
        let mut args = vec!["-o", "export"];
        args.extend_from_slice(matches);
        parse_journal_export(&self.journal_bytes(&args))
    }

    /// Every entry about `unit`: what its processes logged (`_SYSTEMD_CGROUP` ends in
    /// `/<unit>` within this manager's subtree) and what the manager logged about it
    /// (`USER_UNIT=<unit>`).
    pub fn unit_journal(&self, unit: &str) -> Vec<JournalEntry> {
        let prefix = format!("{}/", self.cgroup);
        let suffix = format!("/{unit}");
        self.journal_entries(&[])
            .into_iter()
            .filter(|e| {
                e.get("USER_UNIT").is_some_and(|u| u == unit)
                    || e.get("_SYSTEMD_USER_UNIT").is_some_and(|u| u == unit)
                    || e.get("_SYSTEMD_CGROUP")
                        .is_some_and(|c| c.starts_with(&prefix) && c.ends_with(&suffix))
            })
            .collect()
    }

    /// Polls [`UserManager::journal_entries`]`(matches)` until an entry satisfies `pred` and
    /// returns it; panics after `timeout`.
    pub fn wait_for_journal(
        &self,
        matches: &[&str],
        timeout: Duration,
        mut pred: impl FnMut(&JournalEntry) -> bool,
    ) -> JournalEntry {
        let mut found = None;
        self.wait_until(
            &format!("a journal entry matching {matches:?}"),
            timeout,
            || {
                found = self.journal_entries(matches).into_iter().find(|e| pred(e));
                found.is_some()
            },
        );
        found.unwrap()
    }

    fn journal_bytes(&self, args: &[&str]) -> Vec<u8> {
        // Best effort: an error here shows up in the real call below.
        let _ = self.journalctl(&["--sync"]);
        let out = self.journalctl(&[&["--no-pager"], args].concat());
        if !out.status.success() {
            panic!(
                "journalctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.stdout
    }

    fn journalctl(&self, args: &[&str]) -> Output {
        Command::new(&self.tools.nsenter)
            .arg("-m")
            .arg("-t")
            .arg(self.journald_pid.to_string())
            .arg(&self.tools.journalctl)
            .args(args)
            .env_clear()
            .env("PATH", path_env())
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn nsenter journalctl: {e}"))
    }

    /// Failed/pending units and the journal's tail, for panic messages. Never panics.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        if !pid_alive(self.manager_pid) {
            s.push_str(&format!("the manager (pid {}) is dead\n", self.manager_pid));
        }
        let units = self.systemctl(&["list-units", "--all", "--plain", "--no-legend"]);
        let interesting: Vec<String> = String::from_utf8_lossy(&units.stdout)
            .lines()
            .filter(|l| !l.contains(" active ") && !l.contains(" inactive "))
            .map(String::from)
            .collect();
        if !interesting.is_empty() {
            s.push_str(&format!(
                "units not active/inactive:\n{}\n",
                interesting.join("\n")
            ));
        }
        let out = self.journalctl(&["--no-pager", "-n", "40", "-o", "short-monotonic"]);
        s.push_str("journal tail:\n");
        s.push_str(&String::from_utf8_lossy(&out.stdout));
        s.push_str(&String::from_utf8_lossy(&out.stderr));
        s
    }

    fn read_journald_pid(&self) -> Option<u32> {
        fs::read_to_string(self.state_path.join("journald.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn read_log(&self, file: &str) -> String {
        tail(&self.state_path.join(file), 4000)
    }

    fn stop_units(&self) {
        let units: Vec<String> = self
            .units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|u| u.replacen("@.", "@*.", 1))
            .collect();
        if units.is_empty() {
            return;
        }
        let Ok(mut child) = Command::new(&self.tools.systemctl)
            .args(["--user", "--no-pager", "--no-ask-password", "stop"])
            .args(&units)
            .env_clear()
            .env("PATH", path_env())
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return;
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                eprintln!("systemd harness: `systemctl stop` took over {STOP_TIMEOUT:?}, killing everything");
                let _ = child.kill();
                break;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.wait();
    }

    /// The full teardown; returns what went wrong.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut child) = self.manager.take() {
            if !std::thread::panicking() && matches!(child.try_wait(), Ok(None)) {
                self.stop_units();
            }
            if matches!(child.try_wait(), Ok(None)) {
                // Kill the rest first while the manager still runs, so that it reaps its children
                // (services, journald) and nothing is left as a zombie for pid 1 to collect.
                let manager = self.manager_pid as i32;
                let killed =
                    kill_subtree(&self.all, &self.cgroup, &[manager], Duration::from_secs(2));
                let deadline = Instant::now() + Duration::from_secs(1);
                while killed
                    .iter()
                    .any(|p| Path::new(&format!("/proc/{p}")).exists())
                    && Instant::now() < deadline
                {
                    std::thread::sleep(POLL);
                }
            }
            let _ = child.kill(); // SIGKILL by pid: our unreaped child, so the pid is still ours
            let _ = child.wait();
        }
        kill_subtree(&self.all, &self.cgroup, &[], KILL_TIMEOUT);
        let left = subtree_pids(&self.all, &self.cgroup);
        if !left.is_empty() {
            problems.push(format!(
                "processes still in {} after {KILL_TIMEOUT:?}: {left:?}",
                self.cgroup
            ));
        }
        problems.extend(remove_subtree(&self.all, &self.cgroup));
        match CgroupLock::take() {
            Ok(_lock) => {
                for h in &self.all {
                    remove_parents(h, &self.base);
                }
            }
            Err(e) => problems.push(format!("lock {CGROUP_FS}: {e}")),
        }
        if let Some(dir) = self.state.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                problems.push(format!("remove {}: {e}", path.display()));
            }
        }
        problems
    }
}

/// Teardown: stop the installed units (bounded, skipped while panicking); SIGKILL, by pid, every
/// other process in the subtree while the manager still runs (so it reaps them: no zombies);
/// SIGKILL the manager by pid and reap it; kill whatever is still in the subtree (`cgroup.kill`
/// where the kernel has it, then by pid from every `cgroup.procs`, bounded); `rmdir` the subtree
/// depth-first in every hierarchy and
/// the now empty parent directories that are not the test's own cgroup or its ancestors, and
/// remove the temp directory. Panics on leftovers unless the thread is already panicking.
impl Drop for UserManager {
    fn drop(&mut self) {
        let problems = self.teardown();
        if !problems.is_empty() {
            let msg = format!(
                "systemd harness teardown of {}: {}",
                self.name,
                problems.join("; ")
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// Parses `journalctl -o export` output: `KEY=VALUE` lines, entries separated by an empty line;
/// a binary field is `KEY\n`, a little-endian u64 length, the data and `\n`.
pub fn parse_journal_export(data: &[u8]) -> Vec<JournalEntry> {
    let mut entries = Vec::new();
    let mut cur = JournalEntry::new();
    let mut i = 0;
    while i < data.len() {
        let end = data[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| i + p);
        let line = &data[i..end];
        i = end + 1;
        if line.is_empty() {
            if !cur.is_empty() {
                entries.push(std::mem::take(&mut cur));
            }
        } else if let Some(eq) = line.iter().position(|&b| b == b'=') {
            cur.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
        } else {
            let Some(len) = data.get(i..i + 8) else { break };
            let len = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            i += 8;
            let end = i.saturating_add(len).min(data.len());
            cur.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&data[i..end]).into_owned(),
            );
            i = end + 1; // the '\n' after the data
        }
    }
    if !cur.is_empty() {
        entries.push(cur);
    }
    entries
}

// ---------------------------------------------------------------------------------------------
// boot

struct Tools {
    unshare: PathBuf,
    nsenter: PathBuf,
    systemctl: PathBuf,
    journalctl: PathBuf,
    sh: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn boot_inner(tag: &str) -> Result<UserManager, BootError> {
    let tools = preflight().map_err(BootError::Unsupported)?;
    let layout = cgroup_layout().map_err(BootError::Unsupported)?;
    let fail = |what: &str, e: &dyn std::fmt::Display| BootError::Failed(format!("{what}: {e}"));

    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(16)
        .collect();
    let name = format!(
        "{NAME_PREFIX}{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        if tag.is_empty() { "t" } else { &tag }
    );
    let state = tempfile::Builder::new()
        .prefix(&format!("{name}."))
        .tempdir_in(tmp_base())
        .map_err(|e| fail("create temp dir", &e))?;
    let state_path = state.path().to_owned();
    let runtime = state_path.join("run");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&runtime)
        .and_then(|_| fs::create_dir_all(runtime.join("systemd/user")))
        .map_err(|e| fail("create runtime dir", &e))?;
    let cgroup = format!("{}/{name}", layout.base.trim_end_matches('/'));

    // From here on, Drop cleans up whatever exists.
    let mut m = UserManager {
        name,
        base: layout.base.clone(),
        cgroup,
        targets: layout.targets,
        all: layout.all,
        tools,
        state: Some(state),
        state_path,
        runtime,
        manager: None,
        manager_pid: 0,
        journald_pid: 0,
        units: Mutex::new(Vec::new()),
    };

    {
        let _lock = CgroupLock::take().map_err(|e| fail("lock /sys/fs/cgroup", &e))?;
        reap_stale(&m.all);
        for t in &m.targets {
            for leaf in ["journal", "manager"] {
                let dir = t.dir(&m.cgroup).join(leaf);
                fs::create_dir_all(&dir)
                    .map_err(|e| fail(&format!("mkdir {}", dir.display()), &e))?;
            }
        }
    }

    let list = |leaf: &str| -> String {
        let dirs: Vec<String> = m
            .targets
            .iter()
            .map(|t| t.dir(&m.cgroup).join(leaf).display().to_string())
            .collect();
        dirs.join(" ")
    };
    let (journal_cg, manager_cg) = (list("journal"), list("manager"));
    for p in [&journal_cg, &manager_cg] {
        if p.contains(['\n', '\t']) || p.split(' ').any(|d| d.is_empty()) {
            return Err(BootError::Failed(format!(
                "cgroup paths with whitespace: {p:?}"
            )));
        }
    }
    if m.state_path.to_string_lossy().contains(char::is_whitespace) {
        return Err(BootError::Failed(format!(
            "temp dir with whitespace: {:?}",
            m.state_path
        )));
    }

    let log = fs::File::create(m.state_path.join("manager.log"))
        .map_err(|e| fail("create manager.log", &e))?;
    let log2 = log.try_clone().map_err(|e| fail("dup log", &e))?;
    let mut cmd = Command::new(&tools.unshare);
    cmd.args(["--mount", "--propagation", "private"])
        .arg(&tools.sh)
        .arg("-c")
        .arg(BOOT_SCRIPT)
        .arg("handover-sd-boot")
        .env_clear()
        .envs(manager_env(&m.runtime))
        .env("HSD_JOURNAL_CG", &journal_cg)
        .env("HSD_MANAGER_CG", &manager_cg)
        .env("HSD_STATE", &m.state_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let child = cmd.spawn().map_err(|e| fail("spawn unshare", &e))?;
    m.manager_pid = child.id();
    m.manager = Some(child);

    // Wait for the manager to be up.
    let private = m.runtime.join("systemd/private");
    let start = Instant::now();
    let mut last_state = String::from("(no bus socket yet)");
    loop {
        if let Ok(Some(status)) = m.manager.as_mut().unwrap().try_wait() {
            return Err(BootError::Failed(format!(
                "the manager exited during boot ({status}); its output:\n{}\njournald's output:\n{}",
                m.read_log("manager.log"),
                m.read_log("journald.log")
            )));
        }
        if private.exists() {
            let out = m.systemctl(&["show", "-p", "SystemState", "--value"]);
            last_state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if last_state == "running" || last_state == "degraded" {
                break;
            }
        }
        if start.elapsed() > BOOT_TIMEOUT {
            m.journald_pid = m.read_journald_pid().unwrap_or(0);
            return Err(BootError::Failed(format!(
                "the manager is not running after {BOOT_TIMEOUT:?} (state: {last_state}); its output:\n{}\n{}",
                m.read_log("manager.log"),
                m.diagnostics()
            )));
        }
        std::thread::sleep(POLL);
    }
    m.journald_pid = m.read_journald_pid().ok_or_else(|| {
        BootError::Failed(format!(
            "no pid in {}",
            m.state_path.join("journald.pid").display()
        ))
    })?;
    Ok(m)
}

fn preflight() -> Result<&'static Tools, String> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            if unsafe { libc::geteuid() } != 0 {
                return Err("not running as root".into());
            }
            for bin in [SYSTEMD, JOURNALD] {
                let ok =
                    fs::metadata(bin).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
                if !ok.unwrap_or(false) {
                    return Err(format!("{bin} not found"));
                }
            }
            let tools = Tools {
                unshare: which("unshare")?,
                nsenter: which("nsenter")?,
                systemctl: which("systemctl")?,
                journalctl: which("journalctl")?,
                sh: which("sh")?,
            };
            let probe = Command::new(&tools.unshare)
                .args(["--mount", "--propagation", "private", "true"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("spawn unshare: {e}"))?;
            if !probe.status.success() {
                return Err(format!(
                    "cannot create a mount namespace: {}",
                    String::from_utf8_lossy(&probe.stderr).trim()
                ));
            }
            Ok(tools)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn which(name: &str) -> Result<PathBuf, String> {
    std::env::split_paths(&path_env())
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| format!("`{name}` not found in PATH"))
}

fn path_env() -> OsString {
    std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// The manager's whole environment (its units inherit it): nothing of the test's but a few
/// basics, so no stray `NOTIFY_SOCKET`, `LISTEN_*` or `DBUS_SESSION_BUS_ADDRESS` leaks in.
fn manager_env(runtime: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), path_env()),
        (
            "HOME".into(),
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        ),
        ("USER".into(), "root".into()),
        ("LOGNAME".into(), "root".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("XDG_RUNTIME_DIR".into(), runtime.into()),
        ("SYSTEMD_LOG_TARGET".into(), "journal".into()),
    ];
    for k in ["SYSTEMD_LOG_LEVEL", "RUST_LOG", "RUST_BACKTRACE"] {
        if let Some(v) = std::env::var_os(k) {
            env.push((k.into(), v));
        }
    }
    env
}

/// Temp directory for the state dirs; `/tmp` if `TMPDIR` is long (unix socket paths in
/// `XDG_RUNTIME_DIR` must stay under 108 bytes).
fn tmp_base() -> PathBuf {
    let t = std::env::temp_dir();
    if t.as_os_str().len() <= 32 {
        t
    } else {
        PathBuf::from("/tmp")
    }
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("({} missing)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Whether `pid` names a live process (a zombie counts as dead).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// cgroups

#[derive(Clone, Debug)]
struct Hierarchy {
    /// Mount point, e.g. `/sys/fs/cgroup/memory`.
    mount: PathBuf,
    v2: bool,
    /// Controllers and `name=` options (v1).
    controllers: Vec<String>,
    /// This process's cgroup in it, relative to the mount's root (None if unknown).
    own: Option<String>,
}

impl Hierarchy {
    fn dir(&self, rel: &str) -> PathBuf {
        self.mount.join(rel.trim_start_matches('/'))
    }
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

struct Layout {
    base: String,
    targets: Vec<Hierarchy>,
    all: Vec<Hierarchy>,
}

/// Reads the mounted hierarchies from `/proc/self/mountinfo` and this process's place in each
/// from `/proc/self/cgroup`; chooses where to create the subtree.
fn cgroup_layout() -> Result<Layout, String> {
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
        // This process's line for the hierarchy: `0::path` (v2) or `N:ctrl,ctrl:path` (v1).
        let own = own_lines.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            let matches = if v2 {
                ctrls.is_empty()
            } else {
                !ctrls.is_empty() && ctrls.split(',').all(|c| controllers.iter().any(|x| x == c))
            };
            if !matches {
                return None;
            }
            // Paths are relative to the mount's root when that is a subtree (bind mount).
            let rel = if root == "/" {
                Some(path)
            } else {
                path.strip_prefix(root)
            }?;
            Some(if rel.is_empty() {
                "/".to_string()
            } else {
                rel.to_string()
            })
        });
        all.push(Hierarchy {
            mount: mount.into(),
            v2,
            controllers,
            own,
        });
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
    if !base.starts_with('/')
        || base.contains(char::is_whitespace)
        || base.split('/').any(|c| c == "..")
    {
        return Err(format!("unusable cgroup path {base:?}"));
    }
    Ok(Layout { base, targets, all })
}

/// `flock` on `/sys/fs/cgroup`: serialises creating and removing the shared parent directories
/// between the managers of all test threads and test binaries.
struct CgroupLock(fs::File);

impl CgroupLock {
    fn take() -> io::Result<CgroupLock> {
        let f = fs::File::open(CGROUP_FS)?;
        loop {
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(CgroupLock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Directories of `dir`'s tree, children before parents.
fn dirs_depth_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                dirs_depth_first(&e.path(), out);
            }
        }
    }
    out.push(dir.to_owned());
}

fn subtree_pids(all: &[Hierarchy], rel: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for h in all {
        let mut dirs = Vec::new();
        let root = h.dir(rel);
        if root.is_dir() {
            dirs_depth_first(&root, &mut dirs);
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

/// SIGKILLs everything in the subtree `rel` of every hierarchy but `except` (and this process)
/// until it is empty or `timeout` has passed; returns the pids it signalled. Without exceptions,
/// first writes `cgroup.kill` where the kernel has it (cgroup v2, Linux 5.14+).
fn kill_subtree(all: &[Hierarchy], rel: &str, except: &[i32], timeout: Duration) -> Vec<i32> {
    if except.is_empty() {
        for h in all.iter().filter(|h| h.v2) {
            let kill = h.dir(rel).join("cgroup.kill");
            if kill.exists() {
                let _ = fs::write(&kill, "1");
            }
        }
    }
    let me = std::process::id() as i32;
    let deadline = Instant::now() + timeout;
    let mut killed = Vec::new();
    loop {
        let pids: Vec<i32> = subtree_pids(all, rel)
            .into_iter()
            .filter(|p| *p != me && !except.contains(p))
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            return killed;
        }
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `rmdir`s the subtree `rel` depth-first in every hierarchy (retrying while the kernel still
/// reports it busy).
fn remove_subtree(all: &[Hierarchy], rel: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    for h in all {
        let root = h.dir(rel);
        if !root.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        dirs_depth_first(&root, &mut dirs);
        for d in dirs {
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(POLL);
                    }
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
/// nested in them, created). Caller holds the [`CgroupLock`].
fn remove_parents(h: &Hierarchy, base: &str) {
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

/// Cleans up after test processes that died without running Drop (SIGKILL, timeout): subtrees
/// and temp dirs named `handover-sd-<pid>-...` whose pid no longer exists. Caller holds the lock.
fn reap_stale(all: &[Hierarchy]) {
    fn stale(name: &str) -> bool {
        name.strip_prefix(NAME_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    }
    fn walk(h: &Hierarchy, rel: &str, depth: u32, found: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(h.dir(rel)) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let child = format!("{}/{name}", rel.trim_end_matches('/'));
            if name.starts_with(NAME_PREFIX) {
                if stale(&name) {
                    found.push(child);
                }
            } else if depth < 12 {
                walk(h, &child, depth + 1, found);
            }
        }
    }
    let mut found = Vec::new();
    for h in all {
        walk(h, "/", 0, &mut found);
    }
    found.sort();
    found.dedup();
    for rel in found {
        eprintln!("systemd harness: cleaning up stale cgroup {rel}");
        kill_subtree(all, &rel, &[], Duration::from_secs(5));
        for p in remove_subtree(all, &rel) {
            eprintln!("systemd harness: {p}");
        }
        let parent = &rel[..rel.rfind('/').unwrap_or(0)];
        for h in all {
            remove_parents(h, parent);
        }
    }
    if let Ok(rd) = fs::read_dir(tmp_base()) {
        for e in rd.flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
