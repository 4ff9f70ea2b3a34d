//! Advisory whole-file locks (`flock`), so two livehost processes never
//! interleave an operation that must be atomic (a kernel download, a patch
//! load). The lock is released when the guard drops or the process dies.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A held lock on a file; dropping it releases the lock.
pub struct FileLock {
    _file: File,
    pub path: PathBuf,
}

impl FileLock {
    /// Block until the lock is ours.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        Self::acquire_within(path, None)
    }

    /// Wait at most `timeout` for the lock (`None`: forever). On timeout the
    /// error says which file is held so the user can find the other process.
    pub fn acquire_within(path: &Path, timeout: Option<Duration>) -> Result<FileLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a descriptor we own; no memory is touched.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(FileLock {
                    _file: file,
                    path: path.to_path_buf(),
                });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
            if let Some(t) = timeout
                && start.elapsed() >= t
            {
                bail!(
                    "{} is locked by another process (waited {:.1}s); wait for it to finish",
                    path.display(),
                    t.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
