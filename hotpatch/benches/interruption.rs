//! Interruption bench: how long does a running workload lose the CPU while a
//! livepatch transitions, compared with an equally long window without
//! patching? One QEMU guest (TCG on the build machines: the CPU is emulated,
//! so these are not hardware figures) runs N load/unload cycles of the
//! hp_cmdline fixture with `hotpatch load --measure`, and this prints the
//! distribution of both windows and their ratio, all measured in this run.
//!
//! `cargo bench -p hotpatch --bench interruption [-- CYCLES]` (root; boots a guest).

use kernel_tests::{KernelSpec, RunOptions};
use std::path::PathBuf;
use std::time::Duration;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let cycles: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(12);
    if !livehost_common::is_root() {
        anyhow::bail!("the interruption bench boots a guest and needs root");
    }
    let kernel = kernel_tests::fetch(&KernelSpec::default())?;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/cmdline");
    let ko = kernel_tests::module::build(&kernel, &fixture)?;
    let script = format!(
        "H=/usr/bin/hotpatch; i=0; while [ $i -lt {cycles} ]; do \
         echo '=== load'; $H --json load --measure /root/hp_cmdline.ko || exit 1; \
         $H unload hp_cmdline >/dev/null || exit 1; i=$((i+1)); done"
    );
    let mut opts = RunOptions::new([script]);
    opts.require_config.push("CONFIG_LIVEPATCH".into());
    opts.timeout = Duration::from_secs(60 + 15 * cycles as u64);
    opts.env
        .push(("HOTPATCH_STATE_DIR".into(), "/tmp/hpstate".into()));
    opts.files.push((
        PathBuf::from(env!("CARGO_BIN_EXE_hotpatch")),
        "/usr/bin/hotpatch".into(),
    ));
    opts.files.push((ko, "/root/hp_cmdline.ko".into()));
    let out = kernel_tests::run(&opts)?;
    let stdout = out.success()?;

    let (mut trans, mut base, mut added, mut tms, mut sleep_t, mut sleep_b) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut label = String::new();
    for chunk in stdout.split("=== load").skip(1) {
        let v: serde_json::Value = serde_json::from_str(chunk.trim())?;
        let m = &v["measure"];
        label = m["environment"]["label"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        trans.push(
            m["transition"]["spin_max_gap_us"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        base.push(
            m["baseline"]["spin_max_gap_us"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        sleep_t.push(
            m["transition"]["sleep_max_overshoot_us"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        sleep_b.push(
            m["baseline"]["sleep_max_overshoot_us"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        added.push(m["added_stall_us"].as_f64().unwrap_or(f64::NAN));
        tms.push(v["transition_ms"].as_f64().unwrap_or(f64::NAN));
    }
    let n = trans.len();
    anyhow::ensure!(n == cycles, "expected {cycles} measurements, got {n}");
    println!("interruption bench: {n} load/unload cycles of hp_cmdline, one guest");
    println!(
        "environment: {label} ({:?}, kernel {})",
        out.accel, out.release
    );
    println!("{:<34} {:>10} {:>10} {:>10}", "", "p50", "p90", "max");
    for (name, v) in [
        ("spin max gap, transition (µs)", &mut trans),
        ("spin max gap, baseline (µs)", &mut base),
        ("added stall per cycle (µs)", &mut added),
        ("1ms-sleep overshoot, transition", &mut sleep_t),
        ("1ms-sleep overshoot, baseline", &mut sleep_b),
        ("transition time (ms)", &mut tms),
    ] {
        let (a, b, c) = (pct(v, 0.5), pct(v, 0.9), pct(v, 1.0));
        println!("{name:<34} {a:>10.0} {b:>10.0} {c:>10.0}");
    }
    let ratio = pct(&mut trans, 0.5) / pct(&mut base, 0.5);
    println!("ratio of medians, transition / baseline max gap: {ratio:.2}x");
    Ok(())
}
