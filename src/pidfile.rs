//! The PID file: written atomically once the process is the one serving,
//! removed on a real stop only if it still holds our own PID.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn err(path: &Path, source: io::Error) -> Error {
    Error::PidFile {
        path: path.to_owned(),
        source,
    }
}

fn temp_path(path: &Path, pid: u32) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{pid}.tmp"));
    Ok(path.with_file_name(tmp))
}

/// Checks, at start-up, that the PID file can be written: its directory
/// exists and accepts a new file. Fails early instead of after the service
/// has started serving.
pub(crate) fn check(path: &Path) -> Result<()> {
    let tmp = temp_path(path, std::process::id()).map_err(|e| err(path, e))?;
    std::fs::File::create(&tmp).map_err(|e| err(path, e))?;
    std::fs::remove_file(&tmp).map_err(|e| err(path, e))
}

/// Writes `pid` to `path` atomically: a temporary file in the same
/// directory, then `rename`, so a reader never sees a partial PID. No
/// `fsync`: a PID file describes a running system and means nothing after
/// a crash of the machine, and an fsync on a busy disk would delay every
/// handoff.
pub(crate) fn write(path: &Path, pid: u32) -> Result<()> {
    let tmp = temp_path(path, pid).map_err(|e| err(path, e))?;
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{pid}")?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| err(path, e))
}

/// Reads the PID in `path`, if it holds one.
pub(crate) fn read(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes `path` if it holds `pid`; a PID file that a newer process wrote
/// is left alone. Returns whether it removed the file.
pub(crate) fn remove_if_ours(path: &Path, pid: u32) -> Result<bool> {
    if read(path) != Some(pid) {
        return Ok(false);
    }
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
    }
}
