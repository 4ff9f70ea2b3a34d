//! report.md, rendered from the typed report: one function per section.

use super::comparison::Comparison;
use super::observer::{self, Interval, Observer, PhaseName, Phases};
use super::report::{GuestSummary, Livepatch, Report, ToolOutput};
use hotpatch::LoadReport;
use std::fmt::Write as _;

/// The whole report.md; `bench_md` is vmm-bench's own report.md (its tables
/// are shown as it wrote them).
pub fn render(r: &Report, bench_md: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# livehost demo\n");
    guest(&mut s, &r.guest);
    livepatch(&mut s, &r.livepatch);
    observer_section(&mut s, &r.observer);
    comparison(&mut s, &r.comparison, bench_md);
    let _ = writeln!(s, "Demo run took {:.0} s.", r.elapsed_s);
    s
}

/// A figure with two decimals below 100, none above.
fn fmt_num(x: f64, unit: &str) -> String {
    if x >= 100.0 {
        format!("{x:.0} {unit}")
    } else {
        format!("{x:.2} {unit}")
    }
}

/// An exit status as the table shows it; `null` when the step did not run
/// (as report.json has it).
fn fmt_exit(code: Option<i32>) -> String {
    code.map_or_else(|| "null".into(), |c| c.to_string())
}

fn guest(s: &mut String, g: &GuestSummary) {
    if let Some(e) = &g.error {
        let _ = writeln!(
            s,
            "> **The guest part failed**, so this report is partial: {}\n",
            e.lines().next().unwrap_or("")
        );
        let _ = writeln!(s, "```\n{}\n```\n", e.trim_end());
    }
    let accel = g.run.as_ref().map(|r| r.accel);
    let _ = writeln!(
        s,
        "Guest kernel `{}` under **{}** ({}).\n",
        g.kernel.as_deref().unwrap_or("?"),
        accel.map_or_else(|| "not started".into(), |a| a.to_string().to_uppercase()),
        g.run.as_ref().map_or("", |r| r.accel_reason.as_str())
    );
    if accel == Some(kernel_tests::Accel::Tcg) {
        let _ = writeln!(
            s,
            "> Every guest timing below was taken under TCG (software emulation): it shows the \
             mechanism works and its relative costs, not bare-metal latencies.\n"
        );
    }
}

fn livepatch(s: &mut String, lp: &Livepatch) {
    let _ = writeln!(s, "## Livepatch\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| `/proc/cmdline` before | `{}` |", lp.before.trim());
    let _ = writeln!(s, "| `/proc/cmdline` after | `{}` |", lp.after.trim());
    let _ = writeln!(s, "| took effect | {} |", lp.took_effect);
    let _ = writeln!(s, "| `hotpatch check` exit | {} |", fmt_exit(lp.check_exit));
    let _ = writeln!(
        s,
        "| `hotpatch load --measure` exit | {} |",
        fmt_exit(lp.load_exit)
    );
    for line in load_rows(lp.load.as_ref()) {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "\nFull `hotpatch` outputs are in `report.json` (`livepatch.*`).\n"
    );
}

/// The Markdown rows for `hotpatch load --measure`'s report: the load
/// syscall, the transition time, and the measurement's stalls. The largest
/// stall always gets a row: its number and environment, or why there is
/// none.
fn load_rows(load: Option<&ToolOutput<LoadReport>>) -> Vec<String> {
    let report = load.and_then(ToolOutput::report);
    let mut rows = Vec::new();
    for (label, v) in [
        (
            "load syscall (`finit_module`)",
            report.and_then(|r| r.load_syscall_ms),
        ),
        ("transition time", report.and_then(|r| r.transition_ms)),
    ] {
        if let Some(v) = v {
            rows.push(format!("| {label} | {} |", fmt_num(v, "ms")));
        }
    }
    let Some(m) = report.and_then(|r| r.measure.as_ref()) else {
        rows.push(format!(
            "| largest stall during transition | not measured: {} |",
            if load.is_none() {
                "no `hotpatch load --measure` output"
            } else {
                "`hotpatch load --measure` reported no measurement"
            }
        ));
        return rows;
    };
    let stall = fmt_num(m.transition.spin_max_gap_us, "µs");
    rows.push(match m.environment.label.as_str() {
        "" => format!(
            "| largest stall during transition | {stall} (environment not reported) |"
        ),
        env => format!(
            "| largest stall during transition | {stall} (a spinning thread's longest time off the CPU; measured on {}) |",
            env.replace('|', "\\|")
        ),
    });
    for (label, v) in [
        (
            "largest stall, baseline (same probe, no patching)",
            m.baseline.spin_max_gap_us,
        ),
        ("added stall", m.added_stall_us),
        (
            "worst 1 ms sleep overshoot during transition",
            m.transition.sleep_max_overshoot_us,
        ),
    ] {
        rows.push(format!("| {label} | {} |", fmt_num(v, "µs")));
    }
    rows
}

fn observer_section(s: &mut String, o: &Observer) {
    let _ = writeln!(s, "## Observer (per cgroup, over the same window)\n");
    let window: f64 = o.intervals.iter().map(|i| i.interval_s).sum();
    let _ = writeln!(
        s,
        "{} intervals, {window:.1} s, recorded by `overhead record` in the guest; {} \
         (TCG: scheduler figures are real, their scale is emulation's).\n",
        o.intervals.len(),
        match o.window.covers_load {
            Some(true) => "the window contains the whole `hotpatch load`",
            Some(false) => "**the window does not contain the whole `hotpatch load`**",
            None => "its overlap with the load is unknown (no timestamps)",
        }
    );
    let _ = writeln!(
        s,
        "| cgroup | container | CPU time | run-queue waits | p99 wait | max wait | waited most behind |\n|---|---|---|---|---|---|---|"
    );
    for row in observer_rows(&o.intervals) {
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    phase_table(s, &o.phases);
}

/// One Markdown row per cgroup, summed over the observer's intervals, the
/// one that ran most first.
fn observer_rows(intervals: &[Interval]) -> Vec<String> {
    let by = observer::aggregate(&intervals.iter().collect::<Vec<_>>());
    let mut rows: Vec<(u64, String)> = by
        .into_iter()
        .map(|(path, a)| {
            let behind = a
                .behind
                .iter()
                .max_by_key(|(_, w)| **w)
                .map(|(k, w)| format!("{k}: {:.1} ms", *w as f64 / 1e6))
                .unwrap_or_else(|| "—".into());
            let container = if a.container.is_empty() {
                "—"
            } else {
                &a.container
            };
            let row = format!(
                "| `{path}` | {container} | {:.0} ms | {} | {:.2} ms | {:.2} ms | {behind} |",
                a.cpu_ns as f64 / 1e6,
                a.waits,
                a.p99 as f64 / 1e6,
                a.max as f64 / 1e6,
            );
            (a.cpu_ns, row)
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Before / during / after the load, per cgroup that had a container name
/// or ran most (the rest is in report.json): CPU share, waits per second,
/// p99 and max wait.
fn phase_table(s: &mut String, phases: &Phases) {
    if phases.during.intervals == 0 {
        let _ = writeln!(
            s,
            "No observer interval overlaps the load, so there is no before/during/after split.\n"
        );
        return;
    }
    let _ = writeln!(
        s,
        "Before, during and after the load (each interval counted in the phase it overlaps; \
         \"during\" holds the whole intervals the load touched):\n"
    );
    let _ = writeln!(
        s,
        "| phase | intervals | cgroup | CPU (% of one CPU) | waits/s | p99 wait | max wait |\n|---|---|---|---|---|---|---|"
    );
    for name in PhaseName::ALL {
        let p = phases.get(name);
        let (phase, secs, n) = (name.as_str(), p.seconds, p.intervals);
        if n == 0 || secs <= 0.0 {
            let _ = writeln!(s, "| {phase} | 0 | — | | | | |");
            continue;
        }
        let mut rows: Vec<_> = p.cgroups.iter().collect();
        rows.sort_by_key(|c| std::cmp::Reverse(c.cpu_ns));
        // The containers, and whoever ran most if that is not one of them.
        let shown = rows
            .iter()
            .enumerate()
            .filter(|(i, c)| *i == 0 || c.container.is_some());
        for (_, c) in shown {
            let _ = writeln!(
                s,
                "| {phase} | {n} ({secs:.1} s) | `{}` | {:.0}% | {:.0} | {:.2} ms | {:.2} ms |",
                c.path,
                c.cpu_ns as f64 / (secs * 1e9) * 100.0,
                c.rq_waits as f64 / secs,
                c.rq_p99_ns as f64 / 1e6,
                c.rq_max_ns as f64 / 1e6,
            );
        }
    }
    let _ = writeln!(s);
}

fn comparison(s: &mut String, c: &Comparison, bench_md: &str) {
    let _ = writeln!(s, "## VM vs container vs unikernel (host)\n");
    if let Some(e) = c.unavailable() {
        let _ = writeln!(s, "Not available: {e}\n");
        return;
    }
    if let Some(code) = c.exit_code().filter(|&c| c != 0) {
        let _ = writeln!(
            s,
            "> `vmm-bench report` exited with {code}{}; its tables below are as it wrote them.\n",
            if code == 1 {
                " (a checksum mismatch or a path that failed: see its Checksums table and Skipped list)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        s,
        "From `vmm-bench report --quick`; its SVG charts are in `vmm-bench/` beside this file.\n"
    );
    // Its own headings go one level down, under this section.
    for line in bench_md
        .lines()
        .skip_while(|l| l.starts_with("# ") || l.is_empty())
    {
        if line.starts_with('#') {
            let _ = writeln!(s, "#{line}");
        } else {
            let _ = writeln!(s, "{line}");
        }
    }
    let _ = writeln!(s);
}

#[cfg(test)]
mod tests {
    use super::super::comparison::BenchExit;
    use super::super::observer::tests::{interval, load};
    use super::*;

    #[test]
    fn largest_stall_row_uses_hotpatchs_measurement() {
        // The shape `hotpatch --json load --measure` prints (LoadReport).
        let mut l = load(0, 1);
        l.measure = Some(
            serde_json::from_value(serde_json::json!({
                "environment": {
                    "kind": "vm-tcg", "label": "QEMU TCG guest", "hypervisor_flag": true,
                    "cpuid_hypervisor": null, "dmi_vendor": "QEMU", "dmi_product": null,
                    "cpus": 2, "cpu_model": "cpu", "release": "6.1.0"
                },
                "spinning_threads": 1,
                "transition": { "duration_ms": 1.0, "spin_max_gap_us": 4321.0, "spin_gaps_over_100us": 1,
                                "spin_reads": 1, "sleep_max_overshoot_us": 900.0, "sleeps": 1 },
                "baseline": { "duration_ms": 1.0, "spin_max_gap_us": 1234.0, "spin_gaps_over_100us": 1,
                              "spin_reads": 1, "sleep_max_overshoot_us": 1.0, "sleeps": 1 },
                "added_stall_us": 3087.0, "added_sleep_overshoot_us": 0.0, "method": "spin"
            }))
            .unwrap(),
        );
        let rows = load_rows(Some(&ToolOutput::Report(l))).join("\n");
        assert!(
            rows.contains("| load syscall (`finit_module`) | 12.50 ms |"),
            "{rows}"
        );
        assert!(rows.contains("| transition time | 1500 ms |"), "{rows}");
        assert!(
            rows.contains("| largest stall during transition | 4321 µs")
                && rows.contains("measured on QEMU TCG guest"),
            "{rows}"
        );
        assert!(
            rows.contains("| largest stall, baseline (same probe, no patching) | 1234 µs |"),
            "{rows}"
        );
        assert!(rows.contains("| added stall | 3087 µs |"), "{rows}");
        // No measurement: the row says so instead of vanishing.
        let rows = load_rows(None).join("\n");
        assert!(
            rows.contains("largest stall during transition | not measured"),
            "{rows}"
        );
        let rows = load_rows(Some(&ToolOutput::Report(load(0, 1)))).join("\n");
        assert!(rows.contains("reported no measurement"), "{rows}");
    }

    #[test]
    fn the_phase_table_shows_the_loads_intervals() {
        let ivs = [
            interval(12_000, 2.0, 100),
            interval(14_000, 2.0, 200),
            interval(16_000, 2.0, 300),
        ];
        let mut md = String::new();
        phase_table(&mut md, &Phases::of(&ivs, Some(&load(13_000, 13_500))));
        assert!(md.contains("| during | 1 (2.0 s) | `/app` |"), "{md}");
        let mut md = String::new();
        phase_table(&mut md, &Phases::of(&ivs, None));
        assert!(md.contains("No observer interval overlaps"), "{md}");
    }

    #[test]
    fn a_failed_comparison_keeps_vmm_benchs_tables() {
        let mut r = Report::default();
        r.comparison.exit = Some(BenchExit {
            exit_code: Some(1),
            signal: None,
        });
        let md = render(&r, "# vmm-bench report\n\n## Checksums\n");
        assert!(md.contains("`vmm-bench report` exited with 1"), "{md}");
        assert!(md.contains("### Checksums"), "{md}");
    }

    #[test]
    fn a_failed_guest_part_is_stated() {
        let mut r = Report::default();
        r.guest.error = Some("vmm-bench is not built\nmore".into());
        r.comparison = Comparison::not_run("--no-bench");
        let md = render(&r, "");
        assert!(md.contains("**The guest part failed**"), "{md}");
        assert!(md.contains("vmm-bench is not built"), "{md}");
        assert!(md.contains("not measured"), "{md}");
        assert!(md.contains("Not available: --no-bench"), "{md}");
    }
}
