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
    /// SIGINT/SIGTERM/SIGHUP arrived while waiting (see [`crate::signals`]).
    Interrupted(i32, Duration),
}

/// Following one patch's transition: where, how long, how often.
#[derive(Clone, Copy)]
pub struct Watch<'a> {
    pub paths: &'a Paths,
    pub name: &'a str,
    /// The base deadline; extended while the pending count keeps falling.
    pub timeout: Duration,
    pub poll: Duration,
    pub progress: &'a Progress,
    /// Return [`Wait::Interrupted`] when a caught signal arrives (not
    /// while reversing: the reverse is what a signal asks for).
    pub interruptible: bool,
}

/// The deadline never grows past this many base timeouts.
const MAX_EXTENSION: u32 = 4;

impl Watch<'_> {
    /// Poll `transition` until it reads 0 (or the patch is gone, which is
    /// how a finished disable ends), showing how many tasks are still
    /// pending. Halfway to the deadline the pending tasks are signalled
    /// through the patch's `signal` attribute (where the kernel has one);
    /// while the pending count keeps falling the deadline moves out (up to
    /// [`MAX_EXTENSION`] timeouts), since that transition is progressing.
    /// What was done is pushed onto `notes`.
    pub fn wait(&self, target: i32, start: Instant, notes: &mut Vec<String>) -> Wait {
        let (paths, name) = (self.paths, self.name);
        let verb = if target == 1 {
            "patching"
        } else {
            "unpatching"
        };
        let mut deadline = start + self.timeout;
        let cap = start + self.timeout * MAX_EXTENSION;
        let mut last_count = Instant::now() - Duration::from_secs(1);
        let (mut first, mut best) = (None::<usize>, usize::MAX);
        let mut signalled = false;
        loop {
            let t = livehost_common::sysfs::read_attr(paths.patch_dir(name).join("transition"));
            if matches!(t.as_deref(), Ok("0") | Err(_)) {
                return Wait::Done(start.elapsed());
            }
            if self.interruptible
                && let Some(sig) = crate::signals::caught()
            {
                return Wait::Interrupted(sig, start.elapsed());
            }
            let now = Instant::now();
            // Scanning every task is far costlier than reading one
            // attribute, so the pending count refreshes a few times a
            // second only.
            if now.duration_since(last_count) >= Duration::from_millis(250) {
                let n = paths.count_lagging(target);
                first.get_or_insert(n);
                if n < best && best != usize::MAX {
                    deadline = deadline.max((now + self.timeout / 2).min(cap));
                }
                best = best.min(n);
                self.progress.step(format!(
                    "{name}: {verb}, {n} task(s) pending, {:.1}s of {:.0}s",
                    start.elapsed().as_secs_f64(),
                    deadline.duration_since(start).as_secs_f64()
                ));
                last_count = now;
            }
            if !signalled && now >= start + self.timeout / 2 && best > 0 && best != usize::MAX {
                signalled = true;
                if let Some(n) = self.signal(best, start) {
                    notes.push(n);
                }
            }
            if now >= deadline {
                if deadline > start + self.timeout {
                    notes.push(format!(
                        "{name}: deadline extended to {:.1}s while the pending tasks fell from {} to {}",
                        deadline.duration_since(start).as_secs_f64(),
                        first.unwrap_or(0),
                        best
                    ));
                }
                return Wait::TimedOut(start.elapsed());
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Write the patch's `signal` attribute (a fake signal to every task
    /// still pending, what kpatch does after 15 s); the note says what was
    /// done. Kernels from 5.13 have no such attribute: they send that
    /// signal themselves 15 s into a transition, and the note says so.
    fn signal(&self, pending: usize, start: Instant) -> Option<String> {
        let p = self.paths.patch_dir(self.name).join("signal");
        let at = start.elapsed().as_secs_f64();
        if !p.exists() {
            return Some(format!(
                "{}: {pending} task(s) pending after {at:.1}s; this kernel has no `signal` attribute to signal them (it sends them a fake signal itself 15 s into a transition)",
                self.name
            ));
        }
        Some(match std::fs::write(&p, "1") {
            Ok(()) => format!(
                "{}: signalled the {pending} pending task(s) through {} after {at:.1}s",
                self.name,
                p.display()
            ),
            Err(e) => format!(
                "{}: could not signal the pending tasks through {} after {at:.1}s: {e}",
                self.name,
                p.display()
            ),
        })
    }

    /// A transition towards `stalled` did not finish: write the opposite
    /// `enabled` and wait for that (not interruptible). Ok(Done) when the
    /// kernel is back where it was.
    pub fn reverse(&self, stalled: i32, notes: &mut Vec<String>) -> Result<Wait> {
        let back = 1 - stalled;
        self.progress
            .step(format!("{}: reversing the transition", self.name));
        let r0 = Instant::now();
        write_attr(self.paths, self.name, "enabled", &back.to_string())?;
        let w = Watch {
            interruptible: false,
            ..*self
        };
        Ok(w.wait(back, r0, notes))
    }
}

/// The reverse of `name`'s transition (towards `back`) stalled too: the
/// tasks holding it up, and the sentence that says where that leaves the
/// host.
pub(crate) fn reverse_stalled(paths: &Paths, name: &str, back: i32) -> (Vec<TaskState>, String) {
    let tasks = paths.lagging_tasks(back);
    let still = task_names(&tasks);
    let msg = format!(
        "{name}: the reverse transition stalled too ({} task(s): {}); the patch is half-applied, mid-transition: see `hotpatch status`",
        still.len(),
        still.join(", ")
    );
    (tasks, msg)
}

/// [`Watch::wait`], not interruptible, notes dropped: for callers that
/// only need done or not.
pub fn wait_transition(
    paths: &Paths,
    name: &str,
    target: i32,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
    start: Instant,
) -> Wait {
    let w = Watch {
        paths,
        name,
        timeout,
        poll,
        progress,
        interruptible: false,
    };
    w.wait(target, start, &mut Vec::new())
}

/// What `--force` achieved.
#[derive(Debug)]
pub enum Forced {
    /// `force` written and the transition finished.
    Forced,
    /// The transition finished on its own before `force` was written (the
    /// kernel then refuses the write): a normal completion, not forced.
    CompletedFirst,
    /// The write was refused while the transition was still running.
    WriteFailed(String),
    /// Forced, but the transition still did not finish in time.
    TimedOut,
}

/// Write `force` and wait. A refused write is looked at again: when the
/// transition has meanwhile completed, nothing was forced.
pub fn force_transition(w: &Watch, notes: &mut Vec<String>) -> Forced {
    if let Err(e) = write_attr(w.paths, w.name, "force", "1") {
        let t = livehost_common::sysfs::read_attr(w.paths.patch_dir(w.name).join("transition"));
        return match t.as_deref() {
            Ok("0") => Forced::CompletedFirst,
            _ => Forced::WriteFailed(format!("{e:#}")),
        };
    }
    let w = Watch {
        interruptible: false,
        ..*w
    };
    match w.wait(1, Instant::now(), notes) {
        Wait::Done(_) => Forced::Forced,
        _ => Forced::TimedOut,
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
