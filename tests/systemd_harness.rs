//! Self-test of the private systemd user manager harness (`tests/support/systemd.rs`), with a
//! Python stand-in for a socket-activated `Type=notify` service. Needs root and systemd
//! installed; skips otherwise (fails under `CI=true`).

#[path = "support/systemd.rs"]
mod systemd;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use systemd::{parse_journal_export, pid_alive, UserManager};

const PYTHON: &str = "/usr/bin/python3";
const WAIT: Duration = Duration::from_secs(10);

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

fn have_python() -> bool {
    if Path::new(PYTHON).exists() {
        return true;
    }
    eprintln!(
        "SKIP {}: {PYTHON} not found",
        std::thread::current().name().unwrap_or("?")
    );
    false
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
    s.set_read_timeout(Some(WAIT)).unwrap();
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

fn message_starts(e: &systemd::JournalEntry, prefix: &str) -> bool {
    e.get("MESSAGE").is_some_and(|m| m.starts_with(prefix))
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
            assert!(!pid_alive(p), "pid {p} survived teardown");
        }
        assert!(
            !self.runtime.exists(),
            "{} survived teardown",
            self.runtime.display()
        );
    }
}

#[test]
fn boots_runs_a_notify_service_and_tears_down() {
    if !have_python() {
        return;
    }
    let t0 = Instant::now();
    let Some(m) = UserManager::boot_or_skip("selftest") else {
        return;
    };
    eprintln!("boot: {:?}", t0.elapsed());
    assert!(pid_alive(m.manager_pid()) && pid_alive(m.journald_pid()));
    assert!(matches!(
        m.show("", "SystemState").as_str(),
        "running" | "degraded"
    ));

    // Nested under this process's memory cgroup, never in a root cgroup.
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let own_mem = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    if let Some(own_mem) = own_mem {
        assert!(m
            .cgroup_path()
            .starts_with(&format!("{}/", own_mem.trim_end_matches('/'))));
    }
    assert!(m.cgroup_path().len() > 1);

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
    m.wait_until("standin.service to be active", WAIT, || {
        m.show("standin.service", "ActiveState") == "active"
    });
    assert_eq!(m.main_pid("standin.service"), pid);
    assert_eq!(m.show("standin.service", "StatusText"), "serving");

    // The service runs in the manager's subtree, in every hierarchy the harness set up.
    let unit_cg = format!("{}/manager/app.slice/standin.service", m.cgroup_path());
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cg.lines() {
        let (_, rest) = line.split_once(':').unwrap();
        let (ctrl, path) = rest.split_once(':').unwrap();
        if ctrl.is_empty() || ctrl == "name=systemd" {
            assert_eq!(path, unit_cg, "{line}");
        } else if ctrl == "memory" || ctrl == "pids" {
            assert!(path.starts_with(m.cgroup_path()), "{line}");
        }
    }

    // Its stdout line is in the private journal with its own _PID.
    let e = m.wait_for_journal(&[&format!("_PID={pid}")], WAIT, |e| {
        message_starts(e, "stand-in ready")
    });
    assert_eq!(e.get("_SYSTEMD_CGROUP"), Some(&unit_cg));
    assert_eq!(e.get("_TRANSPORT").map(String::as_str), Some("stdout"));
    let unit_log = m.unit_journal("standin.service");
    assert!(unit_log.iter().any(|e| message_starts(e, "stand-in ready")));
    let manager = m.manager_pid().to_string();
    assert!(
        unit_log
            .iter()
            .any(|e| e.get("_PID") == Some(&manager) && message_starts(e, "Started")),
        "the manager's own messages reach the journal: {unit_log:?}"
    );
    assert!(m
        .journal(&["-o", "cat", &format!("_PID={pid}")])
        .contains("greeting=dropin"));

    let t = Instant::now();
    m.systemctl_ok(&["stop", "standin.service", "standin.socket"]);
    assert_eq!(m.show("standin.service", "ActiveState"), "inactive");
    m.wait_until("the stand-in to exit", WAIT, || !pid_alive(pid));
    eprintln!("stop: {:?}", t.elapsed());

    let traces = Traces::of(&m, &[pid]);
    let t = Instant::now();
    drop(m);
    eprintln!("teardown: {:?}", t.elapsed());
    traces.assert_gone();
}

#[test]
fn two_managers_run_side_by_side() {
    if !have_python() {
        return;
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| UserManager::boot_or_skip("pair_a"));
        let b = s.spawn(|| UserManager::boot_or_skip("pair_b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (Some(a), Some(b)) = (a, b) else { return };
    assert_ne!(a.cgroup_path(), b.cgroup_path());
    assert_ne!(a.runtime_dir(), b.runtime_dir());
    assert_ne!(a.manager_pid(), b.manager_pid());

    for m in [&a, &b] {
        install_standin(m);
        m.daemon_reload();
        m.systemctl_ok(&["start", "standin.socket"]);
    }
    let (pa, _) = ping(&a);
    let (pb, _) = ping(&b);
    assert_ne!(pa, pb);
    for (m, pid) in [(&a, pa), (&b, pb)] {
        m.wait_until("standin.service to be active", WAIT, || {
            m.show("standin.service", "ActiveState") == "active"
        });
        assert_eq!(m.main_pid("standin.service"), pid);
        m.wait_for_journal(&[&format!("_PID={pid}")], WAIT, |e| {
            message_starts(e, "stand-in ready")
        });
    }
    // Each journal is private.
    assert!(a.journal_entries(&[&format!("_PID={pb}")]).is_empty());
    assert!(b.journal_entries(&[&format!("_PID={pa}")]).is_empty());

    // Leave the services running: teardown must kill them. Tear down concurrently.
    let traces = [Traces::of(&a, &[pa]), Traces::of(&b, &[pb])];
    std::thread::scope(|s| {
        s.spawn(move || drop(a));
        s.spawn(move || drop(b));
    });
    for t in &traces {
        t.assert_gone();
    }
}

#[test]
fn teardown_runs_when_the_test_panics() {
    if !have_python() {
        return;
    }
    let traces = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let Some(m) = UserManager::boot_or_skip("panics") else {
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

#[test]
fn export_format_parser() {
    let mut data = b"__CURSOR=c1\nMESSAGE=hello\n_PID=42\n".to_vec();
    data.extend_from_slice(b"BIN\n");
    data.extend_from_slice(&7u64.to_le_bytes());
    data.extend_from_slice(b"a\nb=c\0d\n");
    data.extend_from_slice(b"AFTER=x\n\n__CURSOR=c2\nMESSAGE=multi=equals\n\n");
    let e = parse_journal_export(&data);
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["MESSAGE"], "hello");
    assert_eq!(e[0]["_PID"], "42");
    assert_eq!(e[0]["BIN"], "a\nb=c\0d");
    assert_eq!(e[0]["AFTER"], "x");
    assert_eq!(e[1]["MESSAGE"], "multi=equals");
    assert!(parse_journal_export(b"").is_empty());
}
