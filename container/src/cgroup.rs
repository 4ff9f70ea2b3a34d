//! cgroup v2 leaves: where the hierarchy is, leaves that remove themselves
//! when dropped, and leaves an earlier process left behind.

use crate::cleanup::live;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where this host's cgroup v2 hierarchy is mounted (the unified tree on a
/// hybrid host), from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mi = livehost_common::sysfs::read_text("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// A cgroup leaf that is removed when dropped. While it exists it is also
/// known to [`crate::clean_up_on_stop_signals`].
pub(crate) struct Leaf(PathBuf);

impl Leaf {
    /// Create the leaf. Registered under the same lock the stop-signal
    /// clean-up takes, so no leaf is created behind its back.
    pub(crate) fn create(path: PathBuf) -> std::io::Result<Leaf> {
        let mut l = live();
        std::fs::create_dir(&path)?;
        l.leaves.push(path.clone());
        Ok(Leaf(path))
    }

    /// Create `PREFIX-PID-SEQ` under `root`: unique in this process, and
    /// recognisable by [`remove_stale_leaves`] once this process is gone.
    pub(crate) fn create_numbered(root: &Path, prefix: &str) -> std::io::Result<Leaf> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        Leaf::create(root.join(format!(
            "{prefix}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )))
    }

    /// Take ownership of a leaf the caller just created.
    pub(crate) fn adopt(path: PathBuf) -> Leaf {
        live().leaves.push(path.clone());
        Leaf(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        remove_leaf(&self.0);
        live().leaves.retain(|l| *l != self.0);
    }
}

/// Remove a leaf, retrying briefly while the kernel tears its last task
/// down. True when it is gone.
pub(crate) fn remove_leaf(path: &Path) -> bool {
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    false
}

/// Remove `PREFIX-PID-SEQ` leaves an earlier process left behind (killed
/// with SIGKILL, or died before it could clean up): those whose creating
/// pid no longer exists and that hold no process (rmdir refuses a
/// populated cgroup). Returns the leaves removed.
pub fn remove_stale_leaves(prefix: &str) -> Vec<PathBuf> {
    let Some(root) = cgroup2_root() else {
        return vec![];
    };
    let Ok(rd) = std::fs::read_dir(&root) else {
        return vec![];
    };
    let mut removed = vec![];
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest
            .split_once('-')
            .filter(|(_, seq)| seq.parse::<u64>().is_ok())
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}
