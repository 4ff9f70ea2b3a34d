//! The observer's intervals (`overhead record --json`, read as ebpf's
//! `schema::Report`) set against the load: the window they span, and the
//! per-cgroup figures before, during and after `hotpatch load`.

use super::guest::Steps;
use hotpatch::LoadReport;
use livehost_common::progress::Progress;
use livehost_ebpf::schema::CulpritClass;
/// One interval `overhead record --json` printed.
pub use livehost_ebpf::schema::Report as Interval;
use serde::Serialize;
use std::collections::BTreeMap;

/// The observer part of the demo's report.
#[derive(Debug, Default, Serialize)]
pub struct Observer {
    pub window: Window,
    pub phases: Phases,
    /// Every interval `overhead record` printed, in order.
    pub intervals: Vec<Interval>,
    /// `overhead record`'s stderr.
    pub log: String,
}

impl Observer {
    pub fn from_steps(steps: &Steps, load: Option<&LoadReport>, progress: &Progress) -> Observer {
        let mut intervals = Vec::new();
        for line in steps.text("overhead").lines() {
            match serde_json::from_str::<Interval>(line) {
                Ok(i) => intervals.push(i),
                Err(e) => progress.note(format!(
                    "an `overhead record` line is not an interval ({e}), left out: {line}"
                )),
            }
        }
        Observer {
            window: Window::of(&intervals, load),
            phases: Phases::of(&intervals, load),
            intervals,
            log: steps.text("overhead_log").to_string(),
        }
    }
}

/// The wall-clock span the observer's intervals cover (each interval ends at
/// its `ts_unix_ms` and lasted `interval_s`), and whether it contains the
/// whole `hotpatch load` (its `started_unix_ms`..`finished_unix_ms`): the
/// figures beside the patch are only "over the same window" when it does.
/// Both clocks are the guest's, so they compare directly.
#[derive(Debug, Default, Serialize)]
pub struct Window {
    pub start_unix_ms: Option<f64>,
    pub end_unix_ms: Option<f64>,
    pub load_start_unix_ms: Option<f64>,
    pub load_end_unix_ms: Option<f64>,
    /// None when there is nothing to compare: unknown, not a pass.
    pub covers_load: Option<bool>,
}

/// When an interval began and ended, in ms since the epoch.
fn span(i: &Interval) -> (f64, f64) {
    let end = i.ts_unix_ms as f64;
    (end - i.interval_s * 1e3, end)
}

/// When the load began and returned, in ms since the epoch.
fn load_span(load: &LoadReport) -> (f64, f64) {
    (load.started_unix_ms as f64, load.finished_unix_ms as f64)
}

impl Window {
    pub fn of(intervals: &[Interval], load: Option<&LoadReport>) -> Window {
        let start = intervals.first().map(|i| span(i).0);
        let end = intervals.last().map(|i| span(i).1);
        let load = load.map(load_span);
        let covers_load = match (start, end, load) {
            (Some(s), Some(e), Some((ls, le))) => Some(s <= ls && le <= e),
            _ => None,
        };
        Window {
            start_unix_ms: start,
            end_unix_ms: end,
            load_start_unix_ms: load.map(|l| l.0),
            load_end_unix_ms: load.map(|l| l.1),
            covers_load,
        }
    }
}

/// Where an interval lies against the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseName {
    /// It ended before the load started.
    Before,
    /// It overlaps the load.
    During,
    /// It began after the load finished.
    After,
}

impl PhaseName {
    pub const ALL: [PhaseName; 3] = [PhaseName::Before, PhaseName::During, PhaseName::After];

    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Before => "before",
            PhaseName::During => "during",
            PhaseName::After => "after",
        }
    }

    /// Where `interval` lies against the load.
    pub fn of(interval: &Interval, load: &LoadReport) -> PhaseName {
        let (start, end) = span(interval);
        let (ls, le) = load_span(load);
        if end <= ls {
            PhaseName::Before
        } else if start >= le {
            PhaseName::After
        } else {
            PhaseName::During
        }
    }
}

/// The observer's per-cgroup figures before, during and after the load:
/// what the patch cost the workloads, against what they paid anyway.
/// Without a load report every phase is empty.
#[derive(Debug, Default, Serialize)]
pub struct Phases {
    pub before: Phase,
    pub during: Phase,
    pub after: Phase,
}

impl Phases {
    pub fn of(intervals: &[Interval], load: Option<&LoadReport>) -> Phases {
        let mut phases = Phases::default();
        let Some(load) = load else {
            return phases;
        };
        for name in PhaseName::ALL {
            let these: Vec<&Interval> = intervals
                .iter()
                .filter(|i| PhaseName::of(i, load) == name)
                .collect();
            *phases.get_mut(name) = Phase::of(&these);
        }
        phases
    }

    pub fn get(&self, name: PhaseName) -> &Phase {
        match name {
            PhaseName::Before => &self.before,
            PhaseName::During => &self.during,
            PhaseName::After => &self.after,
        }
    }

    fn get_mut(&mut self, name: PhaseName) -> &mut Phase {
        match name {
            PhaseName::Before => &mut self.before,
            PhaseName::During => &mut self.during,
            PhaseName::After => &mut self.after,
        }
    }
}

/// Some intervals, and each cgroup's figures summed over them.
#[derive(Debug, Default, Serialize)]
pub struct Phase {
    pub intervals: usize,
    pub seconds: f64,
    pub cgroups: Vec<PhaseCgroup>,
}

#[derive(Debug, Serialize)]
pub struct PhaseCgroup {
    pub path: String,
    pub container: Option<String>,
    pub cpu_ns: u64,
    pub rq_waits: u64,
    /// The largest of the intervals' p99s (an upper bound of the whole p99).
    pub rq_p99_ns: u64,
    /// The longest single wait in these intervals.
    pub rq_max_ns: u64,
}

impl Phase {
    fn of(intervals: &[&Interval]) -> Phase {
        Phase {
            intervals: intervals.len(),
            seconds: intervals.iter().map(|i| i.interval_s).sum(),
            cgroups: aggregate(intervals)
                .into_iter()
                .map(|(path, a)| PhaseCgroup {
                    path,
                    container: (!a.container.is_empty()).then_some(a.container),
                    cpu_ns: a.cpu_ns,
                    rq_waits: a.waits,
                    rq_p99_ns: a.p99,
                    rq_max_ns: a.max,
                })
                .collect(),
        }
    }
}

/// One cgroup's figures summed over some of the observer's intervals.
#[derive(Default)]
pub struct Agg {
    pub container: String,
    pub cpu_ns: u64,
    pub waits: u64,
    /// The largest of the intervals' p99s (an upper bound of the whole p99).
    pub p99: u64,
    pub max: u64,
    /// Time spent waiting behind each other cgroup, `path (class)`.
    pub behind: BTreeMap<String, u64>,
}

/// Each cgroup's figures over `intervals`, by path.
pub fn aggregate(intervals: &[&Interval]) -> BTreeMap<String, Agg> {
    let mut by: BTreeMap<String, Agg> = BTreeMap::new();
    for g in intervals.iter().flat_map(|i| &i.cgroups) {
        let a = by
            .entry(g.path.clone().unwrap_or_else(|| "?".into()))
            .or_default();
        if let Some(c) = &g.container {
            a.container = c.clone();
        }
        a.cpu_ns += g.cpu_ns;
        a.waits += g.rq_waits;
        a.p99 = a.p99.max(g.rq_p99_ns);
        a.max = a.max.max(g.rq_interval_max_ns);
        // An idle CPU is wake-up latency, not someone to wait behind.
        for p in g
            .preempted_by
            .iter()
            .filter(|p| p.class != CulpritClass::Idle)
        {
            let who = format!(
                "{} ({})",
                p.path.as_deref().unwrap_or("?"),
                p.class.as_str()
            );
            *a.behind.entry(who).or_default() += p.wait_ns;
        }
    }
    by
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use livehost_ebpf::schema::{CgroupRow, Programs};

    /// An interval that ended at `end_ms` after `secs`, with one container
    /// cgroup `/app` that ran `cpu_ns`.
    pub fn interval(end_ms: u64, secs: f64, cpu_ns: u64) -> Interval {
        Interval {
            schema: livehost_ebpf::schema::SCHEMA_VERSION,
            ts_unix_ms: end_ms,
            interval_s: secs,
            map_memory_bytes: 0,
            vms: Vec::new(),
            cgroups: vec![CgroupRow {
                id: 7,
                path: Some("/app".into()),
                container: Some("livehost:app".into()),
                cpu_ns,
                rq_waits: 4,
                rq_sum_ns: 0,
                rq_p50_ns: 0,
                rq_p99_ns: cpu_ns / 10,
                rq_max_ns: cpu_ns,
                rq_interval_max_ns: cpu_ns / 5,
                preempted_by: Vec::new(),
                cpu_files: Default::default(),
                noisy: false,
            }],
            noisy: Vec::new(),
            drops: BTreeMap::new(),
            programs: Programs {
                attached: Vec::new(),
                skipped: Vec::new(),
            },
        }
    }

    /// A `hotpatch load` report that ran from `start` to `end` (ms).
    pub fn load(start: u64, end: u64) -> LoadReport {
        serde_json::from_value(serde_json::json!({
            "module": "hp_cmdline", "file": "/root/sample_fix.ko", "sha256": "00",
            "outcome": "loaded",
            "preflight": { "module": "hp_cmdline", "ok": true, "checks": [] },
            "load_syscall_ms": 12.5, "transition_ms": 1500.0,
            "stalled_tasks": [], "rollback_ms": null, "replaced_removed": [],
            "measure": null, "messages": [],
            "started_unix_ms": start, "finished_unix_ms": end
        }))
        .expect("a LoadReport")
    }

    #[test]
    fn observer_window_must_contain_the_load() {
        let ivs = [
            interval(12_000, 2.0, 1),
            interval(14_000, 2.0, 1),
            interval(16_000, 2.0, 1),
        ];
        let w = Window::of(&ivs, Some(&load(11_000, 15_500)));
        assert_eq!(w.start_unix_ms, Some(10_000.0));
        assert_eq!(w.end_unix_ms, Some(16_000.0));
        assert_eq!(w.covers_load, Some(true));
        // Began before the observer's first interval, or ended after its last.
        let w = Window::of(&ivs, Some(&load(9_999, 12_000)));
        assert_eq!(w.covers_load, Some(false));
        let w = Window::of(&ivs, Some(&load(15_000, 16_001)));
        assert_eq!(w.covers_load, Some(false));
        // Nothing to compare: unknown, not a pass.
        assert_eq!(Window::of(&[], Some(&load(1, 2))).covers_load, None);
        assert_eq!(Window::of(&ivs, None).covers_load, None);
    }

    #[test]
    fn intervals_are_split_before_during_and_after_the_load() {
        // Intervals (10,12] (12,14] (14,16] (16,18]; the load spans 13.0-13.5.
        let ivs = [
            interval(12_000, 2.0, 100),
            interval(14_000, 2.0, 200),
            interval(16_000, 2.0, 300),
            interval(18_000, 2.0, 400),
        ];
        let l = load(13_000, 13_500);
        assert_eq!(PhaseName::of(&ivs[0], &l), PhaseName::Before);
        assert_eq!(PhaseName::of(&ivs[1], &l), PhaseName::During);
        assert_eq!(PhaseName::of(&ivs[2], &l), PhaseName::After);
        let p = Phases::of(&ivs, Some(&l));
        assert_eq!(p.before.intervals, 1);
        assert_eq!(p.during.intervals, 1);
        assert_eq!(p.after.intervals, 2);
        assert_eq!(p.after.seconds, 4.0);
        let after = &p.after.cgroups[0];
        assert_eq!(after.cpu_ns, 700);
        assert_eq!(after.rq_waits, 8);
        assert_eq!(after.rq_max_ns, 80);
        assert_eq!(after.container.as_deref(), Some("livehost:app"));
        // A load that spans two intervals makes both "during".
        let long = Phases::of(&ivs, Some(&load(13_900, 14_100)));
        assert_eq!(long.during.intervals, 2);
        // No load report: no split.
        assert_eq!(Phases::of(&ivs, None).during.intervals, 0);
    }

    #[test]
    fn the_phases_keep_the_report_keys() {
        let ivs = [interval(12_000, 2.0, 100)];
        let v = serde_json::to_value(Phases::of(&ivs, Some(&load(11_000, 11_500)))).unwrap();
        let c = &v["during"]["cgroups"][0];
        assert_eq!(v["during"]["intervals"], 1);
        assert_eq!(c["path"], "/app");
        assert_eq!(c["container"], "livehost:app");
        for k in ["cpu_ns", "rq_waits", "rq_p99_ns", "rq_max_ns"] {
            assert!(c[k].is_u64(), "{k}: {c}");
        }
        assert!(v["before"]["cgroups"].as_array().unwrap().is_empty());
    }
}
