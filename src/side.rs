//! The crate's own thread: a small tokio runtime, apart from the
//! application's, on which every step of the process's own life runs.
//!
//! | runs on this thread | why |
//! |---|---|
//! | the signals (SIGHUP, SIGTERM, SIGINT) | a SIGHUP starts its upgrade at once |
//! | every upgrade, from its first step to following the new process | no step (the clone, the state, the `ready` line, the barrier, `main`) waits its turn |
//! | [`ready`](crate::Handover::ready): the `ready`/`main` exchange, the PID file, `READY=1` | the new process takes over at once, even while it accepts |
//! | the control socket | `handover-reload` is answered at once |
//! | the watchdog | **no**: it runs on the application's runtime, so that a wedged runtime stops the pings |
//!
//! Under load the application's runtime has thousands of connections ready
//! at every turn; a task woken there (by a signal, by the new process's
//! `ready` line) waits behind all of them, and an upgrade has about five
//! such waits. Here each step runs as soon as its event arrives. The
//! thread idles in `epoll_wait` between events and ends when the last
//! [`Handover`](crate::Handover) of the process is gone.
//!
//! What the application awaits ([`Handover::ready`](crate::Handover::ready),
//! [`Handover::upgrade`](crate::Handover::upgrade)) is a task here; the
//! caller's future waits for it. Dropping that future does not cancel the
//! task: once started, a `ready()` or an upgrade runs to its end, as one
//! started by SIGHUP does (an upgrade is bounded by its timeout, a
//! manager's barrier and the wait for `serving`).

use std::future::Future;
use std::io;

use tokio::runtime::Handle;

use crate::task;

/// The thread's name, as `ps -T` and `top -H` show it.
const NAME: &str = "handover";

/// The most I/O events the thread takes from `epoll_wait` at once; more
/// ready at the same time are taken at the next turn.
const IO_EVENTS: usize = 32;

/// The crate's thread and its runtime; see the module docs.
#[derive(Debug)]
pub(crate) struct Side {
    handle: Handle,
    /// The application's runtime, for what must run there (the watchdog).
    app: Handle,
    /// Dropped with the last `Handover`: the thread then ends, and its
    /// tasks are dropped.
    _end: tokio::sync::oneshot::Sender<()>,
}

impl Side {
    /// Starts the thread. Must be called within the application's runtime.
    ///
    /// # Errors
    ///
    /// When the runtime's driver (an epoll fd, an eventfd) or the thread
    /// cannot be created: no fds, no memory, a pids limit.
    pub(crate) fn start() -> io::Result<Side> {
        let app = Handle::current();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // A handful of fds wake this thread (signals, a channel, a
            // pidfd, the control socket); tokio's default batch of 1024
            // events is a 12 KiB buffer the thread would never fill.
            .max_io_events_per_tick(IO_EVENTS)
            .build()?;
        let handle = rt.handle().clone();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(NAME.into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = ended.await;
                });
            })
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create a thread: {e}")))?;
        Ok(Side {
            handle,
            app,
            _end: end,
        })
    }

    /// The crate thread's runtime: `enter()` it to make something (a signal
    /// stream) belong to it.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// Runs `task` on `side`'s thread, or on the caller's runtime without one
/// (the unit tests, whose fake processes need no thread of their own), and
/// returns its output. Dropping the returned future leaves the task
/// running to its end.
///
/// # Errors
///
/// When the thread's runtime ended before the task did, which it does only
/// once the process has no `Handover` left.
///
/// # Panics
///
/// When `task` panics: the panic is resumed in the caller.
pub(crate) fn run<F>(
    side: Option<&Side>,
    task: F,
) -> impl Future<Output = io::Result<F::Output>> + Send
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let out = match side {
        Some(s) => task::run_on(&s.handle, task),
        None => task::run_on(&Handle::current(), task),
    };
    async move {
        out.await
            .ok_or_else(|| io::Error::other("the handover thread has ended"))
    }
}

/// Spawns `task` on `side`'s thread (or the caller's runtime without one)
/// and lets it run on its own.
pub(crate) fn spawn<F>(side: Option<&Side>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match side {
        Some(s) => task::spawn_on(&s.handle, task),
        None => task::spawn(task),
    }
}

/// Spawns `task` on the application's runtime (the caller's without a
/// `side`).
pub(crate) fn spawn_on_app<F>(side: Option<&Side>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match side {
        Some(s) => task::spawn_on(&s.app, task),
        None => task::spawn(task),
    }
}
