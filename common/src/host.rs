//! Where a number was measured: the one host description and accelerator
//! type every livehost crate and report uses.
//!
//! [`Host::probe`] reads the facts once: the `hypervisor` CPU flag (the one
//! `/proc/cpuinfo` check in the project), the CPUID hypervisor signature, the
//! DMI vendor, the CPU model, the kernel release. [`Accel`] says under which
//! accelerator a guest ran; the KVM speed probe that tells hardware-speed
//! from emulating KVM needs `/dev/kvm`, so it lives in the `livehost-kvm`
//! crate and returns an [`Accel`].

use crate::sysfs::{read_attr, read_text};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What kind of machine this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKind {
    /// No hypervisor flag: bare metal.
    Hardware,
    /// A guest of KVM (hardware-assisted).
    VmKvm,
    /// A QEMU TCG guest: the CPU is emulated.
    VmTcg,
    /// A guest of another or an unknown hypervisor.
    VmOther,
}

impl HostKind {
    /// The serialised name: `hardware`, `vm-kvm`, `vm-tcg`, `vm-other`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware",
            HostKind::VmKvm => "vm-kvm",
            HostKind::VmTcg => "vm-tcg",
            HostKind::VmOther => "vm-other",
        }
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The machine timings were taken on. A latency measured in a QEMU TCG
/// guest says little about hardware, so every measurement carries this.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub kind: HostKind,
    /// One line for humans.
    pub label: String,
    /// `/proc/cpuinfo` lists the `hypervisor` flag: this host is a guest.
    pub hypervisor_flag: bool,
    /// CPUID leaf 0x40000000 vendor signature, when a hypervisor sets one.
    pub cpuid_hypervisor: Option<String>,
    pub dmi_vendor: Option<String>,
    pub dmi_product: Option<String>,
    pub cpus: usize,
    pub cpu_model: String,
    /// The running kernel's release (`uname -r`).
    pub release: String,
}

impl Host {
    /// Probe this host through `/proc` and `/sys`.
    ///
    /// ```
    /// let h = livehost_common::host::Host::probe();
    /// assert!(h.cpus >= 1 && !h.release.is_empty());
    /// ```
    pub fn probe() -> Host {
        Self::probe_at(Path::new("/proc"), Path::new("/sys"))
    }

    /// Probe with `/proc` and `/sys` at other roots (tests use fixtures).
    pub fn probe_at(proc: &Path, sys: &Path) -> Host {
        let cpuinfo = read_text(proc.join("cpuinfo")).unwrap_or_default();
        let flag = hypervisor_flag(&cpuinfo);
        let cpuid = if flag { cpuid_hypervisor() } else { None };
        let vendor = read_attr(sys.join("class/dmi/id/sys_vendor")).ok();
        let product = read_attr(sys.join("class/dmi/id/product_name")).ok();
        let (kind, label) = classify(flag, cpuid.as_deref(), vendor.as_deref());
        Host {
            kind,
            label,
            hypervisor_flag: flag,
            cpuid_hypervisor: cpuid,
            dmi_vendor: vendor,
            dmi_product: product,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(&cpuinfo),
            release: read_attr(proc.join("sys/kernel/osrelease"))
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    /// This host is itself a guest of some hypervisor.
    pub fn is_guest(&self) -> bool {
        self.hypervisor_flag
    }
}

/// Whether a `/proc/cpuinfo` text lists the `hypervisor` CPU flag.
pub fn hypervisor_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|w| w == "hypervisor"))
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
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
) -> (HostKind, String) {
    if !hypervisor_flag {
        return (
            HostKind::Hardware,
            "hardware (no hypervisor flag in /proc/cpuinfo)".into(),
        );
    }
    match cpuid {
        Some("KVMKVMKVM") => (
            HostKind::VmKvm,
            "virtual machine on KVM (hardware-assisted)".into(),
        ),
        Some("TCGTCGTCGTCG") => (
            HostKind::VmTcg,
            "QEMU TCG guest: the CPU is emulated, timings are not hardware figures".into(),
        ),
        _ if dmi_vendor == Some("QEMU") => (
            HostKind::VmTcg,
            "QEMU guest without a KVM signature (TCG): the CPU is emulated, timings are not hardware figures".into(),
        ),
        Some(sig) => (HostKind::VmOther, format!("virtual machine (hypervisor {sig})")),
        None => (HostKind::VmOther, "virtual machine (unknown hypervisor)".into()),
    }
}

/// Under which accelerator a number was taken. Every figure in a report
/// carries one, so emulated numbers are never mistaken for hardware ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    /// KVM on bare metal: guest instructions run on the CPU.
    HardwareKvm,
    /// KVM on a host that is itself a guest, guest code running natively.
    NestedKvm,
    /// KVM on a nested host whose KVM emulates the guest's real-mode and
    /// privileged instructions one by one (this project's build machines).
    NestedEmulatingKvm,
    /// QEMU's binary translator, no KVM.
    Tcg,
    /// No virtualization: a process on the host.
    Native,
}

impl Accel {
    /// Every accelerator, for reading one back from its [`label`](Accel::label).
    pub const ALL: [Accel; 5] = [
        Accel::HardwareKvm,
        Accel::NestedKvm,
        Accel::NestedEmulatingKvm,
        Accel::Tcg,
        Accel::Native,
    ];

    /// The accelerator a [`label`](Accel::label) names (reports that carry
    /// the label, like vmm-bench's rows, are read back through this).
    ///
    /// ```
    /// use livehost_common::host::Accel;
    /// assert_eq!(Accel::from_label("QEMU TCG (emulated)"), Some(Accel::Tcg));
    /// assert_eq!(Accel::from_label("tcg"), None);
    /// ```
    pub fn from_label(label: &str) -> Option<Accel> {
        Accel::ALL.into_iter().find(|a| a.label() == label)
    }

    /// The KVM class of a host from its hypervisor flag and whether the KVM
    /// speed probe saw guest code run at hardware speed.
    ///
    /// ```
    /// use livehost_common::host::Accel;
    /// assert_eq!(Accel::of_kvm(false, false), Accel::HardwareKvm);
    /// assert_eq!(Accel::of_kvm(true, false), Accel::NestedEmulatingKvm);
    /// ```
    pub fn of_kvm(host_is_guest: bool, runs_natively: bool) -> Accel {
        match (host_is_guest, runs_natively) {
            (false, _) => Accel::HardwareKvm,
            (true, true) => Accel::NestedKvm,
            (true, false) => Accel::NestedEmulatingKvm,
        }
    }

    /// KVM that runs guest code on the CPU, so it can boot Linux (whose
    /// start runs in real mode) at hardware speed.
    pub fn is_native_kvm(self) -> bool {
        matches!(self, Accel::HardwareKvm | Accel::NestedKvm)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(classify(false, None, None).0, HostKind::Hardware);
        let kvm = classify(true, Some("KVMKVMKVM"), Some("QEMU")).0;
        assert_eq!(kvm, HostKind::VmKvm);
        assert_eq!(
            classify(true, Some("TCGTCGTCGTCG"), None).0,
            HostKind::VmTcg
        );
        assert_eq!(classify(true, None, Some("QEMU")).0, HostKind::VmTcg);
        let other = classify(true, Some("Microsoft Hv"), None).0;
        assert_eq!(other, HostKind::VmOther);
    }

    #[test]
    fn kinds_serialise_as_before() {
        let s = serde_json::to_string(&[HostKind::Hardware, HostKind::VmTcg]).unwrap();
        assert_eq!(s, r#"["hardware","vm-tcg"]"#);
        assert_eq!(
            serde_json::to_string(&Accel::HardwareKvm).unwrap(),
            r#""HardwareKvm""#
        );
    }

    #[test]
    fn every_accel_reads_back_from_its_label() {
        for a in Accel::ALL {
            assert_eq!(Accel::from_label(a.label()), Some(a));
        }
    }

    #[test]
    fn flag_only_counts_in_the_flags_line() {
        assert!(hypervisor_flag("flags\t\t: fpu hypervisor sse\n"));
        assert!(!hypervisor_flag("model name\t: hypervisor\nflags : fpu\n"));
    }

    #[test]
    fn probe_at_fixture_roots() {
        let d = std::env::temp_dir().join(format!("livehost-host-{}", std::process::id()));
        std::fs::create_dir_all(d.join("sys/kernel")).unwrap();
        std::fs::write(d.join("cpuinfo"), "model name : Test CPU\nflags : fpu\n").unwrap();
        std::fs::write(d.join("sys/kernel/osrelease"), "6.1.0-test\n").unwrap();
        let h = Host::probe_at(&d, &d.join("nosys"));
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(
            (h.kind, h.cpu_model.as_str()),
            (HostKind::Hardware, "Test CPU")
        );
        assert_eq!(h.release, "6.1.0-test");
    }
}
