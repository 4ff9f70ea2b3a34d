//! vmm-bench: the same workload down each path a Linux host offers (a
//! native process, a container, a VM on our own KVM VMM, a unikernel, QEMU
//! booting Linux) with start-up, round-trip, compute, memory, size and
//! density figures, each labelled with the accelerator it ran under.

pub mod commands;
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

/// Refuse a workload size that not every path accepts (see [`MAX_KIB`]),
/// before anything allocates or boots.
pub fn check_kib(kib: u64) -> anyhow::Result<()> {
    if kib == 0 || kib > MAX_KIB {
        anyhow::bail!("workload size {kib} KiB is out of range (1..={MAX_KIB})");
    }
    Ok(())
}

/// Longest deadline any run takes (the command line caps `--timeout` at
/// this too), and `start + timeout` clamped to it.
pub use livehost_container::{MAX_TIMEOUT, deadline};
