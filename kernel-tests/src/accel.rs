//! Choosing QEMU's accelerator: KVM only when it can really boot Linux.
//!
//! The decision rests on the one KVM speed probe, `livehost_kvm::probe::speed`
//! (a real-mode loop timed in a VM; see there why opening `/dev/kvm` is not
//! enough). It costs about a millisecond on hardware and is bounded by a
//! watchdog everywhere.

use crate::qemu::Accel;
use anyhow::{Result, bail};
use livehost_kvm::probe::Speed;
use livehost_kvm::{Kvm, Mode, RunEnd, code, run_raw};
use serde::Serialize;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

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

/// The speed probe's time bound.
const PROBE_DEADLINE: Duration = Duration::from_millis(400);

/// Probe once per process; the answer does not change while we run.
pub fn probe_kvm() -> Speed {
    static PROBE: OnceLock<Speed> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            Kvm::open()
                .and_then(|kvm| livehost_kvm::probe::speed(&kvm, PROBE_DEADLINE))
                .unwrap_or_else(|e| Speed::failed(&e))
        })
        .clone()
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
            if !p.native {
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
            if p.native {
                Ok((Accel::Kvm, format!("KVM ({})", p.reason)))
            } else {
                Ok((Accel::Tcg, format!("TCG, because {}", p.reason)))
            }
        }
    }
}

/// The vendor KVM module for a guest: under TCG `-cpu max` emulates SVM,
/// so `kvm_amd`; under KVM the guest sees the host's vendor.
pub fn kvm_vendor_module(choice: AccelChoice) -> &'static str {
    let intel = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains("GenuineIntel"))
        .unwrap_or(false);
    match resolve(choice).map(|(a, _)| a) {
        Ok(Accel::Kvm) if intel => "kvm_intel",
        _ => "kvm_amd",
    }
}

/// Result of running a minimal 64-bit guest.
#[derive(Debug, Clone, Serialize)]
pub struct LongModeProbe {
    /// Microseconds from KVM_CREATE_VM to the guest's first exit.
    pub create_to_first_exit_us: u64,
    /// The guest then halted as its code says.
    pub halted: bool,
}

/// Run the long-mode hello guest of `livehost_kvm::code`. Proves that KVM's
/// long-mode path works, e.g. on nested SVM inside a test guest.
pub fn probe_long_mode() -> Result<LongModeProbe> {
    let kvm = Kvm::open()?;
    let t0 = std::time::Instant::now();
    let r = run_raw(&kvm, Mode::Long, code::LONG_HELLO, Duration::from_secs(10))?;
    let first = r
        .observed
        .first_exit
        .ok_or_else(|| anyhow::anyhow!("64-bit probe guest never exited: {:?}", r.end))?;
    Ok(LongModeProbe {
        create_to_first_exit_us: (first - t0).as_micros() as u64,
        halted: matches!(r.end, Ok(RunEnd::Halted)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
