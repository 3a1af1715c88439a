//! Every `unsafe` block of the crate lives here, one file per job:
//!
//! | file | job |
//! |---|---|
//! | `fd.rs` | inspecting and taking ownership of raw fds (inherited, received, just created); registering them with tokio's reactor |
//! | `spawn.rs` | starting a new process: the image prepared before the clone, `clone(CLONE_VM \| CLONE_VFORK)` on a stack of its own |
//! | `exec.rs` | the child's side between the clone and `execve`: async-signal-safe only |
//! | `pidfd.rs` | watching, signalling and reaping a child through its pidfd |
//! | `signal.rs` | the signal mask around the clone; signalfd registration |
//! | `memory.rs` | a hint for a large buffer about to be filled (huge pages) |
//!
//! Each function is small and carries a `// SAFETY:` note on every
//! `unsafe` block (`clippy::undocumented_unsafe_blocks` is denied crate-wide),
//! and an `unsafe fn` is no licence for unsafe calls in its body: each one
//! needs a block and a note of its own (`unsafe_op_in_unsafe_fn`). The rest
//! of the crate calls these as safe functions.

#![deny(unsafe_op_in_unsafe_fn)]

mod exec;
mod fd;
mod memory;
mod pidfd;
mod signal;
mod spawn;

pub(crate) use fd::{
    async_readable, dup_onto, fd_is_cloexec, fd_is_open, fd_is_socket, hung_up, own,
    take_inherited, take_received_fds, with_borrowed,
};
pub(crate) use memory::{page_size, prefer_huge_pages};
pub(crate) use pidfd::{kill_and_wait, kill_pid, pidfd_open, pidfd_signal, reap, reap_pid};
pub(crate) use signal::{async_signalfd, children_reaped_by_kernel};
pub(crate) use spawn::{spawn, spawn_reporting, ExecImage, Started};
