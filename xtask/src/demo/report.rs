//! The demo's report.json, one typed struct per section. The tools' outputs
//! inside it are read through the tools' own serde types, so a change of
//! their schema shows up here at compile time, not as a missing number.

use super::comparison::Comparison;
use super::guest::{GuestPart, Steps};
use super::observer::Observer;
use hotpatch::{ErrorReport, ListReport, LoadReport, ModuleInfo, Preflight};
use kernel_tests::guest::BootTimings;
use kernel_tests::{Accel, GuestStatus};
use livehost_common::progress::Progress;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;

/// report.json (and what `--json` prints).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The report's format version.
    pub livehost_demo: u32,
    pub report_dir: String,
    pub guest: GuestSummary,
    pub livepatch: Livepatch,
    pub observer: Observer,
    pub comparison: Comparison,
    pub elapsed_s: f64,
}

/// The guest run; `run` is absent when the guest never ran.
#[derive(Debug, Default, Serialize)]
pub struct GuestSummary {
    /// The guest kernel's release.
    pub kernel: Option<String>,
    #[serde(flatten)]
    pub run: Option<GuestRun>,
    /// Why the guest part failed (the report is partial then).
    pub error: Option<String>,
}

/// How the guest ran (from kernel-tests' `RunOutcome`).
#[derive(Debug, Serialize)]
pub struct GuestRun {
    pub accel: Accel,
    pub accel_reason: String,
    pub boot: String,
    pub timings: BootTimings,
    pub status: GuestStatus,
}

impl GuestSummary {
    pub fn of(part: &GuestPart) -> GuestSummary {
        match &part.outcome {
            Some(g) => GuestSummary {
                kernel: Some(g.release.clone()),
                run: Some(GuestRun {
                    accel: g.accel,
                    accel_reason: g.accel_reason.clone(),
                    boot: g.boot.clone(),
                    timings: g.timings.clone(),
                    status: g.status.clone(),
                }),
                error: part.error.clone(),
            },
            None => GuestSummary {
                kernel: part.kernel.clone(),
                run: None,
                error: part.error.clone(),
            },
        }
    }
}

/// What a `hotpatch --json` command printed: its report, or the error
/// report every command prints when it fails.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ToolOutput<T> {
    Report(T),
    Failed(ErrorReport),
}

impl<T> ToolOutput<T> {
    /// The report, when the command got as far as one.
    pub fn report(&self) -> Option<&T> {
        match self {
            ToolOutput::Report(r) => Some(r),
            ToolOutput::Failed(_) => None,
        }
    }
}

/// Read a step's output as `T` (or hotpatch's error report). None when the
/// step printed nothing; output that is neither is noted, since it means
/// the guest's hotpatch and this demo disagree on the schema.
fn tool_output<T: DeserializeOwned>(
    steps: &Steps,
    step: &str,
    progress: &Progress,
) -> Option<ToolOutput<T>> {
    let text = steps.text(step);
    if text.is_empty() {
        return None;
    }
    match serde_json::from_str::<T>(text) {
        Ok(r) => Some(ToolOutput::Report(r)),
        Err(e) => match serde_json::from_str::<ErrorReport>(text) {
            Ok(failed) => Some(ToolOutput::Failed(failed)),
            Err(_) => {
                progress.note(format!(
                    "the `{step}` step's output is not {}: {e}",
                    std::any::type_name::<T>()
                ));
                None
            }
        },
    }
}

/// The livepatch part: the behaviour before and after, and hotpatch's
/// outputs in full.
#[derive(Debug, Default, Serialize)]
pub struct Livepatch {
    /// The sample fix's file name.
    pub module: Option<String>,
    /// `/proc/cmdline` before and after the load.
    pub before: String,
    pub after: String,
    /// The behaviour changed and the load succeeded.
    pub took_effect: bool,
    pub inspect: Option<ToolOutput<ModuleInfo>>,
    pub check: Option<ToolOutput<Preflight>>,
    pub check_exit: Option<i32>,
    pub load: Option<ToolOutput<LoadReport>>,
    pub load_exit: Option<i32>,
    pub status: Option<ToolOutput<ListReport>>,
    /// The kernel log's livepatch lines.
    pub kernel_log: String,
}

impl Livepatch {
    pub fn from_steps(steps: &Steps, fix: Option<&Path>, progress: &Progress) -> Livepatch {
        let (before, after) = (steps.text("before"), steps.text("after"));
        Livepatch {
            module: fix
                .and_then(|f| f.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
            before: before.to_string(),
            after: after.to_string(),
            took_effect: before != after && steps.rc("load") == Some(0),
            inspect: tool_output(steps, "inspect", progress),
            check: tool_output(steps, "check", progress),
            check_exit: steps.rc("check"),
            load: tool_output(steps, "load", progress),
            load_exit: steps.rc("load"),
            status: tool_output(steps, "status", progress),
            kernel_log: steps.text("dmesg_livepatch").to_string(),
        }
    }

    /// `hotpatch load`'s report, when it printed one.
    pub fn load_report(&self) -> Option<&LoadReport> {
        self.load.as_ref().and_then(ToolOutput::report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_keeps_its_error_and_a_foreign_output_is_dropped() {
        let s = Steps::parse(
            "@@begin load\n{\"error\":\"no such file\"}\n@@end load 1\n\
             @@begin status\n{\"patches\":7}\n@@end status 0\n",
        );
        let p = Progress::new("test");
        let load = tool_output::<LoadReport>(&s, "load", &p).unwrap();
        assert!(load.report().is_none());
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            serde_json::json!({ "error": "no such file" })
        );
        assert!(tool_output::<ListReport>(&s, "status", &p).is_none());
        assert!(tool_output::<ModuleInfo>(&s, "inspect", &p).is_none());
    }

    #[test]
    fn a_guest_that_never_ran_has_only_its_kernel_and_error() {
        let part = GuestPart {
            kernel: Some("6.1.0".into()),
            error: Some("boom".into()),
            ..GuestPart::default()
        };
        assert_eq!(
            serde_json::to_value(GuestSummary::of(&part)).unwrap(),
            serde_json::json!({ "kernel": "6.1.0", "error": "boom" })
        );
    }
}
