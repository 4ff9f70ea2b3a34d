//! Loading and attaching the BPF side ([`Observer::start`]); reading its maps
//! is in `snapshot`.
//!
//! One `Observer` owns the BPF object and its links; dropping it detaches
//! every program and closes every map (nothing is pinned), so an error at
//! any point leaves the kernel as it was.

use crate::kernel::{btf_tracepoints, check_privileges, task_slots};
use crate::memory::MapSizes;
use crate::skel::{OverheadSkel, OverheadSkelBuilder};
use anyhow::{Context, Result, bail};
use libbpf_rs::Link;
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Which tracepoint each program needs, and whether it is part of the VM or
/// the container half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Vm,
    Sched,
}

pub const PROGRAMS: [(&str, &str, Group); 8] = [
    ("handle_kvm_exit", "kvm_exit", Group::Vm),
    ("handle_kvm_entry", "kvm_entry", Group::Vm),
    ("handle_kvm_userspace_exit", "kvm_userspace_exit", Group::Vm),
    ("handle_kvm_pio", "kvm_pio", Group::Vm),
    ("handle_sched_wakeup", "sched_wakeup", Group::Sched),
    ("handle_sched_wakeup_new", "sched_wakeup_new", Group::Sched),
    ("handle_sched_switch", "sched_switch", Group::Sched),
    // Forgets exited vCPU threads; only the VM half keeps per-thread state.
    ("handle_sched_process_exit", "sched_process_exit", Group::Vm),
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
    /// Also attach an empty program (`calib_<tracepoint>`) on each hook
    /// whose run time is the per-event floor; for the overhead bench.
    pub calibrate: bool,
    /// Attach only those empty programs, on the hooks the real ones would
    /// use (the bench's "empty programs" leg); nothing is measured.
    pub empty: bool,
    /// Entries of the maps that grow with the host (flags `--max-*`).
    pub sizes: MapSizes,
}

impl Default for ObserverOptions {
    fn default() -> Self {
        ObserverOptions {
            btf_dir: PathBuf::from("/sys/kernel/btf"),
            vms: true,
            containers: true,
            calibrate: false,
            empty: false,
            sizes: MapSizes::default(),
        }
    }
}

/// A program left out, and why (shown to the user, exported in JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub program: String,
    pub tracepoint: String,
    pub reason: String,
}

pub struct Observer {
    pub(crate) skel: OverheadSkel<'static>,
    /// The BPF side's `epoch` (the current interval), in the .bss map's
    /// mmapped page, which lives as long as `skel`.
    pub(crate) epoch: &'static AtomicU64,
    /// `switch_state_source` of the BPF side (same page).
    switch_state: &'static AtomicU32,
    links: Vec<Link>,
    pub attached: Vec<String>,
    pub skipped: Vec<Skipped>,
    /// Per cgroup, the CPU time last exported (see `snapshot`): counters
    /// never go back.
    pub(crate) cpu_floor: Mutex<std::collections::HashMap<u64, u64>>,
    /// To tell removed cgroups (None: no v2 mount, nothing is forgotten).
    pub(crate) cgroup_fs: Option<crate::dead_cgroups::CgroupFs>,
    pub(crate) forgotten: Mutex<crate::dead_cgroups::Forgotten>,
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

/// Whether a program is left out, and why (None: load it).
fn skip_reason(
    group: Group,
    tp: &str,
    opts: &ObserverOptions,
    btf: &HashSet<String>,
) -> Option<&'static str> {
    let enabled = match group {
        Group::Vm => opts.vms,
        // vCPU run-queue delay needs the scheduler programs too.
        Group::Sched => opts.containers || opts.vms,
    };
    if !enabled {
        return Some("not requested (filter)");
    }
    if btf.contains(tp) {
        return None;
    }
    Some(match group {
        Group::Vm => {
            "tracepoint absent from kernel and module BTF (kvm not built in or module not loaded)"
        }
        Group::Sched => "tracepoint absent from kernel BTF",
    })
}

/// The programs to load, and those left out with why; refuses when what
/// is left cannot do what was asked.
fn plan(opts: &ObserverOptions) -> Result<(Vec<&'static str>, Vec<Skipped>)> {
    let (mut wanted, skipped) = plan_by_btf(opts);
    enough_left(opts, &wanted, &skipped)?;
    let calibs: Vec<&'static str> = wanted.iter().filter_map(|w| calib_of(w)).collect();
    if opts.empty {
        wanted = calibs;
    } else if opts.calibrate {
        wanted.extend(calibs);
    }
    Ok((wanted, skipped))
}

/// The empty program on the same hook as `program` (`handle_X` → `calib_X`).
pub fn calib_of(program: &str) -> Option<&'static str> {
    const CALIBS: [&str; 8] = [
        "calib_kvm_exit",
        "calib_kvm_entry",
        "calib_kvm_userspace_exit",
        "calib_kvm_pio",
        "calib_sched_wakeup",
        "calib_sched_wakeup_new",
        "calib_sched_switch",
        "calib_sched_process_exit",
    ];
    let hook = program.strip_prefix("handle_")?;
    CALIBS
        .into_iter()
        .find(|c| c.strip_prefix("calib_") == Some(hook))
}

/// Split the programs into those whose tracepoint BTF knows and the rest.
fn plan_by_btf(opts: &ObserverOptions) -> (Vec<&'static str>, Vec<Skipped>) {
    let available = btf_tracepoints(&opts.btf_dir);
    let mut skipped = Vec::new();
    let mut wanted = Vec::new();
    for (prog, tp, group) in PROGRAMS {
        match skip_reason(group, tp, opts, &available) {
            None => wanted.push(prog),
            Some(why) => skipped.push(Skipped {
                program: prog.into(),
                tracepoint: tp.into(),
                reason: why.into(),
            }),
        }
    }
    (wanted, skipped)
}

/// Refuse when the programs left cannot do what was asked; the refusal
/// names why the missing ones are missing.
fn enough_left(opts: &ObserverOptions, wanted: &[&str], skipped: &[Skipped]) -> Result<()> {
    let why = |prog: &str| {
        skipped
            .iter()
            .find(|s| s.program == prog)
            .map(|s| format!("{}: {}", s.program, s.reason))
    };
    let missing: Vec<String> = ["handle_sched_switch", "handle_sched_wakeup"]
        .iter()
        .filter(|p| !wanted.contains(p))
        .filter_map(|p| why(p))
        .collect();
    if opts.containers && !missing.is_empty() {
        bail!(
            "this kernel lacks the sched_switch/sched_wakeup tracepoints or refused their \
             programs ({}; BTF in {}): container observation is impossible here",
            missing.join("; "),
            opts.btf_dir.display()
        );
    }
    if opts.vms && !opts.containers && !wanted.iter().any(|p| p.contains("kvm")) {
        bail!(
            "no KVM tracepoint is available, or the kernel refused every KVM program (KVM is \
             not built in, no kvm module is loaded); load kvm_intel or kvm_amd, or drop --vm-only"
        );
    }
    Ok(())
}

/// The program libbpf names as the one that failed to load, and one line
/// saying why (the verifier's verdict, never its whole log).
pub fn refused_program(log: &str) -> Option<(String, String)> {
    let mut name = None;
    let mut verdict = None;
    let mut in_log = false;
    for line in log.lines() {
        let line = line.trim().trim_start_matches("libbpf: ");
        if line.contains("-- BEGIN PROG LOAD LOG --") {
            in_log = true;
            continue;
        }
        if line.contains("-- END PROG LOAD LOG --") {
            in_log = false;
            continue;
        }
        if in_log {
            // The verdict is the last line before the statistics.
            let stats = line.starts_with("processed ")
                || line.starts_with("verification time")
                || line.starts_with("stack depth");
            if !line.is_empty() && !stats {
                verdict = Some(line.to_string());
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("prog '") else {
            continue;
        };
        let Some((prog, msg)) = rest.split_once("': ") else {
            continue;
        };
        if name.is_none() && msg.contains("fail") {
            name = Some(prog.to_string());
            verdict.get_or_insert_with(|| msg.to_string());
        }
    }
    let name = name?;
    let verdict = verdict.unwrap_or_default();
    Some((name, verdict.chars().take(200).collect()))
}

/// Load `wanted`; a program the kernel refuses (verifier, missing target,
/// CO-RE relocation) is left out with a one-line note in `skipped` and the
/// rest are loaded again: never all-or-nothing.
fn load_what_loads(
    opts: &ObserverOptions,
    wanted: &mut Vec<&'static str>,
    skipped: &mut Vec<Skipped>,
) -> Result<OverheadSkel<'static>> {
    loop {
        take_libbpf_log();
        let err = match load(wanted, &opts.sizes) {
            Ok(skel) => return Ok(skel),
            Err(e) => e,
        };
        let log = LIBBPF_LOG.lock().map(|l| l.join("\n")).unwrap_or_default();
        let Some((prog, verdict)) = refused_program(&log) else {
            bail!("{err}\nlibbpf said:\n{}", take_libbpf_log());
        };
        let Some(i) = wanted.iter().position(|w| *w == prog) else {
            bail!("{err}\nlibbpf said:\n{}", take_libbpf_log());
        };
        wanted.remove(i);
        let tracepoint = PROGRAMS
            .iter()
            .find(|p| p.0 == prog)
            .map_or("", |p| p.1)
            .to_string();
        skipped.push(Skipped {
            program: prog,
            tracepoint,
            reason: format!("refused by this kernel: {verdict}"),
        });
        enough_left(opts, wanted, skipped)?;
    }
}

/// Open the embedded object, keep only `wanted` and load it into the kernel.
fn load(wanted: &[&str], sizes: &MapSizes) -> Result<OverheadSkel<'static>> {
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
    let m = &mut open.maps;
    let sized = [
        (&mut m.task_state, task_slots()),
        (&mut m.exit_stats, sizes.exits),
        (&mut m.exit_start, sizes.vcpus),
        (&mut m.vcpus, sizes.vcpus),
        (&mut m.cg_stats, sizes.cgroups),
        (&mut m.pairs, sizes.pairs),
    ];
    for (map, n) in sized {
        map.set_max_entries(n)
            .with_context(|| format!("cannot size map {:?} to {n}", map.name()))?;
    }
    open.load()
        .map_err(|e| anyhow::anyhow!("the kernel refused to load the BPF programs: {e}"))
}

/// The BPF side's `epoch` and `switch_state_source`, in the program's
/// memory-mapped .bss.
fn mapped_globals(
    skel: &mut OverheadSkel<'static>,
) -> Result<(&'static AtomicU64, &'static AtomicU32)> {
    let Some(bss) = skel.maps.bss_data.take() else {
        bail!(
            "the kernel did not let the BPF program's globals be memory-mapped \
             (BPF_F_MMAPABLE, Linux 5.5+); overhead cannot run here"
        );
    };
    // SAFETY: the u64 is 8-byte aligned in a page that stays mapped while
    // the skeleton (moved into the Observer beside this reference) lives;
    // the kernel side only reads it, and all our accesses are atomic.
    Ok(unsafe {
        (
            AtomicU64::from_ptr(&mut bss.epoch),
            AtomicU32::from_ptr(&mut bss.switch_state_source),
        )
    })
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
        let (mut wanted, mut skipped) = plan(opts)?;
        let mut skel = load_what_loads(opts, &mut wanted, &mut skipped)?;
        let (epoch, switch_state) = mapped_globals(&mut skel)?;
        let mut obs = Observer {
            skel,
            epoch,
            switch_state,
            links: Vec::new(),
            attached: Vec::new(),
            skipped,
            cpu_floor: Mutex::default(),
            cgroup_fs: crate::dead_cgroups::CgroupFs::open(),
            forgotten: Mutex::default(),
        };
        for name in wanted {
            obs.attach(name)?;
        }
        Ok(obs)
    }

    fn attach(&mut self, name: &str) -> Result<()> {
        let prog = self
            .skel
            .object_mut()
            .progs_mut()
            .find(|p| p.name() == name)
            .with_context(|| format!("program {name} missing from the BPF object"))?;
        match prog.attach() {
            Ok(l) => {
                self.links.push(l);
                self.attached.push(name.to_string());
                Ok(())
            }
            Err(e) => bail!(
                "cannot attach {name}: {e}; nothing is left attached\nlibbpf said:\n{}",
                take_libbpf_log()
            ),
        }
    }

    /// Where sched_switch took prev's state from: 1 the tracepoint's fourth
    /// argument (Linux 5.18+), 2 the task (older kernels), 0 not run yet.
    pub fn switch_state_source(&self) -> u32 {
        self.switch_state.load(Ordering::Relaxed)
    }

    /// Kernel memory taken by the observer's maps, as the kernel reports it
    /// (fdinfo memlock), summed.
    pub fn map_memory_bytes(&self) -> u64 {
        self.map_memory().iter().map(|(_, n)| n).sum()
    }

    /// Each map's kernel memory, as the kernel reports it.
    pub fn map_memory(&self) -> Vec<(String, u64)> {
        use libbpf_rs::MapCore;
        use std::os::fd::{AsFd, AsRawFd};
        self.skel
            .object()
            .maps()
            .filter_map(|m| {
                let n = crate::memory::fd_memlock(m.as_fd().as_raw_fd())?;
                Some((m.name().to_string_lossy().into_owned(), n))
            })
            .collect()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libbpf's log of Debian 13's refusal of the unchecked kvm_exit
    /// program: the program and the verifier's verdict, one line.
    #[test]
    fn a_refused_program_is_named_with_the_verdict_alone() {
        let log = "libbpf: prog 'handle_kvm_exit': BPF program load failed: Permission denied
libbpf: prog 'handle_kvm_exit': -- BEGIN PROG LOAD LOG --
0: R1=ctx() R10=fp0
1: R1=ctx() R6_w=trusted_ptr_or_null_kvm_vcpu(id=1)
17: (bf) r3 = r6                      ; R3_w=trusted_ptr_or_null_kvm_vcpu(id=1)
R3 pointer arithmetic on trusted_ptr_or_null_ prohibited, null-check it first
processed 18 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 1
-- END PROG LOAD LOG --
libbpf: prog 'handle_kvm_exit': failed to load: -13
libbpf: failed to load object 'overhead_bpf'";
        let (prog, why) = refused_program(log).unwrap();
        assert_eq!(prog, "handle_kvm_exit");
        assert_eq!(
            why,
            "R3 pointer arithmetic on trusted_ptr_or_null_ prohibited, null-check it first"
        );
        // No verifier log (a missing attach target): libbpf's own line.
        let log = "libbpf: prog 'handle_sched_switch': failed to find kernel BTF type ID of 'sched_switch': -3
libbpf: prog 'handle_sched_switch': failed to prepare load attributes: -3";
        let (prog, why) = refused_program(log).unwrap();
        assert_eq!(prog, "handle_sched_switch");
        assert!(
            why.starts_with("failed to find kernel BTF type ID"),
            "{why}"
        );
        assert_eq!(refused_program("libbpf: map 'x': created"), None);
        assert_eq!(refused_program(""), None);
    }
}
