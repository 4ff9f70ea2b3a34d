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
    /// `/lib/modules`: the running kernel's own modules are the vermagic
    /// reference.
    pub modules: PathBuf,
    /// Installed modules, manifests, the journal.
    pub state: PathBuf,
    /// Runtime state that must not outlive a boot: the host-wide lock
    /// (`lock/hotpatch.lock`) and the records of what is loaded
    /// (`hotpatch/loaded/`). `/run` is a tmpfs: emptied at every boot.
    pub run: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            sys: "/sys".into(),
            proc: "/proc".into(),
            boot: "/boot".into(),
            modules: "/lib/modules".into(),
            state: "/var/lib/hotpatch".into(),
            run: "/run".into(),
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
    /// One lock for the whole host, whatever `--state-dir` says: the
    /// kernel allows one transition at a time, for every state dir.
    pub fn lock(&self) -> PathBuf {
        self.run.join("lock/hotpatch.lock")
    }
    /// Records of modules hotpatch itself loaded (name -> file hash), so
    /// `list` and `check` can tell whether a loaded patch is a given file.
    /// Under /run: a record never survives the boot it describes.
    pub fn loaded_dir(&self) -> PathBuf {
        self.run.join("hotpatch/loaded")
    }
    /// The running kernel's GNU build id (`/sys/kernel/notes`).
    pub fn kernel_build_id(&self) -> Option<String> {
        let notes = std::fs::read(self.sys.join("kernel/notes")).ok()?;
        crate::status::gnu_build_id(&notes)
    }
    /// GNU build id of the loaded module `name`, from its sysfs notes.
    pub fn module_build_id(&self, name: &str) -> Option<String> {
        let p = self
            .sys
            .join("module")
            .join(name)
            .join("notes/.note.gnu.build-id");
        crate::status::gnu_build_id(&std::fs::read(p).ok()?)
    }
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub fn boot_id(&self) -> Option<String> {
        livehost_common::sysfs::read_attr(self.proc.join("sys/kernel/random/boot_id")).ok()
    }
    pub fn installed_dir(&self, release: &str) -> PathBuf {
        self.state.join("installed").join(release)
    }
}
