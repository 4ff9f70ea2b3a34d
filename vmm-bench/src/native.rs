//! The native baseline: the static workload as a plain child process.

use crate::container::{Reaper, read_until, workload};
use anyhow::{Context, Result};
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct NativeRun {
    pub stdout: String,
    pub exit_code: i32,
    /// spawn to exit, host clock.
    pub total_us: f64,
    /// CLOCK_MONOTONIC at spawn, ns (the workload prints its own start on it).
    pub launch_mono_ns: u64,
    pub max_rss_bytes: u64,
}

/// Run the workload as a plain child process. It is executed from its
/// sealed memory file (`/proc/self/fd/N` in the child), never from a path
/// another user could reach.
pub fn run(args: &[String], timeout: Duration) -> Result<NativeRun> {
    let exe = workload()?.exec_path();
    let launch_mono_ns = livehost_common::monotonic_ns();
    let launch = Instant::now();
    let mut cmd = std::process::Command::new(&exe);
    // Killed with us: a SIGKILLed vmm-bench leaves no workload behind.
    livehost_container::reap::die_with_parent(&mut cmd);
    let mut child = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let reaper = Reaper::new(child.id() as i32);
    let out: OwnedFd = child.stdout.take().context("no stdout pipe")?.into();
    let deadline = crate::deadline(launch, timeout);
    let stdout = read_until(out, deadline);
    let (code, rss) = reaper.wait(deadline)?;
    Ok(NativeRun {
        stdout: stdout?,
        exit_code: code,
        total_us: launch.elapsed().as_secs_f64() * 1e6,
        launch_mono_ns,
        max_rss_bytes: rss,
    })
}

/// The workload's checksum computed in this process (the reference every
/// path is checked against). Sizes outside 1..=[`crate::MAX_KIB`] are
/// refused before anything is allocated.
pub fn expected_checksum(kib: u64, seed: u64) -> Result<u64> {
    crate::check_kib(kib)?;
    let mut buf = vec![0u8; (kib as usize) << 10];
    Ok(vmm_bench_workload::checksum(&mut buf, seed))
}

/// Host TSC rate, calibrated against the monotonic clock, so guest cycle
/// counts under QEMU (whose TSC follows the host's) can be turned into time.
pub fn host_tsc_khz() -> f64 {
    // SAFETY: rdtsc is unprivileged on Linux x86-64.
    let t0 = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
    std::thread::sleep(Duration::from_millis(20));
    let t1 = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
    (t1.1 - t0.1) as f64 / (t1.0 - t0.0).as_secs_f64() / 1e3
}
