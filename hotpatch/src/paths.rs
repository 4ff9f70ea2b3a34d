//! Where hotpatch looks for the kernel and keeps its own state.
//!
//! Every path is injectable so the decision logic can be unit-tested against
//! a fake tree; the real thing runs against `/sys`, `/proc` and
//! `/var/lib/hotpatch`.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Paths {
    pub sys: PathBuf,
    pub proc: PathBuf,
    /// Where `/boot/config-<release>` lives (for the expected vermagic).
    pub boot: PathBuf,
    /// Installed modules, manifest, journal, lock.
    pub state: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            sys: "/sys".into(),
            proc: "/proc".into(),
            boot: "/boot".into(),
            state: "/var/lib/hotpatch".into(),
        }
    }
}

impl Paths {
    pub fn livepatch(&self) -> PathBuf {
        self.sys.join("kernel/livepatch")
    }
    pub fn patch_dir(&self, name: &str) -> PathBuf {
        self.livepatch().join(name)
    }
    pub fn proc_file(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.proc.join(rel)
    }
    pub fn journal(&self) -> PathBuf {
        self.state.join("journal.jsonl")
    }
    pub fn lock(&self) -> PathBuf {
        self.state.join("lock")
    }
    /// Records of modules hotpatch itself loaded (name -> file hash), so
    /// `list` and `check` can tell whether a loaded patch is a given file.
    pub fn loaded_dir(&self) -> PathBuf {
        self.state.join("loaded")
    }
    pub fn installed_dir(&self, release: &str) -> PathBuf {
        self.state.join("installed").join(release)
    }
}
