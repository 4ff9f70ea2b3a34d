//! The README's first command, run as CI runs it: asserts the facts of the
//! report (the fix took effect, was listed, was measured, the files exist
//! and parse, every comparison path has a number or a reason), not prose.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xtask"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The demo copies the other crates' binaries into the guest; build them
/// if this test runs on its own (`cargo test -p xtask`).
fn ensure_bins() {
    let missing = ["hotpatch", "overhead", "vmm-bench"]
        .iter()
        .any(|b| !bin_dir().join(b).is_file());
    if missing {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--workspace", "--bins"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .status()
            .unwrap();
        assert!(st.success());
    }
}

#[test]
fn demo_patches_a_live_guest_and_reports_it() {
    assert!(
        livehost_common::is_root(),
        "the demo test needs root (KVM, BPF, cgroups)"
    );
    ensure_bins();
    let out = tempfile::tempdir().unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--json", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "demo failed: {stderr}\n{stdout}");

    // stdout is the JSON and nothing else (vmm-bench report's Markdown,
    // progress and build output all stay off it).
    let printed: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("demo --json stdout is not pure JSON ({e}):\n{stdout}"));
    // The report directory: in the JSON and on stderr, and its files parse.
    let dir = PathBuf::from(
        printed["report_dir"]
            .as_str()
            .expect("report_dir in the JSON"),
    );
    assert!(dir.starts_with(out.path()));
    assert!(
        stderr.contains(&format!("report: {}", dir.display())),
        "the path is also on stderr"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report, printed, "report.json is what was printed");
    assert!(report["guest"]["error"].is_null(), "{}", report["guest"]);
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.starts_with("# livehost demo"));

    // The fix took effect, and the behaviour changed the way the fix says.
    let lp = &report["livepatch"];
    assert_eq!(lp["took_effect"], true, "{lp}");
    assert!(
        lp["after"].as_str().unwrap().contains("hotpatch-fixture"),
        "{lp}"
    );
    assert!(!lp["before"].as_str().unwrap().contains("hotpatch-fixture"));
    assert_eq!(lp["check_exit"], 0);
    assert_eq!(lp["load_exit"], 0);
    // It was listed with its function.
    let status = lp["status"].to_string();
    assert!(
        status.contains("hp_cmdline") && status.contains("cmdline_proc_show"),
        "{status}"
    );
    // It was measured: a transition time and the probe's gaps, labelled.
    let load = &lp["load"];
    assert!(load["transition_ms"].as_f64().unwrap() > 0.0, "{load}");
    let m = &load["measure"];
    assert!(m["transition"]["spin_max_gap_us"].as_f64().is_some(), "{m}");
    assert!(m["baseline"]["spin_max_gap_us"].as_f64().is_some(), "{m}");
    let env = m["environment"]["label"].as_str().unwrap_or("");
    assert!(!env.is_empty(), "{m}");
    // report.md states the largest stall: a number, and where it was taken.
    let stall = md
        .lines()
        .find(|l| l.starts_with("| largest stall during transition |"))
        .unwrap_or_else(|| panic!("no largest-stall line in report.md:\n{md}"));
    let gap = m["transition"]["spin_max_gap_us"].as_f64().unwrap();
    let want = if gap >= 100.0 {
        format!("{gap:.0} µs")
    } else {
        format!("{gap:.2} µs")
    };
    assert!(stall.contains(&want), "want {want}: {stall}");
    assert!(
        stall.chars().any(|c| c.is_ascii_digit()) && stall.contains("µs"),
        "{stall}"
    );
    assert!(
        stall.contains(&env.replace('|', "\\|")),
        "environment label {env:?} missing: {stall}"
    );
    // The kernel's own log shows the transition.
    let klog = lp["kernel_log"].as_str().unwrap();
    assert!(klog.contains("'hp_cmdline': patching complete"), "{klog}");

    // The observer watched the same window and saw the workload's cgroups.
    let intervals = report["observer"]["intervals"].as_array().unwrap();
    assert!(intervals.len() >= 2, "{}", report["observer"]);
    let seen = intervals.iter().any(|i| {
        i["cgroups"].as_array().is_some_and(|c| {
            c.iter()
                .any(|g| g["path"] == "/demo-busy" && g["cpu_ns"].as_u64() > Some(0))
        })
    });
    assert!(seen, "the busy cgroup's CPU time was not observed");
    // "Over the same window": by the guest's clock, the observer's intervals
    // span the whole load.
    let w = &report["observer"]["window"];
    assert_eq!(w["covers_load"], true, "{w}");
    assert!(
        w["load_start_unix_ms"].as_f64() < w["load_end_unix_ms"].as_f64(),
        "{w}"
    );
    assert!(
        md.contains("livehost:demo-app"),
        "the container from vmm-bench's launcher should appear in the observer's table"
    );
    // The intervals the load touched are set apart from the rest, and the
    // container ran through them (it kept running while the patch loaded).
    let phases = &report["observer"]["phases"];
    let during = &phases["during"];
    assert!(during["intervals"].as_u64() >= Some(1), "{phases}");
    let total: u64 = ["before", "during", "after"]
        .iter()
        .map(|p| phases[p]["intervals"].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, intervals.len(), "{phases}");
    let app = during["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["container"] == "livehost:demo-app")
        .unwrap_or_else(|| panic!("the container is missing from the load's intervals: {during}"));
    assert!(app["cpu_ns"].as_u64() > Some(0), "{app}");
    assert!(
        md.contains("| during |"),
        "no before/during/after table:\n{md}"
    );

    // Every path in the comparison has a number or a stated reason.
    let cmp = &report["comparison"];
    let rows = cmp["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("comparison has no rows: {cmp}"));
    let skipped = cmp["skipped"].as_array().cloned().unwrap_or_default();
    assert!(!rows.is_empty());
    for r in rows {
        assert!(
            r["value"].as_f64().is_some_and(f64::is_finite),
            "row without a number: {r}"
        );
        assert!(
            !r["accel"].as_str().unwrap_or("").is_empty(),
            "row without its accelerator: {r}"
        );
    }
    for s in &skipped {
        assert!(
            !s["reason"].as_str().unwrap_or("").is_empty(),
            "skipped without a reason: {s}"
        );
    }
    let has = |p: &str| {
        rows.iter()
            .any(|r| r["path"].as_str().is_some_and(|x| x.contains(p)))
            || skipped
                .iter()
                .any(|r| r["path"].as_str().is_some_and(|x| x.contains(p)))
    };
    for path in [
        "native",
        "container",
        "runc",
        "unikernel",
        "VMM",
        "Linux under QEMU",
    ] {
        assert!(has(path), "the comparison says nothing about {path}");
    }
    // Every path that ran the workload returned the same checksum.
    for c in cmp["checks"].as_array().unwrap() {
        assert_eq!(c["ok"], true, "{c}");
    }
    for f in ["report.md", "report.json"] {
        assert!(
            dir.join("vmm-bench").join(f).is_file(),
            "vmm-bench/{f} missing"
        );
    }
    let svgs = std::fs::read_dir(dir.join("vmm-bench"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "svg")
        })
        .count();
    assert!(svgs >= 1, "no SVG charts");
}

/// A guest part that cannot run (here: the binaries are not where the demo
/// looks) still leaves a report that says why, and its path.
#[test]
fn demo_writes_a_partial_report_when_the_guest_part_fails() {
    let out = tempfile::tempdir().unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--no-bench", "--json", "--out"])
        .arg(out.path())
        .env("LIVEHOST_BIN_DIR", "/nonexistent/livehost-bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}\n{stdout}");
    let printed: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not pure JSON ({e}):\n{stdout}\n{stderr}"));
    let err = printed["guest"]["error"].as_str().unwrap_or("");
    assert!(err.contains("is not built"), "{printed}");
    assert_eq!(printed["livepatch"]["took_effect"], false);
    let dir = PathBuf::from(printed["report_dir"].as_str().unwrap());
    assert!(dir.starts_with(out.path()));
    assert!(stderr.contains("report: "), "{stderr}");
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("The guest part failed") && md.contains("is not built"),
        "{md}"
    );
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(on_disk["guest"]["error"], printed["guest"]["error"]);
}
