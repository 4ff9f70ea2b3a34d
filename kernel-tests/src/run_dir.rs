//! Per-run host state: the run's temporary directory and the machine-wide
//! guest slot it holds while QEMU runs.

use crate::kernel::cache_dir;
use anyhow::{Context, Result};
use livehost_common::lock::FileLock;
use livehost_common::progress::Progress;
use std::path::PathBuf;
use std::time::Duration;

/// The temporary directory of one run, removed afterwards unless
/// `LIVEHOST_KEEP_RUN` is set (for debugging a guest by hand).
pub(crate) struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = cache_dir().join("runs").join(format!(
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
            eprintln!("kept guest run files in {}", self.path.display());
        }
    }
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
