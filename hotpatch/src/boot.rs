//! Boot-time re-apply (`hotpatch load --installed`, run by
//! systemd/hotpatch-apply.service): load every module installed for the
//! running kernel, in install order, unless the kernel command line says
//! not to.

use crate::ModuleError;
use crate::exitcode;
use crate::load::{self, LoadOptions, LoadReport, Outcome};
use crate::paths::Paths;
use crate::state::{self, Installed, JournalOp, JournalResult};
use anyhow::Result;
use livehost_common::progress::Progress;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

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
    /// Not loaded: it patches a function that an earlier installed patch,
    /// which did not end up applied, also patches; loading it would stack
    /// it on a base that is not there.
    Skipped {
        module: String,
        skipped: String,
    },
}

impl InstalledResult {
    pub fn exit_code(&self) -> i32 {
        match self {
            InstalledResult::Load(r) => r.outcome.exit_code(),
            InstalledResult::AlreadyLoaded { .. } => exitcode::SUCCESS,
            // Nothing changed for it: hotpatch refused to stack it.
            InstalledResult::Skipped { .. } => exitcode::REFUSED,
            InstalledResult::Failed(_) => exitcode::ERROR,
        }
    }
}

impl InstalledRun {
    /// The most severe of the modules' exit codes ([`exitcode::worst`]:
    /// a module left loaded outranks a clean rollback, whatever the
    /// numbers); one failure does not stop the rest.
    pub fn exit_code(&self) -> i32 {
        exitcode::worst(self.results.iter().map(InstalledResult::exit_code))
    }

    /// Did the module at this result end up applied?
    fn applied(r: &InstalledResult) -> bool {
        match r {
            InstalledResult::Load(l) => l.outcome.applied(),
            InstalledResult::AlreadyLoaded { .. } => true,
            InstalledResult::Failed(_) | InstalledResult::Skipped { .. } => false,
        }
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
    // Functions patched by installed patches that did not end up applied;
    // None once one of those could not even be read (then nothing later
    // can be shown independent of it).
    let mut missing: Option<BTreeSet<String>> = Some(BTreeSet::new());
    let manifest = state::read_manifest(paths, &release)?;
    let not_this_build = other_build(paths, &manifest);
    let started = std::time::Instant::now();
    for e in manifest.modules {
        let file = state::installed_file(paths, &release, &e);
        let left = opts.budget.map(|b| b.saturating_sub(started.elapsed()));
        let funcs = file.as_deref().ok().and_then(patched_functions);
        let skip = |why: String| InstalledResult::Skipped {
            module: e.name.clone(),
            skipped: why,
        };
        let r = if let Some(r) = already_loaded(paths, &e) {
            r
        } else if let Some(why) = &not_this_build {
            skip(why.clone())
        } else if left.is_some_and(|l| l.is_zero()) {
            // The budget as given (`{}`, not rounded): a 0.5 s budget
            // must not read as "0s".
            skip(format!(
                "the run's --budget of {}s is spent; not loaded",
                opts.budget.unwrap_or_default().as_secs_f64()
            ))
        } else if let Some(why) = stacked_on_missing(&missing, &funcs) {
            InstalledResult::Skipped {
                module: e.name.clone(),
                skipped: why,
            }
        } else {
            let opts = LoadOptions {
                timeout: left.map_or(opts.timeout, |l| l.min(opts.timeout)),
                ..opts.clone()
            };
            match &file {
                Ok(f) => load_one(paths, f, &e, &opts, progress),
                Err(err) => InstalledResult::Failed(ModuleError::new(&e.name, err)),
            }
        };
        if !InstalledRun::applied(&r) {
            match (&mut missing, funcs) {
                (Some(m), Some(f)) => m.extend(f),
                _ => missing = None,
            }
        }
        if let InstalledResult::Skipped { module, skipped } = &r {
            state::record(
                paths,
                JournalOp::Load,
                Some(module),
                Some(&e.sha256),
                JournalResult::Refused,
                None,
                serde_json::json!({ "reasons": [skipped] }),
            );
        }
        on_each(&r);
        run.results.push(r);
    }
    Ok(run)
}

/// Why nothing installed may be loaded on this kernel: the manifest was
/// written on a kernel of the same release but another build.
fn other_build(paths: &Paths, m: &state::Manifest) -> Option<String> {
    let then = m.kernel_build_id.as_deref()?;
    let now = paths.kernel_build_id()?;
    (then != now).then(|| {
        format!(
            "installed on kernel {} build id {then}, but the running kernel of that release has build id {now} (a rebuild: other code); not loaded, reinstall patches built for it",
            m.release
        )
    })
}

/// `object:function` for each function the module file patches, or None
/// when the file cannot be inspected.
fn patched_functions(file: &std::path::Path) -> Option<BTreeSet<String>> {
    let info = crate::module::inspect_file(file).ok()?;
    Some(
        info.functions()
            .map(|(o, f)| format!("{o}:{}", f.name))
            .collect(),
    )
}

/// Why a module patching `funcs` must not be loaded on top of the patches
/// that failed (which patch the `missing` functions), if it must not.
fn stacked_on_missing(
    missing: &Option<BTreeSet<String>>,
    funcs: &Option<BTreeSet<String>>,
) -> Option<String> {
    let Some(missing) = missing else {
        return Some("an earlier installed patch failed and its file cannot be read, so whether this one stacks on it is unknown; not loaded".into());
    };
    let funcs = funcs.as_ref()?;
    let shared: Vec<&str> = funcs.intersection(missing).map(String::as_str).collect();
    (!shared.is_empty()).then(|| {
        format!(
            "stacks on an earlier installed patch that is not applied (both patch {}); not loaded",
            shared.join(", ")
        )
    })
}

/// Already loaded by hotpatch from a file with the installed sha256.
fn already_loaded(paths: &Paths, e: &Installed) -> Option<InstalledResult> {
    let rec = state::loaded_record(paths, &e.name)?;
    (paths.patch(&e.name).is_some() && rec.sha256 == e.sha256).then(|| {
        InstalledResult::AlreadyLoaded {
            module: e.name.clone(),
            outcome: Outcome::AlreadyLoaded,
        }
    })
}

fn load_one(
    paths: &Paths,
    file: &std::path::Path,
    e: &Installed,
    opts: &LoadOptions,
    progress: &Progress,
) -> InstalledResult {
    let opts = LoadOptions {
        expected_sha256: Some(e.sha256.clone()),
        ..opts.clone()
    };
    match load::load(paths, file, &opts, progress) {
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
        assert_eq!(run.exit_code(), exitcode::ERROR);
        assert_eq!(serde_json::to_value(&run).unwrap(), json);
    }
}
