//! The changes to a loaded patch: `enable`, `disable`, `unload`. Each waits
//! for its transition with a deadline and is journalled.

use crate::exitcode;
use crate::kernel::TaskState;
use crate::load::{self, LoadOptions, LoadReport, Outcome};
use crate::module;
use crate::paths::Paths;
use crate::state::{self, JournalOp, JournalResult, LoadedRecord};
use crate::transition::{
    Wait, Watch, ms, remove_module, reverse_stalled, task_names, wait_gone, write_attr,
};
use anyhow::{Result, bail};
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Which change a [`ChangeReport`] reports.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChangeAction {
    Enable,
    Disable,
    Unload,
}

/// How a change ended, when it did not simply happen.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeOutcome {
    /// The change happened.
    #[default]
    Done,
    /// The transition stalled and was reversed: the patch is as before
    /// the change.
    RolledBack,
    /// A signal arrived mid-transition; reversed, as before the change.
    Interrupted,
    /// The transition stalled and so did its reverse: mid-transition.
    ReverseStalled,
    /// Unpatched, but the kernel did not free the patch.
    NotFreed,
    /// Unpatched and freed, but the module could not be removed.
    NotRemoved,
}

impl ChangeOutcome {
    pub fn exit_code(self) -> i32 {
        match self {
            ChangeOutcome::Done => exitcode::SUCCESS,
            ChangeOutcome::RolledBack | ChangeOutcome::Interrupted => exitcode::ROLLED_BACK,
            ChangeOutcome::ReverseStalled => exitcode::REVERSE_STALLED,
            ChangeOutcome::NotFreed | ChangeOutcome::NotRemoved => exitcode::MODULE_LEFT,
        }
    }

    pub fn journal_result(self) -> JournalResult {
        match self {
            ChangeOutcome::Done => JournalResult::Ok,
            ChangeOutcome::RolledBack => JournalResult::RolledBack,
            ChangeOutcome::Interrupted => JournalResult::Interrupted,
            ChangeOutcome::ReverseStalled => JournalResult::ReverseStalled,
            ChangeOutcome::NotFreed => JournalResult::NotFreed,
            ChangeOutcome::NotRemoved => JournalResult::NotRemoved,
        }
    }
}

/// What `hotpatch enable|disable --json` prints, and each element of
/// `hotpatch unload --json`'s array that got as far as the kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeReport {
    pub module: String,
    pub action: ChangeAction,
    /// How it ended (older reports have no such field: they were `done`).
    #[serde(default)]
    pub outcome: ChangeOutcome,
    pub transition_ms: Option<f64>,
    pub removed: bool,
    /// The tasks that held a stalled transition up, with their stacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stalled_tasks: Vec<TaskState>,
    /// The tasks that held its reverse up, when that stalled too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reverse_stalled_tasks: Vec<TaskState>,
    pub messages: Vec<String>,
    /// `enable` of a freed patch re-loads its file: that load's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
}

impl ChangeReport {
    pub fn exit_code(&self) -> i32 {
        match &self.load {
            Some(l) => l.outcome.exit_code(),
            None => self.outcome.exit_code(),
        }
    }
}

/// Is `name` a loaded livepatch module (registered, or superseded and left
/// loaded: `K` taint in /proc/modules)?
fn is_livepatch_module(paths: &Paths, name: &str) -> Option<bool> {
    let m = paths.module(name)?;
    Some(paths.patch_dir(name).exists() || m.taint.contains('K'))
}

/// A change to the loaded patch `name`: where to find the kernel, how long
/// each wait may take, where to show progress.
pub struct Change<'a> {
    pub paths: &'a Paths,
    pub name: &'a str,
    /// How long a transition (and each later wait) may take.
    pub timeout: Duration,
    /// How often `transition` is polled.
    pub poll: Duration,
    pub progress: &'a Progress,
}

impl Change<'_> {
    fn report(
        &self,
        action: ChangeAction,
        transition_ms: Option<f64>,
        messages: Vec<String>,
    ) -> ChangeReport {
        ChangeReport {
            module: self.name.into(),
            action,
            outcome: ChangeOutcome::Done,
            transition_ms,
            removed: false,
            stalled_tasks: Vec::new(),
            reverse_stalled_tasks: Vec::new(),
            messages,
            load: None,
        }
    }

    /// Journal a change that failed before its outcome was known; returns
    /// the warning to show if the journal could not be written.
    fn journal_error(&self, op: JournalOp, sha: Option<&str>, e: &anyhow::Error) -> Vec<String> {
        let detail = serde_json::json!({ "error": format!("{e:#}") });
        state::record(
            self.paths,
            op,
            Some(self.name),
            sha,
            JournalResult::Error,
            None,
            detail,
        )
    }

    /// Journal the report's outcome, with the stalled tasks and messages.
    fn journal_report(&self, op: JournalOp, sha: Option<&str>, r: &mut ChangeReport) {
        let detail = serde_json::json!({
            "stalled": r.stalled_tasks,
            "reverse_stalled": r.reverse_stalled_tasks,
            "messages": r.messages,
        });
        let w = state::record(
            self.paths,
            op,
            Some(self.name),
            sha,
            r.outcome.journal_result(),
            r.transition_ms,
            detail,
        );
        r.messages.extend(w);
    }

    fn watch(&self) -> Watch<'_> {
        Watch {
            paths: self.paths,
            name: self.name,
            timeout: self.timeout,
            poll: self.poll,
            progress: self.progress,
            interruptible: true,
        }
    }

    /// Wait for the transition towards `target` (1 patched, 0 unpatched).
    /// When it stalls or a signal arrives, name the tasks, write the
    /// opposite `enabled` and wait for that: the report's outcome says
    /// whether the patch is back as it was. True when the change completed.
    fn follow(&self, target: i32, r: &mut ChangeReport) -> bool {
        let name = self.name;
        let mut notes = Vec::new();
        let waited = self.watch().wait(target, Instant::now(), &mut notes);
        r.messages.append(&mut notes);
        let (why, sig) = match waited {
            Wait::Done(d) => {
                r.transition_ms = Some(ms(d));
                return true;
            }
            Wait::TimedOut(d) => (format!("stalled after {:.1}s", d.as_secs_f64()), None),
            Wait::Interrupted(s, d) => (
                format!(
                    "interrupted by {} after {:.1}s",
                    crate::signals::name(s),
                    d.as_secs_f64()
                ),
                Some(s),
            ),
        };
        r.stalled_tasks = self.paths.lagging_tasks(target);
        let verb = if target == 1 {
            "patching"
        } else {
            "unpatching"
        };
        let names = task_names(&r.stalled_tasks);
        let line = format!(
            "{name}: {verb} {why}; {} task(s) not switched: {}",
            names.len(),
            names.join(", ")
        );
        self.progress.note(&line);
        r.messages.push(line);
        match self.watch().reverse(target, &mut notes) {
            Ok(Wait::Done(_)) => {
                r.outcome = if sig.is_some() {
                    ChangeOutcome::Interrupted
                } else {
                    ChangeOutcome::RolledBack
                };
                let back = if target == 1 {
                    "not applied (as before)"
                } else {
                    "still applied (as before)"
                };
                r.messages
                    .push(format!("{name}: reversed; the patch is {back}"));
            }
            Ok(_) => {
                let (tasks, msg) = reverse_stalled(self.paths, name, 1 - target);
                r.reverse_stalled_tasks = tasks;
                r.outcome = ChangeOutcome::ReverseStalled;
                r.messages.push(msg);
            }
            Err(e) => {
                r.outcome = ChangeOutcome::ReverseStalled;
                r.messages.push(format!("{name}: could not reverse: {e:#}; the patch is mid-transition: see `hotpatch status`"));
            }
        }
        r.messages.append(&mut notes);
        false
    }

    /// Start unpatching unless it already is, then follow it. True when
    /// the patch is off (or was never registered).
    fn disable_and_wait(&self, r: &mut ChangeReport) -> Result<bool> {
        let (paths, name) = (self.paths, self.name);
        let Some(p) = paths.patch(name) else {
            return Ok(true);
        };
        if p.transition == Some(true) && p.enabled == Some(false) {
            // Already unpatching: just wait for it.
        } else if p.enabled == Some(true) {
            if p.transition == Some(true) {
                self.progress
                    .note(format!("{name} is still patching; disabling reverses it"));
            }
            write_attr(paths, name, "enabled", "0")?;
        }
        Ok(self.follow(0, r))
    }

    /// Disable the patch and wait for the transition; the module stays.
    pub fn disable(&self) -> Result<ChangeReport> {
        let name = self.name;
        if self.paths.patch(name).is_none() {
            bail!(
                "no live patch named {name} in {} (see `hotpatch list`)",
                self.paths.livepatch().display()
            );
        }
        let mut r = self.report(ChangeAction::Disable, None, Vec::new());
        state::begin(self.paths, JournalOp::Disable, name, None);
        let off = match self.disable_and_wait(&mut r) {
            Ok(off) => off,
            Err(e) => {
                self.journal_error(JournalOp::Disable, None, &e);
                return Err(e);
            }
        };
        if off {
            r.messages.push(format!("{name} disabled; the kernel frees a disabled patch, so its module stays loaded until `hotpatch unload {name}` (`hotpatch enable {name}` loads its file again)"));
        }
        self.journal_report(JournalOp::Disable, None, &mut r);
        self.progress.finish();
        Ok(r)
    }

    /// Enable the patch and wait for the transition; a patch the kernel
    /// already freed is loaded again from its file ([`Change::reapply`]).
    pub fn enable(&self) -> Result<ChangeReport> {
        let (paths, name) = (self.paths, self.name);
        let Some(p) = paths.patch(name) else {
            if paths.module(name).is_some() {
                return self.reapply();
            }
            bail!("no live patch named {name}; load it with `hotpatch load FILE.ko`");
        };
        let mut r = self.report(ChangeAction::Enable, None, Vec::new());
        if p.enabled == Some(true) {
            if p.transition != Some(true) {
                r.messages.push(format!("{name} is already enabled"));
                return Ok(r);
            }
            // Already patching: writing 1 again would be refused (EINVAL),
            // and there is nothing to change; wait for it like any enable.
            self.progress.note(format!(
                "{name} is already being enabled; waiting for its transition"
            ));
        } else {
            state::begin(paths, JournalOp::Enable, name, None);
            if let Err(e) = write_attr(paths, name, "enabled", "1") {
                self.journal_error(JournalOp::Enable, None, &e);
                return Err(e);
            }
        }
        if self.follow(1, &mut r) {
            r.messages.push(format!("{name} enabled"));
        }
        self.journal_report(JournalOp::Enable, None, &mut r);
        self.progress.finish();
        Ok(r)
    }

    /// The file hotpatch loaded the freed patch from, if it is unchanged;
    /// otherwise the error says what to run by hand.
    fn recorded_file(&self) -> Result<(PathBuf, LoadedRecord)> {
        let name = self.name;
        let by_hand =
            format!("`hotpatch unload {name}`, then `hotpatch load FILE.ko` with its file");
        let Some(rec) = state::loaded_record(self.paths, name) else {
            bail!(
                "{name} is loaded but no longer a live patch (the kernel frees disabled and replaced patches), and hotpatch has no record of the file it came from: run {by_hand}"
            );
        };
        let file = PathBuf::from(&rec.path);
        let now = std::fs::read(&file)
            .map(|b| module::sha256_hex(&b))
            .map_err(|e| {
                anyhow::anyhow!(
                    "{name} must be loaded again from {}, but that file cannot be read ({e}): run {by_hand}",
                    file.display()
                )
            })?;
        if now != rec.sha256 {
            bail!(
                "{name} must be loaded again, but {} changed since hotpatch loaded it (sha256 {now}, was {}): run {by_hand}",
                file.display(),
                rec.sha256
            );
        }
        Ok((file, rec))
    }

    /// `enable` of a patch the kernel already freed (disabled, or superseded
    /// by an atomic replace) whose module is still loaded: the kernel cannot
    /// flip it back, so remove the module and load the file hotpatch loaded
    /// it from again, when that file is still there with the same sha256.
    fn reapply(&self) -> Result<ChangeReport> {
        let (paths, name) = (self.paths, self.name);
        let (file, rec) = self.recorded_file()?;
        self.progress.step(format!(
            "{name}: freed by the kernel; removing the module to load {} again",
            file.display()
        ));
        if let Err(e) = remove_module(paths, name, self.timeout) {
            let detail = serde_json::json!({ "error": format!("{e:#}"), "file": rec.path });
            let (op, sha) = (JournalOp::Enable, Some(rec.sha256.as_str()));
            state::record(
                paths,
                op,
                Some(name),
                sha,
                JournalResult::Error,
                None,
                detail,
            );
            return Err(e.context(format!("{name}: cannot remove the freed patch's module")));
        }
        let opts = LoadOptions {
            timeout: self.timeout,
            poll: self.poll,
            expected_sha256: Some(rec.sha256.clone()),
            journal_op: JournalOp::Enable,
            ..LoadOptions::default()
        };
        let r = load::load(paths, &file, &opts, self.progress).map_err(|e| {
            e.context(format!(
                "{name}: its module was removed (the patch was not active); loading {} again failed",
                file.display()
            ))
        })?;
        let mut messages = vec![format!(
            "{name} was freed by the kernel; removed its module and loaded {} again",
            file.display()
        )];
        messages.push(match r.outcome {
            Outcome::Loaded => format!("{name} enabled"),
            Outcome::Refused => format!(
                "{name}: loading it again was refused; its module was removed, so it is not applied"
            ),
            _ => format!(
                "{name}: loading it again did not complete ({:?})",
                r.outcome
            ),
        });
        let mut report = self.report(ChangeAction::Enable, r.transition_ms, messages);
        report.load = Some(r);
        Ok(report)
    }

    /// Disable (if needed), wait, wait for the reference to drop, remove.
    pub fn unload(&self) -> Result<ChangeReport> {
        let (paths, name) = (self.paths, self.name);
        match is_livepatch_module(paths, name) {
            None => bail!("no module named {name} is loaded (see `hotpatch list`)"),
            Some(false) => {
                bail!("{name} is not a livepatch module; hotpatch leaves other modules to rmmod")
            }
            Some(true) => {}
        }
        self.progress.step(format!("{name}: unpatching"));
        let sha = state::loaded_record(paths, name).map(|r| r.sha256);
        state::begin(paths, JournalOp::Unload, name, sha.as_deref());
        let mut r = self.report(ChangeAction::Unload, None, Vec::new());
        if let Err(e) = self.disable_and_remove(&mut r) {
            self.journal_error(JournalOp::Unload, sha.as_deref(), &e);
            return Err(e);
        }
        if r.removed {
            state::forget_loaded(paths, name);
            r.messages.push(format!("{name} unpatched and removed"));
        }
        self.journal_report(JournalOp::Unload, sha.as_deref(), &mut r);
        self.progress.finish();
        Ok(r)
    }

    /// Unpatch, wait for the kernel to free the patch, remove the module;
    /// a step that does not finish sets the report's outcome.
    fn disable_and_remove(&self, r: &mut ChangeReport) -> Result<()> {
        let (paths, name) = (self.paths, self.name);
        if !self.disable_and_wait(r)? {
            return Ok(());
        }
        if !wait_gone(paths, name, self.timeout) {
            r.outcome = ChangeOutcome::NotFreed;
            r.messages.push(format!(
                "{name}: disabled (no code patched), but the kernel did not free the patch within {:.0}s; its module stays loaded",
                self.timeout.as_secs_f64()
            ));
            return Ok(());
        }
        self.progress.step(format!("{name}: removing module"));
        if let Err(e) = remove_module(paths, name, self.timeout) {
            let forced = state::loaded_record(paths, name).is_some_and(|r| r.forced);
            let why = if forced {
                format!(
                    "; {name}'s transition was forced when it loaded, and kernels that pin forced patch modules keep it until reboot"
                )
            } else {
                String::new()
            };
            r.outcome = ChangeOutcome::NotRemoved;
            r.messages.push(format!(
                "{name}: unpatched and freed (no code patched), but the module could not be removed: {e:#}{why}"
            ));
            return Ok(());
        }
        r.removed = true;
        Ok(())
    }
}

/// Every livepatch module, top of the stack first, then superseded leftovers.
pub fn unload_order(paths: &Paths) -> Vec<String> {
    let mut v: Vec<String> = paths.patches().into_iter().rev().map(|p| p.name).collect();
    for m in paths.modules().unwrap_or_default() {
        if m.taint.contains('K') && !v.contains(&m.name) {
            v.push(m.name);
        }
    }
    v
}

/// One element of `hotpatch unload --json`'s array.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UnloadResult {
    Unloaded(Box<ChangeReport>),
    Failed(crate::ModuleError),
}

/// Unload `names` in order. With `keep_going` (`unload --all`) a failure is
/// recorded and the rest still unloaded, so one stuck patch does not pin the
/// others; without it the first failure is the error. `on_each` sees every
/// result as it happens.
pub fn unload_each(
    paths: &Paths,
    names: &[String],
    keep_going: bool,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
    mut on_each: impl FnMut(&UnloadResult),
) -> Result<Vec<UnloadResult>> {
    let mut results = Vec::new();
    for n in names {
        let change = Change {
            paths,
            name: n,
            timeout,
            poll,
            progress,
        };
        let r = match change.unload() {
            Ok(r) => UnloadResult::Unloaded(Box::new(r)),
            Err(e) if !keep_going => return Err(e),
            Err(e) => UnloadResult::Failed(crate::ModuleError::new(n, &e)),
        };
        on_each(&r);
        results.push(r);
    }
    Ok(results)
}

/// Exit status of an `unload`: the most severe of its results.
pub fn unload_exit_code(results: &[UnloadResult]) -> i32 {
    exitcode::worst(results.iter().map(|r| match r {
        UnloadResult::Unloaded(r) => r.exit_code(),
        UnloadResult::Failed(_) => exitcode::ERROR,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unload --json` reads back through [`UnloadResult`]: a report and a
    /// failure each come back as what they were.
    #[test]
    fn unload_results_read_back() {
        let done = UnloadResult::Unloaded(Box::new(ChangeReport {
            module: "a".into(),
            action: ChangeAction::Unload,
            outcome: ChangeOutcome::Done,
            transition_ms: Some(1.5),
            removed: true,
            stalled_tasks: Vec::new(),
            reverse_stalled_tasks: Vec::new(),
            messages: vec!["a unpatched and removed".into()],
            load: None,
        }));
        let failed = UnloadResult::Failed(crate::ModuleError {
            module: "b".into(),
            error: "stuck".into(),
        });
        let json = serde_json::to_string(&[done, failed]).unwrap();
        assert!(json.contains(r#""action":"unload""#), "{json}");
        let back: Vec<UnloadResult> = serde_json::from_str(&json).unwrap();
        assert!(
            matches!(&back[0], UnloadResult::Unloaded(r) if r.removed && r.action == ChangeAction::Unload)
        );
        assert!(matches!(&back[1], UnloadResult::Failed(e) if e.module == "b"));
        assert_eq!(unload_exit_code(&back), exitcode::ERROR);
        assert_eq!(unload_exit_code(&back[..1]), exitcode::SUCCESS);
    }
}
