//! Resource limits written to a container's cgroup leaf before it starts,
//! for the controllers the leaf has: `pids.max` and `memory.max`. On a
//! hybrid host the v2 tree has no controllers (they are bound to v1), so
//! no limit can be set there, and the result says so.

use std::path::Path;

/// Most tasks a container may have.
pub const PIDS_MAX: u64 = 1024;
/// Most memory a container may use (the workload's largest size, 1 GiB,
/// plus room).
pub const MEMORY_MAX: u64 = 2 << 30;

/// Enable `pids` and `memory` for the leaf's children in its parent where
/// the parent has them, then write the limits the leaf now offers. Returns
/// what was set (`pids.max=1024`, ...), or the reason nothing was.
pub fn apply(leaf: &Path) -> Result<Vec<String>, String> {
    let parent = leaf.parent().ok_or("the leaf has no parent")?;
    let available = read_words(&parent.join("cgroup.controllers"));
    let enabled = read_words(&parent.join("cgroup.subtree_control"));
    for c in ["pids", "memory"] {
        if available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c) {
            // Best effort: a parent with processes of its own refuses.
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
    let mut set = vec![];
    for (file, value) in [("pids.max", PIDS_MAX), ("memory.max", MEMORY_MAX)] {
        let p = leaf.join(file);
        if !p.exists() {
            continue;
        }
        std::fs::write(&p, value.to_string())
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        set.push(format!("{file}={value}"));
    }
    if set.is_empty() {
        return Err(format!(
            "none: the cgroup v2 tree at {} offers neither pids nor memory here",
            parent.display()
        ));
    }
    Ok(set)
}

fn read_words(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
