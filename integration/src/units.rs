//! The unit files shipped in `units/`, adjusted for a test (a port, a program, a drop-in) and
//! installed in a private manager ([`crate::systemd`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::process::alive;
use crate::systemd::{message, UserManager};

/// Where the shipped units expect the crate's `ExecReload=` command.
pub const SHIPPED_RELOAD_CMD: &str = "/usr/local/bin/handover-reload";

/// The repository's `units/` directory.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../units")
}

/// A unit file from `units/`.
pub fn repo_unit(name: &str) -> String {
    let path = repo_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Replaces the value of every (uncommented) `key=` line whose value is not empty (an empty one
/// resets a list in a drop-in); at least one must exist.
pub fn set_key(unit: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key}=");
    let mut found = false;
    let out = lines(
        unit.lines()
            .map(|l| match l.trim_start().strip_prefix(&prefix) {
                Some(v) if !v.trim().is_empty() => {
                    found = true;
                    format!("{prefix}{value}")
                }
                _ => l.to_owned(),
            }),
    );
    assert!(found, "no {key}= line in the unit:\n{unit}");
    out
}

/// The value of the last (uncommented) non-empty `key=` line.
pub fn get_key<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .rev()
        .filter_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
        .find(|v| !v.trim().is_empty())
}

/// `unit` without its (uncommented) `key=` lines for each of `keys`.
pub fn without_keys(unit: &str, keys: &[&str]) -> String {
    lines(
        unit.lines()
            .filter(|l| {
                !keys
                    .iter()
                    .any(|k| l.trim_start().starts_with(&format!("{k}=")))
            })
            .map(str::to_owned),
    )
}

fn lines(lines: impl Iterator<Item = String>) -> String {
    let mut out = lines.collect::<Vec<_>>().join("\n");
    out.push('\n');
    out
}

/// Installs `built` (the crate's `handover-reload`, built for the tests under a name of its
/// own) in `m`'s scratch directory under its real name, where the manager's services see it,
/// as a deploy installs it in `/usr/local/bin`: systemd names the command's journal entries
/// after it (`SYSLOG_IDENTIFIER=handover-reload`). Returns its path there.
pub fn install_reload_command(m: &UserManager, built: &Path) -> PathBuf {
    let dir = m.scratch_dir().join("bin");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("handover-reload");
    if !path.exists() {
        std::os::unix::fs::symlink(built, &path)
            .unwrap_or_else(|e| panic!("link {}: {e}", path.display()));
    }
    path
}

/// Points every `ExecReload=` line that runs the shipped `handover-reload` at `command`, keeping
/// its arguments; at least one must exist.
pub fn with_reload_command(unit: &str, command: &Path) -> String {
    let reload = get_key(unit, "ExecReload").expect("the unit has an ExecReload= line");
    let args = reload
        .strip_prefix(SHIPPED_RELOAD_CMD)
        .unwrap_or_else(|| panic!("ExecReload={reload} does not run {SHIPPED_RELOAD_CMD}"));
    set_key(unit, "ExecReload", &format!("{}{args}", command.display()))
}

/// The shipped `units/hello.socket`, listening on 127.0.0.1:`port`, and `units/<service>`
/// running `exec` (a command line) with its `handover-reload` the built one (`reload`, installed
/// in `m`): the shipped files otherwise unchanged.
pub fn hello_units(
    m: &UserManager,
    service: &str,
    exec: &str,
    port: u16,
    reload: &Path,
) -> (String, String) {
    let socket = set_key(
        &repo_unit("hello.socket"),
        "ListenStream",
        &format!("127.0.0.1:{port}"),
    );
    let command = install_reload_command(m, reload);
    let service = with_reload_command(&set_key(&repo_unit(service), "ExecStart", exec), &command);
    (socket, service)
}

/// Installs `socket` as `hello.socket`, `service` as `hello.service` and, when not empty,
/// `dropin` (lines of its `[Service]` section) as its drop-in `00-test.conf`; then
/// `daemon-reload`.
pub fn install_hello(m: &UserManager, socket: &str, service: &str, dropin: &str) {
    m.install_unit("hello.socket", socket);
    m.install_unit("hello.service", service);
    if !dropin.is_empty() {
        m.install_unit(
            "hello.service.d/00-test.conf",
            &format!("[Service]\n{dropin}\n"),
        );
    }
    m.daemon_reload();
}

/// What the manager knows about `hello.socket` and `hello.service`, for panic messages: their
/// status and the unit's journal.
pub fn hello_state(m: &UserManager) -> String {
    let status = m.systemctl(&["status", "-n", "0", "hello.socket", "hello.service"]);
    let journal: Vec<String> = m
        .unit_journal("hello.service")
        .iter()
        .map(|e| {
            let at = e.get("__MONOTONIC_TIMESTAMP").map_or("", String::as_str);
            let pid = e.get("_PID").map_or("", String::as_str);
            format!("{at} [{pid}] {}", message(e))
        })
        .collect();
    format!(
        "systemd {}:\n{}\nhello.service's journal:\n{}",
        m.version(),
        String::from_utf8_lossy(&status.stdout),
        journal.join("\n")
    )
}

/// `systemctl reload hello.service`: its output and how long it took.
pub fn systemctl_reload(m: &UserManager) -> (Output, Duration) {
    let t = Instant::now();
    let out = m.systemctl(&["reload", "hello.service"]);
    (out, t.elapsed())
}

/// `systemctl reload hello.service` that waits for the upgrade (a shipped unit, with its
/// `handover-reload`): it exits 0, and `MainPID` already names the new process, alive, when it
/// returns. Returns the new main pid and how long the command took.
pub fn reload_hello(m: &UserManager, old: u32) -> (u32, Duration) {
    let (out, took) = systemctl_reload(m);
    assert!(
        out.status.success(),
        "systemctl reload failed ({}): {}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        hello_state(m)
    );
    // No waiting: the very next look must see the new process.
    let new = m.main_pid("hello.service");
    assert!(
        new != 0 && new != old,
        "systemctl reload exited 0 with MainPID still {new} (was {old})"
    );
    assert!(alive(new), "the new main process {new} is not alive");
    (new, took)
}
