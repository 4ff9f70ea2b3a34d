//! Boot-time re-apply (`hotpatch load --installed`, run by
//! systemd/hotpatch-apply.service): load every module installed for the
//! running kernel, in install order, unless the kernel command line says
//! not to.

use crate::ModuleError;
use crate::load::{self, LoadOptions, LoadReport, Outcome};
use crate::paths::Paths;
use crate::state::{self, Installed, JournalOp, JournalResult};
use anyhow::Result;
use livehost_common::exit;
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};

/// Kernel command-line switch that makes `load --installed` do nothing, for
/// a boot where a re-applied patch is suspected of causing trouble.
pub const SKIP_SWITCH: &str = "hotpatch.skip=1";

/// True when the kernel command line asks to skip re-applying patches.
pub fn boot_skip_requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == SKIP_SWITCH)
}

/// What `hotpatch load --installed --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstalledRun {
    /// The running kernel's release, whose installed modules were loaded.
    pub release: String,
    /// Why nothing was loaded, when the kernel command line said so.
    pub skipped: Option<String>,
    pub results: Vec<InstalledResult>,
}

/// One installed module's part of [`InstalledRun`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InstalledResult {
    /// It was loaded (or refused, or rolled back: see its outcome).
    Load(Box<LoadReport>),
    /// Already loaded by hotpatch from a file with the same sha256.
    AlreadyLoaded {
        module: String,
        outcome: Outcome,
    },
    Failed(ModuleError),
}

impl InstalledResult {
    pub fn exit_code(&self) -> i32 {
        match self {
            InstalledResult::Load(r) => r.outcome.exit_code(),
            InstalledResult::AlreadyLoaded { .. } => exit::SUCCESS,
            InstalledResult::Failed(_) => exit::ERROR,
        }
    }
}

impl InstalledRun {
    /// The worst of the modules' exit codes; one failure does not stop the
    /// rest.
    pub fn exit_code(&self) -> i32 {
        self.results
            .iter()
            .map(InstalledResult::exit_code)
            .max()
            .unwrap_or(exit::SUCCESS)
    }
}

/// Load every module installed for the running kernel, in install order;
/// `on_each` sees each result as it happens. Does nothing (journalled) when
/// the kernel command line has [`SKIP_SWITCH`].
pub fn load_installed(
    paths: &Paths,
    opts: &LoadOptions,
    progress: &Progress,
    mut on_each: impl FnMut(&InstalledResult),
) -> Result<InstalledRun> {
    let release = paths.release()?;
    let mut run = InstalledRun {
        release: release.clone(),
        skipped: None,
        results: Vec::new(),
    };
    if boot_skip_requested(&paths.cmdline()) {
        run.skipped = Some(format!("kernel command line has {SKIP_SWITCH}"));
        state::record(
            paths,
            JournalOp::LoadInstalled,
            None,
            None,
            JournalResult::Ok,
            None,
            serde_json::json!({ "skipped": SKIP_SWITCH }),
        );
        return Ok(run);
    }
    for e in state::read_manifest(paths, &release)?.modules {
        let r = load_one(paths, &release, &e, opts, progress);
        on_each(&r);
        run.results.push(r);
    }
    Ok(run)
}

fn load_one(
    paths: &Paths,
    release: &str,
    e: &Installed,
    opts: &LoadOptions,
    progress: &Progress,
) -> InstalledResult {
    if let Some(rec) = state::loaded_record(paths, &e.name)
        && paths.patch(&e.name).is_some()
        && rec.sha256 == e.sha256
    {
        return InstalledResult::AlreadyLoaded {
            module: e.name.clone(),
            outcome: Outcome::AlreadyLoaded,
        };
    }
    let opts = LoadOptions {
        expected_sha256: Some(e.sha256.clone()),
        ..opts.clone()
    };
    let file = paths.installed_dir(release).join(&e.file);
    match load::load(paths, &file, &opts, progress) {
        Ok(r) => InstalledResult::Load(Box::new(r)),
        Err(err) => InstalledResult::Failed(ModuleError::new(&e.name, &err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_switch_is_a_whole_word() {
        assert!(super::boot_skip_requested("ro quiet hotpatch.skip=1 x"));
        assert!(!super::boot_skip_requested("hotpatch.skip=10"));
        assert!(!super::boot_skip_requested("xhotpatch.skip=1"));
        assert!(!super::boot_skip_requested(""));
    }

    /// `load --installed --json` reads back through [`InstalledRun`], each
    /// result as the variant it was written from; the exit code is the worst.
    #[test]
    fn installed_run_reads_back() {
        let json = serde_json::json!({
            "release": "6.1",
            "skipped": null,
            "results": [
                { "module": "a", "outcome": "already-loaded" },
                { "module": "b", "error": "cannot open" },
            ]
        });
        let run: InstalledRun = serde_json::from_value(json.clone()).unwrap();
        assert!(matches!(
            run.results[0],
            InstalledResult::AlreadyLoaded {
                outcome: Outcome::AlreadyLoaded,
                ..
            }
        ));
        assert!(matches!(&run.results[1], InstalledResult::Failed(e) if e.module == "b"));
        assert_eq!(run.exit_code(), exit::ERROR);
        assert_eq!(serde_json::to_value(&run).unwrap(), json);
    }
}
