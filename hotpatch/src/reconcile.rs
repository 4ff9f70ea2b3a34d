//! A run that died mid-change (SIGKILL, OOM kill, power cut) left a
//! journal "begin" with no outcome after it, and maybe a patch in
//! transition. Every later hotpatch run looks for such entries first and
//! puts the kernel in a state somebody chose: a transition still running is
//! reversed (and a half-loaded patch removed), one that finished is kept.
//! What it found and did is journalled (`reconciled`) and said on stderr.

use crate::paths::Paths;
use crate::state::{self, JournalEntry, JournalOp, JournalResult};
use crate::transition::{Wait, Watch, remove_module, wait_gone};
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One unfinished change and what this run did about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reconciled {
    pub module: String,
    pub op: JournalOp,
    /// When the unfinished change began.
    pub began_unix_ms: u64,
    /// The pid that began it.
    pub pid: Option<u64>,
    pub found: String,
    pub did: String,
}

impl Reconciled {
    pub fn line(&self) -> String {
        format!(
            "hotpatch: an earlier `{}` of {} (pid {}) did not finish: found {}; {}",
            self.op,
            self.module,
            self.pid.map_or("?".into(), |p| p.to_string()),
            self.found,
            self.did
        )
    }
}

/// The "begin" entries no later entry for the same module closes.
pub fn unfinished(journal: &[JournalEntry]) -> Vec<&JournalEntry> {
    let mut open: Vec<&JournalEntry> = Vec::new();
    for e in journal {
        let Some(m) = e.module.as_deref() else {
            continue;
        };
        // Any later line about the module closes an earlier begin: either
        // that run's own outcome, or a later run that saw the module.
        open.retain(|b| b.module.as_deref() != Some(m));
        if e.result == JournalResult::Begin {
            open.push(e);
        }
    }
    open
}

/// Reconcile every unfinished change. The caller holds the lock, so no
/// other run is mid-change.
pub fn reconcile(paths: &Paths, timeout: Duration, progress: &Progress) -> Vec<Reconciled> {
    let Ok(journal) = state::read_journal(paths) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for b in unfinished(&journal) {
        let module = b.module.clone().unwrap_or_default();
        let (found, did) = settle(paths, &module, b.op, timeout, progress);
        let r = Reconciled {
            module,
            op: b.op,
            began_unix_ms: b.time_unix_ms,
            pid: b.detail["pid"].as_u64(),
            found,
            did,
        };
        state::record(
            paths,
            b.op,
            Some(&r.module),
            b.sha256.as_deref(),
            JournalResult::Reconciled,
            None,
            serde_json::to_value(&r).unwrap_or_default(),
        );
        done.push(r);
    }
    done
}

/// Look at `name` in the kernel and settle it; (what was found, what was
/// done).
fn settle(
    paths: &Paths,
    name: &str,
    op: JournalOp,
    timeout: Duration,
    progress: &Progress,
) -> (String, String) {
    let adding = matches!(op, JournalOp::Load | JournalOp::Enable);
    let Some(p) = paths.patch(name) else {
        if paths.module(name).is_none() {
            return ("no such module loaded".into(), "nothing to do".into());
        }
        if op == JournalOp::Disable {
            return (
                "disabled and freed by the kernel, module loaded".into(),
                "nothing to do (the disable had finished)".into(),
            );
        }
        return (
            "the patch freed by the kernel, its module still loaded".into(),
            remove(paths, name, timeout),
        );
    };
    let enabled = p.enabled == Some(true);
    if p.transition != Some(true) {
        let state = if enabled { "applied" } else { "disabled" };
        return (
            format!("{state}, no transition running"),
            "kept it as it is (the kernel finished the change)".into(),
        );
    }
    let w = Watch {
        paths,
        name,
        timeout,
        poll: Duration::from_millis(15),
        progress,
        interruptible: false,
    };
    let target = i32::from(enabled);
    let found = format!(
        "still in transition ({})",
        if enabled { "patching" } else { "unpatching" }
    );
    match w.reverse(target, &mut Vec::new()) {
        Ok(Wait::Done(_)) => {}
        Ok(_) => {
            return (
                found,
                "reversed it, but the reverse stalled too: half-applied, see `hotpatch status`"
                    .into(),
            );
        }
        Err(e) => return (found, format!("could not reverse it: {e:#}")),
    }
    if !(enabled && adding) {
        let back = if enabled { "unpatched" } else { "applied" };
        return (
            found,
            format!("reversed it: the patch is {back} as before the change"),
        );
    }
    if !wait_gone(paths, name, timeout) {
        return (
            found,
            "reversed it; the kernel did not free the patch, module left loaded".into(),
        );
    }
    (
        found,
        format!("reversed it; {}", remove(paths, name, timeout)),
    )
}

fn remove(paths: &Paths, name: &str, timeout: Duration) -> String {
    match remove_module(paths, name, timeout) {
        Ok(_) => {
            state::forget_loaded(paths, name);
            "removed the module: the kernel is as before the change".into()
        }
        Err(e) => format!("could not remove the module: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(module: &str, op: JournalOp, result: JournalResult) -> JournalEntry {
        JournalEntry {
            time_unix_ms: 1,
            user: "root".into(),
            op,
            module: Some(module.into()),
            sha256: None,
            result,
            duration_ms: None,
            detail: serde_json::json!({ "pid": 7 }),
        }
    }

    #[test]
    fn only_begins_nothing_closes_are_unfinished() {
        use JournalOp::*;
        use JournalResult::*;
        let j = vec![
            entry("a", Load, Begin),
            entry("a", Load, Ok),
            entry("b", Load, Begin),
            entry("c", Unload, Begin),
            entry("c", Unload, Begin),
            entry("d", Load, Begin),
            entry("d", Load, Reconciled),
        ];
        let u: Vec<(&str, JournalOp)> = unfinished(&j)
            .iter()
            .map(|e| (e.module.as_deref().unwrap(), e.op))
            .collect();
        assert_eq!(u, [("b", Load), ("c", Unload)]);
    }
}
