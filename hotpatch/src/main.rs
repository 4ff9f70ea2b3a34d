//! `hotpatch`: thin command-line front end over the library.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hotpatch::check::{Preflight, Status as CheckStatus};
use hotpatch::ops::{self, LoadOptions, LoadReport, Outcome};
use hotpatch::paths::Paths;
use hotpatch::{module, state};
use livehost_common::exit;
use livehost_common::progress::Progress;
use serde::Serialize;
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
    after_help = "Exit codes: 0 success, 1 error, 2 usage (bad arguments or option values), \
3 preflight refused (nothing changed), 4 transition stalled and rolled back \
(kernel as before).\n\n\
Every change is journalled to <state-dir>/journal.jsonl (see `hotpatch journal`)."
)]
struct Cli {
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Where installed modules, the journal and the lock live.
    #[arg(
        long,
        global = true,
        env = "HOTPATCH_STATE_DIR",
        default_value = "/var/lib/hotpatch"
    )]
    state_dir: PathBuf,
    /// sysfs mount point (for tests against a fake tree).
    #[arg(long, global = true, default_value = "/sys", hide = true)]
    sysfs_root: PathBuf,
    /// procfs mount point (for tests against a fake tree).
    #[arg(long, global = true, default_value = "/proc", hide = true)]
    proc_root: PathBuf,
    /// Directory with config-<release> (expected vermagic flags).
    #[arg(long, global = true, default_value = "/boot", hide = true)]
    boot_dir: PathBuf,
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
    #[command(visible_alias = "status")]
    List,
    /// Keep a module for the kernel release it was built for (its vermagic)
    /// and re-apply it at every boot of that kernel.
    Install { file: PathBuf },
    /// Forget an installed module (does not unload it).
    Uninstall {
        #[arg(value_parser = module_name)]
        name: String,
        /// The kernel release it was installed for (default: the running one).
        #[arg(long)]
        kernel: Option<String>,
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
    let json = cli.json;
    let code = match run(cli) {
        Ok(c) => c,
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("hotpatch: error: {e:#}");
            }
            exit::ERROR
        }
    };
    std::process::exit(code);
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn need_root(what: &str) -> Result<()> {
    if !livehost_common::is_root() {
        bail!("{what} changes the kernel and needs root (CAP_SYS_MODULE): run it with sudo");
    }
    Ok(())
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

fn wait_of(w: &WaitArgs) -> Result<(Duration, Duration)> {
    Ok((
        Duration::from_secs_f64(w.timeout),
        Duration::from_millis(w.poll_ms),
    ))
}

const LOCK_WAIT: Duration = Duration::from_secs(10);

fn run(cli: Cli) -> Result<i32> {
    let paths = Paths {
        sys: cli.sysfs_root,
        proc: cli.proc_root,
        boot: cli.boot_dir,
        state: cli.state_dir,
    };
    let json = cli.json;
    let progress = if json {
        Progress::silent()
    } else {
        Progress::new("hotpatch")
    };
    match cli.cmd {
        Cmd::Inspect { file } => {
            let info = module::inspect_file(&file)?;
            if json {
                print_json(&info)?;
            } else {
                print_inspect(&info);
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Check { file } => {
            let info = module::inspect_file(&file)?;
            let pre = hotpatch::check::preflight(&paths, &info);
            if json {
                print_json(&pre)?;
            } else {
                print_preflight(&pre);
            }
            Ok(if pre.ok { exit::SUCCESS } else { exit::REFUSED })
        }
        Cmd::Load {
            file,
            installed,
            wait,
            no_rollback,
            force,
            measure,
        } => {
            need_root("hotpatch load")?;
            let (timeout, poll) = wait_of(&wait)?;
            let opts = LoadOptions {
                timeout,
                poll,
                rollback: !no_rollback,
                force,
                measure,
                expected_sha256: None,
                journal_op: "load",
            };
            let _lock = state::lock(&paths, LOCK_WAIT)?;
            if installed {
                return load_installed(&paths, &opts, &progress, json);
            }
            let file = file.context("name a module file, or use --installed")?;
            let r = ops::load(&paths, &file, &opts, &progress)?;
            if json {
                print_json(&r)?;
            } else {
                print_load(&r);
            }
            Ok(r.outcome.exit_code())
        }
        Cmd::Unload { name, all, wait } => {
            need_root("hotpatch unload")?;
            let (timeout, poll) = wait_of(&wait)?;
            let _lock = state::lock(&paths, LOCK_WAIT)?;
            let names = if all {
                ops::unload_order(&paths)
            } else {
                vec![name.unwrap_or_default()]
            };
            let mut reports = Vec::new();
            let mut code = exit::SUCCESS;
            for n in &names {
                match ops::unload(&paths, n, timeout, poll, &progress) {
                    Ok(r) => {
                        if !json {
                            r.messages.iter().for_each(|m| println!("{m}"));
                        }
                        reports.push(serde_json::to_value(&r)?);
                    }
                    Err(e) if !all => return Err(e),
                    Err(e) => {
                        // --all keeps going so one stuck patch does not pin the rest,
                        // but the exit code reports it.
                        code = exit::ERROR;
                        if !json {
                            eprintln!("hotpatch: error: {e:#}");
                        }
                        reports.push(serde_json::json!({ "module": n, "error": format!("{e:#}") }));
                    }
                }
            }
            if json {
                print_json(&reports)?;
            } else if names.is_empty() {
                println!("no livepatch modules loaded");
            }
            Ok(code)
        }
        Cmd::Enable { name, wait } => {
            need_root("hotpatch enable")?;
            let (timeout, poll) = wait_of(&wait)?;
            let _lock = state::lock(&paths, LOCK_WAIT)?;
            change_out(ops::enable(&paths, &name, timeout, poll, &progress)?, json)
        }
        Cmd::Disable { name, wait } => {
            need_root("hotpatch disable")?;
            let (timeout, poll) = wait_of(&wait)?;
            let _lock = state::lock(&paths, LOCK_WAIT)?;
            change_out(ops::disable(&paths, &name, timeout, poll, &progress)?, json)
        }
        Cmd::List => {
            let s = ops::status(&paths);
            if json {
                print_json(&s)?;
            } else {
                print_status(&s);
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Install { file } => {
            let info = module::inspect_file(&file)?;
            if !info.livepatch {
                bail!(
                    "{} is not a livepatch module (no livepatch=Y); refusing to install it",
                    file.display()
                );
            }
            let name = info.name.clone().context(
                "module has no usable name (neither struct module's name nor modinfo name= is a valid module name); refusing to install it",
            )?;
            // Filed under the release the module is built for: a patch for
            // the next kernel is installed before rebooting into it.
            let running = paths.release()?;
            let mut messages = Vec::new();
            let release = match info
                .vermagic
                .as_deref()
                .and_then(|v| v.split_whitespace().next())
            {
                Some(r) => {
                    state::check_release(r)
                        .context("the module's vermagic does not start with a kernel release")?;
                    r.to_string()
                }
                None => {
                    messages.push(format!("warning: {name} has no vermagic; installed for the running kernel {running}"));
                    running.clone()
                }
            };
            if release != running {
                messages.push(format!(
                    "note: {name} is built for kernel {release}, not the running {running}: installed for {release}; it will be applied when {release} boots (not now, not on this kernel)"
                ));
            }
            let _lock = state::lock(&paths, LOCK_WAIT)?;
            let e = state::install(&paths, &release, &name, &info.sha256, &file)?;
            messages.extend(state::record(
                &paths,
                "install",
                Some(&name),
                Some(&info.sha256),
                "ok",
                None,
                serde_json::json!({ "kernel": release, "running": running, "source": e.source }),
            ));
            if json {
                print_json(&serde_json::json!({
                    "kernel": release,
                    "running_kernel": running,
                    "installed": e,
                    "messages": messages,
                }))?;
            } else {
                println!(
                    "installed {name} for kernel {release} (sha256 {}); `hotpatch load --installed` applies it at boot",
                    &info.sha256[..16]
                );
                messages.iter().for_each(|m| eprintln!("{m}"));
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Uninstall { name, kernel } => {
            let release = match kernel {
                Some(k) => k,
                None => paths.release()?,
            };
            let _lock = state::lock(&paths, LOCK_WAIT)?;
            let e = state::uninstall(&paths, &release, &name)?;
            state::record(
                &paths,
                "uninstall",
                Some(&name),
                Some(&e.sha256),
                "ok",
                None,
                serde_json::json!({ "kernel": release }),
            );
            if json {
                print_json(&serde_json::json!({ "kernel": release, "uninstalled": e }))?;
            } else {
                println!(
                    "uninstalled {name} for kernel {release} (still loaded if it was; `hotpatch unload {name}` removes it)"
                );
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Journal { tail } => {
            let mut j = state::read_journal(&paths)?;
            if let Some(n) = tail {
                let skip = j.len().saturating_sub(n);
                j.drain(..skip);
            }
            if json {
                print_json(&j)?;
            } else {
                for e in j {
                    println!(
                        "{:.3} {} {} {} {}{}",
                        e.time,
                        e.user,
                        e.op,
                        e.module.as_deref().unwrap_or("-"),
                        e.result,
                        e.duration_ms
                            .map(|d| format!(" {d:.1}ms"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(exit::SUCCESS)
        }
    }
}

fn change_out(r: ops::ChangeReport, json: bool) -> Result<i32> {
    if json {
        print_json(&r)?;
    } else {
        if let Some(l) = &r.load
            && l.outcome != Outcome::Loaded
        {
            print_load(l);
        }
        r.messages.iter().for_each(|m| println!("{m}"));
        if let Some(t) = r.transition_ms {
            println!("transition took {t:.1} ms");
        }
    }
    Ok(r.exit_code())
}

#[derive(Serialize)]
struct InstalledRun {
    kernel: String,
    skipped: Option<String>,
    results: Vec<serde_json::Value>,
}

/// Boot-time re-apply: every installed module of this kernel, in install
/// order; one failure does not stop the rest, the exit code reports the worst.
fn load_installed(
    paths: &Paths,
    opts: &LoadOptions,
    progress: &Progress,
    json: bool,
) -> Result<i32> {
    let release = paths.release()?;
    let mut run = InstalledRun {
        kernel: release.clone(),
        skipped: None,
        results: Vec::new(),
    };
    if hotpatch::boot_skip_requested(&paths.cmdline()) {
        run.skipped = Some(format!("kernel command line has {}", hotpatch::SKIP_SWITCH));
        if json {
            print_json(&run)?;
        } else {
            println!(
                "skipping installed patches: kernel command line has {}",
                hotpatch::SKIP_SWITCH
            );
        }
        state::record(
            paths,
            "load-installed",
            None,
            None,
            "ok",
            None,
            serde_json::json!({ "skipped": hotpatch::SKIP_SWITCH }),
        );
        return Ok(exit::SUCCESS);
    }
    let m = state::read_manifest(paths, &release)?;
    let mut code = exit::SUCCESS;
    for e in &m.modules {
        let file = paths.installed_dir(&release).join(&e.file);
        if let Some(rec) = state::loaded_record(paths, &e.name)
            && paths.patch(&e.name).is_some()
            && rec.sha256 == e.sha256
        {
            run.results
                .push(serde_json::json!({ "module": e.name, "outcome": Outcome::AlreadyLoaded }));
            if !json {
                println!("{}: already loaded from the same file", e.name);
            }
            continue;
        }
        let opts = LoadOptions {
            expected_sha256: Some(e.sha256.clone()),
            ..opts.clone()
        };
        match ops::load(paths, &file, &opts, progress) {
            Ok(r) => {
                if !json {
                    print_load(&r);
                }
                if r.outcome.exit_code() != exit::SUCCESS {
                    code = code.max(r.outcome.exit_code());
                }
                run.results.push(serde_json::to_value(&r)?);
            }
            Err(err) => {
                code = code.max(exit::ERROR);
                if !json {
                    eprintln!("hotpatch: error: {}: {err:#}", e.name);
                }
                run.results
                    .push(serde_json::json!({ "module": e.name, "error": format!("{err:#}") }));
            }
        }
    }
    if json {
        print_json(&run)?;
    } else if m.modules.is_empty() {
        println!("no modules installed for kernel {release}");
    }
    Ok(code)
}

fn print_inspect(i: &module::ModuleInfo) {
    let o = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    println!("name:        {}", o(&i.name));
    println!("vermagic:    {}", o(&i.vermagic).trim_end());
    println!("livepatch:   {}", if i.livepatch { "yes" } else { "no" });
    println!("license:     {}", o(&i.license));
    println!(
        "depends:     {}",
        if i.depends.is_empty() {
            "-".into()
        } else {
            i.depends.join(",")
        }
    );
    println!("srcversion:  {}", o(&i.srcversion));
    println!(
        "signature:   {}",
        i.signature.as_ref().map_or("none".to_string(), |s| format!(
            "{} ({} bytes)",
            s.id_type, s.signature_len
        ))
    );
    println!("sha256:      {}", i.sha256);
    if let Some(r) = i.replace {
        println!(
            "replace:     {}",
            if r {
                "yes (atomic replace)"
            } else {
                "no (stacks)"
            }
        );
    }
    for obj in &i.objects {
        println!("object {}:", obj.name);
        for f in &obj.functions {
            println!(
                "  {}{} -> {}",
                f.name,
                if f.sympos > 0 {
                    format!(",{}", f.sympos)
                } else {
                    String::new()
                },
                f.replacement.as_deref().unwrap_or("?")
            );
        }
    }
    if !i.klp_rela_objects.is_empty() {
        println!("klp relocations for: {}", i.klp_rela_objects.join(", "));
    }
    for s in &i.klp_symbols {
        println!("klp symbol: {}:{},{}", s.object, s.name, s.sympos);
    }
    for w in &i.warnings {
        println!("warning: {w}");
    }
}

fn print_preflight(p: &Preflight) {
    for c in &p.checks {
        let tag = match c.status {
            CheckStatus::Pass => "pass",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "FAIL",
        };
        println!("{tag}  {:<16} {}", c.id, c.detail);
    }
    println!(
        "{}",
        if p.ok {
            "preflight passed".to_string()
        } else {
            format!(
                "refused: {} check(s) failed; nothing was changed",
                p.failures().count()
            )
        }
    );
}

fn print_load(r: &LoadReport) {
    let name = r.module.as_deref().unwrap_or("?");
    match r.outcome {
        Outcome::Refused => {
            print_preflight(&r.preflight);
        }
        Outcome::Loaded => {
            println!(
                "{name}: patched; transition complete in {:.1} ms (finit_module {:.1} ms)",
                r.transition_ms.unwrap_or(0.0),
                r.load_syscall_ms.unwrap_or(0.0)
            );
            for g in &r.replaced_removed {
                println!("{name}: removed module {g}, superseded by this atomic-replace patch");
            }
        }
        Outcome::AlreadyLoaded => println!("{name}: already loaded"),
        Outcome::RolledBack | Outcome::Stalled | Outcome::Forced => {
            println!("{name}: transition stalled; tasks not switched:");
            for t in &r.stalled_tasks {
                println!(
                    "  pid {} tid {} {} (patch_state {})",
                    t.pid, t.tid, t.comm, t.patch_state
                );
                for f in t.stack.iter().take(12) {
                    println!("      {f}");
                }
            }
            if let Some(ms) = r.rollback_ms {
                println!("{name}: rolled back in {ms:.1} ms");
            }
        }
    }
    if let Some(m) = &r.measure {
        println!("interruption probe ({}):", m.environment.label);
        println!(
            "  during transition: max gap {:.0} µs, max sleep overshoot {:.0} µs over {:.0} ms",
            m.transition.spin_max_gap_us,
            m.transition.sleep_max_overshoot_us,
            m.transition.duration_ms
        );
        println!(
            "  baseline:          max gap {:.0} µs, max sleep overshoot {:.0} µs over {:.0} ms",
            m.baseline.spin_max_gap_us, m.baseline.sleep_max_overshoot_us, m.baseline.duration_ms
        );
        println!(
            "  added stall: {:.0} µs (sleep: {:.0} µs)",
            m.added_stall_us, m.added_sleep_overshoot_us
        );
    }
    for m in &r.messages {
        println!("{m}");
    }
}

fn print_status(s: &ops::Status) {
    if !s.livepatch_supported {
        println!(
            "this kernel has no /sys/kernel/livepatch (CONFIG_LIVEPATCH off, or no module support)"
        );
    }
    println!("kernel: {}", s.kernel.as_deref().unwrap_or("?"));
    if s.patches.is_empty() {
        println!("no live patches loaded");
    }
    for p in &s.patches {
        let st = &p.patch;
        let mut flags = vec![
            if st.enabled == Some(true) {
                "enabled"
            } else {
                "disabled"
            }
            .to_string(),
        ];
        if st.transition == Some(true) {
            flags.push(format!(
                "IN TRANSITION ({} task(s) pending)",
                p.pending_tasks.unwrap_or(0)
            ));
        }
        if st.replace == Some(true) {
            flags.push("replace".into());
        }
        println!(
            "#{} {} [{}]{}",
            p.stack_position,
            st.name,
            flags.join(", "),
            p.sha256
                .as_ref()
                .map(|h| format!(" sha256 {}", &h[..16.min(h.len())]))
                .unwrap_or_default()
        );
        for o in &st.objects {
            let fs: Vec<String> = o.functions.iter().map(|f| f.name.clone()).collect();
            println!(
                "    {}{}: {}",
                o.name,
                match o.patched {
                    Some(false) => " (not loaded)",
                    _ => "",
                },
                fs.join(", ")
            );
        }
    }
    if !s.functions.is_empty() {
        println!("functions:");
        for f in &s.functions {
            println!(
                "    {}:{} <- {}{}",
                f.object,
                f.function,
                f.provided_by,
                if f.also_in.is_empty() {
                    String::new()
                } else {
                    format!(" (also in {})", f.also_in.join(", "))
                }
            );
        }
    }
    for m in &s.leftover_modules {
        println!(
            "leftover livepatch module {m}: patch freed, module still loaded (`hotpatch unload {m}`)"
        );
    }
    println!(
        "taint: {}{}",
        s.tainted.map_or("?".into(), |t| t.to_string()),
        if s.taint_flags.is_empty() {
            String::new()
        } else {
            format!(" = {}", s.taint_flags.join(", "))
        }
    );
}
