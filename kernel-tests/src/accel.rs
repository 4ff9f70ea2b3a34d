//! Choosing QEMU's accelerator: KVM only when it can really boot Linux.
//!
//! Opening `/dev/kvm`, or even running a tiny guest to its first exit, is not
//! enough: on a host that is itself a guest, KVM may run small guests while
//! emulating their real-mode code one instruction at a time, and a Linux
//! kernel (whose boot starts in real mode, as does the firmware) then never
//! gets past its setup code. So the probe runs a real-mode loop in a VM and
//! times it: hardware-executed, 20,000 iterations take tens of microseconds;
//! emulated, they take milliseconds or never finish. The probe costs about
//! a millisecond on hardware and is bounded by a watchdog everywhere.

use anyhow::{Context, Result, bail};
use kvm_ioctls::{Kvm, VcpuExit};
use livehost_common::guest_mem::GuestMem;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The accelerator a guest actually ran under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when the probe says it runs real-mode code natively, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => AccelChoice::Auto,
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            _ => bail!("unknown accelerator {s:?}: use auto, kvm or tcg"),
        })
    }
}

/// The probe's finding, with the reason in words for the user.
#[derive(Debug, Clone, Serialize)]
pub struct KvmProbe {
    /// KVM can boot a Linux guest at hardware speed.
    pub usable: bool,
    /// Why (or why not), in one sentence.
    pub reason: String,
    /// Nanoseconds per real-mode loop iteration, when measured.
    pub ns_per_iteration: Option<f64>,
    /// How long the probe took.
    pub probe_us: u64,
}

/// Real-mode loop iterations per chunk; each chunk ends in a port-I/O exit.
const CHUNK: u32 = 20_000;
/// Above this many ns per iteration the CPU is not executing the loop
/// natively (hardware does one in about a nanosecond; allow for slow,
/// loaded and nested-but-hardware-assisted hosts).
const NATIVE_NS_PER_ITER: f64 = 50.0;
/// The whole probe's time bound.
const PROBE_DEADLINE: Duration = Duration::from_millis(400);

/// Probe once per process; the answer does not change while we run.
pub fn probe_kvm() -> KvmProbe {
    static PROBE: OnceLock<KvmProbe> = OnceLock::new();
    PROBE.get_or_init(run_probe).clone()
}

/// Decide which accelerator to use for `choice`.
pub fn resolve(choice: AccelChoice) -> Result<(Accel, String)> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, "TCG (asked for)".into())),
        AccelChoice::Kvm => {
            let p = probe_kvm();
            if !std::path::Path::new("/dev/kvm").exists() {
                bail!(
                    "--accel kvm asked for, but /dev/kvm does not exist: load kvm or use --accel auto"
                );
            }
            if !p.usable {
                // The user insisted; warn, because the boot will likely stall.
                Ok((
                    Accel::Kvm,
                    format!(
                        "KVM (asked for; warning: {}; the boot will likely stall)",
                        p.reason
                    ),
                ))
            } else {
                Ok((Accel::Kvm, format!("KVM (asked for; {})", p.reason)))
            }
        }
        AccelChoice::Auto => {
            let p = probe_kvm();
            if p.usable {
                Ok((Accel::Kvm, format!("KVM ({})", p.reason)))
            } else {
                Ok((Accel::Tcg, format!("TCG, because {}", p.reason)))
            }
        }
    }
}

fn run_probe() -> KvmProbe {
    let start = Instant::now();
    let mut p = match probe_inner() {
        Ok(p) => p,
        Err(e) => KvmProbe {
            usable: false,
            reason: format!("KVM is not usable: {e:#}"),
            ns_per_iteration: None,
            probe_us: 0,
        },
    };
    p.probe_us = start.elapsed().as_micros() as u64;
    p
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Register `mem` as slot 0 at guest physical address 0.
///
/// # Safety
/// The VM must be dropped before `mem`.
unsafe fn attach(mem: &GuestMem, vm: &kvm_ioctls::VmFd) -> Result<()> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem.len() as u64,
        userspace_addr: mem.host_addr(),
        flags: 0,
    };
    // SAFETY: the region is a live mapping the caller keeps longer than the VM.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION failed")
}

/// Result of running a minimal 64-bit guest to its first exit.
#[derive(Debug, Clone, Serialize)]
pub struct LongModeProbe {
    /// Microseconds from KVM_CREATE_VM to the guest's first port-I/O exit.
    pub create_to_first_exit_us: u64,
    /// The guest then halted as its code says.
    pub halted: bool,
}

/// Run a 64-bit long-mode guest (identity-mapped 2 MiB page, code at
/// 0x1000 doing `out 0x10, al; hlt`) to its first exit. Proves that KVM's
/// long-mode path works, e.g. on nested SVM inside a test guest.
pub fn probe_long_mode() -> Result<LongModeProbe> {
    let t0 = Instant::now();
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    let mut mem = GuestMem::new(0x10000)?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
    // Page tables: PML4 at 0x2000 -> PDPT at 0x3000 -> PD at 0x4000 whose
    // first entry maps 0..2 MiB as one large page.
    mem.write(0x2000, &(0x3000u64 | 0x3).to_le_bytes());
    mem.write(0x3000, &(0x4000u64 | 0x3).to_le_bytes());
    mem.write(0x4000, &(0x83u64).to_le_bytes());
    mem.write(0x1000, &[0xe6, 0x10, 0xf4]);
    // SAFETY: `vm` is dropped before `mem` (explicitly, below).
    unsafe { attach(&mem, &vm)? };
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
    let mut sregs = vcpu.get_sregs()?;
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_bindings::kvm_segment {
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
    sregs.cr3 = 0x2000;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 1 | (1 << 4) | (1 << 31); // PE, ET, PG
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs)
        .context("KVM_SET_SREGS (long mode) failed")?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    regs.rsp = 0x8000;
    vcpu.set_regs(&regs)?;
    let first = match vcpu.run() {
        Ok(VcpuExit::IoOut(0x10, _)) => t0.elapsed(),
        Ok(other) => bail!("64-bit probe guest: expected a port-I/O exit, got {other:?}"),
        Err(e) => bail!("64-bit probe guest: KVM_RUN failed: {e}"),
    };
    let halted = matches!(vcpu.run(), Ok(VcpuExit::Hlt));
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(LongModeProbe {
        create_to_first_exit_us: first.as_micros() as u64,
        halted,
    })
}

fn probe_inner() -> Result<KvmProbe> {
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    let mut mem = GuestMem::new(0x10000)?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM failed")?;
    let n = CHUNK.to_le_bytes();
    #[rustfmt::skip]
    let code: [u8; 14] = [
        0x66, 0xb9, n[0], n[1], n[2], n[3], // again: mov ecx, CHUNK
        0x66, 0x49,                         // spin:  dec ecx
        0x75, 0xfc,                         //        jnz spin
        0xe6, 0x10,                         //        out 0x10, al
        0xeb, 0xf2,                         //        jmp again
    ];
    mem.write(0x1000, &code);
    // SAFETY: `vm` is dropped before `mem` (explicitly, below).
    unsafe { attach(&mem, &vm)? };
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU failed")?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;

    // A watchdog kicks the vCPU out of KVM_RUN with a signal if the guest
    // does not exit in time (emulated real mode may take very long).
    // SAFETY: installing a handler that does nothing; no SA_RESTART so the
    // ioctl returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
    }
    let done = std::sync::Arc::new(AtomicBool::new(false));
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let wd_done = done.clone();
    let deadline = Instant::now() + PROBE_DEADLINE;
    let watchdog = std::thread::spawn(move || {
        while !wd_done.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                // SAFETY: the probing thread is alive until it sets `done`
                // and joins us.
                unsafe { libc::pthread_kill(me, libc::SIGUSR2) };
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });

    let mut chunks = 0u32;
    let mut first_exit: Option<Instant> = None;
    let mut result: Result<Option<f64>> = Ok(None);
    let t0 = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x10, _)) => {
                let now = Instant::now();
                chunks += 1;
                match first_exit {
                    // The first chunk includes VM entry setup; time later ones.
                    None => first_exit = Some(now),
                    Some(f) if chunks >= 3 || now >= deadline => {
                        let iters = (chunks - 1) as f64 * CHUNK as f64;
                        result = Ok(Some(now.duration_since(f).as_nanos() as f64 / iters));
                        break;
                    }
                    Some(_) => {}
                }
                if now >= deadline {
                    break;
                }
            }
            Ok(other) => {
                result = Err(anyhow::anyhow!(
                    "unexpected exit {other:?} from the probe guest"
                ));
                break;
            }
            Err(e) if e.errno() == libc::EINTR => break,
            Err(e) => {
                result = Err(anyhow::anyhow!("KVM_RUN failed: {e}"));
                break;
            }
        }
    }
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    drop(vcpu);
    drop(vm);
    drop(mem);
    let elapsed = t0.elapsed();
    match result? {
        Some(ns) if ns <= NATIVE_NS_PER_ITER => Ok(KvmProbe {
            usable: true,
            reason: format!(
                "/dev/kvm runs real-mode code natively ({ns:.1} ns per loop iteration)"
            ),
            ns_per_iteration: Some(ns),
            probe_us: 0,
        }),
        Some(ns) => Ok(KvmProbe {
            usable: false,
            reason: format!(
                "/dev/kvm emulates real-mode code ({ns:.0} ns per loop iteration, hardware does ~1 ns): \
                 a Linux guest would stall in its real-mode setup"
            ),
            ns_per_iteration: Some(ns),
            probe_us: 0,
        }),
        None => Ok(KvmProbe {
            usable: false,
            reason: format!(
                "/dev/kvm did not finish {} real-mode loop iterations in {} ms (emulated or stalled): \
                 a Linux guest would stall in its real-mode setup",
                CHUNK * 2,
                elapsed.as_millis()
            ),
            ns_per_iteration: None,
            probe_us: 0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_bounded_and_explains_itself() {
        let t = Instant::now();
        let p = probe_kvm();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "probe took {:?}",
            t.elapsed()
        );
        assert!(!p.reason.is_empty());
        eprintln!("probe: {p:?}");
    }

    #[test]
    fn choice_parses() {
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("xen".parse::<AccelChoice>().is_err());
    }
}
