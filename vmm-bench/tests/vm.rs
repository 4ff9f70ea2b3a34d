//! Our VMM and the unikernel on this host's /dev/kvm, and the bad-input
//! paths: missing or wrong device, corrupt or oversized images, guests that
//! triple-fault or never write the boot timer.

use std::time::{Duration, Instant};
use vmm_bench::vm::boot::{self, UnikernelRun, code, run_raw};
use vmm_bench::vm::{Kvm, Mode, RunEnd, RunError, elf, probe};

fn kvm() -> Kvm {
    assert!(
        livehost_common::is_root(),
        "these tests need root for /dev/kvm (CI runs as root): rerun with sudo"
    );
    Kvm::open().expect("/dev/kvm must be usable on the project's machines")
}

fn expected(kib: u64) -> u64 {
    vmm_bench::native::expected_checksum(kib, vmm_bench_workload::DEFAULT_SEED).unwrap()
}

#[test]
fn probe_reports_within_one_second() {
    let t = Instant::now();
    let p = probe::probe(Duration::from_secs(1));
    let dt = t.elapsed();
    assert!(dt < Duration::from_secs(1), "probe took {dt:?}: {p:?}");
    assert!(p.kvm_available, "{p:?}");
    assert!(p.real_mode_ok && p.long_mode_ok, "{p:?}");
    assert!(p.accel.is_some());
    assert!(p.port_exit_ns.is_some_and(|v| v > 0.0), "{p:?}");
}

#[test]
fn unikernel_runs_64bit_and_returns_the_checksum() {
    let kvm = kvm();
    for kib in [4, 64] {
        let r = boot::run_unikernel(
            &kvm,
            &UnikernelRun {
                kib,
                loop_n: 50,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.checksum, expected(kib), "kib={kib}");
        assert!(
            r.serial
                .contains(&format!("checksum=0x{:016x}", expected(kib))),
            "{}",
            r.serial
        );
        assert!(r.boot_timer_us > 0.0 && r.boot_timer_us <= r.total_us);
        assert_eq!(r.exits.hlt, 1);
        assert_eq!(r.exits.mmio_write, 1, "the result also leaves through MMIO");
        // boot timer + 50 null-port writes + serial bytes
        assert!(r.exits.io_out > 51);
        assert!(r.guest_port_exit_ns.is_some_and(|v| v > 0.0));
    }
}

#[test]
fn real_and_long_mode_guests_run() {
    let kvm = kvm();
    for (mode, c, want) in [
        (Mode::Real, code::REAL_HELLO, "R"),
        (Mode::Long, code::LONG_HELLO, "L"),
    ] {
        let (r, obs, _) = run_raw(&kvm, mode, c, Duration::from_secs(2)).unwrap();
        assert_eq!(r.unwrap(), RunEnd::Halted);
        assert_eq!(obs.serial, want);
        assert!(obs.boot_timer.is_some());
    }
}

#[test]
fn triple_fault_is_reported_with_registers() {
    let kvm = kvm();
    let (r, _, _) = run_raw(&kvm, Mode::Long, code::TRIPLE_FAULT, Duration::from_secs(5)).unwrap();
    match r {
        Err(RunError::TripleFault { regs }) => assert!(regs.contains("rip="), "{regs}"),
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
fn guest_that_never_boots_times_out_with_registers() {
    let kvm = kvm();
    let t = Instant::now();
    let (r, _, _) = run_raw(&kvm, Mode::Long, code::SPIN, Duration::from_millis(300)).unwrap();
    let dt = t.elapsed();
    assert!(
        dt < Duration::from_secs(3),
        "the watchdog let the guest run {dt:?}"
    );
    let e = r.expect_err("a spinning guest must time out");
    let msg = e.to_string();
    assert!(matches!(e, RunError::Timeout { .. }), "{msg}");
    assert!(msg.contains("without writing the boot timer"), "{msg}");
    // The spin loop is at the image base: the registers say where it hung.
    assert!(msg.contains("rip=0x20000"), "{msg}");
}

/// A minimal 64-bit x86-64 ET_EXEC header with the given program-header
/// table fields and `phdrs` (type, offset, paddr, filesz, memsz) written at
/// file offset 64, followed by `tail`.
fn crafted_elf(
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    entry: u64,
    phdrs: &[(u32, u64, u64, u64, u64)],
    tail: &[u8],
) -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2; // 64-bit
    v[5] = 1; // little-endian
    v[6] = 1;
    v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    v[24..32].copy_from_slice(&entry.to_le_bytes());
    v[32..40].copy_from_slice(&phoff.to_le_bytes());
    v[54..56].copy_from_slice(&phentsize.to_le_bytes());
    v[56..58].copy_from_slice(&phnum.to_le_bytes());
    for &(ty, off, paddr, filesz, memsz) in phdrs {
        let mut h = vec![0u8; 56];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&off.to_le_bytes());
        h[16..24].copy_from_slice(&paddr.to_le_bytes());
        h[24..32].copy_from_slice(&paddr.to_le_bytes());
        h[32..40].copy_from_slice(&filesz.to_le_bytes());
        h[40..48].copy_from_slice(&memsz.to_le_bytes());
        v.extend_from_slice(&h);
    }
    v.extend_from_slice(tail);
    v
}

#[test]
fn crafted_elf_headers_are_refused_without_panicking() {
    // Needs no /dev/kvm: the parser alone, as `run vm --image` uses it.
    const BASE: u64 = vmm_bench::vm::layout::IMAGE_BASE;
    let ram = 32 << 20;
    let load = (1, 0, BASE, 64, 4096);
    let refuse = |v: &[u8], want: &str| {
        let e = format!("{:#}", elf::parse(v, ram).unwrap_err());
        assert!(e.contains(want), "want {want:?} in: {e}");
    };
    // The header table offset near the end of the address space: the
    // bounds check must not overflow (it panicked in debug builds).
    for phoff in [u64::MAX - 8, u64::MAX, u64::MAX - 55, u64::MAX - 56 * 63] {
        refuse(
            &crafted_elf(phoff, 56, 1, BASE, &[load], &[]),
            "lies outside the file",
        );
    }
    // Largest entries times the most headers: still checked.
    refuse(
        &crafted_elf(64, u16::MAX, 64, BASE, &[load], &[]),
        "lies outside the file",
    );
    // A table that starts inside the file but ends past it.
    let v = crafted_elf(64, 56, 1, BASE, &[load], &[]);
    refuse(&v[..100], "outside the file");
    // No headers, too-small entries, too many.
    refuse(
        &crafted_elf(64, 56, 0, BASE, &[], &[]),
        "not a loadable image",
    );
    refuse(
        &crafted_elf(64, 8, 1, BASE, &[load], &[]),
        "not a loadable image",
    );
    refuse(
        &crafted_elf(64, 56, 65, BASE, &[load], &[]),
        "not a loadable image",
    );
    // Segment file range that wraps around.
    refuse(
        &crafted_elf(64, 56, 1, BASE, &[(1, u64::MAX - 4, BASE, 16, 16)], &[]),
        "lies outside",
    );
    // Segment memory range that wraps around, or sits below the image base.
    refuse(
        &crafted_elf(64, 56, 1, BASE, &[(1, 0, BASE, 64, u64::MAX)], &[]),
        "does not fit guest RAM",
    );
    refuse(
        &crafted_elf(64, 56, 1, 0, &[(1, 0, 0, 64, 4096)], &[]),
        "does not fit guest RAM",
    );
    refuse(
        &crafted_elf(64, 56, 1, u64::MAX, &[(1, 0, u64::MAX - 8, 0, 8)], &[]),
        "does not fit guest RAM",
    );
    // More in the file than in memory.
    refuse(
        &crafted_elf(64, 56, 1, BASE, &[(1, 0, BASE, 100, 64)], &[]),
        "exceeds memory size",
    );
    // Entry outside every segment.
    refuse(
        &crafted_elf(64, 56, 1, BASE + 8192, &[load], &[]),
        "entry point",
    );
    // A note segment with absurd name and descriptor sizes: skipped, no panic.
    let mut note = Vec::new();
    note.extend_from_slice(&u32::MAX.to_le_bytes());
    note.extend_from_slice(&u32::MAX.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    let at = 64 + 2 * 56;
    let v = crafted_elf(
        64,
        56,
        2,
        BASE,
        &[load, (4, at, 0, note.len() as u64, 0)],
        &note,
    );
    let img = elf::parse(&v, ram).unwrap();
    assert_eq!(img.pvh_entry, None);
    // And the well-formed one parses.
    let img = elf::parse(&crafted_elf(64, 56, 1, BASE, &[load], &[]), ram).unwrap();
    assert_eq!(img.entry, BASE);
}

#[test]
fn bad_images_are_refused_before_running() {
    let kvm = kvm();
    let run = |image: &[u8]| {
        boot::run_unikernel(
            &kvm,
            &UnikernelRun {
                image,
                kib: 4,
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let e = format!("{:#}", anyhow::anyhow!(run(b"garbage")));
    assert!(e.contains("refusing the unikernel image"), "{e}");
    let e = format!(
        "{:#}",
        boot::run_unikernel(
            &kvm,
            &UnikernelRun {
                image: b"garbage",
                kib: 4,
                ..Default::default()
            }
        )
        .unwrap_err()
    );
    assert!(e.contains("not an ELF"), "{e}");

    // A truncated copy of the real image: headers point past the end.
    let cut = &boot::UNIKERNEL[..200];
    let e = format!("{:#}", elf::parse(cut, 32 << 20).unwrap_err());
    assert!(e.contains("outside"), "{e}");

    // Flip the machine field.
    let mut bad = boot::UNIKERNEL.to_vec();
    bad[18] = 3;
    let e = format!("{:#}", elf::parse(&bad, 32 << 20).unwrap_err());
    assert!(e.contains("not x86-64"), "{e}");

    // Oversized: larger than the limit.
    let big = vec![0u8; (elf::MAX_IMAGE + 1) as usize];
    let e = format!("{:#}", elf::parse(&big, 32 << 20).unwrap_err());
    assert!(e.contains("larger than"), "{e}");

    // A segment that does not fit guest RAM.
    let e = format!("{:#}", elf::parse(boot::UNIKERNEL, 2 << 20).unwrap_err());
    assert!(e.contains("does not fit guest RAM"), "{e}");

    // Random garbage never panics the parser.
    let mut x = 0x1234_5678_9abc_def0u64;
    for len in [0usize, 1, 63, 64, 65, 200, 4096] {
        for _ in 0..200 {
            let mut v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if v.len() >= 20 {
                v[..4].copy_from_slice(b"\x7fELF");
                v[4] = 2;
                v[5] = 1;
                v[16] = 2;
                v[18] = 62;
            }
            let _ = elf::parse(&v, 32 << 20);
        }
    }
    let parsed = elf::parse(boot::UNIKERNEL, 32 << 20).unwrap();
    assert!(
        parsed.pvh_entry.is_some(),
        "the image carries a PVH note for QEMU"
    );
}

#[test]
fn missing_or_wrong_kvm_device_gives_a_clear_error() {
    let e = format!("{:#}", Kvm::open_path("/nonexistent/kvm").err().unwrap());
    assert!(e.contains("does not exist") && e.contains("no KVM"), "{e}");
    let e = format!("{:#}", Kvm::open_path("/dev/null").err().unwrap());
    assert!(e.contains("not a usable KVM device"), "{e}");
}

#[test]
fn no_permission_on_kvm_is_explained() {
    // Drop to an unprivileged user in a child process and open /dev/kvm
    // there; root bypasses file permissions, so this is the honest check.
    assert!(livehost_common::is_root(), "needs root to switch users");
    let st = std::fs::metadata("/dev/kvm").unwrap();
    use std::os::unix::fs::MetadataExt;
    if st.mode() & 0o006 != 0 {
        eprintln!("/dev/kvm is world-accessible here; permission error cannot be provoked");
        return;
    }
    let exe = env!("CARGO_BIN_EXE_vmm-bench");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            exe,
            "probe",
        ])
        .output()
        .expect("setpriv (util-linux) is on Debian by default");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("no permission"),
        "stdout: {s} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(livehost_common::exit::REFUSED));
}

#[test]
fn exit_loop_comparison_measures_both_loops() {
    let kvm = kvm();
    let c = boot::compare_exit_loops(&kvm, 100, 3).unwrap();
    assert!(c.vmm_ns > 0.0 && c.bare_ns > 0.0);
    assert!(c.overhead_pct.is_finite());
}

/// A guarded call that panics stops its watchdog: the panic comes back to
/// the caller at once instead of the watchdog thread waiting out (and then
/// kicking past) its deadline while the scope waits for it forever.
#[test]
fn a_panicking_guarded_call_does_not_leave_the_watchdog_running() {
    let kvm = kvm();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let vm = livehost_kvm::Vm::new(&kvm, 0x10000).unwrap();
        let mut vcpu = vm
            .vcpu(&kvm, Mode::Real, livehost_kvm::layout::REAL_CODE)
            .unwrap();
        let watchdog = livehost_kvm::Watchdog::new(vcpu.fd());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            watchdog.guard(Duration::from_secs(3600), || -> () {
                panic!("the guarded call panicked")
            })
        }));
        let _ = tx.send(r.is_err());
    });
    let panicked = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("guard did not return within 10 s of its call panicking");
    assert!(panicked, "the panic reaches the caller");
}
