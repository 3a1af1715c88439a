//! Booting a manager: the scripts that run in its private mount namespace, the environment it
//! and its tools get, and the cleanup after test processes that died without tearing down.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::root::{trixie_root, ROOT_PATH_ENV};
use super::{Manager, UserManager, BOOT_TIMEOUT, MANAGER_LEAF, POLL};
use crate::announce;
use crate::cgroup::{self, Hierarchy, CGROUP_FS};
use crate::process::run;

const SYSTEMD: &str = "/usr/lib/systemd/systemd";
const JOURNALD: &str = "/usr/lib/systemd/systemd-journald";
/// Prefix of every cgroup and temp directory the harness creates: `handover-sd-<pid>-<n>-<tag>`.
const NAME_PREFIX: &str = "handover-sd-";
/// journald's leaf in a manager's subtree.
const JOURNALD_LEAF: &str = "journald.service";

/// Why a boot did not happen.
pub(super) enum BootError {
    /// The machine cannot host this manager: tests may skip (not under CI).
    Unsupported(String),
    /// It should have worked and did not: always a failure.
    Failed(String),
}

/// The end of both boot scripts, once journald runs as `$jpid`: its pid for the harness, the
/// shell into the manager's cgroups, then a wait (at most 20 s) for journald's socket under
/// `$R` (the root the manager will run in, empty for the host's).
macro_rules! await_journald {
    () => {
        r#"jpid=$!
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
"#
    };
}

/// Runs in the private mount namespace, as the process that becomes the host's manager.
/// Parameters come from the environment (paths checked for whitespace beforehand).
const HOST_BOOT_SCRIPT: &str = concat!(
    r#"set -eu
R=
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/journal /run/systemd/journald.conf.d
printf '%s\n' '[Journal]' 'Storage=volatile' 'RateLimitIntervalSec=0' 'ReadKMsg=no' \
  > /run/systemd/journald.conf.d/handover-tests.conf
mkdir -p /run/log
mount -t tmpfs -o mode=0755 tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
for d in $HSD_JOURNAL_CG; do echo $$ > "$d/cgroup.procs"; done
/usr/lib/systemd/systemd-journald </dev/null >>"$HSD_STATE/journald.log" 2>&1 &
"#,
    await_journald!(),
    r#"unset HSD_JOURNAL_CG HSD_MANAGER_CG HSD_STATE
exec /usr/lib/systemd/systemd --user
"#
);

/// Runs in the private mount namespace, as the process that becomes the 257 manager: mounts the
/// trixie root's file systems, starts its journald chrooted, then execs its manager with the
/// environment given as arguments (`env -i "$@"`).
const ROOT_BOOT_SCRIPT: &str = concat!(
    r#"set -eu
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
"#,
    await_journald!(),
    r#"exec chroot "$R" /usr/bin/env -i "$@" /usr/lib/systemd/systemd --user
"#
);

pub(super) struct Tools {
    pub(super) unshare: PathBuf,
    pub(super) nsenter: PathBuf,
    pub(super) sh: PathBuf,
    /// The host's (used for [`Manager::Host`] only).
    pub(super) systemctl: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(super) fn boot_inner(kind: Manager, tag: &str) -> Result<UserManager, BootError> {
    let tools = preflight(kind).map_err(BootError::Unsupported)?;
    let root = match kind {
        Manager::Host => None,
        Manager::V257 => Some(trixie_root().map_err(BootError::Unsupported)?),
    };
    let layout = cgroup::layout().map_err(BootError::Unsupported)?;
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
        let _lock = cgroup::Lock::take().map_err(|e| fail("lock /sys/fs/cgroup", &e))?;
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

pub(super) fn preflight(kind: Manager) -> Result<&'static Tools, String> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    let tools = TOOLS
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return Err("not running as root".into());
            }
            let tools = Tools {
                unshare: which("unshare")?,
                nsenter: which("nsenter")?,
                sh: which("sh")?,
                systemctl: which("systemctl").unwrap_or_default(),
            };
            let mut probe = Command::new(&tools.unshare);
            probe.args(["--mount", "--propagation", "private", "true"]);
            run(&mut probe).map_err(|e| format!("cannot create a mount namespace: {e}"))?;
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

pub(super) fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(super) fn which(name: &str) -> Result<PathBuf, String> {
    std::env::split_paths(&path_env())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| format!("`{name}` not found in PATH"))
}

pub(super) fn path_env() -> OsString {
    std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())
}

pub(super) fn home_env() -> OsString {
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
pub(super) fn root_tool_env(runtime: &Path) -> Vec<OsString> {
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

pub(super) fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("({} missing)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Cleans up after test processes that died without running Drop (SIGKILL, timeout): subtrees
/// and temp dirs named `handover-sd-<pid>-...` whose pid no longer exists. Caller holds the lock.
pub(super) fn reap_stale(all: &[Hierarchy]) {
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
        cgroup::kill_subtree(&dir, &[], Duration::from_secs(5));
        for p in cgroup::remove_subtree(&dir) {
            eprintln!("systemd harness: {p}");
        }
        cgroup::remove_parents(&h, &rel[..rel.rfind('/').unwrap_or(0)]);
    }
    if let Ok(rd) = fs::read_dir(tmp_base()) {
        for e in rd.flatten() {
            if stale(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}
