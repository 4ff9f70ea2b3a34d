//! What the BPF maps cost in kernel memory: their sizes (command-line
//! flags, [`MapSizes`]), the memory those take computed the way the kernel
//! accounts it (`htab_map_mem_usage`, `array_map_mem_usage` in
//! kernel/bpf/), for this host or any other number of possible CPUs, and
//! the figure the kernel itself reports per map (fdinfo `memlock`).

use crate::skel::types::{cg_val, exit_key, exit_val, oncpu, pair_key, pair_val, vcpu_val};
use std::mem::size_of;

/// How many entries each growing map holds (a full map counts its failed
/// inserts in `drops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// (vCPU thread, exit kind, reason) counters: ~10-20 per vCPU thread.
    pub exits: u32,
    /// Cgroups with CPU time or waits.
    pub cgroups: u32,
    /// (victim cgroup, culprit) pairs: a few per busy cgroup.
    pub pairs: u32,
    /// vCPU threads (also the in-flight exit per vCPU).
    pub vcpus: u32,
}

impl Default for MapSizes {
    /// Room for 1,000 vCPUs with 16 exit reasons each, 16,384 cgroups and
    /// 4 culprits per cgroup: about 20 MiB, whatever the CPU count.
    fn default() -> Self {
        MapSizes {
            exits: 16384,
            cgroups: 16384,
            pairs: 65536,
            vcpus: 4096,
        }
    }
}

/// The kinds of map the observer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hash,
    LruHash,
    PercpuHash,
    Array,
    PercpuArray,
}

/// One map's type and dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub name: &'static str,
    pub kind: Kind,
    pub key: usize,
    pub value: usize,
    pub entries: u32,
}

/// The maps of overhead.bpf.c at these sizes; `task_slots` is the
/// pid-indexed array's length (pid_max).
pub fn shapes(s: &MapSizes, task_slots: u32) -> Vec<MapShape> {
    let m = |name, kind, key, value, entries| MapShape {
        name,
        kind,
        key,
        value,
        entries,
    };
    vec![
        m(
            "exit_stats",
            Kind::Hash,
            size_of::<exit_key>(),
            size_of::<exit_val>(),
            s.exits,
        ),
        // struct exit_start of overhead.bpf.c: u64 ts, u32 reason, u32 isa.
        m("exit_start", Kind::Hash, 4, 16, s.vcpus),
        m("vcpus", Kind::Hash, 4, size_of::<vcpu_val>(), s.vcpus),
        m("task_state", Kind::Array, 4, 8, task_slots),
        m("oncpu", Kind::PercpuArray, 4, size_of::<oncpu>(), 1),
        m("cg_stats", Kind::Hash, 8, size_of::<cg_val>(), s.cgroups),
        m(
            "pairs",
            Kind::Hash,
            size_of::<pair_key>(),
            size_of::<pair_val>(),
            s.pairs,
        ),
        m(
            "drops",
            Kind::PercpuArray,
            4,
            8,
            crate::intf::DROP_SLOTS as u32,
        ),
    ]
}

fn round8(n: usize) -> u64 {
    (n as u64).div_ceil(8) * 8
}

/// Kernel memory of one map with `cpus` possible CPUs, as the kernel counts
/// it for a preallocated map (fixed parts: struct bpf_htab/bpf_array, ~1 KiB
/// at most, are left out).
pub fn map_bytes(m: &MapShape, cpus: u32) -> u64 {
    // struct htab_elem before the key (x86-64), struct bucket.
    const HTAB_ELEM: u64 = 48;
    const BUCKET: u64 = 16;
    const LOCK_COUNT: u64 = 8; // HASHTAB_MAP_LOCK_COUNT ints per CPU
    let (cpus, n) = (cpus as u64, m.entries as u64);
    let (key, value) = (round8(m.key), round8(m.value));
    match m.kind {
        Kind::Hash | Kind::LruHash | Kind::PercpuHash => {
            let percpu = m.kind == Kind::PercpuHash;
            let mut usage = BUCKET * n.next_power_of_two() + 4 * cpus * LOCK_COUNT;
            let elem = HTAB_ELEM + key + if percpu { 8 } else { value };
            // A plain preallocated hash keeps one spare element per CPU.
            let extra = if m.kind == Kind::Hash { cpus } else { 0 };
            usage += elem * (n + extra);
            match m.kind {
                Kind::PercpuHash => usage += value * cpus * n,
                Kind::Hash => usage += 8 * cpus,
                _ => {}
            }
            usage
        }
        Kind::Array => value * n,
        Kind::PercpuArray => 8 * n + value * n * cpus,
    }
}

/// Total kernel memory of the observer's maps at these sizes.
pub fn total_bytes(s: &MapSizes, task_slots: u32, cpus: u32) -> u64 {
    shapes(s, task_slots)
        .iter()
        .map(|m| map_bytes(m, cpus))
        .sum()
}

/// The kernel's count of possible CPUs (what per-CPU maps are sized by).
pub fn possible_cpus() -> u32 {
    livehost_common::sysfs::read_text("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|t| parse_cpu_list(t.trim()))
        .unwrap_or(1)
}

/// The number of CPUs in a list such as `0-3,8,10-11`; None if malformed.
pub fn parse_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
    }
    Some(n)
}

/// A map's kernel memory as the kernel reports it (fdinfo `memlock`: its
/// own accounting from Linux 6.4, an estimate in pages before).
pub fn fd_memlock(fd: i32) -> Option<u64> {
    let text = livehost_common::sysfs::read_text(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The big host: 256 possible CPUs, 10,000 cgroups, 1,000
    /// vCPUs, systemd's pid_max. The defaults hold that and stay under
    /// 64 MiB; the per-CPU design they replace took gigabytes.
    #[test]
    fn defaults_fit_a_256_cpu_host_in_64_mib() {
        let s = MapSizes::default();
        assert!(s.cgroups >= 10_000 && s.vcpus >= 1_000 && s.exits >= 16 * 1_000);
        let total = total_bytes(&s, 4_194_304, 256);
        for m in shapes(&s, 4_194_304) {
            eprintln!("{:<11} {:>12} bytes", m.name, map_bytes(&m, 256));
        }
        eprintln!("total       {total:>12} bytes at 256 CPUs, pid_max 4194304");
        assert!(total < 64 * MIB, "{} MiB", total / MIB);
        // Without the pid-indexed array everything else is ~20 MiB.
        let rest = total - 8 * 4_194_304;
        assert!(rest < 24 * MIB, "{} MiB", rest / MIB);
        // What the old per-CPU cgroup map alone cost at 256 CPUs.
        let old = MapShape {
            name: "cg_stats",
            kind: Kind::PercpuHash,
            key: 8,
            value: size_of::<cg_val>(),
            entries: 8192,
        };
        assert!(map_bytes(&old, 256) > 600 * MIB);
    }

    #[test]
    fn hash_memory_follows_the_kernels_formula() {
        let m = MapShape {
            name: "t",
            kind: Kind::Hash,
            key: 8,
            value: 20,
            entries: 1000,
        };
        // buckets 1024*16 + locks 4*2*8 + elems (48+8+24)*(1000+2) + 8*2
        assert_eq!(map_bytes(&m, 2), 16384 + 64 + 80 * 1002 + 16);
        let pc = MapShape {
            kind: Kind::PercpuArray,
            entries: 2,
            ..m
        };
        assert_eq!(map_bytes(&pc, 4), 16 + 24 * 2 * 4);
    }

    #[test]
    fn cpu_lists_parse_and_garbage_is_refused() {
        assert_eq!(parse_cpu_list("0-255"), Some(256));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list(""), None);
    }
}
