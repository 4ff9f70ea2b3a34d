//! Owned children: waited for with a deadline, killed past it, killed and
//! reaped if dropped unwaited, and known to the stop-signal clean-up while
//! they live.

use crate::cleanup::live;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// A run that did not finish in time, as a type so callers (and exit
/// codes) can tell it from other failures without reading the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimedOut {
    /// The child ran past its deadline; it was killed and reaped.
    Killed { pid: i32 },
    /// Its output did not end (EOF) before the deadline.
    Output,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimedOut::Killed { pid } => write!(f, "pid {pid} ran past its deadline and was killed"),
            TimedOut::Output => f.write_str("timed out waiting for the workload's output"),
        }
    }
}

impl std::error::Error for TimedOut {}

/// Make `cmd`'s child die with this process: PR_SET_PDEATHSIG (SIGKILL)
/// between fork and exec, and no exec at all if we died before that
/// (then no signal would come). A SIGKILLed launcher leaves nothing behind.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the launcher died before exec"));
            }
            Ok(())
        });
    }
}

/// The exit status a shell would show for a `wait` status: the exit code,
/// or 128 + the signal that killed it.
pub(crate) fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        livehost_common::exit::signaled(libc::WTERMSIG(status))
    }
}

/// Owns a child pid: waits for it with a deadline, kills it past the
/// deadline, and kills + reaps it if dropped unwaited. While owned, the pid
/// is also known to [`crate::clean_up_on_stop_signals`].
pub struct Reaper(i32);

impl Reaper {
    pub fn new(pid: i32) -> Reaper {
        live().pids.push(pid);
        Reaper(pid)
    }

    /// Give up ownership (the caller reaps the pid itself).
    pub fn release(self) -> i32 {
        let pid = self.0;
        live().pids.retain(|&p| p != pid);
        std::mem::forget(self);
        pid
    }

    /// Exit code (128+signal when killed) and the child's peak RSS. Past
    /// the deadline the child is killed and the error is [`TimedOut`].
    pub fn wait(self, deadline: Instant) -> Result<(i32, u64)> {
        let pid = self.0;
        std::mem::forget(self);
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 fills it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // Reap and unregister under the registry's lock, so the stop
            // signal clean-up never signals a pid that was reaped (and
            // could be reused).
            let mut l = live();
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == pid || r < 0 {
                l.pids.retain(|&p| p != pid);
            }
            drop(l);
            if r == pid {
                return Ok((exit_code(status), ru.ru_maxrss as u64 * 1024));
            }
            if r < 0 {
                return Err(std::io::Error::last_os_error()).context("wait4 failed");
            }
            if Instant::now() >= deadline {
                kill_and_reap(pid);
                return Err(TimedOut::Killed { pid }.into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// SIGKILL an owned child, reap it and unregister it, all under the
/// registry's lock.
fn kill_and_reap(pid: i32) {
    let mut l = live();
    let mut status = 0;
    // SAFETY: our own unreaped child; kill, then a blocking reap (quick
    // after SIGKILL).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
    l.pids.retain(|&p| p != pid);
}

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_and_reap(self.0);
    }
}
