//! `hotpatch install` / `uninstall`: keep a module for the kernel release it
//! was built for, so [`crate::boot`] re-applies it at every boot of that
//! kernel.

use crate::module;
use crate::paths::Paths;
use crate::state::{self, Installed, JournalOp, JournalResult};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `hotpatch install --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallReport {
    /// The release the module was filed under: the one its vermagic names.
    pub release: String,
    pub running_release: String,
    pub installed: Installed,
    /// Warnings and notes (no vermagic; built for another release).
    pub messages: Vec<String>,
}

/// What `hotpatch uninstall --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UninstallReport {
    pub release: String,
    pub uninstalled: Installed,
}

/// Install the livepatch module `file` under the release it is built for:
/// a patch for the next kernel is installed before rebooting into it.
pub fn install(paths: &Paths, file: &Path) -> Result<InstallReport> {
    // Opened once: the bytes stored are the bytes hashed and inspected.
    let opened = module::open_module(file)?;
    let info = module::inspect_opened(file, &opened)?;
    if !info.livepatch {
        bail!(
            "{} is not a livepatch module (no livepatch=Y); refusing to install it",
            file.display()
        );
    }
    let name = info.name.clone().context(
        "module has no usable name (neither struct module's name nor modinfo name= is a valid module name); refusing to install it",
    )?;
    let running = paths.release()?;
    let mut messages = Vec::new();
    let release = match info
        .vermagic
        .as_deref()
        .and_then(|v| v.split_whitespace().next())
    {
        Some(r) => {
            state::check_release(r)
                .context("the module's vermagic does not start with a kernel release")?;
            r.to_string()
        }
        None => {
            messages.push(format!(
                "warning: {name} has no vermagic; installed for the running kernel {running}"
            ));
            running.clone()
        }
    };
    if release != running {
        messages.push(format!(
            "note: {name} is built for kernel {release}, not the running {running}: installed for {release}; it will be applied when {release} boots (not now, not on this kernel)"
        ));
    }
    let _lock = state::lock(paths, state::LOCK_WAIT)?;
    let installed = state::install_bytes(paths, &release, &name, &opened.bytes, file)?;
    messages.extend(state::record(
        paths,
        JournalOp::Install,
        Some(&name),
        Some(&info.sha256),
        JournalResult::Ok,
        None,
        serde_json::json!({ "release": release, "running_release": running, "source": installed.source }),
    ));
    Ok(InstallReport {
        release,
        running_release: running,
        installed,
        messages,
    })
}

/// Forget module `name` installed for `release` (default: the running one).
/// It stays loaded if it is.
pub fn uninstall(paths: &Paths, name: &str, release: Option<String>) -> Result<UninstallReport> {
    let release = match release {
        Some(r) => r,
        None => paths.release()?,
    };
    let _lock = state::lock(paths, state::LOCK_WAIT)?;
    let uninstalled = state::uninstall(paths, &release, name)?;
    state::record(
        paths,
        JournalOp::Uninstall,
        Some(name),
        Some(&uninstalled.sha256),
        JournalResult::Ok,
        None,
        serde_json::json!({ "release": release }),
    );
    Ok(UninstallReport {
        release,
        uninstalled,
    })
}
