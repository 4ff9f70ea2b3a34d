//! One function per `hotpatch` subcommand: run it through the library,
//! print its JSON (`--json`) or text, and return the exit status. The
//! binary (src/main.rs) only parses arguments and calls these.

use crate::boot::{self, InstalledResult};
use crate::change::{self, Change, ChangeReport, UnloadResult};
use crate::install;
use crate::list;
use crate::load::{self, LoadOptions};
use crate::module;
use crate::output::Text;
use crate::paths::Paths;
use crate::state;
use anyhow::{Context, Result, bail};
use livehost_common::exit;
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What every command prints with `--json` when it fails (exit 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReport {
    pub error: String,
}

/// How long each wait of a reconciliation may take.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a transition may take, and how often to look.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    pub timeout: Duration,
    pub poll: Duration,
}

/// A command run with `--dry-run`.
pub enum DryRun {
    Load(PathBuf),
    /// `None`: `unload --all`.
    Unload(Option<String>),
    Install(PathBuf),
    Uninstall(String, Option<String>),
}

/// Where to look and how to print: shared by every command.
pub struct Commands {
    pub paths: Paths,
    pub json: bool,
    progress: Progress,
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

impl Commands {
    pub fn new(paths: Paths, json: bool) -> Commands {
        let progress = if json {
            Progress::silent()
        } else {
            Progress::new("hotpatch")
        };
        Commands {
            paths,
            json,
            progress,
        }
    }

    /// Before any command: find changes an earlier run began and never
    /// finished (it was killed), settle them and say what was found and
    /// done, on stderr (stdout stays the command's own output). Skipped
    /// while another run holds the lock: the change is that run's own.
    pub fn reconcile_pending(&self) {
        let Ok(j) = state::read_journal(&self.paths) else {
            return;
        };
        let n = crate::reconcile::unfinished(&j).len();
        if n == 0 {
            return;
        }
        if !livehost_common::is_root() {
            eprintln!(
                "hotpatch: the journal has {n} change(s) an earlier run began and did not finish; run any hotpatch command as root to reconcile them"
            );
            return;
        }
        let Ok(_lock) = state::lock(&self.paths, Duration::ZERO) else {
            return;
        };
        for r in crate::reconcile::reconcile(&self.paths, RECONCILE_TIMEOUT, &self.progress) {
            eprintln!("{}", r.line());
        }
    }

    /// Print `v` as JSON, or as text with `text`.
    fn print<T: Serialize>(&self, v: &T, text: impl FnOnce(&T)) -> Result<()> {
        if self.json {
            print_json(v)
        } else {
            text(v);
            Ok(())
        }
    }

    /// Say why a command failed, as JSON or on stderr; the exit status.
    pub fn fail(&self, e: &anyhow::Error) -> i32 {
        if self.json {
            let r = ErrorReport {
                error: format!("{e:#}"),
            };
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            eprintln!("hotpatch: error: {e:#}");
        }
        exit::ERROR
    }

    pub fn inspect(&self, file: &Path) -> Result<i32> {
        let info = module::inspect_file(file)?;
        self.print(&info, |i| print!("{}", Text(i)))?;
        Ok(exit::SUCCESS)
    }

    pub fn check(&self, file: &Path) -> Result<i32> {
        let info = module::inspect_file(file)?;
        let pre = crate::check::preflight(&self.paths, &info);
        self.print(&pre, |p| print!("{}", Text(p)))?;
        Ok(if pre.ok { exit::SUCCESS } else { exit::REFUSED })
    }

    /// `load FILE`, or `load --installed`.
    pub fn load(&self, file: Option<PathBuf>, installed: bool, opts: &LoadOptions) -> Result<i32> {
        need_root("hotpatch load")?;
        let _lock = state::lock(&self.paths, state::LOCK_WAIT)?;
        // From here a signal reverses what is in flight instead of killing us.
        crate::signals::catch();
        if installed {
            return self.load_installed(opts);
        }
        let file = file.context("name a module file, or use --installed")?;
        let r = load::load(&self.paths, &file, opts, &self.progress)?;
        self.print(&r, |r| print!("{}", Text(r)))?;
        Ok(r.outcome.exit_code())
    }

    fn load_installed(&self, opts: &LoadOptions) -> Result<i32> {
        let run = boot::load_installed(&self.paths, opts, &self.progress, |r| {
            if !self.json {
                print_installed(r);
            }
        })?;
        self.print(&run, |run| {
            if run.skipped.is_some() {
                println!(
                    "skipping installed patches: kernel command line has {}",
                    boot::SKIP_SWITCH
                );
            } else if run.results.is_empty() {
                println!("no modules installed for kernel {}", run.release);
            }
        })?;
        Ok(run.exit_code())
    }

    /// `unload NAME`, or with no name `unload --all`.
    pub fn unload(&self, name: Option<String>, wait: Wait) -> Result<i32> {
        need_root("hotpatch unload")?;
        let _lock = state::lock(&self.paths, state::LOCK_WAIT)?;
        // From here a signal reverses what is in flight instead of killing us.
        crate::signals::catch();
        let all = name.is_none();
        let names = match name {
            Some(n) => vec![n],
            None => change::unload_order(&self.paths),
        };
        let results = change::unload_each(
            &self.paths,
            &names,
            all,
            wait.timeout,
            wait.poll,
            &self.progress,
            |r| match r {
                _ if self.json => {}
                UnloadResult::Unloaded(r) => r.messages.iter().for_each(|m| println!("{m}")),
                UnloadResult::Failed(e) => eprintln!("hotpatch: error: {}", e.error),
            },
        )?;
        self.print(&results, |_| {
            if names.is_empty() {
                println!("no livepatch modules loaded");
            }
        })?;
        Ok(change::unload_exit_code(&results))
    }

    pub fn enable(&self, name: &str, wait: Wait) -> Result<i32> {
        need_root("hotpatch enable")?;
        let _lock = state::lock(&self.paths, state::LOCK_WAIT)?;
        // From here a signal reverses what is in flight instead of killing us.
        crate::signals::catch();
        let r = self.change(name, wait).enable()?;
        self.changed(&r)
    }

    pub fn disable(&self, name: &str, wait: Wait) -> Result<i32> {
        need_root("hotpatch disable")?;
        let _lock = state::lock(&self.paths, state::LOCK_WAIT)?;
        // From here a signal reverses what is in flight instead of killing us.
        crate::signals::catch();
        let r = self.change(name, wait).disable()?;
        self.changed(&r)
    }

    fn change<'a>(&'a self, name: &'a str, wait: Wait) -> Change<'a> {
        Change {
            paths: &self.paths,
            name,
            timeout: wait.timeout,
            poll: wait.poll,
            progress: &self.progress,
        }
    }

    fn changed(&self, r: &ChangeReport) -> Result<i32> {
        self.print(r, |r| print!("{}", Text(r)))?;
        Ok(r.exit_code())
    }

    pub fn list(&self) -> Result<i32> {
        let s = list::status(&self.paths);
        self.print(&s, |s| print!("{}", Text(s)))?;
        Ok(exit::SUCCESS)
    }

    /// `--dry-run`: print the plan; nothing is changed, locked or
    /// journalled. Exit 3 when the command would refuse.
    pub fn dry_run(&self, what: Result<DryRun>) -> Result<i32> {
        let p = match what? {
            DryRun::Load(f) => crate::plan::load(&self.paths, &f)?,
            DryRun::Unload(n) => crate::plan::unload(&self.paths, n.as_deref()),
            DryRun::Install(f) => crate::plan::install(&self.paths, &f)?,
            DryRun::Uninstall(n, r) => crate::plan::uninstall(&self.paths, &n, r)?,
        };
        self.print(&p, |p| {
            if let Some(pre) = &p.preflight {
                print!("{}", Text(pre));
            }
            println!("dry run of {}: nothing was changed", p.command);
            for (i, s) in p.steps.iter().enumerate() {
                println!("  {}. {s}", i + 1);
            }
        })?;
        Ok(p.exit_code())
    }

    /// `status`: is the host as intended? Exit 0 only when it is.
    pub fn status(&self, prometheus: Option<&Path>) -> Result<i32> {
        let s = crate::status::host_status(&self.paths);
        if let Some(f) = prometheus {
            crate::prometheus::write(&s, f)?;
        }
        self.print(&s, |s| print!("{}", Text(s)))?;
        Ok(s.exit_code())
    }

    pub fn install(&self, file: &Path) -> Result<i32> {
        let r = install::install(&self.paths, file)?;
        self.print(&r, |r| {
            let e = &r.installed;
            println!(
                "installed {} for kernel {} (sha256 {}); `hotpatch load --installed` applies it at boot",
                e.name,
                r.release,
                &e.sha256[..16.min(e.sha256.len())]
            );
            r.messages.iter().for_each(|m| eprintln!("{m}"));
        })?;
        Ok(exit::SUCCESS)
    }

    pub fn uninstall(&self, name: &str, release: Option<String>) -> Result<i32> {
        let r = install::uninstall(&self.paths, name, release)?;
        self.print(&r, |r| {
            println!(
                "uninstalled {name} for kernel {} (still loaded if it was; `hotpatch unload {name}` removes it)",
                r.release
            );
        })?;
        Ok(exit::SUCCESS)
    }

    /// The journal, or its last `tail` entries.
    pub fn journal(&self, tail: Option<usize>) -> Result<i32> {
        let mut j = state::read_journal(&self.paths)?;
        if let Some(n) = tail {
            let skip = j.len().saturating_sub(n);
            j.drain(..skip);
        }
        self.print(&j, |j| j.iter().for_each(|e| print!("{}", Text(e))))?;
        Ok(exit::SUCCESS)
    }
}

/// Text for one module of `load --installed`, as it happens.
fn print_installed(r: &InstalledResult) {
    match r {
        InstalledResult::Load(r) => print!("{}", Text(r.as_ref())),
        InstalledResult::AlreadyLoaded { module, .. } => {
            println!("{module}: already loaded from the same file")
        }
        InstalledResult::Failed(e) => eprintln!("hotpatch: error: {}: {}", e.module, e.error),
        InstalledResult::Skipped { module, skipped } => eprintln!("hotpatch: {module}: {skipped}"),
    }
}
