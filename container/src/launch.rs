//! Start a program as a container, collect its output and tear everything
//! down: what a benchmark needs (timed, output captured, nothing left).

use crate::cgroup::{Leaf, cgroup2_root};
use crate::namespaces::{self, Exec, Extra, Isolation, Mode};
use crate::pipe::{pipe, read_until};
use crate::reap::Reaper;
use crate::sealed::SealedFile;
use crate::settings::Settings;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The program a container runs.
#[derive(Debug, Clone, Copy)]
pub enum Program<'a> {
    /// A file on the host's filesystem.
    Path(&'a Path),
    /// A sealed memory file, executed without any path.
    Sealed(&'a SealedFile),
}

impl Program<'_> {
    fn argv0(&self) -> String {
        match self {
            Program::Path(p) => p.to_string_lossy().into_owned(),
            Program::Sealed(f) => f.name().to_string(),
        }
    }
}

/// One container run of `program`.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub program: Program<'a>,
    /// Arguments after argv[0].
    pub args: Vec<String>,
    pub hostname: String,
    /// Also net and user namespaces (user maps root to root).
    pub extra: Extra,
    pub timeout: Duration,
    /// The cgroup leaf is `PREFIX-PID-SEQ` under the v2 root (see
    /// [`crate::remove_stale_leaves`]).
    pub leaf_prefix: &'a str,
    /// A real container, or a namespaced process on the host's file system.
    pub mode: Mode,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerRun {
    /// The container's init as the host sees it (reaped by the time you read this).
    pub pid: i32,
    pub stdout: String,
    pub exit_code: i32,
    /// Host clock: namespaces + cgroup set up and the child released (its
    /// own set-up, the mounts, and exec still ahead).
    pub setup_us: f64,
    /// CLOCK_MONOTONIC at launch, in ns: a workload that prints its own
    /// start time on that clock gives the true launch-to-exec time.
    pub launch_mono_ns: u64,
    /// Launch to the workload's exit (output collected), host clock.
    pub total_us: f64,
    pub cgroup: Option<String>,
    pub max_rss_bytes: u64,
    /// The isolation this run had.
    pub settings: Settings,
}

/// Run the program in new pid, mount, uts and ipc namespaces (optionally
/// net and user) inside its own cgroup leaf, with no environment, as a real
/// container or a namespaced process (`l.mode`). Everything is torn down
/// before returning, also on timeout (the error is then [`crate::TimedOut`]).
pub fn run(l: &Launch) -> Result<ContainerRun> {
    crate::need_root()?;
    if l.mode == Mode::Container && l.extra.user {
        bail!("a user namespace is only offered in the namespaced-process mode");
    }
    let launch_mono_ns = livehost_common::monotonic_ns();
    let launch = Instant::now();
    let cg = match cgroup2_root() {
        Some(root) => Some(
            Leaf::create_numbered(&root, l.leaf_prefix)
                .with_context(|| format!("cannot create a cgroup under {}", root.display()))?,
        ),
        None => None,
    };
    let limits = match (&cg, l.mode) {
        (Some(c), Mode::Container) => crate::limits::apply(c.path()),
        (None, _) => Err("none: no cgroup v2 hierarchy".into()),
        (Some(_), Mode::NamespacedProcess) => Err("none".into()),
    };
    let mut argv = vec![l.program.argv0()];
    argv.extend(l.args.iter().cloned());
    let exec = Exec::new(&l.program, &argv, &[])?;
    let iso = Isolation::new(&l.hostname, l.mode)?;
    let (sync_r, sync_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (sr, sw, ow) = (sync_r.as_raw_fd(), sync_w.as_raw_fd(), out_w.as_raw_fd());
    let ew = err_w.as_raw_fd();
    let child = move || -> isize {
        // SAFETY (whole closure): plain system calls on descriptors and
        // strings prepared before clone; any failure ends the child.
        unsafe {
            let ready = iso
                .unblock_signals()
                .and_then(|()| iso.wait_for_parent(sr, sw))
                .and_then(|()| iso.apply());
            let ready = ready
                .and_then(|()| match libc::dup2(ow, 1) {
                    r if r < 0 => Err(namespaces::status::STDOUT),
                    _ => Ok(()),
                })
                .and_then(|()| iso.lock_down());
            if let Err(s) = ready {
                return namespaces::failed(ew, s);
            }
            namespaces::failed(ew, exec.exec())
        }
    };
    let cg_fd = match &cg {
        Some(c) => Some(
            std::fs::File::open(c.path())
                .with_context(|| format!("cannot open cgroup {}", c.path().display()))?,
        ),
        None => None,
    };
    let flags = namespaces::clone_flags(l.extra);
    let (pid, placed) =
        namespaces::spawn_child(flags, cg_fd.as_ref().map(|f| f.as_raw_fd()), child)?;
    drop((out_w, err_w));
    // From here on the child must be reaped whatever happens.
    let reaper = Reaper::new(pid);
    let leaf = cg.as_ref().filter(|_| !placed).map(|c| c.path());
    release(pid, l.extra.user, leaf, sync_w)?;
    drop(sync_r);
    let setup_us = launch.elapsed().as_secs_f64() * 1e6;
    let deadline = crate::deadline(launch, l.timeout);
    namespaces::exec_outcome(&err_r, deadline)?;
    let stdout = read_until(out_r, deadline);
    let (code, rss) = reaper.wait(deadline)?;
    let total_us = launch.elapsed().as_secs_f64() * 1e6;
    Ok(ContainerRun {
        pid,
        stdout: stdout?,
        exit_code: code,
        setup_us,
        launch_mono_ns,
        total_us,
        cgroup: cg.as_ref().map(|c| c.path().display().to_string()),
        max_rss_bytes: rss,
        settings: Settings::ours(l.mode, &limits),
    })
}

/// The parent's half of the set-up: map root to root in a new user
/// namespace, move the child into its leaf when clone3 could not place it
/// there, then release it with one byte on the sync pipe.
fn release(pid: i32, user: bool, leaf: Option<&Path>, sync_w: OwnedFd) -> Result<()> {
    if user {
        std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
        std::fs::write(format!("/proc/{pid}/uid_map"), "0 0 1\n")?;
        std::fs::write(format!("/proc/{pid}/gid_map"), "0 0 1\n")?;
    }
    if let Some(leaf) = leaf {
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move the container into {}", leaf.display()))?;
    }
    // SAFETY: writing one byte to our pipe releases the child.
    if unsafe { libc::write(sync_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
        bail!("cannot release the container process");
    }
    Ok(())
}
