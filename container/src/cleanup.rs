//! What this process has running that a stop signal must not leave behind
//! (children, cgroup leaves, runc containers), and the thread that cleans
//! it all up when SIGTERM, SIGINT or SIGHUP arrives.

use crate::cgroup::remove_leaf;
use crate::runc::RuncLive;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The registry: every entry is added and removed under its lock.
pub(crate) struct Live {
    pub(crate) leaves: Vec<PathBuf>,
    pub(crate) pids: Vec<i32>,
    /// runc containers: killing `runc run` leaves its container running
    /// (runc's init is not our child), so each is deleted through runc.
    pub(crate) runc: Vec<RuncLive>,
}

pub(crate) fn live() -> std::sync::MutexGuard<'static, Live> {
    static LIVE: std::sync::Mutex<Live> = std::sync::Mutex::new(Live {
        leaves: Vec::new(),
        pids: Vec::new(),
        runc: Vec::new(),
    });
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// SIGTERM, SIGINT and SIGHUP as a signal set.
pub(crate) fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// The empty signal set, for a child's mask before exec.
pub(crate) fn no_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut e: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut e);
        e
    }
}

/// Make SIGTERM, SIGINT and SIGHUP end this process cleanly: every child
/// it owns is killed (container inits, QEMU, runc, a native workload),
/// every runc container it started is deleted with its bundle, every
/// cgroup leaf it created is emptied and removed, then it exits with
/// 128 + the signal after a line on stderr starting with `tool`. Call it
/// from the main thread before any other thread starts (they inherit the
/// blocked mask; one thread waits for the signals).
pub fn clean_up_on_stop_signals(tool: &'static str) -> Result<()> {
    let set = stop_signals();
    // SAFETY: blocking those signals in this thread (and so in every thread
    // it starts later).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waiting for one of the signals blocked above.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            let left = clean_up_now();
            eprintln!(
                "{tool}: stopped by signal {sig}; children killed, {}",
                if left.is_empty() {
                    "cgroup leaves removed".to_string()
                } else {
                    format!("could not remove {left:?}")
                }
            );
            std::process::exit(livehost_common::exit::signaled(sig));
        })
        .context("cannot start the stop-signal thread")?;
    Ok(())
}

/// Kill what we own and remove our leaves; returns the leaves that stayed.
/// Keeps the registry locked until the process exits, so nothing new is
/// started meanwhile.
fn clean_up_now() -> Vec<PathBuf> {
    let l = live();
    for &p in &l.pids {
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    // A container init may not be registered yet (just cloned): everything
    // inside our leaves goes too. Killing a pid namespace's init kills the
    // rest of it.
    for leaf in &l.leaves {
        if std::fs::write(leaf.join("cgroup.kill"), "1").is_err() {
            for p in std::fs::read_to_string(leaf.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: a process in a cgroup we created for it.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    for r in &l.runc {
        r.delete();
        let _ = std::fs::remove_dir_all(&r.bundle);
    }
    let t = Instant::now();
    let mut left: Vec<PathBuf> = l.leaves.clone();
    while !left.is_empty() && t.elapsed() < Duration::from_secs(2) {
        // Reap whatever died (all our children: we are exiting).
        let mut status = 0;
        // SAFETY: non-blocking reap of our own children.
        while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
        left.retain(|leaf| !remove_leaf(leaf));
    }
    std::mem::forget(l);
    left
}
