//! A private systemd user manager, with its own journald, for integration tests: either the
//! host's own systemd or systemd 257 from a cached Debian trixie root.
//!
//! Boot one manager per test:
//!
//! ```ignore
//! fn hello_runs(m: &UserManager) {
//!     m.install_unit("hello.service", "[Service]\nType=notify\nExecStart=/path/to/bin\n");
//!     m.daemon_reload();
//!     assert!(m.systemctl(&["start", "hello.service"]).status.success());
//!     let pid = m.main_pid("hello.service");
//!     m.wait_for_journal(&[&format!("_PID={pid}")], Duration::from_secs(5), |e| {
//!         e.get("MESSAGE").is_some_and(|m| m.contains("ready"))
//!     });
//! }
//! // Tests hello_runs::host and hello_runs::v257, each with a manager of its own: dropped after
//! // the test (also when it panics), it kills everything it started and removes its cgroups
//! // and files.
//! support::on_each_manager!(hello_runs);
//! ```
//!
//! # The two managers
//!
//! [`Manager::Host`] is the host's `/usr/lib/systemd/systemd` (252 on Debian 12, RHEL 9 ships
//! 252 too) on the host's cgroup layout. `unshare --mount --propagation private sh -c
//! BOOT_SCRIPT` mounts private tmpfs on `/run/systemd` (with `/run/systemd/system`, without which
//! systemd refuses to start a user manager, and a journald drop-in: `Storage=volatile`,
//! `ReadKMsg=no`, no rate limit), `/run/log` and, when it exists, `/var/log/journal`; moves
//! itself into `<sub>/journald.service`, starts `systemd-journald` there, moves itself into
//! `<sub>/user@0.service`, waits for `/run/systemd/journal/socket` and `exec`s `systemd --user`
//! (so the pid of the spawned child is the manager's pid). `<sub>` is `<the test's own cgroup in
//! the memory hierarchy>/handover-sd-<pid>-<n>-<tag>`, created at that same path in the
//! `name=systemd`, unified (cgroup2), `pids` and `memory` hierarchies that exist (or in the single
//! hierarchy of a pure cgroup v2 host): systemd 252 on a hybrid host uses one path in every
//! hierarchy, so nothing the manager starts escapes the machine's accounting and nothing ever
//! runs in a root cgroup. `systemctl --user` runs from outside the namespace with a minimal
//! environment (`PATH`, `HOME`, `LANG`, `XDG_RUNTIME_DIR`): it then talks to
//! `$XDG_RUNTIME_DIR/systemd/private` directly (no D-Bus daemon); `journalctl` and other tools
//! run inside the namespace (`nsenter -m`).
//!
//! [`Manager::V257`] is systemd 257 (Debian 13; Fedora and RHEL 10 run 257 too) from a minimal
//! Debian trixie root that `mmdebstrap` builds once, into a temporary directory renamed into
//! place when complete (so an interrupted build never leaves a half root), at
//! `/var/cache/handover-tests/systemd-257` (`HANDOVER_TEST_CACHE` overrides the directory). In
//! a private mount namespace the boot script mounts, under that root: a fresh `proc`, `/dev`
//! (recursive bind), `/sys` (plain bind: it hides the host's cgroup v1 mounts) with **a cgroup2
//! mount on its `/sys/fs/cgroup`**, so 257 runs on a pure unified hierarchy as it does on those
//! distributions; tmpfs on `/run` (with `/run/systemd/system`), `/tmp` and `/var/log/journal`;
//! and, at the same paths as outside, the test's state directory (read-write: it holds
//! `XDG_RUNTIME_DIR` and [`UserManager::scratch_dir`]) and the directory cargo builds into
//! (read-only: test binaries and examples; their mount points stay in the root as empty
//! directories, the only change a boot makes to it). journald gets a drop-in in
//! `/run/systemd/journald.conf.d/`: `Storage=volatile`, `ReadKMsg=no` (else it imports the
//! host's kernel log), `Audit=` empty (257 defaults to `Audit=yes`, which switches kernel
//! auditing on for the whole machine) and no rate limit. The boot shell moves itself into
//! `<own cgroup2 path>/handover-sd-<pid>-<n>-<tag>.slice/journald.service` (and the same path in
//! the v1 `name=systemd` hierarchy when there is one; never in the v1 controllers: every process
//! stays in the memory cgroup the test has), starts `chroot ROOT systemd-journald`, moves into
//! `.../user@0.service` and execs `chroot ROOT env -i ... systemd --user`. Because the leaf is
//! named `user@0.service` under slices only, journald derives `_SYSTEMD_USER_UNIT=<unit>` for
//! the services' entries and `journalctl --user -u <unit>` works as on a real host
//! ([`UserManager::tags_user_units`]). 257's own `systemctl`, `journalctl` and
//! `systemd-analyze` run inside (`nsenter -t <manager> -m -r -w env -i ... SYSTEMD_IN_CHROOT=0`:
//! systemctl's chroot check cannot read `/proc/1/root` here). Services share the host's network
//! and pid namespaces: load from the test on 127.0.0.1 and pids in `/proc` work as usual.
//!
//! Both managers get a fresh private `XDG_RUNTIME_DIR` (mode 0700, the same path inside and
//! outside); units go to `$XDG_RUNTIME_DIR/systemd/user/`. Each boot prints the manager's version
//! once per test process to the real stderr (not captured by the test runner).
//!
//! Facts worth knowing when writing tests:
//! - On the host's 252 a service's entries carry `_PID` and `_SYSTEMD_CGROUP`
//!   (`<sub>/user@0.service/app.slice/<unit>`) but **no** `_SYSTEMD_USER_UNIT`: the path above
//!   `user@0.service` is not made of slices, so `journalctl --user-unit` finds only the manager's
//!   own messages about the unit (`USER_UNIT=`). Use [`UserManager::unit_journal`] or match on
//!   `_PID=`; on 257 `_SYSTEMD_USER_UNIT=` works as well.
//! - `systemctl --user is-system-running` prints `offline` from outside the namespace (it
//!   short-circuits on "not booted with systemd"); use `show -p SystemState --value`.
//! - `journalctl --sync` does not guarantee that a line a service has just written to its stdout
//!   stream is already indexed: poll with [`UserManager::wait_for_journal`].
//! - PID 1 on these machines is not systemd and reaps orphans only now and then: a zombie counts
//!   as gone ([`crate::process::alive`]).
//!
//! Teardown (also on panic) is the same for both: stop the units (bounded), SIGKILL by pid every
//! other process of the subtree while the manager still runs (so it reaps them), SIGKILL the
//! manager, `cgroup.kill` and kill by pid what is left, `rmdir` the subtree depth-first.
//!
//! All methods are blocking (they run processes); in async tests call them from a blocking
//! context (`spawn_blocking`) if the same runtime must keep serving meanwhile.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cgroup::{self, Hierarchy, CGROUP_FS};
use crate::process::alive;
use crate::{announce, under_ci};
use boot::{boot_inner, home_env, path_env, root_tool_env, tail, BootError, Tools};
use root::Root;

mod boot;
mod journal;
mod root;

pub use journal::{field, message, parse_journal_export, JournalEntry};
pub use root::root_cache_dir;

/// Bound on every wait the harness does by itself (boot, journald socket, teardown kills).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long teardown lets `systemctl --user stop` of the installed units take before killing.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// The manager's leaf in its subtree (named so that journald 257 derives
/// `_SYSTEMD_USER_UNIT=` from the services' cgroups).
const MANAGER_LEAF: &str = "user@0.service";

/// Which systemd a [`UserManager`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Manager {
    /// The host's own systemd (252 on Debian 12) on the host's cgroup layout.
    Host,
    /// systemd 257 from a cached Debian trixie root, on a cgroup2 mount of its own.
    V257,
}

impl Manager {
    /// Both, in the order tests run them.
    pub const ALL: [Manager; 2] = [Manager::Host, Manager::V257];

    /// `host` or `v257`: the test names' suffix.
    pub fn label(self) -> &'static str {
        match self {
            Manager::Host => "host",
            Manager::V257 => "v257",
        }
    }
}

impl fmt::Display for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Manager::Host => "the host's systemd",
            Manager::V257 => "systemd 257 (Debian trixie root)",
        })
    }
}

/// A running private `systemd --user` manager plus its journald. Dropping it tears everything
/// down (see [`Drop`] impl); teardown also runs when the test panics.
pub struct UserManager {
    kind: Manager,
    /// `handover-sd-<pid>-<n>-<tag>` (`.slice` appended for 257)
    name: String,
    /// The subtree's path in the hierarchy the manager tracks its units in (relative to its
    /// root): `_SYSTEMD_CGROUP` of a service is `<this>/user@0.service/app.slice/<unit>`.
    cgroup: String,
    /// The subtree's directory in every hierarchy where it exists or systemd may create it.
    subtree: Vec<PathBuf>,
    /// The hierarchies the harness created the subtree in, with its path there.
    created: Vec<(Hierarchy, String)>,
    /// Hierarchies whose parent directories above the subtree the harness may have created
    /// (removed on teardown when empty), with the subtree's parent path in them.
    parents: Vec<(Hierarchy, String)>,
    tools: &'static Tools,
    /// The trixie root (257 only).
    root: Option<&'static Root>,
    state: Option<tempfile::TempDir>,
    state_path: PathBuf,
    runtime: PathBuf,
    manager: Option<Child>,
    manager_pid: u32,
    journald_pid: u32,
    version: String,
    units: Mutex<Vec<String>>,
}

impl UserManager {
    /// Boots journald + a `systemd --user` manager of kind `manager` in a private mount namespace
    /// and a private cgroup subtree, and waits (at most [`BOOT_TIMEOUT`], plus the one-time build
    /// of the trixie root for 257) until the manager reports `running` (or `degraded`). `tag`
    /// (sanitised, at most 16 chars) goes into the names of the cgroup and the temp directory to
    /// ease debugging. Returns `Err(reason)` when it cannot (not root, systemd missing, no mount
    /// namespaces, no root for 257, boot failed, ...).
    pub fn boot(manager: Manager, tag: &str) -> Result<UserManager, String> {
        boot_inner(manager, tag).map_err(|e| match e {
            BootError::Unsupported(s) => s,
            BootError::Failed(s) => s,
        })
    }

    /// Like [`UserManager::boot`], but when the machine cannot host that manager (not root,
    /// systemd missing, no mount namespaces, unusable cgroups, no archive to build the 257 root
    /// from): under `CI` panics with the reason, otherwise prints `SKIP <test> (<manager>):
    /// <reason>` to the real stderr and returns `None`. A boot that was possible but failed
    /// always panics.
    pub fn boot_or_skip(manager: Manager, tag: &str) -> Option<UserManager> {
        match boot_inner(manager, tag) {
            Ok(m) => Some(m),
            Err(BootError::Failed(reason)) => panic!("systemd harness ({manager}): {reason}"),
            Err(BootError::Unsupported(reason)) => {
                if under_ci() {
                    panic!("systemd harness cannot run {manager} here (CI is set): {reason}");
                }
                let thread = std::thread::current();
                announce(&format!(
                    "SKIP {} ({manager}): {reason}",
                    thread.name().unwrap_or(tag)
                ));
                None
            }
        }
    }

    /// Boots a manager of kind `manager` ([`UserManager::boot_or_skip`], `tag` naming it) and
    /// runs `body` on it; tears it down after, also when `body` panics.
    pub fn run(manager: Manager, tag: &str, body: impl FnOnce(&UserManager)) {
        if let Some(m) = UserManager::boot_or_skip(manager, tag) {
            body(&m);
        }
    }

    /// Which systemd this is.
    pub fn kind(&self) -> Manager {
        self.kind
    }

    /// The manager's version as it reports it (`Version` property), e.g. `252.38-1~deb12u1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The major version, e.g. 252.
    pub fn major(&self) -> u32 {
        self.version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The manager's `XDG_RUNTIME_DIR` (private, mode 0700; `%t` in unit files), the same path
    /// for the test and for the services. Removed on drop.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime
    }

    /// A private directory the test and the services both see at this path (for a binary a test
    /// replaces, an environment file, ...). Removed on drop.
    pub fn scratch_dir(&self) -> PathBuf {
        self.state_path.join("scratch")
    }

    /// Pid of the `systemd --user` process.
    pub fn manager_pid(&self) -> u32 {
        self.manager_pid
    }

    /// Pid of the private `systemd-journald`.
    pub fn journald_pid(&self) -> u32 {
        self.journald_pid
    }

    /// The subtree's path in the hierarchy the manager tracks units in, relative to its root, e.g.
    /// `/process_api/<hash>/handover-sd-<pid>-<n>-<tag>`; the manager itself lives in
    /// `<this>/user@0.service`.
    pub fn cgroup_path(&self) -> &str {
        &self.cgroup
    }

    /// `_SYSTEMD_CGROUP` of a user service: `<cgroup_path>/user@0.service/app.slice/<unit>`.
    pub fn unit_cgroup(&self, unit: &str) -> String {
        format!("{}/{MANAGER_LEAF}/app.slice/{unit}", self.cgroup)
    }

    /// Whether journald sets `_SYSTEMD_USER_UNIT=` on the services' entries (so that
    /// `journalctl --user -u <unit>` finds them): 257, with only slices above the manager's
    /// cgroup (true where the test's own cgroup2 path is `/`, as here).
    pub fn tags_user_units(&self) -> bool {
        self.kind == Manager::V257
            && self
                .cgroup
                .split('/')
                .filter(|c| !c.is_empty())
                .all(|c| c.ends_with(".slice"))
    }

    /// The subtree's directory in every hierarchy the manager may use (existing or not): after
    /// drop none of them exists.
    pub fn subtree_dirs(&self) -> Vec<PathBuf> {
        self.subtree.clone()
    }

    /// Whether `pid`'s cgroup is inside this manager's subtree in every hierarchy where the harness
    /// made one (a process the manager started cannot have left it).
    pub fn owns_process(&self, pid: u32) -> bool {
        let Ok(lines) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        !self.created.is_empty()
            && self.created.iter().all(|(h, rel)| {
                cgroup::proc_cgroup_path(&lines, h)
                    .is_some_and(|p| p == *rel || p.starts_with(&format!("{rel}/")))
            })
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

    /// A command running `program` (`systemctl`, `journalctl`, `systemd-analyze`, ...) of this
    /// manager's systemd with the manager's `XDG_RUNTIME_DIR`: for [`Manager::Host`] the host's
    /// tool (`systemctl` from outside, any other inside the manager's mount namespace), for
    /// [`Manager::V257`] the root's own tool, inside the manager's namespace and root. Only
    /// `PATH`, `HOME`, `LANG`, `XDG_RUNTIME_DIR` and `SYSTEMD_*` switches (no colours, no pager)
    /// are set; stdin is /dev/null.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd;
        if self.kind == Manager::V257 {
            cmd = Command::new(&self.tools.nsenter);
            cmd.arg("-t")
                .arg(self.manager_pid.to_string())
                .args(["-m", "-r", "-w", "/usr/bin/env", "-i"])
                .args(root_tool_env(&self.runtime))
                .arg(program)
                .env_clear()
                .env("PATH", path_env());
        } else {
            if program == "systemctl" {
                cmd = Command::new(&self.tools.systemctl);
            } else {
                cmd = Command::new(&self.tools.nsenter);
                cmd.arg("-m")
                    .arg("-t")
                    .arg(self.manager_pid.to_string())
                    .arg(program);
            }
            cmd.env_clear()
                .env("PATH", path_env())
                .env("HOME", home_env())
                .env("LANG", "C.UTF-8")
                .env("XDG_RUNTIME_DIR", &self.runtime)
                .env("SYSTEMD_COLORS", "0")
                .env("SYSTEMD_PAGER", "cat");
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `systemctl --user --no-pager <args>` of this manager's systemd (see
    /// [`UserManager::command`]). Does not check the exit status.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.command("systemctl")
            .args(["--user", "--no-pager", "--no-ask-password"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawn systemctl: {e}"))
    }

    /// Like [`UserManager::systemctl`], but panics (with stdout and stderr) unless it exits 0;
    /// returns stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        if !out.status.success() {
            panic!(
                "systemctl --user {} failed ({}) on systemd {}:\n{}{}",
                args.join(" "),
                out.status,
                self.version,
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
                    "timed out after {timeout:?} waiting for {what} (systemd {})\n{}",
                    self.version,
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
    /// `["USER_UNIT=x.service", "+", "_PID=42"]`, or options such as `["-n", "20"]` and
    /// `["--user", "-u", "x.service"]`), parsed from `journalctl -o export`.
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
        self.command("journalctl")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawn journalctl: {e}"))
    }

    /// Failed/pending units and the journal's tail, for panic messages. Never panics.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        if !alive(self.manager_pid) {
            s.push_str(&format!("the manager (pid {}) is dead\n", self.manager_pid));
            return s;
        }
        if let Ok(units) = self
            .command("systemctl")
            .args(["--user", "--no-pager", "list-units", "--all", "--plain"])
            .arg("--no-legend")
            .output()
        {
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
        }
        if let Ok(out) = self
            .command("journalctl")
            .args(["--no-pager", "-n", "40", "-o", "short-monotonic"])
            .output()
        {
            s.push_str("journal tail:\n");
            s.push_str(&String::from_utf8_lossy(&out.stdout));
            s.push_str(&String::from_utf8_lossy(&out.stderr));
        }
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
        let Ok(mut child) = self
            .command("systemctl")
            .args(["--user", "--no-pager", "--no-ask-password", "stop"])
            .args(&units)
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
                    cgroup::kill_subtree(&self.subtree, &[manager], Duration::from_secs(2));
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
        cgroup::kill_subtree(&self.subtree, &[], KILL_TIMEOUT);
        let left = cgroup::subtree_pids(&self.subtree);
        if !left.is_empty() {
            problems.push(format!(
                "processes still in {} after {KILL_TIMEOUT:?}: {left:?}",
                self.cgroup
            ));
        }
        problems.extend(cgroup::remove_subtree(&self.subtree));
        match cgroup::Lock::take() {
            Ok(_lock) => {
                for (h, parent) in &self.parents {
                    cgroup::remove_parents(h, parent);
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
/// depth-first in every hierarchy and the now empty parent directories that are not the test's
/// own cgroup or its ancestors, and remove the temp directory (the 257 manager's mounts go with
/// its mount namespace, which ends with its last process). Panics on leftovers unless the thread
/// is already panicking.
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
