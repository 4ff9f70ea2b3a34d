//! The vCPU: register set-up for each mode, and the exit loop.

use crate::{Kvm, Mode, Watchdog, layout};
use anyhow::{Context, Result};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use std::time::{Duration, Instant};

/// How a guest run ended normally.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest executed HLT (with interrupts off: it is done).
    Halted,
    /// The guest wrote to the debug-exit port (QEMU's isa-debug-exit ABI).
    DebugExit(u8),
}

/// Counts of each exit the loop handled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExitCounts {
    pub io_out: u64,
    pub io_in: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub interrupted: u64,
}

impl ExitCounts {
    /// Every return from `KVM_RUN` the loop saw.
    pub fn total(&self) -> u64 {
        self.io_out + self.io_in + self.mmio_read + self.mmio_write + self.hlt + self.interrupted
    }
}

/// A run that went wrong, with the guest's registers at that moment so the
/// user can see where it was.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("guest ran past its {limit:?} deadline{detail}; registers: {regs}")]
    Timeout {
        limit: Duration,
        detail: String,
        regs: String,
    },
    #[error("guest triple-faulted (KVM_EXIT_SHUTDOWN); registers: {regs}")]
    TripleFault { regs: String },
    #[error("guest stopped with {what}; registers: {regs}")]
    Failed { what: String, regs: String },
    #[error("KVM_RUN failed: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
}

/// What the exit loop records as it goes.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub exits: ExitCounts,
    /// Bytes written to the serial port (capped at 1 MiB).
    pub serial: String,
    /// When the guest wrote the boot-timer magic.
    pub boot_timer: Option<Instant>,
    pub first_exit: Option<Instant>,
    /// The last 8-byte write to [`layout::RESULT_MMIO`].
    pub mmio_result: Option<u64>,
}

/// A vCPU fd, set up and ready to run.
pub struct Vcpu {
    fd: VcpuFd,
    /// The guest TSC rate (`KVM_GET_TSC_KHZ`), when KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// Flat 64-bit code and data segments matching [`layout::GDT_ENTRIES`],
/// paging on with [`layout::PML4`], EFER.LME/LMA set.
fn enter_long_mode(sregs: &mut kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: layout::CODE_SELECTOR,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: layout::DATA_SELECTOR,
        type_: 3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (layout::GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.cr3 = layout::PML4;
    // PAE | OSFXSR | OSXMMEXCPT: compiled Rust uses SSE.
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    // PE | MP | ET | NE | WP | PG
    sregs.cr0 = 0x8005_0033;
    // LME | LMA
    sregs.efer = 0x500;
}

impl Vcpu {
    /// `KVM_CREATE_VCPU`, then `KVM_SET_CPUID2` (long mode),
    /// `KVM_SET_SREGS` and `KVM_SET_REGS`. The caller has written the
    /// long-mode tables already (see [`Vm::vcpu`](crate::Vm::vcpu)).
    pub(crate) fn new(kvm: &Kvm, vm: &VmFd, mode: Mode, entry: u64) -> Result<Vcpu> {
        let fd = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
        let mut sregs = fd.get_sregs().context("KVM_GET_SREGS failed")?;
        let mut regs = kvm_regs {
            rflags: 2,
            rip: entry,
            ..Default::default()
        };
        match mode {
            Mode::Real => {
                // Flat real mode at CS=0, so `entry` is a physical address
                // below 64 KiB.
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                regs.rsp = layout::REAL_STACK;
            }
            Mode::Long => {
                fd.set_cpuid2(&kvm.supported_cpuid()?)
                    .context("KVM_SET_CPUID2 failed")?;
                enter_long_mode(&mut sregs);
                regs.rsp = layout::CODE_BASE;
            }
        }
        fd.set_sregs(&sregs).context("KVM_SET_SREGS failed")?;
        fd.set_regs(&regs).context("KVM_SET_REGS failed")?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(Vcpu { fd, tsc_khz })
    }

    /// The kvm-ioctls vCPU fd, for loops of its own (see [`Watchdog`]).
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Registers as one line, for error messages (`KVM_GET_REGS`,
    /// `KVM_GET_SREGS`).
    ///
    /// ```no_run
    /// # use livehost_kvm::{Kvm, Mode, Vm, layout};
    /// # let kvm = Kvm::open()?;
    /// # let vm = Vm::new(&kvm, 0x10000)?;
    /// let vcpu = vm.vcpu(&kvm, Mode::Real, layout::REAL_CODE)?;
    /// assert!(vcpu.regs_line().contains("rip=0x8000"));
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn regs_line(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rax={:#x} rcx={:#x} rdx={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip,
                r.rsp,
                r.rax,
                r.rcx,
                r.rdx,
                r.rflags,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("<unavailable: {e}>"),
        }
    }

    /// Run (`KVM_RUN`, repeatedly) until HLT, a debug-exit write, an error
    /// or the deadline `limit`. The vCPU runs on this thread; a [`Watchdog`]
    /// kicks it out when the deadline passes.
    ///
    /// ```no_run
    /// use livehost_kvm::{Kvm, Mode, Observed, RunEnd, Vm, code, layout};
    /// let kvm = Kvm::open()?;
    /// let vm = Vm::new(&kvm, 0x10000)?;
    /// vm.memory().write(layout::REAL_CODE, code::REAL_HELLO)?;
    /// let mut vcpu = vm.vcpu(&kvm, Mode::Real, layout::REAL_CODE)?;
    /// let mut seen = Observed::default();
    /// let end = vcpu.run(std::time::Duration::from_secs(1), &mut seen)?;
    /// assert_eq!((end, seen.serial.as_str()), (RunEnd::Halted, "R"));
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn run(&mut self, limit: Duration, obs: &mut Observed) -> Result<RunEnd, RunError> {
        let watchdog = Watchdog::new(&mut self.fd);
        let end = watchdog.guard(limit, || exit_loop(&mut self.fd, obs));
        match end {
            Err(RunError::Kvm(e)) if e.errno() == libc::EINTR && watchdog.fired() => {
                Err(RunError::Timeout {
                    limit,
                    detail: if obs.boot_timer.is_none() {
                        " without writing the boot timer".into()
                    } else {
                        String::new()
                    },
                    regs: self.regs_line(),
                })
            }
            Err(RunError::Failed { what, .. }) => Err(RunError::Failed {
                what,
                regs: self.regs_line(),
            }),
            Err(RunError::TripleFault { .. }) => Err(RunError::TripleFault {
                regs: self.regs_line(),
            }),
            other => other,
        }
    }
}

/// Port-input values: the serial line status says "transmitter empty";
/// every other port reads as an absent device (all ones).
fn port_in(port: u16) -> u8 {
    if port == layout::SERIAL_PORT + 5 {
        0x60
    } else {
        0xff
    }
}

fn port_out(port: u16, data: &[u8], obs: &mut Observed) -> Option<RunEnd> {
    obs.exits.io_out += 1;
    match port {
        // A runaway guest must not grow our memory without bound.
        layout::SERIAL_PORT if obs.serial.len() < 1 << 20 => {
            obs.serial.extend(data.iter().map(|&b| b as char));
        }
        layout::BOOT_TIMER_PORT
            if data.first() == Some(&layout::BOOT_TIMER_MAGIC) && obs.boot_timer.is_none() =>
        {
            obs.boot_timer = Some(Instant::now());
        }
        layout::DEBUG_EXIT_PORT => {
            return Some(RunEnd::DebugExit(data.first().copied().unwrap_or(0)));
        }
        _ => {}
    }
    None
}

fn exit_loop(fd: &mut VcpuFd, obs: &mut Observed) -> Result<RunEnd, RunError> {
    loop {
        let exit = fd.run()?;
        if obs.first_exit.is_none() {
            obs.first_exit = Some(Instant::now());
        }
        match exit {
            VcpuExit::IoOut(port, data) => {
                if let Some(end) = port_out(port, data, obs) {
                    return Ok(end);
                }
            }
            VcpuExit::IoIn(port, data) => {
                obs.exits.io_in += 1;
                data.fill(port_in(port));
            }
            VcpuExit::MmioWrite(addr, data) => {
                obs.exits.mmio_write += 1;
                if let (layout::RESULT_MMIO, Ok(b)) = (addr, <[u8; 8]>::try_from(data)) {
                    obs.mmio_result = Some(u64::from_le_bytes(b));
                }
            }
            VcpuExit::MmioRead(_, data) => {
                obs.exits.mmio_read += 1;
                data.fill(0xff);
            }
            VcpuExit::Hlt => {
                obs.exits.hlt += 1;
                return Ok(RunEnd::Halted);
            }
            VcpuExit::Shutdown => {
                return Err(RunError::TripleFault {
                    regs: String::new(),
                });
            }
            VcpuExit::Intr => obs.exits.interrupted += 1,
            other => {
                return Err(RunError::Failed {
                    what: format!("unhandled exit {other:?}"),
                    regs: String::new(),
                });
            }
        }
    }
}
