//! A small KVM VMM on the rust-vmm crates: one type per kernel object
//! ([`Kvm`] for `/dev/kvm`, [`Vm`] for a VM fd with its memory, [`Vcpu`] for
//! a vCPU fd), real-mode and 64-bit long-mode setups, port-I/O, MMIO and HLT
//! exits, serial on 0x3f8, a boot-timer port, and a watchdog that kicks the
//! vCPU out of `KVM_RUN` so no run outlives its deadline.

pub mod boot;
pub mod elf;
pub mod layout;
pub mod probe;
mod vcpu;

pub use vcpu::{ExitCounts, Kicker, RunEnd, RunError, Vcpu};

use anyhow::{Context, Result, bail};
use kvm_bindings::kvm_userspace_memory_region;
use serde::Serialize;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// `/dev/kvm`, opened once, with the reasons it may be unusable spelled out.
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
}

impl Kvm {
    /// Open `/dev/kvm`. The error says which of the usual causes applies
    /// (missing device, no permission) and what to do.
    pub fn open() -> Result<Kvm> {
        Self::open_path("/dev/kvm")
    }

    /// Open a KVM device node at `path` (tests point this at files that are
    /// not KVM to check the error path).
    pub fn open_path(path: &str) -> Result<Kvm> {
        let c = std::ffi::CString::new(path).context("device path contains NUL")?;
        let kvm = match kvm_ioctls::Kvm::new_with_path(&c) {
            Ok(k) => k,
            Err(e) => match e.errno() {
                libc::ENOENT => bail!(
                    "{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, enable \
                     virtualization in firmware, or for a nested host enable nested \
                     virtualization); the QEMU/TCG and container rows still run"
                ),
                libc::EACCES | libc::EPERM => bail!(
                    "no permission to open {path}: run as root or add your user to the group \
                     that owns it (usually `kvm`)"
                ),
                _ => return Err(e).with_context(|| format!("cannot open {path}")),
            },
        };
        let v = kvm.get_api_version();
        if v != 12 {
            bail!("{path} is not a usable KVM device (KVM_GET_API_VERSION returned {v}, want 12)");
        }
        Ok(Kvm { kvm })
    }

    pub fn inner(&self) -> &kvm_ioctls::Kvm {
        &self.kvm
    }
}

/// Host wall-clock time per start-up phase, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    pub create_vm_us: f64,
    pub memory_us: f64,
    pub vcpu_us: f64,
    pub load_us: f64,
}

/// A VM with one slot of guest RAM at guest-physical 0.
pub struct Vm {
    fd: kvm_ioctls::VmFd,
    mem: GuestMemoryMmap,
    ram: usize,
}

impl Vm {
    /// Create a VM with `ram` bytes of RAM. RAM must stay below the MMIO
    /// window at [`layout::RESULT_MMIO`].
    pub fn new(kvm: &Kvm, ram: usize, phases: &mut Phases) -> Result<Vm> {
        if ram < layout::MIN_RAM || ram as u64 > layout::RESULT_MMIO {
            bail!(
                "guest RAM of {} MiB is out of range ({}..{} MiB)",
                ram >> 20,
                layout::MIN_RAM >> 20,
                layout::RESULT_MMIO >> 20
            );
        }
        let t = Instant::now();
        let fd = kvm
            .kvm
            .create_vm()
            .context("KVM_CREATE_VM failed (is another hypervisor holding VT-x/SVM?)")?;
        phases.create_vm_us = us(t.elapsed());
        let t = Instant::now();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram)])
            .map_err(|e| anyhow::anyhow!("cannot map {} MiB of guest RAM: {e:?}", ram >> 20))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| anyhow::anyhow!("guest RAM has no host address: {e:?}"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is the mapping owned by `mem`, which lives in
        // the same `Vm` as the VM fd and is dropped after it (field order),
        // so the kernel never sees a dangling mapping.
        unsafe { fd.set_user_memory_region(region) }
            .context("KVM_SET_USER_MEMORY_REGION failed")?;
        phases.memory_us = us(t.elapsed());
        Ok(Vm { fd, mem, ram })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn ram(&self) -> usize {
        self.ram
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem.write_slice(data, GuestAddress(addr)).map_err(|e| {
            anyhow::anyhow!(
                "cannot write {} bytes at guest {addr:#x}: {e:?}",
                data.len()
            )
        })
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        self.mem
            .read_obj::<u64>(GuestAddress(addr))
            .map_err(|e| anyhow::anyhow!("cannot read guest {addr:#x}: {e:?}"))
    }

    /// Create vCPU 0 set up for `mode`, entering at `entry`.
    pub fn vcpu(&self, kvm: &Kvm, mode: Mode, entry: u64) -> Result<Vcpu> {
        if mode == Mode::Long {
            layout::write_long_mode_tables(self)?;
        }
        Vcpu::new(kvm, &self.fd, mode, entry)
    }

    /// Guest-RAM pages resident in host memory, so that a runtime's own
    /// overhead can be told apart from the guest's RAM in its RSS.
    pub fn resident_guest_bytes(&self) -> u64 {
        let Ok(host) = self.mem.get_host_address(GuestAddress(0)) else {
            return 0;
        };
        let pages = self.ram.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: mincore on our own mapping of exactly `ram` bytes, with a
        // vector of one byte per page; on error the vector stays zero.
        let r = unsafe { libc::mincore(host as *mut libc::c_void, self.ram, vec.as_mut_ptr()) };
        if r != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
    }
}

/// The CPU mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// 16-bit real mode, CS base 0: for tiny raw programs.
    Real,
    /// 64-bit long mode, identity-mapped 2 MiB pages over the first 4 GiB.
    Long,
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
