//! On this host KVM exits are emulated (kvm_exit/kvm_entry never fire), but
//! the user-space exit path does: a guest doing exactly N port writes must
//! show up as exactly N KVM_EXIT_IO user exits and N kvm_pio writes to the
//! guest's port, on the vCPU thread's tid.

mod util;

use livehost_ebpf::kvm_guest::{PORT, run_pio_guest};
use livehost_ebpf::observer::{ExitKey, Observer, ObserverOptions};
use livehost_ebpf::reasons::{KVM_EXIT_HLT, KVM_EXIT_IO};

#[test]
fn counts_exactly_n_userspace_io_exits_for_the_vcpu_thread() {
    util::require_root();
    let obs = Observer::start(&ObserverOptions {
        containers: false,
        ..Default::default()
    })
    .expect("observer starts");
    assert!(
        obs.attached
            .iter()
            .any(|p| p == "handle_kvm_userspace_exit"),
        "kvm_userspace_exit must attach on this host: {:?}",
        obs.skipped
    );
    const N: u32 = 3000;
    let run = std::thread::spawn(|| run_pio_guest(N))
        .join()
        .unwrap()
        .expect("guest runs");
    assert_eq!(run.io_exits, N as u64, "the VMM itself saw N port writes");
    let snap = obs.snapshot().unwrap();
    let key = |kind: u16, reason: u32| ExitKey {
        tgid: run.pid,
        tid: run.tid,
        kind,
        isa: 0,
        reason,
    };
    let io = snap.exits.get(&key(1, KVM_EXIT_IO)).map(|v| v.count);
    let hlt = snap.exits.get(&key(1, KVM_EXIT_HLT)).map(|v| v.count);
    let pio = snap.exits.get(&key(3, PORT as u32)).map(|v| v.count);
    assert_eq!(
        io,
        Some(N as u64),
        "user-space IO exits for tid {}",
        run.tid
    );
    assert_eq!(hlt, Some(1), "one HLT exit ends the guest");
    assert_eq!(pio, Some(N as u64), "kvm_pio writes to port {PORT:#x}");
    // Nothing for this tid under any other reason but the ones the guest does.
    let others: Vec<_> = snap
        .exits
        .iter()
        .filter(|(k, _)| {
            k.tid == run.tid
                && ![
                    key(1, KVM_EXIT_IO),
                    key(1, KVM_EXIT_HLT),
                    key(3, PORT as u32),
                ]
                .contains(k)
        })
        .collect();
    assert!(
        others.is_empty(),
        "unexpected exits for the vCPU thread: {others:?}"
    );
    assert!(
        snap.vcpus.contains_key(&run.tid),
        "the vCPU thread is tracked"
    );
    assert!(
        snap.drops.iter().all(|(_, n)| *n == 0),
        "no drops: {:?}",
        snap.drops
    );
}

/// A BTF directory whose vmlinux lacks some tracepoint typedefs: a copy of
/// the real one with the names defaced (same length, so the file stays
/// well-formed for anyone else reading it).
fn defaced_btf(from: &[u8], to: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
    let mut i = 0;
    while i + from.len() <= btf.len() {
        if &btf[i..i + from.len()] == from {
            btf[i..i + from.len()].copy_from_slice(to);
        }
        i += 1;
    }
    std::fs::write(dir.path().join("vmlinux"), &btf).unwrap();
    dir
}

#[test]
fn missing_sched_tracepoints_refuse_container_observation() {
    util::require_root();
    let dir = defaced_btf(b"btf_trace_sched_", b"btf_trace_xched_");
    let err = Observer::start(&ObserverOptions {
        btf_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .err()
    .expect("no sched tracepoints: refused");
    assert!(
        err.to_string()
            .contains("lacks the sched_switch/sched_wakeup"),
        "{err}"
    );
}

#[test]
fn missing_kvm_tracepoints_are_skipped_with_a_note() {
    util::require_root();
    let dir = defaced_btf(b"btf_trace_kvm_", b"btf_trace_xvm_");
    let obs = Observer::start(&ObserverOptions {
        btf_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .expect("sched programs still load");
    let skipped: Vec<_> = obs.skipped.iter().map(|s| s.tracepoint.as_str()).collect();
    assert_eq!(
        skipped,
        ["kvm_exit", "kvm_entry", "kvm_userspace_exit", "kvm_pio"]
    );
    assert!(obs.attached.iter().all(|p| p.starts_with("handle_sched")));
    // And --vm-only on such a kernel is refused with the fix.
    let err = Observer::start(&ObserverOptions {
        btf_dir: dir.path().to_path_buf(),
        containers: false,
        ..Default::default()
    })
    .err()
    .expect("vm-only without kvm tracepoints must fail");
    assert!(err.to_string().contains("no KVM tracepoint"), "{err}");
}
