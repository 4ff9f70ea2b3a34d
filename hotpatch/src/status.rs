//! `hotpatch status`: is this host as intended? The installed set for the
//! running kernel against what is loaded (drift either way), anything in
//! transition, changes a killed run left unfinished, the last journalled
//! outcome, taint and the kernel's build id, in one object. Exit 0 only
//! when the host matches its installed set.

use crate::list::{self, Status as ListStatus};
use crate::paths::Paths;
use crate::state::{self, JournalEntry};
use serde::{Deserialize, Serialize};

/// One module installed for the running kernel, and whether it is applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstalledState {
    pub name: String,
    pub sha256: String,
    /// `applied`, `not-loaded`, `different-file`, `unknown-file`,
    /// `disabled`, `in-transition`.
    pub state: String,
    /// Description, version, CVE ids, as installed.
    #[serde(default)]
    pub meta: crate::module::PatchMeta,
}

/// What `hotpatch status --json` prints: `list`'s fields, plus the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    #[serde(flatten)]
    pub list: ListStatus,
    /// The host matches its installed set, nothing is in transition and no
    /// change is unfinished.
    pub as_intended: bool,
    /// Why not, one line each.
    pub problems: Vec<String>,
    pub installed: Vec<InstalledState>,
    /// Live patches loaded but not installed for this kernel.
    pub not_installed: Vec<String>,
    pub in_transition: Vec<String>,
    /// Changes begun by a run that never finished them.
    pub unfinished: usize,
    pub last_change: Option<JournalEntry>,
    /// GNU build id of the running kernel (`/sys/kernel/notes`).
    pub kernel_build_id: Option<String>,
}

impl HostStatus {
    pub fn exit_code(&self) -> i32 {
        if self.as_intended {
            crate::exitcode::SUCCESS
        } else {
            crate::exitcode::DRIFT
        }
    }
}

pub fn host_status(paths: &Paths) -> HostStatus {
    let list = list::status(paths);
    let mut problems = Vec::new();
    let manifest = list
        .release
        .as_deref()
        .map(|r| state::read_manifest(paths, r));
    let modules = match manifest {
        Some(Ok(m)) => m.modules,
        Some(Err(e)) => {
            problems.push(format!("cannot read the installed set: {e:#}"));
            Vec::new()
        }
        None => Vec::new(),
    };
    let installed: Vec<InstalledState> = modules
        .iter()
        .map(|e| {
            let state = installed_state(&list, &e.name, &e.sha256);
            if state != "applied" {
                problems.push(format!("installed {} is {state}", e.name));
            }
            InstalledState {
                name: e.name.clone(),
                sha256: e.sha256.clone(),
                state: state.into(),
                meta: e.meta.clone(),
            }
        })
        .collect();
    let not_installed: Vec<String> = list
        .patches
        .iter()
        .map(|p| p.patch.name.clone())
        .filter(|n| !modules.iter().any(|e| e.name == *n))
        .collect();
    for n in &not_installed {
        problems.push(format!("{n} is loaded but not installed for this kernel"));
    }
    let in_transition: Vec<String> = list
        .patches
        .iter()
        .filter(|p| p.patch.transition == Some(true))
        .map(|p| p.patch.name.clone())
        .collect();
    for n in &in_transition {
        problems.push(format!("{n} is in transition"));
    }
    for m in &list.leftover_modules {
        problems.push(format!("{m}: livepatch module loaded, its patch freed"));
    }
    let journal = state::read_journal(paths).unwrap_or_default();
    let unfinished = crate::reconcile::unfinished(&journal).len();
    if unfinished > 0 {
        problems.push(format!(
            "{unfinished} change(s) begun and never finished (run hotpatch as root to reconcile)"
        ));
    }
    let last_change = journal
        .into_iter()
        .rev()
        .find(|e| e.result != state::JournalResult::Begin);
    HostStatus {
        as_intended: problems.is_empty(),
        problems,
        installed,
        not_installed,
        in_transition,
        unfinished,
        last_change,
        kernel_build_id: paths.kernel_build_id(),
        list,
    }
}

/// Where the installed module `name` (recorded sha256 `sha`) stands.
fn installed_state(list: &ListStatus, name: &str, sha: &str) -> &'static str {
    let Some(p) = list.patches.iter().find(|p| p.patch.name == name) else {
        return "not-loaded";
    };
    if p.patch.transition == Some(true) {
        return "in-transition";
    }
    if p.patch.enabled != Some(true) {
        return "disabled";
    }
    match p.sha256.as_deref() {
        Some(s) if s == sha => "applied",
        Some(_) => "different-file",
        None => "unknown-file",
    }
}

/// The NT_GNU_BUILD_ID note in an ELF note section's bytes, as hex.
pub fn gnu_build_id(notes: &[u8]) -> Option<String> {
    let u32_at = |at: usize| -> Option<u32> {
        let b = notes.get(at..at.checked_add(4)?)?;
        Some(u32::from_ne_bytes(b.try_into().ok()?))
    };
    let pad = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut at = 0usize;
    while at.checked_add(12)? <= notes.len() {
        let namesz = u32_at(at)? as usize;
        let descsz = u32_at(at + 4)? as usize;
        let kind = u32_at(at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(pad(namesz)?)?;
        let end = desc_at.checked_add(pad(descsz)?)?;
        if kind == 3 && notes.get(name_at..name_at + namesz)? == b"GNU\0" {
            let d = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
            return Some(d.iter().map(|b| format!("{b:02x}")).collect());
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((name.len() as u32).to_ne_bytes());
        v.extend((desc.len() as u32).to_ne_bytes());
        v.extend(kind.to_ne_bytes());
        v.extend(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn build_id_found_after_other_notes_and_garbage_never_panics() {
        let mut n = note(b"Xen\0", 1, &[1, 2, 3]);
        n.extend(note(b"GNU\0", 3, &[0xab, 0xcd, 0x01]));
        assert_eq!(gnu_build_id(&n).as_deref(), Some("abcd01"));
        assert_eq!(gnu_build_id(&note(b"GNU\0", 1, &[1])), None);
        for cut in 0..n.len() {
            let _ = gnu_build_id(&n[..cut]);
        }
        let mut huge = n.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(gnu_build_id(&huge), None);
    }
}
