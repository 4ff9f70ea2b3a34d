//! Step 3: `vmm-bench report --quick` on the host, read back through
//! vmm-bench's own `Report` type.

use super::bin;
use livehost_common::progress::Progress;
use serde::Serialize;
use std::path::Path;
use std::process::{Command, Stdio};
use vmm_bench::report::Report as BenchReport;

/// The comparison part of the demo's report: vmm-bench's report.json as it
/// wrote it, with its exit status beside it; or why there is none.
#[derive(Debug, Default, Serialize)]
pub struct Comparison {
    #[serde(flatten)]
    pub report: Option<Box<BenchReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it was not run (`--no-bench`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
    #[serde(flatten)]
    pub exit: Option<BenchExit>,
}

/// How `vmm-bench report` ended: `exit_code` (null when it was killed) and
/// `signal` when it was.
#[derive(Debug, Serialize)]
pub struct BenchExit {
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl Comparison {
    pub fn not_run(why: &str) -> Comparison {
        Comparison {
            not_run: Some(why.into()),
            ..Comparison::default()
        }
    }

    fn error(e: String) -> Comparison {
        Comparison {
            error: Some(e),
            ..Comparison::default()
        }
    }

    /// Why there is no comparison to show, if there is none.
    pub fn unavailable(&self) -> Option<&str> {
        self.error.as_deref().or(self.not_run.as_deref())
    }

    /// The comparison from `vmm-bench report`'s report.json, whatever its
    /// exit status: a non-zero exit (1: a checksum mismatch or a path that
    /// failed) still leaves every row and skip reason in report.json, so it
    /// is used as written and the status is recorded beside it (`exit_code`,
    /// or `signal` when it was killed).
    pub fn of(code: Option<i32>, signal: Option<i32>, report_json: Option<&str>) -> Comparison {
        let how = match (code, signal) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "an unknown status".into(),
        };
        let mut c = match report_json.map(serde_json::from_str::<BenchReport>) {
            Some(Ok(r)) => Comparison {
                report: Some(Box::new(r)),
                ..Comparison::default()
            },
            Some(Err(e)) => Comparison::error(format!(
                "vmm-bench report ended with {how} and its report.json did not parse: {e}"
            )),
            None => Comparison::error(format!(
                "vmm-bench report ended with {how} and wrote no report.json"
            )),
        };
        c.exit = Some(BenchExit {
            exit_code: code,
            signal,
        });
        c
    }

    /// `vmm-bench report`'s exit status, when it ran and exited.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit.as_ref().and_then(|e| e.exit_code)
    }
}

/// Step 3: `vmm-bench report --quick` on the host. Its stdout (the same
/// Markdown it writes to report.md) is discarded so it cannot get into ours.
pub fn host_comparison(progress: &Progress, bdir: &Path) -> Comparison {
    let exe = match bin("vmm-bench") {
        Ok(e) => e,
        Err(e) => return Comparison::error(format!("{e:#}")),
    };
    let st = match Command::new(exe)
        .args(["report", "--quick", "--out"])
        .arg(bdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
    {
        Ok(st) => st,
        Err(e) => return Comparison::error(format!("cannot run vmm-bench: {e}")),
    };
    use std::os::unix::process::ExitStatusExt;
    let text = std::fs::read_to_string(bdir.join("report.json")).ok();
    let c = Comparison::of(st.code(), st.signal(), text.as_deref());
    if !st.success() {
        progress.note(format!(
            "vmm-bench report exited with {st}; {}",
            if c.error.is_some() {
                "the comparison is missing"
            } else {
                "its report.json is used as written, with the exit status recorded"
            }
        ));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report.json as vmm-bench writes it.
    fn bench_json() -> String {
        serde_json::json!({
            "host": { "cpu_model": "cpu", "cpus": 2, "release": "6.1.0", "host_is_guest": true },
            "probe": {
                "kvm_available": false, "error": "no /dev/kvm", "host_is_guest": true,
                "real_mode": null, "long_mode": null, "real_mode_ok": false, "long_mode_ok": false,
                "create_to_first_exit_us": null, "port_exit_ns": null, "guest_loop_per_us": null,
                "host_loop_per_us": 1000.0, "speed": null, "accel": null, "elapsed_ms": 1.0
            },
            "quick": true, "kib": 64, "loops": 1, "expected_checksum": "0x1",
            "checks": [{ "path": "native", "checksum": "0x1", "ok": true, "runs": 3, "matched": 3 }],
            "rows": [{ "group": "compute", "path": "native", "metric": "workload", "value": 1.5,
                       "min": 1.0, "max": 2.0, "unit": "us", "accel": "native", "clock": "host",
                       "runs": 3, "samples": [1.0, 1.5, 2.0] }],
            "skipped": [{ "path": "VMM", "reason": "no /dev/kvm" }],
            "claims": [], "container_settings": [], "exit_compare": null, "elapsed_s": 2.0
        })
        .to_string()
    }

    #[test]
    fn comparison_keeps_a_failed_reports_rows_and_status() {
        let json = bench_json();
        let c = Comparison::of(Some(1), None, Some(&json));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["rows"][0]["path"], "native");
        assert_eq!(v["rows"][0]["accel"], "native");
        assert!(v.get("error").is_none() && v.get("signal").is_none(), "{v}");
        // vmm-bench's report goes through unchanged.
        let mut written: serde_json::Value = serde_json::from_str(&json).unwrap();
        written["exit_code"] = 1.into();
        assert_eq!(v, written);

        let c = Comparison::of(None, Some(9), None);
        assert!(c.unavailable().unwrap().contains("signal 9"), "{c:?}");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["signal"], 9);
        assert!(v["exit_code"].is_null() && v.get("rows").is_none(), "{v}");
        let c = Comparison::of(Some(1), None, Some("{truncated"));
        assert!(c.unavailable().unwrap().contains("did not parse"), "{c:?}");
        assert_eq!(
            serde_json::to_value(Comparison::not_run("--no-bench")).unwrap(),
            serde_json::json!({ "not_run": "--no-bench" })
        );
    }
}
