//! The supervisor's private runtime directory, where its control socket
//! (by default) and its notify socket live.
//!
//! | who | directory |
//! |---|---|
//! | `XDG_RUNTIME_DIR` set (absolute) | `$XDG_RUNTIME_DIR/handover` |
//! | else root | `/run/handover` |
//! | else | `/tmp/handover-<uid>` |
//!
//! The directory is created with mode 0700. One that exists already is used
//! only if it is a real directory (not a symlink), owned by this user, and
//! closed to group and others: in a shared directory such as `/tmp`,
//! another user could otherwise have made it first and would see (or swap)
//! the sockets. Nothing in it is ever `chmod`ed by path: the directory is
//! what keeps others out, and the control socket also checks its peer's
//! credentials.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::SupervisorError;

/// The default runtime directory for this user (see the module's table).
/// Not created.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
    {
        return dir.join("handover");
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        PathBuf::from("/run/handover")
    } else {
        PathBuf::from(format!("/tmp/handover-{uid}"))
    }
}

/// Creates `dir` (mode 0700), or checks that the existing one is private
/// to this user.
pub(super) fn ensure_private(dir: &Path) -> Result<(), SupervisorError> {
    let refuse = |problem: String| SupervisorError::RuntimeDir {
        path: dir.to_owned(),
        problem,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(refuse(format!(
                "cannot create it: {e} (set XDG_RUNTIME_DIR to a writable directory, or give --control)"
            )))
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| refuse(e.to_string()))?;
    check_private(&meta, nix::unistd::geteuid().as_raw()).map_err(refuse)
}

/// Whether `meta` describes a directory private to `uid`.
fn check_private(meta: &std::fs::Metadata, uid: u32) -> Result<(), String> {
    if meta.file_type().is_symlink() {
        return Err("is a symbolic link; refusing to use it".into());
    }
    if !meta.is_dir() {
        return Err("is not a directory".into());
    }
    if meta.uid() != uid {
        return Err(format!(
            "belongs to uid {}, not to this user (uid {uid}); refusing to use it",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "has mode {:o}: group or others have access; refusing to use it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_private_directory_and_refuses_an_open_one() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("handover");
        ensure_private(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        ensure_private(&dir).unwrap(); // existing and private: fine

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure_private(&dir).unwrap_err();
        assert!(e.to_string().contains("group or others"), "{e}");

        let link = base.path().join("link");
        std::os::unix::fs::symlink(base.path(), &link).unwrap();
        let e = ensure_private(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");

        let file = base.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = ensure_private(&file).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");

        let e = ensure_private(&base.path().join("no/such")).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
    }

    #[test]
    fn another_users_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let meta = std::fs::symlink_metadata(base.path()).unwrap();
        let e = check_private(&meta, meta.uid() + 1).unwrap_err();
        assert!(e.contains("belongs to uid"), "{e}");
    }
}
