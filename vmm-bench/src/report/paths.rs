//! Running each path the report compares and turning its runs into rows:
//! a native process, our container launcher (with and without a network
//! namespace), runc, the unikernel on our VMM, QEMU booting the unikernel
//! and the Debian kernel, and the density and size figures.

use super::row::{Clock, Group, PathRows, Row, Unit, median};
use super::{Findings, ReportOpts};
use crate::container::{self, ContainerOpts};
use crate::qemu::{self, LinuxImage, field_u64};
use crate::vm::boot::{self, UNIKERNEL, UnikernelReport, UnikernelRun};
use crate::vm::probe::{Accel, Probe};
use crate::{native, vm};
use anyhow::Result;
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
    c.pr.step("native process");
    let native_workload_ns = native_process(c, f);
    c.pr.step("container (own launcher)");
    if !livehost_common::is_root() {
        f.skip("container", "needs root");
    } else {
        our_container(c, f);
    }
    c.pr.step("runc");
    let rootfs_bytes = runc(c, f);
    c.pr.step("unikernel on our KVM VMM");
    let exit_compare = our_vmm(c, f);
    if livehost_common::is_root() {
        c.pr.step("density: containers per second");
        container_density(c, f);
    }
    // The Linux VM image is sized whether or not it is booted (--no-linux),
    // so the image-size claim never depends on the boot succeeding.
    c.pr.step("sizing the Debian kernel + initramfs");
    let linux_img = linux_image_size(f);
    qemu_paths(c, f, linux_img);
    sizes_and_ratios(f, rootfs_bytes, native_workload_ns);
    exit_compare
}

/// `n` runs of `run`, or the first error.
fn repeat<T>(n: usize, mut run: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    (0..n).map(|_| run()).collect()
}

/// The median of a figure the workload printed (`key=N` on its result
/// line), scaled by `scale`.
fn printed(lines: &[&str], key: &str, scale: impl Fn(f64) -> f64) -> f64 {
    median(
        lines
            .iter()
            .filter_map(|l| field_u64(l, key))
            .map(|v| scale(v as f64))
            .collect(),
    )
}

/// The rows every process path shares, after its start-up rows: the
/// workload's own timings from its result lines, and the first run's peak
/// RSS.
fn workload_rows(rows: &mut PathRows, c: &Ctx, out: &[&str], peak_rss_bytes: u64) {
    rows.host(
        Group::Compute,
        "workload time",
        printed(out, "workload_ns", |v| v / 1e3),
        Unit::Us,
    )
    .host(
        Group::Roundtrip,
        "null syscall (getppid)",
        printed(out, "syscall_loop_ns", |v| c.per_loop(v)),
        Unit::Ns,
    )
    .runs(1)
    .host(
        Group::Memory,
        "peak RSS",
        peak_rss_bytes as f64 / 1024.0,
        Unit::KiB,
    );
}

/// The native baseline; returns its median workload time (ns).
fn native_process(c: &Ctx, f: &mut Findings) -> Option<f64> {
    let p = "native process";
    match repeat(c.n, || native::run(&c.args, Duration::from_secs(30))) {
        Ok(runs) => {
            f.check(p, field_u64(&runs[0].stdout, "checksum"));
            let out: Vec<&str> = runs.iter().map(|r| r.stdout.as_str()).collect();
            let w = printed(&out, "workload_ns", |v| v);
            let mut rows = f.path(p, Accel::Native, c.n);
            rows.host(
                Group::Start,
                "spawn to exit",
                median(runs.iter().map(|r| r.total_us).collect()),
                Unit::Us,
            );
            workload_rows(&mut rows, c, &out, runs[0].max_rss_bytes);
            Some(w)
        }
        Err(e) => {
            f.skip(p, e);
            None
        }
    }
}

/// Our launcher, then again with a network namespace.
fn our_container(c: &Ctx, f: &mut Findings) {
    let copts = ContainerOpts {
        args: c.args.clone(),
        ..Default::default()
    };
    match repeat(c.n, || container::run(&copts)) {
        Ok(runs) => {
            f.check("container", field_u64(&runs[0].stdout, "checksum"));
            let out: Vec<&str> = runs.iter().map(|r| r.stdout.as_str()).collect();
            let med = |g: fn(&container::ContainerRun) -> f64| median(runs.iter().map(g).collect());
            let mut rows = f.path("container", Accel::Native, c.n);
            rows.host(
                Group::Start,
                "launch to exec (ns + cgroup set up)",
                med(|r| r.setup_us),
                Unit::Us,
            )
            .host(
                Group::Start,
                "launch to exit",
                med(|r| r.total_us),
                Unit::Us,
            );
            workload_rows(&mut rows, c, &out, runs[0].max_rss_bytes);
        }
        Err(e) => f.skip("container", e),
    }
    let net = ContainerOpts { net: true, ..copts };
    match repeat(c.n, || container::run(&net)) {
        Ok(runs) => {
            f.path("container + netns", Accel::Native, c.n).host(
                Group::Start,
                "launch to exit",
                median(runs.iter().map(|r| r.total_us).collect()),
                Unit::Us,
            );
        }
        Err(e) => f.skip("container + netns", e),
    }
}

/// runc with the generated bundle; returns the bundle's rootfs size.
fn runc(c: &Ctx, f: &mut Findings) -> Option<u64> {
    let runc = match container::find_runc() {
        None => {
            f.skip(
                "runc",
                "runc is not installed (Debian: apt-get install runc)",
            );
            return None;
        }
        Some(_) if !livehost_common::is_root() => {
            f.skip("runc", "needs root");
            return None;
        }
        Some(r) => r,
    };
    let mut rootfs_bytes = None;
    let runs = container::make_bundle(&c.args).and_then(|bundle| {
        rootfs_bytes = Some(bundle.rootfs_bytes);
        repeat(c.n.min(10), || {
            container::run_runc(&runc, &bundle, Duration::from_secs(20))
        })
    });
    match runs {
        Ok(runs) => {
            f.check("runc", field_u64(&runs[0].stdout, "checksum"));
            f.path("runc", Accel::Native, runs.len())
                .host(
                    Group::Start,
                    "runc run to exit",
                    median(runs.iter().map(|r| r.total_us).collect()),
                    Unit::Us,
                )
                .runs(1)
                .host(
                    Group::Memory,
                    "peak RSS (runc + container)",
                    runs[0].max_rss_bytes as f64 / 1024.0,
                    Unit::KiB,
                );
        }
        Err(e) => f.skip("runc", e),
    }
    rootfs_bytes
}

/// The unikernel on our VMM, the exit-loop comparison and VM density,
/// where the probe found a KVM that runs guests.
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
    let exit_compare = exit_loops(c, f, &kvm, accel);
    c.pr.step("density: VMs per second");
    let d = density(c.cpus, c.density_span(), || {
        boot::run_raw(
            &kvm,
            vm::Mode::Long,
            boot::code::LONG_HELLO,
            Duration::from_secs(5),
        )
        .and_then(|(r, _, _)| r.map(|_| ()).map_err(Into::into))
    });
    match d {
        Ok(v) => {
            f.path("VM on our VMM (hello guest)", accel, 1).host(
                Group::Density,
                "instances/s, all cores",
                v,
                Unit::PerSecond,
            );
        }
        Err(e) => f.skip("VM density", e),
    }
    exit_compare
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
    (Group::Start, "launch to exit", |r| Some(r.total_us), Clock::Host, Unit::Us),
    (Group::Compute, "workload time", |r| r.guest_workload_us, Clock::Guest, Unit::Us),
    (Group::Roundtrip, "port-I/O exit to our VMM", |r| r.guest_port_exit_ns, Clock::Guest, Unit::Ns),
    (Group::Roundtrip, "cpuid (exit handled in KVM)", |r| r.guest_cpuid_ns, Clock::Guest, Unit::Ns),
    (Group::Roundtrip, "in-ring-0 call", |r| r.guest_call_ns, Clock::Guest, Unit::Ns),
];

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
    f.check(p, Some(runs[0].checksum));
    let mut rows = f.path(p, accel, c.n);
    for (group, metric, figure, clock, unit) in UNIKERNEL_FIGURES {
        rows.add(
            group,
            metric,
            median(runs.iter().filter_map(figure).collect()),
            unit,
            clock,
        );
    }
    if let Some(kib) = fresh_vmm_overhead_kib(c.opts.kib) {
        rows.runs(1).host(
            Group::Memory,
            "VMM process RSS beyond resident guest RAM (fresh `vmm-bench run vm`)",
            kib,
            Unit::KiB,
        );
    }
    rows.runs(c.n).host(
        Group::Memory,
        "vmm-bench process RSS beyond resident guest RAM (includes the report's own heap: an upper bound)",
        median(
            runs.iter()
                .filter_map(|r| Some(r.vmm_overhead_bytes? as f64 / 1024.0))
                .collect(),
        ),
        Unit::KiB,
    );
}

/// Our VMM's exit loop against a bare KVM_RUN loop, alternating.
fn exit_loops(c: &Ctx, f: &mut Findings, kvm: &vm::Kvm, accel: Accel) -> Option<boot::ExitCompare> {
    let (exits, samples) = if c.opts.quick { (1000, 9) } else { (3000, 21) };
    match boot::compare_exit_loops(kvm, exits, samples) {
        Ok(x) => {
            f.path("our VMM (host side)", accel, x.samples).host(
                Group::Roundtrip,
                "port-I/O exit, full exit loop",
                x.vmm_ns,
                Unit::Ns,
            );
            f.path("bare KVM_RUN loop", accel, x.samples).host(
                Group::Roundtrip,
                "port-I/O exit, bare loop",
                x.bare_ns,
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

fn container_density(c: &Ctx, f: &mut Findings) {
    let quiet = ContainerOpts {
        args: vec!["kib=4".into(), "loops=1".into()],
        ..Default::default()
    };
    match density(c.cpus, c.density_span(), || {
        container::run(&quiet).map(|_| ())
    }) {
        Ok(v) => {
            f.path("container", Accel::Native, 1).host(
                Group::Density,
                "instances/s, all cores",
                v,
                Unit::PerSecond,
            );
        }
        Err(e) => f.skip("container density", e),
    }
}

fn linux_image_size(f: &mut Findings) -> Result<LinuxImage> {
    match qemu::linux_image() {
        Ok(img) => {
            f.path("Linux VM image", Accel::Native, 1).host(
                Group::Size,
                "kernel + initramfs",
                (img.bzimage_bytes + img.initramfs_bytes) as f64 / 1024.0,
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
    let run = linux_img
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|img| {
            qemu::run_linux(
                &img,
                c.opts.kib,
                c.opts.loops,
                Duration::from_secs(120),
                qaccel,
            )
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
    f.check(p, field_u64(&runs[0].line, "checksum"));
    // Guest cycles to us: QEMU's guest TSC follows the host's.
    let cyc = |l: &str, k: &str| field_u64(l, k).map(|v| v as f64 / c.tsc_khz * 1e3);
    let m =
        |g: &dyn Fn(&str) -> Option<f64>| median(runs.iter().filter_map(|r| g(&r.line)).collect());
    f.path(p, qaccel, qn)
        .host(
            Group::Start,
            "launch to result line",
            median(runs.iter().map(|r| r.to_result_us).collect()),
            Unit::Us,
        )
        .guest(
            Group::Start,
            "guest boot (entry to boot timer)",
            m(&|l| Some(cyc(l, "ready_tsc")? - cyc(l, "entry_tsc")?)),
            Unit::Us,
        )
        .guest(
            Group::Compute,
            "workload time",
            m(&|l| cyc(l, "workload_cyc")),
            Unit::Us,
        )
        .guest(
            Group::Roundtrip,
            "port-I/O exit (QEMU device)",
            m(&|l| cyc(l, "port_cyc").map(|us| us * 1e3 / o.loops as f64)),
            Unit::Ns,
        )
        .guest(
            Group::Roundtrip,
            "in-ring-0 call",
            m(&|l| cyc(l, "call_cyc").map(|us| us * 1e3 / o.loops as f64)),
            Unit::Ns,
        )
        .runs(1)
        .host(
            Group::Memory,
            &qemu_rss_metric(runs[0].guest_ram_bytes),
            runs[0].max_rss_bytes as f64 / 1024.0,
            Unit::KiB,
        );
}

fn qemu_rss_metric(guest_ram_bytes: u64) -> String {
    format!(
        "QEMU peak RSS (guest RAM {} MiB, partly touched)",
        guest_ram_bytes >> 20
    )
}

fn qemu_linux_rows(c: &Ctx, f: &mut Findings, r: &qemu::QemuRun, qaccel: Accel) {
    let p = "Linux under QEMU";
    f.check(p, field_u64(&r.line, "checksum"));
    let field = |k| field_u64(&r.line, k).map_or(f64::NAN, |v| v as f64);
    f.path(p, qaccel, 1)
        .host(
            Group::Start,
            "launch to result line",
            r.to_result_us,
            Unit::Us,
        )
        .guest(
            Group::Start,
            "guest boot (kernel start to init)",
            field("boottime_start_ns") / 1e3,
            Unit::Us,
        )
        .guest(
            Group::Compute,
            "workload time",
            field("workload_ns") / 1e3,
            Unit::Us,
        )
        .guest(
            Group::Roundtrip,
            "null syscall (getppid)",
            c.per_loop(field("syscall_loop_ns")),
            Unit::Ns,
        )
        .host(
            Group::Memory,
            &qemu_rss_metric(r.guest_ram_bytes),
            r.max_rss_bytes as f64 / 1024.0,
            Unit::KiB,
        );
}

/// Image sizes, and each compute row's throughput relative to native.
fn sizes_and_ratios(f: &mut Findings, rootfs_bytes: Option<u64>, native_workload_ns: Option<f64>) {
    f.path("unikernel", Accel::Native, 1).host(
        Group::Size,
        "image (ELF)",
        UNIKERNEL.len() as f64 / 1024.0,
        Unit::KiB,
    );
    if let Some(r) = rootfs_bytes {
        f.path("runc bundle", Accel::Native, 1).host(
            Group::Size,
            "rootfs (busybox + workload)",
            r as f64 / 1024.0,
            Unit::KiB,
        );
    }
    if let Some(nw) = native_workload_ns {
        let comp: Vec<Row> = f
            .rows
            .iter()
            .filter(|r| r.group == Group::Compute && r.path != "native process")
            .cloned()
            .collect();
        for r in comp {
            f.rows.push(Row {
                metric: "throughput relative to native".into(),
                value: nw / 1e3 / r.value,
                unit: Unit::Times,
                ..r
            });
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
