//! Run a command as a container with inherited output until it exits, its
//! time is up, or we are told to stop (`vmm-bench container`).

use crate::cgroup::{Leaf, cgroup2_root};
use crate::cleanup::stop_signals;
use crate::launch::Program;
use crate::namespaces::{self, Exec, Extra, Isolation, Mode};
use crate::pipe::pipe;
use crate::reap::{Reaper, exit_code};
use crate::settings::Settings;
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
    /// A real container (the command is looked up in its root, which holds
    /// busybox as /bin/busybox and /bin/sh) or a namespaced process on the
    /// host's file system (looked up on our PATH, our environment kept).
    pub mode: Mode,
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
    /// The isolation it had.
    pub settings: Settings,
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

/// The program and environment for `argv` in `mode`: inside a real
/// container a bare name is `/bin/NAME` of the container's root and the
/// environment is minimal; a namespaced process searches our PATH and
/// keeps our environment.
fn program_and_env(argv: &[String], mode: Mode) -> Result<(PathBuf, Vec<String>)> {
    let Some(prog) = argv.first() else {
        bail!("no command given: vmm-bench container [OPTIONS] -- COMMAND [ARGS...]");
    };
    Ok(match mode {
        Mode::Container => {
            if !Path::new(namespaces::BUSYBOX).is_file() {
                bail!(
                    "the container's root needs {} (Debian package busybox-static); or use --mode namespaced-process",
                    namespaces::BUSYBOX
                );
            }
            let exe = match prog.contains('/') {
                true => PathBuf::from(prog),
                false => Path::new("/bin").join(prog),
            };
            (exe, vec!["PATH=/bin".into(), "HOME=/".into()])
        }
        Mode::NamespacedProcess => {
            let env = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            (resolve(prog)?, env)
        }
    })
}

/// Run `argv` in new pid, mount, uts, ipc (opt. net) namespaces and a named
/// cgroup leaf, as a real container or a namespaced process (`opts.mode`).
/// SIGTERM, SIGINT and SIGHUP to this process kill the container; either
/// way the init is reaped and the leaf removed (if we created it) before
/// returning.
pub fn run_command(opts: &CommandOpts) -> Result<CommandEnd> {
    crate::need_root()?;
    let (exe, env) = program_and_env(&opts.argv, opts.mode)?;
    let (leaf_path, leaf) = open_leaf(&opts.cgroup)?;
    // Limits only on a leaf we made: an existing cgroup is someone else's.
    let limits = match (&leaf, opts.mode) {
        (Some(_), Mode::Container) => crate::limits::apply(&leaf_path),
        (None, Mode::Container) => Err("none: the cgroup existed already".into()),
        (_, Mode::NamespacedProcess) => Err("none".into()),
    };
    let cg_fd = std::fs::File::open(&leaf_path)
        .with_context(|| format!("cannot open cgroup {}", leaf_path.display()))?;
    let exec = Exec::new(&Program::Path(&exe), &opts.argv, &env)?;
    let iso = Isolation::new(&opts.hostname, opts.mode)?;
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (sr, sw, ew) = (sync_r.as_raw_fd(), sync_w.as_raw_fd(), err_w.as_raw_fd());
    let stops = BlockedStops::new();
    let child = move || -> isize {
        // SAFETY (whole closure): system calls on values prepared before
        // clone; any failure ends the child with a distinct status.
        unsafe {
            let ready = iso
                .unblock_signals()
                .and_then(|()| iso.wait_for_parent(sr, sw))
                .and_then(|()| iso.apply())
                .and_then(|()| iso.lock_down());
            if let Err(s) = ready {
                return namespaces::failed(ew, s);
            }
            namespaces::failed(ew, exec.exec())
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
    // SAFETY: one byte on our pipe releases the child.
    if unsafe { libc::write(sw, [1u8].as_ptr().cast(), 1) } != 1 {
        bail!("cannot release the container process");
    }
    drop((sync_r, sync_w, err_w));
    // Past a failed set-up the child has exited: reap it through the
    // reaper's drop, then report the step.
    namespaces::exec_outcome(&err_r, Instant::now() + Duration::from_secs(10))?;
    let mut end = CommandEnd {
        pid: reaper.release(),
        cgroup: Some(leaf_path.display().to_string()),
        exit_code: 0,
        stopped_by: None,
        timed_out: false,
        settings: Settings::ours(opts.mode, &limits),
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
