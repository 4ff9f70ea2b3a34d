//! Steps 1–2, the guest side: the script the guest runs, booting it with
//! livehost's binaries and the sample fix, and the framed steps it prints.

use super::{bin, repo_root};
use anyhow::{Result, bail};
use kernel_tests::{GuestStatus, KernelSpec, RunOptions, RunOutcome};
use livehost_common::progress::Progress;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the observer records, in seconds: long enough to hold the
/// baseline, the whole `hotpatch load --measure` and some time after it.
const OBSERVE_SECS: u32 = 20;

/// The guest side of the demo. Each step's stdout is framed so the host can
/// take JSON apart from prose; stderr is kept as its own step.
const GUEST_SCRIPT: &str = r#"
export HOTPATCH_STATE_DIR=/tmp/hotpatch
step() { n=$1; shift; echo "@@begin $n"; "$@" 2>/tmp/.err; rc=$?; echo; echo "@@end $n $rc"; echo "@@begin $n.stderr"; cat /tmp/.err; echo; echo "@@end $n.stderr 0"; }
mkdir -p /sys/fs/cgroup/demo-busy
# The workload: a container from vmm-bench's launcher, and a plain busy loop
# in a cgroup of its own, both competing with the patching for the CPUs.
vmm-bench container --name demo-app --quiet -- /bin/sh -c 'while :; do :; done' >/tmp/container.out 2>&1 &
CONT=$!
sh -c 'echo $$ > /sys/fs/cgroup/demo-busy/cgroup.procs; exec sh -c "while :; do :; done"' &
BUSY=$!
overhead record --interval 2 --duration $OBSERVE_SECS --json > /tmp/overhead.jsonl 2>/tmp/overhead.err &
OBS=$!
# Give the observer time to load its programs (slow under TCG) before the
# baseline: wait for its first interval, at most 60 s.
i=0; while [ ! -s /tmp/overhead.jsonl ] && [ $i -lt 600 ] && kill -0 $OBS 2>/dev/null; do sleep 0.1; i=$((i+1)); done
step before cat /proc/cmdline
step inspect hotpatch --json inspect /root/sample_fix.ko
step check hotpatch --json check /root/sample_fix.ko
step load hotpatch --json load --measure --timeout 60 /root/sample_fix.ko
step after cat /proc/cmdline
step status hotpatch --json status
wait $OBS
step overhead cat /tmp/overhead.jsonl
step overhead_log cat /tmp/overhead.err
kill $BUSY $CONT 2>/dev/null
step container cat /tmp/container.out
step dmesg_livepatch sh -c 'dmesg | grep -E "livepatch|sample_fix|hp_cmdline" || true'
"#;

/// One framed step: what it printed and its exit status.
struct Step {
    output: String,
    rc: i32,
}

/// The framed steps the guest printed, by name.
#[derive(Default)]
pub struct Steps(BTreeMap<String, Step>);

impl Steps {
    /// Take the `@@begin NAME` … `@@end NAME RC` frames out of the guest's
    /// stdout; anything outside a frame, or in a frame that never closed, is
    /// left out.
    pub fn parse(stdout: &str) -> Steps {
        let mut steps = BTreeMap::new();
        let mut cur: Option<String> = None;
        let mut buf = String::new();
        for line in stdout.lines() {
            if let Some(n) = line.strip_prefix("@@begin ") {
                cur = Some(n.trim().to_string());
                buf.clear();
            } else if let Some(rest) = line.strip_prefix("@@end ") {
                let mut w = rest.split_whitespace();
                let name = w.next().unwrap_or_default().to_string();
                let rc = w.next().and_then(|r| r.parse().ok()).unwrap_or(-1);
                if cur.as_deref() == Some(name.as_str()) {
                    let output = buf.trim_end().to_string();
                    steps.insert(name, Step { output, rc });
                }
                cur = None;
            } else if cur.is_some() {
                buf.push_str(line);
                buf.push('\n');
            }
        }
        Steps(steps)
    }

    /// What the step printed; empty when it did not run.
    pub fn text(&self, name: &str) -> &str {
        self.0.get(name).map(|s| s.output.as_str()).unwrap_or("")
    }

    /// The step's exit status; None when it did not run.
    pub fn rc(&self, name: &str) -> Option<i32> {
        self.0.get(name).map(|s| s.rc)
    }
}

/// What the guest part produced. `error` says why it is partial; whatever
/// was produced before the failure is kept.
#[derive(Default)]
pub struct GuestPart {
    /// The guest kernel's release, once fetched.
    pub kernel: Option<String>,
    /// The sample fix built against it.
    pub fix: Option<PathBuf>,
    pub outcome: Option<RunOutcome>,
    pub error: Option<String>,
}

impl GuestPart {
    /// The steps the guest printed (none when it did not run).
    pub fn steps(&self) -> Steps {
        self.outcome
            .as_ref()
            .map(|g| Steps::parse(&g.stdout))
            .unwrap_or_default()
    }
}

/// Steps 1–2: the guest kernel, the sample fix, the guest run. Never
/// returns early: a failure is recorded in `error` so the report is still
/// written.
pub fn guest_part(progress: &Progress, out: &Path) -> GuestPart {
    let mut part = GuestPart::default();
    if let Err(e) = run_guest(progress, out, &mut part) {
        part.error = Some(format!("{e:#}"));
    }
    part
}

fn run_guest(progress: &Progress, out: &Path, part: &mut GuestPart) -> Result<()> {
    // The binaries first: a missing build fails at once, not after the
    // kernel fetch and the module build.
    let bins = ["hotpatch", "overhead", "vmm-bench"]
        .into_iter()
        .map(|b| Ok((bin(b)?, format!("/usr/bin/{b}"))))
        .collect::<Result<Vec<_>>>()?;
    progress.step("fetching the guest kernel (debian:bookworm-cloud)");
    let kernel = kernel_tests::kernel::fetch_with(&KernelSpec::default(), progress)?;
    part.kernel = Some(kernel.release.clone());
    progress.step(format!(
        "building the sample livepatch against {}",
        kernel.release
    ));
    let fix_src = repo_root().join("hotpatch/fixtures/cmdline");
    let fix = kernel_tests::module::build(&kernel, &fix_src)?;
    part.fix = Some(fix.clone());

    let mut opts = RunOptions::new([format!("OBSERVE_SECS={OBSERVE_SECS}\n{GUEST_SCRIPT}")]);
    opts.require_config = vec!["CONFIG_LIVEPATCH".into(), "CONFIG_DEBUG_INFO_BTF".into()];
    opts.timeout = Duration::from_secs(150);
    opts.memory_mb = 1536;
    opts.progress = true;
    opts.files = bins;
    opts.files.push((fix, "/root/sample_fix.ko".into()));
    progress.step("booting the guest: observer, workload, check, load --measure");
    let guest = kernel_tests::run(&opts)?;
    std::fs::write(out.join("guest-console.log"), &guest.console)?;
    std::fs::write(out.join("guest-stdout.txt"), &guest.stdout)?;
    std::fs::write(out.join("guest-dmesg.txt"), &guest.dmesg)?;
    let exited = matches!(guest.status, GuestStatus::Exited(_));
    let why = format!(
        "the demo guest ended with {:?}; console tail:\n{}",
        guest.status,
        guest.console_tail(40)
    );
    part.outcome = Some(guest);
    if !exited {
        bail!(why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_framed() {
        let s = Steps::parse(
            "noise\n@@begin a\n{\"x\":1}\n\n@@end a 0\n@@begin b\nhello\n@@end b 3\n@@begin c\nopen",
        );
        assert_eq!(s.text("a"), "{\"x\":1}");
        assert_eq!(s.rc("a"), Some(0));
        assert_eq!(s.text("b"), "hello");
        assert_eq!(s.rc("b"), Some(3));
        // A frame that never closed did not finish: it is not a step.
        assert_eq!(s.rc("c"), None);
        assert_eq!(s.text("c"), "");
    }
}
