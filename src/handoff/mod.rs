//! Starting the new process and talking to it over the handoff channel
//! (see [`protocol`](crate::protocol) for what is said): [`Reexec`], the
//! real [`Spawn`], with the parent's side in `launch` and the child's
//! ([`ParentLink`]) in `link`.

mod launch;
mod link;

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) use launch::Child;
pub(crate) use link::{fail_raw, ParentLink};

use crate::error::UpgradeError;
use crate::spare::Reserved;
use crate::upgrade::{Plan, Spawn};

/// The binary to run for the next generation, resolved at start-up.
#[derive(Debug, Clone)]
pub(crate) struct Executable {
    pub(crate) path: PathBuf,
    pub(crate) argv: Vec<OsString>,
}

impl Executable {
    /// `argv[0]` made absolute against the start directory (or found in
    /// `PATH` when it is a bare name), so that a binary replaced on disk, or
    /// a flipped `current -> releases/N` symlink, is what runs next.
    /// `/proc/self/exe` only as a fallback: it names the old file.
    pub(crate) fn current() -> Executable {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let path = argv
            .first()
            .and_then(|a0| resolve(Path::new(a0)))
            .or_else(|| std::fs::read_link("/proc/self/exe").ok())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        Executable { path, argv }
    }
}

fn resolve(argv0: &Path) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.as_os_str().as_bytes().contains(&b'/') {
        return if argv0.is_absolute() {
            Some(argv0.to_owned())
        } else {
            std::env::current_dir().ok().map(|d| d.join(argv0))
        };
    }
    find_in_path(argv0.as_os_str(), &std::env::var_os("PATH")?)
}

/// The first executable file named `name` in the directories of `search`
/// (a `PATH` value), made absolute against the current directory, as
/// `execvp` would find it.
pub(crate) fn find_in_path(name: &std::ffi::OsStr, search: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(search)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
            }
        })
}

/// Whether `p` is a file someone may execute.
pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The real [`Spawn`]: runs [`Executable`] again with `clone`; with
/// `reparent` (under a service manager), as the manager's own child.
#[derive(Debug)]
pub(crate) struct Reexec {
    exe: Executable,
    reparent: bool,
}

impl Reexec {
    pub(crate) fn new(exe: Executable, reparent: bool) -> Reexec {
        Reexec { exe, reparent }
    }
}

impl Spawn for Reexec {
    type Process = Child;

    fn program(&self) -> &Path {
        &self.exe.path
    }

    fn start(
        &self,
        plan: Plan<'_>,
        reserved: Reserved,
    ) -> Result<impl Future<Output = Result<Child, UpgradeError>> + Send + 'static, UpgradeError>
    {
        let launch = launch::prepare(&self.exe, &plan, self.reparent, reserved)?;
        Ok(launch.run())
    }
}

/// Writes all of `buf` to the socket `fd`, blocking or not, waiting for room
/// at most `timeout`; never raises SIGPIPE.
pub(crate) fn write_blocking(
    fd: BorrowedFd<'_>,
    mut buf: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::sys::socket::{send, MsgFlags};
    let end = std::time::Instant::now() + timeout;
    while !buf.is_empty() {
        match send(
            fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let left = end.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
                match nix::poll::poll(&mut fds, ms) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_and_bare_names() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(resolve(Path::new("target/x")), Some(cwd.join("target/x")));
        assert_eq!(
            resolve(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        let sh = resolve(Path::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        assert_eq!(resolve(Path::new("")), None);
    }
}
