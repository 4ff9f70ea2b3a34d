//! What the running kernel says about itself and its livepatches: sysfs
//! under `/sys/kernel/livepatch`, `/proc/modules`, `/proc/kallsyms`, taint,
//! per-task patch state. Parsers here never panic on odd content; an
//! unreadable attribute becomes `None`, not a crash.

use crate::paths::Paths;
use anyhow::{Context, Result};
use livehost_common::sysfs::{read_attr, read_text};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// One patched function as sysfs shows it: `<object>/<func>,<sympos>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveFunc {
    pub name: String,
    pub sympos: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveObject {
    pub name: String,
    /// `<object>/patched` (6.1+): whether the object is loaded and patched.
    pub patched: Option<bool>,
    pub functions: Vec<LiveFunc>,
}

/// A livepatch as `/sys/kernel/livepatch/<name>` describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LivePatch {
    pub name: String,
    pub enabled: Option<bool>,
    pub transition: Option<bool>,
    /// `replace` attribute (6.11+).
    pub replace: Option<bool>,
    /// `stack_order` attribute (6.13+), 1 = bottom.
    pub stack_order: Option<u64>,
    pub objects: Vec<LiveObject>,
}

fn read_bool(p: &Path) -> Option<bool> {
    match read_attr(p).ok()?.as_str() {
        "1" | "Y" | "y" => Some(true),
        "0" | "N" | "n" => Some(false),
        _ => None,
    }
}

fn subdirs(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Parse a sysfs function directory name `func,sympos`.
pub fn parse_func_dir(s: &str) -> Option<LiveFunc> {
    let (name, pos) = s.rsplit_once(',')?;
    Some(LiveFunc {
        name: name.to_string(),
        sympos: pos.parse().ok()?,
    })
}

impl Paths {
    pub fn livepatch_supported(&self) -> bool {
        self.livepatch().is_dir()
    }

    pub fn patch(&self, name: &str) -> Option<LivePatch> {
        let dir = self.patch_dir(name);
        if !dir.is_dir() {
            return None;
        }
        let objects = subdirs(&dir)
            .into_iter()
            .map(|o| {
                let odir = dir.join(&o);
                LiveObject {
                    patched: read_bool(&odir.join("patched")),
                    functions: subdirs(&odir)
                        .iter()
                        .filter_map(|f| parse_func_dir(f))
                        .collect(),
                    name: o,
                }
            })
            .collect();
        Some(LivePatch {
            name: name.to_string(),
            enabled: read_bool(&dir.join("enabled")),
            transition: read_bool(&dir.join("transition")),
            replace: read_bool(&dir.join("replace")),
            stack_order: read_attr(dir.join("stack_order"))
                .ok()
                .and_then(|s| s.parse().ok()),
            objects,
        })
    }

    /// Every patch in `/sys/kernel/livepatch`, bottom of the stack first.
    ///
    /// Without `stack_order` (before 6.13) we use `/proc/modules`, which
    /// lists the most recently loaded module first: patches are stacked in
    /// the order their modules were loaded.
    pub fn patches(&self) -> Vec<LivePatch> {
        let mut v: Vec<LivePatch> = subdirs(&self.livepatch())
            .iter()
            .filter_map(|n| self.patch(n))
            .collect();
        let order: HashMap<String, usize> = self
            .modules()
            .unwrap_or_default()
            .iter()
            .rev()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        v.sort_by_key(|p| {
            (
                p.stack_order.unwrap_or(u64::MAX),
                order.get(&p.name).copied().unwrap_or(usize::MAX),
            )
        });
        v
    }

    pub fn any_in_transition(&self) -> Option<String> {
        self.patches()
            .into_iter()
            .find(|p| p.transition == Some(true))
            .map(|p| p.name)
    }

    pub fn modules(&self) -> Result<Vec<LoadedModule>> {
        Ok(parse_proc_modules(&read_text(self.proc_file("modules"))?))
    }

    pub fn module(&self, name: &str) -> Option<LoadedModule> {
        self.modules().ok()?.into_iter().find(|m| m.name == name)
    }

    pub fn release(&self) -> Result<String> {
        read_attr(self.proc_file("sys/kernel/osrelease"))
            .context("cannot tell the running kernel's release")
    }

    pub fn tainted(&self) -> Option<u64> {
        read_attr(self.proc_file("sys/kernel/tainted"))
            .ok()?
            .parse()
            .ok()
    }

    pub fn cmdline(&self) -> String {
        read_attr(self.proc_file("cmdline")).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoadedModule {
    pub name: String,
    pub size: u64,
    pub refcount: Option<u64>,
    pub used_by: Vec<String>,
    pub state: String,
    /// Taint letters from the trailing `(OEK)`; `K` marks a livepatch.
    pub taint: String,
}

/// Parse `/proc/modules`: `name size refcnt users, state addr [(taint)]`.
pub fn parse_proc_modules(text: &str) -> Vec<LoadedModule> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let size = f.next()?.parse().ok()?;
            let refcount = f.next().and_then(|r| r.parse().ok());
            let used_by = f
                .next()
                .map(|u| {
                    u.split(',')
                        .filter(|s| !s.is_empty() && *s != "-")
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            let state = f.next().unwrap_or("").to_string();
            let taint = l
                .rsplit_once('(')
                .and_then(|(_, t)| t.strip_suffix(')'))
                .unwrap_or("")
                .to_string();
            Some(LoadedModule {
                name,
                size,
                refcount,
                used_by,
                state,
                taint,
            })
        })
        .collect()
}

/// The kernel's taint bits, letter and meaning (kernel/panic.c order).
pub const TAINT_FLAGS: &[(char, &str)] = &[
    ('P', "proprietary module"),
    ('F', "module force-loaded"),
    ('S', "SMP on unsupported CPU"),
    ('R', "module force-unloaded"),
    ('M', "machine check"),
    ('B', "bad page"),
    ('U', "user request"),
    ('D', "kernel died (oops)"),
    ('A', "ACPI table overridden"),
    ('W', "warning"),
    ('C', "staging driver"),
    ('I', "firmware workaround"),
    ('O', "out-of-tree module"),
    ('E', "unsigned module"),
    ('L', "soft lockup"),
    ('K', "kernel live patched"),
    ('X', "auxiliary"),
    ('T', "randstruct"),
    ('N', "test"),
];

pub fn decode_taint(mask: u64) -> Vec<String> {
    TAINT_FLAGS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1u64 << bit) != 0)
        .map(|(_, (c, what))| format!("{c} ({what})"))
        .collect()
}

/// Byte-substring search through glibc's `memmem`: optimised code even when
/// this crate is built without optimisations (debug test builds running in
/// slow emulated guests), which matters on a multi-megabyte /proc file.
fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    // SAFETY: both pointers are valid for reads of the given lengths for the
    // duration of the call, and memmem only reads. Failure mode: none (NULL
    // means not found).
    let p = unsafe {
        libc::memmem(
            hay.as_ptr().cast(),
            hay.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    !p.is_null()
}

/// Symbol names in `/proc/kallsyms` by owner (`vmlinux` or a module).
/// Names only: addresses read as zero without `kptr_restrict` privileges and
/// are not needed to know a symbol exists.
///
/// Lookups are substring searches over the text (`... t name\n` for vmlinux,
/// `... t name\t[module]\n` for a module) rather than a parsed table: the
/// file has ~100k lines, and a per-line parse costs seconds in an emulated
/// guest.
pub struct Kallsyms {
    text: String,
}

impl Kallsyms {
    pub fn load(paths: &Paths) -> Result<Self> {
        Ok(Self::parse(read_text(paths.proc_file("kallsyms"))?))
    }

    pub fn parse(mut text: String) -> Self {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Kallsyms { text }
    }

    pub fn has_object(&self, object: &str) -> bool {
        object == "vmlinux"
            || contains_bytes(self.text.as_bytes(), format!("\t[{object}]\n").as_bytes())
    }

    pub fn has(&self, object: &str, name: &str) -> bool {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return false;
        }
        let needle = if object == "vmlinux" {
            format!(" {name}\n")
        } else {
            format!(" {name}\t[{object}]\n")
        };
        contains_bytes(self.text.as_bytes(), needle.as_bytes())
    }
}

/// A task whose per-task patch state is not (yet) the transition's target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskState {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// -1 not in a transition, 0 unpatched, 1 patched.
    pub patch_state: i32,
    /// `/proc/<pid>/task/<tid>/stack`, one frame a line (root only).
    pub stack: Vec<String>,
}

fn numeric_dirs(p: &Path) -> Vec<u32> {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A task's kernel stack. The kernel shows nothing for a task that is
/// running at that instant, and a stalled task is usually asleep, so an empty
/// read is retried briefly: the stack is the one clue to why it stalls.
fn read_stack(p: &Path) -> Vec<String> {
    for attempt in 0..5 {
        let frames: Vec<String> = read_text(p)
            .map(|s| {
                s.lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if !frames.is_empty() || !p.exists() {
            return frames;
        }
        if attempt < 4 {
            std::thread::sleep(std::time::Duration::from_millis(7));
        }
    }
    Vec::new()
}

impl Paths {
    /// Every task's `patch_state`; tasks that exit mid-scan are skipped.
    pub fn task_states(&self) -> Vec<(u32, u32, i32)> {
        let mut out = Vec::new();
        for pid in numeric_dirs(&self.proc) {
            let tdir = self.proc.join(pid.to_string()).join("task");
            for tid in numeric_dirs(&tdir) {
                let p = tdir.join(tid.to_string()).join("patch_state");
                if let Ok(s) = read_attr(&p)
                    && let Ok(v) = s.parse()
                {
                    out.push((pid, tid, v));
                }
            }
        }
        out
    }

    /// Tasks not yet at `target` (0 or 1), with their comm and stack.
    pub fn lagging_tasks(&self, target: i32) -> Vec<TaskState> {
        self.task_states()
            .into_iter()
            .filter(|(_, _, s)| *s >= 0 && *s != target)
            .map(|(pid, tid, s)| {
                let t = self.proc.join(format!("{pid}/task/{tid}"));
                TaskState {
                    pid,
                    tid,
                    comm: read_attr(t.join("comm")).unwrap_or_default(),
                    patch_state: s,
                    stack: read_stack(&t.join("stack")),
                }
            })
            .collect()
    }

    pub fn count_lagging(&self, target: i32) -> usize {
        self.task_states()
            .iter()
            .filter(|(_, _, s)| *s >= 0 && *s != target)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_modules_lines() {
        let m = parse_proc_modules(
            "hp_stack 16384 1 - Live 0x0000000000000000 (OEK)\n\
             hp_busy 12288 0 - Live 0xffffffffc0000000 (OE)\n\
             kvm 1134592 1 kvm_amd, Live 0x0000000000000000\n\
             garbage\n\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "hp_stack");
        assert_eq!(m[0].taint, "OEK");
        assert_eq!(m[0].refcount, Some(1));
        assert_eq!(m[2].used_by, vec!["kvm_amd".to_string()]);
        assert_eq!(m[2].taint, "");
    }

    #[test]
    fn kallsyms_owner_split() {
        let k = Kallsyms::parse(
            "0000000000000000 t cmdline_proc_show\n\
             0000000000000000 t cmdline_proc_show_x\n\
             0000000000000000 T hp_busy_sleeper\t[hp_busy]\n\
             short line\n\
             0000000000000000 t last_one"
                .to_string(),
        );
        assert!(k.has("vmlinux", "cmdline_proc_show"));
        assert!(!k.has("vmlinux", "cmdline_proc"), "prefixes do not match");
        assert!(!k.has("vmlinux", "proc_show"), "suffixes do not match");
        assert!(k.has("vmlinux", "last_one"), "last line without newline");
        assert!(!k.has("vmlinux", "hp_busy_sleeper"));
        assert!(k.has("hp_busy", "hp_busy_sleeper"));
        assert!(k.has_object("hp_busy"));
        assert!(!k.has_object("hp_nothere"));
        assert!(!k.has("vmlinux", ""));
    }

    #[test]
    fn taint_letters() {
        // E (13) and K (15) and O (12).
        let t = decode_taint((1 << 12) | (1 << 13) | (1 << 15));
        assert_eq!(t.len(), 3);
        assert!(t[2].starts_with('K'));
        assert!(decode_taint(0).is_empty());
    }

    #[test]
    fn func_dir_names() {
        assert_eq!(
            parse_func_dir("cmdline_proc_show,1"),
            Some(LiveFunc {
                name: "cmdline_proc_show".into(),
                sympos: 1
            })
        );
        assert_eq!(parse_func_dir("nocomma"), None);
        assert_eq!(parse_func_dir("a,b"), None);
    }
}
