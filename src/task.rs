//! Every task the crate spawns, as one type.
//!
//! tokio compiles its task machinery (the harness's poll, completion and
//! shutdown, the task cell, and the drop code of each stage a task goes
//! through) once for each type of future spawned: several kilobytes each.
//! The crate spawns a dozen kinds of task (the signal loop, `ready()`, each
//! upgrade, following the new process, the control socket and its
//! requests, the watchdog, the link to the parent, each HTTP connection).
//! Boxed as one [`Task`] type they share one copy of that machinery, which
//! keeps the code every program built on the crate carries (and pages in)
//! smaller. The price is one more allocation per task. For a connection
//! that is one `malloc` beside the kilobytes of buffers it has anyway, and
//! the box spares its accept loop from moving the connection's
//! state (over 2 KiB) through tokio's spawn path by value, which made the
//! application's stack 20 KiB deeper.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A task of the crate's, whatever it runs.
pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Spawns `task` on `rt`, to run on its own.
pub(crate) fn spawn_on<F>(rt: &Handle, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    spawn_task(rt, Box::pin(task));
}

/// Spawns `task` on the caller's runtime, to run on its own.
///
/// # Panics
///
/// Outside a tokio runtime, as `tokio::spawn`.
pub(crate) fn spawn<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    spawn_task(&Handle::current(), Box::pin(task));
}

/// The one place the crate hands a task to tokio.
fn spawn_task(rt: &Handle, task: Task) {
    drop(rt.spawn(task));
}

/// Spawns `task` on `rt` and returns a future of its output. Dropping that
/// future leaves the task running to its end.
///
/// The returned future resolves to `None` when the task was dropped before
/// it finished (its runtime shut down), and resumes the task's panic, if it
/// panicked, in whoever awaits it.
pub(crate) fn run_on<F>(rt: &Handle, task: F) -> impl Future<Output = Option<F::Output>> + Send
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = oneshot::channel::<Result<F::Output, Box<dyn Any + Send>>>();
    spawn_on(rt, async move {
        let mut task = pin!(task);
        let out = std::future::poll_fn(|cx| {
            match catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(cx))) {
                Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
                Ok(std::task::Poll::Ready(out)) => std::task::Poll::Ready(Ok(out)),
                Err(panic) => std::task::Poll::Ready(Err(panic)),
            }
        })
        .await;
        let _ = tx.send(out);
    });
    async move {
        match rx.await {
            Ok(Ok(out)) => Some(out),
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_runs_and_its_output_comes_back() {
        let out = run_on(&Handle::current(), async { 6 * 7 }).await;
        assert_eq!(out, Some(42));
    }

    #[tokio::test]
    async fn a_panic_in_the_task_is_resumed_in_the_caller() {
        let waiting = tokio::spawn(run_on(&Handle::current(), async {
            panic!("the task's own words");
        }));
        let e = waiting.await.unwrap_err();
        let panic = e.into_panic();
        let words = panic.downcast_ref::<&str>().copied();
        assert_eq!(words, Some("the task's own words"));
    }

    #[tokio::test]
    async fn dropping_the_output_leaves_the_task_running() {
        let (tx, rx) = oneshot::channel();
        let (go, wait) = oneshot::channel::<()>();
        drop(run_on(&Handle::current(), async move {
            let _ = wait.await;
            let _ = tx.send("finished");
        }));
        go.send(()).unwrap();
        assert_eq!(rx.await, Ok("finished"));
    }

    #[test]
    fn a_task_dropped_with_its_runtime_gives_none() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = run_on(rt.handle(), std::future::pending::<()>());
        drop(rt);
        let waiter = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(waiter.block_on(out), None);
    }
}
