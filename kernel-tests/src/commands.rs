//! What each `kernel-tests` subcommand does; the binary only parses
//! arguments and calls these. Each returns the process exit status.

use crate::{AccelChoice, GuestStatus, KernelSpec, RunOptions};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct RunArgs {
    /// debian:bookworm-cloud (6.1, default), debian:trixie-cloud (6.12), or
    /// PATH[,modules=DIR][,config=FILE] for a bzImage of your own.
    #[arg(long, default_value = "debian:bookworm-cloud")]
    pub kernel: KernelSpec,
    /// auto: KVM only when it really runs Linux here, else TCG.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// Kernel module to load before the command (with its dependencies). Repeatable.
    #[arg(long = "module", value_name = "NAME")]
    pub modules: Vec<String>,
    /// Copy a host file into the guest: SRC:DST. Programs bring their shared libraries. Repeatable.
    #[arg(long = "file", value_name = "SRC:DST")]
    pub files: Vec<String>,
    /// Load KVM inside the guest (emulated SVM under TCG) so nested guests run there.
    #[arg(long)]
    pub with_kvm: bool,
    /// Kernel config option the run needs, e.g. CONFIG_LIVEPATCH. Repeatable.
    #[arg(long = "require", value_name = "CONFIG_X")]
    pub require: Vec<String>,
    /// The command's time limit in seconds (enforced in the guest).
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Extra kernel command-line argument. Repeatable.
    #[arg(long = "append", value_name = "ARG")]
    pub append: Vec<String>,
    /// Save the whole serial console to this file.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Print the outcome as one JSON object instead of the command's output.
    #[arg(long)]
    pub json: bool,
    /// The command to run in the guest (after --).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `fetch`: the kernel into the cache; where its parts are.
pub fn fetch(kernel: &KernelSpec, json: bool) -> Result<i32> {
    let k = crate::fetch(kernel)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "release": k.release, "package_version": k.package_version,
                "bzimage": k.bzimage, "modules_dir": k.modules_dir,
                "headers_dir": k.headers_dir, "config": k.config,
            })
        );
    } else {
        println!("kernel  {}", k.release);
        println!("image   {}", k.bzimage.display());
        if let Some(m) = &k.modules_dir {
            println!("modules {}", m.display());
        }
        if let Some(h) = &k.headers_dir {
            println!("headers {}", h.display());
        }
    }
    Ok(0)
}

/// `build-module`: each `.ko` built from `src`, one path a line.
pub fn build_module(kernel: &KernelSpec, src: &Path) -> Result<i32> {
    let k = crate::fetch(kernel)?;
    for ko in crate::module::build_all(&k, src)? {
        println!("{}", ko.display());
    }
    Ok(0)
}

/// `probe`: whether KVM can boot Linux here (exit 0) or not (1), and why.
pub fn probe(json: bool) -> Result<i32> {
    let p = crate::accel::probe_kvm();
    let lm = crate::accel::probe_long_mode();
    if json {
        let lm = match &lm {
            Ok(l) => serde_json::to_value(l)?,
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        println!(
            "{}",
            serde_json::json!({
                "linux_boot": {
                    "usable": p.native,
                    "reason": p.reason,
                    "ns_per_iteration": p.ns_per_iteration,
                    "probe_us": p.probe_us,
                },
                "long_mode": lm,
            })
        );
    } else {
        println!(
            "{}: {} (probe took {} µs)",
            if p.native {
                "KVM usable for Linux guests"
            } else {
                "KVM not usable for Linux guests"
            },
            p.reason,
            p.probe_us
        );
        match lm {
            Ok(l) => println!(
                "64-bit guest: ran to its first exit in {} µs after VM creation{}",
                l.create_to_first_exit_us,
                if l.halted {
                    ", then halted"
                } else {
                    ", but did not halt as expected"
                }
            ),
            Err(e) => println!("64-bit guest: failed: {e:#}"),
        }
    }
    Ok(if p.native { 0 } else { 1 })
}

/// `run`: one command in a guest; its exit status is ours.
pub fn run(a: RunArgs) -> Result<i32> {
    let mut opts = RunOptions::new(a.command);
    opts.kernel = a.kernel;
    opts.accel = a.accel;
    opts.modules = a.modules;
    opts.with_kvm = a.with_kvm;
    opts.require_config = a.require;
    opts.timeout = Duration::from_secs(a.timeout);
    opts.memory_mb = a.memory;
    opts.cpus = a.cpus;
    opts.kernel_args = a.append;
    opts.progress = true;
    for f in &a.files {
        let (src, dst) = f
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("--file {f:?}: expected SRC:DST"))?;
        opts.files.push((PathBuf::from(src), dst.to_string()));
    }
    let out = crate::run(&opts)?;
    if let Some(p) = &a.console {
        std::fs::write(p, &out.console)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", out.stdout);
        eprint!("{}", out.stderr);
        let t = &out.timings;
        eprintln!(
            "[guest] {} on {} ({}), {} boot: {:?}; boot to command {:.0} ms (QEMU {:.0} + kernel {:.0} + init {:.0}), total {:.0} ms",
            out.release,
            out.accel,
            out.accel_reason,
            out.boot,
            out.status,
            t.boot_to_command_ms.unwrap_or(f64::NAN),
            t.qemu_start_ms.unwrap_or(f64::NAN),
            t.kernel_boot_ms.unwrap_or(f64::NAN),
            t.init_to_command_ms.unwrap_or(f64::NAN),
            t.total_ms
        );
        match out.status {
            GuestStatus::Exited(_) => {}
            _ => {
                eprintln!("--- last console lines:\n{}", out.console_tail(30));
            }
        }
        if out.oops {
            eprintln!("[guest] warning: the kernel printed an oops/BUG/WARNING; see the console");
        }
    }
    Ok(out.status.exit_code())
}

/// `bench-boot`: the boot phases of `runs` guests running `true`.
pub fn bench_boot(kernel: KernelSpec, accel: AccelChoice, runs: usize, json: bool) -> Result<i32> {
    let mut opts = RunOptions::new(["true"]);
    opts.kernel = kernel;
    opts.accel = accel;
    let mut phases: Vec<[f64; 5]> = Vec::new();
    let mut last = None;
    for i in 0..runs.max(1) {
        eprintln!("[bench-boot] run {}/{}", i + 1, runs.max(1));
        let out = crate::run(&opts)?;
        out.success()?;
        let t = &out.timings;
        phases.push([
            t.boot_to_command_ms.unwrap_or(f64::NAN),
            t.qemu_start_ms.unwrap_or(f64::NAN),
            t.kernel_boot_ms.unwrap_or(f64::NAN),
            t.init_to_command_ms.unwrap_or(f64::NAN),
            t.total_ms,
        ]);
        last = Some(out);
    }
    let last = last.expect("at least one run");
    let names = [
        "boot_to_command_ms",
        "qemu_start_ms",
        "kernel_boot_ms",
        "init_to_command_ms",
        "total_ms",
    ];
    let mut summary = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        summary.insert(
            n.to_string(),
            serde_json::json!({ "median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1] }),
        );
    }
    let doc = serde_json::json!({
        "release": last.release,
        "accel": last.accel,
        "accel_reason": last.accel_reason,
        "boot": last.boot,
        "runs": phases.len(),
        "phases": summary,
    });
    if json {
        println!("{doc}");
    } else {
        println!(
            "boot to command, {} runs, kernel {} under {}",
            phases.len(),
            last.release,
            last.accel
        );
        println!("{:<22} {:>9} {:>9} {:>9}", "phase", "median", "min", "max");
        for n in names {
            let p = &doc["phases"][n];
            println!(
                "{:<22} {:>7.0}ms {:>7.0}ms {:>7.0}ms",
                n,
                p["median"].as_f64().unwrap_or(f64::NAN),
                p["min"].as_f64().unwrap_or(f64::NAN),
                p["max"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!("({}; {} boot)", last.accel_reason, last.boot);
    }
    Ok(0)
}
