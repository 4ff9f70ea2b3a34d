//! Loading, attaching and reading the BPF side.
//!
//! One `Observer` owns the BPF object and its links; dropping it detaches
//! every program and closes every map (nothing is pinned), so an error at
//! any point leaves the kernel as it was.

use crate::skel::types::{cg_val, exit_key, exit_val, oncpu, pair_key, pair_val, vcpu_val};
use crate::skel::{OverheadSkel, OverheadSkelBuilder};
use anyhow::{Context, Result, bail};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which tracepoint each program needs, and whether it is part of the VM or
/// the container half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Vm,
    Sched,
}

pub const PROGRAMS: [(&str, &str, Group); 7] = [
    ("handle_kvm_exit", "kvm_exit", Group::Vm),
    ("handle_kvm_entry", "kvm_entry", Group::Vm),
    ("handle_kvm_userspace_exit", "kvm_userspace_exit", Group::Vm),
    ("handle_kvm_pio", "kvm_pio", Group::Vm),
    ("handle_sched_wakeup", "sched_wakeup", Group::Sched),
    ("handle_sched_wakeup_new", "sched_wakeup_new", Group::Sched),
    ("handle_sched_switch", "sched_switch", Group::Sched),
];

pub const DROP_NAMES: [&str; 6] = [
    "exit_stats",
    "exit_start",
    "vcpus",
    "cgroups",
    "pairs",
    "wakeups",
];

#[derive(Debug, Clone)]
pub struct ObserverOptions {
    /// Where kernel BTF lives (`/sys/kernel/btf`); tracepoint presence is
    /// checked there, in vmlinux and module BTF.
    pub btf_dir: PathBuf,
    /// Load the KVM programs.
    pub vms: bool,
    /// Load the scheduler programs.
    pub containers: bool,
    /// Also attach an empty sched_switch program (`calib_noop`) whose run
    /// time is the per-event floor; for the overhead bench.
    pub calibrate: bool,
}

impl Default for ObserverOptions {
    fn default() -> Self {
        ObserverOptions {
            btf_dir: PathBuf::from("/sys/kernel/btf"),
            vms: true,
            containers: true,
            calibrate: false,
        }
    }
}

/// A program left out, and why (shown to the user, exported in JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub program: String,
    pub tracepoint: String,
    pub reason: String,
}

pub struct Observer {
    skel: OverheadSkel<'static>,
    /// The BPF side's `epoch` (the current interval), in the .bss map's
    /// mmapped page, which lives as long as `skel`.
    epoch: &'static AtomicU64,
    links: Vec<Link>,
    pub attached: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// Raw cumulative map contents, summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct RawSnapshot {
    pub mono_ns: u64,
    pub exits: HashMap<ExitKey, ExitVal>,
    pub vcpus: HashMap<u32, VcpuVal>,
    pub cgroups: HashMap<u64, CgVal>,
    pub pairs: HashMap<(u64, u64), PairVal>,
    pub drops: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitKey {
    pub tgid: u32,
    pub tid: u32,
    pub kind: u16,
    pub isa: u16,
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
    pub hist: [u64; 32],
}

#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuVal {
    pub tgid: u32,
    pub vcpu_id: i32,
    /// The thread's name when first seen (it may have exited since).
    pub comm: [u8; 16],
    pub rq_count: u64,
    pub rq_sum_ns: u64,
    pub rq_max_ns: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CgVal {
    pub cpu_ns: u64,
    pub rq_count: u64,
    pub rq_sum_ns: u64,
    pub rq_max_ns: u64,
    /// Longest wait of the interval this snapshot closed.
    pub rq_interval_max_ns: u64,
    pub hist: [u64; 32],
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PairVal {
    pub wait_count: u64,
    pub wait_ns: u64,
    pub preemptions: u64,
}

static LIBBPF_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn libbpf_log(_level: libbpf_rs::PrintLevel, msg: String) {
    if let Ok(mut log) = LIBBPF_LOG.lock() {
        if log.len() > 200 {
            log.remove(0);
        }
        log.push(msg.trim_end().to_string());
    }
}

fn take_libbpf_log() -> String {
    let lines = LIBBPF_LOG
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    let tail: Vec<_> = lines.iter().rev().take(15).rev().cloned().collect();
    tail.join("\n")
}

/// Effective capability bits from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = livehost_common::sysfs::read_text("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

const CAP_SYS_ADMIN: u64 = 21;
const CAP_PERFMON: u64 = 38;
const CAP_BPF: u64 = 39;

/// Refuse early, with the fix, when the process cannot load tracing programs.
pub fn check_privileges() -> Result<()> {
    let Some(caps) = effective_caps() else {
        return Ok(()); // cannot tell; let the kernel decide
    };
    let has = |c: u64| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "overhead needs CAP_BPF and CAP_PERFMON (or root) to load tracing programs; \
         run it with sudo, or `setcap cap_bpf,cap_perfmon+ep $(which overhead)`"
    )
}

/// The tracepoints that some BTF file in `dir` (vmlinux or a module's)
/// defines a `btf_trace_<name>` typedef for, which is what tp_btf attaches
/// to. Collected from the NUL-separated string sections: a name is there
/// exactly when the typedef is, and splitting bytes cannot panic on odd files.
pub fn btf_tracepoints(dir: &Path) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        for s in data.split(|b| *b == 0) {
            if let Some(name) = s.strip_prefix(b"btf_trace_") {
                out.insert(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    out
}

/// Turn on the kernel's per-program run-time accounting (BPF_ENABLE_STATS)
/// for as long as the returned descriptor is open. It costs two clock reads
/// per program run, so overhead comparisons run without it.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }: type 0 is
    // BPF_STATS_RUN_TIME; the rest of the attr must be zero.
    let attr = [0u8; 16];
    // SAFETY: bpf(2) reads `size` bytes of attr, which we own; on success
    // it returns a new descriptor that we alone own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            attr.len() as u32,
        )
    };
    if fd < 0 {
        bail!(
            "BPF_ENABLE_STATS failed: {} (needs CAP_SYS_ADMIN, kernel 5.8+)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a fresh descriptor returned to us by the kernel.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Slots in the pid-indexed `task_state` map: the kernel's pid_max (a wake
/// of a higher pid, possible only if pid_max is raised while we run, is
/// counted as a drop).
fn task_slots() -> u32 {
    const KERNEL_LIMIT: u32 = 1 << 22; // PID_MAX_LIMIT on 64-bit
    livehost_common::sysfs::read_text("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map_or(KERNEL_LIMIT, |n| n.clamp(301, KERNEL_LIMIT))
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

impl Observer {
    /// Check the environment, load and attach. Any failure detaches what was
    /// attached (the links are dropped) before returning the error.
    pub fn start(opts: &ObserverOptions) -> Result<Observer> {
        check_privileges()?;
        let vmlinux = opts.btf_dir.join("vmlinux");
        if !vmlinux.exists() {
            bail!(
                "this kernel exposes no BTF ({} is missing): overhead's programs are \
                 tp_btf programs and need a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                vmlinux.display()
            );
        }
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Info, libbpf_log)));

        let available = btf_tracepoints(&opts.btf_dir);
        let mut skipped = Vec::new();
        let mut wanted = Vec::new();
        for (prog, tp, group) in PROGRAMS {
            let enabled = match group {
                Group::Vm => opts.vms,
                Group::Sched => opts.containers || opts.vms,
            };
            if !enabled {
                skipped.push(Skipped {
                    program: prog.into(),
                    tracepoint: tp.into(),
                    reason: "not requested (filter)".into(),
                });
                continue;
            }
            if !available.contains(tp) {
                let why = match group {
                    Group::Vm => {
                        "tracepoint absent from kernel and module BTF (kvm not built in or module not loaded)"
                    }
                    Group::Sched => "tracepoint absent from kernel BTF",
                };
                skipped.push(Skipped {
                    program: prog.into(),
                    tracepoint: tp.into(),
                    reason: why.into(),
                });
                continue;
            }
            wanted.push(prog);
        }
        let sched_ok = ["handle_sched_switch", "handle_sched_wakeup"]
            .iter()
            .all(|p| wanted.contains(p));
        if opts.containers && !sched_ok {
            bail!(
                "this kernel lacks the sched_switch/sched_wakeup tracepoints in BTF ({}); \
                 container observation is impossible here",
                opts.btf_dir.display()
            );
        }
        if opts.vms && !opts.containers && !wanted.iter().any(|p| p.contains("kvm")) {
            bail!(
                "no KVM tracepoint is available (KVM is not built in and no kvm module is \
                 loaded); load kvm_intel or kvm_amd, or drop --vm-only"
            );
        }

        if opts.calibrate {
            wanted.push("calib_noop");
        }
        // The skeleton borrows its open object for 'static; the box is a
        // pointer-sized handle, and the object it points to is freed when the
        // skeleton drops, so leaking the box costs a few bytes per observer.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = OverheadSkelBuilder::default()
            .open(storage)
            .context("cannot open the embedded BPF object")?;
        for mut prog in open.open_object_mut().progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            prog.set_autoload(wanted.contains(&name.as_str()));
        }
        // One 8-byte slot per possible pid: 32 MiB at systemd's 4194304.
        open.maps
            .task_state
            .set_max_entries(task_slots())
            .context("cannot size the per-task map")?;
        let mut skel = open.load().map_err(|e| {
            anyhow::anyhow!(
                "the kernel refused to load the BPF programs: {e}\nlibbpf said:\n{}",
                take_libbpf_log()
            )
        })?;
        let Some(bss) = skel.maps.bss_data.take() else {
            bail!(
                "the kernel did not let the BPF program's globals be memory-mapped \
                 (BPF_F_MMAPABLE, Linux 5.5+); overhead cannot run here"
            );
        };
        // SAFETY: the u64 is 8-byte aligned in a page that stays mapped while
        // the skeleton (moved into the Observer beside this reference) lives;
        // the kernel side only reads it, and all our accesses are atomic.
        let epoch = unsafe { AtomicU64::from_ptr(&mut bss.epoch) };
        let mut obs = Observer {
            skel,
            epoch,
            links: Vec::new(),
            attached: Vec::new(),
            skipped,
        };
        for name in wanted {
            let link = {
                let prog = obs
                    .skel
                    .object_mut()
                    .progs_mut()
                    .find(|p| p.name() == name)
                    .with_context(|| format!("program {name} missing from the BPF object"))?;
                prog.attach()
            };
            match link {
                Ok(l) => {
                    obs.links.push(l);
                    obs.attached.push(name.to_string());
                }
                Err(e) => bail!(
                    "cannot attach {name}: {e}; nothing is left attached\nlibbpf said:\n{}",
                    take_libbpf_log()
                ),
            }
        }
        Ok(obs)
    }

    /// File descriptors of the attached programs, for run-time statistics.
    pub fn program_fds(&self) -> Vec<(String, i32)> {
        use std::os::fd::{AsFd, AsRawFd};
        self.skel
            .object()
            .progs()
            .filter(|p| self.attached.iter().any(|a| p.name() == a.as_str()))
            .map(|p| {
                (
                    p.name().to_string_lossy().into_owned(),
                    p.as_fd().as_raw_fd(),
                )
            })
            .collect()
    }

    /// Kernel-measured run time of each attached program: (name, run_cnt,
    /// run_time_ns) from /proc/self/fdinfo. The counters only move while
    /// [`enable_run_time_stats`] is held.
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        self.program_fds()
            .into_iter()
            .map(|(name, fd)| {
                let text = livehost_common::sysfs::read_text(format!("/proc/self/fdinfo/{fd}"))
                    .unwrap_or_default();
                let field = |k: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                (name, field("run_cnt:"), field("run_time_ns:"))
            })
            .collect()
    }

    /// Read every map, summing per-CPU values. Each call closes an interval:
    /// the `interval_max` fields cover the time since the previous call.
    pub fn snapshot(&self) -> Result<RawSnapshot> {
        // From here on the programs fill the other slot; the closed one is
        // read below. An event whose program read the old epoch just before
        // the bump and writes just after this read is missed (nanoseconds).
        let closed = self.epoch.fetch_add(1, Ordering::SeqCst);
        let slot = (closed & 1) as usize;
        let imax = |m: &crate::skel::types::ival_max| {
            if m.epoch[slot] == closed {
                m.max_ns[slot]
            } else {
                0
            }
        };
        let maps = &self.skel.maps;
        let mut snap = RawSnapshot {
            mono_ns: livehost_common::monotonic_ns(),
            ..Default::default()
        };
        for kb in maps.exit_stats.keys() {
            let Some(k) = pod::<exit_key>(&kb) else {
                continue;
            };
            let Some(per_cpu) = maps.exit_stats.lookup_percpu(&kb, MapFlags::ANY)? else {
                continue; // deleted meanwhile
            };
            let mut v = ExitVal::default();
            for b in per_cpu {
                let Some(c) = pod::<exit_val>(&b) else {
                    continue;
                };
                v.count += c.count;
                v.timed += c.timed;
                v.sum_ns += c.sum_ns;
                v.max_ns = v.max_ns.max(c.max_ns);
                v.interval_max_ns = v.interval_max_ns.max(imax(&c.imax));
                for (a, b) in v.hist.iter_mut().zip(c.hist.iter()) {
                    *a += b;
                }
            }
            let key = ExitKey {
                tgid: k.tgid,
                tid: k.tid,
                kind: k.kind,
                isa: k.isa,
                reason: k.reason,
            };
            snap.exits.insert(key, v);
        }
        for kb in maps.vcpus.keys() {
            let Some(tid) = pod::<u32>(&kb) else { continue };
            let Some(b) = maps.vcpus.lookup(&kb, MapFlags::ANY)? else {
                continue;
            };
            let Some(v) = pod::<vcpu_val>(&b) else {
                continue;
            };
            snap.vcpus.insert(
                tid,
                VcpuVal {
                    tgid: v.tgid,
                    vcpu_id: v.vcpu_id,
                    comm: v.comm.map(|c| c as u8),
                    rq_count: v.rq_count,
                    rq_sum_ns: v.rq_sum_ns,
                    rq_max_ns: v.rq_max_ns,
                },
            );
        }
        for kb in maps.cg_stats.keys() {
            let Some(id) = pod::<u64>(&kb) else { continue };
            let Some(per_cpu) = maps.cg_stats.lookup_percpu(&kb, MapFlags::ANY)? else {
                continue;
            };
            let mut v = CgVal::default();
            for b in per_cpu {
                let Some(c) = pod::<cg_val>(&b) else { continue };
                v.cpu_ns += c.cpu_ns;
                v.rq_count += c.rq_count;
                v.rq_sum_ns += c.rq_sum_ns;
                v.rq_max_ns = v.rq_max_ns.max(c.rq_max_ns);
                v.rq_interval_max_ns = v.rq_interval_max_ns.max(imax(&c.rq_imax));
                for (a, b) in v.hist.iter_mut().zip(c.hist.iter()) {
                    *a += b;
                }
            }
            snap.cgroups.insert(id, v);
        }
        // After cg_stats: a flush racing these two reads is missed for one
        // snapshot (and seen in the next), never counted twice.
        let zero = 0u32;
        if let Some(per_cpu) = maps.oncpu.lookup_percpu(as_bytes(&zero), MapFlags::ANY)? {
            for b in per_cpu {
                if let Some(o) = pod::<oncpu>(&b)
                    && o.pend_ns > 0
                {
                    snap.cgroups.entry(o.pend_cg).or_default().cpu_ns += o.pend_ns;
                }
            }
        }
        for kb in maps.pairs.keys() {
            let Some(k) = pod::<pair_key>(&kb) else {
                continue;
            };
            let Some(per_cpu) = maps.pairs.lookup_percpu(&kb, MapFlags::ANY)? else {
                continue;
            };
            let mut v = PairVal::default();
            for b in per_cpu {
                let Some(c) = pod::<pair_val>(&b) else {
                    continue;
                };
                v.wait_count += c.wait_count;
                v.wait_ns += c.wait_ns;
                v.preemptions += c.preemptions;
            }
            snap.pairs.insert((k.victim, k.culprit), v);
        }
        for (i, name) in DROP_NAMES.iter().enumerate() {
            let key = i as u32;
            let total = maps
                .drops
                .lookup_percpu(as_bytes(&key), MapFlags::ANY)?
                .map(|per_cpu| per_cpu.iter().filter_map(|b| pod::<u64>(b)).sum())
                .unwrap_or(0);
            snap.drops.push((name.to_string(), total));
        }
        Ok(snap)
    }
}
