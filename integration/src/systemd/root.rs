//! The Debian trixie root that brings systemd 257: built once with `mmdebstrap` into a
//! cache directory, renamed into place only when complete.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::boot::{home_env, is_executable, path_env, preflight, tail, which};
use super::Manager;
use crate::announce;
use crate::process::run;

/// `PATH` inside the trixie root.
pub(super) const ROOT_PATH_ENV: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
pub(super) struct Root {
    pub(super) path: PathBuf,
    /// How long building it took, when this process built it.
    pub(super) built: Option<Duration>,
}

/// Where the root is cached: `$HANDOVER_TEST_CACHE`, else `/var/cache/handover-tests`.
pub fn root_cache_dir() -> PathBuf {
    std::env::var_os("HANDOVER_TEST_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/handover-tests"))
}

/// The root, built on first use (once per process; a file lock serialises test processes).
pub(super) fn trixie_root() -> Result<&'static Root, String> {
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
    let mut file = lock;
    let lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(format!("lock: {e}")),
        }
        if Instant::now() >= deadline {
            return Err("another process holds the build lock for too long".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
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
            // The whole process group mmdebstrap leads (apt, dpkg): by its id, which is the pid
            // of our child (process_group(0)), not reaped yet, so still ours.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
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
    let mut install = Command::new(apt);
    install
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "mmdebstrap",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut install)?;
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
