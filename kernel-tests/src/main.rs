//! `kernel-tests`: boot a Debian kernel in QEMU and run a command in it.

use anyhow::Result;
use clap::{Parser, Subcommand};
use kernel_tests::commands::{self, RunArgs};
use kernel_tests::{AccelChoice, KernelSpec};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kernel-tests",
    version,
    about = "Boot a real Linux kernel in QEMU and run commands in it",
    long_about = "Boot a real Linux kernel in QEMU and run commands in it.\n\n\
        The kernel is a Debian cloud kernel fetched with apt (cached in $LIVEHOST_CACHE) or a \
        bzImage of your own. The guest is a busybox initramfs built on the fly with your files \
        and modules; the command's stdout, stderr and exit status come back exactly, over a \
        second serial port. KVM is used only when it can really boot Linux here; otherwise TCG.",
    after_help = "Examples:\n  \
        kernel-tests run -- uname -r\n  \
        kernel-tests run --module kvm_amd --with-kvm -- ls -l /dev/kvm\n  \
        kernel-tests run --file ./my.ko:/root/my.ko -- insmod /root/my.ko\n  \
        kernel-tests run --kernel debian:trixie-cloud --json -- cat /proc/version\n  \
        kernel-tests build-module --kernel debian:bookworm-cloud path/to/module-src\n  \
        kernel-tests probe          # exit 0 when KVM can boot Linux here\n\n\
        Exit status: the guest command's own; 124 timeout or hang, 125 kernel panic, \
        126 guest setup failed, 1 error before booting."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest and run one command in it.
    Run(RunArgs),
    /// Fetch a kernel into the cache and print where it is.
    Fetch {
        #[arg(long, default_value = "debian:bookworm-cloud")]
        kernel: KernelSpec,
        #[arg(long)]
        json: bool,
    },
    /// Build an out-of-tree module from a source directory against a guest kernel.
    BuildModule {
        #[arg(long, default_value = "debian:bookworm-cloud")]
        kernel: KernelSpec,
        /// Directory with a Kbuild or Makefile setting obj-m.
        src: PathBuf,
    },
    /// Benchmark boot-to-command time: boot N guests running `true`, report
    /// the median and minimum of each phase (QEMU start, kernel boot, init).
    BenchBoot {
        #[arg(long, default_value = "debian:bookworm-cloud")]
        kernel: KernelSpec,
        #[arg(long, default_value = "auto")]
        accel: AccelChoice,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Say whether KVM can boot Linux on this machine, and why.
    Probe {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kernel-tests: error: {e:#}");
            std::process::exit(livehost_common::exit::ERROR);
        }
    }
}

fn real_main(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Run(a) => commands::run(a),
        Cmd::Fetch { kernel, json } => commands::fetch(&kernel, json),
        Cmd::BuildModule { kernel, src } => commands::build_module(&kernel, &src),
        Cmd::BenchBoot {
            kernel,
            accel,
            runs,
            json,
        } => commands::bench_boot(kernel, accel, runs, json),
        Cmd::Probe { json } => commands::probe(json),
    }
}
