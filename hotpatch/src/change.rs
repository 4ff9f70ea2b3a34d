//! The changes to a loaded patch: `enable`, `disable`, `unload`. Each waits
//! for its transition with a deadline and is journalled.

use crate::load::{self, LoadOptions, LoadReport, Outcome};
use crate::module;
use crate::paths::Paths;
use crate::state::{self, JournalOp, JournalResult, LoadedRecord};
use crate::transition::{
    Wait, ms, remove_module, task_names, wait_gone, wait_transition, write_attr,
};
use anyhow::{Result, bail};
use livehost_common::exit;
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

/// What `hotpatch enable|disable --json` prints, and each element of
/// `hotpatch unload --json`'s array that succeeded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeReport {
    pub module: String,
    pub action: ChangeAction,
    pub transition_ms: Option<f64>,
    pub removed: bool,
    pub messages: Vec<String>,
    /// `enable` of a freed patch re-loads its file: that load's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
}

impl ChangeReport {
    pub fn exit_code(&self) -> i32 {
        self.load
            .as_ref()
            .map_or(exit::SUCCESS, |l| l.outcome.exit_code())
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
            transition_ms,
            removed: action == ChangeAction::Unload,
            messages,
            load: None,
        }
    }

    /// Journal a change that either happened (with its transition time) or
    /// failed; returns the warning to show if the journal could not be
    /// written.
    fn journal<E>(
        &self,
        op: JournalOp,
        sha: Option<&str>,
        r: &Result<Option<f64>, E>,
    ) -> Vec<String> {
        let duration_ms = r.as_ref().ok().copied().flatten();
        let result = JournalResult::of(r);
        state::record(
            self.paths,
            op,
            Some(self.name),
            sha,
            result,
            duration_ms,
            serde_json::json!({}),
        )
    }

    /// Poll `transition` towards `target` (1 patched, 0 unpatched).
    fn wait(&self, target: i32) -> Wait {
        let (paths, progress) = (self.paths, self.progress);
        wait_transition(
            paths,
            self.name,
            target,
            self.timeout,
            self.poll,
            progress,
            Instant::now(),
        )
    }

    fn disable_and_wait(&self) -> Result<Option<f64>> {
        let (paths, name) = (self.paths, self.name);
        let Some(p) = paths.patch(name) else {
            return Ok(None);
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
        match self.wait(0) {
            Wait::Done(d) => Ok(Some(ms(d))),
            Wait::TimedOut(_) => {
                let lag = task_names(&paths.lagging_tasks(0));
                bail!(
                    "{name}: unpatching stalled after {:.0}s on {}; it continues in the kernel",
                    self.timeout.as_secs_f64(),
                    lag.join(", ")
                )
            }
        }
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
        let r = self.disable_and_wait();
        let mut messages = self.journal(JournalOp::Disable, None, &r);
        let t = r?;
        self.progress.finish();
        messages.push(format!("{name} disabled; the kernel frees a disabled patch, so its module stays loaded until `hotpatch unload {name}` (`hotpatch enable {name}` loads its file again)"));
        Ok(self.report(ChangeAction::Disable, t, messages))
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
        if p.enabled == Some(true) {
            if p.transition != Some(true) {
                let already = vec![format!("{name} is already enabled")];
                return Ok(self.report(ChangeAction::Enable, None, already));
            }
            // Already patching: writing 1 again would be refused (EINVAL),
            // and there is nothing to change; wait for it like any enable.
            self.progress.note(format!(
                "{name} is already being enabled; waiting for its transition"
            ));
        } else {
            write_attr(paths, name, "enabled", "1")?;
        }
        let r = match self.wait(1) {
            Wait::Done(d) => Ok(Some(ms(d))),
            Wait::TimedOut(_) => Err(anyhow::anyhow!(
                "{name}: patching stalled after {:.0}s",
                self.timeout.as_secs_f64()
            )),
        };
        let mut messages = self.journal(JournalOp::Enable, None, &r);
        let t = r?;
        self.progress.finish();
        messages.push(format!("{name} enabled"));
        Ok(self.report(ChangeAction::Enable, t, messages))
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
        let r = self.disable_and_remove();
        let sha = state::loaded_record(paths, name).map(|r| r.sha256);
        let mut messages = self.journal(JournalOp::Unload, sha.as_deref(), &r);
        let t = r?;
        state::forget_loaded(paths, name);
        self.progress.finish();
        messages.push(format!("{name} unpatched and removed"));
        Ok(self.report(ChangeAction::Unload, t, messages))
    }

    fn disable_and_remove(&self) -> Result<Option<f64>> {
        let (paths, name) = (self.paths, self.name);
        let t = self.disable_and_wait()?;
        if !wait_gone(paths, name, self.timeout) {
            bail!(
                "{name}: disabled, but the kernel did not free the patch within {:.0}s",
                self.timeout.as_secs_f64()
            );
        }
        self.progress.step(format!("{name}: removing module"));
        remove_module(paths, name, self.timeout).map_err(|e| {
            if state::loaded_record(paths, name).is_some_and(|r| r.forced) {
                e.context(format!("{name}'s transition was forced when it loaded; kernels that pin forced patch modules keep it until reboot"))
            } else {
                e
            }
        })?;
        Ok(t)
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

/// Exit status of an `unload`: an error if any patch could not be unloaded.
pub fn unload_exit_code(results: &[UnloadResult]) -> i32 {
    if results.iter().any(|r| matches!(r, UnloadResult::Failed(_))) {
        exit::ERROR
    } else {
        exit::SUCCESS
    }
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
            transition_ms: Some(1.5),
            removed: true,
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
        assert_eq!(unload_exit_code(&back), exit::ERROR);
        assert_eq!(unload_exit_code(&back[..1]), exit::SUCCESS);
    }
}
