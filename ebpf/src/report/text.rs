//! Reports as plain-text tables (`record` without --json, `top` off a
//! terminal), and the table cells the terminal view shares.

use super::schema::{CgroupRow, CulpritClass, NoisyRow, Report, VcpuRow, VmRow};
use std::fmt::Write;

pub fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

pub fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e3)
}

/// The VM table's cells for one vCPU, shared by the text and terminal
/// views: pid, tid, vcpu id, comm, exits (hw, or user where no hw exit is
/// seen), exit ms, run-queue
/// delay ms, the top three exit reasons (count, average us when timed).
pub fn vcpu_cells(vm: &VmRow, v: &VcpuRow) -> [String; 8] {
    let top: Vec<String> = v
        .exits
        .iter()
        .take(3)
        .map(|e| match e.sum_ns.checked_div(e.timed) {
            Some(avg) => format!("{}/{} {} {}", e.kind.name(), e.name, e.count, us(avg)),
            None => format!("{}/{} {}", e.kind.name(), e.name, e.count),
        })
        .collect();
    let exits = v.exit_count();
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
                CulpritClass::Same | CulpritClass::Idle | CulpritClass::Unknown => {
                    p.class.as_str().to_string()
                }
                CulpritClass::Other | CulpritClass::Host => {
                    p.path.clone().unwrap_or_else(|| p.cgroup_id.to_string())
                }
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

/// Who preempted a noisy cgroup most (paths, else ids), or "-".
pub fn noisy_culprits(n: &NoisyRow) -> String {
    let who: Vec<String> = n
        .top_preempters
        .iter()
        .map(|p| p.path.clone().unwrap_or_else(|| p.cgroup_id.to_string()))
        .collect();
    if who.is_empty() {
        "-".to_string()
    } else {
        who.join(", ")
    }
}

/// Plain-text tables (the non-terminal `top` view and `record` without --json).
pub fn render_text(r: &Report, max_rows: usize) -> String {
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
    let _ = writeln!(
        s,
        "\nVMs (by host cost: busy exit time or vCPU run-queue delay, the larger)"
    );
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
        let _ = writeln!(
            s,
            "NOISY NEIGHBOUR: {} p99 run-queue wait {} us > {} us; preempted most by: {}",
            n.path.clone().unwrap_or_else(|| n.cgroup_id.to_string()),
            us(n.rq_p99_ns),
            us(n.threshold_ns),
            noisy_culprits(n)
        );
    }
    s
}
