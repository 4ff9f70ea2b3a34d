//! The changes to a loaded patch: `enable`, `disable`, `unload`. Each waits
//! for its transition with a deadline and is journalled.

use crate::load::{self, LoadOptions, LoadReport, Outcome};
use crate::module;
use crate::paths::Paths;
use crate::state::{self, JournalOp, JournalResult};
use crate::transition::{
    Wait, ms, remove_module, task_names, wait_gone, wait_transition, write_attr,
};
use anyhow::{Result, bail};
use livehost_common::exit;
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
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

fn disable_and_wait(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<Option<f64>> {
    let Some(p) = paths.patch(name) else {
        return Ok(None);
    };
    if p.transition == Some(true) && p.enabled == Some(false) {
        // Already unpatching: just wait for it.
    } else if p.enabled == Some(true) {
        if p.transition == Some(true) {
            progress.note(format!("{name} is still patching; disabling reverses it"));
        }
        write_attr(paths, name, "enabled", "0")?;
    }
    let t0 = Instant::now();
    match wait_transition(paths, name, 0, timeout, poll, progress, t0) {
        Wait::Done(d) => Ok(Some(ms(d))),
        Wait::TimedOut(_) => {
            let lag = task_names(&paths.lagging_tasks(0));
            bail!(
                "{name}: unpatching stalled after {:.0}s on {}; it continues in the kernel",
                timeout.as_secs_f64(),
                lag.join(", ")
            )
        }
    }
}

pub fn disable(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    if paths.patch(name).is_none() {
        bail!(
            "no live patch named {name} in {} (see `hotpatch list`)",
            paths.livepatch().display()
        );
    }
    let r = disable_and_wait(paths, name, timeout, poll, progress);
    let mut messages = state::record(
        paths,
        JournalOp::Disable,
        Some(name),
        None,
        JournalResult::of(&r),
        r.as_ref().ok().copied().flatten(),
        serde_json::json!({}),
    );
    let t = r?;
    progress.finish();
    messages.push(format!("{name} disabled; the kernel frees a disabled patch, so its module stays loaded until `hotpatch unload {name}` (`hotpatch enable {name}` loads its file again)"));
    Ok(ChangeReport {
        module: name.into(),
        action: ChangeAction::Disable,
        transition_ms: t,
        removed: false,
        messages,
        load: None,
    })
}

pub fn enable(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    let report = |transition_ms, messages| ChangeReport {
        module: name.into(),
        action: ChangeAction::Enable,
        transition_ms,
        removed: false,
        messages,
        load: None,
    };
    let Some(p) = paths.patch(name) else {
        if paths.module(name).is_some() {
            return reapply(paths, name, timeout, poll, progress);
        }
        bail!("no live patch named {name}; load it with `hotpatch load FILE.ko`");
    };
    if p.enabled == Some(true) {
        if p.transition != Some(true) {
            return Ok(report(None, vec![format!("{name} is already enabled")]));
        }
        // Already patching: writing 1 again would be refused (EINVAL), and
        // there is nothing to change; wait for it like any enable.
        progress.note(format!(
            "{name} is already being enabled; waiting for its transition"
        ));
    } else {
        write_attr(paths, name, "enabled", "1")?;
    }
    let t0 = Instant::now();
    let r = match wait_transition(paths, name, 1, timeout, poll, progress, t0) {
        Wait::Done(d) => Ok(ms(d)),
        Wait::TimedOut(_) => Err(anyhow::anyhow!(
            "{name}: patching stalled after {:.0}s",
            timeout.as_secs_f64()
        )),
    };
    let mut messages = state::record(
        paths,
        JournalOp::Enable,
        Some(name),
        None,
        JournalResult::of(&r),
        r.as_ref().ok().copied(),
        serde_json::json!({}),
    );
    let t = r?;
    progress.finish();
    messages.push(format!("{name} enabled"));
    Ok(report(Some(t), messages))
}

/// `enable` of a patch the kernel already freed (disabled, or superseded by
/// an atomic replace) whose module is still loaded: the kernel cannot flip
/// it back, so remove the module and load the file hotpatch loaded it from
/// again, when that file is still there with the same sha256.
fn reapply(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    let by_hand = format!("`hotpatch unload {name}`, then `hotpatch load FILE.ko` with its file");
    let Some(rec) = state::loaded_record(paths, name) else {
        bail!(
            "{name} is loaded but no longer a live patch (the kernel frees disabled and replaced patches), and hotpatch has no record of the file it came from: run {by_hand}"
        );
    };
    let file = std::path::PathBuf::from(&rec.path);
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
    progress.step(format!(
        "{name}: freed by the kernel; removing the module to load {} again",
        file.display()
    ));
    if let Err(e) = remove_module(paths, name, timeout) {
        state::record(
            paths,
            JournalOp::Enable,
            Some(name),
            Some(&rec.sha256),
            JournalResult::Error,
            None,
            serde_json::json!({ "error": format!("{e:#}"), "file": rec.path }),
        );
        return Err(e.context(format!("{name}: cannot remove the freed patch's module")));
    }
    let opts = LoadOptions {
        timeout,
        poll,
        expected_sha256: Some(rec.sha256.clone()),
        journal_op: JournalOp::Enable,
        ..LoadOptions::default()
    };
    let r = load::load(paths, &file, &opts, progress).map_err(|e| {
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
    Ok(ChangeReport {
        module: name.into(),
        action: ChangeAction::Enable,
        transition_ms: r.transition_ms,
        removed: false,
        messages,
        load: Some(r),
    })
}

/// Disable (if needed), wait, wait for the reference to drop, remove.
pub fn unload(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    match is_livepatch_module(paths, name) {
        None => bail!("no module named {name} is loaded (see `hotpatch list`)"),
        Some(false) => {
            bail!("{name} is not a livepatch module; hotpatch leaves other modules to rmmod")
        }
        Some(true) => {}
    }
    progress.step(format!("{name}: unpatching"));
    let r = (|| {
        let t = disable_and_wait(paths, name, timeout, poll, progress)?;
        if !wait_gone(paths, name, timeout) {
            bail!(
                "{name}: disabled, but the kernel did not free the patch within {:.0}s",
                timeout.as_secs_f64()
            );
        }
        progress.step(format!("{name}: removing module"));
        remove_module(paths, name, timeout).map_err(|e| {
            if state::loaded_record(paths, name).is_some_and(|r| r.forced) {
                e.context(format!("{name}'s transition was forced when it loaded; kernels that pin forced patch modules keep it until reboot"))
            } else {
                e
            }
        })?;
        Ok(t)
    })();
    let mut messages = state::record(
        paths,
        JournalOp::Unload,
        Some(name),
        state::loaded_record(paths, name)
            .map(|r| r.sha256)
            .as_deref(),
        JournalResult::of(&r),
        r.as_ref().ok().copied().flatten(),
        serde_json::json!({}),
    );
    let t = r?;
    state::forget_loaded(paths, name);
    progress.finish();
    messages.push(format!("{name} unpatched and removed"));
    Ok(ChangeReport {
        module: name.into(),
        action: ChangeAction::Unload,
        transition_ms: t,
        removed: true,
        messages,
        load: None,
    })
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
    Unloaded(ChangeReport),
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
        let r = match unload(paths, n, timeout, poll, progress) {
            Ok(r) => UnloadResult::Unloaded(r),
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
