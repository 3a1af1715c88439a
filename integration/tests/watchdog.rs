//! `WATCHDOG=1` and `EXTEND_TIMEOUT_USEC=` against a notify socket the test owns: each
//! message's sender is read from `SCM_CREDENTIALS`, so the test sees the first process ping,
//! then the new one once it was handed over.

use nix::sys::signal::Signal;

use support::notify::NotifySocket;
use support::process::{signal, terminate};
use support::server::Server;
use support::{program, TIMEOUT};

#[test]
fn watchdog_pings_move_to_the_new_process() {
    let notify = NotifySocket::bind();
    let envs = [
        ("NOTIFY_SOCKET", notify.path()),
        ("WATCHDOG_USEC", "100000"),
    ];
    let mut server = Server::start(program!("hello"), &[], &envs);
    let first = server.child.id();

    let d = notify.recv();
    assert_eq!(
        (d.sender, d.text.lines().next()),
        (first, Some("READY=1")),
        "{d:?}"
    );
    let d = notify.recv();
    assert_eq!((d.sender, d.text.as_str()), (first, "WATCHDOG=1"));

    signal(first, Signal::SIGHUP);
    let mut new = 0;
    let mut handed_over = false;
    let end = std::time::Instant::now() + TIMEOUT;
    loop {
        assert!(
            std::time::Instant::now() < end,
            "no WATCHDOG=1 from the new process"
        );
        let d = notify.recv();
        if d.text.starts_with("RELOADING=1") {
            assert!(d.text.contains("\nEXTEND_TIMEOUT_USEC="), "{d:?}");
        } else if let Some(rest) = d.text.strip_prefix("MAINPID=") {
            new = rest.lines().next().unwrap().parse().unwrap();
        } else if d.text == "BARRIER=1" {
            assert_eq!(d.nfds, 1, "BARRIER=1 carries exactly one fd");
            handed_over = true;
        } else if d.text == "WATCHDOG=1" && d.sender == new {
            assert!(handed_over, "the new process pinged before it was main");
            break;
        }
    }
    assert_eq!(server.exit_code(), 0, "the old process exits 0");
    // The new process is a child of ours (CLONE_PARENT: our child's parent).
    assert_eq!(terminate(new), 0);
}
