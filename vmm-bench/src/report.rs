//! `vmm-bench report`: one pass down every path, written as report.md,
//! report.json and SVG charts. Every number carries the accelerator it ran
//! under and whether the guest or the host clock measured it.

use crate::container::{self, ContainerOpts};
use crate::host::{HostInfo, host_info};
use crate::qemu::{self, field_u64};
use crate::vm::boot::{self, UNIKERNEL, UnikernelRun};
use crate::vm::probe::{self, Accel, Probe};
use crate::{native, vm};
use anyhow::{Context, Result};
use livehost_common::progress::Progress;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ReportOpts {
    pub quick: bool,
    pub out: PathBuf,
    pub kib: u64,
    pub loops: u64,
    /// Skip the QEMU-Linux boot (several seconds under TCG).
    pub no_linux: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub group: &'static str,
    pub path: String,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    pub accel: String,
    /// "guest" (guest-reported) or "host" (host wall clock / host counters).
    pub clock: &'static str,
    pub runs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub path: String,
    pub checksum: Option<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub claim: String,
    pub measured: String,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub host: HostInfo,
    pub probe: Probe,
    pub quick: bool,
    pub kib: u64,
    pub loops: u64,
    pub expected_checksum: String,
    pub checks: Vec<Check>,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
    pub claims: Vec<Claim>,
    pub exit_compare: Option<boot::ExitCompare>,
    pub elapsed_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Builder {
    rows: Vec<Row>,
    skipped: Vec<Skipped>,
    checks: Vec<Check>,
    expected: u64,
}

impl Builder {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        group: &'static str,
        path: &str,
        metric: &str,
        value: f64,
        unit: &'static str,
        accel: Accel,
        clock: &'static str,
        runs: usize,
    ) {
        if value.is_finite() {
            self.rows.push(Row {
                group,
                path: path.into(),
                metric: metric.into(),
                value,
                unit,
                accel: accel.label().into(),
                clock,
                runs,
            });
        }
    }
    fn skip(&mut self, path: &str, reason: impl std::fmt::Display) {
        self.skipped.push(Skipped {
            path: path.into(),
            reason: format!("{reason:#}"),
        });
    }
    fn check(&mut self, path: &str, sum: Option<u64>) -> bool {
        let ok = sum == Some(self.expected);
        self.checks.push(Check {
            path: path.into(),
            checksum: sum.map(|s| format!("{s:#018x}")),
            ok,
        });
        ok
    }
    fn find(&self, path: &str, metric: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.path == path && r.metric == metric)
            .map(|r| r.value)
    }
}

/// Run the whole pass. Long work reports progress on stderr.
pub fn run(opts: &ReportOpts) -> Result<Report> {
    let start = Instant::now();
    let pr = Progress::new("vmm-bench report");
    let n = if opts.quick { 5 } else { 20 };
    let args = vec![format!("kib={}", opts.kib), format!("loops={}", opts.loops)];
    let expected = native::expected_checksum(opts.kib, vmm_bench_workload::DEFAULT_SEED)?;
    let mut b = Builder {
        rows: vec![],
        skipped: vec![],
        checks: vec![],
        expected,
    };
    pr.step("probing /dev/kvm");
    let probe = probe::probe(Duration::from_secs(1));
    let kvm_accel = probe.accel;
    pr.note(format!(
        "KVM: {}",
        kvm_accel.map_or_else(
            || probe.error.clone().unwrap_or_else(|| "unusable".into()),
            |a| a.label().to_string()
        )
    ));
    let host = host_info();
    let tsc_khz = native::host_tsc_khz();

    // Native baseline.
    pr.step("native process");
    let mut native_workload_ns = None;
    match (0..n)
        .map(|_| native::run(&args, Duration::from_secs(30)))
        .collect::<Result<Vec<_>>>()
    {
        Ok(runs) => {
            let l = &runs[0].stdout;
            b.check("native process", field_u64(l, "checksum"));
            b.row(
                "start",
                "native process",
                "spawn to exit",
                median(runs.iter().map(|r| r.total_us).collect()),
                "us",
                Accel::Native,
                "host",
                n,
            );
            let w = median(
                runs.iter()
                    .filter_map(|r| field_u64(&r.stdout, "workload_ns"))
                    .map(|v| v as f64)
                    .collect(),
            );
            native_workload_ns = Some(w);
            b.row(
                "compute",
                "native process",
                "workload time",
                w / 1e3,
                "us",
                Accel::Native,
                "host",
                n,
            );
            b.row(
                "roundtrip",
                "native process",
                "null syscall (getppid)",
                median(
                    runs.iter()
                        .filter_map(|r| field_u64(&r.stdout, "syscall_loop_ns"))
                        .map(|v| v as f64 / opts.loops as f64)
                        .collect(),
                ),
                "ns",
                Accel::Native,
                "host",
                n,
            );
            b.row(
                "memory",
                "native process",
                "peak RSS",
                runs[0].max_rss_bytes as f64 / 1024.0,
                "KiB",
                Accel::Native,
                "host",
                1,
            );
        }
        Err(e) => b.skip("native process", e),
    }

    // Our container launcher.
    pr.step("container (own launcher)");
    let copts = ContainerOpts {
        args: args.clone(),
        ..Default::default()
    };
    if !livehost_common::is_root() {
        b.skip("container", "needs root");
    } else {
        match (0..n)
            .map(|_| container::run(&copts))
            .collect::<Result<Vec<_>>>()
        {
            Ok(runs) => {
                b.check("container", field_u64(&runs[0].stdout, "checksum"));
                b.row(
                    "start",
                    "container",
                    "launch to exec (ns + cgroup set up)",
                    median(runs.iter().map(|r| r.setup_us).collect()),
                    "us",
                    Accel::Native,
                    "host",
                    n,
                );
                b.row(
                    "start",
                    "container",
                    "launch to exit",
                    median(runs.iter().map(|r| r.total_us).collect()),
                    "us",
                    Accel::Native,
                    "host",
                    n,
                );
                b.row(
                    "compute",
                    "container",
                    "workload time",
                    median(
                        runs.iter()
                            .filter_map(|r| field_u64(&r.stdout, "workload_ns"))
                            .map(|v| v as f64 / 1e3)
                            .collect(),
                    ),
                    "us",
                    Accel::Native,
                    "host",
                    n,
                );
                b.row(
                    "roundtrip",
                    "container",
                    "null syscall (getppid)",
                    median(
                        runs.iter()
                            .filter_map(|r| field_u64(&r.stdout, "syscall_loop_ns"))
                            .map(|v| v as f64 / opts.loops as f64)
                            .collect(),
                    ),
                    "ns",
                    Accel::Native,
                    "host",
                    n,
                );
                b.row(
                    "memory",
                    "container",
                    "peak RSS",
                    runs[0].max_rss_bytes as f64 / 1024.0,
                    "KiB",
                    Accel::Native,
                    "host",
                    1,
                );
            }
            Err(e) => b.skip("container", e),
        }
        let net = ContainerOpts {
            net: true,
            ..copts.clone()
        };
        match (0..n)
            .map(|_| container::run(&net))
            .collect::<Result<Vec<_>>>()
        {
            Ok(runs) => b.row(
                "start",
                "container + netns",
                "launch to exit",
                median(runs.iter().map(|r| r.total_us).collect()),
                "us",
                Accel::Native,
                "host",
                n,
            ),
            Err(e) => b.skip("container + netns", e),
        }
    }

    // runc.
    pr.step("runc");
    let mut rootfs_bytes = None;
    match container::find_runc() {
        None => b.skip(
            "runc",
            "runc is not installed (Debian: apt-get install runc)",
        ),
        Some(_) if !livehost_common::is_root() => b.skip("runc", "needs root"),
        Some(runc) => match container::make_bundle(&args).and_then(|bundle| {
            rootfs_bytes = Some(bundle.rootfs_bytes);
            (0..n.min(10))
                .map(|_| container::run_runc(&runc, &bundle, Duration::from_secs(20)))
                .collect::<Result<Vec<_>>>()
        }) {
            Ok(runs) => {
                b.check("runc", field_u64(&runs[0].stdout, "checksum"));
                b.row(
                    "start",
                    "runc",
                    "runc run to exit",
                    median(runs.iter().map(|r| r.total_us).collect()),
                    "us",
                    Accel::Native,
                    "host",
                    runs.len(),
                );
                b.row(
                    "memory",
                    "runc",
                    "peak RSS (runc + container)",
                    runs[0].max_rss_bytes as f64 / 1024.0,
                    "KiB",
                    Accel::Native,
                    "host",
                    1,
                );
            }
            Err(e) => b.skip("runc", e),
        },
    }

    // Our VMM + unikernel.
    pr.step("unikernel on our KVM VMM");
    let mut exit_compare = None;
    match (kvm_accel, vm::Kvm::open()) {
        (Some(accel), Ok(kvm)) => {
            let cfg = UnikernelRun {
                kib: opts.kib,
                loop_n: opts.loops,
                timeout: Duration::from_secs(20),
                ..Default::default()
            };
            match (0..n)
                .map(|_| boot::run_unikernel(&kvm, &cfg))
                .collect::<Result<Vec<_>>>()
            {
                Ok(runs) => {
                    let p = "unikernel on our VMM";
                    b.check(p, Some(runs[0].checksum));
                    let m = |f: &dyn Fn(&boot::UnikernelReport) -> Option<f64>| {
                        median(runs.iter().filter_map(f).collect())
                    };
                    b.row(
                        "start",
                        p,
                        "KVM_CREATE_VM",
                        m(&|r| Some(r.phases.create_vm_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "guest RAM map + register",
                        m(&|r| Some(r.phases.memory_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "image load",
                        m(&|r| Some(r.phases.load_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "vCPU create + set up",
                        m(&|r| Some(r.phases.vcpu_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "create to first exit",
                        m(&|r| Some(r.first_exit_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "launch to boot timer",
                        m(&|r| Some(r.boot_timer_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "guest boot (entry to boot timer)",
                        m(&|r| r.guest_boot_us),
                        "us",
                        accel,
                        "guest",
                        n,
                    );
                    b.row(
                        "start",
                        p,
                        "launch to exit",
                        m(&|r| Some(r.total_us)),
                        "us",
                        accel,
                        "host",
                        n,
                    );
                    b.row(
                        "compute",
                        p,
                        "workload time",
                        m(&|r| r.guest_workload_us),
                        "us",
                        accel,
                        "guest",
                        n,
                    );
                    b.row(
                        "roundtrip",
                        p,
                        "port-I/O exit to our VMM",
                        m(&|r| r.guest_port_exit_ns),
                        "ns",
                        accel,
                        "guest",
                        n,
                    );
                    b.row(
                        "roundtrip",
                        p,
                        "cpuid (exit handled in KVM)",
                        m(&|r| r.guest_cpuid_ns),
                        "ns",
                        accel,
                        "guest",
                        n,
                    );
                    b.row(
                        "roundtrip",
                        p,
                        "in-ring-0 call",
                        m(&|r| r.guest_call_ns),
                        "ns",
                        accel,
                        "guest",
                        n,
                    );
                    if let Some(kib) = fresh_vmm_overhead_kib(opts.kib) {
                        b.row(
                            "memory",
                            p,
                            "VMM process RSS beyond resident guest RAM (fresh `vmm-bench run vm`)",
                            kib,
                            "KiB",
                            accel,
                            "host",
                            1,
                        );
                    }
                    b.row("memory", p, "vmm-bench process RSS beyond resident guest RAM (includes the report's own heap: an upper bound)", m(&|r| r.vmm_overhead_bytes.map(|v| v as f64 / 1024.0)), "KiB", accel, "host", n);
                }
                Err(e) => b.skip("unikernel on our VMM", e),
            }
            pr.step("exit round trip: our VMM vs bare KVM_RUN");
            match boot::compare_exit_loops(
                &kvm,
                if opts.quick { 1000 } else { 3000 },
                if opts.quick { 9 } else { 21 },
            ) {
                Ok(c) => {
                    b.row(
                        "roundtrip",
                        "our VMM (host side)",
                        "port-I/O exit, full exit loop",
                        c.vmm_ns,
                        "ns",
                        accel,
                        "host",
                        c.samples,
                    );
                    b.row(
                        "roundtrip",
                        "bare KVM_RUN loop",
                        "port-I/O exit, bare loop",
                        c.bare_ns,
                        "ns",
                        accel,
                        "host",
                        c.samples,
                    );
                    exit_compare = Some(c);
                }
                Err(e) => b.skip("exit compare", e),
            }
            pr.step("density: VMs per second");
            match density(
                host.cpus,
                if opts.quick {
                    Duration::from_millis(800)
                } else {
                    Duration::from_secs(3)
                },
                || {
                    boot::run_raw(
                        &kvm,
                        vm::Mode::Long,
                        boot::code::LONG_HELLO,
                        Duration::from_secs(5),
                    )
                    .and_then(|(r, _, _)| r.map(|_| ()).map_err(Into::into))
                },
            ) {
                Ok(v) => b.row(
                    "density",
                    "VM on our VMM (hello guest)",
                    "instances/s, all cores",
                    v,
                    "1/s",
                    accel,
                    "host",
                    1,
                ),
                Err(e) => b.skip("VM density", e),
            }
        }
        (_, Err(e)) => b.skip("unikernel on our VMM", e),
        (None, Ok(_)) => b.skip(
            "unikernel on our VMM",
            probe.long_mode.clone().unwrap_or_default(),
        ),
    }
    if livehost_common::is_root() {
        pr.step("density: containers per second");
        let quiet = ContainerOpts {
            args: vec!["kib=4".into(), "loops=1".into()],
            ..Default::default()
        };
        match density(
            host.cpus,
            if opts.quick {
                Duration::from_millis(800)
            } else {
                Duration::from_secs(3)
            },
            || container::run(&quiet).map(|_| ()),
        ) {
            Ok(v) => b.row(
                "density",
                "container",
                "instances/s, all cores",
                v,
                "1/s",
                Accel::Native,
                "host",
                1,
            ),
            Err(e) => b.skip("container density", e),
        }
    }

    // The Linux VM image is sized whether or not it is booted (--no-linux),
    // so the image-size claim never depends on the boot succeeding.
    pr.step("sizing the Debian kernel + initramfs");
    let linux_img = match qemu::linux_image() {
        Ok(img) => {
            b.row(
                "size",
                "Linux VM image",
                "kernel + initramfs",
                (img.bzimage_bytes + img.initramfs_bytes) as f64 / 1024.0,
                "KiB",
                Accel::Native,
                "host",
                1,
            );
            Ok(img)
        }
        Err(e) => {
            b.skip("Linux VM image", &e);
            Err(e)
        }
    };

    // QEMU.
    let qaccel = qemu::choose_accel(kvm_accel);
    if !qemu::qemu_available() {
        b.skip(
            "QEMU",
            "qemu-system-x86_64 not installed (Debian: qemu-system-x86)",
        );
    } else {
        pr.step("unikernel under QEMU (PVH)");
        let qn = if opts.quick { 2 } else { 5 };
        match (0..qn)
            .map(|_| {
                qemu::run_unikernel(
                    UNIKERNEL,
                    opts.kib,
                    opts.loops,
                    Duration::from_secs(30),
                    qaccel,
                )
            })
            .collect::<Result<Vec<_>>>()
        {
            Ok(runs) => {
                let p = "unikernel under QEMU (PVH)";
                let l = &runs[0].line;
                b.check(p, field_u64(l, "checksum"));
                let cyc = |l: &str, k: &str| field_u64(l, k).map(|c| c as f64 / tsc_khz * 1e3);
                b.row(
                    "start",
                    p,
                    "launch to result line",
                    median(runs.iter().map(|r| r.to_result_us).collect()),
                    "us",
                    qaccel,
                    "host",
                    qn,
                );
                b.row(
                    "start",
                    p,
                    "guest boot (entry to boot timer)",
                    median(
                        runs.iter()
                            .filter_map(|r| {
                                Some(cyc(&r.line, "ready_tsc")? - cyc(&r.line, "entry_tsc")?)
                            })
                            .collect(),
                    ),
                    "us",
                    qaccel,
                    "guest",
                    qn,
                );
                b.row(
                    "compute",
                    p,
                    "workload time",
                    median(
                        runs.iter()
                            .filter_map(|r| cyc(&r.line, "workload_cyc"))
                            .collect(),
                    ),
                    "us",
                    qaccel,
                    "guest",
                    qn,
                );
                b.row(
                    "roundtrip",
                    p,
                    "port-I/O exit (QEMU device)",
                    median(
                        runs.iter()
                            .filter_map(|r| cyc(&r.line, "port_cyc"))
                            .map(|us| us * 1e3 / opts.loops as f64)
                            .collect(),
                    ),
                    "ns",
                    qaccel,
                    "guest",
                    qn,
                );
                b.row(
                    "roundtrip",
                    p,
                    "in-ring-0 call",
                    median(
                        runs.iter()
                            .filter_map(|r| cyc(&r.line, "call_cyc"))
                            .map(|us| us * 1e3 / opts.loops as f64)
                            .collect(),
                    ),
                    "ns",
                    qaccel,
                    "guest",
                    qn,
                );
                b.row(
                    "memory",
                    p,
                    &format!(
                        "QEMU peak RSS (guest RAM {} MiB, partly touched)",
                        runs[0].guest_ram_bytes >> 20
                    ),
                    runs[0].max_rss_bytes as f64 / 1024.0,
                    "KiB",
                    qaccel,
                    "host",
                    1,
                );
            }
            Err(e) => b.skip("unikernel under QEMU (PVH)", e),
        }
        if opts.no_linux {
            b.skip("QEMU + Linux", "--no-linux given");
        } else {
            pr.step("Debian kernel under QEMU with the workload as init");
            match linux_img
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|img| {
                    qemu::run_linux(img, opts.kib, opts.loops, Duration::from_secs(120), qaccel)
                }) {
                Ok(r) => {
                    let p = "Linux under QEMU";
                    b.check(p, field_u64(&r.line, "checksum"));
                    b.row(
                        "start",
                        p,
                        "launch to result line",
                        r.to_result_us,
                        "us",
                        qaccel,
                        "host",
                        1,
                    );
                    if let Some(bt) = field_u64(&r.line, "boottime_start_ns") {
                        b.row(
                            "start",
                            p,
                            "guest boot (kernel start to init)",
                            bt as f64 / 1e3,
                            "us",
                            qaccel,
                            "guest",
                            1,
                        );
                    }
                    if let Some(w) = field_u64(&r.line, "workload_ns") {
                        b.row(
                            "compute",
                            p,
                            "workload time",
                            w as f64 / 1e3,
                            "us",
                            qaccel,
                            "guest",
                            1,
                        );
                    }
                    if let Some(s) = field_u64(&r.line, "syscall_loop_ns") {
                        b.row(
                            "roundtrip",
                            p,
                            "null syscall (getppid)",
                            s as f64 / opts.loops as f64,
                            "ns",
                            qaccel,
                            "guest",
                            1,
                        );
                    }
                    b.row(
                        "memory",
                        p,
                        &format!(
                            "QEMU peak RSS (guest RAM {} MiB, partly touched)",
                            r.guest_ram_bytes >> 20
                        ),
                        r.max_rss_bytes as f64 / 1024.0,
                        "KiB",
                        qaccel,
                        "host",
                        1,
                    );
                }
                Err(e) => b.skip("Linux under QEMU", e),
            }
        }
    }

    // Sizes and ratios.
    b.row(
        "size",
        "unikernel",
        "image (ELF)",
        UNIKERNEL.len() as f64 / 1024.0,
        "KiB",
        Accel::Native,
        "host",
        1,
    );
    if let Some(r) = rootfs_bytes {
        b.row(
            "size",
            "runc bundle",
            "rootfs (busybox + workload)",
            r as f64 / 1024.0,
            "KiB",
            Accel::Native,
            "host",
            1,
        );
    }
    if let Some(nw) = native_workload_ns {
        let comp: Vec<Row> = b
            .rows
            .iter()
            .filter(|r| r.group == "compute" && r.path != "native process")
            .cloned()
            .collect();
        for r in comp {
            b.rows.push(Row {
                metric: "throughput relative to native".into(),
                value: nw / 1e3 / r.value,
                unit: "x",
                ..r
            });
        }
    }
    let claims = claims(&b, exit_compare.as_ref(), kvm_accel);
    pr.finish();
    Ok(Report {
        host,
        probe,
        quick: opts.quick,
        kib: opts.kib,
        loops: opts.loops,
        expected_checksum: format!("{expected:#018x}"),
        checks: b.checks,
        rows: b.rows,
        skipped: b.skipped,
        claims,
        exit_compare,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// Our VMM's own memory, measured in a fresh `vmm-bench run vm` process so
/// the report's heap does not count: RSS minus resident guest RAM.
fn fresh_vmm_overhead_kib(kib: u64) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    if exe.file_name()? != "vmm-bench" {
        return None;
    }
    let out = std::process::Command::new(exe)
        .args([
            "run",
            "vm",
            "--kib",
            &kib.to_string(),
            "--loops",
            "10",
            "--timeout",
            "30",
            "--json",
        ])
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

fn claims(b: &Builder, ec: Option<&boot::ExitCompare>, kvm: Option<Accel>) -> Vec<Claim> {
    let mut v = Vec::new();
    let hw = kvm == Some(Accel::HardwareKvm);
    let qualifier = |ok: bool| {
        if !hw && kvm.is_some() {
            format!(
                "{} (measured under {}, not a hardware verdict)",
                if ok { "met" } else { "not met" },
                kvm.map(|a| a.label()).unwrap_or("")
            )
        } else if ok {
            "met".into()
        } else {
            "not met".into()
        }
    };
    let uk = b.find("unikernel", "image (ELF)");
    let linux = b.find("Linux VM image", "kernel + initramfs");
    match (uk, linux) {
        (Some(u), Some(l)) => v.push(Claim {
            claim: "a unikernel image is ~4% of a VM image (seed claim)".into(),
            measured: format!(
                "{:.1} KiB vs {:.0} KiB kernel+initramfs = {:.3}%",
                u,
                l,
                u / l * 100.0
            ),
            verdict: if u / l <= 0.04 {
                "holds for this unikernel (smaller than 4%)".into()
            } else {
                "does not hold (larger than 4%)".into()
            },
        }),
        _ => v.push(Claim {
            claim: "a unikernel image is ~4% of a VM image (seed claim)".into(),
            measured: format!(
                "kernel image unavailable: {}",
                b.skipped
                    .iter()
                    .find(|k| k.path == "Linux VM image")
                    .map_or("not sized", |k| k.reason.as_str())
            ),
            verdict: "not tested".into(),
        }),
    }
    if let Some(c) = ec {
        v.push(Claim {
            claim: "our VMM's exit round trip within 5% of a bare KVM_RUN loop".into(),
            measured: format!(
                "{:.0} ns vs {:.0} ns = {:+.1}% (median of {} alternating samples of {} exits)",
                c.vmm_ns, c.bare_ns, c.overhead_pct, c.samples, c.exits_per_sample
            ),
            verdict: qualifier(c.overhead_pct <= 5.0),
        });
    }
    let p = "unikernel on our VMM";
    if let Some(x) = b.find(p, "create to first exit") {
        v.push(Claim {
            claim: "VM create to first guest instruction <= 300 us (TinyKVM 315 us)".into(),
            measured: format!("{x:.0} us to the first exit"),
            verdict: qualifier(x <= 300.0),
        });
    }
    if let Some(x) = b.find(p, "guest boot (entry to boot timer)") {
        v.push(Claim {
            claim: "unikernel boot <= 100 us guest time".into(),
            measured: format!("{x:.1} us"),
            verdict: qualifier(x <= 100.0),
        });
    }
    if let Some(x) = b.find(p, "launch to boot timer") {
        v.push(Claim {
            claim: "unikernel boot <= 3 ms end to end (Unikraft ~3 ms)".into(),
            measured: format!("{:.2} ms launch to boot timer", x / 1e3),
            verdict: qualifier(x <= 3000.0),
        });
    }
    if let Some(x) = b
        .rows
        .iter()
        .find(|r| r.path == p && r.metric.starts_with("VMM process RSS"))
        .map(|r| r.value)
    {
        v.push(Claim {
            claim: "VMM memory overhead <= 5 MiB (Firecracker)".into(),
            measured: format!("{:.1} MiB", x / 1024.0),
            verdict: if x <= 5.0 * 1024.0 {
                "met".into()
            } else {
                "not met by this upper bound".into()
            },
        });
    }
    if let Some(x) = b.find("container", "launch to exit") {
        v.push(Claim {
            claim: "container start without a network namespace <= 3 ms".into(),
            measured: format!("{:.2} ms launch to exit", x / 1e3),
            verdict: if x <= 3000.0 {
                "met".into()
            } else {
                "not met".into()
            },
        });
    }
    v
}

/// Write report.json, report.md and the SVG charts into `dir`.
pub fn write(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = vec![];
    let j = dir.join("report.json");
    std::fs::write(&j, serde_json::to_vec_pretty(r)?)?;
    files.push(j);
    let m = dir.join("report.md");
    std::fs::write(&m, markdown(r))?;
    files.push(m);
    for (group, title, log) in [
        ("start", "Start-up (us, log scale)", true),
        (
            "roundtrip",
            "Null privileged operation round trip (ns, log scale)",
            true,
        ),
        ("size", "Image size (KiB, log scale)", true),
        (
            "density",
            "Instances started per second, all cores busy",
            false,
        ),
    ] {
        let items: Vec<(String, f64)> = r
            .rows
            .iter()
            .filter(|x| x.group == group)
            .map(|x| {
                (
                    format!("{}: {} [{}]", x.path, x.metric, short(&x.accel)),
                    x.value,
                )
            })
            .collect();
        if items.is_empty() {
            continue;
        }
        let p = dir.join(format!("{group}.svg"));
        chart(&p, title, &items, log)?;
        files.push(p);
    }
    let rel: Vec<(String, f64)> = r
        .rows
        .iter()
        .filter(|x| x.metric == "throughput relative to native")
        .map(|x| (format!("{} [{}]", x.path, short(&x.accel)), x.value))
        .collect();
    if !rel.is_empty() {
        let p = dir.join("compute.svg");
        chart(
            &p,
            "Workload throughput relative to native (x, log scale)",
            &rel,
            true,
        )?;
        files.push(p);
    }
    Ok(files)
}

fn short(accel: &str) -> &str {
    accel.split(" (").next().unwrap_or(accel)
}

fn chart(path: &Path, title: &str, items: &[(String, f64)], log: bool) -> Result<()> {
    use plotters::prelude::*;
    let h = 120 + 28 * items.len() as u32;
    let root = SVGBackend::new(path, (1000, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let max = items.iter().map(|i| i.1).fold(f64::MIN_POSITIVE, f64::max) * 1.5;
    let min = items
        .iter()
        .map(|i| i.1)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min)
        .min(1.0)
        / 2.0;
    let n = items.len();
    let draw = |root: &DrawingArea<SVGBackend, plotters::coord::Shift>| -> Result<(), Box<dyn std::error::Error + '_>> {
        let mut ch = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(0)
            .build_cartesian_2d((min..max).log_scale(), 0f64..n as f64)?;
        ch.configure_mesh().disable_y_mesh().disable_y_axis().draw()?;
        for (i, (label, v)) in items.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            ch.draw_series(std::iter::once(Rectangle::new([(min, y + 0.15), (v.max(min), y + 0.85)], BLUE.mix(0.35).filled())))?;
            ch.draw_series(std::iter::once(Text::new(format!("{label}: {}", fmt_num(*v)), (min, y + 0.65), ("sans-serif", 12))))?;
        }
        root.present()?;
        Ok(())
    };
    let _ = log; // every chart spans orders of magnitude except density
    draw(&root).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

pub fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# vmm-bench report\n");
    let _ = writeln!(
        s,
        "- CPU: {} ({} CPUs){}",
        r.host.cpu_model,
        r.host.cpus,
        if r.host.host_is_guest {
            ", **this host is itself a virtual machine**"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "- Host kernel: {}", r.host.kernel);
    let _ = writeln!(
        s,
        "- KVM: {}",
        r.probe.accel.map_or_else(
            || format!("unusable: {}", r.probe.error.clone().unwrap_or_default()),
            |a| a.label().to_string()
        )
    );
    let _ = writeln!(
        s,
        "- Workload: checksum over {} KiB, null-operation loops of {}; mode: {}",
        r.kib,
        r.loops,
        if r.quick { "quick" } else { "full" }
    );
    let _ = writeln!(s, "- Took {:.1} s\n", r.elapsed_s);
    if r.probe.accel != Some(Accel::HardwareKvm) {
        let _ = writeln!(
            s,
            "> Numbers labelled *nested, emulating KVM* or *QEMU TCG* were taken under emulation: they describe this host, not hardware virtualization.\n"
        );
    }
    let _ = writeln!(
        s,
        "## Checksums (expected {})\n\n| path | checksum | ok |\n|---|---|---|",
        r.expected_checksum
    );
    for c in &r.checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            c.path,
            c.checksum.as_deref().unwrap_or("-"),
            if c.ok { "yes" } else { "**NO**" }
        );
    }
    for (g, t) in [
        ("start", "Start-up"),
        ("roundtrip", "Null privileged operation round trip"),
        ("compute", "Compute"),
        ("memory", "Memory"),
        ("size", "Image size"),
        ("density", "Density"),
    ] {
        let _ = writeln!(
            s,
            "\n## {t}\n\n| path | metric | value | accelerator | clock | runs |\n|---|---|---:|---|---|---:|"
        );
        for x in r.rows.iter().filter(|x| x.group == g) {
            let _ = writeln!(
                s,
                "| {} | {} | {} {} | {} | {} | {} |",
                x.path,
                x.metric,
                fmt_num(x.value),
                x.unit,
                x.accel,
                x.clock,
                x.runs
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Claims\n\n| claim | measured | verdict |\n|---|---|---|"
    );
    for c in &r.claims {
        let _ = writeln!(s, "| {} | {} | {} |", c.claim, c.measured, c.verdict);
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "\n## Skipped\n");
        for k in &r.skipped {
            let _ = writeln!(s, "- **{}**: {}", k.path, k.reason);
        }
    }
    let _ = writeln!(
        s,
        "\n## Method\n\nMedians over the runs shown. *guest* clock: the guest's TSC (our VMM converts with KVM_GET_TSC_KHZ; under QEMU with the host TSC rate calibrated against CLOCK_MONOTONIC) or CLOCK_MONOTONIC/CLOCK_BOOTTIME inside a Linux guest. *host* clock: CLOCK_MONOTONIC around the launch in this process. Start of our VMM is split into KVM_CREATE_VM, memory, image load, vCPU set-up, first exit, and the guest's boot-timer write (Firecracker's method: port 0x440, byte 123). Round trips: the guest loops over the operation and divides. The VMM-vs-bare comparison alternates both loops on fresh VMs in one run. Memory: our VMM's RSS minus the guest RAM pages that are resident (mincore); QEMU's and runc's peak RSS from wait4. Density: one launcher thread per CPU for a fixed span."
    );
    s
}
