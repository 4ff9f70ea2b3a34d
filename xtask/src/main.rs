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
        /// Print the report as JSON on stdout instead of the Markdown (stdout
        /// then carries the JSON alone; everything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
}

/// For `--json`: keep the real stdout for the JSON alone and point fd 1 at
/// stderr for the whole run, so nothing this process, a library or a child
/// prints (build tools, dpkg, vmm-bench) can get into it.
fn take_stdout() -> Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::{AsFd, AsRawFd};
    // dup2(2) from the C library std already links (no extra crate).
    unsafe extern "C" {
        fn dup2(old: i32, new: i32) -> i32;
    }
    std::io::stdout().flush()?;
    // A close-on-exec copy of the real stdout: children never get it.
    let real = std::io::stdout().as_fd().try_clone_to_owned()?;
    // SAFETY: makes fd 1 a copy of fd 2; both are this process's own
    // standard descriptors, and `real` keeps the original open.
    if unsafe { dup2(std::io::stderr().as_fd().as_raw_fd(), 1) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(std::fs::File::from(real))
}

fn main() {
    let cli = Cli::parse();
    let r: Result<i32> = match cli.cmd {
        Cmd::Demo {
            out,
            no_bench,
            json,
        } => (|| {
            let json_out = if json { Some(take_stdout()?) } else { None };
            demo::run(&out, !no_bench, json_out)
        })(),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            std::process::exit(livehost_common::exit::ERROR);
        }
    }
}
