//! What kind of machine timings were taken on. A latency measured in a
//! QEMU TCG guest says little about hardware, so every measurement carries
//! this label.

use crate::paths::Paths;
use livehost_common::sysfs::{read_attr, read_text};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    /// `hardware`, `vm-kvm`, `vm-tcg` (QEMU's CPU emulator), `vm-other`.
    pub kind: String,
    /// One line for humans.
    pub label: String,
    pub hypervisor_flag: bool,
    /// CPUID leaf 0x40000000 vendor signature, when a hypervisor sets one.
    pub cpuid_hypervisor: Option<String>,
    pub dmi_vendor: Option<String>,
    pub dmi_product: Option<String>,
    pub cpus: usize,
}

#[cfg(target_arch = "x86_64")]
fn cpuid_hypervisor() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x40000000 is reserved
    // for hypervisors and reads as junk-or-zero elsewhere, which we filter.
    #[allow(unused_unsafe)]
    let r = unsafe { __cpuid(0x4000_0000) };
    let mut b = Vec::with_capacity(12);
    for w in [r.ebx, r.ecx, r.edx] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let s: String = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as char)
        .collect();
    (!s.is_empty() && s.chars().all(|c| c.is_ascii_graphic())).then_some(s)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_hypervisor() -> Option<String> {
    None
}

/// Classify from the raw facts; separate from the probing so it is testable.
pub fn classify(
    hypervisor_flag: bool,
    cpuid: Option<&str>,
    dmi_vendor: Option<&str>,
) -> (&'static str, String) {
    if !hypervisor_flag {
        return (
            "hardware",
            "hardware (no hypervisor flag in /proc/cpuinfo)".into(),
        );
    }
    match cpuid {
        Some("KVMKVMKVM") => ("vm-kvm", "virtual machine on KVM (hardware-assisted)".into()),
        Some("TCGTCGTCGTCG") => (
            "vm-tcg",
            "QEMU TCG guest: the CPU is emulated, timings are not hardware figures".into(),
        ),
        _ if dmi_vendor == Some("QEMU") => (
            "vm-tcg",
            "QEMU guest without a KVM signature (TCG): the CPU is emulated, timings are not hardware figures".into(),
        ),
        Some(sig) => ("vm-other", format!("virtual machine (hypervisor {sig})")),
        None => ("vm-other", "virtual machine (unknown hypervisor)".into()),
    }
}

pub fn detect(paths: &Paths) -> Environment {
    let flag = read_text(paths.proc_file("cpuinfo"))
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == "hypervisor"))
        })
        .unwrap_or(false);
    let cpuid = if flag { cpuid_hypervisor() } else { None };
    let vendor = read_attr(paths.sys.join("class/dmi/id/sys_vendor")).ok();
    let product = read_attr(paths.sys.join("class/dmi/id/product_name")).ok();
    let (kind, label) = classify(flag, cpuid.as_deref(), vendor.as_deref());
    Environment {
        kind: kind.into(),
        label,
        hypervisor_flag: flag,
        cpuid_hypervisor: cpuid,
        dmi_vendor: vendor,
        dmi_product: product,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn labels() {
        assert_eq!(classify(false, None, None).0, "hardware");
        assert_eq!(classify(true, Some("KVMKVMKVM"), Some("QEMU")).0, "vm-kvm");
        assert_eq!(classify(true, Some("TCGTCGTCGTCG"), None).0, "vm-tcg");
        assert_eq!(classify(true, None, Some("QEMU")).0, "vm-tcg");
        assert_eq!(classify(true, Some("Microsoft Hv"), None).0, "vm-other");
    }
}
