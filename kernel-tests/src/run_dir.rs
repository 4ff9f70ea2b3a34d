//! Per-run host state: the run's temporary directory and the machine-wide
//! guest slot it holds while QEMU runs.

use crate::kernel::cache_dir;
use anyhow::{Context, Result};
use livehost_common::lock::FileLock;
use livehost_common::progress::Progress;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Marks a run directory kept on purpose (`LIVEHOST_KEEP_RUN`): never swept.
const KEPT: &str = ".kept";

/// The temporary directory of one run, removed afterwards unless
/// `LIVEHOST_KEEP_RUN` is set (for debugging a guest by hand).
pub(crate) struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        static SWEEP: std::sync::Once = std::sync::Once::new();
        let runs = cache_dir().join("runs");
        SWEEP.call_once(|| {
            sweep_stale(&runs);
        });
        let path = runs.join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("LIVEHOST_KEEP_RUN").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            let _ = std::fs::write(self.path.join(KEPT), "");
            eprintln!("kept guest run files in {}", self.path.display());
        }
    }
}

/// Remove the `PID-N` run directories of processes that are gone (killed
/// by SIGKILL, or by SIGINT before their clean-up ran), except those kept
/// on purpose. Directories of live processes and anything not named
/// `PID-N` are left alone. Returns what was removed.
pub(crate) fn sweep_stale(runs: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(runs) else {
        return vec![];
    };
    let mut removed = vec![];
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .filter(|(_, n)| n.parse::<u32>().is_ok())
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if alive || e.path().join(KEPT).exists() {
            continue;
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// At most one guest per host CPU at a time, across processes (parallel
/// tests, several test binaries): TCG guests are CPU-bound and
/// oversubscribing makes every one of them slower and flakier.
pub(crate) fn qemu_slot(progress: &Progress) -> Result<FileLock> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let dir = cache_dir().join("slots");
    let mut told = false;
    loop {
        for i in 0..n {
            if let Ok(l) =
                FileLock::acquire_within(&dir.join(format!("qemu-{i}.lock")), Some(Duration::ZERO))
            {
                return Ok(l);
            }
        }
        if !told {
            progress.step("waiting for a free guest slot");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_run_dirs_of_dead_processes_are_swept() {
        let d = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22: this pid cannot be running.
        let dead = d.path().join("99999999-0");
        let kept = d.path().join("99999999-1");
        let mine = d.path().join(format!("{}-0", std::process::id()));
        let init = d.path().join("1-3");
        let other = d.path().join("notes-x");
        for p in [&dead, &kept, &mine, &init, &other] {
            std::fs::create_dir_all(p.join("sub")).unwrap();
        }
        std::fs::write(kept.join(KEPT), "").unwrap();
        assert_eq!(sweep_stale(d.path()), vec![dead.clone()]);
        assert!(!dead.exists());
        for p in [&kept, &mine, &init, &other] {
            assert!(p.exists(), "{} must stay", p.display());
        }
        assert!(sweep_stale(&d.path().join("missing")).is_empty());
    }
}
