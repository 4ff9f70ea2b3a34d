//! `--dry-run` for `load`, `unload`, `install` and `uninstall`: what would
//! be checked, superseded, removed, and in which order, changing nothing
//! (no kernel write, no journal line, no state file, no lock taken).

use crate::change;
use crate::check::{self, Preflight};
use crate::module;
use crate::paths::Paths;
use crate::state;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `--dry-run --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The command this is the plan of (`load`, `unload`, ...).
    pub command: String,
    /// The preflight a load would run, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preflight: Option<Preflight>,
    /// What would happen, in order.
    pub steps: Vec<String>,
    /// Whether the command would go ahead (false: it would refuse).
    pub would_proceed: bool,
}

impl Plan {
    pub fn exit_code(&self) -> i32 {
        if self.would_proceed {
            crate::exitcode::SUCCESS
        } else {
            crate::exitcode::REFUSED
        }
    }
}

/// `load --dry-run FILE`.
pub fn load(paths: &Paths, file: &Path) -> Result<Plan> {
    let opened = module::open_module(file)?;
    let info = module::inspect_opened(file, &opened)?;
    let pre = check::preflight(paths, &info);
    let name = info.name.clone().unwrap_or_else(|| "?".into());
    let mut steps = Vec::new();
    if pre.ok {
        steps.push(format!(
            "finit_module {} (sha256 {}) as {name}",
            file.display(),
            info.sha256
        ));
        steps.push(format!("wait for {name}'s transition; on a stall name the tasks, reverse it and remove the module"));
        if info.replace == Some(true) {
            for p in paths.patches() {
                steps.push(format!(
                    "atomic replace: {} is superseded; wait for the kernel to free it, remove its module",
                    p.name
                ));
            }
        }
    } else {
        steps.push("refused by the preflight: nothing would be loaded".into());
    }
    Ok(Plan {
        command: "load".into(),
        would_proceed: pre.ok,
        preflight: Some(pre),
        steps,
    })
}

/// `unload --dry-run NAME` or `--all` (`name` None).
pub fn unload(paths: &Paths, name: Option<&str>) -> Plan {
    let names = match name {
        Some(n) => vec![n.to_string()],
        None => change::unload_order(paths),
    };
    let mut steps = Vec::new();
    let mut ok = true;
    for n in &names {
        match (paths.patch(n), paths.module(n)) {
            (Some(p), _) => {
                let how = if p.enabled == Some(true) {
                    "write enabled=0, wait for unpatching (reversed if it stalls)"
                } else {
                    "wait for its unpatching"
                };
                steps.push(format!(
                    "{n}: {how}; wait for the kernel to free it; remove the module"
                ));
            }
            (None, Some(_)) => steps.push(format!(
                "{n}: already freed by the kernel; remove the module"
            )),
            (None, None) => {
                ok = false;
                steps.push(format!("{n}: no such module loaded: refused"));
            }
        }
    }
    if names.is_empty() {
        steps.push("no livepatch modules loaded: nothing to do".into());
    }
    Plan {
        command: "unload".into(),
        preflight: None,
        steps,
        would_proceed: ok,
    }
}

/// `install --dry-run FILE`.
pub fn install(paths: &Paths, file: &Path) -> Result<Plan> {
    let opened = module::open_module(file)?;
    let info = module::inspect_opened(file, &opened)?;
    let running = paths.release()?;
    let release = info
        .vermagic
        .as_deref()
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or(&running)
        .to_string();
    let mut steps = Vec::new();
    let ok = info.livepatch && info.name.is_some() && state::check_release(&release).is_ok();
    let Some(name) = info.name.clone().filter(|_| ok) else {
        steps.push("not a livepatch module with a usable name and release: refused".into());
        return Ok(Plan {
            command: "install".into(),
            preflight: None,
            steps,
            would_proceed: false,
        });
    };
    let m = state::read_manifest(paths, &release)?;
    let stored = state::stored_name(&name, &info.sha256);
    steps.push(format!(
        "store {} as {}",
        file.display(),
        paths.installed_dir(&release).join(&stored).display()
    ));
    match m.modules.iter().position(|e| e.name == name) {
        Some(i) => steps.push(format!(
            "replace the installed {name} ({}) in place: boot order position {} of {}",
            m.modules[i].file,
            i + 1,
            m.modules.len()
        )),
        None => steps.push(format!(
            "add {name} at the end of the boot order: position {}",
            m.modules.len() + 1
        )),
    }
    if release != running {
        steps.push(format!(
            "applied when {release} boots, not on the running {running}"
        ));
    }
    Ok(Plan {
        command: "install".into(),
        preflight: None,
        steps,
        would_proceed: true,
    })
}

/// `uninstall --dry-run NAME`.
pub fn uninstall(paths: &Paths, name: &str, release: Option<String>) -> Result<Plan> {
    let release = match release {
        Some(r) => r,
        None => paths.release()?,
    };
    let m = state::read_manifest(paths, &release)?;
    let (steps, ok) = match m.modules.iter().find(|e| e.name == name) {
        Some(e) => (
            vec![
                format!("remove {name} from the boot order for {release}"),
                format!(
                    "delete {}",
                    paths.installed_dir(&release).join(&e.file).display()
                ),
                format!("{name} stays loaded if it is (`hotpatch unload {name}` removes it)"),
            ],
            true,
        ),
        None => (
            vec![format!("{name} is not installed for {release}: refused")],
            false,
        ),
    };
    Ok(Plan {
        command: "uninstall".into(),
        preflight: None,
        steps,
        would_proceed: ok,
    })
}
