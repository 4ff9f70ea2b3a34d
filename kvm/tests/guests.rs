//! Tiny guests on this host's /dev/kvm: both modes, the exits, the
//! deadline, and the probe's time bound. Needs root (CI runs as root).

use livehost_kvm::{Kvm, Mode, RunEnd, RunError, Vm, code, layout, probe, run_raw};
use std::time::{Duration, Instant};

fn kvm() -> Kvm {
    assert!(
        livehost_common::is_root(),
        "these tests need root for /dev/kvm (CI runs as root): rerun with sudo"
    );
    Kvm::open().expect("/dev/kvm must be usable on the project's machines")
}

#[test]
fn hello_guests_halt_in_both_modes() {
    let kvm = kvm();
    for (mode, code, want) in [
        (Mode::Real, code::REAL_HELLO, "R"),
        (Mode::Long, code::LONG_HELLO, "L"),
    ] {
        let r = run_raw(&kvm, mode, code, Duration::from_secs(5)).unwrap();
        assert_eq!(r.end.unwrap(), RunEnd::Halted, "{mode:?}");
        assert_eq!(r.observed.serial, want);
        assert!(r.observed.boot_timer.is_some());
        assert_eq!(r.observed.exits.hlt, 1);
    }
}

#[test]
fn port_loops_exit_exactly_n_times() {
    let kvm = kvm();
    let r = run_raw(
        &kvm,
        Mode::Long,
        &code::port_loop(50),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.observed.exits.io_out, 50);
    let vm = Vm::new(&kvm, 0x4000).unwrap();
    vm.memory()
        .write(0x1000, &code::real_port_loop(0x510, 7))
        .unwrap();
    let mut vcpu = vm.vcpu(&kvm, Mode::Real, 0x1000).unwrap();
    let mut seen = Default::default();
    assert_eq!(
        vcpu.run(Duration::from_secs(5), &mut seen).unwrap(),
        RunEnd::Halted
    );
    assert_eq!((seen.exits.io_out, seen.exits.total()), (7, 8));
}

#[test]
fn a_triple_fault_and_a_spinning_guest_are_errors_with_registers() {
    let kvm = kvm();
    let r = run_raw(&kvm, Mode::Long, code::TRIPLE_FAULT, Duration::from_secs(5)).unwrap();
    match r.end {
        Err(RunError::TripleFault { regs }) => assert!(regs.contains("rip="), "{regs}"),
        other => panic!("want a triple fault, got {other:?}"),
    }
    let t = Instant::now();
    let r = run_raw(&kvm, Mode::Long, code::SPIN, Duration::from_millis(200)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        matches!(r.end, Err(RunError::Timeout { .. })),
        "{:?}",
        r.end
    );
}

#[test]
fn long_mode_needs_room_for_its_tables() {
    let kvm = kvm();
    let vm = Vm::new(&kvm, 0x4000).unwrap();
    assert!(vm.vcpu(&kvm, Mode::Long, layout::CODE_BASE).is_err());
    assert!(Vm::new(&kvm, 0x1234).is_err(), "not whole pages");
}

#[test]
fn probes_are_bounded_and_explain_themselves() {
    let kvm = kvm();
    let t = Instant::now();
    let s = probe::speed(&kvm, Duration::from_millis(400)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!s.reason.is_empty());
    let t = Instant::now();
    let p = probe::probe(Duration::from_secs(1));
    assert!(t.elapsed() < Duration::from_secs(1), "{p:?}");
    assert!(p.real_mode_ok && p.long_mode_ok, "{p:?}");
    assert!(p.accel.is_some() && p.speed.is_some(), "{p:?}");
}
