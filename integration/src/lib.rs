//! What the integration tests of the `handover` crate share, and the reload benchmark with them.
//!
//! The tests run real processes on real sockets: the crate's examples and commands, built by
//! cargo as binaries of this package (so never stale: [`program!`]), under a private systemd
//! manager where the behaviour depends on systemd ([`systemd`]). Every wait is bounded
//! ([`TIMEOUT`]) and waits on an event or a state; every process started is killed by pid.
//!
//! | module | what |
//! |---|---|
//! | [`server`] | starting a program, its log, its PID file; upgrading it; replacing its binary |
//! | [`process`] | processes by pid: signals, reaping, what `/proc` says about them |
//! | [`pidfile`] | a PID file watched with inotify |
//! | [`http`] | the HTTP/1.1 client: one parser, `GET` on a fresh or a kept connection |
//! | [`load`] | continuous load from plain threads, with a report of every failure |
//! | [`notify`] | a notify socket standing in for the service manager |
//! | [`systemd`] | a private `systemd --user` manager with its journald: the host's and 257 |
//! | [`cgroup`] | the cgroup hierarchies, and the lock the tests share on them |
//! | [`units`] | the shipped unit files, adjusted and installed for a test |
//!
//! Tests that need root, a manager or a tool skip with a printed reason when they cannot have
//! it ([`skip`]), and fail instead under `CI=true`.

#![warn(missing_docs)]

use std::io::Write;
use std::time::{Duration, Instant};

pub mod cgroup;
pub mod http;
pub mod load;
pub mod notify;
pub mod pidfile;
pub mod process;
pub mod program;
pub mod server;
pub mod systemd;
pub mod units;

/// The bound on every wait of a test: long enough for a loaded machine, short enough that a
/// hang fails the test rather than the suite.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The path of a program this package builds (a `[[bin]]` of its `Cargo.toml`): cargo builds
/// every binary of the package before it runs one of its tests, and names it in
/// `CARGO_BIN_EXE_<name>`. Use it from a test (`program!("hello")`); the name is checked when
/// the test compiles.
#[macro_export]
macro_rules! program {
    ($name:literal) => {
        ::std::path::Path::new(env!(concat!("CARGO_BIN_EXE_", $name)))
    };
}

/// Declares, for each function `body(m: &UserManager)` named, a module of the same name with two
/// tests, `host` and `v257`, that boot a manager of each [`systemd::Manager`] kind and run the
/// function on it ([`systemd::UserManager::run`]: it skips, saying why, where that manager
/// cannot run). `cargo test -- ::v257` runs only the 257 half.
#[macro_export]
macro_rules! on_each_manager {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            fn run(kind: $crate::systemd::Manager) {
                $crate::systemd::UserManager::run(kind, stringify!($body), super::$body)
            }
            $crate::on_each_manager_kind!(@tests run);
        }
    )+};
}

/// Like [`on_each_manager!`], for functions `body(kind: Manager)` that boot their managers
/// themselves (the harness's own tests).
#[macro_export]
macro_rules! on_each_manager_kind {
    (@tests $run:ident) => {
        #[test]
        fn host() {
            $run($crate::systemd::Manager::Host)
        }
        #[test]
        fn v257() {
            $run($crate::systemd::Manager::V257)
        }
    };
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            use super::$body as run;
            $crate::on_each_manager_kind!(@tests run);
        }
    )+};
}

/// Writes `line` to the process's real stderr, which the test runner does not capture: it
/// shows in `cargo test` output for passing tests too.
pub fn announce(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether `CI` is set (and not `0`/`false`): then a test that cannot run is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
        .unwrap_or(false)
}

/// Says why the running test cannot run here (`SKIP <test>: <why>`, on the real stderr) and
/// returns false, for `if !have_it() { return }`; under CI, fails the test instead.
pub fn skip(why: &str) -> bool {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    assert!(!under_ci(), "{test} cannot run here (CI is set): {why}");
    announce(&format!("SKIP {test}: {why}"));
    false
}

/// Whether this process runs as root; says why not ([`skip`]).
pub fn root() -> bool {
    nix::unistd::geteuid().is_root() || skip("needs root")
}

/// Whether the program at `path` exists; says why not ([`skip`]).
pub fn have(path: &str, why: &str) -> bool {
    std::path::Path::new(path).exists() || skip(&format!("needs {path} ({why})"))
}

/// Polls `f` every 5 ms until it returns `Some`, at most `timeout`; panics naming `what`. For
/// states that have no event to wait on.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
