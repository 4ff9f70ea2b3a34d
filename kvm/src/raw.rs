//! Running a raw code blob in a small throw-away guest.

use crate::{Kvm, Mode, Observed, RunEnd, RunError, Vm, layout};
use anyhow::Result;
use std::time::{Duration, Instant};

/// How a raw run went.
pub struct RawRun {
    /// How the guest ended.
    pub end: Result<RunEnd, RunError>,
    /// What the exit loop saw.
    pub observed: Observed,
    /// From before `KVM_CREATE_VM` to the end of the run.
    pub elapsed: Duration,
}

/// Run raw machine code at [`layout::CODE_BASE`] (long mode) or
/// [`layout::REAL_CODE`] (real mode) in a [`layout::MIN_RAM`] guest, through
/// [`Vcpu::run`](crate::Vcpu::run) with deadline `limit`.
///
/// ```no_run
/// use livehost_kvm::{Kvm, Mode, RunEnd, code, run_raw};
/// let r = run_raw(&Kvm::open()?, Mode::Long, code::LONG_HELLO, std::time::Duration::from_secs(1))?;
/// assert_eq!(r.end?, RunEnd::Halted);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn run_raw(kvm: &Kvm, mode: Mode, code: &[u8], limit: Duration) -> Result<RawRun> {
    let launch = Instant::now();
    let vm = Vm::new(kvm, layout::MIN_RAM)?;
    let at = match mode {
        Mode::Real => layout::REAL_CODE,
        Mode::Long => layout::CODE_BASE,
    };
    vm.memory().write(at, code)?;
    let mut vcpu = vm.vcpu(kvm, mode, at)?;
    let mut observed = Observed::default();
    let end = vcpu.run(limit, &mut observed);
    Ok(RawRun {
        end,
        observed,
        elapsed: launch.elapsed(),
    })
}
