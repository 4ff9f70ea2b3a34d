//! What this host's KVM can do, found out by trying, within a time bound.
//!
//! The one KVM speed probe: opening `/dev/kvm`, or even running a tiny
//! guest to its first exit, is not enough. On a host that is itself a guest,
//! KVM may run small guests while emulating their real-mode code one
//! instruction at a time, and a Linux kernel (whose boot starts in real
//! mode, as does the firmware) then never gets past its set-up code. So
//! [`speed`] runs a real-mode loop in a VM and times it: hardware-executed,
//! 20,000 iterations take tens of microseconds; emulated, they take
//! milliseconds or never finish.

use crate::{Kvm, Mode, RawRun, RunEnd, Vm, Watchdog, code, layout, run_raw};
use anyhow::{Result, bail};
use kvm_ioctls::VcpuExit;
use livehost_common::host::{Accel, Host};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Real-mode loop iterations per chunk; each chunk ends in a port-I/O exit.
pub const CHUNK: u32 = 20_000;
/// Above this many ns per iteration the CPU is not executing the loop
/// natively (hardware does one in about a nanosecond; allow for slow,
/// loaded and nested-but-hardware-assisted hosts).
pub const NATIVE_NS_PER_ITER: f64 = 50.0;

/// The speed probe's finding, with the reason in words for the user.
#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    /// Guest code runs on the CPU: KVM can boot Linux at hardware speed.
    pub native: bool,
    /// Nanoseconds per real-mode loop iteration, when measured.
    pub ns_per_iteration: Option<f64>,
    /// Why (or why not), in one sentence.
    pub reason: String,
    /// How long the probe took, VM set-up included.
    pub probe_us: u64,
}

/// Time [`code::real_chunked_spin`] in a small VM: the time between port
/// exits after the first, until three chunks ran or `limit` passed (a
/// [`Watchdog`] bounds every `KVM_RUN`).
///
/// ```no_run
/// let s = livehost_kvm::probe::speed(&livehost_kvm::Kvm::open()?, std::time::Duration::from_millis(400))?;
/// println!("{}", s.reason);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn speed(kvm: &Kvm, limit: Duration) -> Result<Speed> {
    let start = Instant::now();
    let vm = Vm::new(kvm, 0x10000)?;
    vm.memory()
        .write(layout::REAL_CODE, &code::real_chunked_spin(CHUNK))?;
    let mut vcpu = vm.vcpu(kvm, Mode::Real, layout::REAL_CODE)?;
    let fd = vcpu.fd();
    let watchdog = Watchdog::new(fd);
    let ns = watchdog.guard(limit, || -> Result<Option<f64>> {
        let deadline = crate::deadline(start, limit);
        let mut first: Option<(Instant, u32)> = None;
        let mut chunks = 0u32;
        loop {
            match fd.run() {
                Ok(VcpuExit::IoOut(layout::NULL_PORT, _)) => chunks += 1,
                Ok(other) => bail!("unexpected exit {other:?} from the probe guest"),
                Err(e) if e.errno() == libc::EINTR => return Ok(None),
                Err(e) => bail!("KVM_RUN failed: {e}"),
            }
            let now = Instant::now();
            // The first chunk includes VM entry set-up; time later ones.
            let (f, at) = *first.get_or_insert((now, chunks));
            if chunks >= at + 2 || (now >= deadline && chunks > at) {
                let iters = (chunks - at) as f64 * CHUNK as f64;
                return Ok(Some(now.duration_since(f).as_nanos() as f64 / iters));
            }
            if now >= deadline {
                return Ok(None);
            }
        }
    })?;
    Ok(judge(ns, start.elapsed()))
}

impl Speed {
    /// The finding when the probe could not run at all.
    pub fn failed(e: &anyhow::Error) -> Speed {
        Speed {
            native: false,
            ns_per_iteration: None,
            reason: format!("KVM is not usable: {e:#}"),
            probe_us: 0,
        }
    }
}

fn judge(ns: Option<f64>, elapsed: Duration) -> Speed {
    let reason = match ns {
        Some(ns) if ns <= NATIVE_NS_PER_ITER => {
            format!("/dev/kvm runs real-mode code natively ({ns:.1} ns per loop iteration)")
        }
        Some(ns) => format!(
            "/dev/kvm emulates real-mode code ({ns:.0} ns per loop iteration, hardware does ~1 ns): \
             a Linux guest would stall in its real-mode setup"
        ),
        None => format!(
            "/dev/kvm did not finish {} real-mode loop iterations in {} ms (emulated or stalled): \
             a Linux guest would stall in its real-mode setup",
            CHUNK * 2,
            elapsed.as_millis()
        ),
    };
    Speed {
        native: ns.is_some_and(|ns| ns <= NATIVE_NS_PER_ITER),
        ns_per_iteration: ns,
        reason,
        probe_us: elapsed.as_micros() as u64,
    }
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Guest register-loop iterations per microsecond (the speed probe's
    /// real-mode loop); on hardware this is in the hundreds or more, on an
    /// emulating host far lower.
    pub guest_loop_per_us: Option<f64>,
    pub host_loop_per_us: f64,
    /// The speed probe's verdict in words.
    pub speed: Option<String>,
    pub accel: Option<Accel>,
    pub elapsed_ms: f64,
}

fn host_loop_per_us(n: u64) -> f64 {
    let t = Instant::now();
    let mut i = std::hint::black_box(n);
    while std::hint::black_box(i) != 0 {
        i -= 1;
    }
    n as f64 / (t.elapsed().as_secs_f64() * 1e6)
}

/// A hello guest's run in words: ok (and when it first exited), or how it
/// went wrong.
fn describe(r: Result<RawRun>, want: &str) -> (bool, String, Option<Instant>) {
    match r {
        Ok(RawRun {
            end: Ok(RunEnd::Halted),
            observed,
            elapsed,
        }) if observed.serial == want && observed.boot_timer.is_some() => (
            true,
            format!("ok in {:.0} us", elapsed.as_secs_f64() * 1e6),
            observed.first_exit,
        ),
        Ok(RawRun {
            end: Ok(end),
            observed,
            ..
        }) => (
            false,
            format!("ended {end:?} with serial {:?}", observed.serial),
            None,
        ),
        Ok(RawRun { end: Err(e), .. }) => (false, e.to_string(), None),
        Err(e) => (false, format!("{e:#}"), None),
    }
}

/// Probe `/dev/kvm`: real- and long-mode hello guests, the port-exit round
/// trip, and the [`speed`] probe. Each guest gets a slice of `budget` as its
/// deadline, so the whole probe ends within `budget` plus set-up time.
///
/// ```no_run
/// let p = livehost_kvm::probe::probe(std::time::Duration::from_secs(1));
/// println!("{:?}: {:?}", p.accel, p.speed);
/// ```
pub fn probe(budget: Duration) -> Probe {
    let start = Instant::now();
    let mut p = Probe {
        kvm_available: false,
        error: None,
        host_is_guest: Host::probe().hypervisor_flag,
        real_mode: None,
        long_mode: None,
        real_mode_ok: false,
        long_mode_ok: false,
        create_to_first_exit_us: None,
        port_exit_ns: None,
        guest_loop_per_us: None,
        host_loop_per_us: host_loop_per_us(200_000),
        speed: None,
        accel: None,
        elapsed_ms: 0.0,
    };
    match Kvm::open() {
        Ok(kvm) => run_guests(&kvm, budget / 6, &mut p),
        Err(e) => p.error = Some(format!("{e:#}")),
    }
    p.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    p
}

/// Four guests at most, each bounded by `slice`: the whole probe stays well
/// inside its budget even when every guest runs to its deadline.
fn run_guests(kvm: &Kvm, slice: Duration, p: &mut Probe) {
    p.kvm_available = true;
    let (ok, msg, _) = describe(run_raw(kvm, Mode::Real, code::REAL_HELLO, slice), "R");
    p.real_mode_ok = ok;
    p.real_mode = Some(msg);
    let t = Instant::now();
    let (ok, msg, first) = describe(run_raw(kvm, Mode::Long, code::LONG_HELLO, slice), "L");
    p.long_mode_ok = ok;
    p.long_mode = Some(msg);
    p.create_to_first_exit_us = first.map(|f| (f - t).as_secs_f64() * 1e6);
    if !p.long_mode_ok && !p.real_mode_ok {
        return;
    }
    if p.long_mode_ok {
        p.port_exit_ns = port_exit_ns(kvm, slice);
    }
    let speed = speed(kvm, slice).unwrap_or_else(|e| Speed::failed(&e));
    p.guest_loop_per_us = speed.ns_per_iteration.map(|ns| 1e3 / ns);
    p.accel = Some(Accel::of_kvm(p.host_is_guest, speed.native));
    p.speed = Some(speed.reason);
}

/// Nanoseconds per port-I/O exit round trip, from the first exit to the
/// end so VM set-up is not counted.
fn port_exit_ns(kvm: &Kvm, slice: Duration) -> Option<f64> {
    let n = 200;
    let r = run_raw(kvm, Mode::Long, &code::port_loop(n), slice).ok()?;
    let first = r.observed.first_exit?;
    (matches!(r.end, Ok(RunEnd::Halted)) && r.observed.exits.io_out == n as u64)
        .then(|| first.elapsed().as_nanos() as f64 / (n - 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_explain_themselves() {
        let fast = judge(Some(1.0), Duration::from_millis(1));
        assert!(fast.native && fast.reason.contains("natively"));
        let slow = judge(Some(900.0), Duration::from_millis(1));
        assert!(!slow.native && slow.reason.contains("emulates"));
        let none = judge(None, Duration::from_millis(400));
        assert!(!none.native && none.reason.contains("400 ms"));
    }
}
