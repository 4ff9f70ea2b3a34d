//! Run a command as a container with inherited output until it exits, its
//! time is up, or we are told to stop (`vmm-bench container`).

use crate::cgroup::{Leaf, cgroup2_root};
use crate::cleanup::stop_signals;
use crate::launch::Program;
use crate::namespaces::{self, Exec, Extra, Isolation};
use crate::reap::{Reaper, exit_code};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options for running an arbitrary command as a container: output is
/// inherited, not captured.
#[derive(Debug, Clone)]
pub struct CommandOpts {
    pub argv: Vec<String>,
    pub hostname: String,
    /// Name of the cgroup leaf under the v2 root; created if absent and
    /// removed afterwards if we created it.
    pub cgroup: String,
    pub net: bool,
    /// None: run until the command exits or we get SIGTERM/SIGINT/SIGHUP.
    pub timeout: Option<Duration>,
}

/// How a command container ended.
#[derive(Debug, Clone, Serialize)]
pub struct CommandEnd {
    pub pid: i32,
    pub cgroup: Option<String>,
    /// Exit status, 128+signal when killed.
    pub exit_code: i32,
    /// The signal we received and answered by killing the container.
    pub stopped_by: Option<i32>,
    pub timed_out: bool,
}

fn resolve(cmd: &str) -> Result<PathBuf> {
    if cmd.contains('/') {
        return Ok(PathBuf::from(cmd));
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            p.to_str()?
                .split(':')
                .map(|d| Path::new(d).join(cmd))
                .find(|p| p.is_file())
        })
        .with_context(|| format!("{cmd} not found on PATH"))
}

/// The named leaf: created (and then removed when the returned guard
/// drops) unless it already exists.
fn open_leaf(name: &str) -> Result<(PathBuf, Option<Leaf>)> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("cgroup name {name:?} must be one path component");
    }
    let root = cgroup2_root().context("this host has no cgroup v2 hierarchy mounted")?;
    let path = root.join(name);
    let created = match std::fs::create_dir(&path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create cgroup {}", path.display()));
        }
    };
    let leaf = created.then(|| Leaf::adopt(path.clone()));
    Ok((path, leaf))
}

/// The stop signals blocked in this thread while the container runs, so
/// they wait for us in `sigtimedwait`; the old mask is restored on drop.
struct BlockedStops {
    set: libc::sigset_t,
    old: libc::sigset_t,
}

impl BlockedStops {
    fn new() -> BlockedStops {
        let set = stop_signals();
        // SAFETY: an all-zero sigset is valid; pthread_sigmask fills it.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: changing this thread's mask; restored in Drop.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
        BlockedStops { set, old }
    }

    /// A stop signal, if one arrives within 50 ms.
    fn wait(&self) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        // SAFETY: waiting for one of the blocked stop signals.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }
}

impl Drop for BlockedStops {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved in new().
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Run `argv` in new pid, mount, uts, ipc (opt. net) namespaces and a named
/// cgroup leaf, with a private /proc and our environment. SIGTERM, SIGINT
/// and SIGHUP to this process kill the container; either way the init is
/// reaped and the leaf removed (if we created it) before returning.
pub fn run_command(opts: &CommandOpts) -> Result<CommandEnd> {
    crate::need_root()?;
    let Some(prog) = opts.argv.first() else {
        bail!("no command given: vmm-bench container [OPTIONS] -- COMMAND [ARGS...]");
    };
    let exe = resolve(prog)?;
    let (leaf_path, leaf) = open_leaf(&opts.cgroup)?;
    let cg_fd = std::fs::File::open(&leaf_path)
        .with_context(|| format!("cannot open cgroup {}", leaf_path.display()))?;
    let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    let exec = Exec::new(&Program::Path(&exe), &opts.argv, &env)?;
    let iso = Isolation::new(&opts.hostname)?;
    let stops = BlockedStops::new();
    let child = move || -> isize {
        // SAFETY (whole closure): system calls on values prepared before
        // clone; any failure ends the child with a distinct status.
        unsafe {
            if let Err(s) = iso.unblock_signals().and_then(|()| iso.apply()) {
                return s;
            }
            exec.exec()
        }
    };
    let flags = namespaces::clone_flags(Extra {
        net: opts.net,
        user: false,
    });
    let (pid, placed) = namespaces::spawn_child(flags, Some(cg_fd.as_raw_fd()), child)?;
    let reaper = Reaper::new(pid);
    if !placed {
        std::fs::write(leaf_path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move the container into {}", leaf_path.display()))?;
    }
    let mut end = CommandEnd {
        pid: reaper.release(),
        cgroup: Some(leaf_path.display().to_string()),
        exit_code: 0,
        stopped_by: None,
        timed_out: false,
    };
    wait_or_stop(&mut end, &stops, opts.timeout);
    drop(cg_fd);
    drop(leaf);
    Ok(end)
}

/// Wait for the container's init; kill it (and so its whole pid
/// namespace) on a stop signal or when its time is up.
fn wait_or_stop(end: &mut CommandEnd, stops: &BlockedStops, timeout: Option<Duration>) {
    let start = Instant::now();
    let pid = end.pid;
    loop {
        let mut status = 0;
        // SAFETY: polling our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            end.exit_code = exit_code(status);
            return;
        }
        let sig = stops.wait();
        let over = timeout.is_some_and(|t| start.elapsed() >= t);
        if sig.is_some() || over {
            end.stopped_by = sig;
            end.timed_out = over && sig.is_none();
            // SAFETY: our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            end.exit_code = livehost_common::exit::signaled(sig.unwrap_or(libc::SIGKILL));
            return;
        }
    }
}
