//! The operations that change the kernel: load (with transition watch,
//! rollback and replace cleanup), unload, enable, disable; and `list`.
//!
//! Every wait here has a deadline. Whatever happens, the outcome says what
//! state the kernel was left in.

use crate::check::{self, Preflight};
use crate::kernel::{LivePatch, TaskState};
use crate::kmod::{self, Delete};
use crate::measure::{self, Measurement};
use crate::module::{self, ModuleInfo};
use crate::paths::Paths;
use crate::state::{self, LoadedRecord};
use anyhow::{Context, Result, bail};
use livehost_common::exit;
use livehost_common::progress::Progress;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How long the transition may take before it counts as stalled.
    pub timeout: Duration,
    /// How often `transition` is polled.
    pub poll: Duration,
    pub rollback: bool,
    /// On stall, write `force`: completes the transition without the
    /// consistency guarantee (and some kernels then pin the module forever).
    pub force: bool,
    pub measure: bool,
    /// The file must have this sha256 (`load --installed`: what the manifest
    /// recorded at install time); otherwise the load is refused (exit 3).
    pub expected_sha256: Option<String>,
    /// The journal's `op` for this load (`enable` when re-applying).
    pub journal_op: &'static str,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            timeout: Duration::from_secs(30),
            poll: Duration::from_millis(15),
            rollback: true,
            force: false,
            measure: false,
            expected_sha256: None,
            journal_op: "load",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Patched and transition complete.
    Loaded,
    /// Preflight refused; nothing touched.
    Refused,
    /// Stalled, reversed and removed: the kernel is as before.
    RolledBack,
    /// Stalled and left in transition (`--no-rollback`).
    Stalled,
    /// Stalled and forced through (`--force`).
    Forced,
    /// Already loaded from the same file (`--installed` re-runs).
    AlreadyLoaded,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Loaded | Outcome::Forced | Outcome::AlreadyLoaded => exit::SUCCESS,
            Outcome::Refused => exit::REFUSED,
            Outcome::RolledBack => exit::ROLLED_BACK,
            Outcome::Stalled => exit::ERROR,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub module: Option<String>,
    pub file: String,
    pub sha256: String,
    pub outcome: Outcome,
    pub preflight: Preflight,
    /// finit_module() itself (the module's init starts the transition).
    pub load_syscall_ms: Option<f64>,
    /// From finit_module() until `transition` read 0.
    pub transition_ms: Option<f64>,
    pub stalled_tasks: Vec<TaskState>,
    pub rollback_ms: Option<f64>,
    /// Modules of patches this atomic-replace patch superseded, removed.
    pub replaced_removed: Vec<String>,
    pub measure: Option<Measurement>,
    pub messages: Vec<String>,
    /// Wall clock (ms since the epoch) when `load` began and when it
    /// returned, so its window can be lined up with other records of the
    /// same host (an observer's intervals, the kernel log).
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Write a livepatch sysfs attribute, naming the attribute on error and
/// saying what the kernel's refusal means.
fn write_attr(paths: &Paths, name: &str, attr: &str, value: &str) -> Result<()> {
    let p = paths.patch_dir(name).join(attr);
    std::fs::write(&p, value).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EBUSY) => {
                ": another patch is in transition; only one may be at a time (hotpatch status)"
            }
            Some(libc::EINVAL) => ": the kernel refused the change in this state (hotpatch status)",
            Some(libc::ENOENT) => ": the patch is gone (freed by the kernel)",
            _ => "",
        };
        anyhow::anyhow!("cannot write {value} to {}: {e}{why}", p.display())
    })
}

pub enum Wait {
    Done(Duration),
    TimedOut(Duration),
}

/// Poll `transition` of `name` until it reads 0 (or the patch is gone, which
/// is how a finished disable ends), showing how many tasks are still pending.
pub fn wait_transition(
    paths: &Paths,
    name: &str,
    target: i32,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
    start: Instant,
) -> Wait {
    let verb = if target == 1 {
        "patching"
    } else {
        "unpatching"
    };
    let mut last_report = Instant::now() - Duration::from_secs(1);
    loop {
        let t = livehost_common::sysfs::read_attr(paths.patch_dir(name).join("transition"));
        match t.as_deref() {
            Ok("0") | Err(_) => return Wait::Done(start.elapsed()),
            _ => {}
        }
        if start.elapsed() >= timeout {
            return Wait::TimedOut(start.elapsed());
        }
        // Scanning every task is far costlier than reading one attribute,
        // so the pending count refreshes a few times a second only.
        if last_report.elapsed() >= Duration::from_millis(250) {
            let n = paths.count_lagging(target);
            progress.step(format!(
                "{name}: {verb}, {n} task(s) pending, {:.1}s of {:.0}s",
                start.elapsed().as_secs_f64(),
                timeout.as_secs_f64()
            ));
            last_report = Instant::now();
        }
        std::thread::sleep(poll);
    }
}

/// Remove a module once its references are gone (the kernel drops a patch's
/// reference asynchronously after the patch is freed), with a deadline.
pub fn remove_module(paths: &Paths, name: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match kmod::delete_module(name)? {
            Delete::Removed | Delete::NotLoaded => return Ok(start.elapsed()),
            Delete::Busy => {
                if start.elapsed() >= timeout {
                    let refs = paths
                        .module(name)
                        .and_then(|m| m.refcount)
                        .map_or("?".to_string(), |r| r.to_string());
                    bail!(
                        "module {name} still in use (refcount {refs}) after {:.1}s; retry `hotpatch unload {name}` later",
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Wait for `/sys/kernel/livepatch/<name>` to disappear (the patch freed).
fn wait_gone(paths: &Paths, name: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while paths.patch_dir(name).exists() {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// After `name`'s transition completed: remove the modules of the patches
/// it superseded. An atomic-replace patch supersedes every patch that was
/// registered `before` it; the kernel frees them asynchronously (a work item
/// after the transition ends) but leaves their modules loaded, and a later
/// load of one would hit EEXIST. So wait (up to `timeout` overall) for each
/// superseded patch's sysfs dir to vanish, then remove its module. Returns
/// the modules removed and warnings.
pub fn remove_superseded(
    paths: &Paths,
    name: &str,
    replace: Option<bool>,
    before: &BTreeSet<String>,
    timeout: Duration,
    progress: &Progress,
) -> (Vec<String>, Vec<String>) {
    let superseded: Vec<String> = if replace == Some(true) {
        before.iter().filter(|b| *b != name).cloned().collect()
    } else {
        // Not known to replace: only what is already gone.
        let after: BTreeSet<String> = paths.patches().into_iter().map(|p| p.name).collect();
        before.difference(&after).cloned().collect()
    };
    let mut removed = Vec::new();
    let mut messages = Vec::new();
    let deadline = Instant::now() + timeout;
    for gone in &superseded {
        progress.step(format!(
            "{name}: waiting for the kernel to free replaced patch {gone}"
        ));
        if !wait_gone(
            paths,
            gone,
            deadline.saturating_duration_since(Instant::now()),
        ) {
            messages.push(format!(
                "warning: {gone}, superseded by atomic-replace patch {name}, was not freed by the kernel within {:.0}s; its module stays loaded (`hotpatch unload {gone}` later)",
                timeout.as_secs_f64()
            ));
            continue;
        }
        if paths.module(gone).is_none() {
            continue;
        }
        progress.step(format!("{name}: removing replaced patch module {gone}"));
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match remove_module(paths, gone, left) {
            Ok(_) => {
                state::forget_loaded(paths, gone);
                removed.push(gone.clone());
            }
            Err(e) => messages.push(format!(
                "warning: replaced patch {gone} could not be removed: {e:#}"
            )),
        }
    }
    (removed, messages)
}

/// Inspect, preflight, load, watch; roll back on stall unless told not to.
pub fn load(
    paths: &Paths,
    file: &Path,
    opts: &LoadOptions,
    progress: &Progress,
) -> Result<LoadReport> {
    let started_unix_ms = livehost_common::unix_ms();
    let mut report = load_watched(paths, file, opts, progress)?;
    report.started_unix_ms = started_unix_ms;
    report.finished_unix_ms = livehost_common::unix_ms();
    Ok(report)
}

fn load_watched(
    paths: &Paths,
    file: &Path,
    opts: &LoadOptions,
    progress: &Progress,
) -> Result<LoadReport> {
    let info: ModuleInfo = module::inspect_file(file)?;
    let mut pre = check::preflight(paths, &info);
    if let Some(want) = &opts.expected_sha256
        && *want != info.sha256
    {
        // The file changed since it was installed (or the manifest was
        // edited): never load something other than what was vetted.
        pre.ok = false;
        pre.checks.insert(
            0,
            check::Check {
                id: "installed-file",
                status: check::Status::Fail,
                detail: format!(
                    "{} has sha256 {}, but {} was recorded when it was installed: the file changed; refusing to load it (`hotpatch install` the intended file again)",
                    file.display(),
                    info.sha256,
                    want
                ),
            },
        );
    }
    let mut report = LoadReport {
        module: info.name.clone(),
        file: file.display().to_string(),
        sha256: info.sha256.clone(),
        outcome: Outcome::Refused,
        preflight: pre.clone(),
        load_syscall_ms: None,
        transition_ms: None,
        stalled_tasks: Vec::new(),
        rollback_ms: None,
        replaced_removed: Vec::new(),
        measure: None,
        messages: Vec::new(),
        started_unix_ms: 0,
        finished_unix_ms: 0,
    };
    if !pre.ok {
        let reasons: Vec<&str> = pre.failures().map(|c| c.detail.as_str()).collect();
        report.messages.extend(state::record(
            paths,
            opts.journal_op,
            info.name.as_deref(),
            Some(&info.sha256),
            "refused",
            None,
            serde_json::json!({ "reasons": reasons, "file": report.file }),
        ));
        return Ok(report);
    }
    let name = info.name.clone().context("module has no name")?;
    // Every outcome below is journalled under this patch's name and hash.
    let journal = |result: &str, duration_ms: Option<f64>, detail: serde_json::Value| {
        state::record(
            paths,
            opts.journal_op,
            Some(&name),
            Some(&info.sha256),
            result,
            duration_ms,
            detail,
        )
    };
    let before: BTreeSet<String> = paths.patches().into_iter().map(|p| p.name).collect();

    let probe = opts
        .measure
        .then(|| measure::Probe::start(measure::spinners()));
    progress.step(format!("{name}: loading"));
    let t0 = Instant::now();
    let loaded = kmod::finit_module(file, &name);
    report.load_syscall_ms = Some(ms(t0.elapsed()));
    if let Err(e) = loaded {
        if let Some(p) = probe {
            p.stop();
        }
        report.messages.extend(journal(
            "error",
            None,
            serde_json::json!({ "error": format!("{e:#}"), "file": report.file }),
        ));
        return Err(e);
    }
    state::save_loaded(
        paths,
        &LoadedRecord {
            name: name.clone(),
            sha256: info.sha256.clone(),
            path: std::fs::canonicalize(file)
                .unwrap_or(file.to_path_buf())
                .display()
                .to_string(),
            replace: info.replace,
            loaded_at: state::now_unix(),
            forced: false,
        },
    )
    .unwrap_or_else(|e| {
        report
            .messages
            .push(format!("warning: could not record the load: {e:#}"))
    });

    if !paths.patch_dir(&name).exists() {
        // Passed as a livepatch but registered nothing: do not leave a
        // mystery module behind.
        if let Some(p) = probe {
            p.stop();
        }
        let _ = remove_module(paths, &name, opts.timeout);
        state::forget_loaded(paths, &name);
        bail!(
            "{name} loaded but registered no livepatch in {}; removed it again",
            paths.livepatch().display()
        );
    }

    match wait_transition(paths, &name, 1, opts.timeout, opts.poll, progress, t0) {
        Wait::Done(d) => {
            report.transition_ms = Some(ms(d));
            if let Some(p) = probe {
                let w = p.stop();
                let n = measure::spinners();
                let b = measure::baseline(n, &w);
                report.measure = Some(measure::assemble(crate::host::detect(paths), n, w, b));
            }
            report.outcome = Outcome::Loaded;
            let (removed, msgs) =
                remove_superseded(paths, &name, info.replace, &before, opts.timeout, progress);
            report.replaced_removed = removed;
            report.messages.extend(msgs);
            progress.finish();
            report.messages.extend(journal("ok", report.transition_ms, serde_json::json!({ "file": report.file, "replaced_removed": report.replaced_removed })));
            Ok(report)
        }
        Wait::TimedOut(d) => {
            if let Some(p) = probe {
                p.stop();
            }
            report.stalled_tasks = paths.lagging_tasks(1);
            let names: Vec<String> = report
                .stalled_tasks
                .iter()
                .map(|t| format!("{}/{} {}", t.pid, t.tid, t.comm))
                .collect();
            // On the progress line now, and in the report (the only place
            // a --json caller sees them).
            let stalled = format!(
                "{name}: transition stalled after {:.1}s; {} task(s) not switched: {}",
                d.as_secs_f64(),
                names.len(),
                names.join(", ")
            );
            progress.note(&stalled);
            report.messages.push(stalled);
            if opts.force {
                let warning = format!(
                    "warning: {name}: --force: forcing the transition. stalled tasks keep running old code until they return, with no consistency guarantee; some kernels then refuse to ever remove the module"
                );
                progress.note(&warning);
                report.messages.push(warning);
                if let Some(mut rec) = state::loaded_record(paths, &name) {
                    rec.forced = true;
                    let _ = state::save_loaded(paths, &rec);
                }
                write_attr(paths, &name, "force", "1")?;
                match wait_transition(
                    paths,
                    &name,
                    1,
                    opts.timeout,
                    opts.poll,
                    progress,
                    Instant::now(),
                ) {
                    Wait::Done(_) => report.outcome = Outcome::Forced,
                    Wait::TimedOut(_) => {
                        journal(
                            "error",
                            None,
                            serde_json::json!({ "stalled": report.stalled_tasks, "forced": true }),
                        );
                        bail!(
                            "{name}: even a forced transition did not finish within {:.0}s (stalled before forcing: {})",
                            opts.timeout.as_secs_f64(),
                            names.join(", ")
                        )
                    }
                }
                report.messages.extend(journal(
                    "forced",
                    None,
                    serde_json::json!({ "stalled": report.stalled_tasks }),
                ));
                progress.finish();
                return Ok(report);
            }
            if !opts.rollback {
                report.outcome = Outcome::Stalled;
                report.messages.push(format!("{name} left in transition (--no-rollback); the kernel keeps retrying. `hotpatch status` shows progress; `hotpatch disable {name}` reverses it"));
                report.messages.extend(journal(
                    "stalled",
                    None,
                    serde_json::json!({ "stalled": report.stalled_tasks }),
                ));
                progress.finish();
                return Ok(report);
            }
            progress.step(format!("{name}: reversing the transition"));
            let r0 = Instant::now();
            write_attr(paths, &name, "enabled", "0")?;
            if let Wait::TimedOut(_) =
                wait_transition(paths, &name, 0, opts.timeout, opts.poll, progress, r0)
            {
                let still = paths.lagging_tasks(0);
                report.messages.extend(journal("error", None, serde_json::json!({ "stalled": report.stalled_tasks, "reverse_stalled": still })));
                let still: Vec<String> = still
                    .iter()
                    .map(|t| format!("{}/{} {}", t.pid, t.tid, t.comm))
                    .collect();
                bail!(
                    "{name}: the reverse transition also stalled ({} task(s): {}); the patch is left half-applied: see `hotpatch status`",
                    still.len(),
                    still.join(", ")
                );
            }
            if !wait_gone(paths, &name, opts.timeout) {
                bail!(
                    "{name}: reversed, but the kernel did not free the patch within {:.0}s",
                    opts.timeout.as_secs_f64()
                );
            }
            remove_module(paths, &name, opts.timeout)?;
            state::forget_loaded(paths, &name);
            report.rollback_ms = Some(ms(r0.elapsed()));
            report.outcome = Outcome::RolledBack;
            report.messages.push(format!("{name}: transition stalled, reversed and the module removed: the kernel is as before"));
            report.messages.extend(journal(
                "rolled-back",
                report.rollback_ms,
                serde_json::json!({ "stalled": report.stalled_tasks }),
            ));
            progress.finish();
            Ok(report)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangeReport {
    pub module: String,
    pub action: String,
    pub transition_ms: Option<f64>,
    pub removed: bool,
    pub messages: Vec<String>,
    /// `enable` of a freed patch re-loads its file: that load's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
}

impl ChangeReport {
    pub fn exit_code(&self) -> i32 {
        self.load
            .as_ref()
            .map_or(exit::SUCCESS, |l| l.outcome.exit_code())
    }
}

/// Is `name` a loaded livepatch module (registered, or superseded and left
/// loaded: `K` taint in /proc/modules)?
fn is_livepatch_module(paths: &Paths, name: &str) -> Option<bool> {
    let m = paths.module(name)?;
    Some(paths.patch_dir(name).exists() || m.taint.contains('K'))
}

fn disable_and_wait(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<Option<f64>> {
    let Some(p) = paths.patch(name) else {
        return Ok(None);
    };
    if p.transition == Some(true) && p.enabled == Some(false) {
        // Already unpatching: just wait for it.
    } else if p.enabled == Some(true) {
        if p.transition == Some(true) {
            progress.note(format!("{name} is still patching; disabling reverses it"));
        }
        write_attr(paths, name, "enabled", "0")?;
    }
    let t0 = Instant::now();
    match wait_transition(paths, name, 0, timeout, poll, progress, t0) {
        Wait::Done(d) => Ok(Some(ms(d))),
        Wait::TimedOut(_) => {
            let lag: Vec<String> = paths
                .lagging_tasks(0)
                .iter()
                .map(|t| format!("{}/{} {}", t.pid, t.tid, t.comm))
                .collect();
            bail!(
                "{name}: unpatching stalled after {:.0}s on {}; it continues in the kernel",
                timeout.as_secs_f64(),
                lag.join(", ")
            )
        }
    }
}

pub fn disable(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    if paths.patch(name).is_none() {
        bail!(
            "no live patch named {name} in {} (see `hotpatch list`)",
            paths.livepatch().display()
        );
    }
    let r = disable_and_wait(paths, name, timeout, poll, progress);
    let res = if r.is_ok() { "ok" } else { "error" };
    let mut messages = state::record(
        paths,
        "disable",
        Some(name),
        None,
        res,
        r.as_ref().ok().copied().flatten(),
        serde_json::json!({}),
    );
    let t = r?;
    progress.finish();
    messages.push(format!("{name} disabled; the kernel frees a disabled patch, so its module stays loaded until `hotpatch unload {name}` (`hotpatch enable {name}` loads its file again)"));
    Ok(ChangeReport {
        module: name.into(),
        action: "disable".into(),
        transition_ms: t,
        removed: false,
        messages,
        load: None,
    })
}

pub fn enable(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    let report = |transition_ms, messages| ChangeReport {
        module: name.into(),
        action: "enable".into(),
        transition_ms,
        removed: false,
        messages,
        load: None,
    };
    let Some(p) = paths.patch(name) else {
        if paths.module(name).is_some() {
            return reapply(paths, name, timeout, poll, progress);
        }
        bail!("no live patch named {name}; load it with `hotpatch load FILE.ko`");
    };
    if p.enabled == Some(true) {
        if p.transition != Some(true) {
            return Ok(report(None, vec![format!("{name} is already enabled")]));
        }
        // Already patching: writing 1 again would be refused (EINVAL), and
        // there is nothing to change; wait for it like any enable.
        progress.note(format!(
            "{name} is already being enabled; waiting for its transition"
        ));
    } else {
        write_attr(paths, name, "enabled", "1")?;
    }
    let t0 = Instant::now();
    let r = match wait_transition(paths, name, 1, timeout, poll, progress, t0) {
        Wait::Done(d) => Ok(ms(d)),
        Wait::TimedOut(_) => Err(anyhow::anyhow!(
            "{name}: patching stalled after {:.0}s",
            timeout.as_secs_f64()
        )),
    };
    let mut messages = state::record(
        paths,
        "enable",
        Some(name),
        None,
        if r.is_ok() { "ok" } else { "error" },
        r.as_ref().ok().copied(),
        serde_json::json!({}),
    );
    let t = r?;
    progress.finish();
    messages.push(format!("{name} enabled"));
    Ok(report(Some(t), messages))
}

/// `enable` of a patch the kernel already freed (disabled, or superseded by
/// an atomic replace) whose module is still loaded: the kernel cannot flip
/// it back, so remove the module and load the file hotpatch loaded it from
/// again, when that file is still there with the same sha256.
fn reapply(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    let by_hand = format!("`hotpatch unload {name}`, then `hotpatch load FILE.ko` with its file");
    let Some(rec) = state::loaded_record(paths, name) else {
        bail!(
            "{name} is loaded but no longer a live patch (the kernel frees disabled and replaced patches), and hotpatch has no record of the file it came from: run {by_hand}"
        );
    };
    let file = std::path::PathBuf::from(&rec.path);
    let now = std::fs::read(&file)
        .map(|b| module::sha256_hex(&b))
        .map_err(|e| {
            anyhow::anyhow!(
                "{name} must be loaded again from {}, but that file cannot be read ({e}): run {by_hand}",
                file.display()
            )
        })?;
    if now != rec.sha256 {
        bail!(
            "{name} must be loaded again, but {} changed since hotpatch loaded it (sha256 {now}, was {}): run {by_hand}",
            file.display(),
            rec.sha256
        );
    }
    progress.step(format!(
        "{name}: freed by the kernel; removing the module to load {} again",
        file.display()
    ));
    if let Err(e) = remove_module(paths, name, timeout) {
        state::record(
            paths,
            "enable",
            Some(name),
            Some(&rec.sha256),
            "error",
            None,
            serde_json::json!({ "error": format!("{e:#}"), "file": rec.path }),
        );
        return Err(e.context(format!("{name}: cannot remove the freed patch's module")));
    }
    let opts = LoadOptions {
        timeout,
        poll,
        expected_sha256: Some(rec.sha256.clone()),
        journal_op: "enable",
        ..LoadOptions::default()
    };
    let r = load(paths, &file, &opts, progress).map_err(|e| {
        e.context(format!(
            "{name}: its module was removed (the patch was not active); loading {} again failed",
            file.display()
        ))
    })?;
    let mut messages = vec![format!(
        "{name} was freed by the kernel; removed its module and loaded {} again",
        file.display()
    )];
    messages.push(match r.outcome {
        Outcome::Loaded => format!("{name} enabled"),
        Outcome::Refused => format!(
            "{name}: loading it again was refused; its module was removed, so it is not applied"
        ),
        _ => format!(
            "{name}: loading it again did not complete ({:?})",
            r.outcome
        ),
    });
    Ok(ChangeReport {
        module: name.into(),
        action: "enable".into(),
        transition_ms: r.transition_ms,
        removed: false,
        messages,
        load: Some(r),
    })
}

/// Disable (if needed), wait, wait for the reference to drop, remove.
pub fn unload(
    paths: &Paths,
    name: &str,
    timeout: Duration,
    poll: Duration,
    progress: &Progress,
) -> Result<ChangeReport> {
    match is_livepatch_module(paths, name) {
        None => bail!("no module named {name} is loaded (see `hotpatch list`)"),
        Some(false) => {
            bail!("{name} is not a livepatch module; hotpatch leaves other modules to rmmod")
        }
        Some(true) => {}
    }
    progress.step(format!("{name}: unpatching"));
    let r = (|| {
        let t = disable_and_wait(paths, name, timeout, poll, progress)?;
        if !wait_gone(paths, name, timeout) {
            bail!(
                "{name}: disabled, but the kernel did not free the patch within {:.0}s",
                timeout.as_secs_f64()
            );
        }
        progress.step(format!("{name}: removing module"));
        remove_module(paths, name, timeout).map_err(|e| {
            if state::loaded_record(paths, name).is_some_and(|r| r.forced) {
                e.context(format!("{name}'s transition was forced when it loaded; kernels that pin forced patch modules keep it until reboot"))
            } else {
                e
            }
        })?;
        Ok(t)
    })();
    let mut messages = state::record(
        paths,
        "unload",
        Some(name),
        state::loaded_record(paths, name)
            .map(|r| r.sha256)
            .as_deref(),
        if r.is_ok() { "ok" } else { "error" },
        r.as_ref().ok().copied().flatten(),
        serde_json::json!({}),
    );
    let t = r?;
    state::forget_loaded(paths, name);
    progress.finish();
    messages.push(format!("{name} unpatched and removed"));
    Ok(ChangeReport {
        module: name.into(),
        action: "unload".into(),
        transition_ms: t,
        removed: true,
        messages,
        load: None,
    })
}

/// Every livepatch module, top of the stack first, then superseded leftovers.
pub fn unload_order(paths: &Paths) -> Vec<String> {
    let mut v: Vec<String> = paths.patches().into_iter().rev().map(|p| p.name).collect();
    for m in paths.modules().unwrap_or_default() {
        if m.taint.contains('K') && !v.contains(&m.name) {
            v.push(m.name);
        }
    }
    v
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionOwner {
    pub object: String,
    pub function: String,
    pub sympos: u64,
    /// The patch whose code runs now: the topmost enabled patch with it.
    pub provided_by: String,
    pub also_in: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatchStatus {
    #[serde(flatten)]
    pub patch: LivePatch,
    pub stack_position: usize,
    pub pending_tasks: Option<usize>,
    pub refcount: Option<u64>,
    pub sha256: Option<String>,
    pub file: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub livepatch_supported: bool,
    pub kernel: Option<String>,
    pub patches: Vec<PatchStatus>,
    /// Livepatch modules still loaded whose patch the kernel already freed.
    pub leftover_modules: Vec<String>,
    pub functions: Vec<FunctionOwner>,
    pub tainted: Option<u64>,
    pub taint_flags: Vec<String>,
}

pub fn status(paths: &Paths) -> Status {
    let patches = paths.patches();
    let modules = paths.modules().unwrap_or_default();
    let mut out = Vec::new();
    for (i, p) in patches.iter().enumerate() {
        let rec = state::loaded_record(paths, &p.name);
        let pending = (p.transition == Some(true))
            .then(|| paths.count_lagging(if p.enabled == Some(true) { 1 } else { 0 }));
        out.push(PatchStatus {
            stack_position: i + 1,
            pending_tasks: pending,
            refcount: modules
                .iter()
                .find(|m| m.name == p.name)
                .and_then(|m| m.refcount),
            sha256: rec.as_ref().map(|r| r.sha256.clone()),
            patch: LivePatch {
                // Before 6.11 sysfs has no `replace`; the file we loaded does.
                replace: p.replace.or(rec.as_ref().and_then(|r| r.replace)),
                ..p.clone()
            },
            file: rec.map(|r| r.path),
        });
    }
    let mut functions: Vec<FunctionOwner> = Vec::new();
    // Bottom to top, so the last enabled patch seen for a function wins.
    for p in &patches {
        for o in &p.objects {
            for f in &o.functions {
                let slot = functions
                    .iter_mut()
                    .find(|x| x.object == o.name && x.function == f.name && x.sympos == f.sympos);
                match slot {
                    Some(x) => {
                        if p.enabled == Some(true) {
                            let prev = std::mem::replace(&mut x.provided_by, p.name.clone());
                            x.also_in.push(prev);
                        } else {
                            x.also_in.push(p.name.clone());
                        }
                    }
                    None => functions.push(FunctionOwner {
                        object: o.name.clone(),
                        function: f.name.clone(),
                        sympos: f.sympos,
                        provided_by: p.name.clone(),
                        also_in: Vec::new(),
                    }),
                }
            }
        }
    }
    let names: BTreeSet<&str> = patches.iter().map(|p| p.name.as_str()).collect();
    let tainted = paths.tainted();
    Status {
        livepatch_supported: paths.livepatch_supported(),
        kernel: paths.release().ok(),
        leftover_modules: modules
            .iter()
            .filter(|m| m.taint.contains('K') && !names.contains(m.name.as_str()))
            .map(|m| m.name.clone())
            .collect(),
        patches: out,
        functions,
        taint_flags: tainted.map(crate::kernel::decode_taint).unwrap_or_default(),
        tainted,
    }
}
