//! A load whose transition did not finish in time (or was interrupted by a
//! signal): name the tasks that hold it up, then force it through
//! (`--force`), leave it in transition (`--no-rollback`), or by default
//! reverse it and remove the module. Each way it can end has its own
//! outcome, journalled with the stalled tasks and their stacks.

use super::{LoadReport, Loading, Outcome};
use crate::state;
use crate::transition::{
    Forced, Wait, force_transition, ms, remove_module, reverse_stalled, task_names, wait_gone,
};
use std::time::{Duration, Instant};

/// The transition of `l` stalled after `d`, or signal `sig` arrived.
pub(super) fn handle(
    l: &Loading,
    mut report: LoadReport,
    d: Duration,
    sig: Option<i32>,
) -> LoadReport {
    report.stalled_tasks = l.paths.lagging_tasks(1);
    let names = task_names(&report.stalled_tasks);
    // On the progress line now, and in the report (the only place a --json
    // caller sees them).
    let what = match sig {
        Some(s) => format!(
            "{}: interrupted by {} after {:.1}s, mid-transition; {} task(s) not switched yet: {}",
            l.name,
            crate::signals::name(s),
            d.as_secs_f64(),
            names.len(),
            names.join(", ")
        ),
        None => format!(
            "{}: transition stalled after {:.1}s; {} task(s) not switched: {}",
            l.name,
            d.as_secs_f64(),
            names.len(),
            names.join(", ")
        ),
    };
    l.progress.note(&what);
    report.messages.push(what);
    // A signal always takes the rollback path: whoever sent it wants
    // hotpatch gone, and leaving the patch mid-transition is the one state
    // nobody chose.
    if sig.is_none() && l.opts.force {
        return force(l, report);
    }
    if sig.is_none() && !l.opts.rollback {
        return leave(l, report);
    }
    roll_back(l, report, sig)
}

/// Journal the report's outcome with its tasks, close the progress line.
fn finish(l: &Loading, mut report: LoadReport, duration_ms: Option<f64>) -> LoadReport {
    let detail = serde_json::json!({
        "file": report.file,
        "stalled": report.stalled_tasks,
        "reverse_stalled": report.reverse_stalled_tasks,
        "messages": report.messages,
    });
    let warnings = l.journal(report.outcome.journal_result(), duration_ms, detail);
    report.messages.extend(warnings);
    l.progress.finish();
    report
}

/// `--force`: write `force` and wait for the transition to complete.
fn force(l: &Loading, mut report: LoadReport) -> LoadReport {
    let name = &l.name;
    let warning = format!(
        "warning: {name}: --force: forcing the transition. stalled tasks keep running old code until they return, with no consistency guarantee; some kernels then refuse to ever remove the module"
    );
    l.progress.note(&warning);
    report.messages.push(warning);
    let mut notes = Vec::new();
    let forced = force_transition(&l.watch(false), &mut notes);
    report.messages.append(&mut notes);
    report.outcome = match forced {
        Forced::Forced => {
            // Recorded only once the kernel took the write: a transition
            // that completed first was not forced.
            if let Some(mut rec) = state::loaded_record(l.paths, name) {
                rec.forced = true;
                let _ = state::save_loaded(l.paths, &rec);
            }
            Outcome::Forced
        }
        Forced::CompletedFirst => {
            report.messages.push(format!("{name}: the transition completed on its own before `force` was written; nothing was forced"));
            Outcome::Loaded
        }
        Forced::WriteFailed(e) => {
            report.messages.push(format!("{name}: --force failed: {e}; the patch is still in transition (`hotpatch status`; `hotpatch unload {name}` reverses it)"));
            Outcome::ForceFailed
        }
        Forced::TimedOut => {
            let still = task_names(&l.paths.lagging_tasks(1));
            report.messages.push(format!(
                "{name}: even the forced transition did not finish within {:.0}s (still pending: {}); the patch is in transition",
                l.opts.timeout.as_secs_f64(),
                still.join(", ")
            ));
            Outcome::ForceFailed
        }
    };
    finish(l, report, None)
}

/// `--no-rollback`: the kernel keeps retrying; say how to follow or undo it.
fn leave(l: &Loading, mut report: LoadReport) -> LoadReport {
    let name = &l.name;
    report.outcome = Outcome::Stalled;
    report.messages.push(format!("{name} left in transition (--no-rollback); the kernel keeps retrying. `hotpatch status` shows progress; `hotpatch disable {name}` reverses it"));
    finish(l, report, None)
}

/// The default: reverse the transition, wait for the kernel to free the
/// patch, remove the module: the kernel is as before. Each step that fails
/// is its own outcome.
fn roll_back(l: &Loading, mut report: LoadReport, sig: Option<i32>) -> LoadReport {
    let (name, timeout) = (&l.name, l.opts.timeout);
    let r0 = Instant::now();
    let mut notes = Vec::new();
    let reversed = l.watch(false).reverse(1, &mut notes);
    report.messages.append(&mut notes);
    match reversed {
        Ok(Wait::Done(_)) => {}
        Ok(_) => {
            let (tasks, msg) = reverse_stalled(l.paths, name, 0);
            report.reverse_stalled_tasks = tasks;
            report.outcome = Outcome::ReverseStalled;
            report.messages.push(msg);
            return finish(l, report, None);
        }
        Err(e) => {
            report.outcome = Outcome::ReverseStalled;
            report.messages.push(format!("{name}: could not reverse the transition: {e:#}; the patch is left mid-transition: see `hotpatch status`"));
            return finish(l, report, None);
        }
    }
    if !wait_gone(l.paths, name, timeout) {
        report.outcome = Outcome::NotFreed;
        report.messages.push(format!(
            "{name}: reversed (no code patched), but the kernel did not free the patch within {:.0}s; its module stays loaded",
            timeout.as_secs_f64()
        ));
        return finish(l, report, Some(ms(r0.elapsed())));
    }
    if let Err(e) = remove_module(l.paths, name, timeout) {
        report.outcome = Outcome::NotRemoved;
        report.messages.push(format!(
            "{name}: reversed and freed (no code patched), but the module could not be removed: {e:#}"
        ));
        return finish(l, report, Some(ms(r0.elapsed())));
    }
    state::forget_loaded(l.paths, name);
    report.rollback_ms = Some(ms(r0.elapsed()));
    report.outcome = if sig.is_some() {
        Outcome::Interrupted
    } else {
        Outcome::RolledBack
    };
    let why = if sig.is_some() {
        "interrupted"
    } else {
        "transition stalled"
    };
    report.messages.push(format!(
        "{name}: {why}, reversed and the module removed: the kernel is as before"
    ));
    let ms = report.rollback_ms;
    finish(l, report, ms)
}
