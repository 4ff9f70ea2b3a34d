//! hotpatch: a kernel livepatch manager.
//!
//! Inspect a livepatch module without trusting it ([`module`]), preflight it
//! against the running kernel ([`check`]), load it and follow the transition
//! task by task, rolling back when it stalls ([`load`], [`transition`]),
//! change or remove a loaded patch ([`change`]), show what is patched
//! ([`list`]), and keep the patches that should survive a reboot
//! ([`install`], [`boot`], [`state`]). Every path to the kernel is
//! injectable ([`paths::Paths`]) so the decisions are unit-testable; the
//! end-to-end proof runs in QEMU guests (tests/guest.rs).
//!
//! Each command's `--json` output is one serde type, so other tools read it
//! back through the same type:
//!
//! | command | type |
//! |---|---|
//! | `inspect` | [`module::ModuleInfo`] |
//! | `check` | [`check::Preflight`] |
//! | `load FILE` | [`load::LoadReport`] |
//! | `load --installed` | [`boot::InstalledRun`] |
//! | `enable`, `disable` | [`change::ChangeReport`] |
//! | `unload` | `Vec<`[`change::UnloadResult`]`>` |
//! | `list` | [`list::Status`] |
//! | `status` | [`status::HostStatus`] (`list`'s fields and the verdict) |
//! | `install` | [`install::InstallReport`] |
//! | `uninstall` | [`install::UninstallReport`] |
//! | `journal` | `Vec<`[`state::JournalEntry`]`>` |
//! | any, on error | [`commands::ErrorReport`] |

pub mod boot;
pub mod change;
pub mod check;
pub mod commands;
pub mod compressed;
pub mod exitcode;
pub mod host;
pub mod install;
pub mod kernel;
pub mod kmod;
pub mod list;
pub mod load;
pub mod measure;
pub mod module;
pub mod output;
pub mod paths;
pub mod plan;
pub mod prometheus;
pub mod reconcile;
pub mod signals;
pub mod state;
pub mod status;
#[doc(hidden)]
pub mod testelf;
pub mod transition;

pub use boot::{InstalledResult, InstalledRun, SKIP_SWITCH, boot_skip_requested};
pub use change::{ChangeAction, ChangeReport, UnloadResult};
pub use check::{Check, CheckId, Preflight};
pub use commands::ErrorReport;
pub use install::{InstallReport, UninstallReport};
pub use list::Status as ListReport;
pub use load::{LoadReport, Outcome};
pub use measure::{Measurement, Window};
pub use module::ModuleInfo;
pub use state::{JournalEntry, JournalOp, JournalResult};

use serde::{Deserialize, Serialize};

/// A module that an operation over several (`unload --all`, `load
/// --installed`) could not handle; the others were still handled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleError {
    pub module: String,
    pub error: String,
}

impl ModuleError {
    pub fn new(module: &str, e: &anyhow::Error) -> ModuleError {
        ModuleError {
            module: module.to_string(),
            error: format!("{e:#}"),
        }
    }
}
