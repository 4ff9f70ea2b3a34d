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

pub(crate) fn as_bytes<T: Copy>(v: &T) -> &[u8] {
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

/// Entries asked for per BPF_MAP_LOOKUP_BATCH call.
const BATCH: u32 = 4096;

/// `union bpf_attr` for BPF_MAP_LOOKUP_BATCH (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a hash map, in batches (one syscall per ~[`BATCH`]
/// entries) or, where the kernel has no batch lookup, key by key. (A hash
/// map's batch can come back short of `count` with more to follow: it ends
/// at a bucket boundary, so only ENOENT means the end. libbpf-rs 0.27's
/// batch iterator stops at the first short batch, hence this loop.)
fn entries(map: &impl MapCore) -> Result<Vec<Entry>> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let (ks, vs) = (map.key_size() as usize, map.value_size() as usize);
    let mut count = BATCH;
    let mut keys = vec![0u8; ks * count as usize];
    let mut values = vec![0u8; vs * count as usize];
    let (mut token, mut next) = ([0u8; 8], [0u8; 8]);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count,
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `count` keys and values into
        // buffers sized for `count`, and a 4-byte bucket token into `next`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (ret < 0).then(std::io::Error::last_os_error);
        let end = err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT);
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            None | Some(libc::ENOENT) => {}
            // One bucket holds more than `count`: ask for more at once.
            Some(libc::ENOSPC) if count < (1 << 20) => {
                count *= 4;
                keys.resize(ks * count as usize, 0);
                values.resize(vs * count as usize, 0);
                continue;
            }
            Some(_) if first => return entries_key_by_key(map),
            Some(_) => return Err(err.unwrap().into()),
        }
        let n = attr.count as usize;
        for i in 0..n {
            out.push((
                keys[i * ks..(i + 1) * ks].to_vec(),
                values[i * vs..(i + 1) * vs].to_vec(),
            ));
        }
        if end {
            return Ok(out);
        }
        token = next;
        first = false;
    }
}

/// Every entry, two syscalls per key; keys deleted meanwhile are skipped.
fn entries_key_by_key(map: &impl MapCore) -> Result<Vec<Entry>> {
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
        self.forget_dead_cgroups(&mut snap)?;
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
