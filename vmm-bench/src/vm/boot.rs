//! Whole runs: the unikernel with the workload, and raw code blobs (probe,
//! bad-guest tests, the exit round-trip comparison).

use super::{Kvm, Mode, Observed, Phases, RunEnd, RunError, Vm, Watchdog, elf, layout};
use anyhow::{Context, Result, bail};
use livehost_kvm::us;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The unikernel image built by build.rs.
pub static UNIKERNEL: &[u8] = include_bytes!(env!("VMM_BENCH_UNIKERNEL"));

#[derive(Debug, Clone)]
pub struct UnikernelRun<'a> {
    pub image: &'a [u8],
    pub kib: u64,
    pub seed: u64,
    pub loop_n: u64,
    pub timeout: Duration,
}

impl Default for UnikernelRun<'_> {
    fn default() -> Self {
        UnikernelRun {
            image: UNIKERNEL,
            kib: 64,
            seed: vmm_bench_workload::DEFAULT_SEED,
            loop_n: 1000,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What one unikernel boot in our VMM measured.
#[derive(Debug, Clone, Serialize)]
pub struct UnikernelReport {
    pub checksum: u64,
    pub ram_bytes: u64,
    pub phases: Phases,
    /// Launch (before KVM_CREATE_VM) to the guest's boot-timer write, host clock.
    pub boot_timer_us: f64,
    /// Launch to the first exit of any kind, host clock.
    pub first_exit_us: f64,
    /// Launch to the final HLT, host clock.
    pub total_us: f64,
    pub tsc_khz: Option<u32>,
    /// Guest-reported boot: first instruction to the boot-timer write, from
    /// the guest's TSC and the vCPU's TSC rate.
    pub guest_boot_us: Option<f64>,
    pub guest_workload_us: Option<f64>,
    pub guest_port_exit_ns: Option<f64>,
    pub guest_cpuid_ns: Option<f64>,
    pub guest_call_ns: Option<f64>,
    pub loop_n: u64,
    pub exits: super::ExitCounts,
    pub serial: String,
    /// Process RSS minus the guest RAM that is resident: the VMM's own cost.
    pub vmm_overhead_bytes: Option<u64>,
}

/// Boot the unikernel in our VMM in 64-bit mode and run the workload.
pub fn run_unikernel(kvm: &Kvm, cfg: &UnikernelRun) -> Result<UnikernelReport> {
    crate::check_kib(cfg.kib)?;
    let ram = (layout::BUF_BASE + (cfg.kib << 10)).next_multiple_of(1 << 20) as usize + (1 << 20);
    let launch = Instant::now();
    let mut phases = Phases::default();
    let vm = Vm::new_timed(kvm, ram, &mut phases)?;
    let t = Instant::now();
    let img = elf::parse(cfg.image, ram).context("refusing the unikernel image")?;
    elf::load(&vm, cfg.image, &img)?;
    for (off, v) in [
        (layout::mb::MAGIC, layout::MAILBOX_MAGIC),
        (layout::mb::BUF_ADDR, layout::BUF_BASE),
        (layout::mb::BUF_LEN, cfg.kib << 10),
        (layout::mb::SEED, cfg.seed),
        (layout::mb::LOOP_N, cfg.loop_n),
    ] {
        vm.memory().write(layout::MAILBOX + off, &v.to_le_bytes())?;
    }
    phases.load_us = us(t.elapsed());
    let t = Instant::now();
    let mut vcpu = vm.vcpu(kvm, Mode::Long, img.entry)?;
    phases.vcpu_us = us(t.elapsed());
    let mut obs = Observed::default();
    let end = vcpu.run(cfg.timeout, &mut obs)?;
    let total_us = us(launch.elapsed());
    if end != RunEnd::Halted {
        bail!(
            "unikernel ended with {end:?} instead of HLT; serial: {}",
            obs.serial
        );
    }
    let rd = |o| vm.memory().read_u64(layout::MAILBOX + o);
    if rd(layout::mb::DONE)? != 1 {
        bail!(
            "unikernel halted without reporting results; serial output: {:?}",
            obs.serial
        );
    }
    let checksum = rd(layout::mb::CHECKSUM)?;
    if obs.mmio_result != Some(checksum) {
        bail!(
            "checksum over MMIO ({:?}) differs from the mailbox ({checksum:#x})",
            obs.mmio_result
        );
    }
    let khz = vcpu.tsc_khz.filter(|&k| k > 0);
    let cyc_us = |c: u64| khz.map(|k| c as f64 / k as f64 * 1000.0);
    let per_ns = |c: u64| khz.map(|k| c as f64 / k as f64 * 1e6 / cfg.loop_n.max(1) as f64);
    let rss = crate::host::self_rss_bytes();
    let resident = vm.memory().resident_bytes();
    Ok(UnikernelReport {
        checksum,
        ram_bytes: ram as u64,
        boot_timer_us: obs
            .boot_timer
            .map(|t| us(t - launch))
            .context("the unikernel never wrote the boot timer")?,
        first_exit_us: obs.first_exit.map(|t| us(t - launch)).unwrap_or(total_us),
        total_us,
        tsc_khz: khz,
        guest_boot_us: cyc_us(
            rd(layout::mb::TSC_READY)?.saturating_sub(rd(layout::mb::TSC_ENTRY)?),
        ),
        guest_workload_us: cyc_us(rd(layout::mb::WORKLOAD_CYC)?),
        guest_port_exit_ns: per_ns(rd(layout::mb::PORT_CYC)?),
        guest_cpuid_ns: per_ns(rd(layout::mb::CPUID_CYC)?),
        guest_call_ns: per_ns(rd(layout::mb::CALL_CYC)?),
        loop_n: cfg.loop_n,
        exits: obs.exits,
        serial: obs.serial,
        vmm_overhead_bytes: rss.map(|r| r.saturating_sub(resident)),
        phases,
    })
}

/// Run raw machine code in a 4 MiB guest ([`livehost_kvm::run_raw`]):
/// how it ended, what was observed, and the time from VM creation on.
pub fn run_raw(
    kvm: &Kvm,
    mode: Mode,
    code: &[u8],
    limit: Duration,
) -> Result<(Result<RunEnd, RunError>, Observed, Duration)> {
    let r = livehost_kvm::run_raw(kvm, mode, code, limit)?;
    Ok((r.end, r.observed, r.elapsed))
}

/// Machine code for the guests the probe and tests use.
pub use livehost_kvm::code;

/// The exit round trip through our VMM's full exit loop versus a bare
/// `KVM_RUN` loop that does nothing but re-enter, measured alternately in
/// one run on the same kind of guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitCompare {
    pub exits_per_sample: u32,
    pub samples: usize,
    pub vmm_ns: f64,
    pub bare_ns: f64,
    /// Every sample (ns per exit), in the order taken.
    pub vmm_samples: Vec<f64>,
    pub bare_samples: Vec<f64>,
    /// vmm / bare - 1, in percent.
    pub overhead_pct: f64,
}

pub fn compare_exit_loops(kvm: &Kvm, n: u32, samples: usize) -> Result<ExitCompare> {
    if n == 0 || samples == 0 {
        bail!(
            "the exit comparison needs at least one exit per sample and one sample (got {n} exits, {samples} samples)"
        );
    }
    let code = code::port_loop(n);
    let mut vmm = Vec::new();
    let mut bare = Vec::new();
    // Warm both paths once, then alternate which goes first so drift on a
    // noisy host falls on both alike.
    time_vmm_loop(kvm, &code, n)?;
    time_bare_loop(kvm, &code, n)?;
    for i in 0..samples {
        if i % 2 == 0 {
            vmm.push(time_vmm_loop(kvm, &code, n)?);
            bare.push(time_bare_loop(kvm, &code, n)?);
        } else {
            bare.push(time_bare_loop(kvm, &code, n)?);
            vmm.push(time_vmm_loop(kvm, &code, n)?);
        }
    }
    let med = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let (v, b) = (med(&vmm), med(&bare));
    Ok(ExitCompare {
        exits_per_sample: n,
        samples,
        vmm_ns: v,
        bare_ns: b,
        vmm_samples: vmm,
        bare_samples: bare,
        overhead_pct: (v / b - 1.0) * 100.0,
    })
}

fn time_vmm_loop(kvm: &Kvm, code: &[u8], n: u32) -> Result<f64> {
    let vm = Vm::new(kvm, layout::MIN_RAM)?;
    vm.memory().write(layout::IMAGE_BASE, code)?;
    let mut vcpu = vm.vcpu(kvm, Mode::Long, layout::IMAGE_BASE)?;
    let mut obs = Observed::default();
    let t = Instant::now();
    vcpu.run(Duration::from_secs(30), &mut obs)?;
    let dt = t.elapsed();
    if obs.exits.io_out != n as u64 {
        bail!("expected {n} port exits, saw {}", obs.exits.io_out);
    }
    Ok(dt.as_nanos() as f64 / n as f64)
}

fn time_bare_loop(kvm: &Kvm, code: &[u8], n: u32) -> Result<f64> {
    let vm = Vm::new(kvm, layout::MIN_RAM)?;
    vm.memory().write(layout::IMAGE_BASE, code)?;
    let mut vcpu = vm.vcpu(kvm, Mode::Long, layout::IMAGE_BASE)?;
    let fd = vcpu.fd();
    // The same watchdog as the VMM's loop, timed the same way: from before
    // the watchdog (and its thread) is made, as `vcpu.run` is timed.
    let t = Instant::now();
    let watchdog = Watchdog::new(fd);
    watchdog.guard(Duration::from_secs(30), || {
        let mut seen = 0u64;
        // The physical limit: nothing between two KVM_RUNs but the match.
        loop {
            match fd.run().context("KVM_RUN failed in the bare loop")? {
                livehost_kvm::VcpuExit::IoOut(..) => seen += 1,
                livehost_kvm::VcpuExit::Hlt => break,
                other => bail!("bare loop: unexpected exit {other:?}"),
            }
            if seen > n as u64 {
                bail!("bare loop: guest ran past {n} exits");
            }
        }
        Ok(t.elapsed().as_nanos() as f64 / n as f64)
    })
}
