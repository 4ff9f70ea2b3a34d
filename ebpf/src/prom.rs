//! Prometheus text exposition (format 0.0.4) of the cumulative counters,
//! and a minimal HTTP/1.1 server for `/metrics` on std::net.

use crate::cgroup::{self, Resolver};
use crate::observer::RawSnapshot;
use crate::reasons;
use crate::report::{self, Filter, comm_or};
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

/// Cumulative log2 histogram as Prometheus buckets (le in seconds). All 32
/// buckets are always written, so every series keeps the same bucket set
/// over time (histogram_quantile needs that).
fn histogram(out: &mut String, name: &str, base: &[(&str, String)], hist: &[u64; 32], sum_ns: u64) {
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

pub fn render(
    snap: &RawSnapshot,
    resolver: &mut Resolver,
    filter: &Filter,
    attached: &[String],
) -> String {
    let mut o = String::new();
    let vm_on = !filter.containers_only;
    let cg_on = !filter.vm_only;
    if vm_on {
        o.push_str("# HELP overhead_kvm_exits_total KVM exits per vCPU thread and reason (kind: hw = kvm_exit, user = return to the VMM, pio_in/pio_out = port accesses).\n# TYPE overhead_kvm_exits_total counter\n");
        let mut hw = Vec::new();
        let mut keys: Vec<_> = snap.exits.keys().collect();
        keys.sort();
        for k in keys {
            if filter.pid.is_some_and(|p| p != k.tgid) {
                continue;
            }
            let v = &snap.exits[k];
            let (kind, reason) = match k.kind {
                0 => ("hw", reasons::hw_exit_name(k.isa, k.reason)),
                1 => (
                    "user",
                    reasons::kvm_exit_name(k.reason)
                        .map(str::to_string)
                        .unwrap_or_else(|| k.reason.to_string()),
                ),
                2 => ("pio_in", format!("{:#x}", k.reason)),
                _ => ("pio_out", format!("{:#x}", k.reason)),
            };
            let vcpu = snap.vcpus.get(&k.tid).map(|v| v.vcpu_id).unwrap_or(-1);
            let l = vec![
                (
                    "vm",
                    format!(
                        "{}/{}",
                        k.tgid,
                        comm_or(k.tgid, snap.vcpus.get(&k.tid).map(|v| &v.comm))
                    ),
                ),
                ("vcpu", vcpu.to_string()),
                ("tid", k.tid.to_string()),
                ("kind", kind.to_string()),
                (
                    "isa",
                    if k.kind == 0 {
                        reasons::isa_name(k.isa).to_string()
                    } else {
                        String::new()
                    },
                ),
                ("reason", reason),
            ];
            let _ = writeln!(o, "overhead_kvm_exits_total{} {}", labels(&l), v.count);
            if k.kind == 0 {
                hw.push((l, v));
            }
        }
        o.push_str("# HELP overhead_kvm_exit_duration_seconds Time from kvm_exit to the next kvm_entry on the same thread.\n# TYPE overhead_kvm_exit_duration_seconds histogram\n");
        for (l, v) in hw {
            let l: Vec<_> = l.into_iter().filter(|(k, _)| *k != "kind").collect();
            histogram(
                &mut o,
                "overhead_kvm_exit_duration_seconds",
                &l,
                &v.hist,
                v.sum_ns,
            );
        }
        o.push_str("# HELP overhead_vcpu_runqueue_delay_seconds_total Time vCPU threads waited for a CPU (the guest's steal time).\n# TYPE overhead_vcpu_runqueue_delay_seconds_total counter\n");
        let mut tids: Vec<_> = snap.vcpus.iter().collect();
        tids.sort_by_key(|(t, _)| **t);
        for (tid, v) in tids {
            if filter.pid.is_some_and(|p| p != v.tgid) {
                continue;
            }
            let l = [
                (
                    "vm",
                    format!("{}/{}", v.tgid, comm_or(v.tgid, Some(&v.comm))),
                ),
                ("vcpu", v.vcpu_id.to_string()),
                ("tid", tid.to_string()),
            ];
            let _ = writeln!(
                o,
                "overhead_vcpu_runqueue_delay_seconds_total{} {}",
                labels(&l),
                v.rq_sum_ns as f64 / 1e9
            );
        }
    }
    if cg_on {
        let root = resolver.root_id();
        let mut ids: Vec<u64> = snap.cgroups.keys().copied().collect();
        ids.sort();
        if let Some(keep) = &filter.cgroups {
            ids.retain(|i| keep.contains(i));
        }
        let named: Vec<(u64, Vec<(&str, String)>)> = ids
            .iter()
            .map(|id| {
                let path = resolver.path(*id).unwrap_or_else(|| format!("#{id}"));
                let container = cgroup::container_name(&path).unwrap_or_default();
                (*id, vec![("cgroup", path), ("container", container)])
            })
            .collect();
        o.push_str("# HELP overhead_cgroup_cpu_seconds_total CPU time of the cgroup's tasks, from sched_switch.\n# TYPE overhead_cgroup_cpu_seconds_total counter\n");
        for (id, l) in &named {
            let _ = writeln!(
                o,
                "overhead_cgroup_cpu_seconds_total{} {}",
                labels(l),
                snap.cgroups[id].cpu_ns as f64 / 1e9
            );
        }
        o.push_str("# HELP overhead_cgroup_runqueue_latency_seconds Wakeup/preemption to running, per cgroup.\n# TYPE overhead_cgroup_runqueue_latency_seconds histogram\n");
        for (id, l) in &named {
            let v = &snap.cgroups[id];
            histogram(
                &mut o,
                "overhead_cgroup_runqueue_latency_seconds",
                l,
                &v.hist,
                v.rq_sum_ns,
            );
        }
        o.push_str("# HELP overhead_cgroup_preempted_wait_seconds_total Run-queue wait of a cgroup, by the cgroup holding the CPU when the wait ended (by_class: same, other, host, idle).\n# TYPE overhead_cgroup_preempted_wait_seconds_total counter\n");
        let mut pairs: Vec<_> = snap.pairs.iter().collect();
        pairs.sort_by_key(|(k, _)| **k);
        let mut preempt_lines = String::new();
        for ((victim, culprit), v) in pairs {
            if let Some(keep) = &filter.cgroups
                && !keep.contains(victim)
            {
                continue;
            }
            let Some((_, vl)) = named.iter().find(|(i, _)| i == victim) else {
                continue;
            };
            let class = report::culprit_class(*victim, *culprit, root);
            let mut l = vl.clone();
            l.push((
                "by",
                if *culprit == 0 {
                    "idle".into()
                } else {
                    resolver
                        .path(*culprit)
                        .unwrap_or_else(|| format!("#{culprit}"))
                },
            ));
            l.push(("by_class", class.into()));
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
        o.push_str("# HELP overhead_cgroup_preemptions_total Times a cgroup's task was preempted, by the cgroup that got the CPU.\n# TYPE overhead_cgroup_preemptions_total counter\n");
        o.push_str(&preempt_lines);
        let mut thr = String::new();
        let mut thr_s = String::new();
        let mut psi = String::new();
        for (_, l) in &named {
            let f = cgroup::cpu_files(&resolver.mounts, &l[0].1);
            if let Some(n) = f.nr_throttled {
                let _ = writeln!(
                    thr,
                    "overhead_cgroup_throttled_periods_total{} {n}",
                    labels(l)
                );
            }
            if let Some(u) = f.throttled_usec {
                let _ = writeln!(
                    thr_s,
                    "overhead_cgroup_throttled_seconds_total{} {}",
                    labels(l),
                    u as f64 / 1e6
                );
            }
            if let Some(u) = f.pressure_some_total_usec {
                let _ = writeln!(
                    psi,
                    "overhead_cgroup_cpu_pressure_some_seconds_total{} {}",
                    labels(l),
                    u as f64 / 1e6
                );
            }
        }
        o.push_str("# HELP overhead_cgroup_throttled_periods_total nr_throttled from cpu.stat (v2, or v1 cpu controller).\n# TYPE overhead_cgroup_throttled_periods_total counter\n");
        o.push_str(&thr);
        o.push_str("# HELP overhead_cgroup_throttled_seconds_total Throttled time from cpu.stat.\n# TYPE overhead_cgroup_throttled_seconds_total counter\n");
        o.push_str(&thr_s);
        o.push_str("# HELP overhead_cgroup_cpu_pressure_some_seconds_total cpu.pressure some total.\n# TYPE overhead_cgroup_cpu_pressure_some_seconds_total counter\n");
        o.push_str(&psi);
    }
    o.push_str("# HELP overhead_drops_total Map updates lost because a BPF map was full (numbers are incomplete when non-zero).\n# TYPE overhead_drops_total counter\n");
    for (name, n) in &snap.drops {
        let _ = writeln!(
            o,
            "overhead_drops_total{} {n}",
            labels(&[("map", name.clone())])
        );
    }
    o.push_str("# HELP overhead_program_attached BPF programs attached by this observer.\n# TYPE overhead_program_attached gauge\n");
    for p in attached {
        let _ = writeln!(
            o,
            "overhead_program_attached{} 1",
            labels(&[("program", p.clone())])
        );
    }
    o
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
        let mut h = [0u64; 32];
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
