//! The verdicts: each figure others publish (the seed's 4% image claim,
//! Firecracker, TinyKVM, Unikraft) against what this pass measured. Under
//! emulation a verdict says so: it describes this host, not hardware.

use super::{Claim, Findings};
use crate::vm::boot::ExitCompare;
use crate::vm::probe::Accel;

const OUR_VMM: &str = "unikernel on our VMM";

/// "met" / "not met", qualified when the KVM was not hardware.
struct Verdict(Option<Accel>);

impl Verdict {
    fn of(&self, ok: bool) -> String {
        let word = if ok { "met" } else { "not met" };
        match self.0 {
            Some(a) if a != Accel::HardwareKvm => {
                format!(
                    "{word} (measured under {}, not a hardware verdict)",
                    a.label()
                )
            }
            _ => word.into(),
        }
    }
}

pub(super) fn claims(f: &Findings, ec: Option<&ExitCompare>, kvm: Option<Accel>) -> Vec<Claim> {
    let v = Verdict(kvm);
    let mut out = vec![image_size(f)];
    if let Some(c) = ec {
        out.push(Claim {
            claim: "our VMM's exit round trip within 5% of a bare KVM_RUN loop".into(),
            measured: format!(
                "{:.0} ns vs {:.0} ns = {:+.1}% (median of {} alternating samples of {} exits)",
                c.vmm_ns, c.bare_ns, c.overhead_pct, c.samples, c.exits_per_sample
            ),
            verdict: v.of(c.overhead_pct <= 5.0),
        });
    }
    out.extend(vmm_start(f, &v));
    out.extend(vmm_memory(f));
    // Start ends where the workload's first instruction runs (its own
    // timestamp); the real container, not the namespaced process.
    if let Some(x) = f.find(
        "container",
        "launch to exec (the workload's first instruction)",
    ) {
        let exit = f.find("container", "launch to exit").unwrap_or(f64::NAN);
        out.push(Claim {
            claim: "container (own read-only root, reduced privileges) starts without a network namespace in <= 3 ms".into(),
            measured: format!(
                "{:.2} ms launch to exec (median; {:.2} ms to exit)",
                x / 1e3,
                exit / 1e3
            ),
            verdict: if x <= 3000.0 { "met" } else { "not met" }.into(),
        });
    }
    out
}

/// The seed claim: a unikernel image is ~4% of a VM image.
fn image_size(f: &Findings) -> Claim {
    let claim = "a unikernel image is ~4% of a VM image (seed claim)".to_string();
    match (
        f.find("unikernel", "image (ELF)"),
        f.find("Linux VM image", "kernel + initramfs"),
    ) {
        (Some(u), Some(l)) => Claim {
            claim,
            measured: format!(
                "{:.1} KiB vs {:.0} KiB kernel+initramfs = {:.3}%",
                u,
                l,
                u / l * 100.0
            ),
            verdict: if u / l <= 0.04 {
                "holds for this unikernel (smaller than 4%)"
            } else {
                "does not hold (larger than 4%)"
            }
            .into(),
        },
        _ => Claim {
            claim,
            measured: format!(
                "kernel image unavailable: {}",
                f.skipped
                    .iter()
                    .find(|k| k.path == "Linux VM image")
                    .map_or("not sized", |k| k.reason.as_str())
            ),
            verdict: "not tested".into(),
        },
    }
}

/// Start-up of our VMM against TinyKVM and Unikraft.
fn vmm_start(f: &Findings, v: &Verdict) -> Vec<Claim> {
    let mut out = vec![];
    if let Some(x) = f.find(OUR_VMM, "create to first exit") {
        out.push(Claim {
            claim: "VM create to first guest instruction <= 300 us (TinyKVM 315 us)".into(),
            measured: format!("{x:.0} us to the first exit"),
            verdict: v.of(x <= 300.0),
        });
    }
    if let Some(x) = f.find(OUR_VMM, "guest boot (entry to boot timer)") {
        out.push(Claim {
            claim: "unikernel boot <= 100 us guest time".into(),
            measured: format!("{x:.1} us"),
            verdict: v.of(x <= 100.0),
        });
    }
    if let Some(x) = f.find(OUR_VMM, "launch to boot timer") {
        out.push(Claim {
            claim: "unikernel boot <= 3 ms end to end (Unikraft ~3 ms)".into(),
            measured: format!("{:.2} ms launch to boot timer", x / 1e3),
            verdict: v.of(x <= 3000.0),
        });
    }
    out
}

/// Our VMM's memory against Firecracker's 5 MiB.
fn vmm_memory(f: &Findings) -> Option<Claim> {
    let x = f
        .rows
        .iter()
        .find(|r| r.path == OUR_VMM && r.metric.starts_with("VMM process RSS"))
        .map(|r| r.value)?;
    Some(Claim {
        claim: "VMM memory overhead <= 5 MiB (Firecracker)".into(),
        measured: format!("{:.1} MiB", x / 1024.0),
        verdict: if x <= 5.0 * 1024.0 {
            "met"
        } else {
            "not met by this upper bound"
        }
        .into(),
    })
}
