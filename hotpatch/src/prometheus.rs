//! `hotpatch status --prometheus FILE`: the status as a node_exporter
//! textfile (`--collector.textfile.directory`), written atomically so a
//! scrape never reads half a file. Labels are module names and journal
//! enums only, which need no escaping.

use crate::state::JournalResult;
use crate::status::HostStatus;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;

/// The metrics for `s`, in the Prometheus text exposition format.
pub fn render(s: &HostStatus) -> String {
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, rows: &[(String, f64)]| {
        let _ = writeln!(
            o,
            "# HELP hotpatch_{name} {help}\n# TYPE hotpatch_{name} gauge"
        );
        for (labels, v) in rows {
            let _ = writeln!(o, "hotpatch_{name}{labels} {v}");
        }
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    let patch = |n: &str| format!("{{patch=\"{n}\"}}");
    gauge(
        "host_as_intended",
        "1 when the host matches its installed set (hotpatch status exit 0).",
        &[(String::new(), b(s.as_intended))],
    );
    gauge(
        "drift_problems",
        "How many reasons the host is not as intended.",
        &[(String::new(), s.problems.len() as f64)],
    );
    let loaded: Vec<(String, f64)> = s
        .list
        .patches
        .iter()
        .map(|p| (patch(&p.patch.name), 1.0))
        .collect();
    gauge(
        "patch_loaded",
        "A live patch registered with the kernel.",
        &loaded,
    );
    let enabled: Vec<(String, f64)> = s
        .list
        .patches
        .iter()
        .map(|p| (patch(&p.patch.name), b(p.patch.enabled == Some(true))))
        .collect();
    gauge("patch_enabled", "The patch's enabled attribute.", &enabled);
    let trans: Vec<(String, f64)> = s
        .list
        .patches
        .iter()
        .map(|p| (patch(&p.patch.name), b(p.patch.transition == Some(true))))
        .collect();
    gauge("patch_in_transition", "The patch is in transition.", &trans);
    let applied: Vec<(String, f64)> = s
        .installed
        .iter()
        .map(|i| (patch(&i.name), b(i.state == "applied")))
        .collect();
    gauge(
        "installed_applied",
        "A module installed for this kernel is applied from the installed file.",
        &applied,
    );
    gauge(
        "unfinished_changes",
        "Changes begun by a run that never finished them.",
        &[(String::new(), s.unfinished as f64)],
    );
    if let Some(e) = &s.last_change {
        let labels = format!(
            "{{op=\"{}\",module=\"{}\",result=\"{}\"}}",
            e.op,
            e.module.as_deref().unwrap_or(""),
            e.result
        );
        gauge(
            "last_change_info",
            "The last journalled outcome.",
            &[(labels, 1.0)],
        );
        gauge(
            "last_change_timestamp_seconds",
            "When the last journalled outcome was recorded.",
            &[(String::new(), e.time_unix_ms as f64 / 1e3)],
        );
        gauge(
            "last_change_ok",
            "1 when the last journalled outcome was ok.",
            &[(String::new(), b(e.result == JournalResult::Ok))],
        );
        if let Some(d) = e.duration_ms {
            gauge(
                "last_change_duration_seconds",
                "How long the last journalled change took (its transition).",
                &[(String::new(), d / 1e3)],
            );
        }
    }
    o
}

/// Write the metrics to `file` atomically, readable by a collector.
pub fn write(s: &HostStatus, file: &Path) -> Result<()> {
    crate::state::write_atomic_mode(file, render(s).as_bytes(), 0o644)
}
