//! From raw map snapshots to what users see: per-VM/vCPU and per-cgroup
//! rows for one interval, with names, percentiles and the noisy-neighbour
//! verdict. The serde field names here are the stable JSON schema
//! documented in the README.

use crate::cgroup::{self, CpuFiles, Resolver};
use crate::observer::{CgVal, ExitKey, ExitVal, RawSnapshot, Skipped};
use crate::reasons;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Bumped when a field is renamed or removed (never for additions).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub pid: Option<u32>,
    /// Cgroup ids to keep (the one asked for and, for --pid, the pid's).
    pub cgroups: Option<Vec<u64>>,
    pub vm_only: bool,
    pub containers_only: bool,
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

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub ts_unix_ms: u64,
    pub interval_s: f64,
    pub vms: Vec<VmRow>,
    pub cgroups: Vec<CgroupRow>,
    pub noisy: Vec<NoisyRow>,
    pub drops: BTreeMap<String, u64>,
    pub programs: Programs,
}

#[derive(Debug, Clone, Serialize)]
pub struct Programs {
    pub attached: Vec<String>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmRow {
    pub pid: u32,
    pub comm: String,
    pub exits: u64,
    pub exit_ns: u64,
    pub rq_delay_ns: u64,
    pub vcpus: Vec<VcpuRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VcpuRow {
    pub tid: u32,
    /// KVM's vcpu_id; -1 until a hardware exit revealed it.
    pub vcpu_id: i32,
    pub comm: String,
    pub rq_delay_ns: u64,
    pub rq_waits: u64,
    pub exits: Vec<ExitRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExitRow {
    /// "hw" (kvm_exit->kvm_entry), "user" (kvm_userspace_exit), "pio_in", "pio_out".
    pub kind: &'static str,
    /// "vmx", "svm" for hw exits; "kvm" for user exits; "port" for pio.
    pub isa: &'static str,
    pub reason: u32,
    pub name: String,
    pub count: u64,
    /// Exits whose re-entry was seen; sum/max/percentiles cover only these
    /// (the last exit of a vCPU that stops is never re-entered).
    pub timed: u64,
    pub sum_ns: u64,
    /// Since the observer started, not per interval.
    pub max_ns: u64,
    /// Largest of this interval (equal to `max_ns` in a since-start report).
    pub interval_max_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CgroupRow {
    pub id: u64,
    pub path: Option<String>,
    pub container: Option<String>,
    pub cpu_ns: u64,
    pub rq_waits: u64,
    pub rq_sum_ns: u64,
    pub rq_p50_ns: u64,
    pub rq_p99_ns: u64,
    /// Since the observer started.
    pub rq_max_ns: u64,
    /// Longest wait of this interval (equal to `rq_max_ns` in a since-start
    /// report).
    pub rq_interval_max_ns: u64,
    pub preempted_by: Vec<PreemptRow>,
    pub cpu_files: CpuFiles,
    pub noisy: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreemptRow {
    /// Cgroup that held the CPU while the victim waited (0: the CPU was
    /// idle; 18446744073709551615: not attributable, see `class`).
    pub cgroup_id: u64,
    pub path: Option<String>,
    /// "same", "other", "host" (root cgroup), "idle" or "unknown" (the wait
    /// began on another CPU or outlived the per-CPU history of 16 stretches).
    pub class: &'static str,
    pub wait_ns: u64,
    pub waits: u64,
    pub preemptions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NoisyRow {
    pub cgroup_id: u64,
    pub path: Option<String>,
    pub container: Option<String>,
    pub rq_p99_ns: u64,
    pub threshold_ns: u64,
    pub top_preempters: Vec<PreemptRow>,
}

/// How a culprit relates to the cgroup that waited (see `PreemptRow::class`).
pub fn culprit_class(victim: u64, culprit: u64, root: u64) -> &'static str {
    if culprit == 0 {
        "idle"
    } else if culprit == u64::MAX {
        "unknown"
    } else if culprit == victim {
        "same"
    } else if culprit == root {
        "host"
    } else {
        "other"
    }
}

/// Upper bound of the log2 bucket holding the q-quantile, clipped to max.
pub fn hist_quantile(hist: &[u64; 32], q: f64, max: u64) -> u64 {
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

fn sub_hist(a: &[u64; 32], b: &[u64; 32]) -> [u64; 32] {
    let mut out = [0; 32];
    for i in 0..32 {
        out[i] = a[i].saturating_sub(b[i]);
    }
    out
}

/// The interval's bound for percentiles: its own max when the kernel saw
/// one, else the since-start max (still an upper bound).
fn clip(interval_max: u64, max: u64) -> u64 {
    if interval_max > 0 { interval_max } else { max }
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

pub fn comm(pid: u32) -> String {
    livehost_common::sysfs::read_attr(format!("/proc/{pid}/comm")).unwrap_or_else(|_| "?".into())
}

/// A thread's name: /proc while it lives, else what BPF saw at first sight.
pub fn comm_or(pid: u32, seen: Option<&[u8; 16]>) -> String {
    let live = comm(pid);
    if live != "?" {
        return live;
    }
    match seen {
        Some(c) => {
            let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
            let s = String::from_utf8_lossy(&c[..end]).into_owned();
            if s.is_empty() { live } else { s }
        }
        None => live,
    }
}

/// Default-hierarchy cgroup path of a process ("0::/path" line).
pub fn pid_cgroup_path(pid: u32) -> Option<String> {
    let text = livehost_common::sysfs::read_text(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

fn exit_row(k: &ExitKey, v: &ExitVal) -> ExitRow {
    let (kind, isa, name) = match k.kind {
        0 => (
            "hw",
            reasons::isa_name(k.isa),
            reasons::hw_exit_name(k.isa, k.reason),
        ),
        1 => (
            "user",
            "kvm",
            reasons::kvm_exit_name(k.reason)
                .map(str::to_string)
                .unwrap_or_else(|| k.reason.to_string()),
        ),
        2 => ("pio_in", "port", format!("{:#x}", k.reason)),
        _ => ("pio_out", "port", format!("{:#x}", k.reason)),
    };
    ExitRow {
        kind,
        isa,
        reason: k.reason,
        name,
        count: v.count,
        timed: v.timed,
        sum_ns: v.sum_ns,
        max_ns: v.max_ns,
        interval_max_ns: v.interval_max_ns,
        p50_ns: hist_quantile(&v.hist, 0.5, clip(v.interval_max_ns, v.max_ns)),
        p99_ns: hist_quantile(&v.hist, 0.99, clip(v.interval_max_ns, v.max_ns)),
    }
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

    // VMs: group exit rows by tgid then tid.
    let mut vms: BTreeMap<u32, BTreeMap<u32, Vec<ExitRow>>> = BTreeMap::new();
    if !f.containers_only {
        for (k, v) in &cur.exits {
            if f.pid.is_some_and(|p| p != k.tgid) {
                continue;
            }
            let d = delta_exit(v, prev.and_then(|p| p.exits.get(k)));
            if d.count == 0 {
                continue;
            }
            vms.entry(k.tgid)
                .or_default()
                .entry(k.tid)
                .or_default()
                .push(exit_row(k, &d));
        }
        // vCPU threads that only waited this interval still deserve a row.
        for (tid, v) in &cur.vcpus {
            if f.pid.is_some_and(|p| p != v.tgid) {
                continue;
            }
            let p = prev.and_then(|p| p.vcpus.get(tid));
            if v.rq_count > p.map(|p| p.rq_count).unwrap_or(0) {
                vms.entry(v.tgid).or_default().entry(*tid).or_default();
            }
        }
    }
    let mut vm_rows: Vec<VmRow> = vms
        .into_iter()
        .map(|(pid, tids)| {
            let vcpus: Vec<VcpuRow> = tids
                .into_iter()
                .map(|(tid, mut exits)| {
                    exits.sort_by(|a, b| b.sum_ns.cmp(&a.sum_ns).then(b.count.cmp(&a.count)));
                    let v = cur.vcpus.get(&tid).copied().unwrap_or_default();
                    let pv = prev
                        .and_then(|p| p.vcpus.get(&tid))
                        .copied()
                        .unwrap_or_default();
                    VcpuRow {
                        tid,
                        vcpu_id: if cur.vcpus.contains_key(&tid) {
                            v.vcpu_id
                        } else {
                            -1
                        },
                        comm: comm_or(tid, cur.vcpus.get(&tid).map(|v| &v.comm)),
                        rq_delay_ns: v.rq_sum_ns.saturating_sub(pv.rq_sum_ns),
                        rq_waits: v.rq_count.saturating_sub(pv.rq_count),
                        exits,
                    }
                })
                .collect();
            let seen = cur.vcpus.values().find(|v| v.tgid == pid).map(|v| &v.comm);
            VmRow {
                pid,
                comm: comm_or(pid, seen),
                exits: vcpus
                    .iter()
                    .flat_map(|v| {
                        v.exits
                            .iter()
                            .filter(|e| e.kind == "hw" || e.kind == "user")
                    })
                    .map(|e| e.count)
                    .sum(),
                exit_ns: vcpus
                    .iter()
                    .flat_map(|v| v.exits.iter())
                    .map(|e| e.sum_ns)
                    .sum(),
                rq_delay_ns: vcpus.iter().map(|v| v.rq_delay_ns).sum(),
                vcpus,
            }
        })
        .collect();
    vm_rows.sort_by(|a, b| {
        (b.exit_ns + b.rq_delay_ns, b.exits).cmp(&(a.exit_ns + a.rq_delay_ns, a.exits))
    });

    // Cgroups.
    let root = resolver.root_id();
    let mut by_victim: HashMap<u64, Vec<PreemptRow>> = HashMap::new();
    let mut cg_rows = Vec::new();
    if !f.vm_only {
        for ((victim, culprit), v) in &cur.pairs {
            let p = prev
                .and_then(|p| p.pairs.get(&(*victim, *culprit)))
                .copied()
                .unwrap_or_default();
            let wait_ns = v.wait_ns.saturating_sub(p.wait_ns);
            let waits = v.wait_count.saturating_sub(p.wait_count);
            let preemptions = v.preemptions.saturating_sub(p.preemptions);
            if waits == 0 && preemptions == 0 {
                continue;
            }
            let class = culprit_class(*victim, *culprit, root);
            by_victim.entry(*victim).or_default().push(PreemptRow {
                cgroup_id: *culprit,
                path: if *culprit == u64::MAX {
                    None
                } else {
                    resolver.path(*culprit)
                },
                class,
                wait_ns,
                waits,
                preemptions,
            });
        }
        for (id, v) in &cur.cgroups {
            if let Some(keep) = &f.cgroups
                && !keep.contains(id)
            {
                continue;
            }
            let d = delta_cg(v, prev.and_then(|p| p.cgroups.get(id)));
            if d.cpu_ns == 0 && d.rq_count == 0 {
                continue;
            }
            let path = resolver.path(*id);
            let mut preempted_by = by_victim.remove(id).unwrap_or_default();
            preempted_by.sort_by_key(|p| std::cmp::Reverse(p.wait_ns));
            let bound = clip(d.rq_interval_max_ns, d.rq_max_ns);
            let rq_p99_ns = hist_quantile(&d.hist, 0.99, bound);
            let noisy = rq_p99_ns > opts.noisy_p99_ns && d.rq_count >= opts.noisy_min_waits;
            cg_rows.push(CgroupRow {
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
                noisy,
            });
        }
    }
    cg_rows.sort_by_key(|c| std::cmp::Reverse((c.rq_sum_ns, c.cpu_ns)));
    let noisy = cg_rows
        .iter()
        .filter(|c| c.noisy)
        .map(|c| NoisyRow {
            cgroup_id: c.id,
            path: c.path.clone(),
            container: c.container.clone(),
            rq_p99_ns: c.rq_p99_ns,
            threshold_ns: opts.noisy_p99_ns,
            top_preempters: c
                .preempted_by
                .iter()
                .filter(|p| p.class == "other" || p.class == "host")
                .take(3)
                .cloned()
                .collect(),
        })
        .collect();
    Report {
        schema: SCHEMA_VERSION,
        ts_unix_ms,
        interval_s: interval_ns as f64 / 1e9,
        vms: vm_rows,
        cgroups: cg_rows,
        noisy,
        drops: cur.drops.iter().cloned().collect(),
        programs,
    }
}

pub fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

pub fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

/// The VM table's cells for one vCPU, shared by the text and terminal
/// views: pid, tid, vcpu id, comm, exits (hw + user), exit ms, run-queue
/// delay ms, the top three exit reasons (count, average us when timed).
pub fn vcpu_cells(vm: &VmRow, v: &VcpuRow) -> [String; 8] {
    let top: Vec<String> = v
        .exits
        .iter()
        .take(3)
        .map(|e| match e.sum_ns.checked_div(e.timed) {
            Some(avg) => format!("{}/{} {} {}", e.kind, e.name, e.count, us(avg)),
            None => format!("{}/{} {}", e.kind, e.name, e.count),
        })
        .collect();
    let exits: u64 = v
        .exits
        .iter()
        .filter(|e| e.kind == "hw" || e.kind == "user")
        .map(|e| e.count)
        .sum();
    [
        vm.pid.to_string(),
        v.tid.to_string(),
        v.vcpu_id.to_string(),
        v.comm.clone(),
        exits.to_string(),
        ms(v.exits.iter().map(|e| e.sum_ns).sum()),
        ms(v.rq_delay_ns),
        top.join(", "),
    ]
}

/// The cgroup table's cells, shared by the text and terminal views: path,
/// container, CPU ms, waits, wait ms, p50 us, p99 us, throttled periods,
/// top three culprits with the ms they held the CPU.
pub fn cgroup_cells(c: &CgroupRow) -> [String; 10] {
    let by: Vec<String> = c
        .preempted_by
        .iter()
        .take(3)
        .map(|p| {
            let who = match p.class {
                "same" | "idle" | "unknown" => p.class.to_string(),
                _ => p.path.clone().unwrap_or_else(|| p.cgroup_id.to_string()),
            };
            format!("{} {}", who, ms(p.wait_ns))
        })
        .collect();
    [
        c.path.clone().unwrap_or_else(|| format!("#{}", c.id)),
        c.container.clone().unwrap_or_else(|| "-".into()),
        ms(c.cpu_ns),
        c.rq_waits.to_string(),
        ms(c.rq_sum_ns),
        us(c.rq_p50_ns),
        us(c.rq_p99_ns),
        us(c.rq_interval_max_ns),
        c.cpu_files
            .nr_throttled
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        by.join(", "),
    ]
}

/// Plain-text tables (the non-terminal `top` view and `record` without --json).
pub fn render_text(r: &Report, max_rows: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "interval {:.2}s  drops {}",
        r.interval_s,
        r.drops.values().sum::<u64>()
    );
    if !r.programs.skipped.is_empty() {
        for sk in &r.programs.skipped {
            let _ = writeln!(s, "note: {} skipped: {}", sk.tracepoint, sk.reason);
        }
    }
    let _ = writeln!(s, "\nVMs (by exit time + vCPU run-queue delay)");
    let _ = writeln!(
        s,
        "{:>8} {:>8} {:>5} {:<16} {:>9} {:>10} {:>10}  top exits (count, avg us)",
        "PID", "TID", "VCPU", "COMM", "EXITS", "EXIT_ms", "RQDELAY_ms"
    );
    for vm in r.vms.iter().take(max_rows) {
        for v in &vm.vcpus {
            let c = vcpu_cells(vm, v);
            let _ = writeln!(
                s,
                "{:>8} {:>8} {:>5} {:<16} {:>9} {:>10} {:>10}  {}",
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
            );
        }
    }
    let _ = writeln!(s, "\nCgroups (by run-queue wait)");
    let _ = writeln!(
        s,
        "{:<40} {:<20} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}  preempted by (wait ms)",
        "CGROUP", "CONTAINER", "CPU_ms", "WAITS", "RQ_ms", "p50_us", "p99_us", "max_us", "THROTL"
    );
    for c in r.cgroups.iter().take(max_rows) {
        let cells = cgroup_cells(c);
        let _ = writeln!(
            s,
            "{:<40} {:<20} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}  {}{}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            if c.noisy { "  NOISY" } else { "" }
        );
    }
    for n in &r.noisy {
        let who: Vec<String> = n
            .top_preempters
            .iter()
            .map(|p| p.path.clone().unwrap_or_else(|| p.cgroup_id.to_string()))
            .collect();
        let _ = writeln!(
            s,
            "NOISY NEIGHBOUR: {} p99 run-queue wait {} us > {} us; preempted most by: {}",
            n.path.clone().unwrap_or_else(|| n.cgroup_id.to_string()),
            us(n.rq_p99_ns),
            us(n.threshold_ns),
            if who.is_empty() {
                "-".to_string()
            } else {
                who.join(", ")
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let mut h = [0u64; 32];
        assert_eq!(hist_quantile(&h, 0.99, 0), 0);
        h[10] = 99; // [1024, 2048)
        h[20] = 1; // [1Mi, 2Mi)
        assert_eq!(hist_quantile(&h, 0.5, 1_500_000), 2047);
        assert_eq!(hist_quantile(&h, 0.99, 1_500_000), 2047);
        assert_eq!(hist_quantile(&h, 1.0, 1_500_000), 1_500_000);
    }
}
