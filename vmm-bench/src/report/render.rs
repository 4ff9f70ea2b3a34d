//! The report as files: report.json, report.md and one SVG chart per
//! group (plotters' SVG backend, no font dependencies).

use super::row::Group;
use super::{Report, Row};
use crate::vm::probe::Accel;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Write report.json, report.md and the SVG charts into `dir`.
pub fn write(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = vec![];
    let j = dir.join("report.json");
    std::fs::write(&j, serde_json::to_vec_pretty(r)?)?;
    files.push(j);
    let m = dir.join("report.md");
    std::fs::write(&m, markdown(r))?;
    files.push(m);
    for (group, title) in [
        (Group::Start, "Start-up (us, log scale)"),
        (
            Group::Roundtrip,
            "Null privileged operation round trip (ns, log scale)",
        ),
        (Group::Size, "Image size (KiB, log scale)"),
        (
            Group::Density,
            "Instances started per second, all cores busy",
        ),
    ] {
        let items: Vec<(String, f64)> = r
            .rows
            .iter()
            .filter(|x| x.group == group)
            .map(|x| (format!("{}: {} [{}]", x.path, x.metric, short(x)), x.value))
            .collect();
        if items.is_empty() {
            continue;
        }
        let p = dir.join(format!("{}.svg", group.name()));
        chart(&p, title, &items)?;
        files.push(p);
    }
    let rel: Vec<(String, f64)> = r
        .rows
        .iter()
        .filter(|x| x.metric == "throughput relative to native")
        .map(|x| (format!("{} [{}]", x.path, short(x)), x.value))
        .collect();
    if !rel.is_empty() {
        let p = dir.join("compute.svg");
        chart(
            &p,
            "Workload throughput relative to native (x, log scale)",
            &rel,
        )?;
        files.push(p);
    }
    Ok(files)
}

/// The accelerator's label without its parenthesised note.
fn short(x: &Row) -> &'static str {
    let l = x.accel.label();
    l.split(" (").next().unwrap_or(l)
}

/// A horizontal bar chart on a log scale (every chart spans orders of
/// magnitude, density included at worst harmlessly).
fn chart(path: &Path, title: &str, items: &[(String, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let h = 120 + 28 * items.len() as u32;
    let root = SVGBackend::new(path, (1000, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let max = items.iter().map(|i| i.1).fold(f64::MIN_POSITIVE, f64::max) * 1.5;
    let min = items
        .iter()
        .map(|i| i.1)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min)
        .min(1.0)
        / 2.0;
    let n = items.len();
    let draw = |root: &DrawingArea<SVGBackend, plotters::coord::Shift>| -> Result<(), Box<dyn std::error::Error + '_>> {
        let mut ch = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(0)
            .build_cartesian_2d((min..max).log_scale(), 0f64..n as f64)?;
        ch.configure_mesh().disable_y_mesh().disable_y_axis().draw()?;
        for (i, (label, v)) in items.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            ch.draw_series(std::iter::once(Rectangle::new([(min, y + 0.15), (v.max(min), y + 0.85)], BLUE.mix(0.35).filled())))?;
            ch.draw_series(std::iter::once(Text::new(format!("{label}: {}", fmt_num(*v)), (min, y + 0.65), ("sans-serif", 12))))?;
        }
        root.present()?;
        Ok(())
    };
    draw(&root).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// report.md: the host, the checksums, one table per group, the claims,
/// what was skipped and how it was measured.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    header(&mut s, r);
    let _ = writeln!(
        s,
        "## Checksums (expected {}; every run checked)\n\n| path | checksum | runs matching | ok |\n|---|---|---:|---|",
        r.expected_checksum
    );
    for c in &r.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} | {} |",
            c.path,
            c.checksum.as_deref().unwrap_or("-"),
            c.matched,
            c.runs,
            if c.ok { "yes" } else { "**NO**" }
        );
    }
    settings_table(&mut s, r);
    tables(&mut s, r);
    let _ = writeln!(
        s,
        "\n## Claims\n\n| claim | measured | verdict |\n|---|---|---|"
    );
    for c in &r.claims {
        let _ = writeln!(s, "| {} | {} | {} |", c.claim, c.measured, c.verdict);
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "\n## Skipped\n");
        for k in &r.skipped {
            let _ = writeln!(s, "- **{}**: {}", k.path, k.reason);
        }
    }
    let _ = writeln!(s, "\n## Method\n\n{METHOD}");
    s
}

fn header(s: &mut String, r: &Report) {
    let _ = writeln!(s, "# vmm-bench report\n");
    let _ = writeln!(
        s,
        "- CPU: {} ({} CPUs){}",
        r.host.cpu_model,
        r.host.cpus,
        if r.host.host_is_guest {
            ", **this host is itself a virtual machine**"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "- Host kernel: {}", r.host.release);
    let _ = writeln!(
        s,
        "- KVM: {}",
        r.probe.accel.map_or_else(
            || format!("unusable: {}", r.probe.error.clone().unwrap_or_default()),
            |a| a.label().to_string()
        )
    );
    let _ = writeln!(
        s,
        "- Workload: checksum over {} KiB, null-operation loops of {}; mode: {}",
        r.kib,
        r.loops,
        if r.quick { "quick" } else { "full" }
    );
    let _ = writeln!(s, "- Took {:.1} s\n", r.elapsed_s);
    if r.probe.accel != Some(Accel::HardwareKvm) {
        let _ = writeln!(
            s,
            "> Numbers labelled *nested, emulating KVM* or *QEMU TCG* were taken under emulation: they describe this host, not hardware virtualization.\n"
        );
    }
}

/// One setting read from a path's settings.
type SettingOf = fn(&crate::container::Settings) -> String;

/// Which isolation each container path had, one column per path.
fn settings_table(s: &mut String, r: &Report) {
    if r.container_settings.is_empty() {
        return;
    }
    let paths: Vec<&str> = r
        .container_settings
        .iter()
        .map(|p| p.path.as_str())
        .collect();
    let _ = writeln!(
        s,
        "\n## Container settings\n\n| setting | {} |\n|---|{}",
        paths.join(" | "),
        "---|".repeat(paths.len())
    );
    let rows: [(&str, SettingOf); 10] = [
        ("mode", |x| x.mode.clone()),
        ("root file system", |x| x.rootfs.clone()),
        ("/dev", |x| x.dev.clone()),
        ("/proc", |x| x.proc.clone()),
        ("/sys", |x| x.sys.clone()),
        ("cgroup namespace", |x| x.cgroup_namespace.to_string()),
        ("limits", |x| x.limits.clone()),
        ("capabilities", |x| x.capabilities.clone()),
        ("no_new_privs", |x| x.no_new_privs.to_string()),
        ("seccomp", |x| x.seccomp.clone()),
    ];
    for (name, get) in rows {
        let cells: Vec<String> = r
            .container_settings
            .iter()
            .map(|p| get(&p.settings))
            .collect();
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
    }
}

fn tables(s: &mut String, r: &Report) {
    for (g, t) in Group::TABLES {
        let _ = writeln!(
            s,
            "\n## {t}\n\n| path | metric | median | min | max | accelerator | clock | n |\n|---|---|---:|---:|---:|---|---|---:|"
        );
        for x in r.rows.iter().filter(|x| x.group == g) {
            let u = x.unit.name();
            let _ = writeln!(
                s,
                "| {} | {} | {} {u} | {} | {} | {} | {} | {} |",
                x.path,
                x.metric,
                fmt_num(x.value),
                fmt_num(x.min),
                fmt_num(x.max),
                x.accel.label(),
                x.clock.name(),
                x.runs
            );
        }
    }
}

const METHOD: &str = "Median, min and max over the n runs shown (report.json keeps every sample). The process paths (native, container, namespaced process, container + netns, runc) run round-robin, one run of each in turn, after one discarded warm-up round; the unikernel paths discard one warm-up run; each QEMU Linux boot is a fresh QEMU. Nothing is pinned (2 shared CPUs here). Every run's checksum is checked. Process start-up: *launch to exec* ends at the workload's first instruction, which prints its own CLOCK_MONOTONIC; peak RSS is the workload's own VmHWM. Under an emulating KVM the guest-timed round trips are left out (the guest's loops time the emulator), and the VM's launch-to-exit is compute, not start-up. The VMM-vs-bare exit comparison times both loops from before their watchdog is made. *guest* clock: the guest's TSC (our VMM converts with KVM_GET_TSC_KHZ; under QEMU with the host TSC rate calibrated against CLOCK_MONOTONIC) or CLOCK_MONOTONIC/CLOCK_BOOTTIME inside a Linux guest. *host* clock: CLOCK_MONOTONIC around the launch in this process. Start of our VMM is split into KVM_CREATE_VM, memory, image load, vCPU set-up, first exit, and the guest's boot-timer write (Firecracker's method: port 0x440, byte 123). Round trips: the guest loops over the operation and divides. The VMM-vs-bare comparison alternates both loops on fresh VMs in one run. Memory: our VMM's RSS minus the guest RAM pages that are resident (mincore); QEMU's peak RSS from wait4. Density: one launcher thread per CPU, VMs and containers alternated over two rounds of half the span each; an order that flips between the rounds is reported.";
