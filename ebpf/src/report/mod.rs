//! From raw map snapshots to what users see: per-VM/vCPU and per-cgroup
//! rows for one interval, with names, percentiles and the noisy-neighbour
//! verdict. The rows' types (the JSON schema) are in `schema`, the text
//! tables in `text`.

pub mod schema;
pub mod text;

pub use schema::*;
pub use text::{cgroup_cells, ms, noisy_culprits, render_text, us, vcpu_cells};

use crate::cgroup::{self, Resolver};
use crate::comm::comm_or;
use crate::intf::{CULPRIT_IDLE, CULPRIT_UNKNOWN};
use crate::reasons::{self, ReasonTable};
use crate::snapshot::{CgVal, ExitKey, ExitVal, Hist, RawSnapshot};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub pid: Option<u32>,
    /// Cgroup ids to keep (the one asked for and, for --pid, the pid's).
    pub cgroups: Option<Vec<u64>>,
    pub vm_only: bool,
    pub containers_only: bool,
}

impl Filter {
    /// Whether the rows of process `tgid` are kept.
    pub fn keeps_pid(&self, tgid: u32) -> bool {
        self.pid.is_none_or(|p| p == tgid)
    }

    /// Whether the row of cgroup `id` is kept.
    pub fn keeps_cgroup(&self, id: u64) -> bool {
        self.cgroups.as_ref().is_none_or(|keep| keep.contains(&id))
    }
}

#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub filter: Filter,
    /// Flag a cgroup whose interval p99 run-queue latency exceeds this.
    pub noisy_p99_ns: u64,
    /// ...provided it waited at least this many times (a lone outlier is noise).
    pub noisy_min_waits: u64,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            filter: Filter::default(),
            noisy_p99_ns: 5_000_000,
            noisy_min_waits: 20,
        }
    }
}

/// How a culprit relates to the cgroup that waited (see `PreemptRow::class`).
pub fn culprit_class(victim: u64, culprit: u64, root: u64) -> CulpritClass {
    if culprit == CULPRIT_IDLE {
        CulpritClass::Idle
    } else if culprit == CULPRIT_UNKNOWN {
        CulpritClass::Unknown
    } else if culprit == victim {
        CulpritClass::Same
    } else if culprit == root {
        CulpritClass::Host
    } else {
        CulpritClass::Other
    }
}

/// Upper bound of the log2 bucket holding the q-quantile, clipped to max.
pub fn hist_quantile(hist: &Hist, q: f64, max: u64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            let upper = if i >= 63 {
                u64::MAX
            } else {
                (1u64 << (i + 1)) - 1
            };
            return if max > 0 { upper.min(max) } else { upper };
        }
    }
    max
}

fn sub_hist(a: &Hist, b: &Hist) -> Hist {
    let mut out = Hist::default();
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
        *o = x.saturating_sub(*y);
    }
    out
}

/// The interval's bound for percentiles: its own max when the kernel saw
/// one, else the since-start max (still an upper bound).
fn clip(interval_max: u64, max: u64) -> u64 {
    if interval_max > 0 { interval_max } else { max }
}

/// What the host cost a VM in the interval, for ranking: the larger of its
/// busy exit time (HLT left out: an idle guest costs nothing) and its vCPUs'
/// run-queue delay. Never their sum: a vCPU preempted while handling an
/// exit waits inside the exit's time too.
pub fn host_cost_ns(vm: &VmRow) -> u64 {
    vm.busy_exit_ns.max(vm.rq_delay_ns)
}

/// `prev` None: the interval is everything since the observer started.
fn delta_exit(cur: &ExitVal, prev: Option<&ExitVal>) -> ExitVal {
    let Some(p) = prev else {
        return ExitVal {
            interval_max_ns: cur.max_ns,
            ..*cur
        };
    };
    ExitVal {
        count: cur.count.saturating_sub(p.count),
        timed: cur.timed.saturating_sub(p.timed),
        sum_ns: cur.sum_ns.saturating_sub(p.sum_ns),
        max_ns: cur.max_ns,
        interval_max_ns: cur.interval_max_ns,
        hist: sub_hist(&cur.hist, &p.hist),
    }
}

fn delta_cg(cur: &CgVal, prev: Option<&CgVal>) -> CgVal {
    let Some(p) = prev else {
        return CgVal {
            rq_interval_max_ns: cur.rq_max_ns,
            ..*cur
        };
    };
    CgVal {
        cpu_ns: cur.cpu_ns.saturating_sub(p.cpu_ns),
        rq_count: cur.rq_count.saturating_sub(p.rq_count),
        rq_sum_ns: cur.rq_sum_ns.saturating_sub(p.rq_sum_ns),
        rq_max_ns: cur.rq_max_ns,
        rq_interval_max_ns: cur.rq_interval_max_ns,
        hist: sub_hist(&cur.hist, &p.hist),
    }
}

fn exit_row(k: &ExitKey, v: &ExitVal) -> ExitRow {
    let bound = clip(v.interval_max_ns, v.max_ns);
    ExitRow {
        kind: k.kind,
        isa: ReasonTable::of(k.kind, k.isa),
        reason: k.reason,
        name: reasons::exit_name(k.kind, k.isa, k.reason),
        count: v.count,
        timed: v.timed,
        sum_ns: v.sum_ns,
        max_ns: v.max_ns,
        interval_max_ns: v.interval_max_ns,
        p50_ns: hist_quantile(&v.hist, 0.5, bound),
        p99_ns: hist_quantile(&v.hist, 0.99, bound),
    }
}

/// One interval of the two snapshots `prev` (None: since start) and `cur`.
struct Interval<'a> {
    cur: &'a RawSnapshot,
    prev: Option<&'a RawSnapshot>,
}

impl Interval<'_> {
    /// The interval's exit rows, by tgid then tid; vCPU threads that only
    /// waited this interval get an empty list (they still deserve a row).
    fn exits_by_thread(&self, f: &Filter) -> BTreeMap<u32, BTreeMap<u32, Vec<ExitRow>>> {
        let mut vms: BTreeMap<u32, BTreeMap<u32, Vec<ExitRow>>> = BTreeMap::new();
        for (k, v) in &self.cur.exits {
            if !f.keeps_pid(k.tgid) {
                continue;
            }
            let d = delta_exit(v, self.prev.and_then(|p| p.exits.get(k)));
            if d.count == 0 {
                continue;
            }
            vms.entry(k.tgid)
                .or_default()
                .entry(k.tid)
                .or_default()
                .push(exit_row(k, &d));
        }
        for (tid, v) in &self.cur.vcpus {
            if !f.keeps_pid(v.tgid) {
                continue;
            }
            let p = self
                .prev
                .and_then(|p| p.vcpus.get(tid))
                .filter(|p| p.tgid == v.tgid);
            if v.rq_count > p.map(|p| p.rq_count).unwrap_or(0) {
                vms.entry(v.tgid).or_default().entry(*tid).or_default();
            }
        }
        vms
    }

    fn vcpu_row(&self, tid: u32, mut exits: Vec<ExitRow>) -> VcpuRow {
        exits.sort_by(|a, b| b.sum_ns.cmp(&a.sum_ns).then(b.count.cmp(&a.count)));
        let seen = self.cur.vcpus.get(&tid);
        let v = seen.copied().unwrap_or_default();
        // A tid reused by another process starts from zero.
        let pv = self
            .prev
            .and_then(|p| p.vcpus.get(&tid))
            .filter(|p| p.tgid == v.tgid)
            .copied()
            .unwrap_or_default();
        VcpuRow {
            tid,
            vcpu_id: if seen.is_some() { v.vcpu_id } else { -1 },
            comm: comm_or(tid, seen.map(|v| &v.comm)),
            rq_delay_ns: v.rq_sum_ns.saturating_sub(pv.rq_sum_ns),
            rq_waits: v.rq_count.saturating_sub(pv.rq_count),
            exits,
        }
    }

    fn vm_rows(&self, f: &Filter) -> Vec<VmRow> {
        let mut rows: Vec<VmRow> = self
            .exits_by_thread(f)
            .into_iter()
            .map(|(pid, tids)| {
                let vcpus: Vec<VcpuRow> = tids
                    .into_iter()
                    .map(|(tid, exits)| self.vcpu_row(tid, exits))
                    .collect();
                let seen = self.cur.vcpus.values().find(|v| v.tgid == pid);
                let all_exits = || vcpus.iter().flat_map(|v| v.exits.iter());
                VmRow {
                    pid,
                    comm: comm_or(pid, seen.map(|v| &v.comm)),
                    exits: vcpus.iter().map(VcpuRow::exit_count).sum(),
                    exit_ns: all_exits().map(|e| e.sum_ns).sum(),
                    busy_exit_ns: vcpus.iter().map(VcpuRow::busy_exit_ns).sum(),
                    rq_delay_ns: vcpus.iter().map(|v| v.rq_delay_ns).sum(),
                    vcpus,
                }
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse((host_cost_ns(r), r.exits)));
        rows
    }

    /// The interval's culprit rows of every victim cgroup, unsorted.
    fn preemptions(&self, resolver: &mut Resolver) -> HashMap<u64, Vec<PreemptRow>> {
        let root = resolver.root_id();
        let mut by_victim: HashMap<u64, Vec<PreemptRow>> = HashMap::new();
        for ((victim, culprit), v) in &self.cur.pairs {
            let p = self
                .prev
                .and_then(|p| p.pairs.get(&(*victim, *culprit)))
                .copied()
                .unwrap_or_default();
            let waits = v.wait_count.saturating_sub(p.wait_count);
            let preemptions = v.preemptions.saturating_sub(p.preemptions);
            if waits == 0 && preemptions == 0 {
                continue;
            }
            by_victim.entry(*victim).or_default().push(PreemptRow {
                cgroup_id: *culprit,
                path: if *culprit == CULPRIT_UNKNOWN {
                    None
                } else {
                    resolver.path(*culprit)
                },
                class: culprit_class(*victim, *culprit, root),
                wait_ns: v.wait_ns.saturating_sub(p.wait_ns),
                waits,
                preemptions,
            });
        }
        by_victim
    }

    fn cgroup_rows(&self, resolver: &mut Resolver, opts: &ReportOptions) -> Vec<CgroupRow> {
        let mut by_victim = self.preemptions(resolver);
        let mut rows = Vec::new();
        for (id, v) in &self.cur.cgroups {
            if !opts.filter.keeps_cgroup(*id) {
                continue;
            }
            let d = delta_cg(v, self.prev.and_then(|p| p.cgroups.get(id)));
            if d.cpu_ns == 0 && d.rq_count == 0 {
                continue;
            }
            let path = resolver.path(*id);
            let mut preempted_by = by_victim.remove(id).unwrap_or_default();
            preempted_by.sort_by_key(|p| std::cmp::Reverse(p.wait_ns));
            let bound = clip(d.rq_interval_max_ns, d.rq_max_ns);
            let rq_p99_ns = hist_quantile(&d.hist, 0.99, bound);
            rows.push(CgroupRow {
                id: *id,
                container: path.as_deref().and_then(cgroup::container_name),
                cpu_files: path
                    .as_deref()
                    .map(|p| cgroup::cpu_files(&resolver.mounts, p))
                    .unwrap_or_default(),
                path,
                cpu_ns: d.cpu_ns,
                rq_waits: d.rq_count,
                rq_sum_ns: d.rq_sum_ns,
                rq_p50_ns: hist_quantile(&d.hist, 0.5, bound),
                rq_p99_ns,
                rq_max_ns: d.rq_max_ns,
                rq_interval_max_ns: d.rq_interval_max_ns,
                preempted_by,
                noisy: rq_p99_ns > opts.noisy_p99_ns && d.rq_count >= opts.noisy_min_waits,
            });
        }
        rows.sort_by_key(|c| std::cmp::Reverse((c.rq_sum_ns, c.cpu_ns)));
        rows
    }
}

/// The noisy-neighbour victims among `rows`, each with the other cgroups
/// (or the host) that held the CPU longest while it waited.
fn noisy_rows(rows: &[CgroupRow], threshold_ns: u64) -> Vec<NoisyRow> {
    rows.iter()
        .filter(|c| c.noisy)
        .map(|c| NoisyRow {
            cgroup_id: c.id,
            path: c.path.clone(),
            container: c.container.clone(),
            rq_p99_ns: c.rq_p99_ns,
            threshold_ns,
            top_preempters: c
                .preempted_by
                .iter()
                .filter(|p| matches!(p.class, CulpritClass::Other | CulpritClass::Host))
                .take(3)
                .cloned()
                .collect(),
        })
        .collect()
}

/// Build one interval's report. `prev` is None for a report of everything
/// since the observer started (what Prometheus exports).
pub fn build(
    cur: &RawSnapshot,
    prev: Option<&RawSnapshot>,
    resolver: &mut Resolver,
    programs: Programs,
    opts: &ReportOptions,
) -> Report {
    let f = &opts.filter;
    let interval_ns = prev
        .map(|p| cur.mono_ns.saturating_sub(p.mono_ns))
        .unwrap_or(0);
    let ts_unix_ms = livehost_common::unix_ms();
    let iv = Interval { cur, prev };
    let vms = if f.containers_only {
        Vec::new()
    } else {
        iv.vm_rows(f)
    };
    let cgroups = if f.vm_only {
        Vec::new()
    } else {
        iv.cgroup_rows(resolver, opts)
    };
    Report {
        schema: SCHEMA_VERSION,
        ts_unix_ms,
        interval_s: interval_ns as f64 / 1e9,
        vms,
        noisy: noisy_rows(&cgroups, opts.noisy_p99_ns),
        cgroups,
        drops: cur
            .drops
            .iter()
            .map(|(d, n)| (d.name().to_string(), *n))
            .collect(),
        programs,
        map_memory_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let mut h = Hist::default();
        assert_eq!(hist_quantile(&h, 0.99, 0), 0);
        h[10] = 99; // [1024, 2048)
        h[20] = 1; // [1Mi, 2Mi)
        assert_eq!(hist_quantile(&h, 0.5, 1_500_000), 2047);
        assert_eq!(hist_quantile(&h, 0.99, 1_500_000), 2047);
        assert_eq!(hist_quantile(&h, 1.0, 1_500_000), 1_500_000);
    }

    #[test]
    fn culprit_classes_serialise_as_their_names() {
        use CulpritClass::*;
        for c in [Same, Other, Host, Idle, Unknown] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<CulpritClass>(&json).unwrap(), c);
        }
        assert_eq!(culprit_class(5, CULPRIT_IDLE, 1), Idle);
        assert_eq!(culprit_class(5, CULPRIT_UNKNOWN, 1), Unknown);
        assert_eq!(culprit_class(5, 5, 1), Same);
        assert_eq!(culprit_class(5, 1, 1), Host);
        assert_eq!(culprit_class(5, 7, 1), Other);
    }

    /// The README's example line, read through the schema types and written
    /// back: the same JSON, so readers can rely on these types.
    #[test]
    fn a_record_line_reads_back_through_the_schema_types() {
        let line = r#"{"schema":1,"ts_unix_ms":1795337722371,"interval_s":2.000323581,"vms":[{"pid":22360,"comm":"kvm-pio-guest","exits":501,"exit_ns":0,"busy_exit_ns":0,"rq_delay_ns":10901,"vcpus":[{"tid":22360,"vcpu_id":-1,"comm":"kvm-pio-guest","rq_delay_ns":10901,"rq_waits":3,"exits":[{"kind":"user","isa":"kvm","reason":2,"name":"IO","count":500,"timed":0,"sum_ns":0,"max_ns":0,"interval_max_ns":0,"p50_ns":0,"p99_ns":0},{"kind":"pio_out","isa":"port","reason":1296,"name":"0x510","count":500,"timed":0,"sum_ns":0,"max_ns":0,"interval_max_ns":0,"p50_ns":0,"p99_ns":0},{"kind":"hw","isa":"svm","reason":123,"name":"io","count":1,"timed":1,"sum_ns":5,"max_ns":5,"interval_max_ns":5,"p50_ns":5,"p99_ns":5}]}]}],"cgroups":[{"id":1,"path":"/","container":null,"cpu_ns":7,"rq_waits":2,"rq_sum_ns":9,"rq_p50_ns":3,"rq_p99_ns":7,"rq_max_ns":7,"rq_interval_max_ns":7,"preempted_by":[{"cgroup_id":0,"path":null,"class":"idle","wait_ns":4,"waits":1,"preemptions":0},{"cgroup_id":18446744073709551615,"path":null,"class":"unknown","wait_ns":5,"waits":1,"preemptions":0}],"cpu_files":{"nr_periods":3,"nr_throttled":1,"throttled_usec":10,"pressure_some_avg10":0.5,"pressure_some_total_usec":99,"source":"v1"},"noisy":false}],"noisy":[],"drops":{"cgroups":0,"exit_start":0,"exit_stats":0,"pairs":0,"vcpus":0,"wakeups":0},"programs":{"attached":["handle_kvm_exit"],"skipped":[{"program":"handle_kvm_pio","tracepoint":"kvm_pio","reason":"not requested (filter)"}]},"map_memory_bytes":21495808}"#;
        let r: Report = serde_json::from_str(line).unwrap();
        assert_eq!(r.vms[0].vcpus[0].exits[1].kind, ExitKind::PioOut);
        assert_eq!(r.cgroups[0].cpu_files.source, Some(CpuSource::V1));
        assert_eq!(serde_json::to_string(&r).unwrap(), line);
    }

    fn hw(tgid: u32, reason: u32) -> ExitKey {
        ExitKey {
            tgid,
            tid: tgid,
            kind: crate::intf::ExitKind::Hw,
            isa: crate::intf::KvmIsa::Svm,
            reason,
        }
    }

    fn timed(count: u64, sum_ns: u64) -> ExitVal {
        ExitVal {
            count,
            timed: count,
            sum_ns,
            max_ns: sum_ns,
            ..Default::default()
        }
    }

    fn vm_report(cur: &RawSnapshot) -> Report {
        let opts = ReportOptions {
            filter: Filter {
                vm_only: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let programs = Programs {
            attached: vec![],
            skipped: vec![],
        };
        build(cur, None, &mut Resolver::new(), programs, &opts)
    }

    /// On real hardware each I/O exit shows twice (hardware, then to user
    /// space): the EXITS total counts it once.
    #[test]
    fn an_io_exit_seen_in_hardware_and_user_space_counts_once() {
        let mut cur = RawSnapshot::default();
        cur.exits.insert(hw(10, 0x7b), timed(5, 5_000));
        let user = ExitKey {
            kind: crate::intf::ExitKind::User,
            isa: crate::intf::KvmIsa::Unknown,
            reason: 2,
            ..hw(10, 0)
        };
        cur.exits.insert(user, timed(5, 0));
        let pio = ExitKey {
            kind: crate::intf::ExitKind::PioOut,
            reason: 0x510,
            ..user
        };
        cur.exits.insert(pio, timed(5, 0));
        // Where no hardware exit is observed (emulated exits), user ones count.
        cur.exits.insert(
            ExitKey {
                tgid: 11,
                tid: 11,
                ..user
            },
            timed(7, 0),
        );
        // Failed KVM_RUN calls (signals) are not exits.
        let restart = ExitKey {
            tgid: 11,
            tid: 11,
            reason: crate::reasons::USER_EXIT_RESTART,
            ..user
        };
        cur.exits.insert(restart, timed(3, 0));
        let r = vm_report(&cur);
        let exits = |pid| r.vms.iter().find(|v| v.pid == pid).unwrap().exits;
        assert_eq!(exits(10), 5);
        assert_eq!(exits(11), 7);
        assert_eq!(text::vcpu_cells(&r.vms[0], &r.vms[0].vcpus[0])[4], "5");
    }

    /// An idle VM (long HLT exits) does not outrank a busy one, and run-queue
    /// delay is not added on top of exit time (it overlaps it).
    #[test]
    fn vms_rank_by_busy_exit_time_or_run_queue_delay_never_their_sum() {
        let mut cur = RawSnapshot::default();
        cur.exits.insert(hw(1, 0x078), timed(1, 9_000_000_000)); // idle: HLT
        cur.exits.insert(hw(1, 0x7b), timed(2, 1_000));
        cur.exits.insert(hw(2, 0x7b), timed(100, 50_000_000));
        cur.exits.insert(hw(3, 0x7b), timed(100, 40_000_000));
        for (tid, rq) in [(2u32, 30_000_000u64), (3, 45_000_000)] {
            cur.vcpus.insert(
                tid,
                crate::snapshot::VcpuVal {
                    tgid: tid,
                    rq_count: 1,
                    rq_sum_ns: rq,
                    ..Default::default()
                },
            );
        }
        let r = vm_report(&cur);
        let order: Vec<u32> = r.vms.iter().map(|v| v.pid).collect();
        // 2: max(50, 30) = 50 ms; 3: max(40, 45) = 45 ms (their sums would
        // rank 3 first: 85 > 80); 1: 1 us busy, whatever its HLT time.
        assert_eq!(order, [2, 3, 1]);
        assert_eq!(r.vms[2].busy_exit_ns, 1_000);
        assert_eq!(r.vms[2].exit_ns, 9_000_001_000);
    }

    /// The JSON names of the drop counters come from intf.h's enum.
    #[test]
    fn drop_counter_names_are_the_documented_keys() {
        let names: Vec<_> = crate::intf::DropCounter::ALL
            .iter()
            .map(|d| d.name())
            .collect();
        assert_eq!(
            names,
            [
                "exit_stats",
                "exit_start",
                "vcpus",
                "cgroups",
                "pairs",
                "wakeups"
            ]
        );
    }
}
