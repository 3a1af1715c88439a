//! A PID file watched through inotify on its directory, so that a wait wakes as soon as the
//! file is written, renamed into place or removed (the crate writes it aside and renames it).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// How long one wait sleeps at most before it looks again even without an event (a bound, not
/// a readiness signal: a change of the directory wakes it at once).
const TICK: Duration = Duration::from_millis(50);

/// A PID file and a watch on its directory.
pub struct PidFile {
    path: PathBuf,
    inotify: Inotify,
}

impl PidFile {
    /// Watches the directory of `path` (which must exist; the file need not).
    pub fn watch(path: &Path) -> io::Result<PidFile> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let events = AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE;
        inotify
            .add_watch(dir, events)
            .map_err(|e| io::Error::other(format!("inotify_add_watch {}: {e}", dir.display())))?;
        Ok(PidFile {
            path: path.to_owned(),
            inotify,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The PID in the file, if it names one now.
    pub fn read(&self) -> Option<u32> {
        std::fs::read_to_string(&self.path)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Calls `f` with the PID in the file now and after every change of its directory, until it
    /// returns `Some`, at most until `deadline`.
    pub fn wait<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(Option<u32>) -> Option<T>,
    ) -> Option<T> {
        loop {
            if let Some(v) = f(self.read()) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.wait_event(left.min(TICK));
        }
    }

    /// Waits until the file names a PID other than `not` (any, for `None`); returns it, or
    /// `None` at `deadline`.
    pub fn wait_other(&self, not: Option<u32>, deadline: Instant) -> Option<u32> {
        self.wait(deadline, |pid| pid.filter(|p| Some(*p) != not))
    }

    /// Sleeps until the directory changes or `timeout` passes, then forgets the events.
    pub fn wait_event(&self, timeout: Duration) {
        wait_readable(&[self.as_fd()], timeout);
        self.drain_events();
    }

    /// Forgets the events that arrived (after the caller polled [`PidFile::as_fd`] itself).
    pub fn drain_events(&self) {
        while self.inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
    }
}

impl AsFd for PidFile {
    /// Readable when the directory changed.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

/// Waits until one of `fds` is readable, at most `timeout` (rounded up to a millisecond);
/// an interrupted wait returns early.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let _ = poll(&mut polled, timeout);
}
