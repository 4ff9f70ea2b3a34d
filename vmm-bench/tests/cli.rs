//! The binary end to end: `report --quick` writes its files with every
//! number labelled, and `run` checks the checksum.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_vmm-bench");

#[test]
fn quick_report_writes_labelled_results() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    // The Linux boot has its own test; leave it out to keep this one short.
    // Point runc at nothing: its row must be skipped with the reason (runc
    // itself is tested in paths.rs).
    let out = Command::new(EXE)
        .args(["report", "--quick", "--no-linux", "--out"])
        .arg(dir.path())
        .env("LIVEHOST_QUIET", "1")
        .env("VMM_BENCH_RUNC", "/nonexistent/runc")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.elapsed().as_secs() < 60,
        "report --quick took {:?}",
        t.elapsed()
    );
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    let checks = j["checks"].as_array().unwrap();
    assert!(checks.len() >= 4, "{checks:?}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{checks:?}");
    for r in j["rows"].as_array().unwrap() {
        assert!(!r["accel"].as_str().unwrap().is_empty(), "{r}");
        assert!(r["clock"] == "guest" || r["clock"] == "host", "{r}");
        // Spread and n on every row, and the raw samples behind them.
        let n = r["runs"].as_u64().unwrap() as usize;
        let samples: Vec<f64> = r["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(n >= 1 && samples.len() == n, "{r}");
        let (lo, med, hi) = (
            r["min"].as_f64().unwrap(),
            r["value"].as_f64().unwrap(),
            r["max"].as_f64().unwrap(),
        );
        assert!(lo <= med && med <= hi, "{r}");
        assert!(samples.iter().all(|&v| lo <= v && v <= hi), "{r}");
    }
    // Every run's checksum was checked, not just the first.
    for c in checks {
        let runs = c["runs"].as_u64().unwrap();
        assert!(runs >= 1 && c["matched"] == runs, "{c}");
    }
    let native_runs = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == "native process")
        .map(|c| c["runs"].as_u64().unwrap());
    assert_eq!(native_runs, Some(5), "quick mode: 5 runs after the warm-up");
    // Which isolation each container path had.
    let settings = j["container_settings"].as_array().unwrap();
    let of = |p: &str| {
        settings
            .iter()
            .find(|s| s["path"] == p)
            .map(|s| &s["settings"])
    };
    let ours = of("container").expect("our container's settings");
    assert_eq!(ours["no_new_privs"], true, "{ours}");
    assert_eq!(ours["cgroup_namespace"], true, "{ours}");
    let ns = of("namespaced process (shared host filesystem)").expect("the namespaced process");
    assert_eq!(ns["seccomp"], "none", "{ns}");
    assert!(
        std::fs::read_to_string(dir.path().join("report.md"))
            .unwrap()
            .contains("## Container settings"),
        "report.md shows the settings"
    );
    let skipped = j["skipped"].as_array().unwrap();
    assert!(
        skipped.iter().any(|k| k["path"] == "runc" && k["reason"].as_str().unwrap().contains("not installed")),
        "runc row skipped with a reason: {skipped:?}"
    );
    // The image-size claim is tested without booting Linux: the kernel and
    // initramfs are sized on their own (fetched into the kernel cache).
    assert!(
        skipped.iter().any(|k| k["path"] == "QEMU + Linux"),
        "{skipped:?}"
    );
    let rows = j["rows"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["path"] == "Linux VM image" && r["value"].as_f64().unwrap() > 1000.0),
        "the Linux image is sized under --no-linux: {skipped:?}"
    );
    let claim = j["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["claim"].as_str().unwrap().contains("~4% of a VM image"))
        .cloned()
        .expect("the image-size claim is listed");
    assert_ne!(claim["verdict"], "not tested", "{claim}");
    assert!(
        claim["measured"]
            .as_str()
            .unwrap()
            .contains("KiB kernel+initramfs"),
        "{claim}"
    );
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("## Claims") && md.contains("CPU:") && md.contains("Host kernel:"));
    assert!(
        md.contains("a unikernel image is ~4% of a VM image"),
        "{md}"
    );
    if j["probe"]["accel"] != "HardwareKvm" {
        assert!(
            md.contains("under emulation"),
            "emulated numbers must be labelled"
        );
    }
    for f in ["start.svg", "roundtrip.svg", "size.svg"] {
        let s = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(s.starts_with("<svg") && s.contains("<text"), "{f}");
    }
}

/// `run PATH --json`: one object of the same shape for every path.
fn run_json(path: &str) -> serde_json::Value {
    let out = Command::new(EXE)
        .args(["run", path, "--kib", "16", "--loops", "50", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{path}: stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let want = format!(
        "{:#018x}",
        vmm_bench::native::expected_checksum(16, vmm_bench_workload::DEFAULT_SEED).unwrap()
    );
    assert_eq!(j["path"], path, "{j}");
    assert_eq!(j["checksum"], want.as_str(), "{path}: {j}");
    assert_eq!(j["expected"], want.as_str(), "{path}: {j}");
    assert_eq!(j["ok"], true, "{path}: {j}");
    assert!(
        !j["accel"]["label"].as_str().unwrap_or("").is_empty(),
        "{path}: accelerator label: {j}"
    );
    assert!(j["accel"]["kind"].is_string(), "{path}: {j}");
    j
}

#[test]
fn run_json_is_uniform_for_every_path() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let j = run_json("native");
    assert_eq!(j["accel"]["kind"], "Native");
    assert!(j["total_us"].as_f64().is_some(), "{j}");
    let j = run_json("container");
    assert_eq!(j["accel"]["kind"], "Native");
    assert!(j["setup_us"].as_f64().is_some(), "{j}");
    // The VMM's own fields stay beside the common ones.
    let j = run_json("vm");
    assert_ne!(j["accel"]["kind"], "Native");
    assert_eq!(j["exits"]["hlt"], 1, "{j}");
    assert!(j["vmm_overhead_bytes"].as_u64().is_some(), "{j}");
    if vmm_bench::container::find_runc().is_some() {
        let j = run_json("runc");
        assert!(j["total_us"].as_f64().is_some(), "{j}");
    }
    if vmm_bench::qemu::qemu_available() {
        // One PVH boot, ~0.2 s under TCG.
        let j = run_json("qemu-unikernel");
        assert!(j["to_result_us"].as_f64().is_some(), "{j}");
        assert!(j["line"].as_str().unwrap().contains("LIVEHOST-UK"), "{j}");
    }
}

/// A usage error: exit 2, nothing run, and the message names the argument
/// and the accepted range (no panic, no allocation failure).
fn refused(args: &[&str], names: &[&str]) {
    let out = Command::new(EXE).args(args).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(livehost_common::exit::USAGE),
        "{args:?}: {e}"
    );
    assert!(!e.contains("panicked"), "{args:?}: {e}");
    for n in names {
        assert!(e.contains(n), "{args:?}: want {n:?} in {e}");
    }
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let max = vmm_bench::MAX_KIB.to_string();
    let kib_range = format!("1..={max}");
    for path in ["vm", "native", "container", "qemu-unikernel", "qemu-linux"] {
        refused(&["run", path, "--kib", "0"], &["--kib", &kib_range]);
        // Once aborted with an allocation failure (the reference checksum
        // allocated kib << 10 bytes before any range check).
        refused(
            &["run", path, "--kib", "18446744073709551615"],
            &["--kib", &kib_range],
        );
    }
    // One past the largest size every path accepts (the unikernel's PVH
    // entry under QEMU would ignore it and compute the wrong size).
    let over = (vmm_bench::MAX_KIB + 1).to_string();
    refused(&["run", "qemu-unikernel", "--kib", &over], &[&kib_range]);
    refused(
        &["report", "--kib", "99999999999999"],
        &["--kib", &kib_range],
    );
    refused(&["report", "--loops", "0"], &["--loops"]);
    // Deadlines that would overflow the clock (Instant + Duration panicked).
    for args in [
        &["run", "vm", "--timeout", "18446744073709551615"][..],
        &["run", "native", "--timeout", "9999999999"],
        &["run", "container", "--timeout", "0"],
        &[
            "container",
            "--timeout",
            "18446744073709551615",
            "--",
            "true",
        ],
    ] {
        refused(args, &["--timeout", "1..=86400"]);
    }
    refused(&["compare-exits", "--exits", "0"], &["--exits", "1..="]);
    refused(&["compare-exits", "--samples", "0"], &["--samples", "1..="]);
    refused(&["run", "teleport"], &["teleport"]);
}

#[test]
fn container_command_runs_isolated_and_stops_on_sigterm() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let name = format!("vmmb-cli-{}", std::process::id());
    let out = Command::new(EXE)
        .args([
            "container",
            "--name",
            &name,
            "--quiet",
            "--",
            "/bin/sh",
            "-c",
            "hostname; echo pid=$$; tail -n1 /proc/self/cgroup",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    // Its own cgroup namespace: the leaf is its root.
    assert!(
        s.contains(&name) && s.contains("pid=1") && s.lines().any(|l| l == "0::/"),
        "{s}"
    );
    let root = vmm_bench::container::cgroup2_root().unwrap();
    assert!(
        !root
            .join(livehost_common::container::cgroup_leaf(&name))
            .exists(),
        "cgroup leaf left behind"
    );

    // A command that never ends: SIGTERM to vmm-bench kills it and cleans up.
    let name = format!("vmmb-cli-term-{}", std::process::id());
    let mut child = Command::new(EXE)
        .args([
            "container",
            "--name",
            &name,
            "--quiet",
            "--",
            "/bin/sh",
            "-c",
            "while :; do sleep 1; done",
        ])
        .spawn()
        .unwrap();
    let procs = root
        .join(livehost_common::container::cgroup_leaf(&name))
        .join("cgroup.procs");
    let t = std::time::Instant::now();
    while std::fs::read_to_string(&procs)
        .map(|p| p.trim().is_empty())
        .unwrap_or(true)
    {
        assert!(
            t.elapsed().as_secs() < 10,
            "container never appeared in its cgroup"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let inside: Vec<i32> = std::fs::read_to_string(&procs)
        .unwrap()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(livehost_common::exit::signaled(libc::SIGTERM))
    );
    assert!(
        !root
            .join(livehost_common::container::cgroup_leaf(&name))
            .exists(),
        "cgroup leaf left behind after SIGTERM"
    );
    for p in inside {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "container process {p} survived"
        );
    }
}

#[test]
fn corrupt_or_oversized_image_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.elf");
    std::fs::write(&bad, b"\x7fELF this is not really an ELF").unwrap();
    let out = Command::new(EXE)
        .args(["run", "vm", "--image"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(livehost_common::exit::ERROR));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("refusing image") && e.contains("bad.elf"), "{e}");

    // Program headers "at" u64::MAX - 8: refused, not an overflow panic.
    let mut v = vec![0u8; 64];
    v[..6].copy_from_slice(b"\x7fELF\x02\x01");
    v[16] = 2; // ET_EXEC
    v[18] = 62; // x86-64
    v[32..40].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    v[54] = 56; // phentsize
    v[56] = 1; // phnum
    let crafted = dir.path().join("phoff.elf");
    std::fs::write(&crafted, &v).unwrap();
    let out = Command::new(EXE)
        .args(["run", "vm", "--image"])
        .arg(&crafted)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(livehost_common::exit::ERROR), "{e}");
    assert!(
        e.contains("outside the file") && !e.contains("panicked"),
        "{e}"
    );

    // Sparse file just over the limit: refused by size before parsing.
    let big = dir.path().join("big.elf");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(vmm_bench::vm::elf::MAX_IMAGE + 1).unwrap();
    let out = Command::new(EXE)
        .args(["run", "vm", "--image"])
        .arg(&big)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(livehost_common::exit::ERROR));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("larger than"), "{e}");
}

#[test]
fn sigterm_during_a_container_run_leaves_no_cgroup_leaf() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let root = vmm_bench::container::cgroup2_root().unwrap();
    // A leaf an earlier vmm-bench (now dead) left behind: removed at start.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let stale = root.join(format!("livehost-vmm-bench-{dead_pid}-0"));
    std::fs::create_dir(&stale).unwrap();

    // 10^9 null syscalls: minutes, so it is surely running when signalled.
    let child = Command::new(EXE)
        .args(["run", "container", "--kib", "4", "--loops", "1000000000"])
        .args(["--timeout", "120"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = format!("livehost-vmm-bench-{}-", child.id());
    let ours = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    };
    let t = std::time::Instant::now();
    let inside: Vec<i32> = loop {
        let procs: Vec<i32> = ours()
            .iter()
            .flat_map(|l| {
                std::fs::read_to_string(l.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        if !procs.is_empty() {
            break procs;
        }
        assert!(
            t.elapsed().as_secs() < 20,
            "the container never appeared in its leaf"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(!stale.exists(), "stale leaf of a dead pid not removed");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(livehost_common::exit::signaled(libc::SIGTERM)),
        "{e}"
    );
    assert!(e.contains("stopped by signal"), "{e}");
    assert!(ours().is_empty(), "cgroup leaf left behind: {:?}", ours());
    for p in inside {
        let t = std::time::Instant::now();
        while std::path::Path::new(&format!("/proc/{p}")).exists() {
            assert!(t.elapsed().as_secs() < 5, "container process {p} survived");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// SIGTERM while `runc run` is running: killing runc alone would leave its
/// container running (runc's init is not our child); vmm-bench must delete
/// the container through runc and remove the bundle before exiting.
#[test]
fn sigterm_during_a_runc_run_deletes_the_container_and_its_bundle() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let Some(runc) = vmm_bench::container::find_runc() else {
        eprintln!("skipped: runc is not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let child = Command::new(EXE)
        .args(["run", "runc", "--kib", "4", "--loops", "1000000000"])
        .args(["--timeout", "120"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The bundle appears in our TMPDIR; runc's state names the container's
    // init once it runs.
    let t = std::time::Instant::now();
    let (bundle, init) = loop {
        let found = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .find_map(|b| {
                let state = b.path().join("state");
                let id = std::fs::read_dir(&state)
                    .ok()?
                    .flatten()
                    .next()?
                    .file_name();
                let out = Command::new(&runc)
                    .arg("--root")
                    .arg(&state)
                    .arg("state")
                    .arg(&id)
                    .output()
                    .ok()?;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                (v["status"] == "running")
                    .then(|| (b.path(), v["pid"].as_i64().unwrap_or(0) as i32))
                    .filter(|(_, p)| *p > 0)
            });
        if let Some(f) = found {
            break f;
        }
        assert!(
            t.elapsed().as_secs() < 30,
            "the runc container never ran (bundle under {})",
            tmp.path().display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(livehost_common::exit::signaled(libc::SIGTERM)),
        "{e}"
    );
    let t = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{init}")).exists() {
        assert!(
            t.elapsed().as_secs() < 5,
            "the runc container's init {init} survived vmm-bench"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!bundle.exists(), "bundle {} left behind", bundle.display());
}

/// A run past its `--timeout` exits 124 on every path, told apart by the
/// error's type (the launcher's `TimedOut`, the VMM's `RunError::Timeout`),
/// not by words in its message.
#[test]
fn a_run_past_its_deadline_exits_with_the_timeout_status() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
    let mut paths = vec!["native", "container"];
    if std::path::Path::new("/dev/kvm").exists() {
        paths.push("vm");
    }
    for path in paths {
        let out = Command::new(EXE)
            .args(["run", path, "--kib", "4", "--loops", "1000000000"])
            .args(["--timeout", "1"])
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(livehost_common::exit::TIMEOUT),
            "{path}: {e}"
        );
    }
}
