//! Reading the BPF maps: one [`RawSnapshot`] of cumulative counters, summed
//! over CPUs, per call to [`Observer::snapshot`].

use crate::intf::{self, DropCounter, ExitKind, KvmIsa};
use crate::observer::Observer;
use crate::skel::types::{
    cg_val, exit_key, exit_val, ival_max, oncpu, pair_key, pair_val, vcpu_val,
};
use anyhow::Result;
use libbpf_rs::{MapCore, MapFlags};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// A log2 histogram as the BPF side keeps it (slot i: [2^i, 2^(i+1)) ns).
pub type Hist = [u64; intf::HIST_SLOTS as usize];

/// A thread name as the BPF side saw it (NUL-padded).
pub type Comm = [u8; intf::TASK_COMM_LEN as usize];

/// Raw cumulative map contents, summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct RawSnapshot {
    pub mono_ns: u64,
    pub exits: HashMap<ExitKey, ExitVal>,
    pub vcpus: HashMap<u32, VcpuVal>,
    pub cgroups: HashMap<u64, CgVal>,
    /// (victim cgroup, culprit: a cgroup id, `CULPRIT_IDLE` or `CULPRIT_UNKNOWN`).
    pub pairs: HashMap<(u64, u64), PairVal>,
    pub drops: Vec<(DropCounter, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitKey {
    pub tgid: u32,
    pub tid: u32,
    pub kind: ExitKind,
    /// The vendor of a hardware exit; `Unknown` for the other kinds.
    pub isa: KvmIsa,
    pub reason: u32,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ExitVal {
    pub count: u64,
    pub timed: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    /// Largest duration of the interval this snapshot closed.
    pub interval_max_ns: u64,
    pub hist: Hist,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuVal {
    pub tgid: u32,
    pub vcpu_id: i32,
    /// The thread's name when first seen (it may have exited since).
    pub comm: Comm,
    pub rq_count: u64,
    pub rq_sum_ns: u64,
    pub rq_max_ns: u64,
    /// The thread exited: this snapshot is the entry's final export.
    pub exited: bool,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CgVal {
    pub cpu_ns: u64,
    pub rq_count: u64,
    pub rq_sum_ns: u64,
    pub rq_max_ns: u64,
    /// Longest wait of the interval this snapshot closed.
    pub rq_interval_max_ns: u64,
    pub hist: Hist,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PairVal {
    pub wait_count: u64,
    pub wait_ns: u64,
    pub preemptions: u64,
}

/// Copy a map value's bytes into a skeleton struct.
fn pod<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is one of the skeleton's #[repr(C)] plain-data structs
    // (integers and arrays only, any bit pattern valid); the length was
    // checked and read_unaligned copes with the Vec's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a #[repr(C)] plain-data key without padding (checked by
    // the layout of intf.h: every key is made of naturally aligned fields
    // filling the struct), so all its bytes are initialised.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn add_hist(into: &mut Hist, from: &Hist) {
    for (a, b) in into.iter_mut().zip(from.iter()) {
        *a += b;
    }
}

/// The largest value of the interval `closed`, from its slot of `m`.
struct ClosedInterval {
    epoch: u64,
    slot: usize,
}

impl ClosedInterval {
    fn max(&self, m: &ival_max) -> u64 {
        if m.epoch[self.slot] == self.epoch {
            m.max_ns[self.slot]
        } else {
            0
        }
    }
}

/// A map entry as bytes: the key and the value.
type Entry = (Vec<u8>, Vec<u8>);

/// Entries copied per BPF_MAP_LOOKUP_BATCH call.
const BATCH: u32 = 4096;

/// Every entry of a hash map: in batches of [`BATCH`] (one syscall each),
/// or key by key where the kernel has no batch lookup for this map type.
fn entries(map: &impl MapCore) -> Result<Vec<Entry>> {
    if let Ok(batch) = map.lookup_batch(BATCH, MapFlags::ANY, MapFlags::ANY) {
        let out: Vec<Entry> = batch.collect();
        if !out.is_empty() || map.keys().next().is_none() {
            return Ok(out);
        }
    }
    let mut out = Vec::new();
    for kb in map.keys() {
        if let Some(v) = map.lookup(&kb, MapFlags::ANY)? {
            out.push((kb, v));
        }
    }
    Ok(out)
}

impl Observer {
    /// Read every map, summing per-CPU values. Each call closes an interval:
    /// the `interval_max` fields cover the time since the previous call.
    pub fn snapshot(&self) -> Result<RawSnapshot> {
        // From here on the programs fill the other slot; the closed one is
        // read below. An event whose program read the old epoch just before
        // the bump and writes just after this read is missed (nanoseconds).
        let closed = self.epoch.fetch_add(1, Ordering::SeqCst);
        let ival = ClosedInterval {
            epoch: closed,
            slot: (closed & 1) as usize,
        };
        let mut snap = RawSnapshot {
            mono_ns: livehost_common::monotonic_ns(),
            ..Default::default()
        };
        self.read_exits(&ival, &mut snap)?;
        self.read_vcpus(&mut snap)?;
        self.read_cgroups(&ival, &mut snap)?;
        // After cg_stats: a flush racing these two reads is missed for one
        // snapshot (and seen in the next), never counted twice.
        self.add_pending_cpu(&mut snap)?;
        self.keep_cpu_monotonic(&mut snap);
        self.read_pairs(&mut snap)?;
        self.read_drops(&mut snap)?;
        self.forget_exited(&snap)?;
        Ok(snap)
    }

    /// A cgroup's CPU time is cg_stats plus the per-CPU pending stretch, read
    /// one after the other: a stretch counted as pending in one snapshot can
    /// be flushed into an entry this snapshot had already read, and be
    /// missed once. Each total is a lower bound of the truth, so the largest
    /// seen so far is too: exporting it keeps the counter from going back
    /// (the missed stretch shows up in a later snapshot).
    fn keep_cpu_monotonic(&self, snap: &mut RawSnapshot) {
        let Ok(mut floor) = self.cpu_floor.lock() else {
            return;
        };
        for (id, v) in snap.cgroups.iter_mut() {
            let f = floor.entry(*id).or_insert(0);
            v.cpu_ns = v.cpu_ns.max(*f);
            *f = v.cpu_ns;
        }
    }

    /// Exited vCPU threads have had their final export in `snap`: delete
    /// their entries (vcpus, and their exit counters) so the maps do not
    /// fill with the dead. An entry reused by a new thread since the read
    /// (another tgid, or no longer exited) is left alone.
    fn forget_exited(&self, snap: &RawSnapshot) -> Result<()> {
        let dead: Vec<(u32, u32)> = snap
            .vcpus
            .iter()
            .filter(|(_, v)| v.exited)
            .map(|(tid, v)| (*tid, v.tgid))
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        let vcpus = &self.skel.maps.vcpus;
        for (tid, tgid) in &dead {
            let still_dead = vcpus
                .lookup(as_bytes(tid), MapFlags::ANY)?
                .and_then(|b| pod::<vcpu_val>(&b))
                .is_some_and(|v| v.tgid == *tgid && v.exited != 0);
            if still_dead {
                let _ = vcpus.delete(as_bytes(tid));
            }
        }
        for k in snap.exits.keys() {
            if !dead.contains(&(k.tid, k.tgid)) {
                continue;
            }
            let raw = exit_key {
                tgid: k.tgid,
                tid: k.tid,
                reason: k.reason,
                kind: k.kind.raw() as u16,
                isa: k.isa.raw() as u16,
            };
            let _ = self.skel.maps.exit_stats.delete(as_bytes(&raw));
        }
        Ok(())
    }

    fn read_exits(&self, ival: &ClosedInterval, snap: &mut RawSnapshot) -> Result<()> {
        for (kb, vb) in entries(&self.skel.maps.exit_stats)? {
            let Some(k) = pod::<exit_key>(&kb) else {
                continue;
            };
            let Some(kind) = ExitKind::from_raw(k.kind.into()) else {
                continue; // a kind this build does not know: cannot be named
            };
            let key = ExitKey {
                tgid: k.tgid,
                tid: k.tid,
                kind,
                isa: KvmIsa::from_raw(k.isa.into()).unwrap_or(KvmIsa::Unknown),
                reason: k.reason,
            };
            // Summed into the entry: an isa value this build does not know
            // shares the `Unknown` key with the others.
            let v = snap.exits.entry(key).or_default();
            if let Some(c) = pod::<exit_val>(&vb) {
                v.count += c.count;
                v.timed += c.timed;
                v.sum_ns += c.sum_ns;
                v.max_ns = v.max_ns.max(c.max_ns);
                v.interval_max_ns = v.interval_max_ns.max(ival.max(&c.imax));
                add_hist(&mut v.hist, &c.hist);
            }
        }
        Ok(())
    }

    fn read_vcpus(&self, snap: &mut RawSnapshot) -> Result<()> {
        for (kb, b) in entries(&self.skel.maps.vcpus)? {
            let (Some(tid), Some(v)) = (pod::<u32>(&kb), pod::<vcpu_val>(&b)) else {
                continue;
            };
            let val = VcpuVal {
                tgid: v.tgid,
                vcpu_id: v.vcpu_id,
                comm: v.comm.map(|c| c as u8),
                rq_count: v.rq_count,
                rq_sum_ns: v.rq_sum_ns,
                rq_max_ns: v.rq_max_ns,
                exited: v.exited != 0,
            };
            snap.vcpus.insert(tid, val);
        }
        Ok(())
    }

    fn read_cgroups(&self, ival: &ClosedInterval, snap: &mut RawSnapshot) -> Result<()> {
        for (kb, vb) in entries(&self.skel.maps.cg_stats)? {
            let (Some(id), Some(c)) = (pod::<u64>(&kb), pod::<cg_val>(&vb)) else {
                continue;
            };
            let v = CgVal {
                cpu_ns: c.cpu_ns,
                rq_count: c.rq_count,
                rq_sum_ns: c.rq_sum_ns,
                rq_max_ns: c.rq_max_ns,
                rq_interval_max_ns: ival.max(&c.rq_imax),
                hist: c.hist,
            };
            snap.cgroups.insert(id, v);
        }
        Ok(())
    }

    /// CPU time sched_switch keeps per CPU (`oncpu.pend_*`) until the
    /// cgroup changes: added here so totals stay exact.
    fn add_pending_cpu(&self, snap: &mut RawSnapshot) -> Result<()> {
        let zero = 0u32;
        let map = &self.skel.maps.oncpu;
        if let Some(per_cpu) = map.lookup_percpu(as_bytes(&zero), MapFlags::ANY)? {
            for o in per_cpu.iter().filter_map(|b| pod::<oncpu>(b)) {
                if o.pend_ns > 0 {
                    snap.cgroups.entry(o.pend_cg).or_default().cpu_ns += o.pend_ns;
                }
            }
        }
        Ok(())
    }

    fn read_pairs(&self, snap: &mut RawSnapshot) -> Result<()> {
        for (kb, vb) in entries(&self.skel.maps.pairs)? {
            let (Some(k), Some(c)) = (pod::<pair_key>(&kb), pod::<pair_val>(&vb)) else {
                continue;
            };
            let v = PairVal {
                wait_count: c.wait_count,
                wait_ns: c.wait_ns,
                preemptions: c.preemptions,
            };
            snap.pairs.insert((k.victim, k.culprit), v);
        }
        Ok(())
    }

    fn read_drops(&self, snap: &mut RawSnapshot) -> Result<()> {
        for d in DropCounter::ALL {
            let key = d.raw();
            let total = self
                .skel
                .maps
                .drops
                .lookup_percpu(as_bytes(&key), MapFlags::ANY)?
                .map(|per_cpu| per_cpu.iter().filter_map(|b| pod::<u64>(b)).sum())
                .unwrap_or(0);
            snap.drops.push((d, total));
        }
        Ok(())
    }
}
