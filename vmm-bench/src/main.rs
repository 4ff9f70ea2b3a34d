//! vmm-bench: VM vs container vs unikernel, measured on this host.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use livehost_common::exit;
use std::path::PathBuf;
use std::time::Duration;
use vmm_bench::vm::probe::Accel;
use vmm_bench::{container, native, qemu, report, vm};

/// `println!` that returns an error instead of panicking when stdout is
/// closed (`vmm-bench report | head`); see `main` for the exit status.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*)?
    }};
}

macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($t)*)?
    }};
}

#[derive(Parser)]
#[command(
    name = "vmm-bench",
    version,
    about = "Run one workload as a process, in a container, in a VM on our own KVM VMM, as a unikernel and under QEMU, and compare start-up, round trips, compute, memory, image size and density.",
    long_about = "Run one workload as a process, in a container (our namespace+cgroup launcher and runc), \
in a VM on our own small KVM VMM, as a unikernel (our VMM and QEMU via PVH), and as init of a Debian \
kernel under QEMU; every path must return the same checksum.\n\n\
Every number is labelled with the accelerator it ran under: hardware KVM, nested KVM, a nested \
KVM that emulates guest instructions (numbers describe that host, not hardware), or QEMU TCG.\n\n\
Start with `vmm-bench probe` to see what this host's KVM can do, then `vmm-bench report --quick`.\n\
Most paths need root (namespaces, cgroups, /dev/kvm).",
    after_help = "Examples:\n  vmm-bench probe\n  vmm-bench run vm --kib 64\n  vmm-bench run container --json\n  vmm-bench container --name web --cgroup web -- /bin/sh -c 'hostname; cat /proc/self/cgroup'\n  vmm-bench report --quick --out /tmp/vmm-report"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Find out, within about a second, what /dev/kvm can do here.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Run the workload once down one path and print its result.
    Run {
        path: PathKind,
        /// Workload size in KiB (checksum over this much memory), 1..=1048576.
        #[arg(long, default_value_t = 64, value_parser = kib_parser())]
        kib: u64,
        /// Iterations of the null-operation loop, 1..=1000000000.
        #[arg(long, default_value_t = 1000, value_parser = loops_parser())]
        loops: u64,
        /// Deadline for the run in seconds, 1..=86400.
        #[arg(long, default_value_t = 60, value_parser = timeout_parser())]
        timeout: u64,
        /// For `vm` and `qemu-unikernel`: boot this ELF instead of the
        /// built-in unikernel (it must follow the same guest ABI to report).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run a command as a container: new pid, mount, uts, ipc (opt. net)
    /// namespaces, a named cgroup v2 leaf, private /proc. SIGTERM/SIGINT
    /// kill it; the leaf is removed afterwards if this created it.
    Container {
        /// Hostname inside the container.
        #[arg(long, default_value = "livehost-ctr")]
        name: String,
        /// cgroup leaf name under the v2 root (default: livehost-NAME.scope,
        /// which `overhead` shows as container "livehost:NAME").
        #[arg(long)]
        cgroup: Option<String>,
        /// Also give it its own network namespace.
        #[arg(long)]
        net: bool,
        /// Kill it after this many seconds, 1..=86400 (default: run until it
        /// exits).
        #[arg(long, value_parser = timeout_parser())]
        timeout: Option<u64>,
        /// No status lines on stderr.
        #[arg(long)]
        quiet: bool,
        #[arg(long)]
        json: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Time our VMM's exit loop against a bare KVM_RUN loop, in one run.
    CompareExits {
        /// Port-I/O exits per sample, 1..=1000000.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        exits: u32,
        /// Samples of each loop (alternating), 1..=1001.
        #[arg(long, default_value_t = 11, value_parser = clap::value_parser!(u64).range(1..=1001))]
        samples: u64,
        #[arg(long)]
        json: bool,
    },
    /// Run every path and write report.md, report.json and SVG charts.
    Report {
        /// Fewer repetitions: finishes in well under a minute.
        #[arg(long)]
        quick: bool,
        /// Output directory.
        #[arg(long, default_value = "vmm-bench-report")]
        out: PathBuf,
        /// Workload size in KiB, 1..=1048576. Small by default because a
        /// nested, emulating KVM runs every guest instruction through its
        /// emulator.
        #[arg(long, default_value_t = 64, value_parser = kib_parser())]
        kib: u64,
        /// Iterations of each null-operation loop, 1..=1000000000.
        #[arg(long, default_value_t = 1000, value_parser = loops_parser())]
        loops: u64,
        /// Skip booting the Debian kernel under QEMU.
        #[arg(long)]
        no_linux: bool,
        /// Also print report.json on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// `--kib`: every path accepts 1..=MAX_KIB (1 GiB); anything else is a
/// usage error (exit 2) before anything is allocated or booted.
fn kib_parser() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=vmm_bench::MAX_KIB)
}

fn loops_parser() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=1_000_000_000)
}

/// `--timeout`: at most a day, so a deadline never overflows the clock.
fn timeout_parser() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=vmm_bench::MAX_TIMEOUT.as_secs())
}

#[derive(Clone, Copy, ValueEnum)]
enum PathKind {
    /// The static workload as a plain process.
    Native,
    /// Our namespace + cgroup launcher.
    Container,
    /// runc with a generated busybox bundle.
    Runc,
    /// The unikernel on our KVM VMM (64-bit entry).
    Vm,
    /// The unikernel under QEMU through its PVH entry.
    QemuUnikernel,
    /// The Debian kernel under QEMU with the workload as init.
    QemuLinux,
}

fn main() {
    let cli = Cli::parse();
    let code = match real_main(cli) {
        Ok(c) => c,
        // Whoever read our stdout went away: end quietly, as a shell tool
        // killed by SIGPIPE would (128 + 13).
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            141
        }
        Err(e) => {
            eprintln!("vmm-bench: {e:#}");
            let s = format!("{e:#}");
            if s.contains("deadline") || s.contains("timed out") {
                exit::TIMEOUT
            } else {
                exit::ERROR
            }
        }
    };
    std::process::exit(code);
}

/// Read a user-supplied image with a size bound, so a wrong path (a disk
/// image, a device) is refused instead of read whole.
fn read_image(p: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(p)
        .map_err(|e| anyhow::anyhow!("cannot open image {}: {e}", p.display()))?;
    let mut v = Vec::new();
    f.take(vm::elf::MAX_IMAGE + 1).read_to_end(&mut v)?;
    if v.len() as u64 > vm::elf::MAX_IMAGE {
        bail!(
            "image {} is larger than the {} MiB limit: not a vmm-bench unikernel",
            p.display(),
            vm::elf::MAX_IMAGE >> 20
        );
    }
    vm::elf::parse(&v, usize::MAX >> 1)
        .map_err(|e| anyhow::anyhow!("refusing image {}: {e:#}", p.display()))?;
    Ok(v)
}

/// What `run PATH` prints, the same shape for every path: `path`,
/// `accel` (`kind` and `label`), `checksum` and `expected` (hex strings, so
/// no JSON reader rounds them), `ok`, then that path's own fields.
fn run_output(
    path: PathKind,
    accel: Option<Accel>,
    got: Option<u64>,
    expected: u64,
    detail: serde_json::Value,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let hex = |v: u64| format!("{v:#018x}");
    let mut out = serde_json::Map::new();
    out.insert(
        "path".into(),
        json!(
            path.to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        ),
    );
    out.insert(
        "accel".into(),
        json!({
            "kind": accel,
            "label": accel.map_or("KVM, not classified by the probe", |a| a.label()),
        }),
    );
    out.insert("checksum".into(), json!(got.map(hex)));
    out.insert("expected".into(), json!(hex(expected)));
    out.insert("ok".into(), json!(got == Some(expected)));
    if let Value::Object(m) = detail {
        for (k, v) in m {
            // The common fields win (the VMM's numeric checksum, QEMU's
            // bare accelerator name).
            out.entry(k).or_insert(v);
        }
    }
    Value::Object(out)
}

fn print<T: serde::Serialize>(v: &T, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(v)?);
    } else {
        let mut lines = Vec::new();
        flatten("", &serde_json::to_value(v)?, &mut lines);
        for l in lines {
            outln!("{l}");
        }
    }
    Ok(())
}

/// `a.b: value` lines for people; `--json` is the format for programs.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        Value::Null => {}
        Value::Number(n) if n.is_f64() => {
            out.push(format!("{prefix}: {:.2}", n.as_f64().unwrap_or(f64::NAN)))
        }
        Value::String(s) => out.push(format!("{prefix}: {}", s.trim_end())),
        other => out.push(format!("{prefix}: {other}")),
    }
}

fn real_main(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Probe { json } => {
            let p = vm::probe::probe(Duration::from_secs(1));
            if json {
                print(&p, true)?;
            } else {
                match (&p.error, p.accel) {
                    (Some(e), _) => outln!("KVM unusable: {e}"),
                    (None, a) => {
                        outln!(
                            "KVM: {}",
                            a.map_or("present but no guest ran", |a| a.label())
                        );
                        outln!("  real mode:  {}", p.real_mode.as_deref().unwrap_or("-"));
                        outln!("  long mode:  {}", p.long_mode.as_deref().unwrap_or("-"));
                        if let Some(v) = p.create_to_first_exit_us {
                            outln!("  VM create to first exit: {v:.0} us");
                        }
                        if let Some(v) = p.port_exit_ns {
                            outln!("  port-I/O exit round trip: {:.1} us", v / 1e3);
                        }
                        outln!(
                            "  guest register loop: {} (host {:.0} iterations/us)",
                            p.guest_loop_per_us.map_or(
                                "did not finish in its time slice: instructions are emulated"
                                    .into(),
                                |v| format!("{v:.0} iterations/us")
                            ),
                            p.host_loop_per_us
                        );
                    }
                }
                outln!(
                    "  host is itself a guest: {}; probe took {:.0} ms",
                    p.host_is_guest,
                    p.elapsed_ms
                );
            }
            Ok(if p.accel.is_some() {
                exit::SUCCESS
            } else {
                exit::REFUSED
            })
        }
        Cmd::Run {
            path,
            kib,
            loops,
            timeout,
            image,
            json,
        } => {
            // A stop signal kills our children and removes our cgroup
            // leaves before we exit (no thread exists yet: it must be first).
            container::clean_up_on_stop_signals()?;
            if image.is_some() && !matches!(path, PathKind::Vm | PathKind::QemuUnikernel) {
                eprintln!("vmm-bench: --image only applies to `run vm` and `run qemu-unikernel`");
                return Ok(exit::USAGE);
            }
            let image = match &image {
                Some(p) => read_image(p)?,
                None => vm::boot::UNIKERNEL.to_vec(),
            };
            let t = Duration::from_secs(timeout);
            let args = vec![format!("kib={kib}"), format!("loops={loops}")];
            let expected = native::expected_checksum(kib, vmm_bench_workload::DEFAULT_SEED)?;
            let probe_accel = || vm::probe::probe(Duration::from_secs(1)).accel;
            // (accelerator, checksum the path returned, path-specific fields)
            let (accel, got, detail): (Option<Accel>, Option<u64>, serde_json::Value) = match path {
                PathKind::Native => {
                    let r = native::run(&args, t)?;
                    let sum = qemu::field_u64(&r.stdout, "checksum");
                    (Some(Accel::Native), sum, serde_json::to_value(&r)?)
                }
                PathKind::Container => {
                    let r = container::run(&container::ContainerOpts {
                        args,
                        timeout: t,
                        ..Default::default()
                    })?;
                    let sum = qemu::field_u64(&r.stdout, "checksum");
                    (Some(Accel::Native), sum, serde_json::to_value(&r)?)
                }
                PathKind::Runc => {
                    let Some(runc) = container::find_runc() else {
                        bail!("runc is not installed: apt-get install runc");
                    };
                    let b = container::make_bundle(&args)?;
                    let r = container::run_runc(&runc, &b, t)?;
                    let sum = qemu::field_u64(&r.stdout, "checksum");
                    (Some(Accel::Native), sum, serde_json::to_value(&r)?)
                }
                PathKind::Vm => {
                    let kvm = vm::Kvm::open()?;
                    let r = vm::boot::run_unikernel(
                        &kvm,
                        &vm::boot::UnikernelRun {
                            image: &image,
                            kib,
                            loop_n: loops,
                            timeout: t,
                            ..Default::default()
                        },
                    )?;
                    // Probed after the run, so the run's own memory figures
                    // do not include the probe's VMs.
                    (probe_accel(), Some(r.checksum), serde_json::to_value(&r)?)
                }
                PathKind::QemuUnikernel => {
                    let accel = qemu::choose_accel(probe_accel());
                    let r = qemu::run_unikernel(&image, kib, loops, t, accel)?;
                    let sum = qemu::field_u64(&r.line, "checksum");
                    (Some(accel), sum, serde_json::to_value(&r)?)
                }
                PathKind::QemuLinux => {
                    let img = qemu::linux_image()?;
                    let accel = qemu::choose_accel(probe_accel());
                    let r = qemu::run_linux(&img, kib, loops, t, accel)?;
                    let sum = qemu::field_u64(&r.line, "checksum");
                    (Some(accel), sum, serde_json::to_value(&r)?)
                }
            };
            let out = run_output(path, accel, got, expected, detail);
            print(&out, json)?;
            if got != Some(expected) {
                bail!(
                    "checksum mismatch: got {}, expected {expected:#018x}",
                    got.map_or("none".into(), |g| format!("{g:#018x}"))
                );
            }
            if !json {
                outln!("checksum matches the native reference ({expected:#018x})");
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Container {
            name,
            cgroup,
            net,
            timeout,
            quiet,
            json,
            command,
        } => {
            let opts = container::CommandOpts {
                argv: command,
                cgroup: cgroup.unwrap_or_else(|| livehost_common::container::cgroup_leaf(&name)),
                hostname: name,
                net,
                timeout: timeout.map(Duration::from_secs),
            };
            if !quiet {
                eprintln!(
                    "vmm-bench: starting container {} in cgroup {}",
                    opts.hostname, opts.cgroup
                );
            }
            let end = container::run_command(&opts)?;
            if json {
                print(&end, true)?;
            } else if !quiet {
                eprintln!(
                    "vmm-bench: container pid {} ended with status {}{}",
                    end.pid,
                    end.exit_code,
                    end.stopped_by
                        .map(|s| format!(" (we were sent signal {s} and killed it)"))
                        .unwrap_or_default()
                );
            }
            Ok(if end.timed_out {
                exit::TIMEOUT
            } else {
                end.exit_code
            })
        }
        Cmd::CompareExits {
            exits,
            samples,
            json,
        } => {
            let kvm = vm::Kvm::open()?;
            let c = vm::boot::compare_exit_loops(&kvm, exits, samples as usize)?;
            print(&c, json)?;
            Ok(exit::SUCCESS)
        }
        Cmd::Report {
            quick,
            out,
            kib,
            loops,
            no_linux,
            json,
        } => {
            container::clean_up_on_stop_signals()?;
            let r = report::run(&report::ReportOpts {
                quick,
                out: out.clone(),
                kib,
                loops,
                no_linux,
            })?;
            let files = report::write(&r, &out)?;
            if json {
                print(&r, true)?;
            } else {
                out!("{}", report::markdown(&r));
                eprintln!(
                    "wrote {}",
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(if r.checks.iter().all(|c| c.ok) {
                exit::SUCCESS
            } else {
                exit::ERROR
            })
        }
    }
}
