//! The PID file: written atomically once the process is the one serving,
//! removed on a real stop only if it still holds our own PID.
//!
//! Safe in a directory other users can write to (`/tmp`, sticky, mode
//! 1777): the temporary file has an unpredictable name and is created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, so a symlink or file another user planted
//! is never followed, truncated or written; `rename` then replaces the
//! directory entry of the PID file itself (a symlink planted there is
//! replaced, not followed). Reads never follow a symlink either.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn err(path: &Path, source: io::Error) -> Error {
    Error::PidFile {
        path: path.to_owned(),
        cause: source,
    }
}

/// How many unpredictable names to try before giving up (each one can only
/// be taken by someone who guessed 64 random bits).
const TEMP_ATTEMPTS: usize = 8;

/// 64 bits nobody else can predict: SipHash keyed with the per-process
/// random keys of `RandomState` (seeded by the OS), over the time and a
/// counter.
fn unpredictable() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Creates a new, empty temporary file next to `path`:
/// `.<name>.<16 random hex digits>.tmp`, `O_CREAT|O_EXCL|O_NOFOLLOW`, mode
/// 0644 (less the umask).
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut last = None;
    for _ in 0..TEMP_ATTEMPTS {
        let mut tmp = std::ffi::OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".{:016x}.tmp", unpredictable()));
        let tmp = path.with_file_name(tmp);
        // create_new is O_CREAT|O_EXCL, which never follows a symlink;
        // std adds O_CLOEXEC.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Writes `pid` to a new temporary file next to `path`; returns its path.
fn write_temp(path: &Path, pid: u32) -> io::Result<PathBuf> {
    let (tmp, mut f) = create_temp(path)?;
    if let Err(e) = writeln!(f, "{pid}") {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Refuses a PID file path that names a directory (`rename` would fail on
/// it later, after the service started).
fn not_a_directory(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        _ => Ok(()),
    }
}

/// Checks, at start-up, that the PID file can be written: its directory
/// exists, accepts a new file and has room for its contents (an empty file
/// needs no space, so this writes one line), and the path is not a
/// directory. Fails early instead of after the service has started serving.
pub(crate) fn check(path: &Path) -> Result<()> {
    not_a_directory(path).map_err(|e| err(path, e))?;
    let tmp = write_temp(path, std::process::id()).map_err(|e| err(path, e))?;
    std::fs::remove_file(&tmp).map_err(|e| err(path, e))
}

/// Writes `pid` to `path` atomically: a temporary file in the same
/// directory, then `rename`, so a reader never sees a partial PID. No
/// `fsync`: a PID file describes a running system and means nothing after
/// a crash of the machine, and an fsync on a busy disk would delay every
/// handoff.
pub(crate) fn write(path: &Path, pid: u32) -> Result<()> {
    let tmp = write_temp(path, pid).map_err(|e| err(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(path, e)
    })
}

/// Reads the PID in `path`, if it holds one (never through a symlink).
pub(crate) fn read(path: &Path) -> Option<u32> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let mut text = String::new();
    f.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Removes `path` if it holds `pid`; a PID file that a newer process wrote
/// is left alone. Returns whether it removed the file.
pub(crate) fn remove_if_ours(path: &Path, pid: u32) -> Result<bool> {
    if read(path) != Some(pid) {
        return Ok(false);
    }
    remove(path)
}

/// Removes `path` if it holds a PID other than `pid` (a stale one, once
/// this process serves). Returns whether it removed the file.
pub(crate) fn remove_if_other(path: &Path, pid: u32) -> Result<bool> {
    match read(path) {
        Some(p) if p != pid => remove(path),
        _ => Ok(false),
    }
}

fn remove(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.pid");
        check(&path).unwrap();
        write(&path, 100).unwrap();
        assert_eq!(read(&path), Some(100));
        write(&path, 200).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "200\n");
        assert!(!remove_if_ours(&path, 100).unwrap(), "not ours any more");
        assert!(path.exists());
        assert!(remove_if_ours(&path, 200).unwrap());
        assert!(!path.exists());
        write(&path, 300).unwrap();
        assert!(!remove_if_other(&path, 300).unwrap());
        assert!(remove_if_other(&path, 400).unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_missing_or_bogus_directory_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/svc.pid");
        let e = check(&missing).unwrap_err();
        assert!(matches!(e, Error::PidFile { .. }), "{e:?}");
        assert!(e.to_string().contains("no/such/dir"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let under_file = file.join("svc.pid");
        assert!(matches!(check(&under_file), Err(Error::PidFile { .. })));
        assert!(matches!(write(&under_file, 1), Err(Error::PidFile { .. })));
        let e = check(dir.path()).unwrap_err();
        assert!(e.to_string().contains("Is a directory"), "{e}");
    }

    #[test]
    fn symlinks_are_neither_followed_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "42\n").unwrap();
        let path = dir.path().join("svc.pid");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert_eq!(read(&path), None, "a symlink is not read through");
        assert!(!remove_if_ours(&path, 42).unwrap());
        write(&path, 7).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "42\n");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "the symlink was replaced");
        assert_eq!(read(&path), Some(7));
    }

    #[test]
    fn temporary_names_are_unpredictable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.pid");
        let (a, _) = create_temp(&path).unwrap();
        let (b, _) = create_temp(&path).unwrap();
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".svc.pid.") && name.ends_with(".tmp") && name.len() == 29,
            "{name}"
        );
    }
}
