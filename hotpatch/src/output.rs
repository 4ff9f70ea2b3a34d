//! The text the commands print without `--json`: `Text(&report)` displays
//! a report the way a person reads it.

use crate::change::ChangeReport;
use crate::check::{Preflight, Status as CheckStatus};
use crate::list::{PatchStatus, Status};
use crate::load::{LoadReport, Outcome};
use crate::measure::{Measurement, Window};
use crate::module::ModuleInfo;
use crate::state::JournalEntry;
use std::fmt::{self, Display, Formatter};

/// A report as text, one line per fact, each line ending in a newline.
pub struct Text<'a, T>(pub &'a T);

fn or_dash(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("-")
}

impl Display for Text<'_, ModuleInfo> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let i = self.0;
        writeln!(f, "name:        {}", or_dash(&i.name))?;
        writeln!(f, "vermagic:    {}", or_dash(&i.vermagic).trim_end())?;
        writeln!(f, "livepatch:   {}", if i.livepatch { "yes" } else { "no" })?;
        writeln!(f, "license:     {}", or_dash(&i.license))?;
        let depends = if i.depends.is_empty() {
            "-".into()
        } else {
            i.depends.join(",")
        };
        writeln!(f, "depends:     {depends}")?;
        writeln!(f, "srcversion:  {}", or_dash(&i.srcversion))?;
        writeln!(f, "description: {}", or_dash(&i.description))?;
        writeln!(f, "version:     {}", or_dash(&i.version))?;
        let cves = if i.cves.is_empty() {
            "-".into()
        } else {
            i.cves.join(", ")
        };
        writeln!(f, "cves:        {cves}")?;
        let signature = i.signature.as_ref().map_or("none".to_string(), |s| {
            format!("{} ({} bytes)", s.id_type, s.signature_len)
        });
        writeln!(f, "signature:   {signature}")?;
        writeln!(f, "sha256:      {}", i.sha256)?;
        if let Some(r) = i.replace {
            let how = if r {
                "yes (atomic replace)"
            } else {
                "no (stacks)"
            };
            writeln!(f, "replace:     {how}")?;
        }
        for obj in &i.objects {
            writeln!(f, "object {}:", obj.name)?;
            for func in &obj.functions {
                let pos = if func.sympos > 0 {
                    format!(",{}", func.sympos)
                } else {
                    String::new()
                };
                let to = func.replacement.as_deref().unwrap_or("?");
                writeln!(f, "  {}{pos} -> {to}", func.name)?;
            }
        }
        if !i.klp_rela_objects.is_empty() {
            writeln!(f, "klp relocations for: {}", i.klp_rela_objects.join(", "))?;
        }
        for s in &i.klp_symbols {
            writeln!(f, "klp symbol: {}:{},{}", s.object, s.name, s.sympos)?;
        }
        for w in &i.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

impl Display for Text<'_, Preflight> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let p = self.0;
        for c in &p.checks {
            let tag = match c.status {
                CheckStatus::Pass => "pass",
                CheckStatus::Warn => "warn",
                CheckStatus::Fail => "FAIL",
            };
            writeln!(f, "{tag}  {:<16} {}", c.id, c.detail)?;
        }
        if p.ok {
            writeln!(f, "preflight passed")
        } else {
            writeln!(
                f,
                "refused: {} check(s) failed; nothing was changed",
                p.failures().count()
            )
        }
    }
}

impl Display for Text<'_, LoadReport> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let name = r.module.as_deref().unwrap_or("?");
        match r.outcome {
            Outcome::Refused => write!(f, "{}", Text(&r.preflight))?,
            Outcome::Loaded => {
                writeln!(
                    f,
                    "{name}: patched; transition complete in {:.1} ms (finit_module {:.1} ms)",
                    r.transition_ms.unwrap_or(0.0),
                    r.load_syscall_ms.unwrap_or(0.0)
                )?;
                for g in &r.replaced_removed {
                    writeln!(
                        f,
                        "{name}: removed module {g}, superseded by this atomic-replace patch"
                    )?;
                }
            }
            Outcome::AlreadyLoaded => writeln!(f, "{name}: already loaded")?,
            _ => stalled(f, name, r)?,
        }
        if let Some(m) = &r.measure {
            write!(f, "{}", Text(m))?;
        }
        for m in &r.messages {
            writeln!(f, "{m}")?;
        }
        Ok(())
    }
}

/// The tasks that held a stalled transition up, with their stacks.
fn stalled(f: &mut Formatter<'_>, name: &str, r: &LoadReport) -> fmt::Result {
    writeln!(f, "{name}: transition stalled; tasks not switched:")?;
    tasks(f, &r.stalled_tasks)?;
    if !r.reverse_stalled_tasks.is_empty() {
        writeln!(
            f,
            "{name}: the reverse stalled too; tasks not switched back:"
        )?;
        tasks(f, &r.reverse_stalled_tasks)?;
    }
    if let Some(ms) = r.rollback_ms {
        writeln!(f, "{name}: rolled back in {ms:.1} ms")?;
    }
    Ok(())
}

/// Each task with its kernel stack.
pub(crate) fn tasks(f: &mut Formatter<'_>, tasks: &[crate::kernel::TaskState]) -> fmt::Result {
    for t in tasks {
        writeln!(
            f,
            "  pid {} tid {} {} (patch_state {})",
            t.pid, t.tid, t.comm, t.patch_state
        )?;
        for frame in t.stack.iter().take(12) {
            writeln!(f, "      {frame}")?;
        }
    }
    Ok(())
}

impl Display for Text<'_, Measurement> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let m = self.0;
        writeln!(f, "interruption probe ({}):", m.environment.label)?;
        window(f, "during transition:", &m.transition)?;
        window(f, "baseline:", &m.baseline)?;
        writeln!(
            f,
            "  added stall: {:.0} µs (sleep: {:.0} µs)",
            m.added_stall_us, m.added_sleep_overshoot_us
        )
    }
}

/// One probe window: the worst spin gap and sleep overshoot.
fn window(f: &mut Formatter<'_>, label: &str, w: &Window) -> fmt::Result {
    writeln!(
        f,
        "  {label:<18} max gap {:.0} µs, max sleep overshoot {:.0} µs over {:.0} ms",
        w.spin_max_gap_us, w.sleep_max_overshoot_us, w.duration_ms
    )
}

impl Display for Text<'_, ChangeReport> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let r = self.0;
        if let Some(l) = &r.load
            && l.outcome != Outcome::Loaded
        {
            write!(f, "{}", Text(l))?;
        }
        if !r.stalled_tasks.is_empty() {
            writeln!(f, "{}: transition stalled; tasks not switched:", r.module)?;
            tasks(f, &r.stalled_tasks)?;
        }
        if !r.reverse_stalled_tasks.is_empty() {
            writeln!(
                f,
                "{}: the reverse stalled too; tasks not switched back:",
                r.module
            )?;
            tasks(f, &r.reverse_stalled_tasks)?;
        }
        for m in &r.messages {
            writeln!(f, "{m}")?;
        }
        if let Some(t) = r.transition_ms {
            writeln!(f, "transition took {t:.1} ms")?;
        }
        Ok(())
    }
}

impl Display for Text<'_, Status> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s.livepatch_supported {
            writeln!(
                f,
                "this kernel has no /sys/kernel/livepatch (CONFIG_LIVEPATCH off, or no module support)"
            )?;
        }
        writeln!(f, "kernel: {}", s.release.as_deref().unwrap_or("?"))?;
        if s.patches.is_empty() {
            writeln!(f, "no live patches loaded")?;
        }
        for p in &s.patches {
            write!(f, "{}", Text(p))?;
        }
        if !s.functions.is_empty() {
            writeln!(f, "functions:")?;
            for o in &s.functions {
                let also = if o.also_in.is_empty() {
                    String::new()
                } else {
                    format!(" (also in {})", o.also_in.join(", "))
                };
                writeln!(
                    f,
                    "    {}:{} <- {}{also}",
                    o.object, o.function, o.provided_by
                )?;
            }
        }
        for m in &s.leftover_modules {
            writeln!(
                f,
                "leftover livepatch module {m}: patch freed, module still loaded (`hotpatch unload {m}`)"
            )?;
        }
        let flags = if s.taint_flags.is_empty() {
            String::new()
        } else {
            format!(" = {}", s.taint_flags.join(", "))
        };
        writeln!(
            f,
            "taint: {}{flags}",
            s.tainted.map_or("?".into(), |t| t.to_string())
        )
    }
}

/// `#<position> <name> [<flags>] sha256 <prefix>`, then its objects.
impl Display for Text<'_, PatchStatus> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let p = self.0;
        let st = &p.patch;
        let mut flags = vec![
            if st.enabled == Some(true) {
                "enabled"
            } else {
                "disabled"
            }
            .to_string(),
        ];
        if st.transition == Some(true) {
            flags.push(format!(
                "IN TRANSITION ({} task(s) pending)",
                p.pending_tasks.unwrap_or(0)
            ));
        }
        if st.replace == Some(true) {
            flags.push("replace".into());
        }
        let sha = p
            .sha256
            .as_ref()
            .map(|h| format!(" sha256 {}", &h[..16.min(h.len())]))
            .unwrap_or_default();
        writeln!(
            f,
            "#{} {} [{}]{sha}",
            p.stack_position,
            st.name,
            flags.join(", ")
        )?;
        if let Some(m) = &p.meta {
            meta_line(f, m)?;
        }
        for o in &st.objects {
            let fs: Vec<&str> = o.functions.iter().map(|x| x.name.as_str()).collect();
            let absent = match o.patched {
                Some(false) => " (not loaded)",
                _ => "",
            };
            writeln!(f, "    {}{absent}: {}", o.name, fs.join(", "))?;
        }
        Ok(())
    }
}

/// `    <description> (version V; CVE-…)`, when the patch says any of it.
fn meta_line(f: &mut Formatter<'_>, m: &crate::module::PatchMeta) -> fmt::Result {
    let mut extra: Vec<String> = Vec::new();
    if let Some(v) = &m.version {
        extra.push(format!("version {v}"));
    }
    extra.extend(m.cves.iter().cloned());
    let desc = m.description.as_deref().unwrap_or("");
    if desc.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(" ({})", extra.join("; "))
    };
    writeln!(f, "    {desc}{extra}")
}

/// `<seconds.millis> <user> <op> <module> <result>[ <duration>ms]`.
impl Display for Text<'_, JournalEntry> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let e = self.0;
        let t = e.time_unix_ms;
        write!(
            f,
            "{}.{:03} {} {} {} {}",
            t / 1000,
            t % 1000,
            e.user,
            e.op,
            e.module.as_deref().unwrap_or("-"),
            e.result
        )?;
        if let Some(d) = e.duration_ms {
            write!(f, " {d:.1}ms")?;
        }
        writeln!(f)
    }
}

impl Display for Text<'_, crate::status::HostStatus> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let verdict = if s.as_intended {
            "as intended"
        } else {
            "NOT as intended"
        };
        writeln!(f, "host: {verdict}")?;
        writeln!(
            f,
            "kernel: {} (build id {})",
            s.list.release.as_deref().unwrap_or("?"),
            s.kernel_build_id.as_deref().unwrap_or("unknown")
        )?;
        if s.installed.is_empty() {
            writeln!(f, "installed: none for this kernel")?;
        }
        for i in &s.installed {
            writeln!(f, "installed {:<24} {}", i.name, i.state)?;
            meta_line(f, &i.meta)?;
        }
        for n in &s.not_installed {
            writeln!(f, "loaded    {n:<24} not installed")?;
        }
        for n in &s.in_transition {
            writeln!(f, "in transition: {n}")?;
        }
        match &s.last_change {
            Some(e) => write!(f, "last change: {}", Text(e))?,
            None => writeln!(f, "last change: none journalled")?,
        }
        writeln!(f, "taint: {}", s.list.taint_flags.join(", "))?;
        for p in &s.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Check, CheckId};

    #[test]
    fn preflight_columns_line_up() {
        let p = Preflight {
            module: None,
            ok: false,
            checks: vec![Check {
                id: CheckId::Ftrace,
                status: CheckStatus::Fail,
                detail: "off".into(),
            }],
        };
        assert_eq!(
            Text(&p).to_string(),
            "FAIL  ftrace           off\nrefused: 1 check(s) failed; nothing was changed\n"
        );
    }

    #[test]
    fn journal_time_reads_as_seconds() {
        let e: JournalEntry = serde_json::from_value(serde_json::json!({
            "time_unix_ms": 1_733_212_345_007u64, "user": "root", "op": "load",
            "module": "m", "sha256": null, "result": "ok", "duration_ms": 2.5, "detail": {}
        }))
        .unwrap();
        assert_eq!(
            Text(&e).to_string(),
            "1733212345.007 root load m ok 2.5ms\n"
        );
    }
}
