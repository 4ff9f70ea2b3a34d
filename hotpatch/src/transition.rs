//! Driving and following a livepatch transition through sysfs: write an
//! attribute, poll `transition` until the kernel finishes, wait for a freed
//! patch to disappear, remove its module. Every wait has a deadline.

use crate::kernel::TaskState;
use crate::kmod::{self, Delete};
use crate::paths::Paths;
use anyhow::{Result, bail};
use livehost_common::progress::Progress;
use std::time::{Duration, Instant};

/// A duration in milliseconds, as every report gives it.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `pid/tid comm` of each task, for messages naming who holds a
/// transition up.
pub(crate) fn task_names(tasks: &[TaskState]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| format!("{}/{} {}", t.pid, t.tid, t.comm))
        .collect()
}

/// Write a livepatch sysfs attribute, naming the attribute on error and
/// saying what the kernel's refusal means.
pub fn write_attr(paths: &Paths, name: &str, attr: &str, value: &str) -> Result<()> {
    let p = paths.patch_dir(name).join(attr);
    std::fs::write(&p, value).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EBUSY) => {
                ": another patch is in transition; only one may be at a time (hotpatch status)"
            }
            Some(libc::EINVAL) => ": the kernel refused the change in this state (hotpatch status)",
            Some(libc::ENOENT) => ": the patch is gone (freed by the kernel)",
            _ => "",
        };
        anyhow::anyhow!("cannot write {value} to {}: {e}{why}", p.display())
    })
}

pub enum Wait {
    Done(Duration),
    TimedOut(Duration),
}

/// Poll `transition` of `name` until it reads 0 (or the patch is gone, which
/// is how a finished disable ends), showing how many tasks are still pending.
pub fn wait_transition(
    paths: &Paths,
    name: &str,
    target: i32,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
    start: Instant,
) -> Wait {
    let verb = if target == 1 {
        "patching"
    } else {
        "unpatching"
    };
    let mut last_report = Instant::now() - Duration::from_secs(1);
    loop {
        let t = livehost_common::sysfs::read_attr(paths.patch_dir(name).join("transition"));
        match t.as_deref() {
            Ok("0") | Err(_) => return Wait::Done(start.elapsed()),
            _ => {}
        }
        if start.elapsed() >= timeout {
            return Wait::TimedOut(start.elapsed());
        }
        // Scanning every task is far costlier than reading one attribute,
        // so the pending count refreshes a few times a second only.
        if last_report.elapsed() >= Duration::from_millis(250) {
            let n = paths.count_lagging(target);
            progress.step(format!(
                "{name}: {verb}, {n} task(s) pending, {:.1}s of {:.0}s",
                start.elapsed().as_secs_f64(),
                timeout.as_secs_f64()
            ));
            last_report = Instant::now();
        }
        std::thread::sleep(poll);
    }
}

/// Remove a module once its references are gone (the kernel drops a patch's
/// reference asynchronously after the patch is freed), with a deadline.
pub fn remove_module(paths: &Paths, name: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match kmod::delete_module(name)? {
            Delete::Removed | Delete::NotLoaded => return Ok(start.elapsed()),
            Delete::Busy => {
                if start.elapsed() >= timeout {
                    let refs = paths
                        .module(name)
                        .and_then(|m| m.refcount)
                        .map_or("?".to_string(), |r| r.to_string());
                    bail!(
                        "module {name} still in use (refcount {refs}) after {:.1}s; retry `hotpatch unload {name}` later",
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Wait for `/sys/kernel/livepatch/<name>` to disappear (the patch freed).
pub fn wait_gone(paths: &Paths, name: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while paths.patch_dir(name).exists() {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
