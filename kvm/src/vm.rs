//! A VM and its guest RAM.

use crate::{GuestRam, Kvm, Vcpu, layout, us};
use anyhow::{Context, Result, bail};
use kvm_bindings::kvm_userspace_memory_region;
use serde::Serialize;
use std::time::Instant;

/// Host wall-clock time per start-up phase, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    pub create_vm_us: f64,
    pub memory_us: f64,
    pub vcpu_us: f64,
    pub load_us: f64,
}

/// The CPU mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// 16-bit real mode, CS base 0: for tiny raw programs.
    Real,
    /// 64-bit long mode, identity-mapped 2 MiB pages over the first 4 GiB.
    Long,
}

/// A VM fd with one slot of guest RAM at guest-physical 0.
pub struct Vm {
    // Field order matters: the VM fd is dropped before the RAM registered
    // with it, so the kernel never holds a dangling mapping.
    fd: kvm_ioctls::VmFd,
    ram: GuestRam,
}

impl Vm {
    /// Create a VM (`KVM_CREATE_VM`) with `ram` bytes of RAM registered as
    /// slot 0 (`KVM_SET_USER_MEMORY_REGION`). RAM must stay below the MMIO
    /// window at [`layout::RESULT_MMIO`].
    ///
    /// ```no_run
    /// let kvm = livehost_kvm::Kvm::open()?;
    /// let vm = livehost_kvm::Vm::new(&kvm, 0x10000)?;
    /// assert_eq!(vm.memory().len(), 0x10000);
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn new(kvm: &Kvm, ram: usize) -> Result<Vm> {
        Self::new_timed(kvm, ram, &mut Phases::default())
    }

    /// [`Vm::new`], recording how long `KVM_CREATE_VM` and the memory set-up
    /// took in `phases`.
    ///
    /// ```no_run
    /// let kvm = livehost_kvm::Kvm::open()?;
    /// let mut phases = livehost_kvm::Phases::default();
    /// let vm = livehost_kvm::Vm::new_timed(&kvm, 4 << 20, &mut phases)?;
    /// assert!(phases.create_vm_us > 0.0);
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn new_timed(kvm: &Kvm, ram: usize, phases: &mut Phases) -> Result<Vm> {
        if ram == 0 || !ram.is_multiple_of(4096) || ram as u64 > layout::RESULT_MMIO {
            bail!(
                "guest RAM of {ram:#x} bytes is out of range (whole 4 KiB pages, at most {} MiB)",
                layout::RESULT_MMIO >> 20
            );
        }
        let t = Instant::now();
        let fd = kvm
            .inner()
            .create_vm()
            .context("KVM_CREATE_VM failed (is another hypervisor holding VT-x/SVM?)")?;
        phases.create_vm_us = us(t.elapsed());
        let t = Instant::now();
        let mem = GuestRam::new(ram)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram as u64,
            userspace_addr: mem.host_addr()?,
        };
        // SAFETY: the region is `mem`'s mapping, which `Vm` drops after the fd (field order).
        unsafe { fd.set_user_memory_region(region) }
            .context("KVM_SET_USER_MEMORY_REGION failed")?;
        phases.memory_us = us(t.elapsed());
        Ok(Vm { fd, ram: mem })
    }

    /// The guest's RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// Create vCPU 0 (`KVM_CREATE_VCPU`) set up for `mode`, entering at
    /// `entry`. For [`Mode::Long`] this first writes the GDT and page tables
    /// of [`layout::long_mode_tables`] into guest RAM.
    ///
    /// ```no_run
    /// use livehost_kvm::{Kvm, Mode, Vm, layout};
    /// let kvm = Kvm::open()?;
    /// let vm = Vm::new(&kvm, 0x10000)?;
    /// vm.memory().write(layout::REAL_CODE, &[0xf4])?; // hlt
    /// let vcpu = vm.vcpu(&kvm, Mode::Real, layout::REAL_CODE)?;
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn vcpu(&self, kvm: &Kvm, mode: Mode, entry: u64) -> Result<Vcpu> {
        if mode == Mode::Long {
            if self.ram.len() < layout::LONG_MODE_MIN_RAM {
                bail!(
                    "a long-mode vCPU needs at least {:#x} bytes of guest RAM for its page tables",
                    layout::LONG_MODE_MIN_RAM
                );
            }
            for (at, bytes) in layout::long_mode_tables() {
                self.ram.write(at, &bytes)?;
            }
        }
        Vcpu::new(kvm, &self.fd, mode, entry)
    }
}
