//! vmm-bench: the same workload down each path a Linux host offers (a
//! native process, a container, a VM on our own KVM VMM, a unikernel, QEMU
//! booting Linux) with start-up, round-trip, compute, memory, size and
//! density figures, each labelled with the accelerator it ran under.

pub mod container;
pub mod host;
pub mod native;
pub mod qemu;
pub mod report;
pub mod vm;

/// The static no-libc Linux build of the workload (native, container, runc
/// and QEMU-Linux paths all run this exact file).
pub static LINUX_INIT: &[u8] = include_bytes!(env!("VMM_BENCH_LINUX_INIT"));

pub use vmm_bench_workload::MAX_KIB;

use std::time::{Duration, Instant};

/// Refuse a workload size that not every path accepts (see [`MAX_KIB`]),
/// before anything allocates or boots.
pub fn check_kib(kib: u64) -> anyhow::Result<()> {
    if kib == 0 || kib > MAX_KIB {
        anyhow::bail!("workload size {kib} KiB is out of range (1..={MAX_KIB})");
    }
    Ok(())
}

/// Longest deadline any run takes (the command line caps `--timeout` at
/// this too); larger library arguments are clamped to it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// `start + timeout`, never overflowing: timeouts beyond [`MAX_TIMEOUT`] are
/// clamped to it.
pub fn deadline(start: Instant, timeout: Duration) -> Instant {
    let t = timeout.min(MAX_TIMEOUT);
    start.checked_add(t).unwrap_or(start)
}
