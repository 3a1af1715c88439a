//! What one generation of a service says to the next, and what a reload
//! command says to the service, encoded and decoded here only: the
//! environment a new process starts with ([`env`](mod@env): systemd's
//! `LISTEN_*` and the crate's `HANDOVER_*`), the lines on the handoff
//! channel between the two ([`channel`]), and the requests and replies on
//! the control socket ([`control`]). Each file starts with its table.
//!
//! One upgrade, in order (the old process is the service's main one; the
//! notify messages are [`crate::notify`]'s):
//!
//! | step | old process | new process |
//! |---|---|---|
//! | 1 | starts the new one: listeners at fds `3..3+n`, the channel at `3+n`, the [`env`](mod@env) variables | |
//! | 2 | writes the state (if any) on the channel | reads it in `build()`, before anything else |
//! | 3 | | `ready` |
//! | 4 | `MAINPID=<new>` + `READY=1`, `BARRIER=1`; then `main` | |
//! | 5 | | writes the PID file, serves, accepts upgrades; `serving` |
//! | 6 | on `serving` (or 1 s without it): drains, keeping the channel open | |
//! | 7 | run by hand: takes the service back if the new one exits without `upgraded <pid>` or `stopping` | |
//!
//! A new process that fails says `fail <reason>` instead of `ready`; one
//! that could not even execute says `spawn <errno>` or `exec <errno>`.

pub(crate) mod channel;
pub(crate) mod control;
pub(crate) mod env;

/// `text` on one line: control characters (a newline would start another
/// line, or another assignment) become spaces. For every line-based
/// protocol of the crate: the handoff channel, the control socket, and
/// `STATUS=` in notify messages.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_has_no_control_characters() {
        assert_eq!(super::one_line("x\r\ny\tz"), "x  y z");
    }
}
