//! `hotpatch`: thin command-line front end over the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use hotpatch::commands::{Commands, DryRun, Wait};
use hotpatch::load::LoadOptions;
use hotpatch::module;
use hotpatch::paths::Paths;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "hotpatch",
    version,
    about = "Load, watch, roll back and persist kernel livepatches",
    long_about = "Load, watch, roll back and persist kernel livepatches.\n\n\
A livepatch replaces kernel functions without a reboot. The kernel switches \
each task to the new code only when that task is not running inside a \
patched function; until every task has switched, the patch is \"in \
transition\". hotpatch follows that transition every few milliseconds, names \
the tasks that hold it up, and by default reverses and removes a patch that \
stalls, so the host is left exactly as before.\n\n\
Typical use:\n  \
hotpatch inspect fix.ko        what the module patches, for which kernel\n  \
hotpatch check fix.ko          will it load here? (each check with a reason)\n  \
hotpatch load fix.ko           check, load, wait for the transition\n  \
hotpatch list                  what is patched, by which patch\n  \
hotpatch unload fix            reverse and remove\n  \
hotpatch install fix.ko        re-apply at every boot of this kernel",
    after_help = hotpatch::exitcode::HELP
)]
struct Cli {
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// load, unload, install, uninstall: say what would be checked,
    /// superseded, removed and in which order; change nothing.
    #[arg(long, global = true)]
    dry_run: bool,
    /// Where installed modules, the journal and the lock live.
    #[arg(
        long,
        global = true,
        env = "HOTPATCH_STATE_DIR",
        default_value = "/var/lib/hotpatch"
    )]
    state_dir: PathBuf,
    /// Runtime directory: the host-wide lock (lock/hotpatch.lock) and the
    /// records of what is loaded (for tests against a fake tree).
    #[arg(
        long,
        global = true,
        env = "HOTPATCH_RUN_DIR",
        default_value = "/run",
        hide = true
    )]
    run_dir: PathBuf,
    /// sysfs mount point (for tests against a fake tree).
    #[arg(long, global = true, default_value = "/sys", hide = true)]
    sysfs_root: PathBuf,
    /// procfs mount point (for tests against a fake tree).
    #[arg(long, global = true, default_value = "/proc", hide = true)]
    proc_root: PathBuf,
    /// Directory with config-<release> (expected vermagic flags).
    #[arg(long, global = true, default_value = "/boot", hide = true)]
    boot_dir: PathBuf,
    /// Directory with <release>/kernel/... (the vermagic reference).
    #[arg(long, global = true, default_value = "/lib/modules", hide = true)]
    modules_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct WaitArgs {
    /// Seconds a transition may take before it counts as stalled (0 < S <= 86400).
    #[arg(long, default_value_t = 30.0, value_parser = timeout_secs)]
    timeout: f64,
    /// Milliseconds between polls of the transition attribute (1 to 10000).
    #[arg(long, default_value_t = 15, value_parser = poll_millis)]
    poll_ms: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show what a module file is: name, vermagic, livepatch flag, signature,
    /// the objects and functions it replaces. Reads the file only.
    Inspect { file: PathBuf },
    /// Preflight a module against the running kernel; changes nothing.
    /// Exit 3 when any check fails.
    Check { file: PathBuf },
    /// Check, load and follow the transition; roll back if it stalls.
    Load {
        /// Module file; omit with --installed.
        file: Option<PathBuf>,
        /// Load every module installed for the running kernel (boot-time use;
        /// does nothing when the kernel command line has hotpatch.skip=1).
        #[arg(long, conflicts_with = "file")]
        installed: bool,
        /// With --installed: seconds the whole run may take (0 < S <= 86400).
        /// Each module's --timeout is capped by what is left; modules not
        /// started when it is spent are skipped (exit 3), so the boot unit
        /// finishes before systemd would kill it mid-transition.
        #[arg(long, requires = "installed", value_parser = timeout_secs)]
        budget: Option<f64>,
        #[command(flatten)]
        wait: WaitArgs,
        /// On stall, leave the patch in transition instead of reversing it.
        #[arg(long, conflicts_with = "force")]
        no_rollback: bool,
        /// On stall, force the transition through. DANGEROUS: stalled tasks keep
        /// running old code with no consistency guarantee, and some kernels
        /// never let the module be removed afterwards.
        #[arg(long)]
        force: bool,
        /// Measure what a running workload feels: probe threads report the
        /// largest stall during the transition against an equal baseline.
        #[arg(long)]
        measure: bool,
    },
    /// Disable, wait for the transition and the module's references, remove.
    Unload {
        /// Patch (module) name.
        #[arg(required_unless_present = "all", value_parser = module_name)]
        name: Option<String>,
        /// Every livepatch, top of the stack first.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Enable a patch. A disabled patch is freed by the kernel (its module
    /// stays loaded): hotpatch then removes the module and loads the file it
    /// loaded it from again (same sha256), or says what to run.
    Enable {
        #[arg(value_parser = module_name)]
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Disable a patch and wait for the transition; the module stays loaded.
    Disable {
        #[arg(value_parser = module_name)]
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Every loaded patch, its functions, which patch provides each, taint.
    List,
    /// Is this host as intended? Installed vs loaded, transitions,
    /// unfinished changes, last outcome, taint, kernel build id; exit 0
    /// only when it matches its installed set (else 9).
    Status {
        /// Also write the status as a node_exporter textfile (atomically),
        /// e.g. /var/lib/prometheus/node-exporter/hotpatch.prom.
        #[arg(long, value_name = "FILE")]
        prometheus: Option<PathBuf>,
    },
    /// Keep a module for the kernel release it was built for (its vermagic)
    /// and re-apply it at every boot of that kernel.
    Install { file: PathBuf },
    /// Forget an installed module (does not unload it).
    Uninstall {
        #[arg(value_parser = module_name)]
        name: String,
        /// The kernel release it was installed for (default: the running one).
        #[arg(long = "release", visible_alias = "kernel", value_name = "RELEASE")]
        release: Option<String>,
    },
    /// Show the journal of changes.
    Journal {
        /// Only the last N entries.
        #[arg(long)]
        tail: Option<usize>,
    },
}

/// NAME arguments: a kernel module name, nothing a path could be built
/// from. A bad one is a usage error (exit 2), like any other clap error.
fn module_name(s: &str) -> std::result::Result<String, String> {
    if module::is_module_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a module name: 1 to 55 letters, digits, '_' or '-' (`hotpatch list` shows the loaded ones)"
        ))
    }
}

fn main() {
    let cli = Cli::parse();
    let paths = Paths {
        sys: cli.sysfs_root,
        proc: cli.proc_root,
        boot: cli.boot_dir,
        modules: cli.modules_dir,
        state: cli.state_dir,
        run: cli.run_dir,
    };
    let commands = Commands::new(paths, cli.json);
    let code = if cli.dry_run {
        commands.dry_run(plan_of(cli.cmd))
    } else {
        commands.reconcile_pending();
        run(&commands, cli.cmd)
    }
    .unwrap_or_else(|e| commands.fail(&e));
    std::process::exit(code);
}

/// What `--dry-run` plans, for the commands that have one.
fn plan_of(cmd: Cmd) -> Result<DryRun> {
    Ok(match cmd {
        Cmd::Load {
            file: Some(file), ..
        } => DryRun::Load(file),
        Cmd::Unload { name, all, .. } => DryRun::Unload(name.filter(|_| !all)),
        Cmd::Install { file } => DryRun::Install(file),
        Cmd::Uninstall { name, release } => DryRun::Uninstall(name, release),
        _ => anyhow::bail!("--dry-run is for load FILE, unload, install and uninstall"),
    })
}

fn run(c: &Commands, cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Inspect { file } => c.inspect(&file),
        Cmd::Check { file } => c.check(&file),
        Cmd::Load {
            file,
            installed,
            budget,
            wait,
            no_rollback,
            force,
            measure,
        } => {
            let w = wait.into_wait();
            let opts = LoadOptions {
                timeout: w.timeout,
                poll: w.poll,
                rollback: !no_rollback,
                force,
                measure,
                budget: budget.map(Duration::from_secs_f64),
                ..LoadOptions::default()
            };
            c.load(file, installed, &opts)
        }
        Cmd::Unload { name, all, wait } => c.unload(name.filter(|_| !all), wait.into_wait()),
        Cmd::Enable { name, wait } => c.enable(&name, wait.into_wait()),
        Cmd::Disable { name, wait } => c.disable(&name, wait.into_wait()),
        Cmd::List => c.list(),
        Cmd::Status { prometheus } => c.status(prometheus.as_deref()),
        Cmd::Install { file } => c.install(&file),
        Cmd::Uninstall { name, release } => c.uninstall(&name, release),
        Cmd::Journal { tail } => c.journal(tail),
    }
}

impl WaitArgs {
    fn into_wait(self) -> Wait {
        Wait {
            timeout: Duration::from_secs_f64(self.timeout),
            poll: Duration::from_millis(self.poll_ms),
        }
    }
}

/// `--timeout`: checked by clap, so a bad value is a usage error (exit 2).
fn timeout_secs(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Ok(t),
        _ => Err(format!(
            "--timeout must be more than 0 and at most 86400 seconds, got {s:?}"
        )),
    }
}

/// `--poll-ms`: checked by clap, so a bad value is a usage error (exit 2).
fn poll_millis(s: &str) -> std::result::Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("--poll-ms must be between 1 and 10000, got {s:?}")),
    }
}
