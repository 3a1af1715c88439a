//! Where one process is in its life: every fact the lifecycle depends on,
//! in one value ([`Stage`]), changed only here, and mirrored to the
//! drain's watchers through the one [`DrainTrigger`].
//!
//! | stage | `ready()` | SIGHUP | `upgrade()` | `stop()` | the new process dies before it let go |
//! |---|---|---|---|---|---|
//! | `Starting` | runs (`readying`), then `Ready` | remembered: the upgrade runs once ready | `NotReady` | `Draining(Stopped)` | — |
//! | `Ready` | nothing | starts an upgrade | `Upgrading` | `Draining(Stopped)` | — |
//! | `Upgrading` | nothing | coalesced | `InProgress` | `Draining(Stopped)`; the upgrade is cancelled, or, once the manager was told `MAINPID=<new>`, stands (and no `STOPPING=1`: the new process is the service) | — |
//! | `Draining`, revocable | nothing | ignored | `Draining` | final (no `STOPPING=1`: the service lives on) | `Ready` (taken back) |
//! | `Draining`, final | nothing | ignored | `Draining` | nothing | — |
//!
//! An upgrade ends in `Ready` (it failed, or it was abandoned) or, after the
//! handoff, in `Draining(Upgraded)`: revocable run by hand, final under a
//! service manager (which supervises the new process from then on).
//!
//! A new process (one an upgrade started) accepts nothing until `ready()`
//! has been told `main`: its drain is held ([`Drain::accept`](crate::Drain::accept)
//! waits), and its parent accepts for both until then. Before `main` a
//! failed upgrade kills it; after, nothing does. A first process accepts
//! from the start.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::drain::{DrainReason, DrainTrigger};
use crate::error::UpgradeError;
use crate::Phase;

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Built; `ready()` has not finished.
    Starting {
        /// `ready()` runs (telling the parent, waiting for `main`).
        readying: bool,
        /// A SIGHUP came: the upgrade runs once ready.
        upgrade_asked: bool,
    },
    /// Serving; upgrades are accepted.
    Ready,
    /// An upgrade runs.
    Upgrading {
        /// The manager was told `MAINPID=<new>` (and not `MAINPID=<this>`
        /// again): the new process is the service's main one.
        announced: bool,
    },
    /// Handed over or stopping: finishing in-flight work, then exiting.
    Draining {
        reason: DrainReason,
        /// Handed over run by hand: taken back if the new process dies
        /// before it let go of the service.
        revocable: bool,
    },
}

/// What `ready()` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadyStep {
    /// Become ready.
    Go,
    /// `ready()` ran (or runs) already: nothing to do.
    Again,
    /// Stopped before it was ready: a parent must not hand over to it.
    Stopped,
}

/// What a SIGHUP does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnHup {
    /// Not ready yet: remembered, the upgrade runs once ready.
    Later,
    /// Start an upgrade.
    Now,
    /// An upgrade runs already.
    Coalesced,
    /// Draining: no more upgrades.
    Ignored,
}

/// What a stop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stop {
    /// This stop started the drain (it was not draining).
    pub(crate) started: bool,
    /// The service manager knows this process as the main one, so a
    /// `STOPPING=1` from it is about the service.
    pub(crate) main: bool,
}

/// The stage of one process, and the drain it drives.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    stage: Mutex<Stage>,
    drain: DrainTrigger,
    /// Nobody handed the service to this process: the manager knows it as
    /// main from the start. A new process becomes main at the end of its
    /// `ready()`.
    first: bool,
}

impl Lifecycle {
    pub(crate) fn new(first: bool) -> Lifecycle {
        Lifecycle {
            stage: Mutex::new(Stage::Starting {
                readying: false,
                upgrade_asked: false,
            }),
            // A new process takes connections once it is main: until then a
            // failed upgrade kills it, and the old process accepts for both.
            drain: if first {
                DrainTrigger::new()
            } else {
                DrainTrigger::held()
            },
            first,
        }
    }

    fn stage(&self) -> MutexGuard<'_, Stage> {
        self.stage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stage as the public API shows it.
    pub(crate) fn phase(&self) -> Phase {
        match *self.stage() {
            Stage::Starting { .. } => Phase::Starting,
            Stage::Ready => Phase::Ready,
            Stage::Upgrading { .. } => Phase::Upgrading,
            Stage::Draining { .. } => Phase::Draining,
        }
    }

    /// The drain this lifecycle starts, to hand out watchers of.
    pub(crate) fn drain(&self) -> &DrainTrigger {
        &self.drain
    }

    /// `ready()` begins.
    pub(crate) fn begin_ready(&self) -> ReadyStep {
        match &mut *self.stage() {
            Stage::Starting {
                readying: readying @ false,
                ..
            } => {
                *readying = true;
                ReadyStep::Go
            }
            Stage::Draining { .. } => ReadyStep::Stopped,
            _ => ReadyStep::Again,
        }
    }

    /// In `ready()`, a new process was told it is main (or its parent went
    /// away before, and it takes over anyway): from now on nobody kills it
    /// for a failed upgrade, so its accepts go ahead.
    pub(crate) fn now_main(&self) {
        self.drain.release();
    }

    /// `ready()` is done: `Ready`, unless a stop came meanwhile. Returns
    /// whether a SIGHUP asked for an upgrade meanwhile.
    pub(crate) fn end_ready(&self) -> bool {
        let mut stage = self.stage();
        match *stage {
            Stage::Starting { upgrade_asked, .. } => {
                *stage = Stage::Ready;
                upgrade_asked
            }
            _ => false,
        }
    }

    /// A SIGHUP came.
    pub(crate) fn on_hup(&self) -> OnHup {
        match &mut *self.stage() {
            Stage::Starting { upgrade_asked, .. } => {
                *upgrade_asked = true;
                OnHup::Later
            }
            Stage::Ready => OnHup::Now,
            Stage::Upgrading { .. } => OnHup::Coalesced,
            Stage::Draining { .. } => OnHup::Ignored,
        }
    }

    /// An upgrade begins: only one at a time, and only when ready.
    pub(crate) fn begin_upgrade(&self) -> Result<(), UpgradeError> {
        let mut stage = self.stage();
        match *stage {
            Stage::Ready => {
                *stage = Stage::Upgrading { announced: false };
                Ok(())
            }
            Stage::Starting { .. } => Err(UpgradeError::NotReady),
            Stage::Upgrading { .. } => Err(UpgradeError::InProgress),
            Stage::Draining { .. } => Err(UpgradeError::Draining),
        }
    }

    /// An upgrade ended without a handoff: `Ready` again (unless a stop
    /// came meanwhile).
    pub(crate) fn end_upgrade(&self) {
        let mut stage = self.stage();
        if matches!(*stage, Stage::Upgrading { .. }) {
            *stage = Stage::Ready;
        }
    }

    /// The manager was told `MAINPID=<new>` (`true`), or `MAINPID=<this>`
    /// again (`false`): a stop in between is not the service's to announce.
    pub(crate) fn announced(&self, yes: bool) {
        if let Stage::Upgrading { announced } = &mut *self.stage() {
            *announced = yes;
        }
    }

    /// The new process is main now: the drain starts, revocable run by hand
    /// (see the table). After a stop that came meanwhile it stays a stop.
    pub(crate) fn handed_over(&self, revocable: bool) {
        let mut stage = self.stage();
        if !matches!(*stage, Stage::Upgrading { .. }) {
            return;
        }
        *stage = Stage::Draining {
            reason: DrainReason::Upgraded,
            revocable,
        };
        if revocable {
            self.drain.start_revocable(DrainReason::Upgraded);
        } else {
            self.drain.start(DrainReason::Upgraded);
        }
    }

    /// A stop: the drain starts, or a revocable one becomes final.
    pub(crate) fn stop(&self) -> Stop {
        let mut stage = self.stage();
        let main = match *stage {
            Stage::Starting { .. } => self.first,
            Stage::Ready => true,
            // Once announced, the new process is main: a STOPPING=1 from
            // this one would stop the whole service (NotifyAccess=all).
            Stage::Upgrading { announced } => !announced,
            Stage::Draining {
                reason,
                revocable: true,
            } => {
                *stage = Stage::Draining {
                    reason,
                    revocable: false,
                };
                self.drain.settle();
                return Stop {
                    started: false,
                    main: false,
                };
            }
            Stage::Draining { .. } => {
                return Stop {
                    started: false,
                    main: false,
                }
            }
        };
        *stage = Stage::Draining {
            reason: DrainReason::Stopped,
            revocable: false,
        };
        self.drain.start(DrainReason::Stopped);
        Stop {
            started: true,
            main,
        }
    }

    /// The new process died before it let go: serving again, if the drain
    /// can still be taken back. Returns whether it was.
    pub(crate) fn take_back(&self) -> bool {
        let mut stage = self.stage();
        let revocable = matches!(
            *stage,
            Stage::Draining {
                revocable: true,
                ..
            }
        );
        if revocable {
            *stage = Stage::Ready;
            self.drain.take_back();
        }
        revocable
    }

    /// Makes a running drain final (the new process let go, or this one
    /// exits now). Returns `false` when no drain runs (it was taken back).
    pub(crate) fn settle(&self) -> bool {
        let mut stage = self.stage();
        match *stage {
            Stage::Draining { reason, .. } => {
                *stage = Stage::Draining {
                    reason,
                    revocable: false,
                };
                self.drain.settle();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds() {
        let life = Lifecycle::new(true);
        assert_eq!(life.on_hup(), OnHup::Later);
        assert!(matches!(life.begin_upgrade(), Err(UpgradeError::NotReady)));
        assert_eq!(life.begin_ready(), ReadyStep::Go);
        assert_eq!(life.begin_ready(), ReadyStep::Again, "ready() runs once");
        assert!(life.end_ready(), "the SIGHUP before ready() is remembered");
        assert_eq!(life.phase(), Phase::Ready);
        assert_eq!(life.on_hup(), OnHup::Now);
        life.begin_upgrade().unwrap();
        assert_eq!(life.on_hup(), OnHup::Coalesced);
        assert!(matches!(
            life.begin_upgrade(),
            Err(UpgradeError::InProgress)
        ));
        life.end_upgrade();
        assert_eq!(life.phase(), Phase::Ready);

        life.begin_upgrade().unwrap();
        life.handed_over(true);
        let drain = life.drain().watcher();
        assert_eq!(drain.reason(), Some(DrainReason::Upgraded));
        assert_eq!(life.on_hup(), OnHup::Ignored);
        assert!(life.take_back());
        assert_eq!(life.phase(), Phase::Ready);
        assert!(!drain.is_draining());

        life.begin_upgrade().unwrap();
        life.handed_over(true);
        let stop = life.stop();
        assert_eq!(
            stop,
            Stop {
                started: false,
                main: false
            },
            "a stop after a handoff only makes the drain final"
        );
        assert!(!life.take_back());
        assert_eq!(drain.reason(), Some(DrainReason::Upgraded));
    }

    /// A new process accepts once its `ready()` was told `main` (its parent
    /// accepts until then); a first one from the start.
    #[tokio::test]
    async fn a_new_process_accepts_once_ready() {
        use std::future::{poll_fn, ready, Future};
        use std::task::Poll;

        let new = Lifecycle::new(false);
        let drain = new.drain().watcher();
        let mut accept = std::pin::pin!(drain.accept(ready("a connection")));
        let pending = poll_fn(|cx| Poll::Ready(accept.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "before ready()");
        assert_eq!(new.begin_ready(), ReadyStep::Go);
        let pending = poll_fn(|cx| Poll::Ready(accept.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "during ready(), before main");
        new.now_main();
        assert!(accept.await.is_some(), "once main");

        let first = Lifecycle::new(true);
        let drain = first.drain().watcher();
        assert!(drain.accept(ready(())).await.is_some(), "a first process");
    }

    #[test]
    fn a_stop_says_whether_this_process_is_main() {
        let new = Lifecycle::new(false);
        assert_eq!(
            new.stop(),
            Stop {
                started: true,
                main: false
            }
        );
        assert_eq!(new.begin_ready(), ReadyStep::Stopped);
        assert!(!new.end_ready());
        assert_eq!(new.phase(), Phase::Draining);

        let first = Lifecycle::new(true);
        assert!(first.stop().main);
        let upgraded = Lifecycle::new(false);
        upgraded.begin_ready();
        upgraded.end_ready();
        upgraded.begin_upgrade().unwrap();
        assert_eq!(
            upgraded.stop(),
            Stop {
                started: true,
                main: true
            }
        );
        upgraded.handed_over(false);
        assert_eq!(
            upgraded.drain().watcher().reason(),
            Some(DrainReason::Stopped),
            "a handoff after the stop stays a stop"
        );
        upgraded.end_upgrade();
        assert_eq!(upgraded.phase(), Phase::Draining);

        let announced = Lifecycle::new(true);
        announced.begin_ready();
        announced.end_ready();
        announced.begin_upgrade().unwrap();
        announced.announced(true);
        announced.announced(false);
        announced.announced(true);
        assert_eq!(
            announced.stop(),
            Stop {
                started: true,
                main: false
            },
            "once MAINPID=<new> was sent, the new process is main"
        );
    }
}
