//! livehost's container path: run a program as a real container (new pid,
//! mount, uts, ipc and cgroup namespaces, its own read-only root entered by
//! pivot_root, its own /dev, masked /proc, read-only /sys, limits in its
//! cgroup v2 leaf, a reduced capability set, no_new_privs, seccomp), or as
//! a namespaced process sharing the host's file system
//! ([`Mode::NamespacedProcess`]), or run an OCI bundle through `runc`.
//!
//! - [`launch`]: start a program as a container and collect its output
//!   (what a benchmark wants: timed, output captured, torn down after).
//! - [`command`]: run a command as a container with inherited output until
//!   it exits or we are told to stop (`vmm-bench container`).
//! - [`runc`]: a generated busybox bundle and `runc run`.
//! - [`namespaces`]: clone3 into the cgroup and the child's set-up between
//!   clone and exec.
//! - [`cgroup`]: the v2 root, leaves that remove themselves, stale leaves.
//! - [`reap`]: owned children, waited for with a deadline.
//! - [`cleanup`]: what a stop signal must not leave behind.
//! - [`pipe`]: bounded reads of a child's output.
//! - [`sealed`]: executables and images kept in sealed memory files, never
//!   on a path another user could reach.

pub mod cgroup;
pub mod cleanup;
pub mod command;
pub mod launch;
pub mod limits;
pub mod namespaces;
pub mod pipe;
pub mod privileges;
pub mod reap;
pub mod rootfs;
pub mod runc;
pub mod sealed;
pub mod settings;

pub use cgroup::{cgroup2_root, remove_stale_leaves};
pub use cleanup::clean_up_on_stop_signals;
pub use command::{CommandEnd, CommandOpts, run_command};
pub use launch::{ContainerRun, Launch, Program};
pub use namespaces::Mode;
pub use reap::{Reaper, TimedOut};
pub use runc::{Bundle, RuncRun, find_runc, run_runc};
pub use sealed::SealedFile;
pub use settings::Settings;

use std::time::{Duration, Instant};

/// Longest deadline any run takes; larger arguments are clamped to it, so
/// a deadline never overflows the clock.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// `start + timeout`, never overflowing: timeouts beyond [`MAX_TIMEOUT`] are
/// clamped to it.
pub fn deadline(start: Instant, timeout: Duration) -> Instant {
    let t = timeout.min(MAX_TIMEOUT);
    start.checked_add(t).unwrap_or(start)
}

fn cstr(s: &str) -> anyhow::Result<std::ffi::CString> {
    use anyhow::Context;
    std::ffi::CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

/// Refuse to go on without root: namespaces, mounts and cgroups need it.
fn need_root() -> anyhow::Result<()> {
    if !livehost_common::is_root() {
        anyhow::bail!(
            "the container launcher needs root (namespaces, mounts, cgroups): rerun with sudo"
        );
    }
    Ok(())
}
