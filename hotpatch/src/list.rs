//! `hotpatch list`: every loaded patch in stack order, its functions, which
//! patch provides each function now, leftover modules and the taint.

use crate::kernel::LivePatch;
use crate::paths::Paths;
use crate::state;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionOwner {
    pub object: String,
    pub function: String,
    pub sympos: u64,
    /// The patch whose code runs now: the topmost enabled patch with it.
    pub provided_by: String,
    pub also_in: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchStatus {
    #[serde(flatten)]
    pub patch: LivePatch,
    pub stack_position: usize,
    pub pending_tasks: Option<usize>,
    pub refcount: Option<u64>,
    pub sha256: Option<String>,
    pub file: Option<String>,
    /// Description, version, CVE ids, from the file hotpatch loaded.
    #[serde(default)]
    pub meta: Option<crate::module::PatchMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// What `hotpatch list --json` (alias `status`) prints.
pub struct Status {
    pub livepatch_supported: bool,
    /// The running kernel's release.
    pub release: Option<String>,
    pub patches: Vec<PatchStatus>,
    /// Livepatch modules still loaded whose patch the kernel already freed.
    pub leftover_modules: Vec<String>,
    pub functions: Vec<FunctionOwner>,
    pub tainted: Option<u64>,
    pub taint_flags: Vec<String>,
}

pub fn status(paths: &Paths) -> Status {
    let patches = paths.patches();
    let modules = paths.modules().unwrap_or_default();
    let mut out = Vec::new();
    for (i, p) in patches.iter().enumerate() {
        let rec = state::loaded_record(paths, &p.name);
        let pending = (p.transition == Some(true))
            .then(|| paths.count_lagging(if p.enabled == Some(true) { 1 } else { 0 }));
        out.push(PatchStatus {
            stack_position: i + 1,
            pending_tasks: pending,
            refcount: modules
                .iter()
                .find(|m| m.name == p.name)
                .and_then(|m| m.refcount),
            sha256: rec.as_ref().map(|r| r.sha256.clone()),
            patch: LivePatch {
                // Before 6.11 sysfs has no `replace`; the file we loaded does.
                replace: p.replace.or(rec.as_ref().and_then(|r| r.replace)),
                ..p.clone()
            },
            meta: rec.as_ref().map(|r| r.meta.clone()),
            file: rec.map(|r| r.path),
        });
    }
    let functions = function_owners(&patches);
    let names: BTreeSet<&str> = patches.iter().map(|p| p.name.as_str()).collect();
    let tainted = paths.tainted();
    Status {
        livepatch_supported: paths.livepatch_supported(),
        release: paths.release().ok(),
        leftover_modules: modules
            .iter()
            .filter(|m| m.taint.contains('K') && !names.contains(m.name.as_str()))
            .map(|m| m.name.clone())
            .collect(),
        patches: out,
        functions,
        taint_flags: tainted.map(crate::kernel::decode_taint).unwrap_or_default(),
        tainted,
    }
}

/// Every patched function and the patch whose code runs for it now.
fn function_owners(patches: &[LivePatch]) -> Vec<FunctionOwner> {
    let mut functions: Vec<FunctionOwner> = Vec::new();
    // Bottom to top, so the last enabled patch seen for a function wins.
    for p in patches {
        for o in &p.objects {
            for f in &o.functions {
                let slot = functions
                    .iter_mut()
                    .find(|x| x.object == o.name && x.function == f.name && x.sympos == f.sympos);
                match slot {
                    Some(x) => {
                        if p.enabled == Some(true) {
                            let prev = std::mem::replace(&mut x.provided_by, p.name.clone());
                            x.also_in.push(prev);
                        } else {
                            x.also_in.push(p.name.clone());
                        }
                    }
                    None => functions.push(FunctionOwner {
                        object: o.name.clone(),
                        function: f.name.clone(),
                        sympos: f.sympos,
                        provided_by: p.name.clone(),
                        also_in: Vec::new(),
                    }),
                }
            }
        }
    }
    functions
}
