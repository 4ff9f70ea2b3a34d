//! Preflight: will this module load cleanly as a livepatch on the running
//! kernel? Each check passes or fails with a reason a person can act on, so a
//! wrong kernel is reported as "built for X, running Y" and not as the
//! kernel's bare "Invalid module format".

use crate::kernel::Kallsyms;
use crate::module::ModuleInfo;
use crate::paths::Paths;
use crate::state;
use livehost_common::sysfs::{read_attr, read_text};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Not a reason to refuse, but worth knowing (unsigned module taints).
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable identifier scripts can match on.
    pub id: &'static str,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Preflight {
    pub module: Option<String>,
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Preflight {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }
}

fn push(v: &mut Vec<Check>, id: &'static str, status: Status, detail: impl Into<String>) {
    v.push(Check {
        id,
        status,
        detail: detail.into(),
    });
}

/// What the running kernel's own vermagic would be, from its config file
/// (include/linux/vermagic.h). `None` when no config is found: then only the
/// release can be compared.
pub fn expected_vermagic(paths: &Paths, release: &str) -> Option<(String, String)> {
    let cfg_path = paths.boot.join(format!("config-{release}"));
    let cfg = read_text(&cfg_path).ok()?;
    let on = |k: &str| cfg.lines().any(|l| l == format!("{k}=y"));
    let mut s = format!("{release} ");
    if on("CONFIG_SMP") {
        s.push_str("SMP ");
    }
    if on("CONFIG_PREEMPT_RT") {
        s.push_str("preempt_rt ");
    } else if on("CONFIG_PREEMPT_BUILD") || on("CONFIG_PREEMPT") {
        s.push_str("preempt ");
    }
    if on("CONFIG_MODULE_UNLOAD") {
        s.push_str("mod_unload ");
    }
    if on("CONFIG_MODVERSIONS") {
        s.push_str("modversions ");
    }
    Some((s, cfg_path.display().to_string()))
}

/// Compare a module's vermagic with the kernel's; `Err` says what differs.
pub fn compare_vermagic(
    module: &str,
    release: &str,
    expected: Option<&str>,
) -> Result<String, String> {
    let mut mt = module.split_whitespace();
    let m_release = mt.next().unwrap_or("");
    let m_flags: Vec<&str> = mt.collect();
    let mut problems = Vec::new();
    if m_release != release {
        problems.push(format!(
            "built for kernel {m_release:?}, running {release:?}"
        ));
    }
    if let Some(exp) = expected {
        let e_flags: Vec<&str> = exp.split_whitespace().skip(1).collect();
        // RANDSTRUCT_<hash> cannot be derived from the config; skip it.
        let relevant = |f: &&&str| !f.starts_with("RANDSTRUCT_");
        let missing: Vec<&str> = e_flags
            .iter()
            .filter(relevant)
            .filter(|f| !m_flags.contains(f))
            .copied()
            .collect();
        let extra: Vec<&str> = m_flags
            .iter()
            .filter(relevant)
            .filter(|f| !e_flags.contains(f))
            .copied()
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "module lacks {:?}, which the running kernel has",
                missing.join(" ")
            ));
        }
        if !extra.is_empty() {
            problems.push(format!(
                "module has {:?}, which the running kernel lacks",
                extra.join(" ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(match expected {
            Some(_) => format!("{:?} matches the running kernel", module.trim_end()),
            None => format!(
                "release {release} matches (no kernel config found, so the flags were not compared)"
            ),
        })
    } else {
        Err(format!(
            "{} (module vermagic {:?})",
            problems.join("; "),
            module.trim_end()
        ))
    }
}

/// Run every preflight check for `info` (a module file with hash `sha256`).
pub fn preflight(paths: &Paths, info: &ModuleInfo) -> Preflight {
    let mut c = Vec::new();

    if info.livepatch {
        push(
            &mut c,
            "livepatch-module",
            Status::Pass,
            "modinfo livepatch=Y",
        );
    } else {
        push(
            &mut c,
            "livepatch-module",
            Status::Fail,
            "not a livepatch module: modinfo has no livepatch=Y (a plain module belongs to insmod/modprobe)",
        );
    }

    if paths.livepatch_supported() {
        push(
            &mut c,
            "kernel-livepatch",
            Status::Pass,
            "/sys/kernel/livepatch present",
        );
    } else {
        push(
            &mut c,
            "kernel-livepatch",
            Status::Fail,
            format!(
                "{} is missing: this kernel was built without CONFIG_LIVEPATCH (or cannot load modules)",
                paths.livepatch().display()
            ),
        );
    }

    let release = paths.release().ok();
    match (&info.vermagic, &release) {
        (None, _) => push(&mut c, "vermagic", Status::Fail, "module has no vermagic"),
        (Some(_), None) => push(
            &mut c,
            "vermagic",
            Status::Fail,
            "cannot read the running kernel's release from /proc/sys/kernel/osrelease",
        ),
        (Some(vm), Some(rel)) => {
            let exp = expected_vermagic(paths, rel);
            match compare_vermagic(vm, rel, exp.as_ref().map(|(s, _)| s.as_str())) {
                Ok(d) => push(&mut c, "vermagic", Status::Pass, d),
                Err(d) => push(&mut c, "vermagic", Status::Fail, d),
            }
        }
    }

    match &info.name {
        None => push(
            &mut c,
            "not-loaded",
            Status::Fail,
            "cannot tell the module's name",
        ),
        Some(name) => match paths.module(name) {
            None => push(
                &mut c,
                "not-loaded",
                Status::Pass,
                format!("no module {name} loaded"),
            ),
            Some(_) => {
                let same = match state::loaded_record(paths, name) {
                    Some(r) if r.sha256 == info.sha256 => {
                        "the same file (sha256 matches the one hotpatch loaded)".to_string()
                    }
                    Some(r) => format!(
                        "a different file (hotpatch loaded sha256 {}…, this is {}…)",
                        &r.sha256[..12.min(r.sha256.len())],
                        &info.sha256[..12]
                    ),
                    None => "not loaded by hotpatch, so it cannot tell whether it is this file"
                        .to_string(),
                };
                let enabled = paths
                    .patch(name)
                    .map(|p| {
                        if p.enabled == Some(true) {
                            "enabled"
                        } else {
                            "disabled"
                        }
                    })
                    .unwrap_or("no longer a live patch (replaced or disabled); unload it first");
                push(
                    &mut c,
                    "not-loaded",
                    Status::Fail,
                    format!("module {name} is already loaded ({enabled}): {same}"),
                );
            }
        },
    }

    match Kallsyms::load(paths) {
        Err(e) => push(&mut c, "target-symbols", Status::Fail, format!("{e:#}")),
        Ok(ks) => {
            let mut missing = Vec::new();
            let mut deferred = Vec::new();
            let mut n = 0;
            for (obj, f) in info.functions() {
                n += 1;
                if obj != "vmlinux" && !ks.has_object(obj) {
                    deferred.push(format!("{obj}:{}", f.name));
                } else if !ks.has(obj, &f.name) {
                    missing.push(format!("{obj}:{}", f.name));
                }
            }
            if !missing.is_empty() {
                push(
                    &mut c,
                    "target-symbols",
                    Status::Fail,
                    format!(
                        "not in /proc/kallsyms of the running kernel: {} (patch built for other code?)",
                        missing.join(", ")
                    ),
                );
            } else if n == 0 && info.livepatch {
                push(
                    &mut c,
                    "target-symbols",
                    Status::Warn,
                    "could not find which functions the module patches; nothing checked",
                );
            } else if n > 0 {
                let mut d = format!("all {n} target function(s) found");
                if !deferred.is_empty() {
                    d.push_str(&format!(
                        "; {} apply when their module loads (not loaded now)",
                        deferred.join(", ")
                    ));
                }
                push(&mut c, "target-symbols", Status::Pass, d);
            }
        }
    }

    match read_attr(paths.proc_file("sys/kernel/ftrace_enabled")).as_deref() {
        Ok("1") => push(&mut c, "ftrace", Status::Pass, "ftrace_enabled=1"),
        Ok(v) => push(
            &mut c,
            "ftrace",
            Status::Fail,
            format!("ftrace_enabled={v}: livepatch needs ftrace; sysctl kernel.ftrace_enabled=1"),
        ),
        Err(_) => push(
            &mut c,
            "ftrace",
            Status::Warn,
            "no /proc/sys/kernel/ftrace_enabled (kernel without function tracer?)",
        ),
    }

    match paths.any_in_transition() {
        None => push(
            &mut c,
            "no-transition",
            Status::Pass,
            "no patch in transition",
        ),
        Some(p) => push(
            &mut c,
            "no-transition",
            Status::Fail,
            format!(
                "patch {p} is still in transition; only one may be at a time (see `hotpatch status`)"
            ),
        ),
    }

    let enforce = read_attr(paths.sys.join("module/module/parameters/sig_enforce"))
        .ok()
        .as_deref()
        == Some("Y");
    let lockdown = read_attr(paths.sys.join("kernel/security/lockdown"))
        .ok()
        .and_then(|l| {
            let sel = l.split('[').nth(1)?.split(']').next()?.to_string();
            (sel != "none").then_some(sel)
        });
    let required = enforce || lockdown.is_some();
    let why = match (enforce, &lockdown) {
        (true, _) => "sig_enforce=Y".to_string(),
        (false, Some(l)) => format!("lockdown={l}"),
        _ => String::new(),
    };
    match (required, &info.signature) {
        (true, None) => push(
            &mut c,
            "signature",
            Status::Fail,
            format!("the kernel requires signed modules ({why}) and this one is unsigned"),
        ),
        (true, Some(s)) => push(
            &mut c,
            "signature",
            Status::Pass,
            format!(
                "signed ({}); required by {why}; the kernel verifies the key",
                s.id_type
            ),
        ),
        (false, None) => push(
            &mut c,
            "signature",
            Status::Warn,
            "unsigned; not required here, but loading taints the kernel (E)",
        ),
        (false, Some(s)) => push(
            &mut c,
            "signature",
            Status::Pass,
            format!("signed ({})", s.id_type),
        ),
    }

    let ok = !c.iter().any(|x| x.status == Status::Fail);
    Preflight {
        module: info.name.clone(),
        ok,
        checks: c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vermagic_same() {
        let r = compare_vermagic(
            "6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions ",
            "6.1.0-56-cloud-amd64",
            Some("6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions "),
        );
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn vermagic_names_both_differences() {
        let r = compare_vermagic(
            "5.10.0-30-amd64 SMP mod_unload modversions ",
            "6.1.0-56-cloud-amd64",
            Some("6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions "),
        )
        .unwrap_err();
        assert!(r.contains("built for kernel \"5.10.0-30-amd64\""), "{r}");
        assert!(r.contains("lacks \"preempt\""), "{r}");
    }

    #[test]
    fn vermagic_without_config_compares_release_only() {
        assert!(compare_vermagic("6.1.0 SMP", "6.1.0", None).is_ok());
        assert!(compare_vermagic("6.2.0 SMP", "6.1.0", None).is_err());
        assert!(compare_vermagic("", "6.1.0", None).is_err());
    }
}
