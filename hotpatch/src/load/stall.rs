//! A load whose transition did not finish in time: name the tasks that
//! hold it up, then force it through (`--force`), leave it in transition
//! (`--no-rollback`), or by default reverse it and remove the module.

use super::{LoadReport, Loading, Outcome};
use crate::state::{self, JournalResult};
use crate::transition::{
    Wait, ms, remove_module, task_names, wait_gone, wait_transition, write_attr,
};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

/// The transition of `l` stalled after `d`.
pub(super) fn handle(l: &Loading, mut report: LoadReport, d: Duration) -> Result<LoadReport> {
    report.stalled_tasks = l.paths.lagging_tasks(1);
    let names = task_names(&report.stalled_tasks);
    // On the progress line now, and in the report (the only place a --json
    // caller sees them).
    let stalled = format!(
        "{}: transition stalled after {:.1}s; {} task(s) not switched: {}",
        l.name,
        d.as_secs_f64(),
        names.len(),
        names.join(", ")
    );
    l.progress.note(&stalled);
    report.messages.push(stalled);
    if l.opts.force {
        return force(l, report, &names);
    }
    if !l.opts.rollback {
        return Ok(leave(l, report));
    }
    roll_back(l, report)
}

/// `--force`: write `force` and wait for the transition to complete.
fn force(l: &Loading, mut report: LoadReport, names: &[String]) -> Result<LoadReport> {
    let name = &l.name;
    let warning = format!(
        "warning: {name}: --force: forcing the transition. stalled tasks keep running old code until they return, with no consistency guarantee; some kernels then refuse to ever remove the module"
    );
    l.progress.note(&warning);
    report.messages.push(warning);
    if let Some(mut rec) = state::loaded_record(l.paths, name) {
        rec.forced = true;
        let _ = state::save_loaded(l.paths, &rec);
    }
    write_attr(l.paths, name, "force", "1")?;
    let wait = wait_transition(
        l.paths,
        name,
        1,
        l.opts.timeout,
        l.opts.poll,
        l.progress,
        Instant::now(),
    );
    if let Wait::TimedOut(_) = wait {
        l.journal(
            JournalResult::Error,
            None,
            serde_json::json!({ "stalled": report.stalled_tasks, "forced": true }),
        );
        bail!(
            "{name}: even a forced transition did not finish within {:.0}s (stalled before forcing: {})",
            l.opts.timeout.as_secs_f64(),
            names.join(", ")
        )
    }
    report.outcome = Outcome::Forced;
    let detail = serde_json::json!({ "stalled": report.stalled_tasks });
    report
        .messages
        .extend(l.journal(JournalResult::Forced, None, detail));
    l.progress.finish();
    Ok(report)
}

/// `--no-rollback`: the kernel keeps retrying; say how to follow or undo it.
fn leave(l: &Loading, mut report: LoadReport) -> LoadReport {
    let name = &l.name;
    report.outcome = Outcome::Stalled;
    report.messages.push(format!("{name} left in transition (--no-rollback); the kernel keeps retrying. `hotpatch status` shows progress; `hotpatch disable {name}` reverses it"));
    let detail = serde_json::json!({ "stalled": report.stalled_tasks });
    report
        .messages
        .extend(l.journal(JournalResult::Stalled, None, detail));
    l.progress.finish();
    report
}

/// The default: reverse the transition, wait for the kernel to free the
/// patch, remove the module: the kernel is as before.
fn roll_back(l: &Loading, mut report: LoadReport) -> Result<LoadReport> {
    let name = &l.name;
    let timeout = l.opts.timeout;
    l.progress.step(format!("{name}: reversing the transition"));
    let r0 = Instant::now();
    write_attr(l.paths, name, "enabled", "0")?;
    if let Wait::TimedOut(_) =
        wait_transition(l.paths, name, 0, timeout, l.opts.poll, l.progress, r0)
    {
        let still = l.paths.lagging_tasks(0);
        let detail =
            serde_json::json!({ "stalled": report.stalled_tasks, "reverse_stalled": still });
        report
            .messages
            .extend(l.journal(JournalResult::Error, None, detail));
        let still = task_names(&still);
        bail!(
            "{name}: the reverse transition also stalled ({} task(s): {}); the patch is left half-applied: see `hotpatch status`",
            still.len(),
            still.join(", ")
        );
    }
    if !wait_gone(l.paths, name, timeout) {
        bail!(
            "{name}: reversed, but the kernel did not free the patch within {:.0}s",
            timeout.as_secs_f64()
        );
    }
    remove_module(l.paths, name, timeout)?;
    state::forget_loaded(l.paths, name);
    report.rollback_ms = Some(ms(r0.elapsed()));
    report.outcome = Outcome::RolledBack;
    report.messages.push(format!(
        "{name}: transition stalled, reversed and the module removed: the kernel is as before"
    ));
    let detail = serde_json::json!({ "stalled": report.stalled_tasks });
    report
        .messages
        .extend(l.journal(JournalResult::RolledBack, report.rollback_ms, detail));
    l.progress.finish();
    Ok(report)
}
