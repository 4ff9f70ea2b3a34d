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
