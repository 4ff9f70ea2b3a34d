//! The VMX exit-reason read without VMX hardware (QEMU emulates SVM only):
//! the kvm_exit program reads `vcpu_vmx.exit_reason.full` from the
//! `struct kvm_vcpu` the tracepoint passes, assuming `vcpu` sits at the
//! start of `struct vcpu_vmx` (or, from Linux 6.16, `vcpu_vmx.vt.exit_reason`).
//! Checked here against the BTF of the `kvm-intel.ko` Debian ships for 6.1
//! and 6.12 (split BTF on the same package's vmlinux), read by bpftool.

use kernel_tests::KernelSpec;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The members of a struct or union in bpftool's text dump:
/// (name, type id, bit offset).
fn members(dump: &str, kind: &str, name: &str) -> Option<Vec<(String, u64, u64)>> {
    let head = format!("{kind} '{name}' ");
    let mut lines = dump.lines().skip_while(|l| !l.contains(&head));
    lines.next()?;
    let mut out = Vec::new();
    for l in lines.take_while(|l| l.starts_with('\t')) {
        let l = l.trim();
        let (name, rest) = l.strip_prefix('\'')?.split_once("' type_id=")?;
        let (id, rest) = rest.split_once(' ')?;
        let bits = rest.strip_prefix("bits_offset=")?.split(' ').next()?;
        out.push((name.to_string(), id.parse().ok()?, bits.parse().ok()?));
    }
    Some(out)
}

/// The name of BTF type `id` in the dump (`[id] KIND 'name' ...`).
fn type_name(dump: &str, id: u64) -> Option<String> {
    let head = format!("[{id}] ");
    let line = dump.lines().find(|l| l.starts_with(&head))?;
    Some(line.split('\'').nth(1)?.to_string())
}

/// kvm-intel.ko of `modules`, decompressed if the package ships it xz'd.
fn kvm_intel(modules: &Path, into: &Path) -> PathBuf {
    let dir = modules.join("kernel/arch/x86/kvm");
    let plain = dir.join("kvm-intel.ko");
    if plain.exists() {
        return plain;
    }
    let xz = dir.join("kvm-intel.ko.xz");
    let out = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .output()
        .expect("xz (Debian package xz-utils)");
    assert!(out.status.success(), "xz -dc {}", xz.display());
    let ko = into.join("kvm-intel.ko");
    std::fs::write(&ko, out.stdout).unwrap();
    ko
}

fn check(spec: &str) {
    let k = kernel_tests::fetch(&spec.parse::<KernelSpec>().unwrap()).expect("kernel fetched");
    let vmlinux = kernel_tests::pvh::image_for(&k.bzimage).expect("vmlinux ELF with .BTF");
    let tmp = tempfile::tempdir().unwrap();
    let modules = k.modules_dir.as_ref().expect("the package ships modules");
    let ko = kvm_intel(modules, tmp.path());
    let out = Command::new("bpftool")
        .arg("-B")
        .arg(&vmlinux)
        .args(["btf", "dump", "file"])
        .arg(&ko)
        .output()
        .expect("bpftool (Debian package bpftool)");
    assert!(
        out.status.success(),
        "{spec}: bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    let (holder, bit) = exit_reason_read(&dump).unwrap_or_else(|e| panic!("{spec}: {e}"));
    eprintln!(
        "{spec} ({}): {holder}.exit_reason.full at bit {bit}, vcpu at 0",
        k.release
    );
}

/// Where the program's read lands: which struct holds `exit_reason`
/// (`vcpu_vmx`, or `vcpu_vt` from 6.16) and its bit offset there; an error
/// names the assumption that does not hold.
fn exit_reason_read(dump: &str) -> Result<(&'static str, u64), String> {
    let vmx = members(dump, "STRUCT", "vcpu_vmx").ok_or("no struct vcpu_vmx")?;
    let field = |n: &str| vmx.iter().find(|m| m.0 == n).cloned();
    let vcpu = field("vcpu").ok_or("no vcpu_vmx.vcpu")?;
    if vcpu.2 != 0 {
        return Err(format!("vcpu_vmx.vcpu at bit {}, not 0", vcpu.2));
    }
    let (holder, exit) = match field("exit_reason") {
        Some(m) => ("vcpu_vmx", m),
        None => {
            let vt = field("vt").ok_or("vcpu_vmx has neither exit_reason nor vt")?;
            let vt_name = type_name(dump, vt.1).ok_or("vt's type")?;
            let inner = members(dump, "STRUCT", &vt_name).ok_or("vt's struct")?;
            let m = inner.into_iter().find(|m| m.0 == "exit_reason");
            ("vcpu_vt", m.ok_or("no vt.exit_reason")?)
        }
    };
    let union = type_name(dump, exit.1).ok_or("exit_reason's type")?;
    if union != "vmx_exit_reason" {
        return Err(format!("{holder}.exit_reason is a {union}"));
    }
    let full = members(dump, "UNION", &union).ok_or("union vmx_exit_reason")?;
    if !full.iter().any(|m| m.0 == "full" && m.2 == 0) {
        return Err(format!("no vmx_exit_reason.full at 0: {full:?}"));
    }
    Ok((holder, exit.2))
}

/// 6.16's layout, as bpftool prints it (trimmed): the read goes through `vt`.
#[test]
fn the_vt_layout_is_recognised() {
    let dump = "[1] STRUCT 'vcpu_vmx' size=9000 vlen=2
\t'vcpu' type_id=2 bits_offset=0
\t'vt' type_id=3 bits_offset=52000
[2] STRUCT 'kvm_vcpu' size=6000 vlen=0
[3] STRUCT 'vcpu_vt' size=128 vlen=2
\t'pi_desc' type_id=5 bits_offset=0
\t'exit_reason' type_id=4 bits_offset=640
[4] UNION 'vmx_exit_reason' size=4 vlen=2
\t'(anon)' type_id=6 bits_offset=0
\t'full' type_id=7 bits_offset=0
";
    assert_eq!(exit_reason_read(dump), Ok(("vcpu_vt", 640)));
    let broken = dump.replace("'vt'", "'xt'");
    assert!(exit_reason_read(&broken).unwrap_err().contains("neither"));
}

#[test]
fn vmx_exit_reason_resolves_in_debian_12_kvm_intel() {
    check("debian:bookworm-cloud");
}

#[test]
fn vmx_exit_reason_resolves_in_debian_13_kvm_intel() {
    check("debian:trixie-cloud");
}
