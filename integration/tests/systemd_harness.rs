//! Self-test of the private systemd user manager harness (`support::systemd`), on the host's
//! systemd and on systemd 257 from the trixie root, with a Python stand-in for a
//! socket-activated `Type=notify` service. Needs root and systemd installed; skips otherwise
//! (fails under `CI=true`).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use support::process::alive;
use support::systemd::{message, JournalEntry, Manager, UserManager};
use support::{have, on_each_manager_kind, TIMEOUT};

const PYTHON: &str = "/usr/bin/python3";

/// Reads its listener from fd 3 (`LISTEN_PID` must be its own pid), logs a line to stdout,
/// sends `READY=1` and answers every connection with `pong <pid> <greeting>`.
const STANDIN: &str = r#"
import os, socket
assert os.environ.get("LISTEN_PID") == str(os.getpid()), os.environ.get("LISTEN_PID")
assert os.environ.get("LISTEN_FDS") == "1", os.environ.get("LISTEN_FDS")
listener = socket.socket(fileno=3)
greeting = os.environ.get("STANDIN_GREETING", "none")
print(f"stand-in ready pid={os.getpid()} greeting={greeting}", flush=True)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n.sendto(b"READY=1\nSTATUS=serving", addr)
while True:
    c, _ = listener.accept()
    c.recv(64)
    c.sendall(f"pong {os.getpid()} {greeting}\n".encode())
    c.close()
"#;

/// Whether the stand-in can run: the host needs Python; the trixie root has it.
fn have_python(manager: Manager) -> bool {
    manager == Manager::V257 || have(PYTHON, "the stand-in service is a Python script")
}

/// Installs `standin.socket` (a Unix socket in the runtime dir) and `standin.service`.
fn install_standin(m: &UserManager) {
    let script = m.runtime_dir().join("standin.py");
    fs::write(&script, STANDIN).unwrap();
    m.install_unit("standin.socket", "[Socket]\nListenStream=%t/standin.sock\n");
    m.install_unit(
        "standin.service",
        &format!(
            "[Service]\nType=notify\nExecStart={PYTHON} {}\n",
            script.display()
        ),
    );
}

/// Connects to the stand-in's socket (activating it); returns its pid and greeting.
fn ping(m: &UserManager) -> (u32, String) {
    let mut s = UnixStream::connect(m.runtime_dir().join("standin.sock")).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let mut w = line.split_whitespace();
    assert_eq!(w.next(), Some("pong"), "reply {line:?}");
    (
        w.next().unwrap().parse().unwrap(),
        w.next().unwrap_or("").to_string(),
    )
}

fn message_starts(e: &JournalEntry, prefix: &str) -> bool {
    message(e).starts_with(prefix)
}

/// What must be gone once a manager was dropped.
struct Traces {
    dirs: Vec<PathBuf>,
    pids: Vec<u32>,
    runtime: PathBuf,
}

impl Traces {
    fn of(m: &UserManager, extra_pids: &[u32]) -> Traces {
        let mut pids = vec![m.manager_pid(), m.journald_pid()];
        pids.extend_from_slice(extra_pids);
        Traces {
            dirs: m.subtree_dirs(),
            pids,
            runtime: m.runtime_dir().to_owned(),
        }
    }

    fn assert_gone(&self) {
        for d in &self.dirs {
            assert!(!d.exists(), "{} survived teardown", d.display());
        }
        for &p in &self.pids {
            assert!(!alive(p), "pid {p} survived teardown");
        }
        assert!(
            !self.runtime.exists(),
            "{} survived teardown",
            self.runtime.display()
        );
    }
}

on_each_manager_kind!(
    boots_runs_a_notify_service_and_tears_down,
    two_managers_run_side_by_side,
    teardown_runs_when_the_test_panics,
);

/// This process's cgroup in the memory hierarchy (v1), if it has one.
fn own_memory_cgroup(pid: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
}

fn boots_runs_a_notify_service_and_tears_down(manager: Manager) {
    if !have_python(manager) {
        return;
    }
    let t0 = Instant::now();
    let Some(m) = UserManager::boot_or_skip(manager, "selftest") else {
        return;
    };
    eprintln!("boot of systemd {}: {:?}", m.version(), t0.elapsed());
    assert!(alive(m.manager_pid()) && alive(m.journald_pid()));
    assert!(matches!(
        m.show("", "SystemState").as_str(),
        "running" | "degraded"
    ));
    match manager {
        Manager::Host => assert!(m.major() >= 246, "{}", m.version()),
        Manager::V257 => assert_eq!(m.major(), 257, "{}", m.version()),
    }
    assert!(m.cgroup_path().len() > 1);
    assert!(m.owns_process(m.manager_pid()) && m.owns_process(m.journald_pid()));

    install_standin(&m);
    m.install_unit(
        "standin.service.d/greeting.conf",
        "[Service]\nEnvironment=STANDIN_GREETING=dropin\n",
    );
    m.daemon_reload();
    m.systemctl_ok(&["start", "standin.socket"]);
    assert_eq!(m.show("standin.socket", "ActiveState"), "active");

    let (pid, greeting) = ping(&m); // socket activation
    assert_eq!(greeting, "dropin", "the drop-in is applied");
    m.wait_until("standin.service to be active", TIMEOUT, || {
        m.show("standin.service", "ActiveState") == "active"
    });
    assert_eq!(m.main_pid("standin.service"), pid);
    assert_eq!(m.show("standin.service", "StatusText"), "serving");

    // The service runs in the manager's subtree, in every hierarchy the harness set up, in its
    // unit's cgroup in the hierarchy the manager tracks units in ...
    let unit_cg = m.unit_cgroup("standin.service");
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(m.owns_process(pid), "{cg}");
    assert!(
        cg.lines().any(|l| l.ends_with(&format!(":{unit_cg}"))),
        "{unit_cg} not in\n{cg}"
    );
    // ... and never outside the memory cgroup the test has (its accounting).
    if let Some(own_mem) = own_memory_cgroup("self") {
        let svc_mem = own_memory_cgroup(&pid.to_string()).unwrap();
        assert!(
            svc_mem == own_mem
                || svc_mem.starts_with(&format!("{}/", own_mem.trim_end_matches('/'))),
            "the service's memory cgroup {svc_mem} is outside the test's {own_mem}"
        );
    }

    // Its stdout line is in the private journal with its own _PID.
    let e = m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
        message_starts(e, "stand-in ready")
    });
    assert_eq!(e.get("_SYSTEMD_CGROUP"), Some(&unit_cg));
    assert_eq!(e.get("_TRANSPORT").map(String::as_str), Some("stdout"));
    if m.tags_user_units() {
        // journald knows the unit: `journalctl --user -u` works as on a real host.
        assert_eq!(
            e.get("_SYSTEMD_USER_UNIT").map(String::as_str),
            Some("standin.service"),
            "{e:?}"
        );
        let by_unit = m.journal_entries(&["--user", "-u", "standin.service"]);
        assert!(
            by_unit.iter().any(|e| message_starts(e, "stand-in ready")),
            "journalctl --user -u standin.service: {by_unit:?}"
        );
    }
    let unit_log = m.unit_journal("standin.service");
    assert!(unit_log.iter().any(|e| message_starts(e, "stand-in ready")));
    let manager_pid = m.manager_pid().to_string();
    assert!(
        unit_log
            .iter()
            .any(|e| e.get("_PID") == Some(&manager_pid) && message_starts(e, "Started")),
        "the manager's own messages reach the journal: {unit_log:?}"
    );
    assert!(m
        .journal(&["-o", "cat", &format!("_PID={pid}")])
        .contains("greeting=dropin"));
    // The private journald leaves the host alone: it did not import the kernel log.
    assert!(m.journal_entries(&["_TRANSPORT=kernel"]).is_empty());
    if manager == Manager::V257 {
        // ... and did not switch kernel auditing on (257 defaults to Audit=yes).
        let out = m
            .command("systemd-analyze")
            .args(["cat-config", "systemd/journald.conf"])
            .output()
            .unwrap();
        let config = String::from_utf8_lossy(&out.stdout);
        for line in ["Audit=", "ReadKMsg=no", "Storage=volatile"] {
            assert!(
                config.lines().any(|l| l.trim() == line),
                "journald.conf has no {line}:\n{config}"
            );
        }
    }

    let t = Instant::now();
    m.systemctl_ok(&["stop", "standin.service", "standin.socket"]);
    assert_eq!(m.show("standin.service", "ActiveState"), "inactive");
    m.wait_until("the stand-in to exit", TIMEOUT, || !alive(pid));
    eprintln!("stop: {:?}", t.elapsed());

    let traces = Traces::of(&m, &[pid]);
    let t = Instant::now();
    drop(m);
    eprintln!("teardown: {:?}", t.elapsed());
    traces.assert_gone();
}

/// Two managers of this kind at once, and one of the other kind beside them.
fn two_managers_run_side_by_side(manager: Manager) {
    if !have_python(manager) {
        return;
    }
    let other = match manager {
        Manager::Host => Manager::V257,
        Manager::V257 => Manager::Host,
    };
    let (a, b, c) = std::thread::scope(|s| {
        let a = s.spawn(|| UserManager::boot_or_skip(manager, "pair_a"));
        let b = s.spawn(|| UserManager::boot_or_skip(manager, "pair_b"));
        let c = s.spawn(|| {
            have_python(other)
                .then(|| UserManager::boot_or_skip(other, "pair_c"))
                .flatten()
        });
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    let (Some(a), Some(b)) = (a, b) else { return };
    let all: Vec<&UserManager> = [Some(&a), Some(&b), c.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    for (i, x) in all.iter().enumerate() {
        for y in &all[i + 1..] {
            assert_ne!(x.cgroup_path(), y.cgroup_path());
            assert_ne!(x.runtime_dir(), y.runtime_dir());
            assert_ne!(x.manager_pid(), y.manager_pid());
        }
    }

    for m in &all {
        install_standin(m);
        m.daemon_reload();
        m.systemctl_ok(&["start", "standin.socket"]);
    }
    let pids: Vec<u32> = all.iter().map(|m| ping(m).0).collect();
    for (m, &pid) in all.iter().zip(&pids) {
        m.wait_until("standin.service to be active", TIMEOUT, || {
            m.show("standin.service", "ActiveState") == "active"
        });
        assert_eq!(m.main_pid("standin.service"), pid);
        m.wait_for_journal(&[&format!("_PID={pid}")], TIMEOUT, |e| {
            message_starts(e, "stand-in ready")
        });
    }
    // Each journal is private.
    for (i, m) in all.iter().enumerate() {
        for (j, &pid) in pids.iter().enumerate() {
            if i != j {
                assert!(m.journal_entries(&[&format!("_PID={pid}")]).is_empty());
            }
        }
    }

    // Leave the services running: teardown must kill them. Tear down concurrently.
    let traces: Vec<Traces> = all
        .iter()
        .zip(&pids)
        .map(|(m, &p)| Traces::of(m, &[p]))
        .collect();
    drop(all);
    std::thread::scope(|s| {
        s.spawn(move || drop(a));
        s.spawn(move || drop(b));
        s.spawn(move || drop(c));
    });
    for t in &traces {
        t.assert_gone();
    }
}

fn teardown_runs_when_the_test_panics(manager: Manager) {
    if !have_python(manager) {
        return;
    }
    let traces = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let Some(m) = UserManager::boot_or_skip(manager, "panics") else {
            return;
        };
        install_standin(&m);
        m.daemon_reload();
        m.systemctl_ok(&["start", "standin.socket"]);
        let (pid, _) = ping(&m);
        *traces.lock().unwrap() = Some(Traces::of(&m, &[pid]));
        panic!("deliberate panic (expected) with a running manager and service");
    });
    let Some(traces) = traces.into_inner().unwrap() else {
        return;
    }; // skipped
    assert!(result.is_err());
    traces.assert_gone();
}
