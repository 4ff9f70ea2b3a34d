//! After an atomic-replace patch's transition: the patches it superseded
//! are freed by the kernel asynchronously, but their modules stay loaded
//! (and a later load of one would hit EEXIST), so hotpatch removes them.

use crate::paths::Paths;
use crate::state;
use crate::transition::{remove_module, wait_gone};
use livehost_common::progress::Progress;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// After `name`'s transition completed: remove the modules of the patches
/// it superseded. An atomic-replace patch supersedes every patch that was
/// registered `before` it; the kernel frees them asynchronously (a work item
/// after the transition ends) but leaves their modules loaded, and a later
/// load of one would hit EEXIST. So wait (up to `timeout` overall) for each
/// superseded patch's sysfs dir to vanish, then remove its module. Returns
/// the modules removed and warnings.
pub fn remove_superseded(
    paths: &Paths,
    name: &str,
    replace: Option<bool>,
    before: &BTreeSet<String>,
    timeout: Duration,
    progress: &Progress,
) -> (Vec<String>, Vec<String>) {
    // The file's patch struct is the first source; a module whose
    // klp_patch is built at run time (kpatch-build, klp-build) has none to
    // read, and then the kernel's own `replace` attribute (6.11+) says it.
    let replace = replace.or_else(|| paths.patch(name).and_then(|p| p.replace));
    let superseded: Vec<String> = if replace == Some(true) {
        before.iter().filter(|b| *b != name).cloned().collect()
    } else {
        // Not known to replace: only what is already gone.
        let after: BTreeSet<String> = paths.patches().into_iter().map(|p| p.name).collect();
        before.difference(&after).cloned().collect()
    };
    let mut removed = Vec::new();
    let mut messages = Vec::new();
    let deadline = Instant::now() + timeout;
    for gone in &superseded {
        progress.step(format!(
            "{name}: waiting for the kernel to free replaced patch {gone}"
        ));
        if !wait_gone(
            paths,
            gone,
            deadline.saturating_duration_since(Instant::now()),
        ) {
            messages.push(format!(
                "warning: {gone}, superseded by atomic-replace patch {name}, was not freed by the kernel within {:.0}s; its module stays loaded (`hotpatch unload {gone}` later)",
                timeout.as_secs_f64()
            ));
            continue;
        }
        if paths.module(gone).is_none() {
            continue;
        }
        progress.step(format!("{name}: removing replaced patch module {gone}"));
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match remove_module(paths, gone, left) {
            Ok(_) => {
                state::forget_loaded(paths, gone);
                removed.push(gone.clone());
            }
            Err(e) => messages.push(format!(
                "warning: replaced patch {gone} could not be removed: {e:#}"
            )),
        }
    }
    (removed, messages)
}
