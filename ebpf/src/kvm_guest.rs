//! A minimal KVM guest that performs exactly N port writes and halts: the
//! known workload the tests, the bench and the nested-guest check count
//! exits against. Real mode, 16 KiB of memory, no devices; the VM, its
//! vCPU and the exit loop are the `livehost-kvm` crate's.

use anyhow::{Context, Result, bail};
use livehost_kvm::{Kvm, Mode, Observed, RunEnd, Vm, code};
use std::time::Duration;

/// Port the guest writes to (unused by any real device; we are the VMM).
pub const PORT: u16 = 0x510;
const MEM_SIZE: usize = 0x4000;
const GUEST_ADDR: u64 = 0x1000;

/// What one run saw from the VMM side.
#[derive(Debug, Clone, Default)]
pub struct GuestRun {
    pub tid: u32,
    pub pid: u32,
    /// Port writes the VMM handled (KVM_EXIT_IO out to PORT).
    pub io_exits: u64,
    /// Every return of KVM_RUN, IO and HLT included.
    pub runs: u64,
    pub elapsed_ns: u64,
}

/// Call KVM_RUN `n` times on a fresh vCPU with `immediate_exit` set: each
/// returns -EINTR at once, without running the guest (what a signal to the
/// vCPU thread does). Returns the calling thread's (pid, tid).
pub fn interrupted_runs(n: u32) -> Result<(u32, u32)> {
    let kvm = Kvm::open().context("is KVM available and are you root?")?;
    let vm = Vm::new(&kvm, MEM_SIZE)?;
    let mut vcpu = vm.vcpu(&kvm, Mode::Real, GUEST_ADDR)?;
    let fd = vcpu.fd();
    fd.set_kvm_immediate_exit(1);
    for _ in 0..n {
        match fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => bail!("KVM_RUN with immediate_exit: want EINTR, got {other:?}"),
        }
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    Ok((std::process::id(), tid))
}

/// Run a guest doing `n` (>= 1) port writes on the calling thread. The run
/// is bounded by a deadline generous for the slowest (emulating) host; a
/// guest that exits any other way is reported as an error.
pub fn run_pio_guest(n: u32) -> Result<GuestRun> {
    if n == 0 {
        bail!("the guest needs at least one port write");
    }
    let kvm = Kvm::open().context("is KVM available and are you root?")?;
    let vm = Vm::new(&kvm, MEM_SIZE)?;
    vm.memory()
        .write(GUEST_ADDR, &code::real_port_loop(PORT, n))?;
    let mut vcpu = vm.vcpu(&kvm, Mode::Real, GUEST_ADDR)?;
    let limit = Duration::from_secs(60) + Duration::from_micros(100) * n;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let mut seen = Observed::default();
    let start = livehost_common::monotonic_ns();
    let end = vcpu.run(limit, &mut seen)?;
    let elapsed_ns = livehost_common::monotonic_ns() - start;
    if end != RunEnd::Halted || seen.exits.io_out != n as u64 {
        bail!(
            "guest ended with {end:?} after {} port writes, want HLT after {n}",
            seen.exits.io_out
        );
    }
    Ok(GuestRun {
        tid,
        pid: std::process::id(),
        io_exits: seen.exits.io_out,
        runs: seen.exits.total(),
        elapsed_ns,
    })
}
