//! `xtask demo`: the main job in one command.
//!
//! 1. Boot the default Debian guest kernel in QEMU with livehost's binaries,
//!    a sample livepatch built from the repo against that kernel, and a
//!    workload (a container from vmm-bench's launcher and a busy loop).
//! 2. In the guest: start the observer, show the behaviour before the fix,
//!    `hotpatch check`, `hotpatch load --measure`, the behaviour after, the
//!    patch status, and the observer's per-container figures.
//! 3. On the host: `vmm-bench report --quick`.
//! 4. Everything into one report directory (Markdown + JSON + SVG charts).

mod demo;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "xtask", about = "livehost orchestration (behind ./x)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Patch a live guest kernel while watching its overhead, then compare
    /// the VM, container and unikernel paths; writes a report directory.
    Demo {
        /// Where to write the report directory (a timestamped folder inside).
        #[arg(long, default_value = "reports")]
        out: PathBuf,
        /// Skip the host-side vmm-bench comparison.
        #[arg(long)]
        no_bench: bool,
        /// Print the report as JSON on stdout as well.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r: Result<i32> = match cli.cmd {
        Cmd::Demo {
            out,
            no_bench,
            json,
        } => demo::run(&out, !no_bench, json),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            std::process::exit(livehost_common::exit::ERROR);
        }
    }
}
