//! What this host's KVM can do, found out by trying, within a time bound.

use super::boot::{code, run_raw};
use super::{Kvm, Mode, RunEnd};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Under which accelerator a number was taken. Every figure in a report
/// carries one, so emulated numbers are never mistaken for hardware ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Accel {
    /// KVM on bare metal: guest instructions run on the CPU.
    HardwareKvm,
    /// KVM on a host that is itself a guest, guest code running natively.
    NestedKvm,
    /// KVM on a nested host whose KVM emulates the guest's privileged
    /// instructions one by one (this project's build machines).
    NestedEmulatingKvm,
    /// QEMU's binary translator, no KVM.
    Tcg,
    /// No virtualization: a process on the host.
    Native,
}

impl Accel {
    pub fn label(self) -> &'static str {
        match self {
            Accel::HardwareKvm => "hardware KVM",
            Accel::NestedKvm => "nested KVM",
            Accel::NestedEmulatingKvm => "nested, emulating KVM (not hardware figures)",
            Accel::Tcg => "QEMU TCG (emulated)",
            Accel::Native => "native",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub kvm_available: bool,
    pub error: Option<String>,
    pub host_is_guest: bool,
    pub real_mode: Option<String>,
    pub long_mode: Option<String>,
    pub real_mode_ok: bool,
    pub long_mode_ok: bool,
    /// VM creation to first exit (host clock), long-mode hello guest.
    pub create_to_first_exit_us: Option<f64>,
    pub port_exit_ns: Option<f64>,
    /// Guest register-loop iterations per microsecond; on hardware this is
    /// in the thousands, on an emulating host far lower.
    pub guest_loop_per_us: Option<f64>,
    pub host_loop_per_us: f64,
    pub accel: Option<Accel>,
    pub elapsed_ms: f64,
}

fn host_is_guest() -> bool {
    livehost_common::sysfs::read_text("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(false)
}

fn host_loop_per_us(n: u64) -> f64 {
    let t = Instant::now();
    let mut i = std::hint::black_box(n);
    while std::hint::black_box(i) != 0 {
        i -= 1;
    }
    n as f64 / (t.elapsed().as_secs_f64() * 1e6)
}

/// Probe `/dev/kvm`. Each guest gets a slice of `budget` as its deadline,
/// so the whole probe ends within `budget` plus set-up time.
pub fn probe(budget: Duration) -> Probe {
    let start = Instant::now();
    let mut p = Probe {
        kvm_available: false,
        error: None,
        host_is_guest: host_is_guest(),
        real_mode: None,
        long_mode: None,
        real_mode_ok: false,
        long_mode_ok: false,
        create_to_first_exit_us: None,
        port_exit_ns: None,
        guest_loop_per_us: None,
        host_loop_per_us: host_loop_per_us(200_000),
        accel: None,
        elapsed_ms: 0.0,
    };
    let kvm = match Kvm::open() {
        Ok(k) => k,
        Err(e) => {
            p.error = Some(format!("{e:#}"));
            p.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
            return p;
        }
    };
    p.kvm_available = true;
    // Four guests at most, each bounded by its slice: the whole probe stays
    // well inside `budget` even when every guest runs to its deadline.
    let slice = budget / 6;
    let describe = |r: anyhow::Result<(
        Result<RunEnd, super::RunError>,
        super::vcpu::Observed,
        Duration,
    )>,
                    want: &str| match r {
        Ok((Ok(RunEnd::Halted), obs, dt)) if obs.serial == want && obs.boot_timer.is_some() => (
            true,
            format!("ok in {:.0} us", dt.as_secs_f64() * 1e6),
            obs.first_exit,
        ),
        Ok((Ok(end), obs, _)) => (
            false,
            format!("ended {end:?} with serial {:?}", obs.serial),
            None,
        ),
        Ok((Err(e), _, _)) => (false, e.to_string(), None),
        Err(e) => (false, format!("{e:#}"), None),
    };
    let (ok, msg, _) = describe(run_raw(&kvm, Mode::Real, code::REAL_HELLO, slice), "R");
    p.real_mode_ok = ok;
    p.real_mode = Some(msg);
    let t = Instant::now();
    let (ok, msg, first) = describe(run_raw(&kvm, Mode::Long, code::LONG_HELLO, slice), "L");
    p.long_mode_ok = ok;
    p.long_mode = Some(msg);
    p.create_to_first_exit_us = first.map(|f| (f - t).as_secs_f64() * 1e6);
    if ok {
        let n = 200;
        // From the first exit to the end, so VM set-up is not counted.
        if let Ok((Ok(RunEnd::Halted), obs, _)) =
            run_raw(&kvm, Mode::Long, &code::port_loop(n), slice)
            && obs.exits.io_out == n as u64
            && let Some(first) = obs.first_exit
        {
            p.port_exit_ns = Some(first.elapsed().as_nanos() as f64 / (n - 1) as f64);
        }
        let n = 2_000_000;
        if let Ok((Ok(RunEnd::Halted), _, dt)) =
            run_raw(&kvm, Mode::Long, &code::spin_loop(n), slice)
        {
            p.guest_loop_per_us = Some(n as f64 / (dt.as_secs_f64() * 1e6));
        }
    }
    p.accel = if !p.long_mode_ok && !p.real_mode_ok {
        None
    } else if !p.host_is_guest {
        Some(Accel::HardwareKvm)
    } else {
        // A guest loop far slower than the same loop on the host (or one
        // that did not finish in its slice) means the nested KVM is
        // emulating instructions rather than running them.
        match p.guest_loop_per_us {
            Some(g) if g > p.host_loop_per_us * 0.25 => Some(Accel::NestedKvm),
            _ => Some(Accel::NestedEmulatingKvm),
        }
    };
    p.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    p
}
