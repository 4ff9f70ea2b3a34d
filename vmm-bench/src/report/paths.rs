//! Running each path the report compares and turning its runs into rows:
//! a native process, our container launcher (with and without a network
//! namespace), runc, the unikernel on our VMM, QEMU booting the unikernel
//! and the Debian kernel, and the density and size figures.

use super::row::{Clock, Group, Row, Unit, median};
use super::{Findings, ReportOpts};
use crate::container::{self, ContainerOpts};
use crate::qemu::{self, LinuxImage, field_u64};
use crate::vm::boot::{self, UNIKERNEL, UnikernelReport, UnikernelRun};
use crate::vm::probe::{Accel, Probe};
use crate::{native, vm};
use anyhow::{Context, Result};
use livehost_common::progress::Progress;
use std::time::{Duration, Instant};

/// What every path needs to know about the pass.
pub(super) struct Ctx<'a> {
    pub opts: &'a ReportOpts,
    /// The workload's arguments (`kib=`, `loops=`).
    pub args: Vec<String>,
    /// Runs per path.
    pub n: usize,
    pub pr: &'a Progress,
    pub probe: &'a Probe,
    pub cpus: usize,
    /// Host TSC rate, to turn QEMU guests' cycle counts into time.
    pub tsc_khz: f64,
}

impl Ctx<'_> {
    /// The span each density figure launches instances for.
    fn density_span(&self) -> Duration {
        if self.opts.quick {
            Duration::from_millis(800)
        } else {
            Duration::from_secs(3)
        }
    }

    /// Null-operation loop time in ns per iteration.
    fn per_loop(&self, total_ns: f64) -> f64 {
        total_ns / self.opts.loops as f64
    }
}

/// Every path in the report's order; returns the VMM-vs-bare comparison
/// when it ran.
pub(super) fn run_all(c: &Ctx, f: &mut Findings) -> Option<boot::ExitCompare> {
    c.pr.step("process paths, round-robin: native, containers, runc");
    let (native_workload_ns, rootfs_bytes) = process_paths(c, f);
    c.pr.step("unikernel on our KVM VMM");
    let exit_compare = our_vmm(c, f);
    c.pr.step("density: VMs and containers per second, alternated");
    densities(c, f);
    // The Linux VM image is sized whether or not it is booted (--no-linux),
    // so the image-size claim never depends on the boot succeeding.
    c.pr.step("sizing the Debian kernel + initramfs");
    let linux_img = linux_image_size(f);
    qemu_paths(c, f, linux_img);
    sizes_and_ratios(f, rootfs_bytes, native_workload_ns);
    exit_compare
}

/// `n` runs of `run` after one discarded warm-up run, or the first error.
fn repeat<T>(n: usize, mut run: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    run()?;
    (0..n).map(|_| run()).collect()
}

/// A figure the workload printed (`key=N` on its result line) in every
/// run, scaled by `scale`; NaN where a run did not print it.
fn printed(lines: &[&str], key: &str, scale: impl Fn(f64) -> f64) -> Vec<f64> {
    lines
        .iter()
        .map(|l| field_u64(l, key).map_or(f64::NAN, |v| scale(v as f64)))
        .collect()
}

/// One run of a process path, as the report reads it.
struct ProcRun {
    stdout: String,
    /// CLOCK_MONOTONIC when the launch began (the workload prints its own
    /// first instruction's time on the same clock).
    launch_mono_ns: u64,
    total_us: f64,
    settings: Option<container::Settings>,
}

/// A process path: its name, the name of its start-to-exit row, how many
/// runs it gets, and how to run it once.
struct ProcPath<'a> {
    name: &'static str,
    exit_metric: &'static str,
    max_runs: usize,
    /// Rows beyond start-up (compute, round trip, memory).
    full: bool,
    run: Box<dyn FnMut() -> Result<ProcRun> + 'a>,
    runs: Vec<ProcRun>,
    error: Option<anyhow::Error>,
}

impl<'a> ProcPath<'a> {
    fn new(
        name: &'static str,
        exit_metric: &'static str,
        max_runs: usize,
        run: impl FnMut() -> Result<ProcRun> + 'a,
    ) -> ProcPath<'a> {
        ProcPath {
            name,
            exit_metric,
            max_runs,
            full: true,
            run: Box::new(run),
            runs: vec![],
            error: None,
        }
    }
}

fn container_path<'a>(name: &'static str, opts: ContainerOpts) -> ProcPath<'a> {
    ProcPath::new(name, "launch to exit", usize::MAX, move || {
        let r = container::run(&opts)?;
        Ok(ProcRun {
            stdout: r.stdout,
            launch_mono_ns: r.launch_mono_ns,
            total_us: r.total_us,
            settings: Some(r.settings),
        })
    })
}

/// The process paths this host can run: native; our container, the
/// namespaced process and the container with a network namespace (root);
/// runc (root, installed). Returns runc's bundle size too.
fn process_path_list<'a>(
    c: &'a Ctx,
    f: &mut Findings,
    bundle: &'a mut Option<container::Bundle>,
) -> Vec<ProcPath<'a>> {
    let mut paths = vec![ProcPath::new(
        "native process",
        "spawn to exit",
        usize::MAX,
        || {
            let r = native::run(&c.args, Duration::from_secs(30))?;
            Ok(ProcRun {
                stdout: r.stdout,
                launch_mono_ns: r.launch_mono_ns,
                total_us: r.total_us,
                settings: None,
            })
        },
    )];
    if !livehost_common::is_root() {
        f.skip("container", "needs root");
        f.skip("runc", "needs root");
        return paths;
    }
    let copts = ContainerOpts {
        args: c.args.clone(),
        ..Default::default()
    };
    paths.push(container_path("container", copts.clone()));
    paths.push(container_path(
        "namespaced process (shared host filesystem)",
        ContainerOpts {
            mode: container::Mode::NamespacedProcess,
            ..copts.clone()
        },
    ));
    let mut netns = container_path("container + netns", ContainerOpts { net: true, ..copts });
    netns.full = false;
    paths.push(netns);
    let Some(runc) = container::find_runc() else {
        f.skip(
            "runc",
            "runc is not installed (Debian: apt-get install runc)",
        );
        return paths;
    };
    match container::make_bundle(&c.args) {
        Ok(b) => *bundle = Some(b),
        Err(e) => {
            f.skip("runc", e);
            return paths;
        }
    }
    let b = bundle.as_ref();
    paths.push(ProcPath::new(
        "runc",
        "runc run to exit",
        c.n.min(10),
        move || {
            let b = b.context("no bundle")?;
            let r = container::run_runc(&runc, b, Duration::from_secs(20))?;
            Ok(ProcRun {
                stdout: r.stdout,
                launch_mono_ns: r.launch_mono_ns,
                total_us: r.total_us,
                settings: Some(container::Settings::runc()),
            })
        },
    ));
    paths
}

/// Run every process path round-robin (one run of each in turn, so drift
/// on a shared host falls on all alike), the first round a discarded
/// warm-up; then their rows. Returns native's median workload time (ns)
/// and runc's rootfs size.
fn process_paths(c: &Ctx, f: &mut Findings) -> (Option<f64>, Option<u64>) {
    let mut bundle = None;
    let mut paths = process_path_list(c, f, &mut bundle);
    for round in 0..=c.n {
        for p in paths.iter_mut() {
            if p.error.is_some() || p.runs.len() >= p.max_runs {
                continue;
            }
            match (p.run)() {
                Ok(r) if round > 0 => p.runs.push(r),
                Ok(_) => {}
                Err(e) => p.error = Some(e),
            }
        }
    }
    let mut native_ns = None;
    for p in paths {
        if let Some(e) = p.error {
            f.skip(p.name, e);
            continue;
        }
        let w = proc_rows(c, f, &p);
        if p.name == "native process" {
            native_ns = Some(median(w));
        }
    }
    (native_ns, bundle.map(|b| b.rootfs_bytes))
}

/// A process path's rows; returns its workload times (ns).
fn proc_rows(c: &Ctx, f: &mut Findings, p: &ProcPath) -> Vec<f64> {
    let out: Vec<&str> = p.runs.iter().map(|r| r.stdout.as_str()).collect();
    f.check(p.name, out.iter().map(|l| field_u64(l, "checksum")));
    if let Some(s) = p.runs.first().and_then(|r| r.settings.clone()) {
        f.settings.push(super::PathSettings {
            path: p.name.into(),
            settings: s,
        });
    }
    let exec: Vec<f64> = p
        .runs
        .iter()
        .map(|r| match field_u64(&r.stdout, "mono_start_ns") {
            Some(t) if t >= r.launch_mono_ns => (t - r.launch_mono_ns) as f64 / 1e3,
            _ => f64::NAN,
        })
        .collect();
    let total: Vec<f64> = p.runs.iter().map(|r| r.total_us).collect();
    let mut rows = f.path(p.name, Accel::Native);
    rows.host(
        Group::Start,
        "launch to exec (the workload's first instruction)",
        &exec,
        Unit::Us,
    )
    .host(Group::Start, p.exit_metric, &total, Unit::Us);
    if !p.full {
        return vec![];
    }
    let w = printed(&out, "workload_ns", |v| v);
    rows.host(
        Group::Compute,
        "workload time",
        &w.iter().map(|v| v / 1e3).collect::<Vec<_>>(),
        Unit::Us,
    )
    .host(
        Group::Roundtrip,
        "null syscall (getppid)",
        &printed(&out, "syscall_loop_ns", |v| c.per_loop(v)),
        Unit::Ns,
    )
    .host(
        Group::Memory,
        "peak RSS (the workload's own VmHWM)",
        &printed(&out, "vmhwm_kib", |v| v),
        Unit::KiB,
    );
    w
}

/// The unikernel on our VMM and the exit-loop comparison, where the probe
/// found a KVM that runs guests.
fn our_vmm(c: &Ctx, f: &mut Findings) -> Option<boot::ExitCompare> {
    let p = "unikernel on our VMM";
    let (accel, kvm) = match (c.probe.accel, vm::Kvm::open()) {
        (Some(accel), Ok(kvm)) => (accel, kvm),
        (_, Err(e)) => {
            f.skip(p, e);
            return None;
        }
        (None, Ok(_)) => {
            f.skip(p, c.probe.long_mode.clone().unwrap_or_default());
            return None;
        }
    };
    unikernel_on_vmm(c, f, &kvm, accel);
    c.pr.step("exit round trip: our VMM vs bare KVM_RUN");
    exit_loops(c, f, &kvm, accel)
}

/// One figure of a unikernel run: its row, and how to read it from a run.
type Figure = (
    Group,
    &'static str,
    fn(&UnikernelReport) -> Option<f64>,
    Clock,
    Unit,
);

/// The unikernel's figures, in the report's order: the start-up phases
/// (host clock), then what the guest timed with its TSC.
#[rustfmt::skip]
const UNIKERNEL_FIGURES: [Figure; 12] = [
    (Group::Start, "KVM_CREATE_VM", |r| Some(r.phases.create_vm_us), Clock::Host, Unit::Us),
    (Group::Start, "guest RAM map + register", |r| Some(r.phases.memory_us), Clock::Host, Unit::Us),
    (Group::Start, "image load", |r| Some(r.phases.load_us), Clock::Host, Unit::Us),
    (Group::Start, "vCPU create + set up", |r| Some(r.phases.vcpu_us), Clock::Host, Unit::Us),
    (Group::Start, "create to first exit", |r| Some(r.first_exit_us), Clock::Host, Unit::Us),
    (Group::Start, "launch to boot timer", |r| Some(r.boot_timer_us), Clock::Host, Unit::Us),
    (Group::Start, "guest boot (entry to boot timer)", |r| r.guest_boot_us, Clock::Guest, Unit::Us),
    // Mostly the workload under this accelerator: compute, not start-up.
    (Group::Compute, "launch to exit (boot + workload + loops)", |r| Some(r.total_us), Clock::Host, Unit::Us),
    (Group::Compute, "workload time", |r| r.guest_workload_us, Clock::Guest, Unit::Us),
    (Group::Roundtrip, "port-I/O exit to our VMM", |r| r.guest_port_exit_ns, Clock::Guest, Unit::Ns),
    (Group::Roundtrip, "cpuid (exit handled in KVM)", |r| r.guest_cpuid_ns, Clock::Guest, Unit::Ns),
    (Group::Roundtrip, "in-ring-0 call", |r| r.guest_call_ns, Clock::Guest, Unit::Ns),
];

/// Guest-timed round trips are left out under an emulating KVM: there
/// every guest instruction goes through the emulator, so the guest's loops
/// time the emulator (its in-ring-0 call loop is slower than its port-I/O
/// exit loop), not exits. The host-side exit-loop rows still measure them.
fn emulated_guest_loop(accel: Accel, group: Group, clock: Clock) -> bool {
    accel == Accel::NestedEmulatingKvm && group == Group::Roundtrip && clock == Clock::Guest
}

fn unikernel_on_vmm(c: &Ctx, f: &mut Findings, kvm: &vm::Kvm, accel: Accel) {
    let p = "unikernel on our VMM";
    let cfg = UnikernelRun {
        kib: c.opts.kib,
        loop_n: c.opts.loops,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let runs = match repeat(c.n, || boot::run_unikernel(kvm, &cfg)) {
        Ok(runs) => runs,
        Err(e) => return f.skip(p, e),
    };
    f.check(p, runs.iter().map(|r| Some(r.checksum)));
    if accel == Accel::NestedEmulatingKvm {
        f.skip(
            "unikernel on our VMM: guest-timed round trips",
            "under an emulating KVM the guest's loops time the emulator, not exits (its in-ring-0 call loop is slower than its port-I/O exit loop); see the host-side exit-loop rows",
        );
    }
    let mut rows = f.path(p, accel);
    for (group, metric, figure, clock, unit) in UNIKERNEL_FIGURES {
        if emulated_guest_loop(accel, group, clock) {
            continue;
        }
        let v: Vec<f64> = runs.iter().map(|r| figure(r).unwrap_or(f64::NAN)).collect();
        rows.add(group, metric, &v, unit, clock);
    }
    if let Some(kib) = fresh_vmm_overhead_kib(c.opts.kib) {
        rows.host(
            Group::Memory,
            "VMM process RSS beyond resident guest RAM (fresh `vmm-bench run vm`)",
            &[kib],
            Unit::KiB,
        );
    }
    let v: Vec<f64> = runs
        .iter()
        .map(|r| r.vmm_overhead_bytes.map_or(f64::NAN, |b| b as f64 / 1024.0))
        .collect();
    rows.host(
        Group::Memory,
        "vmm-bench process RSS beyond resident guest RAM (includes the report's own heap: an upper bound)",
        &v,
        Unit::KiB,
    );
}

/// Our VMM's exit loop against a bare KVM_RUN loop, alternating.
fn exit_loops(c: &Ctx, f: &mut Findings, kvm: &vm::Kvm, accel: Accel) -> Option<boot::ExitCompare> {
    let (exits, samples) = if c.opts.quick { (1000, 9) } else { (3000, 21) };
    match boot::compare_exit_loops(kvm, exits, samples) {
        Ok(x) => {
            f.path("our VMM (host side)", accel).host(
                Group::Roundtrip,
                "port-I/O exit, full exit loop",
                &x.vmm_samples,
                Unit::Ns,
            );
            f.path("bare KVM_RUN loop", accel).host(
                Group::Roundtrip,
                "port-I/O exit, bare loop",
                &x.bare_samples,
                Unit::Ns,
            );
            Some(x)
        }
        Err(e) => {
            f.skip("exit compare", e);
            None
        }
    }
}

/// VMs (hello guest on our VMM) and containers per second, alternated
/// over two rounds of half the span each; when their order flips between
/// the rounds, the report says so.
fn densities(c: &Ctx, f: &mut Findings) {
    let span = c.density_span() / 2;
    let kvm = c.probe.accel.zip(vm::Kvm::open().ok());
    let quiet = ContainerOpts {
        args: vec!["kib=4".into(), "loops=1".into()],
        ..Default::default()
    };
    let (mut vms, mut ctrs) = (vec![], vec![]);
    let mut errors = vec![];
    for _ in 0..2 {
        if let Some((_, k)) = &kvm {
            let vm_once = || {
                boot::run_raw(
                    k,
                    vm::Mode::Long,
                    boot::code::LONG_HELLO,
                    Duration::from_secs(5),
                )
                .and_then(|(r, _, _)| r.map(|_| ()).map_err(Into::into))
            };
            match density(c.cpus, span, vm_once) {
                Ok(v) => vms.push(v),
                Err(e) => errors.push(("VM density", e)),
            }
        }
        if livehost_common::is_root() {
            match density(c.cpus, span, || container::run(&quiet).map(|_| ())) {
                Ok(v) => ctrs.push(v),
                Err(e) => errors.push(("container density", e)),
            }
        }
    }
    for (p, e) in errors {
        f.skip(p, e);
    }
    if let Some((accel, _)) = kvm {
        f.path("VM on our VMM (hello guest)", accel).host(
            Group::Density,
            "instances/s, all cores",
            &vms,
            Unit::PerSecond,
        );
    }
    f.path("container", Accel::Native).host(
        Group::Density,
        "instances/s, all cores",
        &ctrs,
        Unit::PerSecond,
    );
    if let ([v0, v1], [c0, c1]) = (&vms[..], &ctrs[..])
        && (v0 > c0) != (v1 > c1)
    {
        f.skip(
            "density order",
            format!("VMs vs containers per second flipped between the two rounds ({v0:.0} vs {c0:.0}, then {v1:.0} vs {c1:.0}): read them as equal within this host's noise"),
        );
    }
}

fn linux_image_size(f: &mut Findings) -> Result<LinuxImage> {
    match qemu::linux_image() {
        Ok(img) => {
            f.path("Linux VM image", Accel::Native).host(
                Group::Size,
                "kernel + initramfs",
                &[(img.bzimage_bytes + img.initramfs_bytes) as f64 / 1024.0],
                Unit::KiB,
            );
            Ok(img)
        }
        Err(e) => {
            f.skip("Linux VM image", &e);
            Err(e)
        }
    }
}

/// The unikernel and the Debian kernel under QEMU, where QEMU is installed.
fn qemu_paths(c: &Ctx, f: &mut Findings, linux_img: Result<LinuxImage>) {
    let qaccel = qemu::choose_accel(c.probe.accel);
    if !qemu::qemu_available() {
        f.skip(
            "QEMU",
            "qemu-system-x86_64 not installed (Debian: qemu-system-x86)",
        );
        return;
    }
    c.pr.step("unikernel under QEMU (PVH)");
    qemu_unikernel(c, f, qaccel);
    if c.opts.no_linux {
        f.skip("QEMU + Linux", "--no-linux given");
        return;
    }
    c.pr.step("Debian kernel under QEMU with the workload as init");
    // Each boot is a fresh QEMU: no warm-up to discard; 1 boot in quick
    // mode (3 s each under TCG), 3 otherwise.
    let boots = if c.opts.quick { 1 } else { 3 };
    let run = linux_img
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|img| {
            (0..boots)
                .map(|_| {
                    qemu::run_linux(
                        &img,
                        c.opts.kib,
                        c.opts.loops,
                        Duration::from_secs(120),
                        qaccel,
                    )
                })
                .collect::<Result<Vec<_>>>()
        });
    match run {
        Ok(r) => qemu_linux_rows(c, f, &r, qaccel),
        Err(e) => f.skip("Linux under QEMU", e),
    }
}

fn qemu_unikernel(c: &Ctx, f: &mut Findings, qaccel: Accel) {
    let p = "unikernel under QEMU (PVH)";
    let qn = if c.opts.quick { 2 } else { 5 };
    let o = c.opts;
    let runs = match repeat(qn, || {
        qemu::run_unikernel(UNIKERNEL, o.kib, o.loops, Duration::from_secs(30), qaccel)
    }) {
        Ok(runs) => runs,
        Err(e) => return f.skip(p, e),
    };
    f.check(p, runs.iter().map(|r| field_u64(&r.line, "checksum")));
    // Guest cycles to us: QEMU's guest TSC follows the host's.
    let cyc = |l: &str, k: &str| field_u64(l, k).map(|v| v as f64 / c.tsc_khz * 1e3);
    let m = |g: &dyn Fn(&str) -> Option<f64>| -> Vec<f64> {
        runs.iter()
            .map(|r| g(&r.line).unwrap_or(f64::NAN))
            .collect()
    };
    f.path(p, qaccel)
        .host(
            Group::Start,
            "launch to result line",
            &runs.iter().map(|r| r.to_result_us).collect::<Vec<_>>(),
            Unit::Us,
        )
        .guest(
            Group::Start,
            "guest boot (entry to boot timer)",
            &m(&|l| Some(cyc(l, "ready_tsc")? - cyc(l, "entry_tsc")?)),
            Unit::Us,
        )
        .guest(
            Group::Compute,
            "workload time",
            &m(&|l| cyc(l, "workload_cyc")),
            Unit::Us,
        )
        .guest(
            Group::Roundtrip,
            "port-I/O exit (QEMU device)",
            &m(&|l| cyc(l, "port_cyc").map(|us| us * 1e3 / o.loops as f64)),
            Unit::Ns,
        )
        .guest(
            Group::Roundtrip,
            "in-ring-0 call",
            &m(&|l| cyc(l, "call_cyc").map(|us| us * 1e3 / o.loops as f64)),
            Unit::Ns,
        )
        .host(
            Group::Memory,
            &qemu_rss_metric(runs[0].guest_ram_bytes),
            &runs
                .iter()
                .map(|r| r.max_rss_bytes as f64 / 1024.0)
                .collect::<Vec<_>>(),
            Unit::KiB,
        );
}

fn qemu_rss_metric(guest_ram_bytes: u64) -> String {
    format!(
        "QEMU peak RSS (guest RAM {} MiB, partly touched)",
        guest_ram_bytes >> 20
    )
}

fn qemu_linux_rows(c: &Ctx, f: &mut Findings, runs: &[qemu::QemuRun], qaccel: Accel) {
    let p = "Linux under QEMU";
    f.check(p, runs.iter().map(|r| field_u64(&r.line, "checksum")));
    let field = |k, scale: &dyn Fn(f64) -> f64| -> Vec<f64> {
        runs.iter()
            .map(|r| field_u64(&r.line, k).map_or(f64::NAN, |v| scale(v as f64)))
            .collect()
    };
    f.path(p, qaccel)
        .host(
            Group::Start,
            "launch to result line",
            &runs.iter().map(|r| r.to_result_us).collect::<Vec<_>>(),
            Unit::Us,
        )
        .guest(
            Group::Start,
            "guest boot (kernel start to init)",
            &field("boottime_start_ns", &|v| v / 1e3),
            Unit::Us,
        )
        .guest(
            Group::Compute,
            "workload time",
            &field("workload_ns", &|v| v / 1e3),
            Unit::Us,
        )
        .guest(
            Group::Roundtrip,
            "null syscall (getppid)",
            &field("syscall_loop_ns", &|v| c.per_loop(v)),
            Unit::Ns,
        )
        .host(
            Group::Memory,
            &qemu_rss_metric(runs[0].guest_ram_bytes),
            &runs
                .iter()
                .map(|r| r.max_rss_bytes as f64 / 1024.0)
                .collect::<Vec<_>>(),
            Unit::KiB,
        );
}

/// Image sizes, and each compute row's throughput relative to native.
fn sizes_and_ratios(f: &mut Findings, rootfs_bytes: Option<u64>, native_workload_ns: Option<f64>) {
    f.path("unikernel", Accel::Native).host(
        Group::Size,
        "image (ELF)",
        &[UNIKERNEL.len() as f64 / 1024.0],
        Unit::KiB,
    );
    if let Some(r) = rootfs_bytes {
        f.path("runc bundle", Accel::Native).host(
            Group::Size,
            "rootfs (busybox + workload)",
            &[r as f64 / 1024.0],
            Unit::KiB,
        );
    }
    if let Some(nw) = native_workload_ns {
        let comp: Vec<Row> = f
            .rows
            .iter()
            .filter(|r| {
                r.group == Group::Compute
                    && r.metric == "workload time"
                    && r.path != "native process"
            })
            .cloned()
            .collect();
        for r in comp {
            // Per run: native's median over this run's time.
            f.rows
                .push(r.map("throughput relative to native", Unit::Times, |v| {
                    nw / 1e3 / v
                }));
        }
    }
}

/// Our VMM's own memory, measured in a fresh `vmm-bench run vm` process so
/// the report's heap does not count: RSS minus resident guest RAM.
fn fresh_vmm_overhead_kib(kib: u64) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    if exe.file_name()? != "vmm-bench" {
        return None;
    }
    let out = std::process::Command::new(exe)
        .args(["run", "vm", "--kib", &kib.to_string()])
        .args(["--loops", "10", "--timeout", "30", "--json"])
        .output()
        .ok()?;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    j["vmm_overhead_bytes"].as_u64().map(|b| b as f64 / 1024.0)
}

/// Instances completed per second with one launcher thread per CPU.
fn density(cpus: usize, span: Duration, f: impl Fn() -> Result<()> + Sync) -> Result<f64> {
    let t = Instant::now();
    let counts: Vec<Result<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cpus.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut c = 0;
                    while t.elapsed() < span {
                        f()?;
                        c += 1;
                    }
                    Ok(c)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("launcher thread panicked")))
            })
            .collect()
    });
    let total: u64 = counts.into_iter().collect::<Result<Vec<_>>>()?.iter().sum();
    Ok(total as f64 / t.elapsed().as_secs_f64())
}
