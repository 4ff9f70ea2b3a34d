//! Prometheus text exposition (format 0.0.4) of the cumulative counters,
//! and a minimal HTTP/1.1 server for `/metrics` on std::net.

use crate::cgroup::{self, CpuFiles, Resolver};
use crate::comm::comm_or;
use crate::intf::{CULPRIT_IDLE, ExitKind};
use crate::reasons;
use crate::report::{self, Filter};
use crate::snapshot::{Hist, RawSnapshot, VcpuVal};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, String)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Cumulative log2 histogram as Prometheus buckets (le in seconds). All
/// `HIST_SLOTS` buckets are always written, so every series keeps the same bucket set
/// over time (histogram_quantile needs that).
fn histogram(out: &mut String, name: &str, base: &[(&str, String)], hist: &Hist, sum_ns: u64) {
    let mut cum = 0;
    for (i, c) in hist.iter().enumerate() {
        cum += c;
        // The last slot also holds everything longer; +Inf covers it.
        if i + 1 == hist.len() {
            break;
        }
        let le = ((1u64 << (i + 1)) as f64) / 1e9;
        let mut l = base.to_vec();
        l.push(("le", format!("{le:e}")));
        let _ = writeln!(out, "{name}_bucket{} {cum}", labels(&l));
    }
    let mut l = base.to_vec();
    l.push(("le", "+Inf".into()));
    let _ = writeln!(out, "{name}_bucket{} {cum}", labels(&l));
    let _ = writeln!(out, "{name}_sum{} {}", labels(base), sum_ns as f64 / 1e9);
    let _ = writeln!(out, "{name}_count{} {cum}", labels(base));
}

/// `# HELP` and `# TYPE` of one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The cumulative counters of `snap`, in the text exposition format.
pub fn render(
    snap: &RawSnapshot,
    resolver: &mut Resolver,
    filter: &Filter,
    attached: &[String],
) -> String {
    let mut o = String::new();
    if !filter.containers_only {
        exit_metrics(&mut o, snap, filter);
        vcpu_metrics(&mut o, snap, filter);
    }
    if !filter.vm_only {
        let named = cgroup_labels(snap, resolver, filter);
        cgroup_sched_metrics(&mut o, snap, &named);
        preemption_metrics(&mut o, snap, resolver, filter, &named);
        cgroup_file_metrics(&mut o, resolver, &named);
    }
    family(
        &mut o,
        "overhead_drops_total",
        "counter",
        "Map updates lost because a BPF map was full (numbers are incomplete when non-zero).",
    );
    for (d, n) in &snap.drops {
        let _ = writeln!(
            o,
            "overhead_drops_total{} {n}",
            labels(&[("map", d.name().to_string())])
        );
    }
    family(
        &mut o,
        "overhead_program_attached",
        "gauge",
        "BPF programs attached by this observer.",
    );
    for p in attached {
        let _ = writeln!(
            o,
            "overhead_program_attached{} 1",
            labels(&[("program", p.clone())])
        );
    }
    o
}

/// `vm`, `vcpu` and `tid` labels of a vCPU thread.
fn thread_labels(tgid: u32, tid: u32, seen: Option<&VcpuVal>) -> Vec<(&'static str, String)> {
    vec![
        (
            "vm",
            format!("{tgid}/{}", comm_or(tgid, seen.map(|v| &v.comm))),
        ),
        ("vcpu", seen.map_or(-1, |v| v.vcpu_id).to_string()),
        ("tid", tid.to_string()),
    ]
}

fn exit_metrics(o: &mut String, snap: &RawSnapshot, filter: &Filter) {
    family(
        o,
        "overhead_kvm_exits_total",
        "counter",
        "KVM exits per vCPU thread and reason (kind: hw = kvm_exit, user = return to the VMM, pio_in/pio_out = port accesses).",
    );
    let mut hw = Vec::new();
    let mut keys: Vec<_> = snap.exits.keys().collect();
    keys.sort();
    for k in keys {
        if !filter.keeps_pid(k.tgid) {
            continue;
        }
        let v = &snap.exits[k];
        let mut l = thread_labels(k.tgid, k.tid, snap.vcpus.get(&k.tid));
        let is_hw = k.kind == ExitKind::Hw;
        let isa = if is_hw { k.isa.name() } else { "" };
        l.push(("kind", k.kind.name().to_string()));
        l.push(("isa", isa.to_string()));
        l.push(("reason", reasons::exit_name(k.kind, k.isa, k.reason)));
        let _ = writeln!(o, "overhead_kvm_exits_total{} {}", labels(&l), v.count);
        if is_hw {
            l.retain(|(k, _)| *k != "kind");
            hw.push((l, v));
        }
    }
    family(
        o,
        "overhead_kvm_exit_duration_seconds",
        "histogram",
        "Time from kvm_exit to the next kvm_entry on the same thread.",
    );
    for (l, v) in hw {
        histogram(
            o,
            "overhead_kvm_exit_duration_seconds",
            &l,
            &v.hist,
            v.sum_ns,
        );
    }
}

fn vcpu_metrics(o: &mut String, snap: &RawSnapshot, filter: &Filter) {
    family(
        o,
        "overhead_vcpu_runqueue_delay_seconds_total",
        "counter",
        "Time vCPU threads waited for a CPU (the guest's steal time).",
    );
    let mut tids: Vec<_> = snap.vcpus.iter().collect();
    tids.sort_by_key(|(t, _)| **t);
    for (tid, v) in tids {
        if !filter.keeps_pid(v.tgid) {
            continue;
        }
        let _ = writeln!(
            o,
            "overhead_vcpu_runqueue_delay_seconds_total{} {}",
            labels(&thread_labels(v.tgid, *tid, Some(v))),
            v.rq_sum_ns as f64 / 1e9
        );
    }
}

/// The kept cgroups by id, with their `cgroup` (path) and `container` labels.
type CgroupLabels = Vec<(u64, Vec<(&'static str, String)>)>;

/// A cgroup's `cgroup` label: its path, "other" for the sum of the cgroups
/// without series of their own (`--top`), `#id` once it is gone.
fn cgroup_name(resolver: &mut Resolver, id: u64) -> String {
    if id == crate::prom_top::OTHER {
        return "other".into();
    }
    resolver.path(id).unwrap_or_else(|| format!("#{id}"))
}

fn cgroup_labels(snap: &RawSnapshot, resolver: &mut Resolver, filter: &Filter) -> CgroupLabels {
    let mut ids: Vec<u64> = snap.cgroups.keys().copied().collect();
    ids.sort();
    ids.retain(|i| filter.keeps_cgroup(*i));
    ids.iter()
        .map(|id| {
            let path = cgroup_name(resolver, *id);
            let container = cgroup::container_name(&path).unwrap_or_default();
            (*id, vec![("cgroup", path), ("container", container)])
        })
        .collect()
}

fn cgroup_sched_metrics(o: &mut String, snap: &RawSnapshot, named: &CgroupLabels) {
    family(
        o,
        "overhead_cgroup_cpu_seconds_total",
        "counter",
        "CPU time of the cgroup's tasks, from sched_switch.",
    );
    for (id, l) in named {
        let _ = writeln!(
            o,
            "overhead_cgroup_cpu_seconds_total{} {}",
            labels(l),
            snap.cgroups[id].cpu_ns as f64 / 1e9
        );
    }
    family(
        o,
        "overhead_cgroup_runqueue_latency_seconds",
        "histogram",
        "Wakeup/preemption to running, per cgroup.",
    );
    for (id, l) in named {
        let v = &snap.cgroups[id];
        histogram(
            o,
            "overhead_cgroup_runqueue_latency_seconds",
            l,
            &v.hist,
            v.rq_sum_ns,
        );
    }
}

fn preemption_metrics(
    o: &mut String,
    snap: &RawSnapshot,
    resolver: &mut Resolver,
    filter: &Filter,
    named: &CgroupLabels,
) {
    let root = resolver.root_id();
    family(
        o,
        "overhead_cgroup_preempted_wait_seconds_total",
        "counter",
        "Run-queue wait of a cgroup, by the cgroup holding the CPU when the wait ended (by_class: same, other, host, idle).",
    );
    let mut pairs: Vec<_> = snap.pairs.iter().collect();
    pairs.sort_by_key(|(k, _)| **k);
    let mut preempt_lines = String::new();
    for ((victim, culprit), v) in pairs {
        if !filter.keeps_cgroup(*victim) {
            continue;
        }
        let Some((_, vl)) = named.iter().find(|(i, _)| i == victim) else {
            continue;
        };
        let class = report::culprit_class(*victim, *culprit, root);
        let by = if *culprit == CULPRIT_IDLE {
            class.as_str().to_string()
        } else {
            cgroup_name(resolver, *culprit)
        };
        let mut l = vl.clone();
        l.push(("by", by));
        l.push(("by_class", class.as_str().to_string()));
        let _ = writeln!(
            o,
            "overhead_cgroup_preempted_wait_seconds_total{} {}",
            labels(&l),
            v.wait_ns as f64 / 1e9
        );
        let _ = writeln!(
            preempt_lines,
            "overhead_cgroup_preemptions_total{} {}",
            labels(&l),
            v.preemptions
        );
    }
    family(
        o,
        "overhead_cgroup_preemptions_total",
        "counter",
        "Times a cgroup's task was preempted, by the cgroup that got the CPU.",
    );
    o.push_str(&preempt_lines);
}

/// One sample of a cgroupfs metric, if the file has it.
type CpuFileValue<'a> = dyn Fn(&CpuFiles) -> Option<String> + 'a;

/// Throttling and pressure from cgroupfs (read now, not from BPF).
fn cgroup_file_metrics(o: &mut String, resolver: &Resolver, named: &CgroupLabels) {
    let files: Vec<_> = named
        .iter()
        .filter(|(id, _)| *id != crate::prom_top::OTHER)
        .map(|(_, l)| (l, cgroup::cpu_files(&resolver.mounts, &l[0].1)))
        .collect();
    let seconds = |usec: Option<u64>| usec.map(|u| (u as f64 / 1e6).to_string());
    let families: [(&str, &str, &CpuFileValue); 3] = [
        (
            "overhead_cgroup_throttled_periods_total",
            "nr_throttled from cpu.stat (v2, or v1 cpu controller).",
            &|f| f.nr_throttled.map(|n| n.to_string()),
        ),
        (
            "overhead_cgroup_throttled_seconds_total",
            "Throttled time from cpu.stat.",
            &|f| seconds(f.throttled_usec),
        ),
        (
            "overhead_cgroup_cpu_pressure_some_seconds_total",
            "cpu.pressure some total.",
            &|f| seconds(f.pressure_some_total_usec),
        ),
    ];
    for (name, help, value) in families {
        family(o, name, "counter", help);
        for (l, f) in &files {
            if let Some(v) = value(f) {
                let _ = writeln!(o, "{name}{} {v}", labels(l));
            }
        }
    }
}

/// Bind first, so "address in use" is reported before any BPF is loaded.
pub fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "another process listens there; pick another port with --listen 127.0.0.1:PORT"
        } else if e.kind() == std::io::ErrorKind::PermissionDenied {
            "ports below 1024 need root or CAP_NET_BIND_SERVICE"
        } else {
            "use HOST:PORT, for example 127.0.0.1:9464"
        };
        anyhow::anyhow!("cannot listen on {addr}: {e} ({hint})")
    })
}

/// Answer one connection: GET /metrics gets `body()`, anything else 404.
/// Reads are bounded in size and time so a stuck client cannot wedge us.
pub fn handle(mut stream: TcpStream, body: impl FnOnce() -> String) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 8192];
    let mut n = 0;
    while n < buf.len() {
        let r = stream.read(&mut buf[n..]).context("reading request")?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let first = req.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, text) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body())
        } else if method == "GET" && path == "/" {
            (
                "200 OK",
                "text/plain",
                "overhead exporter: metrics at /metrics\n".to_string(),
            )
        } else {
            (
                "404 Not Found",
                "text/plain",
                "not found; try /metrics\n".to_string(),
            )
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_complete() {
        let mut h = Hist::default();
        h[3] = 2; // [8, 16) ns
        h[31] = 1; // >= 2^31 ns
        let mut o = String::new();
        histogram(&mut o, "x", &[("cgroup", "/a\"b".into())], &h, 40);
        let buckets: Vec<&str> = o.lines().filter(|l| l.starts_with("x_bucket")).collect();
        assert_eq!(buckets.len(), 32, "31 finite buckets + +Inf");
        assert!(
            buckets[2].ends_with(" 0") && buckets[3].ends_with(" 2"),
            "{o}"
        );
        assert!(buckets[3].contains("le=\"1.6e-8\""), "{o}");
        assert!(
            buckets[30].ends_with(" 2")
                && buckets[31].contains("+Inf")
                && buckets[31].ends_with(" 3")
        );
        assert!(
            o.contains("x_count{cgroup=\"/a\\\"b\"} 3"),
            "label escaping: {o}"
        );
        assert!(o.contains("x_sum{cgroup=\"/a\\\"b\"} 0.00000004"), "{o}");
    }
}
