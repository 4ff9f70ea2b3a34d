//! `hotpatch load`: inspect, preflight, `finit_module`, follow the
//! transition; on a stall roll back, leave or force it ([`stall`]); after an
//! atomic replace remove the superseded patches' modules ([`replace`]).
//!
//! Whatever happens, the report's outcome says what state the kernel was
//! left in, and every outcome is journalled.

mod replace;
mod stall;

pub use replace::remove_superseded;

use crate::check::{self, Check, CheckId, Preflight};
use crate::exitcode;
use crate::kernel::TaskState;
use crate::kmod;
use crate::measure::{self, Measurement};
use crate::module::{self, ModuleInfo};
use crate::paths::Paths;
use crate::state::{self, JournalOp, JournalResult, LoadedRecord};
use crate::transition::{Wait, Watch, ms, remove_module};
use anyhow::{Context, Result, bail};
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How long the transition may take before it counts as stalled.
    pub timeout: Duration,
    /// How often `transition` is polled.
    pub poll: Duration,
    pub rollback: bool,
    /// On stall, write `force`: completes the transition without the
    /// consistency guarantee (and some kernels then pin the module forever).
    pub force: bool,
    pub measure: bool,
    /// The file must have this sha256 (`load --installed`: what the manifest
    /// recorded at install time); otherwise the load is refused (exit 3).
    pub expected_sha256: Option<String>,
    /// The journal's `op` for this load (`enable` when re-applying).
    pub journal_op: JournalOp,
    /// `load --installed`: the whole run's time limit.
    pub budget: Option<Duration>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            timeout: Duration::from_secs(30),
            poll: Duration::from_millis(15),
            rollback: true,
            force: false,
            measure: false,
            expected_sha256: None,
            journal_op: JournalOp::Load,
            budget: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Patched and transition complete.
    Loaded,
    /// Preflight refused; nothing touched.
    Refused,
    /// Stalled, reversed and removed: the kernel is as before.
    RolledBack,
    /// Stalled and left in transition (`--no-rollback`).
    Stalled,
    /// Stalled and forced through (`--force`).
    Forced,
    /// Already loaded from the same file (`--installed` re-runs).
    AlreadyLoaded,
    /// Stalled, and the reverse transition stalled too: the patch is
    /// half-applied and the kernel mid-transition.
    ReverseStalled,
    /// Reversed, but the kernel did not free the patch: its module stays.
    NotFreed,
    /// Reversed and freed, but the module could not be removed.
    NotRemoved,
    /// `--force` failed: the write was refused, or the forced transition
    /// did not finish.
    ForceFailed,
    /// SIGINT/SIGTERM/SIGHUP arrived mid-transition: reversed and removed,
    /// the kernel is as before.
    Interrupted,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Loaded | Outcome::Forced | Outcome::AlreadyLoaded => exitcode::SUCCESS,
            Outcome::Refused => exitcode::REFUSED,
            Outcome::RolledBack | Outcome::Interrupted => exitcode::ROLLED_BACK,
            Outcome::Stalled => exitcode::LEFT_IN_TRANSITION,
            Outcome::ReverseStalled => exitcode::REVERSE_STALLED,
            Outcome::NotFreed | Outcome::NotRemoved => exitcode::MODULE_LEFT,
            Outcome::ForceFailed => exitcode::FORCE_FAILED,
        }
    }

    /// The journal's result for this outcome.
    pub fn journal_result(self) -> JournalResult {
        match self {
            Outcome::Loaded | Outcome::AlreadyLoaded => JournalResult::Ok,
            Outcome::Refused => JournalResult::Refused,
            Outcome::RolledBack => JournalResult::RolledBack,
            Outcome::Stalled => JournalResult::Stalled,
            Outcome::Forced => JournalResult::Forced,
            Outcome::ReverseStalled => JournalResult::ReverseStalled,
            Outcome::NotFreed => JournalResult::NotFreed,
            Outcome::NotRemoved => JournalResult::NotRemoved,
            Outcome::ForceFailed => JournalResult::ForceFailed,
            Outcome::Interrupted => JournalResult::Interrupted,
        }
    }

    /// The patch is (still) applied after this outcome.
    pub fn applied(self) -> bool {
        matches!(
            self,
            Outcome::Loaded | Outcome::Forced | Outcome::AlreadyLoaded
        )
    }
}

/// What `hotpatch load --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub module: Option<String>,
    pub file: String,
    pub sha256: String,
    pub outcome: Outcome,
    pub preflight: Preflight,
    /// finit_module() itself (the module's init starts the transition).
    pub load_syscall_ms: Option<f64>,
    /// From finit_module() until `transition` read 0.
    pub transition_ms: Option<f64>,
    pub stalled_tasks: Vec<TaskState>,
    /// The tasks that held the reverse transition up, when it stalled too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reverse_stalled_tasks: Vec<TaskState>,
    pub rollback_ms: Option<f64>,
    /// Modules of patches this atomic-replace patch superseded, removed.
    pub replaced_removed: Vec<String>,
    pub measure: Option<Measurement>,
    pub messages: Vec<String>,
    /// Wall clock (ms since the epoch) when `load` began and when it
    /// returned, so its window can be lined up with other records of the
    /// same host (an observer's intervals, the kernel log).
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
}

impl LoadReport {
    /// Refused until a step below says otherwise.
    fn new(file: &Path, info: &ModuleInfo, preflight: Preflight) -> LoadReport {
        LoadReport {
            module: info.name.clone(),
            file: file.display().to_string(),
            sha256: info.sha256.clone(),
            outcome: Outcome::Refused,
            preflight,
            load_syscall_ms: None,
            transition_ms: None,
            stalled_tasks: Vec::new(),
            reverse_stalled_tasks: Vec::new(),
            rollback_ms: None,
            replaced_removed: Vec::new(),
            measure: None,
            messages: Vec::new(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
        }
    }
}

/// Inspect, preflight, load, watch; roll back on stall unless told not to.
pub fn load(
    paths: &Paths,
    file: &Path,
    opts: &LoadOptions,
    progress: &Progress,
) -> Result<LoadReport> {
    let started_unix_ms = livehost_common::unix_ms();
    let mut report = load_watched(paths, file, opts, progress)?;
    report.started_unix_ms = started_unix_ms;
    report.finished_unix_ms = livehost_common::unix_ms();
    Ok(report)
}

fn load_watched(
    paths: &Paths,
    file: &Path,
    opts: &LoadOptions,
    progress: &Progress,
) -> Result<LoadReport> {
    // Opened once: what is hashed and checked is what finit_module loads.
    let opened = module::open_module(file)?;
    let info = module::inspect_opened(file, &opened)?;
    let mut report = LoadReport::new(file, &info, vetted_preflight(paths, file, &info, opts));
    if !report.preflight.ok {
        let reasons: Vec<&str> = report
            .preflight
            .failures()
            .map(|c| c.detail.as_str())
            .collect();
        let warnings = state::record(
            paths,
            opts.journal_op,
            info.name.as_deref(),
            Some(&info.sha256),
            JournalResult::Refused,
            None,
            serde_json::json!({ "reasons": reasons, "file": report.file }),
        );
        report.messages.extend(warnings);
        return Ok(report);
    }
    let l = Loading::new(paths, opts, progress, &info)?;
    let before: BTreeSet<String> = paths.patches().into_iter().map(|p| p.name).collect();
    let probe = opts
        .measure
        .then(|| measure::Probe::start(measure::spinners()));
    let t0 = match l.insert(file, &opened, info.replace, &mut report) {
        Ok(t0) => t0,
        Err(e) => {
            if let Some(p) = probe {
                p.stop();
            }
            return Err(e);
        }
    };
    let mut notes = Vec::new();
    let waited = l.watch(true).wait(1, t0, &mut notes);
    report.messages.append(&mut notes);
    match waited {
        Wait::Done(d) => Ok(l.completed(report, d, probe, info.replace, &before)),
        Wait::TimedOut(d) => {
            if let Some(p) = probe {
                p.stop();
            }
            Ok(stall::handle(&l, report, d, None))
        }
        Wait::Interrupted(sig, d) => {
            if let Some(p) = probe {
                p.stop();
            }
            Ok(stall::handle(&l, report, d, Some(sig)))
        }
    }
}

/// What `load` does once the transition of `file`'s module, already
/// inserted, did not finish within `waited`: force it (`--force`), leave
/// it, or roll it back, journalled. Public so the fake-tree tests drive
/// this decision against a fake /sys, where no finit_module can run.
pub fn after_stall(
    paths: &Paths,
    file: &Path,
    opts: &LoadOptions,
    progress: &Progress,
    waited: Duration,
) -> Result<LoadReport> {
    let info = module::inspect_file(file)?;
    let mut report = LoadReport::new(file, &info, check::preflight(paths, &info));
    let l = Loading::new(paths, opts, progress, &info)?;
    report.outcome = Outcome::Stalled;
    Ok(stall::handle(&l, report, waited, None))
}

/// The preflight, plus (for `load --installed`) the check that the file is
/// still the one that was installed.
fn vetted_preflight(
    paths: &Paths,
    file: &Path,
    info: &ModuleInfo,
    opts: &LoadOptions,
) -> Preflight {
    let mut pre = check::preflight(paths, info);
    if let Some(want) = &opts.expected_sha256
        && *want != info.sha256
    {
        // The file changed since it was installed (or the manifest was
        // edited): never load something other than what was vetted.
        pre.refuse_first(Check {
            id: CheckId::InstalledFile,
            status: check::Status::Fail,
            detail: format!(
                "{} has sha256 {}, but {} was recorded when it was installed: the file changed; refusing to load it (`hotpatch install` the intended file again)",
                file.display(),
                info.sha256,
                want
            ),
        });
    }
    pre
}

/// One load past its preflight: what every later step needs.
struct Loading<'a> {
    paths: &'a Paths,
    opts: &'a LoadOptions,
    progress: &'a Progress,
    name: String,
    sha256: String,
    meta: crate::module::PatchMeta,
}

impl<'a> Loading<'a> {
    fn new(
        paths: &'a Paths,
        opts: &'a LoadOptions,
        progress: &'a Progress,
        info: &ModuleInfo,
    ) -> Result<Loading<'a>> {
        Ok(Loading {
            paths,
            opts,
            progress,
            name: info.name.clone().context("module has no name")?,
            sha256: info.sha256.clone(),
            meta: info.meta(),
        })
    }

    /// Journal an outcome of this load under the patch's name and hash;
    /// returns the warning to show if the journal could not be written.
    fn journal(
        &self,
        result: JournalResult,
        duration_ms: Option<f64>,
        detail: serde_json::Value,
    ) -> Vec<String> {
        state::record(
            self.paths,
            self.opts.journal_op,
            Some(&self.name),
            Some(&self.sha256),
            result,
            duration_ms,
            detail,
        )
    }

    /// Following this patch's transition.
    fn watch(&self, interruptible: bool) -> Watch<'_> {
        Watch {
            paths: self.paths,
            name: &self.name,
            timeout: self.opts.timeout,
            poll: self.opts.poll,
            progress: self.progress,
            interruptible,
        }
    }

    /// `finit_module`, record what was loaded, and make sure it registered
    /// a livepatch. Returns when the load began: the transition's start.
    fn insert(
        &self,
        file: &Path,
        opened: &module::OpenedModule,
        replace: Option<bool>,
        report: &mut LoadReport,
    ) -> Result<Instant> {
        let name = &self.name;
        self.progress.step(format!("{name}: loading"));
        // On disk before the kernel changes, so a run killed mid-load
        // (SIGKILL, power cut) is found and reconciled by the next one.
        report.messages.extend(state::begin(
            self.paths,
            self.opts.journal_op,
            name,
            Some(&self.sha256),
        ));
        let t0 = Instant::now();
        let loaded = match &opened.compressed {
            None => kmod::finit_module(&opened.file, file, name),
            Some((_, elf)) => kmod::finit_compressed(&opened.file, elf, file, name),
        };
        report.load_syscall_ms = Some(ms(t0.elapsed()));
        if let Err(e) = loaded {
            let detail = serde_json::json!({ "error": format!("{e:#}"), "file": report.file });
            report
                .messages
                .extend(self.journal(JournalResult::Error, None, detail));
            return Err(e);
        }
        let record = LoadedRecord {
            name: name.clone(),
            sha256: self.sha256.clone(),
            path: std::fs::canonicalize(file)
                .unwrap_or(file.to_path_buf())
                .display()
                .to_string(),
            replace,
            loaded_unix_ms: livehost_common::unix_ms(),
            forced: false,
            boot_id: self.paths.boot_id(),
            meta: self.meta.clone(),
            module_build_id: self.paths.module_build_id(name),
        };
        if let Err(e) = state::save_loaded(self.paths, &record) {
            report
                .messages
                .push(format!("warning: could not record the load: {e:#}"));
        }
        if !self.paths.patch_dir(name).exists() {
            // Passed as a livepatch but registered nothing: do not leave a
            // mystery module behind.
            let _ = remove_module(self.paths, name, self.opts.timeout);
            state::forget_loaded(self.paths, name);
            self.journal(
                JournalResult::Error,
                None,
                serde_json::json!({ "error": "registered no livepatch", "file": report.file }),
            );
            bail!(
                "{name} loaded but registered no livepatch in {}; removed it again",
                self.paths.livepatch().display()
            );
        }
        Ok(t0)
    }

    /// The transition finished after `d`: measure the baseline when asked,
    /// remove what an atomic replace superseded, journal.
    fn completed(
        &self,
        mut report: LoadReport,
        d: Duration,
        probe: Option<measure::Probe>,
        replace: Option<bool>,
        before: &BTreeSet<String>,
    ) -> LoadReport {
        report.transition_ms = Some(ms(d));
        if let Some(p) = probe {
            let w = p.stop();
            let n = measure::spinners();
            let b = measure::baseline(n, &w);
            report.measure = Some(measure::assemble(crate::host::detect(self.paths), n, w, b));
        }
        report.outcome = Outcome::Loaded;
        let (removed, msgs) = remove_superseded(
            self.paths,
            &self.name,
            replace,
            before,
            self.opts.timeout,
            self.progress,
        );
        report.replaced_removed = removed;
        report.messages.extend(msgs);
        self.progress.finish();
        let detail =
            serde_json::json!({ "file": report.file, "replaced_removed": report.replaced_removed });
        report
            .messages
            .extend(self.journal(JournalResult::Ok, report.transition_ms, detail));
        report
    }
}
