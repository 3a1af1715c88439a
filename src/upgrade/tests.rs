//! The upgrade sequence through its seam: a scripted fake stands in for the
//! new processes ([`Spawn`], [`NewProcess`]); everything else is real (the
//! phases, the drain, the listeners, and for the announcement a notify
//! socket of the test's own). The real processes are in `tests/`.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{Event, NewProcess, Plan, Spawn, SERVING_WAIT};
use crate::drain::DrainReason;
use crate::error::UpgradeError;
use crate::listeners::Listeners;
use crate::notify::Notifier;
use crate::process::{Parts, Process};
use crate::protocol::channel::FromNew;
use crate::{Builder, Phase};

/// Bounds every wait of these tests.
const T: Duration = Duration::from_secs(10);

/// What the next new process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Says `ready`, takes `main`, then says `serving`.
    Ready,
    /// Says `ready`, takes `main`, and says `serving` only when the test
    /// makes it ([`says`]).
    ServesLater,
    /// Says `fail <reason>` instead of `ready`.
    Fails(&'static str),
    /// Says nothing, ever.
    Hangs,
    /// Says `ready`, then is gone before `main`.
    DiesBeforeMain,
    /// Says `ready`, takes `main`, then exits before it says `serving`.
    DiesBeforeServing,
}

/// A started fake process, as the test sees it.
#[derive(Debug, Clone)]
struct Started {
    pid: u32,
    generation: u32,
    listeners: Vec<String>,
    /// The state it was sent.
    state: Arc<Mutex<Vec<u8>>>,
    killed: Arc<AtomicBool>,
    main: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Fake {
    script: Mutex<VecDeque<Script>>,
    started: Mutex<Vec<Started>>,
    /// What each one says after the handoff; `None` once it exited.
    said: Mutex<Vec<Option<mpsc::UnboundedSender<Event>>>>,
    count: watch::Sender<usize>,
    next_pid: AtomicU32,
}

impl Fake {
    fn new(script: &[Script]) -> Fake {
        Fake {
            script: Mutex::new(script.iter().copied().collect()),
            next_pid: AtomicU32::new(1000),
            ..Fake::default()
        }
    }
}

#[derive(Debug)]
struct FakeProcess {
    script: Script,
    started: Started,
    events: mpsc::UnboundedReceiver<Event>,
    armed: bool,
}

impl Spawn for Fake {
    type Process = FakeProcess;

    fn program(&self) -> &Path {
        Path::new("/fake/next-version")
    }

    fn start(
        &self,
        plan: Plan<'_>,
        _reserved: crate::spare::Reserved,
    ) -> Result<
        impl Future<Output = Result<FakeProcess, UpgradeError>> + Send + 'static,
        UpgradeError,
    > {
        let script = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .expect("a script for each start");
        let (tx, rx) = mpsc::unbounded_channel();
        if script == Script::Ready {
            // As the real one: `serving` once it had `main` (it waits in the
            // channel until then).
            let _ = tx.send(Event::Said(FromNew::Serving));
        }
        if script == Script::DiesBeforeServing {
            let _ = tx.send(Event::Exited("exit status 7".into()));
        }
        let started = Started {
            pid: self.next_pid.fetch_add(1, Ordering::Relaxed),
            generation: plan.generation,
            listeners: plan.listeners.iter().map(|(n, _)| n.to_string()).collect(),
            state: Arc::default(),
            killed: Arc::default(),
            main: Arc::default(),
        };
        self.started.lock().unwrap().push(started.clone());
        self.said.lock().unwrap().push(Some(tx));
        self.count.send_modify(|n| *n += 1);
        let process = FakeProcess {
            script,
            started,
            events: rx,
            armed: true,
        };
        Ok(async move { Ok(process) })
    }
}

impl NewProcess for FakeProcess {
    fn pid(&self) -> u32 {
        self.started.pid
    }

    async fn wait_ready(&mut self, state: &[u8]) -> Result<(), UpgradeError> {
        *self.started.state.lock().unwrap() = state.to_vec();
        let pid = self.started.pid;
        match self.script {
            Script::Ready
            | Script::ServesLater
            | Script::DiesBeforeMain
            | Script::DiesBeforeServing => Ok(()),
            Script::Fails(reason) => {
                // As the real one: killed before the error comes back.
                self.kill().await;
                Err(UpgradeError::ChildFailed {
                    pid,
                    reason: reason.into(),
                })
            }
            Script::Hangs => std::future::pending().await,
        }
    }

    async fn confirm_main(&mut self) -> io::Result<()> {
        if self.script == Script::DiesBeforeMain {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.started.main.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn kill(&mut self) -> String {
        self.armed = false;
        self.started.killed.store(true, Ordering::SeqCst);
        "killed by signal 9".into()
    }

    fn handed_over(&mut self) {
        self.armed = false;
    }

    async fn next_event(&mut self) -> Event {
        match self.events.recv().await {
            Some(event) => event,
            None => Event::Exited("exit status 1".into()),
        }
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        if self.armed {
            self.started.killed.store(true, Ordering::SeqCst);
        }
    }
}

/// A process of generation 0 with one listener (`http`) and `fake` as its
/// way to start the next, made ready.
async fn ready_process(fake: Fake, notify: Option<Notifier>) -> Arc<Process<Fake>> {
    let mut listeners = Listeners::new(Vec::new());
    listeners
        .tcp("http", "127.0.0.1:0".parse().unwrap())
        .unwrap();
    let config = Builder {
        upgrade_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(30),
        ..Builder::default()
    };
    let process = Arc::new(Process::new(Parts {
        config,
        spawn: fake,
        generation: 0,
        notify,
        listeners,
        control: None,
        parent: None,
        handed_state: Vec::new(),
        side: None,
    }));
    process.ready().await.unwrap();
    assert_eq!(process.life.phase(), Phase::Ready);
    process
}

fn started(p: &Process<Fake>, i: usize) -> Started {
    p.spawn.started.lock().unwrap()[i].clone()
}

/// The `i`th new process says `what` on the channel.
fn says(p: &Process<Fake>, i: usize, what: FromNew) {
    let said = p.spawn.said.lock().unwrap();
    let tx = said[i].as_ref().expect("it has not exited");
    tx.send(Event::Said(what)).unwrap();
}

/// The `i`th new process exits.
fn exits(p: &Process<Fake>, i: usize) {
    p.spawn.said.lock().unwrap()[i] = None;
}

/// Waits until `n` processes were started.
async fn until_started(p: &Process<Fake>, n: usize) {
    let mut count = p.spawn.count.subscribe();
    tokio::time::timeout(T, count.wait_for(|c| *c >= n))
        .await
        .expect("the new process is started")
        .unwrap();
}

fn handoff_names(p: &Process<Fake>) -> Vec<String> {
    p.listeners()
        .for_handoff()
        .iter()
        .map(|(n, _)| n.to_string())
        .collect()
}

#[tokio::test]
async fn a_new_process_that_says_ready_takes_over() {
    let p = ready_process(Fake::new(&[Script::Ready]), None).await;
    // A handle on bytes kept ready, sent as it is.
    let kept = bytes::Bytes::from_static(b"42 hits");
    p.set_state_provider(Box::new(move || Box::new(kept.clone())));
    let pid = p.upgrade(None).await.unwrap();
    let new = started(&p, 0);
    assert_eq!(pid, new.pid);
    assert_eq!(
        (new.generation, new.listeners),
        (1, vec!["http".to_owned()])
    );
    assert_eq!(*new.state.lock().unwrap(), b"42 hits");
    assert!(new.main.load(Ordering::SeqCst), "told it is main");
    assert!(!new.killed.load(Ordering::SeqCst));
    assert_eq!(p.life.phase(), Phase::Draining);
    assert_eq!(
        p.life.drain().watcher().reason(),
        Some(DrainReason::Upgraded)
    );
    // Run by hand: the listeners stay until the drain is final.
    assert_eq!(handoff_names(&p), ["http"]);
    assert!(matches!(p.upgrade(None).await, Err(UpgradeError::Draining)));

    // It hands on (or stops) and exits: nothing to take back.
    says(&p, 0, FromNew::Upgraded(pid + 1));
    exits(&p, 0);
    let exit = tokio::time::timeout(T, p.wait()).await.unwrap();
    assert_eq!((exit.reason, exit.unfinished), (DrainReason::Upgraded, 0));
    assert!(
        handoff_names(&p).is_empty(),
        "final: the listeners are gone"
    );
}

#[tokio::test]
async fn a_new_process_that_fails_leaves_this_one_serving() {
    let p = ready_process(
        Fake::new(&[Script::Fails("no config"), Script::Ready]),
        None,
    )
    .await;
    let err = p.upgrade(None).await.unwrap_err();
    assert!(
        matches!(err, UpgradeError::ChildFailed { ref reason, .. } if reason == "no config"),
        "{err}"
    );
    assert!(started(&p, 0).killed.load(Ordering::SeqCst));
    assert_eq!(p.life.phase(), Phase::Ready);
    assert!(!p.life.drain().watcher().is_draining());
    assert_eq!(handoff_names(&p), ["http"]);
    // The next upgrade can start, and succeeds.
    let pid = p.upgrade(None).await.unwrap();
    assert_eq!(pid, started(&p, 1).pid);
}

#[tokio::test(start_paused = true)]
async fn a_new_process_that_is_not_ready_in_time_is_killed() {
    let p = ready_process(Fake::new(&[Script::Hangs]), None).await;
    let err = p.upgrade(None).await.unwrap_err();
    assert!(
        matches!(err, UpgradeError::Timeout { timeout, .. } if timeout == Duration::from_secs(5)),
        "{err}"
    );
    assert!(started(&p, 0).killed.load(Ordering::SeqCst));
    assert_eq!(p.life.phase(), Phase::Ready);
}

#[tokio::test]
async fn a_stop_during_an_upgrade_cancels_it() {
    let p = ready_process(Fake::new(&[Script::Hangs]), None).await;
    let upgrade = tokio::spawn({
        let p = p.clone();
        async move { p.upgrade(None).await }
    });
    until_started(&p, 1).await;
    p.stop();
    let err = tokio::time::timeout(T, upgrade)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Stopped), "{err}");
    assert!(started(&p, 0).killed.load(Ordering::SeqCst));
    assert_eq!(p.life.phase(), Phase::Draining);
    assert_eq!(
        p.life.drain().watcher().reason(),
        Some(DrainReason::Stopped)
    );
    assert!(handoff_names(&p).is_empty(), "a stop lets the listeners go");
}

#[tokio::test]
async fn a_new_process_that_dies_during_the_drain_gives_the_service_back() {
    let p = ready_process(Fake::new(&[Script::Ready, Script::Ready]), None).await;
    let drain = p.life.drain().watcher();
    let request = drain.guard(); // in flight: the drain lasts
    let wait = tokio::spawn({
        let p = p.clone();
        async move { p.wait().await }
    });
    p.upgrade(None).await.unwrap();
    assert!(drain.is_draining());
    let resumed = tokio::spawn({
        let drain = drain.clone();
        async move { drain.resumed().await }
    });

    // It dies without having said `upgraded` or `stopping`.
    exits(&p, 0);
    assert!(
        tokio::time::timeout(T, resumed).await.unwrap().unwrap(),
        "accept loops accept again"
    );
    assert_eq!(p.life.phase(), Phase::Ready);
    assert!(!drain.is_draining());
    assert_eq!(handoff_names(&p), ["http"], "the listeners were kept");
    assert!(!wait.is_finished(), "wait() waits for the next drain");

    // And it can upgrade again; this time the new process lets go.
    p.upgrade(None).await.unwrap();
    says(&p, 1, FromNew::Stopping);
    exits(&p, 1);
    drop(request);
    let exit = tokio::time::timeout(T, wait).await.unwrap().unwrap();
    assert_eq!(exit.reason, DrainReason::Upgraded);
    assert_eq!(p.life.phase(), Phase::Draining);
}

#[tokio::test]
async fn an_abandoned_upgrade_leaves_the_process_ready() {
    let p = ready_process(Fake::new(&[Script::Hangs, Script::Ready]), None).await;
    let mut upgrade = Box::pin(p.upgrade(None));
    tokio::select! {
        _ = &mut upgrade => panic!("a hanging process cannot be ready"),
        () = until_started(&p, 1) => {}
    }
    assert_eq!(p.life.phase(), Phase::Upgrading);
    drop(upgrade);
    assert!(
        started(&p, 0).killed.load(Ordering::SeqCst),
        "killed on drop"
    );
    assert_eq!(p.life.phase(), Phase::Ready);
    p.upgrade(None).await.unwrap();
}

/// A notify socket of the test's own: every datagram's text, in order; a
/// barrier's fd is closed once it is read, as systemd does.
fn manager() -> (
    tempfile::TempDir,
    Notifier,
    std::sync::mpsc::Receiver<String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 4096];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let Ok(msg) = nix::sys::socket::recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            nix::sys::socket::MsgFlags::empty(),
        ) else {
            return;
        };
        for c in msg.cmsgs().into_iter().flatten() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                drop(crate::sys::take_received_fds(&fds));
            }
        }
        let len = msg.bytes;
        if tx
            .send(String::from_utf8_lossy(&buf[..len]).into_owned())
            .is_err()
        {
            return;
        }
    });
    let notifier = Notifier::new(path.to_str().unwrap()).unwrap();
    (dir, notifier, rx)
}

fn next(rx: &std::sync::mpsc::Receiver<String>) -> String {
    rx.recv_timeout(T).expect("a notify message")
}

#[tokio::test]
async fn under_a_manager_the_handoff_is_announced_and_final() {
    let (_dir, notifier, rx) = manager();
    let p = ready_process(Fake::new(&[Script::Ready]), Some(notifier)).await;
    assert_eq!(
        next(&rx),
        format!(
            "READY=1\nSTATUS=serving, generation 0, pid {}",
            std::process::id()
        )
    );
    let pid = p.upgrade(None).await.unwrap();
    let reloading = next(&rx);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC=")
            && reloading.contains("\nEXTEND_TIMEOUT_USEC=15000000\n")
            && reloading.ends_with("\nSTATUS=upgrading to generation 1"),
        "{reloading}"
    );
    assert_eq!(
        next(&rx),
        format!("MAINPID={pid}\nREADY=1\nSTATUS=serving, generation 1, pid {pid}")
    );
    assert_eq!(next(&rx), "BARRIER=1");
    let drain = p.life.drain().watcher();
    assert!(
        !drain.resumed().await,
        "final at once: the manager supervises the new process"
    );
    assert!(handoff_names(&p).is_empty());
    // Its death is the manager's business.
    exits(&p, 0);
    let exit = tokio::time::timeout(T, p.wait()).await.unwrap();
    assert_eq!(exit.reason, DrainReason::Upgraded);
    assert_eq!(p.life.phase(), Phase::Draining);
}

#[tokio::test]
async fn under_a_manager_a_failure_ends_the_reload() {
    let (_dir, notifier, rx) = manager();
    let p = ready_process(
        Fake::new(&[Script::Fails("bad config"), Script::DiesBeforeMain]),
        Some(notifier),
    )
    .await;
    next(&rx); // READY=1
    let err = p.upgrade(None).await.unwrap_err();
    assert!(matches!(err, UpgradeError::ChildFailed { .. }), "{err}");
    assert!(next(&rx).starts_with("RELOADING=1\n"));
    let me = std::process::id();
    assert_eq!(
        next(&rx),
        format!(
            "READY=1\nSTATUS=upgrade to generation 1 failed: new process {} failed: bad config; \
             still serving, pid {me}",
            started(&p, 0).pid
        )
    );

    // Ready, announced, then gone before `main`: the service comes back.
    let err = p.upgrade(None).await.unwrap_err();
    assert!(matches!(err, UpgradeError::Channel(_)), "{err}");
    assert!(next(&rx).starts_with("RELOADING=1\n"));
    assert!(next(&rx).starts_with(&format!("MAINPID={}\nREADY=1\n", started(&p, 1).pid)));
    assert_eq!(next(&rx), "BARRIER=1");
    assert_eq!(next(&rx), format!("MAINPID={me}\nREADY=1"));
    assert!(next(&rx).starts_with("READY=1\nSTATUS=upgrade to generation 1 failed"));
    assert!(started(&p, 1).killed.load(Ordering::SeqCst));
    assert_eq!(p.life.phase(), Phase::Ready);
}

/// Waits until the `i`th new process was told it is main.
async fn until_main(p: &Process<Fake>, i: usize) {
    let main = started(p, i).main;
    tokio::time::timeout(T, async {
        while !main.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the new process is told it is main");
}

/// This process keeps accepting until the new one has finished `ready()`
/// (`serving`): only then does the drain send it every connection.
#[tokio::test]
async fn the_drain_starts_when_the_new_process_serves() {
    let p = ready_process(Fake::new(&[Script::ServesLater]), None).await;
    let upgrade = tokio::spawn({
        let p = p.clone();
        async move { p.upgrade(None).await }
    });
    until_started(&p, 1).await;
    until_main(&p, 0).await;
    assert!(!p.life.drain().watcher().is_draining());
    assert_eq!(p.life.phase(), Phase::Upgrading);
    says(&p, 0, FromNew::Serving);
    let pid = tokio::time::timeout(T, upgrade)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pid, started(&p, 0).pid);
    assert_eq!(
        p.life.drain().watcher().reason(),
        Some(DrainReason::Upgraded)
    );
    // `serving` does not let go of the service: a death now is taken back.
    exits(&p, 0);
    tokio::time::timeout(T, p.life.drain().taken_back())
        .await
        .expect("taken back");
    assert_eq!(p.life.phase(), Phase::Ready);
}

/// A new process that never says `serving` (an older version, or one
/// stuck after `main`) delays the drain by [`SERVING_WAIT`] only.
#[tokio::test(start_paused = true)]
async fn without_serving_the_drain_starts_after_the_wait() {
    let p = ready_process(Fake::new(&[Script::ServesLater]), None).await;
    let begun = tokio::time::Instant::now();
    p.upgrade(None).await.unwrap();
    assert!(begun.elapsed() >= SERVING_WAIT, "{:?}", begun.elapsed());
    assert_eq!(
        p.life.drain().watcher().reason(),
        Some(DrainReason::Upgraded)
    );
}

/// A new process that dies after `main` but before `serving` never served:
/// no drain, the manager told `MAINPID=<this>` again, the reload ended with
/// `READY=1` and why, and the next upgrade works.
#[tokio::test]
async fn a_new_process_that_dies_before_serving_leaves_this_one_main() {
    let (_dir, notifier, rx) = manager();
    let p = ready_process(
        Fake::new(&[Script::DiesBeforeServing, Script::Ready]),
        Some(notifier),
    )
    .await;
    next(&rx); // READY=1
    let err = p.upgrade(None).await.unwrap_err();
    let dead = started(&p, 0).pid;
    assert!(
        matches!(err, UpgradeError::DiedBeforeServing { pid, ref status } if pid == dead && status == "exit status 7"),
        "{err}"
    );
    assert!(started(&p, 0).main.load(Ordering::SeqCst));
    assert!(next(&rx).starts_with("RELOADING=1\n"));
    assert!(next(&rx).starts_with(&format!("MAINPID={dead}\nREADY=1\n")));
    assert_eq!(next(&rx), "BARRIER=1");
    let me = std::process::id();
    assert_eq!(next(&rx), format!("MAINPID={me}\nREADY=1"));
    assert!(next(&rx).starts_with("READY=1\nSTATUS=upgrade to generation 1 failed"));
    assert_eq!(p.life.phase(), Phase::Ready);
    assert!(!p.life.drain().watcher().is_draining());
    assert_eq!(handoff_names(&p), ["http"]);

    let pid = p.upgrade(None).await.unwrap();
    assert_eq!(pid, started(&p, 1).pid);
}
