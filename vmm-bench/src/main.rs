//! vmm-bench: VM vs container vs unikernel, measured on this host. This
//! file only parses the command line; `vmm_bench::commands` does the work.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vmm_bench::{commands, container, report};

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
        path: commands::PathKind,
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
    /// Run a command as a container: new pid, mount, uts, ipc, cgroup (opt.
    /// net) namespaces, a named cgroup v2 leaf with limits, its own
    /// read-only root holding busybox (/bin/sh), own /dev, masked /proc,
    /// read-only /sys, reduced capabilities, no_new_privs, seccomp.
    /// SIGTERM/SIGINT kill it; the leaf is removed afterwards if this
    /// created it.
    Container {
        /// `container` (default), or `namespaced-process`: namespaces and a
        /// leaf only, on the host's file system with full root privileges.
        #[arg(long, value_enum, default_value = "container")]
        mode: ModeArg,
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

/// `container --mode`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    /// A real container.
    Container,
    /// Namespaced process, shared host filesystem.
    NamespacedProcess,
}

impl From<ModeArg> for container::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Container => container::Mode::Container,
            ModeArg::NamespacedProcess => container::Mode::NamespacedProcess,
        }
    }
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

fn main() {
    let code = match dispatch(Cli::parse().cmd) {
        Ok(c) => c,
        Err(e) => commands::exit_code(&e),
    };
    std::process::exit(code);
}

fn dispatch(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Probe { json } => commands::probe(json),
        Cmd::Run {
            path,
            kib,
            loops,
            timeout,
            image,
            json,
        } => commands::run(&commands::RunArgs {
            path,
            kib,
            loops,
            timeout: Duration::from_secs(timeout),
            image,
            json,
        }),
        Cmd::Container {
            mode,
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
                mode: mode.into(),
            };
            commands::container(&opts, quiet, json)
        }
        Cmd::CompareExits {
            exits,
            samples,
            json,
        } => commands::compare_exits(exits, samples as usize, json),
        Cmd::Report {
            quick,
            out,
            kib,
            loops,
            no_linux,
            json,
        } => commands::report(
            &report::ReportOpts {
                quick,
                out,
                kib,
                loops,
                no_linux,
            },
            json,
        ),
    }
}
