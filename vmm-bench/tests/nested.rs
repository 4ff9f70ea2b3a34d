//! The VMM's 64-bit guest on the hardware-virtualization code path: inside a
//! kernel-tests guest (Debian 6.1 under TCG, -cpu max) with kvm_amd on
//! emulated SVM. One guest boot: probe, the unikernel with the workload, and
//! the container launcher on the guest's pure cgroup v2 hierarchy.

use kernel_tests::{GuestStatus, RunOptions};
use std::path::PathBuf;
use std::time::Duration;

#[test]
fn unikernel_runs_on_nested_svm_kvm() {
    assert!(
        livehost_common::is_root(),
        "this test boots a QEMU guest; run it as root (CI is root)"
    );
    let mut opts = RunOptions::new([
        "/usr/bin/vmm-bench probe --json; echo ===; /usr/bin/vmm-bench run vm --kib 4 --loops 20 --timeout 60 --json; \
         echo ===; /usr/bin/vmm-bench container --name in-guest --quiet -- /bin/sh -c 'hostname; echo pid=$$; tail -n1 /proc/self/cgroup; \
         echo $$ > /sys/fs/cgroup/cgroup.procs 2>/dev/null && echo ESCAPED-cgroup; [ -e /proc/sysrq-trigger ] && echo sysrq-present; \
         echo h > /proc/sysrq-trigger 2>/dev/null && echo ESCAPED-sysrq; echo pids.max=$(cat /sys/fs/cgroup/pids.max); \
         echo memory.max=$(cat /sys/fs/cgroup/memory.max); grep NoNewPrivs /proc/self/status'; \
         test ! -e /sys/fs/cgroup/livehost-in-guest.scope && echo leaf-removed",
    ]);
    opts.with_kvm = true;
    opts.files.push((
        PathBuf::from(env!("CARGO_BIN_EXE_vmm-bench")),
        "/usr/bin/vmm-bench".into(),
    ));
    opts.timeout = Duration::from_secs(120);
    let out = kernel_tests::run(&opts).expect("guest boots");
    let diag = format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status, out.stdout, out.stderr
    );
    eprintln!("{diag}");
    assert_eq!(out.status, GuestStatus::Exited(0), "{diag}");
    let mut parts = out.stdout.split("===\n");
    let probe: serde_json::Value = serde_json::from_str(parts.next().unwrap_or("").trim())
        .unwrap_or_else(|e| panic!("probe JSON: {e}\n{diag}"));
    assert_eq!(probe["long_mode_ok"], true, "{diag}");
    assert_eq!(probe["host_is_guest"], true, "{diag}");
    let run: serde_json::Value = serde_json::from_str(parts.next().unwrap_or("").trim())
        .unwrap_or_else(|e| panic!("run JSON: {e}\n{diag}"));
    let want = vmm_bench::native::expected_checksum(4, vmm_bench_workload::DEFAULT_SEED).unwrap();
    assert_eq!(run["checksum"], format!("{want:#018x}").as_str(), "{diag}");
    assert_eq!(run["ok"], true, "{diag}");
    assert_eq!(run["exits"]["hlt"].as_u64(), Some(1), "{diag}");
    // The container launcher as the demo uses it, on a pure cgroup v2 guest.
    let ctr = parts.next().unwrap_or("");
    // A real container: its own cgroup namespace, the escapes
    // (leave the cgroup, write sysrq-trigger: here with the harmless 'h')
    // fail on a kernel that has sysrq, and the leaf has its limits.
    let limits = [
        format!("pids.max={}", livehost_container::limits::PIDS_MAX),
        format!("memory.max={}", livehost_container::limits::MEMORY_MAX),
    ];
    for want in [
        "in-guest",
        "pid=1",
        "\n0::/\n",
        "sysrq-present",
        "NoNewPrivs:\t1",
        "leaf-removed",
    ]
    .into_iter()
    .chain(limits.iter().map(String::as_str))
    {
        assert!(
            ctr.contains(want),
            "container output lacks {want:?}: {diag}"
        );
    }
    assert!(!ctr.contains("ESCAPED"), "{diag}");
}
