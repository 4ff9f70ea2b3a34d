//! A minimal KVM guest that performs exactly N port writes and halts: the
//! known workload the tests, the bench and the nested-guest check count
//! exits against. Real mode, 4 KiB of memory, no devices.

use anyhow::{Context, Result, bail};
use kvm_ioctls::{Kvm, VcpuExit};
use livehost_common::guest_mem::GuestMem;

/// Port the guest writes to (unused by any real device; we are the VMM).
pub const PORT: u16 = 0x510;
const GUEST_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x4000;

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

/// `mov dx, PORT; mov ecx, n; l: out dx, al; dec ecx; jnz l; hlt`
fn code(n: u32) -> Vec<u8> {
    let mut c = vec![0xba, PORT as u8, (PORT >> 8) as u8, 0x66, 0xb9];
    c.extend_from_slice(&n.to_le_bytes());
    c.extend_from_slice(&[0xee, 0x66, 0x49, 0x75, 0xfb, 0xf4]);
    c
}

/// Run a guest doing `n` (>= 1) port writes on the calling thread. Every
/// KVM_RUN return is bounded by the guest's own finite loop; a guest that
/// exits any other way is reported as an error.
pub fn run_pio_guest(n: u32) -> Result<GuestRun> {
    if n == 0 {
        bail!("the guest needs at least one port write");
    }
    let kvm = Kvm::new().context("cannot open /dev/kvm (is KVM available and are you root?)")?;
    // Declared before the VM so it is dropped after it: the VM must never
    // outlive the memory registered with it.
    let mut mem = GuestMem::new(MEM_SIZE)?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
    mem.write(GUEST_ADDR as usize, &code(n));
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.host_addr(),
        flags: 0,
    };
    // SAFETY: the region describes our live mapping, which outlives the VM
    // (mem is declared first, so dropped last).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION failed")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS failed")?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS failed")?;
    let regs = kvm_bindings::kvm_regs {
        rip: GUEST_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS failed")?;

    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    let mut out = GuestRun {
        tid,
        pid: std::process::id(),
        ..Default::default()
    };
    let start = livehost_common::monotonic_ns();
    loop {
        out.runs += 1;
        match vcpu.run().context("KVM_RUN failed")? {
            VcpuExit::IoOut(port, _) if port == PORT => out.io_exits += 1,
            VcpuExit::Hlt => break,
            other => bail!("guest exited unexpectedly: {other:?}"),
        }
        if out.io_exits > n as u64 {
            bail!("guest did more port writes than asked ({n})");
        }
    }
    out.elapsed_ns = livehost_common::monotonic_ns() - start;
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(out)
}
