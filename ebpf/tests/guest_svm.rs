//! Hardware exits can only be observed where kvm_exit/kvm_entry fire: a
//! kernel-tests guest (Debian 12's 6.1 and Debian 13's 6.12, TCG, -cpu max)
//! running kvm_amd on emulated SVM. The `overhead` binary runs inside that guest, with the KVM
//! tracepoints' types in module BTF (kvm, kvm_amd), and watches our small
//! real-mode guest do exactly N port writes.

use kernel_tests::{GuestStatus, KernelSpec, RunOptions};
use std::path::PathBuf;
use std::time::Duration;

const N: u64 = 200;

/// Debian 12 (6.1): the kernel the observer was first written against.
#[test]
fn nested_svm_exits_are_counted_per_reason_with_durations() {
    nested_svm_exits_on(KernelSpec::default());
}

/// Debian 13 (6.12): its verifier treats some tp_btf arguments as nullable,
/// which an un-checked container_of on kvm_exit's vcpu trips over.
#[test]
fn nested_svm_exits_are_counted_on_debian_13() {
    nested_svm_exits_on("debian:trixie-cloud".parse().unwrap());
}

fn nested_svm_exits_on(kernel: KernelSpec) {
    assert!(
        livehost_common::is_root(),
        "this test boots a QEMU guest with KVM inside; run it as root (CI is root)"
    );
    let script = format!(
        "ls /sys/kernel/btf | tr '\\n' ' ' >&2; echo >&2; \
         /usr/bin/overhead record --vm-only --interval 1 --duration 8 --json > /tmp/rec.json 2> /tmp/rec.err & \
         i=0; while [ $i -lt 300 ] && ! grep -q 'attached' /tmp/rec.err; do sleep 0.1; i=$((i+1)); done; \
         /usr/bin/kvm-pio-guest {N} > /tmp/guest.json || echo guest-failed >&2; \
         wait; cat /tmp/guest.json; echo ===; cat /tmp/rec.json; echo ===; cat /tmp/rec.err >&2"
    );
    let mut opts = RunOptions::new([script]);
    opts.kernel = kernel;
    opts.with_kvm = true;
    opts.files.push((
        PathBuf::from(env!("CARGO_BIN_EXE_overhead")),
        "/usr/bin/overhead".into(),
    ));
    opts.files.push((
        PathBuf::from(env!("CARGO_BIN_EXE_kvm-pio-guest")),
        "/usr/bin/kvm-pio-guest".into(),
    ));
    opts.timeout = Duration::from_secs(120);
    opts.require_config.push("CONFIG_DEBUG_INFO_BTF".into());
    let out = kernel_tests::run(&opts).expect("guest boots");
    let diag = format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}\nconsole tail:\n{}\ndmesg tail:\n{}",
        out.status,
        out.stdout,
        out.stderr,
        out.console_tail(30),
        out.dmesg
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(out.status, GuestStatus::Exited(0), "{diag}");
    assert!(
        out.stderr.contains("kvm_amd"),
        "kvm_amd module BTF present in the guest: {diag}"
    );
    let mut parts = out.stdout.split("===\n");
    let guest: serde_json::Value = serde_json::from_str(parts.next().unwrap_or("").trim())
        .unwrap_or_else(|e| panic!("guest JSON: {e}\n{diag}"));
    assert_eq!(guest["io_exits"].as_u64(), Some(N), "{diag}");
    let pid = guest["pid"].as_u64().unwrap();
    let tid = guest["tid"].as_u64().unwrap();
    let reports: Vec<serde_json::Value> = parts
        .next()
        .unwrap_or("")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("record line: {e}\n{diag}")))
        .collect();
    assert!(!reports.is_empty(), "no report lines: {diag}");
    assert!(
        reports[0]["programs"]["attached"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "handle_kvm_exit"),
        "kvm_exit attached via module BTF: {diag}"
    );
    assert_eq!(
        reports[0]["programs"]["skipped"],
        serde_json::json!([]),
        "every program loads on this kernel: {diag}"
    );
    // Sum the vCPU thread's rows over all intervals, per (kind, name).
    let mut count = std::collections::BTreeMap::<(String, String), (u64, u64, u64, u64)>::new();
    for r in &reports {
        for vm in r["vms"].as_array().unwrap() {
            if vm["pid"].as_u64() != Some(pid) {
                continue;
            }
            for v in vm["vcpus"].as_array().unwrap() {
                if v["tid"].as_u64() != Some(tid) {
                    continue;
                }
                assert_eq!(v["vcpu_id"], 0, "vcpu_id read from struct kvm_vcpu");
                for e in v["exits"].as_array().unwrap() {
                    let k = (
                        e["kind"].as_str().unwrap().to_string(),
                        e["name"].as_str().unwrap().to_string(),
                    );
                    let c = count.entry(k).or_default();
                    c.0 += e["count"].as_u64().unwrap();
                    c.1 += e["sum_ns"].as_u64().unwrap();
                    c.3 += e["timed"].as_u64().unwrap();
                    c.2 = c.2.max(e["max_ns"].as_u64().unwrap());
                    // Timed exits in an interval give it a max of its own,
                    // bounded by the since-start one and bounding p99.
                    let imax = e["interval_max_ns"].as_u64().unwrap();
                    if e["timed"].as_u64().unwrap() > 0 {
                        assert!(imax > 0 && imax <= e["max_ns"].as_u64().unwrap(), "{e}");
                        assert!(e["p99_ns"].as_u64().unwrap() <= imax, "{e}");
                    }
                    if e["kind"] == "hw" {
                        assert_eq!(e["isa"], "svm", "{e}");
                    }
                }
            }
        }
    }
    eprintln!("exits seen for the vCPU thread: {count:?}");
    let io = count
        .get(&("hw".into(), "io".into()))
        .copied()
        .unwrap_or_default();
    assert_eq!(
        io.0, N,
        "one SVM IOIO exit per port write: {count:?}\n{diag}"
    );
    // Every io exit is re-entered (the VMM answers and runs the vCPU again).
    assert_eq!(io.3, N, "every io exit timed to its re-entry: {io:?}");
    assert!(
        io.1 > 0 && io.2 > 0 && io.2 <= io.1,
        "io exit durations recorded: {io:?}"
    );
    let hlt = count
        .get(&("hw".into(), "hlt".into()))
        .copied()
        .unwrap_or_default();
    // HLT goes to user space (no in-kernel irqchip) and the VMM stops: the
    // exit is counted, never re-entered, so not timed.
    assert_eq!(hlt.0, 1, "one hlt exit: {count:?}");
    assert_eq!(hlt.3, 0, "the final hlt has no re-entry: {count:?}");
    let user_io = count
        .get(&("user".into(), "IO".into()))
        .copied()
        .unwrap_or_default();
    assert_eq!(user_io.0, N, "user-space IO exits: {count:?}");
    for (kind, name) in count.keys() {
        assert!(
            !name.starts_with("0x") || kind != "hw",
            "unnamed SVM reason {name}: {count:?}"
        );
    }
}
