//! Issue 16, item 1: root must never run (or hand QEMU) a file from a
//! directory another user controls. vmm-bench once kept its embedded images
//! in `$TMPDIR/livehost-vmm-bench-cache-<uid>`, created it if missing and
//! trusted any file there whose length matched; a local user who made that
//! directory first had their program run as root. Here an attacker-owned
//! directory (uid 65534, world-writable) holds planted files under the exact
//! names the old code looked for: the runs must work and the planted
//! program must never run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_vmm-bench");
const NOBODY: u32 = 65534;

/// The old cache's file name: `NAME-<FNV-1a of the content>`.
fn old_name(name: &str, bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    });
    format!("{name}-{h:016x}")
}

/// A file of exactly `len` bytes (the length the old code checked), owned
/// by nobody, world-writable like the directory it sits in.
fn plant(dir: &Path, name: &str, mut content: Vec<u8>, len: usize) {
    assert!(content.len() < len, "the planted content must fit");
    content.resize(len, b'#');
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
}

fn run(tmp: &Path, args: &[&str]) -> std::process::Output {
    Command::new(EXE)
        .args(args)
        .env("TMPDIR", tmp)
        .output()
        .unwrap()
}

#[test]
fn a_planted_cache_directory_is_never_used() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = tmp.path().join("planted-program-ran");
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let evil = tmp.path().join(format!("livehost-vmm-bench-cache-{uid}"));
    std::fs::create_dir(&evil).unwrap();
    std::os::unix::fs::chown(&evil, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o777)).unwrap();
    // A shell script standing in for the workload: the kernel runs it
    // through its #! line; the padding is one long comment line.
    let script = format!("#!/bin/sh\ntouch {}\nexit 0\n", marker.display());
    let init = vmm_bench::LINUX_INIT;
    plant(
        &evil,
        &old_name("workload", init),
        script.into_bytes(),
        init.len(),
    );
    // Garbage where QEMU would have read the unikernel.
    let uk = vmm_bench::vm::boot::UNIKERNEL;
    plant(
        &evil,
        &old_name("unikernel.elf", uk),
        b"not an ELF".to_vec(),
        uk.len(),
    );

    let mut paths = vec!["native", "container"];
    if vmm_bench::qemu::qemu_available() {
        paths.push("qemu-unikernel");
    }
    for path in paths {
        let out = run(
            tmp.path(),
            &["run", path, "--kib", "16", "--loops", "50", "--json"],
        );
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !marker.exists(),
            "`run {path}` ran the planted program as root: {e}"
        );
        assert!(out.status.success(), "`run {path}` failed: {e}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["ok"], true, "{path}: {j}");
    }
    // Nothing of ours was written into the attacker's directory either.
    let names: Vec<String> = std::fs::read_dir(&evil)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
