//! The vCPU: register setup for each mode, the exit loop, and the watchdog
//! that guarantees a run ends by its deadline.

use super::{Kvm, Mode, layout};
use anyhow::{Context, Result};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// How a guest run ended normally.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest executed HLT (with interrupts off: it is done).
    Halted,
    /// The guest wrote to the debug-exit port (QEMU's isa-debug-exit ABI).
    DebugExit(u8),
}

/// Counts of each exit our loop handled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExitCounts {
    pub io_out: u64,
    pub io_in: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub interrupted: u64,
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
    pub serial: String,
    pub boot_timer: Option<Instant>,
    pub first_exit: Option<Instant>,
    pub mmio_result: Option<u64>,
}

pub struct Vcpu {
    fd: VcpuFd,
    pub tsc_khz: Option<u32>,
}

impl Vcpu {
    pub(super) fn new(kvm: &Kvm, vm: &VmFd, mode: Mode, entry: u64) -> Result<Vcpu> {
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
                regs.rsp = 0x7000;
            }
            Mode::Long => {
                let cpuid = kvm
                    .inner()
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .context("KVM_GET_SUPPORTED_CPUID failed")?;
                fd.set_cpuid2(&cpuid).context("KVM_SET_CPUID2 failed")?;
                let code = kvm_segment {
                    base: 0,
                    limit: 0xffff_ffff,
                    selector: 8,
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
                    selector: 0x10,
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
                regs.rsp = layout::IMAGE_BASE;
            }
        }
        fd.set_sregs(&sregs).context("KVM_SET_SREGS failed")?;
        fd.set_regs(&regs).context("KVM_SET_REGS failed")?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(Vcpu { fd, tsc_khz })
    }

    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Registers as one line, for error messages.
    pub fn regs_line(&self) -> String {
        let r = self.fd.get_regs();
        let s = self.fd.get_sregs();
        match (r, s) {
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

    /// Run until HLT, a debug-exit write, an error or the deadline. The
    /// vCPU runs on this thread; a scoped watchdog thread kicks it.
    pub fn run(&mut self, limit: Duration, obs: &mut Observed) -> Result<RunEnd, RunError> {
        let kicker = Kicker::new(&mut self.fd);
        let end = kicker.guard(limit, || self.exit_loop(obs));
        match end {
            Err(RunError::Kvm(e)) if e.errno() == libc::EINTR && kicker.fired() => {
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

    fn exit_loop(&mut self, obs: &mut Observed) -> Result<RunEnd, RunError> {
        loop {
            let exit = self.fd.run()?;
            if obs.first_exit.is_none() {
                obs.first_exit = Some(Instant::now());
            }
            match exit {
                VcpuExit::IoOut(port, data) => {
                    obs.exits.io_out += 1;
                    match port {
                        // A runaway guest must not grow our memory without bound.
                        layout::SERIAL_PORT if obs.serial.len() < 1 << 20 => {
                            obs.serial.extend(data.iter().map(|&b| b as char));
                        }
                        layout::BOOT_TIMER_PORT
                            if data.first() == Some(&layout::BOOT_TIMER_MAGIC)
                                && obs.boot_timer.is_none() =>
                        {
                            obs.boot_timer = Some(Instant::now());
                        }
                        layout::DEBUG_EXIT_PORT => {
                            return Ok(RunEnd::DebugExit(data.first().copied().unwrap_or(0)));
                        }
                        _ => {}
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    obs.exits.io_in += 1;
                    // Serial line status: transmitter always empty; every other
                    // port reads as an absent device (all ones).
                    let v = if port == layout::SERIAL_PORT + 5 {
                        0x60
                    } else {
                        0xff
                    };
                    data.fill(v);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    obs.exits.mmio_write += 1;
                    if addr == layout::RESULT_MMIO && data.len() == 8 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(data);
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
}

/// Kicks a vCPU out of `KVM_RUN`: sets `kvm_run.immediate_exit` (so a
/// `KVM_RUN` that has not started yet returns at once) and signals the vCPU
/// thread (so one that is running returns `EINTR`). Repeats until the vCPU
/// thread has noticed, which closes the race between the two.
pub struct Kicker {
    run: *mut u8,
    fired: AtomicBool,
}

// SAFETY: `run` points into the vCPU's kvm_run mapping and is only written
// (a single byte) while `guard` holds the vCPU borrowed, see `guard`.
unsafe impl Sync for Kicker {}

/// A real-time signal with an empty handler: its only job is to interrupt
/// `KVM_RUN`. Installed once per process without SA_RESTART.
fn kick_signal() -> libc::c_int {
    static INSTALL: Once = Once::new();
    let sig = libc::SIGRTMIN() + 4;
    INSTALL.call_once(|| {
        extern "C" fn noop(_: libc::c_int) {}
        // SAFETY: installing a handler that does nothing is async-signal-safe;
        // the zeroed sigaction is then filled with valid fields.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    });
    sig
}

impl Kicker {
    pub(crate) fn new(fd: &mut VcpuFd) -> Kicker {
        fd.set_kvm_immediate_exit(0);
        let run = fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        // SAFETY: computing the address of a field of the live mapping.
        let imm = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        Kicker {
            run: imm,
            fired: AtomicBool::new(false),
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Run `f` on this thread with a watchdog that kicks it after `limit`.
    pub(crate) fn guard<T>(&self, limit: Duration, f: impl FnOnce() -> T) -> T {
        let sig = kick_signal();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        std::thread::scope(|s| {
            let d = done.clone();
            s.spawn(move || {
                let (lock, cv) = &*d;
                let mut finished = lock.lock().unwrap_or_else(|e| e.into_inner());
                let deadline = crate::deadline(Instant::now(), limit);
                while !*finished {
                    let now = Instant::now();
                    if now >= deadline {
                        self.fired.store(true, Ordering::SeqCst);
                        // SAFETY: the vCPU (and so the kvm_run mapping) is
                        // alive until `f` returns, and `f` cannot return
                        // before we are woken through `finished`.
                        unsafe { self.run.write_volatile(1) };
                        // SAFETY: `me` is the scope's owner thread, alive
                        // until this scoped thread is joined.
                        unsafe { libc::pthread_kill(me, sig) };
                        let (g, _) = cv
                            .wait_timeout(finished, Duration::from_millis(5))
                            .unwrap_or_else(|e| e.into_inner());
                        finished = g;
                        continue;
                    }
                    let (g, _) = cv
                        .wait_timeout(finished, deadline - now)
                        .unwrap_or_else(|e| e.into_inner());
                    finished = g;
                }
            });
            let r = f();
            let (lock, cv) = &*done;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
            r
        })
    }
}
