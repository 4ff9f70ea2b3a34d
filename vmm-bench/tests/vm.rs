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
    vmm_bench::native::expected_checksum(kib, vmm_bench_workload::DEFAULT_SEED)
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
