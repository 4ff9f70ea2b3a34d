//! livehost's one KVM crate: a small VMM core on the rust-vmm crates
//! (`kvm-ioctls`, `vm-memory`), shared by vmm-bench (its VMM and unikernel
//! runs), kernel-tests (the accelerator probe) and ebpf (its test guest).
//!
//! One type per kernel object:
//! - [`Kvm`]: `/dev/kvm` (the KVM system fd),
//! - [`Vm`]: a VM fd with its [`GuestRam`] registered as slot 0,
//! - [`Vcpu`]: a vCPU fd set up for [`Mode::Real`] or [`Mode::Long`],
//!
//! plus the exit loop ([`Vcpu::run`]) with port-I/O, MMIO and HLT exits, and
//! a [`Watchdog`] that kicks a vCPU out of `KVM_RUN` so no run outlives its
//! deadline. [`probe`] finds out what this host's KVM can do, and [`code`]
//! holds the tiny guests that probe and the tests run.
//!
//! ```no_run
//! use livehost_kvm::{Kvm, Mode, Observed, RunEnd, Vm, code, layout};
//! use std::time::Duration;
//!
//! let kvm = Kvm::open()?;
//! let vm = Vm::new(&kvm, layout::MIN_RAM)?;
//! vm.memory().write(layout::CODE_BASE, code::LONG_HELLO)?;
//! let mut vcpu = vm.vcpu(&kvm, Mode::Long, layout::CODE_BASE)?;
//! let mut seen = Observed::default();
//! assert_eq!(vcpu.run(Duration::from_secs(1), &mut seen)?, RunEnd::Halted);
//! assert_eq!(seen.serial, "L");
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod code;
pub mod layout;
mod memory;
pub mod probe;
mod raw;
mod system;
mod vcpu;
mod vm;
mod watchdog;

pub use memory::GuestRam;
pub use raw::{RawRun, run_raw};
pub use system::Kvm;
pub use vcpu::{ExitCounts, Observed, RunEnd, RunError, Vcpu};
pub use vm::{Mode, Phases, Vm};
pub use watchdog::Watchdog;

/// The exits `KVM_RUN` returns, for loops of their own (see [`Watchdog`]).
pub use kvm_ioctls::VcpuExit;

use std::time::{Duration, Instant};

/// Longest deadline a run takes; larger ones are clamped to it so that
/// `start + limit` never overflows.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// `start + timeout`, never overflowing: timeouts beyond [`MAX_TIMEOUT`]
/// are clamped to it.
///
/// ```
/// use std::time::{Duration, Instant};
/// let now = Instant::now();
/// assert!(livehost_kvm::deadline(now, Duration::MAX) > now);
/// ```
pub fn deadline(start: Instant, timeout: Duration) -> Instant {
    let t = timeout.min(MAX_TIMEOUT);
    start.checked_add(t).unwrap_or(start)
}

/// A duration in microseconds, as every phase timing is reported.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
