//! `vmm-bench report`: one pass down every path, written as report.md,
//! report.json and SVG charts. Every number carries the accelerator it ran
//! under and whether the guest or the host clock measured it.
//!
//! - [`paths`]: running each path and turning its runs into rows.
//! - [`claims`]: the verdicts on the figures others publish.
//! - [`render`]: report.md, report.json and the charts.
//! - [`row`]: a row and the typed builder the paths fill in.

mod claims;
mod paths;
mod render;
mod row;

pub use render::{markdown, write};
pub use row::{Clock, Group, PathRows, Row, Unit};

use crate::host::{HostInfo, host_info};
use crate::native;
use crate::vm::boot;
use crate::vm::probe::{self, Accel, Probe};
use anyhow::Result;
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ReportOpts {
    pub quick: bool,
    pub out: PathBuf,
    pub kib: u64,
    pub loops: u64,
    /// Skip the QEMU-Linux boot (several seconds under TCG).
    pub no_linux: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Every run's checksum of one path: `ok` only when all of them match.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub path: String,
    /// The first wrong checksum, or the (common) right one.
    pub checksum: Option<String>,
    pub ok: bool,
    /// Runs checked, and how many of them matched.
    pub runs: usize,
    pub matched: usize,
}

/// The isolation one container path had.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathSettings {
    pub path: String,
    pub settings: crate::container::Settings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claim {
    pub claim: String,
    pub measured: String,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub host: HostInfo,
    pub probe: Probe,
    pub quick: bool,
    pub kib: u64,
    pub loops: u64,
    pub expected_checksum: String,
    pub checks: Vec<Check>,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
    pub claims: Vec<Claim>,
    /// Which isolation settings each container path ran with.
    pub container_settings: Vec<PathSettings>,
    pub exit_compare: Option<boot::ExitCompare>,
    pub elapsed_s: f64,
}

/// What the paths have found so far.
struct Findings {
    rows: Vec<Row>,
    skipped: Vec<Skipped>,
    checks: Vec<Check>,
    settings: Vec<PathSettings>,
    expected: u64,
}

impl Findings {
    /// Rows for `path` under `accel`.
    fn path(&mut self, path: &str, accel: Accel) -> PathRows<'_> {
        PathRows::new(&mut self.rows, path, accel)
    }

    fn skip(&mut self, path: &str, reason: impl std::fmt::Display) {
        self.skipped.push(Skipped {
            path: path.into(),
            reason: format!("{reason:#}"),
        });
    }

    /// Check every run's checksum of `path` (None: a run printed none).
    fn check(&mut self, path: &str, sums: impl IntoIterator<Item = Option<u64>>) -> bool {
        let sums: Vec<Option<u64>> = sums.into_iter().collect();
        let matched = sums.iter().filter(|&&s| s == Some(self.expected)).count();
        let shown = sums
            .iter()
            .find(|&&s| s != Some(self.expected))
            .or(sums.first())
            .copied()
            .flatten();
        let ok = matched == sums.len() && !sums.is_empty();
        self.checks.push(Check {
            path: path.into(),
            checksum: shown.map(|s| format!("{s:#018x}")),
            ok,
            runs: sums.len(),
            matched,
        });
        ok
    }

    fn find(&self, path: &str, metric: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.path == path && r.metric == metric)
            .map(|r| r.value)
    }
}

/// Run the whole pass. Long work reports progress on stderr.
pub fn run(opts: &ReportOpts) -> Result<Report> {
    let start = Instant::now();
    let pr = Progress::new("vmm-bench report");
    let expected = native::expected_checksum(opts.kib, vmm_bench_workload::DEFAULT_SEED)?;
    let mut f = Findings {
        rows: vec![],
        skipped: vec![],
        checks: vec![],
        settings: vec![],
        expected,
    };
    pr.step("probing /dev/kvm");
    let probe = probe::probe(Duration::from_secs(1));
    pr.note(format!(
        "KVM: {}",
        probe.accel.map_or_else(
            || probe.error.clone().unwrap_or_else(|| "unusable".into()),
            |a| a.label().to_string()
        )
    ));
    let host = host_info();
    let ctx = paths::Ctx {
        opts,
        args: vec![format!("kib={}", opts.kib), format!("loops={}", opts.loops)],
        n: if opts.quick { 5 } else { 20 },
        pr: &pr,
        probe: &probe,
        cpus: host.cpus,
        tsc_khz: native::host_tsc_khz(),
    };
    let exit_compare = paths::run_all(&ctx, &mut f);
    let claims = claims::claims(&f, exit_compare.as_ref(), probe.accel);
    pr.finish();
    Ok(Report {
        host,
        quick: opts.quick,
        kib: opts.kib,
        loops: opts.loops,
        expected_checksum: format!("{expected:#018x}"),
        checks: f.checks,
        container_settings: f.settings,
        rows: f.rows,
        skipped: f.skipped,
        claims,
        exit_compare,
        elapsed_s: start.elapsed().as_secs_f64(),
        probe,
    })
}
