//! Preflight: will this module load cleanly as a livepatch on the running
//! kernel? Each check passes or fails with a reason a person can act on, so a
//! wrong kernel is reported as "built for X, running Y" and not as the
//! kernel's bare "Invalid module format".

use crate::kernel::Kallsyms;
use crate::module::ModuleInfo;
use crate::paths::Paths;
use crate::state;
use livehost_common::sysfs::{read_attr, read_text};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Not a reason to refuse, but worth knowing (unsigned module taints).
    Warn,
    Fail,
}

/// Stable identifier of a check, the string scripts match on (`id` in the
/// JSON, the second column of the text output).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum CheckId {
    /// `load --installed`: the file is the one recorded at install time.
    InstalledFile,
    LivepatchModule,
    KernelLivepatch,
    Vermagic,
    NotLoaded,
    TargetSymbols,
    Ftrace,
    NoTransition,
    Signature,
}

impl CheckId {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckId::InstalledFile => "installed-file",
            CheckId::LivepatchModule => "livepatch-module",
            CheckId::KernelLivepatch => "kernel-livepatch",
            CheckId::Vermagic => "vermagic",
            CheckId::NotLoaded => "not-loaded",
            CheckId::TargetSymbols => "target-symbols",
            CheckId::Ftrace => "ftrace",
            CheckId::NoTransition => "no-transition",
            CheckId::Signature => "signature",
        }
    }
}

impl std::fmt::Display for CheckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so the text output's `{:<16}` column still lines up.
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub id: CheckId,
    pub status: Status,
    pub detail: String,
}

impl Check {
    fn new(id: CheckId, status: Status, detail: impl Into<String>) -> Check {
        Check {
            id,
            status,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preflight {
    pub module: Option<String>,
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Preflight {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    /// The check with this id, if it ran.
    pub fn check(&self, id: CheckId) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// Put a failed check first (a refusal found before the kernel checks).
    pub fn refuse_first(&mut self, check: Check) {
        self.ok = false;
        self.checks.insert(0, check);
    }
}

/// The running kernel's own vermagic, and where it was read: from a module
/// the kernel shipped (`/lib/modules/<release>/kernel/...`: exact, with the
/// architecture tokens such as arm64's "aarch64" that no config spells),
/// else derived from its config file. `None` when neither is there: then
/// only the release can be compared.
pub fn expected_vermagic(paths: &Paths, release: &str) -> Option<(String, String)> {
    shipped_vermagic(paths, release).or_else(|| config_vermagic(paths, release))
}

/// The vermagic of the first module under `<modules>/<release>/kernel` (in
/// name order, at most [`SHIPPED_SCAN`] directory entries looked at) whose
/// vermagic names `release`.
fn shipped_vermagic(paths: &Paths, release: &str) -> Option<(String, String)> {
    let mut dirs = vec![paths.modules.join(release).join("kernel")];
    let mut seen = 0;
    while let Some(d) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            seen += 1;
            if seen > SHIPPED_SCAN {
                return None;
            }
            let n = p.to_string_lossy();
            if p.is_dir() {
                dirs.push(p);
            } else if n.ends_with(".ko") || n.ends_with(".ko.xz") || n.ends_with(".ko.zst") {
                let vm = crate::module::inspect_file(&p)
                    .ok()
                    .and_then(|i| i.vermagic);
                if let Some(vm) = vm.filter(|v| v.split_whitespace().next() == Some(release)) {
                    return Some((vm, p.display().to_string()));
                }
            }
        }
    }
    None
}

/// How many directory entries [`shipped_vermagic`] looks at.
const SHIPPED_SCAN: usize = 400;

/// What the vermagic would be, from the kernel's config file
/// (include/linux/vermagic.h).
fn config_vermagic(paths: &Paths, release: &str) -> Option<(String, String)> {
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

/// A module's vermagic agrees with the running kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VermagicMatch {
    /// Release and flags match the kernel's config.
    Full { vermagic: String },
    /// No kernel config was found, so only the release was compared.
    ReleaseOnly { release: String },
}

impl std::fmt::Display for VermagicMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VermagicMatch::Full { vermagic } => {
                write!(f, "{vermagic:?} matches the running kernel")
            }
            VermagicMatch::ReleaseOnly { release } => write!(
                f,
                "release {release} matches (no kernel config found, so the flags were not compared)"
            ),
        }
    }
}

/// How a module's vermagic differs from the running kernel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VermagicMismatch {
    /// The module's whole vermagic (trailing space trimmed).
    pub vermagic: String,
    /// `(module's release, running release)` when they differ.
    pub release: Option<(String, String)>,
    /// Flags the running kernel has and the module lacks.
    pub missing: Vec<String>,
    /// Flags the module has and the running kernel lacks.
    pub extra: Vec<String>,
}

impl std::fmt::Display for VermagicMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut problems = Vec::new();
        if let Some((module, running)) = &self.release {
            problems.push(format!("built for kernel {module:?}, running {running:?}"));
        }
        if !self.missing.is_empty() {
            problems.push(format!(
                "module lacks {:?}, which the running kernel has",
                self.missing.join(" ")
            ));
        }
        if !self.extra.is_empty() {
            problems.push(format!(
                "module has {:?}, which the running kernel lacks",
                self.extra.join(" ")
            ));
        }
        write!(
            f,
            "{} (module vermagic {:?})",
            problems.join("; "),
            self.vermagic
        )
    }
}

impl std::error::Error for VermagicMismatch {}

/// Compare a module's vermagic with the kernel's release and, when the
/// kernel's config gave one, its `expected` vermagic flags.
pub fn compare_vermagic(
    module: &str,
    release: &str,
    expected: Option<&str>,
) -> Result<VermagicMatch, VermagicMismatch> {
    let mut mt = module.split_whitespace();
    let m_release = mt.next().unwrap_or("");
    let m_flags: Vec<&str> = mt.collect();
    let mut out = VermagicMismatch {
        vermagic: module.trim_end().to_string(),
        release: (m_release != release).then(|| (m_release.to_string(), release.to_string())),
        missing: Vec::new(),
        extra: Vec::new(),
    };
    if let Some(exp) = expected {
        let e_flags: Vec<&str> = exp.split_whitespace().skip(1).collect();
        // RANDSTRUCT_<hash> cannot be derived from the config; skip it.
        let only_in = |a: &[&str], b: &[&str]| -> Vec<String> {
            a.iter()
                .filter(|f| !f.starts_with("RANDSTRUCT_") && !b.contains(f))
                .map(|f| f.to_string())
                .collect()
        };
        out.missing = only_in(&e_flags, &m_flags);
        out.extra = only_in(&m_flags, &e_flags);
    }
    if out.release.is_some() || !out.missing.is_empty() || !out.extra.is_empty() {
        return Err(out);
    }
    Ok(match expected {
        Some(_) => VermagicMatch::Full {
            vermagic: out.vermagic,
        },
        None => VermagicMatch::ReleaseOnly {
            release: release.to_string(),
        },
    })
}

/// Run every preflight check for `info` (a module file with hash `sha256`).
pub fn preflight(paths: &Paths, info: &ModuleInfo) -> Preflight {
    let mut checks = vec![
        livepatch_module(info),
        kernel_livepatch(paths),
        vermagic(paths, info),
        not_loaded(paths, info),
    ];
    checks.extend(target_symbols(paths, info));
    checks.push(ftrace(paths));
    checks.push(no_transition(paths));
    checks.push(signature(paths, info));
    Preflight {
        module: info.name.clone(),
        ok: !checks.iter().any(|x| x.status == Status::Fail),
        checks,
    }
}

fn livepatch_module(info: &ModuleInfo) -> Check {
    let id = CheckId::LivepatchModule;
    if info.livepatch {
        Check::new(id, Status::Pass, "modinfo livepatch=Y")
    } else {
        Check::new(
            id,
            Status::Fail,
            "not a livepatch module: modinfo has no livepatch=Y (a plain module belongs to insmod/modprobe)",
        )
    }
}

fn kernel_livepatch(paths: &Paths) -> Check {
    let id = CheckId::KernelLivepatch;
    if paths.livepatch_supported() {
        Check::new(id, Status::Pass, "/sys/kernel/livepatch present")
    } else {
        Check::new(
            id,
            Status::Fail,
            format!(
                "{} is missing: this kernel was built without CONFIG_LIVEPATCH (or cannot load modules)",
                paths.livepatch().display()
            ),
        )
    }
}

fn vermagic(paths: &Paths, info: &ModuleInfo) -> Check {
    let id = CheckId::Vermagic;
    let Some(vm) = &info.vermagic else {
        return Check::new(id, Status::Fail, "module has no vermagic");
    };
    let Ok(rel) = paths.release() else {
        return Check::new(
            id,
            Status::Fail,
            "cannot read the running kernel's release from /proc/sys/kernel/osrelease",
        );
    };
    let exp = expected_vermagic(paths, &rel);
    let source = exp
        .as_ref()
        .map(|(_, from)| format!(" (reference: {from})"))
        .unwrap_or_default();
    match compare_vermagic(vm, &rel, exp.as_ref().map(|(s, _)| s.as_str())) {
        Ok(m) => Check::new(id, Status::Pass, format!("{m}{source}")),
        Err(m) => Check::new(id, Status::Fail, format!("{m}{source}")),
    }
}

fn not_loaded(paths: &Paths, info: &ModuleInfo) -> Check {
    let id = CheckId::NotLoaded;
    let Some(name) = &info.name else {
        return Check::new(id, Status::Fail, "cannot tell the module's name");
    };
    if paths.module(name).is_none() {
        return Check::new(id, Status::Pass, format!("no module {name} loaded"));
    }
    let same = match state::loaded_record(paths, name) {
        Some(r) if r.sha256 == info.sha256 => {
            "the same file (sha256 matches the one hotpatch loaded)".to_string()
        }
        Some(r) => format!(
            "a different file (hotpatch loaded sha256 {}…, this is {}…)",
            &r.sha256[..12.min(r.sha256.len())],
            &info.sha256[..12]
        ),
        None => "not loaded by hotpatch, so it cannot tell whether it is this file".to_string(),
    };
    let enabled = match paths.patch(name) {
        Some(p) if p.enabled == Some(true) => "enabled",
        Some(_) => "disabled",
        None => "no longer a live patch (replaced or disabled); unload it first",
    };
    Check::new(
        id,
        Status::Fail,
        format!("module {name} is already loaded ({enabled}): {same}"),
    )
}

/// None when the module names no function and is not a livepatch anyway
/// (the livepatch-module check already says why it is refused).
fn target_symbols(paths: &Paths, info: &ModuleInfo) -> Option<Check> {
    let id = CheckId::TargetSymbols;
    let ks = match Kallsyms::load(paths) {
        Ok(ks) => ks,
        Err(e) => return Some(Check::new(id, Status::Fail, format!("{e:#}"))),
    };
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
        return Some(Check::new(
            id,
            Status::Fail,
            format!(
                "not in /proc/kallsyms of the running kernel: {} (patch built for other code?)",
                missing.join(", ")
            ),
        ));
    }
    if n == 0 {
        return info.livepatch.then(|| {
            Check::new(
                id,
                Status::Warn,
                "could not find which functions the module patches; nothing checked",
            )
        });
    }
    let mut d = format!("all {n} target function(s) found");
    if !deferred.is_empty() {
        d.push_str(&format!(
            "; {} apply when their module loads (not loaded now)",
            deferred.join(", ")
        ));
    }
    Some(Check::new(id, Status::Pass, d))
}

fn ftrace(paths: &Paths) -> Check {
    let id = CheckId::Ftrace;
    match read_attr(paths.proc_file("sys/kernel/ftrace_enabled")).as_deref() {
        Ok("1") => Check::new(id, Status::Pass, "ftrace_enabled=1"),
        Ok(v) => Check::new(
            id,
            Status::Fail,
            format!("ftrace_enabled={v}: livepatch needs ftrace; sysctl kernel.ftrace_enabled=1"),
        ),
        Err(_) => Check::new(
            id,
            Status::Warn,
            "no /proc/sys/kernel/ftrace_enabled (kernel without function tracer?)",
        ),
    }
}

fn no_transition(paths: &Paths) -> Check {
    let id = CheckId::NoTransition;
    match paths.any_in_transition() {
        None => Check::new(id, Status::Pass, "no patch in transition"),
        Some(p) => Check::new(
            id,
            Status::Fail,
            format!(
                "patch {p} is still in transition; only one may be at a time (see `hotpatch status`)"
            ),
        ),
    }
}

/// Why the kernel requires signed modules (`sig_enforce=Y`, or the lockdown
/// mode), or None when it does not.
fn signature_required(paths: &Paths) -> Option<String> {
    let enforce = read_attr(paths.sys.join("module/module/parameters/sig_enforce"))
        .ok()
        .as_deref()
        == Some("Y");
    if enforce {
        return Some("sig_enforce=Y".to_string());
    }
    let lockdown = read_attr(paths.sys.join("kernel/security/lockdown")).ok()?;
    let sel = lockdown.split('[').nth(1)?.split(']').next()?;
    (sel != "none").then(|| format!("lockdown={sel}"))
}

fn signature(paths: &Paths, info: &ModuleInfo) -> Check {
    let id = CheckId::Signature;
    match (signature_required(paths), &info.signature) {
        (Some(why), None) => Check::new(
            id,
            Status::Fail,
            format!("the kernel requires signed modules ({why}) and this one is unsigned"),
        ),
        (Some(why), Some(s)) => Check::new(
            id,
            Status::Pass,
            format!(
                "signed ({}); required by {why}; the kernel verifies the key",
                s.id_type
            ),
        ),
        (None, None) => Check::new(
            id,
            Status::Warn,
            "unsigned; not required here, but loading taints the kernel (E)",
        ),
        (None, Some(s)) => Check::new(id, Status::Pass, format!("signed ({})", s.id_type)),
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
        assert_eq!(
            r.release,
            Some(("5.10.0-30-amd64".into(), "6.1.0-56-cloud-amd64".into()))
        );
        assert_eq!(r.missing, ["preempt"]);
        assert!(r.extra.is_empty());
        // The text names both, as the check's detail shows it.
        let t = r.to_string();
        assert!(t.contains("built for kernel \"5.10.0-30-amd64\""), "{t}");
        assert!(t.contains("lacks \"preempt\""), "{t}");
    }

    #[test]
    fn vermagic_without_config_compares_release_only() {
        assert_eq!(
            compare_vermagic("6.1.0 SMP", "6.1.0", None),
            Ok(VermagicMatch::ReleaseOnly {
                release: "6.1.0".into()
            })
        );
        assert!(compare_vermagic("6.2.0 SMP", "6.1.0", None).is_err());
        assert!(compare_vermagic("", "6.1.0", None).is_err());
    }
}
