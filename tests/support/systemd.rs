//! A private systemd user manager, with its own journald, for integration tests: either the
//! host's own systemd or systemd 257 from a cached Debian trixie root.
//!
//! Include it from a test crate with
//! `#[path = "support/systemd.rs"] mod systemd;` and boot one manager per test:
//!
//! ```ignore
//! fn hello_runs(manager: Manager) {
//!     let Some(m) = UserManager::boot_or_skip(manager, "hello") else { return };
//!     m.install_unit("hello.service", "[Service]\nType=notify\nExecStart=/path/to/bin\n");
//!     m.daemon_reload();
//!     assert!(m.systemctl(&["start", "hello.service"]).status.success());
//!     let pid = m.main_pid("hello.service");
//!     m.wait_for_journal(&[&format!("_PID={pid}")], Duration::from_secs(5), |e| {
//!         e.get("MESSAGE").is_some_and(|m| m.contains("ready"))
//!     });
//!     // dropping `m` kills everything it started and removes its cgroups and files
//! }
//! systemd::on_each_manager!(hello_runs); // tests hello_runs::host and hello_runs::v257
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
//!   as gone ([`pid_alive`]).
//!
//! Teardown (also on panic) is the same for both: stop the units (bounded), SIGKILL by pid every
//! other process of the subtree while the manager still runs (so it reaps them), SIGKILL the
//! manager, `cgroup.kill` and kill by pid what is left, `rmdir` the subtree depth-first.
//!
//! All methods are blocking (they run processes); in async tests call them from a blocking
//! context (`spawn_blocking`) if the same runtime must keep serving meanwhile.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
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
/// The leaves of a subtree: journald, and the manager (named so that journald 257 derives
/// `_SYSTEMD_USER_UNIT=` from the services' cgroups).
const JOURNALD_LEAF: &str = "journald.service";
const MANAGER_LEAF: &str = "user@0.service";
/// `PATH` inside the trixie root.
const ROOT_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// For each function `body(manager: Manager)` named, declares a module of the same name with
/// two tests, `host` and `v257`, running it on each [`Manager`]: `cargo test -- ::v257` runs
/// only the 257 half. Use it at the crate root of a test file that has `mod systemd;`.
#[allow(unused_macros)]
macro_rules! on_each_manager {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            #[test]
            fn host() {
                super::$body(crate::systemd::Manager::Host)
            }
            #[test]
            fn v257() {
                super::$body(crate::systemd::Manager::V257)
            }
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use on_each_manager;

/// Writes `line` to the process's real stderr, which the test runner does not capture: it shows
/// in `cargo test` output for passing tests too.
pub fn announce(line: &str) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// Whether `CI` is set (and not `0`/`false`): then a manager that cannot run is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// One parsed journal entry: field name to value (binary fields decoded lossily; when a field
/// occurs several times in one entry, the last value wins).
pub type JournalEntry = HashMap<String, String>;

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

enum BootError {
    /// The machine cannot host this manager: tests may skip (not under CI).
    Unsupported(String),
    /// It should have worked and did not: always a failure.
    Failed(String),
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
                proc_cgroup_path(&lines, h)
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
        match self.kind {
            Manager::Host if program == "systemctl" => {
                cmd = Command::new(&self.tools.systemctl);
                cmd.env_clear()
                    .env("PATH", path_env())
                    .env("HOME", home_env())
                    .env("LANG", "C.UTF-8")
                    .env("XDG_RUNTIME_DIR", &self.runtime)
                    .env("SYSTEMD_COLORS", "0")
                    .env("SYSTEMD_PAGER", "cat");
            }
            Manager::Host => {
                cmd = Command::new(&self.tools.nsenter);
                cmd.arg("-m")
                    .arg("-t")
                    .arg(self.manager_pid.to_string())
                    .arg(program)
                    .env_clear()
                    .env("PATH", path_env())
                    .env("HOME", home_env())
                    .env("LANG", "C.UTF-8")
                    .env("XDG_RUNTIME_DIR", &self.runtime)
                    .env("SYSTEMD_COLORS", "0")
                    .env("SYSTEMD_PAGER", "cat");
            }
            Manager::V257 => {
                cmd = Command::new(&self.tools.nsenter);
                cmd.arg("-t")
                    .arg(self.manager_pid.to_string())
                    .args(["-m", "-r", "-w", "/usr/bin/env", "-i"])
                    .args(root_tool_env(&self.runtime))
                    .arg(program)
                    .env_clear()
                    .env("PATH", path_env());
            }
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
        if !pid_alive(self.manager_pid) {
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
                let killed = kill_subtree(&self.subtree, &[manager], Duration::from_secs(2));
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
        kill_subtree(&self.subtree, &[], KILL_TIMEOUT);
        let left = subtree_pids(&self.subtree);
        if !left.is_empty() {
            problems.push(format!(
                "processes still in {} after {KILL_TIMEOUT:?}: {left:?}",
                self.cgroup
            ));
        }
        problems.extend(remove_subtree(&self.subtree));
        match CgroupLock::take() {
            Ok(_lock) => {
                for (h, parent) in &self.parents {
                    remove_parents(h, parent);
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

/// Runs in the private mount namespace, as the process that becomes the host's manager.
/// Parameters come from the environment (paths checked for whitespace beforehand).
const HOST_BOOT_SCRIPT: &str = r#"set -eu
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal /run/systemd/journald.conf.d
printf '%s\n' '[Journal]' 'Storage=volatile' 'RateLimitIntervalSec=0' 'ReadKMsg=no' \
  > /run/systemd/journald.conf.d/handover-tests.conf
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

/// Runs in the private mount namespace, as the process that becomes the 257 manager: mounts the
/// trixie root's file systems, starts its journald chrooted, then execs its manager with the
/// environment given as arguments (`env -i "$@"`).
const ROOT_BOOT_SCRIPT: &str = r#"set -eu
R=$HSD_ROOT
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --rbind /dev "$R/dev"
mount --bind /sys "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mkdir -p "$R/run/systemd/system" "$R/run/systemd/journal" "$R/run/systemd/journald.conf.d" \
  "$R/run/lock" "$R/run/user"
printf '%s\n' '[Journal]' 'Storage=volatile' 'RateLimitIntervalSec=0' 'ReadKMsg=no' 'Audit=' \
  > "$R/run/systemd/journald.conf.d/handover-tests.conf"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
if [ -d "$R/var/log/journal" ]; then
  mount -t tmpfs -o mode=2755,nosuid,nodev tmpfs "$R/var/log/journal"
fi
mkdir -p "$R$HSD_STATE"
mount --bind "$HSD_STATE" "$R$HSD_STATE"
for b in $HSD_RO_BINDS; do
  mkdir -p "$R$b"
  mount --bind "$b" "$R$b"
  mount -o remount,bind,ro "$R$b"
done
for d in $HSD_JOURNAL_CG; do echo $$ > "$d/cgroup.procs"; done
chroot "$R" /usr/bin/env -i PATH="$HSD_PATH" LANG=C.UTF-8 SYSTEMD_LOG_TARGET=console \
  /usr/lib/systemd/systemd-journald </dev/null >>"$HSD_STATE/journald.log" 2>&1 &
jpid=$!
echo "$jpid" > "$HSD_STATE/journald.pid"
for d in $HSD_MANAGER_CG; do echo $$ > "$d/cgroup.procs"; done
n=0
while [ ! -S "$R/run/systemd/journal/socket" ]; do
  if ! kill -0 "$jpid" 2>/dev/null; then echo "handover harness: journald exited" >&2; exit 1; fi
  n=$((n+1))
  if [ "$n" -gt 2000 ]; then
    echo "handover harness: no /run/systemd/journal/socket after 20 s" >&2; exit 1
  fi
  sleep 0.01
done
exec chroot "$R" /usr/bin/env -i "$@" /usr/lib/systemd/systemd --user
"#;

struct Tools {
    unshare: PathBuf,
    nsenter: PathBuf,
    sh: PathBuf,
    /// The host's (used for [`Manager::Host`] only).
    systemctl: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn boot_inner(kind: Manager, tag: &str) -> Result<UserManager, BootError> {
    let tools = preflight(kind).map_err(BootError::Unsupported)?;
    let root = match kind {
        Manager::Host => None,
        Manager::V257 => Some(trixie_root().map_err(BootError::Unsupported)?),
    };
    let layout = cgroup_layout().map_err(BootError::Unsupported)?;
    let fail = |what: &str, e: &dyn fmt::Display| BootError::Failed(format!("{what}: {e}"));

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
    let mut name = format!(
        "{NAME_PREFIX}{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        if tag.is_empty() { "t" } else { &tag }
    );
    if kind == Manager::V257 {
        name.push_str(".slice");
    }
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
        .and_then(|_| fs::create_dir(state_path.join("scratch")))
        .map_err(|e| fail("create runtime dir", &e))?;

    // Where the subtree goes, per hierarchy.
    let (cgroup, created, subtree, parents) = match kind {
        Manager::Host => {
            // One path in every hierarchy (252 on a hybrid host creates its units' cgroups at
            // the same path in each), nested in the test's memory cgroup.
            let cgroup = format!("{}/{name}", layout.base.trim_end_matches('/'));
            let created: Vec<(Hierarchy, String)> = layout
                .targets
                .iter()
                .map(|h| (h.clone(), cgroup.clone()))
                .collect();
            let subtree: Vec<PathBuf> = layout.all.iter().map(|h| h.dir(&cgroup)).collect();
            let parents: Vec<(Hierarchy, String)> = layout
                .all
                .iter()
                .map(|h| (h.clone(), layout.base.clone()))
                .collect();
            (cgroup, created, subtree, parents)
        }
        Manager::V257 => {
            // The cgroup2 hierarchy at the test's own path there, plus the same in name=systemd
            // (hybrid host) so the host's view stays consistent; never the v1 controllers.
            let v2 = layout
                .all
                .iter()
                .find(|h| h.v2)
                .ok_or_else(|| BootError::Unsupported("no cgroup2 hierarchy mounted".into()))?;
            let own = |h: &Hierarchy| -> String {
                let o = h.own.clone().unwrap_or_else(|| "/".into());
                format!("{}/{name}", o.trim_end_matches('/'))
            };
            let cgroup = own(v2);
            let mut created = vec![(v2.clone(), cgroup.clone())];
            if let Some(nsd) = layout
                .all
                .iter()
                .find(|h| !h.v2 && h.has("name=systemd") && h.own.is_some())
            {
                created.push((nsd.clone(), own(nsd)));
            }
            let dirs: Vec<PathBuf> = created.iter().map(|(h, rel)| h.dir(rel)).collect();
            for d in &dirs {
                if d.to_string_lossy().contains(char::is_whitespace) {
                    return Err(BootError::Unsupported(format!(
                        "cgroup path with whitespace: {}",
                        d.display()
                    )));
                }
            }
            (cgroup, created, dirs, Vec::new())
        }
    };

    // From here on, Drop cleans up whatever exists.
    let mut m = UserManager {
        kind,
        name,
        cgroup,
        subtree,
        created,
        parents,
        tools,
        root,
        state: Some(state),
        state_path,
        runtime,
        manager: None,
        manager_pid: 0,
        journald_pid: 0,
        version: String::new(),
        units: Mutex::new(Vec::new()),
    };

    {
        let _lock = CgroupLock::take().map_err(|e| fail("lock /sys/fs/cgroup", &e))?;
        reap_stale(&layout.all);
        for (h, rel) in &m.created {
            for leaf in [JOURNALD_LEAF, MANAGER_LEAF] {
                let dir = h.dir(rel).join(leaf);
                fs::create_dir_all(&dir)
                    .map_err(|e| fail(&format!("mkdir {}", dir.display()), &e))?;
            }
        }
    }

    let list = |leaf: &str| -> String {
        let dirs: Vec<String> = m
            .created
            .iter()
            .map(|(h, rel)| h.dir(rel).join(leaf).display().to_string())
            .collect();
        dirs.join(" ")
    };
    let (journal_cg, manager_cg) = (list(JOURNALD_LEAF), list(MANAGER_LEAF));
    for p in [&journal_cg, &manager_cg] {
        if p.contains(['\n', '\t']) || p.split(' ').any(|d| d.is_empty()) {
            return Err(BootError::Failed(format!(
                "cgroup paths with whitespace: {p:?}"
            )));
        }
    }
    let build_dir = build_dir();
    for p in [&m.state_path, &build_dir] {
        if p.to_string_lossy().contains(char::is_whitespace) {
            return Err(BootError::Unsupported(format!(
                "a path with whitespace: {}",
                p.display()
            )));
        }
    }

    let log = fs::File::create(m.state_path.join("manager.log"))
        .map_err(|e| fail("create manager.log", &e))?;
    let log2 = log.try_clone().map_err(|e| fail("dup log", &e))?;
    let mut cmd = Command::new(&tools.unshare);
    cmd.args(["--mount", "--propagation", "private"])
        .arg(&tools.sh)
        .arg("-c");
    match (kind, root) {
        (Manager::V257, Some(root)) => {
            cmd.arg(ROOT_BOOT_SCRIPT)
                .arg("handover-sd-boot")
                .args(root_manager_env(&m.runtime))
                .env_clear()
                .env("PATH", path_env())
                .env("HSD_ROOT", &root.path)
                .env("HSD_PATH", ROOT_PATH_ENV)
                .env("HSD_RO_BINDS", &build_dir);
        }
        _ => {
            cmd.arg(HOST_BOOT_SCRIPT)
                .arg("handover-sd-boot")
                .env_clear()
                .envs(host_manager_env(&m.runtime));
        }
    }
    cmd.env("HSD_JOURNAL_CG", &journal_cg)
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
    m.version = m.show("", "Version");
    announce_version(&m, start.elapsed());
    Ok(m)
}

/// Prints, once per kind of manager and test process, which systemd runs the tests.
fn announce_version(m: &UserManager, boot: Duration) {
    static SEEN: Mutex<Vec<Manager>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(&m.kind) {
        return;
    }
    seen.push(m.kind);
    let exe = std::env::current_exe().ok();
    let binary = exe
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let binary = binary.rsplit_once('-').map_or(binary.as_str(), |(b, _)| b);
    let hierarchy = if m.kind == Manager::V257 {
        "pure cgroup v2 (its own cgroup2 mount)".to_string()
    } else if Path::new(CGROUP_FS).join("cgroup.controllers").exists() {
        "the host's pure cgroup v2".to_string()
    } else {
        "the host's hybrid cgroups (v1 controllers + cgroup2)".to_string()
    };
    let source = match m.root {
        Some(r) => match r.built {
            Some(t) => format!(", root {} (built now in {:.0?})", r.path.display(), t),
            None => format!(", root {} (cached)", r.path.display()),
        },
        None => String::new(),
    };
    announce(&format!(
        "systemd harness [{binary}]: {} manager is systemd {} ({}) on {hierarchy}{source}; booted in {boot:.2?}",
        m.kind.label(),
        m.major(),
        m.version,
    ));
}

fn preflight(kind: Manager) -> Result<&'static Tools, String> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    let tools = TOOLS
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Err("not running as root".into());
            }
            let tools = Tools {
                unshare: which("unshare")?,
                nsenter: which("nsenter")?,
                sh: which("sh")?,
                systemctl: which("systemctl").unwrap_or_default(),
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
        .map_err(Clone::clone)?;
    if kind == Manager::Host {
        for bin in [SYSTEMD, JOURNALD] {
            if !is_executable(Path::new(bin)) {
                return Err(format!("{bin} not found"));
            }
        }
        if tools.systemctl.as_os_str().is_empty() {
            return Err("`systemctl` not found in PATH".into());
        }
    }
    Ok(tools)
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn which(name: &str) -> Result<PathBuf, String> {
    std::env::split_paths(&path_env())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| format!("`{name}` not found in PATH"))
}

fn path_env() -> OsString {
    std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())
}

fn home_env() -> OsString {
    std::env::var_os("HOME").unwrap_or_else(|| "/root".into())
}

/// The variables of the test's environment a manager passes on (its units inherit them).
const PASSED_ON: &[&str] = &["SYSTEMD_LOG_LEVEL", "RUST_LOG", "RUST_BACKTRACE"];

/// The host manager's whole environment (its units inherit it): nothing of the test's but a few
/// basics, so no stray `NOTIFY_SOCKET`, `LISTEN_*` or `DBUS_SESSION_BUS_ADDRESS` leaks in.
fn host_manager_env(runtime: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), path_env()),
        ("HOME".into(), home_env()),
        ("USER".into(), "root".into()),
        ("LOGNAME".into(), "root".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("XDG_RUNTIME_DIR".into(), runtime.into()),
        ("SYSTEMD_LOG_TARGET".into(), "journal".into()),
    ];
    for k in PASSED_ON {
        if let Some(v) = std::env::var_os(k) {
            env.push((k.into(), v));
        }
    }
    env
}

/// The 257 manager's whole environment, as `KEY=VALUE` arguments of `env -i`.
fn root_manager_env(runtime: &Path) -> Vec<OsString> {
    let mut env: Vec<OsString> = vec![
        format!("PATH={ROOT_PATH_ENV}").into(),
        "HOME=/root".into(),
        "USER=root".into(),
        "LOGNAME=root".into(),
        "LANG=C.UTF-8".into(),
        kv("XDG_RUNTIME_DIR", runtime.as_os_str()),
        "SYSTEMD_LOG_TARGET=journal".into(),
    ];
    for k in PASSED_ON {
        if let Some(v) = std::env::var_os(k) {
            env.push(kv(k, &v));
        }
    }
    env
}

/// The environment of a tool run inside the 257 root, as `KEY=VALUE` arguments of `env -i`.
/// `SYSTEMD_IN_CHROOT=0`: systemctl's chroot check cannot read `/proc/1/root` here ("Failed to
/// check for chroot() environment"), and a host where it can must not make it answer "Running
/// in chroot, ignoring command".
fn root_tool_env(runtime: &Path) -> Vec<OsString> {
    vec![
        format!("PATH={ROOT_PATH_ENV}").into(),
        "HOME=/root".into(),
        "LANG=C.UTF-8".into(),
        kv("XDG_RUNTIME_DIR", runtime.as_os_str()),
        "SYSTEMD_IN_CHROOT=0".into(),
        "SYSTEMD_COLORS=0".into(),
        "SYSTEMD_PAGER=cat".into(),
    ]
}

fn kv(k: &str, v: &std::ffi::OsStr) -> OsString {
    let mut s = OsString::from(format!("{k}="));
    s.push(v);
    s
}

/// The directory cargo builds this test into (`target/debug`): examples and binaries live there;
/// bound read-only into the 257 root at the same path.
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary is in <target>/<profile>/deps")
        .to_owned()
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
// the trixie root for systemd 257

/// Debian release whose systemd the root brings (257).
const ROOT_SUITE: &str = "trixie";
/// Its directory in the cache.
const ROOT_DIR: &str = "systemd-257";
/// On top of `minbase`: the manager, journald and their tools; `kill` (procps); Python for the
/// harness's self-test stand-in service.
const ROOT_PACKAGES: &str = "systemd,procps,python3-minimal";
/// The last file written into a root before it is renamed into place; a root without this exact
/// content is rebuilt.
const ROOT_STAMP_FILE: &str = "etc/handover-tests-root";
const ROOT_STAMP: &str = "handover test root 1: trixie minbase + systemd,procps,python3-minimal\n";
/// Bound on building the root (download and install, 30-60 s here).
const ROOT_BUILD_TIMEOUT: Duration = Duration::from_secs(420);
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A usable trixie root.
struct Root {
    path: PathBuf,
    /// How long building it took, when this process built it.
    built: Option<Duration>,
}

/// Where the root is cached: `$HANDOVER_TEST_CACHE`, else `/var/cache/handover-tests`.
pub fn root_cache_dir() -> PathBuf {
    std::env::var_os("HANDOVER_TEST_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/handover-tests"))
}

/// The root, built on first use (once per process; a file lock serialises test processes).
fn trixie_root() -> Result<&'static Root, String> {
    static ROOT: OnceLock<Result<Root, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let cache = root_cache_dir();
        ensure_root(&cache).map_err(|e| {
            format!(
                "cannot build the systemd 257 root in {}: {e}",
                cache.display()
            )
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn root_ok(root: &Path) -> bool {
    fs::read_to_string(root.join(ROOT_STAMP_FILE)).is_ok_and(|s| s == ROOT_STAMP)
        && is_executable(&root.join("usr/lib/systemd/systemd"))
}

fn ensure_root(cache: &Path) -> Result<Root, String> {
    let path = cache.join(ROOT_DIR);
    if root_ok(&path) {
        return Ok(Root { path, built: None });
    }
    if !cache.is_absolute() {
        return Err("the cache directory must be an absolute path".into());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(cache)
        .map_err(|e| format!("mkdir: {e}"))?;
    // Only root may write there: a root another user could change would run as root.
    let meta = fs::symlink_metadata(cache).map_err(|e| format!("stat: {e}"))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err("it is not a directory owned by root and writable only by root".into());
    }
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(cache.join(".lock"))
        .map_err(|e| format!("open .lock: {e}"))?;
    // Another test process may be building it: wait for it (bounded), then look again.
    let deadline = Instant::now() + ROOT_BUILD_TIMEOUT + Duration::from_secs(60);
    loop {
        // SAFETY: flock on an fd `lock` owns and keeps open; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("lock: {e}"));
        }
        if Instant::now() >= deadline {
            return Err("another process holds the build lock for too long".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if root_ok(&path) {
        return Ok(Root { path, built: None });
    }
    let t0 = Instant::now();
    announce(&format!(
        "systemd harness: building the systemd 257 test root (Debian {ROOT_SUITE} minbase + {ROOT_PACKAGES}) at {}; once, reused by later runs",
        path.display()
    ));
    // What an interrupted build left: never a half root in `path` (it is renamed in complete).
    for e in fs::read_dir(cache)
        .map_err(|e| format!("read: {e}"))?
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{ROOT_DIR}.tmp-")) || n.starts_with(&format!("{ROOT_DIR}.old-"))
        {
            remove_tree(&e.path())?;
        }
    }
    let mmdebstrap = ensure_mmdebstrap()?;
    if !Path::new(KEYRING).is_file() {
        return Err(format!(
            "{KEYRING} is missing (apt-get install debian-archive-keyring)"
        ));
    }
    let mirror = debian_mirror();
    let tmp = cache.join(format!("{ROOT_DIR}.tmp-{}", std::process::id()));
    let log_path = cache.join(format!("{ROOT_DIR}.build.log"));
    let log = fs::File::create(&log_path).map_err(|e| format!("create build log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("dup: {e}"))?;
    // The build holds the lock as long as any of its processes lives (the lock file is their
    // stdin, an empty file): if this test process dies, the next one waits for an orphaned
    // build to end before it cleans up after it.
    let lock_for_build = lock.try_clone().map_err(|e| format!("dup .lock: {e}"))?;
    // In a mount namespace of its own: whatever mmdebstrap mounts in the new root while it
    // installs goes away with it, even if it is killed.
    let mut child = Command::new(&preflight(Manager::V257)?.unshare)
        .args(["--mount", "--propagation", "private"])
        .arg(&mmdebstrap)
        .args(["--variant=minbase", "--mode=root"])
        .arg(format!("--include={ROOT_PACKAGES}"))
        .arg("--aptopt=Acquire::Check-Valid-Until \"false\"")
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg(ROOT_SUITE)
        .arg(&tmp)
        .arg(format!(
            "deb [signed-by={KEYRING}] {mirror} {ROOT_SUITE} main"
        ))
        .env_clear()
        .env("PATH", path_env())
        .env("HOME", home_env())
        .env("LANG", "C.UTF-8")
        .stdin(lock_for_build)
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn mmdebstrap: {e}"))?;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break Some(s);
        }
        if t0.elapsed() > ROOT_BUILD_TIMEOUT {
            // The whole process group mmdebstrap leads (apt, dpkg): by its id, ours until reaped.
            // SAFETY: kill has no memory preconditions. The group id is the pid of our child,
            // which leads the group (process_group(0)) and is not reaped yet, so it is still ours.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let failed = match status {
        Some(s) if s.success() => None,
        Some(s) => Some(format!("mmdebstrap from {mirror} failed ({s})")),
        None => Some(format!(
            "mmdebstrap from {mirror} took over {ROOT_BUILD_TIMEOUT:?}; killed"
        )),
    };
    if let Some(why) = failed {
        let _ = remove_tree(&tmp);
        return Err(format!(
            "{why}; the end of {}:\n{}",
            log_path.display(),
            tail(&log_path, 800)
        ));
    }
    finish_root(&tmp).inspect_err(|_| {
        let _ = remove_tree(&tmp);
    })?;
    let old = cache.join(format!("{ROOT_DIR}.old-{}", std::process::id()));
    if fs::symlink_metadata(&path).is_ok() {
        fs::rename(&path, &old).map_err(|e| format!("move the old root aside: {e}"))?;
    }
    fs::rename(&tmp, &path).map_err(|e| format!("rename the new root into place: {e}"))?;
    if fs::symlink_metadata(&old).is_ok() {
        remove_tree(&old)?;
    }
    let took = t0.elapsed();
    announce(&format!(
        "systemd harness: built {} in {took:.0?}",
        path.display()
    ));
    Ok(Root {
        path,
        built: Some(took),
    })
}

/// What the root needs besides its packages: a machine id (journald wants one; mmdebstrap leaves
/// the file empty), the mount points, and last the stamp.
fn finish_root(root: &Path) -> Result<(), String> {
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(|e| format!("read a random uuid: {e}"))?;
    let id: String = uuid.trim().chars().filter(|c| *c != '-').collect();
    fs::write(root.join("etc/machine-id"), format!("{id}\n"))
        .map_err(|e| format!("write etc/machine-id: {e}"))?;
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "var/log/journal",
    ] {
        fs::create_dir_all(root.join(d)).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    if !is_executable(&root.join("usr/lib/systemd/systemd")) {
        return Err("the new root has no usr/lib/systemd/systemd".into());
    }
    fs::write(root.join(ROOT_STAMP_FILE), ROOT_STAMP).map_err(|e| format!("write stamp: {e}"))
}

/// `mmdebstrap`, installed with apt-get when missing.
fn ensure_mmdebstrap() -> Result<PathBuf, String> {
    if let Ok(p) = which("mmdebstrap") {
        return Ok(p);
    }
    let apt =
        which("apt-get").map_err(|_| "mmdebstrap is not installed, and there is no apt-get")?;
    announce("systemd harness: installing mmdebstrap (apt-get) to build the systemd 257 test root");
    let out = Command::new(apt)
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "mmdebstrap",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn apt-get: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "apt-get install mmdebstrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    which("mmdebstrap")
}

/// The Debian mirror to build from: `$HANDOVER_TEST_DEBIAN_MIRROR`, else the first non-security
/// mirror of the host's apt sources on a Debian host, else `http://deb.debian.org/debian`.
fn debian_mirror() -> String {
    if let Some(m) = std::env::var("HANDOVER_TEST_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.trim().is_empty())
    {
        return m.trim().to_owned();
    }
    let debian = fs::read_to_string("/etc/os-release")
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "ID=debian"));
    if debian {
        let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sources"))
            .collect();
        files.sort();
        let usable = |u: &&str| {
            (u.starts_with("http://") || u.starts_with("https://")) && !u.contains("security")
        };
        for f in files {
            let text = fs::read_to_string(f).unwrap_or_default();
            for l in text.lines() {
                if let Some(uris) = l.trim().strip_prefix("URIs:") {
                    if let Some(u) = uris.split_whitespace().find(usable) {
                        return u.to_owned();
                    }
                }
            }
        }
        let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
        for l in list.lines() {
            let mut words = l.split_whitespace();
            if words.next() == Some("deb") {
                if let Some(u) = words.find(usable) {
                    return u.to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Removes a directory tree without crossing into other file systems (a mount left inside is an
/// error, never a target) and without following symlinks.
fn remove_tree(top: &Path) -> Result<(), String> {
    fn walk(p: &Path, dev: u64) -> Result<(), String> {
        let meta = fs::symlink_metadata(p).map_err(|e| format!("stat {}: {e}", p.display()))?;
        if meta.dev() != dev {
            return Err(format!(
                "{} is another file system (a mount left by an interrupted build?): remove it by hand",
                p.display()
            ));
        }
        if meta.is_dir() {
            for e in fs::read_dir(p).map_err(|e| format!("read {}: {e}", p.display()))? {
                let e = e.map_err(|e| format!("read {}: {e}", p.display()))?;
                walk(&e.path(), dev)?;
            }
            fs::remove_dir(p).map_err(|e| format!("rmdir {}: {e}", p.display()))
        } else {
            fs::remove_file(p).map_err(|e| format!("rm {}: {e}", p.display()))
        }
    }
    let meta = match fs::symlink_metadata(top) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("stat {}: {e}", top.display())),
    };
    walk(top, meta.dev())
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
    /// The mount's root within the hierarchy (`/` unless it is a bind of a subtree).
    root: String,
}

impl Hierarchy {
    fn dir(&self, rel: &str) -> PathBuf {
        self.mount.join(rel.trim_start_matches('/'))
    }
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

/// The path of `h` in a `/proc/<pid>/cgroup` text, relative to `h`'s mount.
fn proc_cgroup_path(lines: &str, h: &Hierarchy) -> Option<String> {
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

struct Layout {
    /// The host manager's base: the test's own cgroup in the memory hierarchy (or cgroup2).
    base: String,
    /// Where the host manager's subtree is created.
    targets: Vec<Hierarchy>,
    /// Every mounted hierarchy.
    all: Vec<Hierarchy>,
}

/// Reads the mounted hierarchies from `/proc/self/mountinfo` and this process's place in each
/// from `/proc/self/cgroup`; chooses where to create the host manager's subtree.
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

/// `flock` on `/sys/fs/cgroup`: serialises creating and removing the shared parent directories
/// between the managers of all test threads and test binaries.
struct CgroupLock(fs::File);

impl CgroupLock {
    fn take() -> io::Result<CgroupLock> {
        let f = fs::File::open(CGROUP_FS)?;
        loop {
            // SAFETY: flock on an fd `f` owns and keeps open; no memory is involved.
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

/// Every pid listed in a `cgroup.procs` of the subtrees `roots`.
fn subtree_pids(roots: &[PathBuf]) -> Vec<i32> {
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
fn kill_subtree(roots: &[PathBuf], except: &[i32], timeout: Duration) -> Vec<i32> {
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
            // SAFETY: kill has no memory preconditions; `pid` was just listed in our own
            // subtree's cgroup.procs (a process of ours, or one the manager started).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `rmdir`s the subtrees `roots` depth-first (retrying while the kernel still reports them busy).
fn remove_subtree(roots: &[PathBuf]) -> Vec<String> {
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
    fn walk(h: &Hierarchy, rel: &str, depth: u32, found: &mut Vec<(Hierarchy, String)>) {
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
                    found.push((h.clone(), child));
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
    for (h, rel) in found {
        eprintln!(
            "systemd harness: cleaning up stale cgroup {rel} in {}",
            h.mount.display()
        );
        let dir = [h.dir(&rel)];
        kill_subtree(&dir, &[], Duration::from_secs(5));
        for p in remove_subtree(&dir) {
            eprintln!("systemd harness: {p}");
        }
        remove_parents(&h, &rel[..rel.rfind('/').unwrap_or(0)]);
    }
    if let Ok(rd) = fs::read_dir(tmp_base()) {
        for e in rd.flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
